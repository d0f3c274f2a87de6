"""Class-conditional teachers and students: labels reach the teacher and the student, and a
conditional student distilled without data puts each class where the teacher does."""

import pytest
import torch

from dkdm.data import DataSource, Toy2D
from dkdm.diffusion import Schedule
from dkdm.errors import DkdmError
from dkdm.model import DiffusionModel
from dkdm.pool import KnowledgePool
from dkdm.trainer import TrainConfig, Trainer


def class_accuracy(model, n=800, seed=0):
    """Fraction of samples whose nearest mixture component is the label they were drawn for."""
    data = Toy2D()
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % data.modes
    x = model.sample(n, generator=g, labels=labels).double()
    nearest = torch.cdist(x, data.centers).argmin(1)
    return (nearest == labels).double().mean().item()


@pytest.fixture(scope="module")
def cond_teacher(tmp_path_factory):
    torch.manual_seed(0)
    sched = Schedule.named("linear", 50)
    teacher = DiffusionModel.build("mlp:width=128,depth=3,classes=8", (2,), sched, variance="fixed_small")
    source = DataSource(Toy2D(), sched, 256, seed=0, conditional=True)
    Trainer(teacher, source, TrainConfig(steps=1500, lr=2e-3, ema_decay=0.99, grad_clip=0),
            tmp_path_factory.mktemp("t"), progress=False).train()
    return teacher.eval()


def test_conditional_teacher_draws_the_asked_class(cond_teacher):
    assert class_accuracy(cond_teacher) > 0.95


def test_sampling_hands_back_the_labels_it_drew_and_keeps_no_state(cond_teacher):
    # whoever scores samples gets their labels from the call, not from an attribute a later call overwrites
    from dkdm.evaluation import draw

    x, labels = cond_teacher.sample(400, steps=10, generator=torch.Generator().manual_seed(3), return_labels=True)
    assert labels.shape == (400,) and set(labels.tolist()) == set(range(8))
    assert not hasattr(cond_teacher, "last_labels")
    nearest = torch.cdist(x.double(), Toy2D().centers).argmin(1)
    assert (nearest == labels).double().mean() > 0.9  # the labels are the ones the samples were drawn for
    again = draw(cond_teacher, 400, 10, seed=5, progress=False, return_labels=True)
    other = draw(cond_teacher, 400, 10, seed=6, progress=False, return_labels=True)
    same = draw(cond_teacher, 400, 10, seed=5, progress=False, return_labels=True)
    assert torch.equal(again.labels, same.labels) and not torch.equal(again.labels, other.labels)
    assert torch.equal(draw(cond_teacher, 400, 10, seed=5, progress=False), again.samples)


def test_conditional_student_distilled_without_data_keeps_the_classes(cond_teacher, tmp_path):
    torch.manual_seed(1)
    student = DiffusionModel.build("mlp:width=96,depth=2,classes=8", (2,), cond_teacher.schedule, variance="fixed_small")
    assert class_accuracy(student) < 0.4  # untrained: labels mean nothing yet
    pool = KnowledgePool(cond_teacher, 256, "dynamic", rho=0.2, seed=0, preparation="sampled", prep_steps=10)
    pool.prepare()
    Trainer(student, pool, TrainConfig(steps=1200, lr=2e-3, ema_decay=0.99, grad_clip=0), tmp_path,
            progress=False).train()
    assert class_accuracy(student.eval()) > 0.9


def test_pool_labels_are_uniform_follow_a_prior_and_are_redrawn_on_restart(cond_teacher):
    pool = KnowledgePool(cond_teacher, 64, "dynamic", rho=2.0, seed=0)
    pool.prepare()
    counts = torch.bincount(pool.y, minlength=8).double()
    expected = pool.size / 8
    assert ((counts - expected) ** 2 / expected).sum() < 30  # chi-square, 7 dof, p ~ 1e-4
    prior = torch.tensor([0, 0, 1.0, 0, 0, 0, 3.0, 0])
    p2 = KnowledgePool(cond_teacher, 64, "dynamic", rho=1.0, seed=0, class_prior=prior)
    p2.prepare()
    assert set(p2.y.tolist()) == {2, 6}
    assert 0.65 < (p2.y == 6).double().mean().item() < 0.85
    p2.s.zero_()
    p2.y.fill_(99)  # finished entries restart from noise with a fresh label from the prior
    batch = p2.next_batch()
    assert set(batch.y.tolist()) <= {2, 6}
    state = p2.state_dict()
    p3 = KnowledgePool(cond_teacher, 64, "dynamic", rho=1.0, seed=5, class_prior=prior)
    p3.load_state_dict(state)
    assert torch.equal(p3.y, p2.y)


def test_batches_carry_the_label_the_teacher_stepped_with():
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, y=None):
            calls.append(y.clone())
            return torch.zeros_like(x)

    sched = Schedule.named("linear", 10)
    teacher = DiffusionModel(Spy(), sched, (2,), variance="fixed_small", num_classes=5)
    pool = KnowledgePool(teacher, 16, "shuffled", seed=0)
    pool.prepare()
    calls.clear()
    batch = pool.next_batch()
    assert torch.equal(calls[-1], batch.y)


def test_classifier_free_guidance_mixes_conditional_and_null_outputs():
    class ByLabel(torch.nn.Module):
        def forward(self, x, t, y=None):
            return torch.stack([y.float(), 10 * y.float()], 1) + 0 * x

    sched = Schedule.named("linear", 10)
    m = DiffusionModel(ByLabel(), sched, (2,), variance="fixed_small", num_classes=4, null_class=4)
    x, t, y = torch.zeros(3, 2), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    out = m.output(x, t, y, guidance=3.0)
    cond, null = m(x, t, y), m(x, t, torch.full_like(y, 4))
    assert torch.allclose(out, null + 3.0 * (cond - null))
    plain = DiffusionModel(ByLabel(), sched, (2,), variance="fixed_small", num_classes=4)
    with pytest.raises(DkdmError, match="null"):
        plain.output(x, t, y, guidance=2.0)
    with pytest.raises(DkdmError, match="guidance needs"):
        KnowledgePool(plain, 4, "shuffled", guidance=2.0)


def test_conditional_student_needs_labelled_batches(tmp_path):
    sched = Schedule.named("linear", 10)
    teacher = DiffusionModel.build("mlp:width=8,depth=1", (2,), sched)
    student = DiffusionModel.build("mlp:width=8,depth=1,classes=3", (2,), sched)
    with pytest.raises(DkdmError, match="carry no class labels"):
        Trainer(student, KnowledgePool(teacher, 4, "shuffled"), TrainConfig(steps=1), tmp_path, progress=False)


def test_conditional_digits_train_and_distill_from_the_command_line(tmp_path):
    import json

    from dkdm.cli import main
    from dkdm.formats import load_model

    tiny = ["--batch", "16", "--steps", "10", "--eval-num", "60", "--eval-steps", "5", "--no-progress"]
    t = tmp_path / "t"
    assert main(["train", "--data", "digits", "--model", "unet:widths=8-16,layers=1,groups=4,classes=10",
                 "--diffusion-steps", "20", *tiny, "--out", str(t)]) == 0
    metrics = json.loads((t / "metrics.json").read_text())
    assert 0 <= metrics["model"]["label_accuracy"] <= 1
    assert load_model(t).num_classes == 10 and (t / "model.safetensors").exists()
    s = tmp_path / "s"
    assert main(["distill", "--teacher", str(t), "--student", "unet:widths=8-16,layers=1,groups=4", "--pool",
                 "shuffled", *tiny, "--out", str(s)]) == 0
    assert load_model(s).num_classes == 10  # the student of a conditional teacher conditions too
    assert "label_accuracy" in json.loads((s / "metrics.json").read_text())["student"]
    assert main(["train", "--data", "digits", "--model", "unet:widths=8-16,layers=1,groups=4,classes=7",
                 "--diffusion-steps", "20", *tiny, "--out", str(tmp_path / "bad")]) == 2
