"""Students on fewer steps than the teacher: an even respacing, never a silent mismatch."""

import json

import pytest
import torch

from dkdm.cli import main
from dkdm.diffusion import Schedule
from dkdm.errors import DkdmError
from dkdm.formats import load_model
from dkdm.model import DiffusionModel
from dkdm.pool import KnowledgePool
from dkdm.trainer import TrainConfig, Trainer
from helpers import CountingNet, tiny_teacher


def test_respaced_teacher_steps_between_kept_timesteps():
    teacher = tiny_teacher(20)
    view = teacher.respaced(5)
    sched, tmap = teacher.schedule.respace(5)
    assert torch.equal(view.schedule.betas, sched.betas)
    # same weights, called at the original timesteps
    x = torch.randn(4, 2)
    i = torch.tensor([0, 1, 3, 4])
    assert torch.equal(view(x, i), teacher(x, tmap[i]))
    # alpha-bar is kept at the kept steps, so one respaced step is the jump between them
    assert torch.allclose(view.schedule.alphas_cumprod, teacher.schedule.alphas_cumprod[tmap], rtol=1e-12)


def test_pool_on_a_respaced_teacher_serves_the_students_steps():
    teacher = tiny_teacher(20)
    teacher.net = CountingNet(teacher.net)
    view = teacher.respaced(5)
    pool = KnowledgePool(view, batch_size=8, kind="dynamic", rho=1.0, seed=0)
    pool.prepare()
    assert pool.prep_calls == int((5 - pool.s).sum())  # cost counted in respaced steps
    batch = pool.next_batch()
    assert batch.t.max() < 5


def test_trainer_refuses_a_student_on_another_schedule(tmp_path):
    teacher = tiny_teacher(20)
    pool = KnowledgePool(teacher, batch_size=8, kind="shuffled", seed=0)
    student = DiffusionModel.build("mlp:width=8,depth=1", (2,), Schedule.named("linear", 10))
    with pytest.raises(DkdmError, match="respaced"):
        Trainer(student, pool, TrainConfig(steps=1), tmp_path / "o", progress=False)


def test_distill_with_student_steps_writes_a_pipeline_on_the_respaced_schedule(tmp_path):
    from diffusers import DDPMPipeline

    tiny = ["--diffusion-steps", "20", "--model", "unet:widths=8-16,layers=1,groups=4", "--batch", "8",
            "--no-progress", "--no-report"]
    assert main(["train", "--data", "digits", "--steps", "2", "--out", str(tmp_path / "t"), *tiny]) == 0
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--student", "unet:widths=8-16,layers=1,groups=4",
                 "--student-steps", "5", "--pool", "shuffled", "--batch", "4", "--steps", "2", "--no-progress",
                 "--no-report", "--out", str(out)]) == 0
    student = load_model(out)
    want, _ = load_model(tmp_path / "t").schedule.respace(5)
    assert student.schedule.num_steps == 5 and torch.allclose(student.schedule.betas, want.betas)
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.num_train_timesteps == 5
    img = pipe(batch_size=1, num_inference_steps=5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 8, 8, 1)
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--student-steps", "40", "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2


def test_respaced_conditional_teacher_passes_labels_and_keeps_spec_and_dtype():
    """A class-conditional model viewed respaced takes its labels (it used to fail with 'takes 3
    positional arguments but 4 were given'), keeps its spec (so the default student stays in its
    family) and its inference dtype (its weights are shared)."""
    teacher = tiny_teacher(20, spec="mlp:width=32,depth=1,classes=3")
    view = teacher.respaced(5)
    _, tmap = teacher.schedule.respace(5)
    x, i, y = torch.randn(4, 2), torch.tensor([0, 1, 3, 4]), torch.tensor([0, 2, 1, 2])
    assert torch.equal(view(x, i, y), teacher(x, tmap[i], y))
    assert view.spec == teacher.spec and view.num_classes == 3
    pool = KnowledgePool(view, batch_size=8, kind="shuffled", seed=0)
    pool.prepare()
    assert pool.next_batch().y is not None
    teacher.set_inference_dtype("bfloat16")
    assert teacher.respaced(5)(x, i, y).dtype == torch.float32  # inputs follow the bf16 weights


def test_distill_student_steps_from_a_conditional_teacher_keeps_its_family(tmp_path):
    t = tmp_path / "t"
    assert main(["train", "--data", "toy2d", "--model", "mlp:width=16,depth=1,classes=8", "--diffusion-steps", "20",
                 "--steps", "2", "--batch", "16", "--no-progress", "--no-report", "--out", str(t)]) == 0
    cfg = json.loads((t / "dkdm_model.json").read_text())
    cfg.pop("data")  # a teacher without a data set's tuned student: the default student is derived from it
    (t / "dkdm_model.json").write_text(json.dumps(cfg))
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(t), "--student-steps", "5", "--pool", "shuffled", "--batch", "4",
                 "--steps", "2", "--no-progress", "--no-report", "--out", str(out)]) == 0
    student = load_model(out)
    assert student.spec["type"] == "mlp" and student.spec["width"] == 8 and student.num_classes == 8
    assert student.schedule.num_steps == 5
