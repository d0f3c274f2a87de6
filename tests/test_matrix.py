"""Every kind of teacher crossed with every option that applies to it (issue 15).

Options that do not interact are packed into a few cases per teacher kind, so that every option
meets every teacher kind at least once without the full cross product: reduced-precision
teachers (bf16, fp16), channels-last, torch.compile (eager backend: the same wrapping and tracing
as inductor without generating code), --student-steps, each pool kind, exact and sampled
preparation, the student's bf16 autocast (--mixed-precision), --resume, and for
class-conditional teachers an unconditional student and classifier-free guidance. Each valid run distills a few steps into the default student (the
teacher's family at about half its width), saves it, loads it back and samples from it; each
invalid combination is one line on stderr and exit code 2, leaving no output directory.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

import tiny_teachers as tt
from dkdm.cli import main
from dkdm.formats import load_model

COMMON = ["--batch", "4", "--steps", "2", "--log-every", "1", "--no-progress", "--no-report"]
#: option sets: together they give every option to every teacher kind
CASES = {
    "iterative-bf16-compile": ["--pool", "iterative", "--teacher-dtype", "bfloat16", "--compile"],
    "iterative-bf16": ["--pool", "iterative", "--teacher-dtype", "bfloat16"],
    "dynamic-exact-fp16-channels-last-student-steps": ["--pool", "dynamic", "--rho", "0.5", "--prep", "exact",
                                                       "--teacher-dtype", "float16", "--channels-last",
                                                       "--student-steps", "5"],
    "shuffled-sampled-bf16-autocast-resume": ["--pool", "shuffled", "--prep", "sampled", "--prep-steps", "4",
                                              "--mixed-precision", "bf16"],
}
#: Tracing with dynamo costs seconds per network, so the fast suite compiles one teacher of each
#: network code (diffusers UNet, ADM, DiT, MLP) and the other kinds run the same case uncompiled;
#: their compiled runs are marked slow.
COMPILED_FAST = {"dkdm-unet", "adm-st", "dit-pipeline", "dkdm-mlp"}


def _valid_params():
    for kind in tt.KINDS:
        for case in CASES:
            compiled = case == "iterative-bf16-compile"
            if case == "iterative-bf16" and kind in COMPILED_FAST:
                continue
            marks = [pytest.mark.slow] if compiled and kind not in COMPILED_FAST else []
            yield pytest.param(kind, case, marks=marks, id=f"{kind}-{case}")


#: the family of the default student per teacher kind
FAMILY = {"dkdm-unet": "unet", "dkdm-dit-cond": "dit", "dkdm-mlp": "mlp", "improved": "adm", "ldm": "unet",
          "dit-pipeline": "dit", **{k: "adm" for k in tt.KINDS if k.startswith("adm-")},
          **{k: "unet" for k in tt.KINDS if k.startswith(("ddpm-", "ddim-"))}}


@pytest.fixture(scope="module")
def teacher_args(tmp_path_factory):
    """Each kind's tiny teacher, written on first use."""
    root = tmp_path_factory.mktemp("teachers")
    return functools.cache(lambda kind: tt.make(kind, root / kind))


@pytest.fixture
def eager_compile(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


@pytest.fixture
def own_accelerate_state():
    """accelerate keeps one mixed-precision setting per process (a second Accelerator with another
    one raises); a command line run is one process, these runs share one, so each starts afresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _check_student(out, kind, teacher, steps, classes):
    student = load_model(out)
    assert student.spec["type"] == FAMILY[kind]
    assert student.num_classes == classes
    assert student.schedule.num_steps == steps and student.sample_shape == teacher.sample_shape
    x = student.sample(2, steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, *teacher.sample_shape) and bool(torch.isfinite(x).all())
    if teacher.decoder is not None:  # latent teachers: the student keeps the autoencoder
        assert student.decode(x).shape[:2] == (2, 3)


@pytest.mark.parametrize("kind, case", _valid_params())
def test_valid_combination_distills_saves_reloads_and_samples(kind, case, teacher_args, tmp_path, capsys,
                                                               eager_compile, own_accelerate_state):
    args = teacher_args(kind)
    teacher = tt.load(args)
    extra = list(CASES[case])
    if kind in tt.GUIDED and case.startswith("shuffled"):
        extra += ["--guidance", "2.0"]
    out = tmp_path / "run"
    if case.endswith("resume"):
        assert main(["distill", *args, *COMMON, *extra, "--ckpt-every", "1", "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["distill", *args, *COMMON, *extra, "--steps", "3", "--resume", "--out", str(out)]) == 0
        assert "resuming" in capsys.readouterr().err
        assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    else:
        assert main(["distill", *args, *COMMON, *extra, "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert f"student: {FAMILY[kind]}" in err and "parameters (teacher:" in err
    steps = 5 if "--student-steps" in extra else tt.T
    _check_student(out, kind, teacher, steps, teacher.num_classes)


@pytest.mark.parametrize("kind", sorted(tt.CONDITIONAL))
def test_conditional_teacher_into_an_unconditional_student(kind, teacher_args, tmp_path):
    args = teacher_args(kind)
    teacher = tt.load(args)
    c = teacher.sample_shape[0]
    out = tmp_path / "run"
    assert main(["distill", *args, *COMMON, "--student", "unet:widths=8-16,groups=4,classes=0", "--pool", "dynamic",
                 "--rho", "0.5", "--prep", "sampled", "--prep-steps", "3", "--out", str(out)]) == 0
    student = load_model(out)
    assert student.num_classes == 0 and student.sample_shape == (c, 8, 8)
    assert torch.isfinite(student.sample(2, steps=3)).all()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dkdm distill: error: ") and "Traceback" not in err[0], err
    return err[0]


INVALID = [
    ("dkdm-unet", ["--guidance", "2"], "guidance needs a class-conditional teacher"),
    ("ddpm-v-large", ["--guidance", "2"], "guidance needs a class-conditional teacher"),
    ("adm-st-cond", ["--guidance", "2"], "unconditional (null) label"),
    ("dkdm-dit-cond", ["--guidance", "2"], "unconditional (null) label"),
    ("dkdm-unet", ["--student-steps", "1"], "cannot respace 20 steps to 1"),
    ("ldm", ["--student-steps", "40"], "cannot respace 20 steps to 40"),
    ("adm-pt", ["--student", "mlp:width=8"], "an mlp takes vector data"),
    ("dkdm-mlp", ["--student", "unet:widths=8-16,groups=4"], "takes square images"),
    ("dit-pipeline", ["--student", "dit:patch=3,width=16,heads=2"], "patch 3 must divide the image size 8"),
    ("adm-pt-cond", ["--student", "unet:widths=8-16,groups=4,classes=7"], "conditions on 7 classes"),
    ("ddim-eps", ["--student", "unet:widths=8-16,groups=4,classes=3"], "carry no class labels"),
    ("ddpm-eps-small", ["--pool", "shuffled", "--prep", "sampled", "--prep-steps", "50"], "--prep-steps must be in 2..20"),
    ("dkdm-unet", ["--teacher-config", "{flags}"], "drop --teacher-config"),
    ("adm-st", ["--drop-config"], "pass the guided-diffusion flags it was trained with"),
    ("improved", ["--resume"], "no checkpoint to resume from"),
]


@pytest.mark.parametrize("kind, extra, message", INVALID, ids=[f"{k}{' '.join(e)}" for k, e, _ in INVALID])
def test_invalid_combination_is_one_line(kind, extra, message, teacher_args, tmp_path, capsys):
    args = list(teacher_args(kind))
    if "--drop-config" in extra:
        args, extra = args[:2], []
    extra = [e.format(flags=tt.make("adm-pt", tmp_path / "flags")[3]) if "{flags}" in e else e for e in extra]
    out = tmp_path / "run"
    assert main(["distill", *args, *COMMON, *extra, "--out", str(out)]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_resume_with_other_settings_is_refused(teacher_args, tmp_path, capsys):
    args = teacher_args("dit-pipeline")
    out = tmp_path / "run"
    assert main(["distill", *args, *COMMON, "--pool", "shuffled", "--prep", "sampled", "--prep-steps", "3",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["distill", *args, *COMMON, "--pool", "dynamic", "--rho", "0.5", "--prep", "sampled",
                 "--prep-steps", "3", "--steps", "3", "--resume", "--out", str(out)]) == 2
    assert "settings differ" in _one_error_line(capsys)


class CustomNet(torch.nn.Module):
    """A network dkdm has never seen: a conv net on (x, t, y) with its own embeddings, which
    computes in its weights' dtype (the one contract a reduced-precision teacher asks of it)."""

    def __init__(self, classes=3):
        super().__init__()
        self.t_emb = torch.nn.Embedding(64, 16)
        self.y_emb = torch.nn.Embedding(classes + 1, 16)  # the last row is the null label
        self.inp = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, t, y=None):
        e = self.t_emb(t) + (0 if y is None else self.y_emb(y))
        return self.out(torch.nn.functional.silu(self.inp(x) + e[:, :, None, None]))


API_CASES = {
    "bf16-compile-iterative": dict(dtype="bfloat16", compile=True, pool="iterative"),
    "fp16-channels-last-respaced-dynamic-exact-guidance": dict(dtype="float16", channels_last=True, steps=5,
                                                              pool="dynamic", prep="exact", guidance=2.0),
    "shuffled-sampled-resume": dict(pool="shuffled", prep="sampled", resume=True),
}


@pytest.mark.parametrize("case", API_CASES)
def test_custom_module_teacher_through_the_api(case, tmp_path, eager_compile):
    from dkdm.diffusion import Schedule
    from dkdm.model import DiffusionModel
    from dkdm.pool import KnowledgePool
    from dkdm.trainer import TrainConfig, Trainer

    o = API_CASES[case]
    torch.manual_seed(0)
    teacher = DiffusionModel(CustomNet(), Schedule.named("linear", tt.T), (3, 8, 8), variance="fixed_small",
                             clip_x0=True, num_classes=3, null_class=3).eval().requires_grad_(False)
    teacher.set_inference_dtype(o.get("dtype", "float32"))
    if o.get("channels_last"):
        teacher.net.to(memory_format=torch.channels_last)
    if o.get("compile"):
        teacher.net = torch.compile(teacher.net)
    if o.get("steps"):
        teacher = teacher.respaced(o["steps"])
    student = DiffusionModel.student_of(teacher, "unet:widths=8-16,groups=4")
    assert student.num_classes == 3 and student.schedule.num_steps == o.get("steps", tt.T)
    pool = KnowledgePool(teacher, 4, o["pool"], rho=0.5, seed=0, preparation=o.get("prep", "auto"), prep_steps=3,
                         guidance=o.get("guidance", 1.0))
    pool.prepare()
    cfg = TrainConfig(steps=2, lr=1e-3, log_every=1, ckpt_every=1, compile=bool(o.get("compile")),
                      channels_last=bool(o.get("channels_last")))
    Trainer(student, pool, cfg, tmp_path, progress=False).train()
    if o.get("resume"):
        trainer = Trainer(student, pool, TrainConfig(steps=3, lr=1e-3, log_every=1), tmp_path, progress=False)
        assert trainer.resume() == 2
        trainer.train()
    loaded = load_model(tmp_path)
    x = loaded.sample(2, steps=3, labels=torch.tensor([0, 2]))
    assert x.shape == (2, 3, 8, 8) and bool(torch.isfinite(x).all())
    # a custom student, loaded back with its module
    custom = DiffusionModel(CustomNet(), teacher.schedule, (3, 8, 8), variance="fixed_small", num_classes=3)
    Trainer(custom, pool, TrainConfig(steps=1, lr=1e-3), tmp_path / "custom", progress=False).train()
    again = load_model(tmp_path / "custom", net=CustomNet())
    assert torch.isfinite(again.sample(2, steps=3)).all()
