"""The command line: bad input, exact resume, seeds, and divergence handling."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dkdm.cli import main

FAST = ["--no-progress", "--diffusion-steps", "20", "--batch", "32", "--model", "mlp:width=32,depth=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "teacher"
    assert main(["train", "--data", "toy2d", "--steps", "30", "--out", str(out), *FAST]) == 0
    return out


def distill(teacher, out, *extra):
    return main(["distill", "--teacher", str(teacher), "--student", "mlp:width=16,depth=1", "--steps", "12",
                 "--batch", "16", "--rho", "0.5", "--no-progress", "--out", str(out), *extra])


def one_error_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dkdm {command}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("case,args,msg", [
    ("missing teacher", ["--teacher", "{tmp}/nope"], "does not exist"),
    ("not a model", ["--teacher", "{tmp}"], "not a dkdm model directory"),
    ("bad spec", ["--teacher", "{teacher}", "--student", "mlp:width"], "expected key=value"),
    ("unknown arch", ["--teacher", "{teacher}", "--student", "resnet"], "unknown model type"),
    ("rho zero", ["--teacher", "{teacher}", "--rho", "0"], "--rho must be > 0"),
    ("pool < batch", ["--teacher", "{teacher}", "--rho", "0.001"], "smaller than one batch"),
    ("shape mismatch", ["--teacher", "{teacher}", "--student", "unet"], "square images"),
    ("resume nothing", ["--teacher", "{teacher}", "--resume"], "no checkpoint"),
    ("negative steps", ["--teacher", "{teacher}", "--steps", "-1"], "--steps must be at least 1"),
])
def test_distill_bad_input(tmp_path, teacher, capsys, case, args, msg):
    out = tmp_path / "run"
    args = [a.format(tmp=tmp_path, teacher=teacher) for a in args]
    argv = ["distill", "--student", "mlp:width=16,depth=1", "--no-progress", "--out", str(out), *args]
    assert main(argv) == 2, case
    assert msg in one_error_line(capsys, "distill")
    assert not out.exists(), "a failed command must not leave an output directory"


def test_corrupt_teacher_weights(tmp_path, teacher, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(teacher, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    assert distill(bad, tmp_path / "run") == 2
    assert "corrupt" in one_error_line(capsys, "distill")
    assert not (tmp_path / "run").exists()


def test_output_directory_holding_a_run_is_refused(tmp_path, teacher, capsys):
    out = tmp_path / "run"
    assert distill(teacher, out) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.rglob("*"))
    assert distill(teacher, out) == 2
    assert "already holds a run" in one_error_line(capsys, "distill")
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize("argv,msg", [
    (["train", "--data", "mnist", "--out", "{tmp}/r"], "neither a built-in data set"),
    (["train", "--model", "mlp:depth=x=1", "--out", "{tmp}/r"], "model spec"),
    (["train", "--out", "{tmp}/r", "--lr", "0"], "--lr must be > 0"),
    (["sample", "--model", "{teacher}", "--out", "{tmp}/s.txt"], ".npz"),
    (["sample", "--model", "{tmp}/none", "--out", "{tmp}/s.npz"], "does not exist"),
    (["evaluate", "--model", "{teacher}", "--reference", "mnist"], "unknown built-in data set"),
    (["evaluate", "--model", "{teacher}", "--steps", "1"], "--steps must be in 2..20"),
])
def test_other_commands_bad_input(tmp_path, teacher, capsys, argv, msg):
    argv = [a.format(tmp=tmp_path, teacher=teacher) for a in argv] + ["--no-progress"]
    assert main(argv) == 2
    assert msg in one_error_line(capsys, argv[0])
    assert not (tmp_path / "r").exists()


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def _ckpt_student(d):
    last = sorted((d / "checkpoints").iterdir())[-1]
    state = load_file(str(last / "state.safetensors"))
    return {k: v for k, v in state.items() if k.startswith(("student.", "ema.", "optim."))}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("command", ["train", "distill"])
def test_resume_gives_identical_weights(tmp_path, teacher, command):
    def run(out, steps, *extra):
        if command == "train":
            return main(["train", "--data", "toy2d", "--steps", str(steps), "--ckpt-every", "10",
                         "--out", str(out), *FAST, *extra])
        return main(["distill", "--teacher", str(teacher), "--student", "mlp:width=16,depth=1",
                     "--steps", str(steps), "--batch", "16", "--rho", "0.5", "--ckpt-every", "10",
                     "--no-progress", "--out", str(out), *extra])

    assert run(tmp_path / "a", 30) == 0
    assert run(tmp_path / "b", 10) == 0
    if command == "distill":  # a dry run of the resume plans it and leaves the run as it was
        before = {f: f.read_bytes() for f in (tmp_path / "b").rglob("*") if f.is_file()}
        assert run(tmp_path / "b", 30, "--resume", "--dry-run") == 0
        assert {f: f.read_bytes() for f in (tmp_path / "b").rglob("*") if f.is_file()} == before
    assert run(tmp_path / "b", 30, "--resume") == 0
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    _same(_ckpt_student(tmp_path / "a"), _ckpt_student(tmp_path / "b"))


def test_same_seed_same_result_and_other_seed_differs(tmp_path, teacher):
    assert distill(teacher, tmp_path / "a", "--seed", "4") == 0
    assert distill(teacher, tmp_path / "b", "--seed", "4") == 0
    assert distill(teacher, tmp_path / "c", "--seed", "5") == 0
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    a, c = _weights(tmp_path / "a"), _weights(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_config_file_is_overridden_by_flags(tmp_path, teacher, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher: {teacher}\nstudent: 'mlp:width=8,depth=1'\nsteps: 5\nbatch: 16\nrho: 0.5\npool: shuffled\n")
    assert main(["distill", "--config", str(cfg), "--steps", "7", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["steps"] == 7 and run["pool"] == "shuffled" and run["student"] == "mlp:width=8,depth=1"
    assert json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[-1])["step"] == 7
    cfg.write_text("stepz: 3\n")
    capsys.readouterr()
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "q")]) == 2
    assert "unknown setting(s) stepz" in one_error_line(capsys, "distill")


def test_sample_and_evaluate(tmp_path, teacher, capsys):
    import numpy as np

    assert main(["sample", "--model", str(teacher), "--num", "50", "--steps", "5", "--out",
                 str(tmp_path / "s.npz"), "--no-progress"]) == 0
    x = np.load(tmp_path / "s.npz")["samples"]
    assert x.shape == (50, 2) and np.isfinite(x).all()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(teacher), "--num", "200", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == "toy2d" and result["sliced_w2"] > 0


class NaNAfter:
    """A data source whose targets turn NaN from a given step on."""

    def __init__(self, source, bad_from):
        self.source, self.bad_from, self.n = source, bad_from, 0

    def next_batch(self):
        self.n += 1
        b = self.source.next_batch()
        if self.n >= self.bad_from:
            b.target.eps = b.target.eps * float("nan")
        return b

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, s):
        self.source.load_state_dict(s)


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    from dkdm.data import DataSource, Toy2D
    from dkdm.diffusion import Schedule
    from dkdm.model import DiffusionModel
    from dkdm.trainer import TrainConfig, Trainer, TrainingDiverged

    sched = Schedule.named("linear", 10)
    model = DiffusionModel.build("mlp:width=8,depth=1", (2,), sched)
    trainer = Trainer(model, NaNAfter(DataSource(Toy2D(), sched, 8), 6), TrainConfig(steps=20, ckpt_every=2),
                      tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match="at step 6"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    state = load_file(str(tmp_path / "checkpoints" / "step_00000004" / "state.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("student."))


def test_deferred_finiteness_check_names_the_first_bad_step_and_writes_nothing_bad(tmp_path, monkeypatch):
    """On an accelerator the loss is checked every log step, not every step: the step that went
    non-finite is still named exactly and no checkpoint after it is written."""
    from dkdm.data import DataSource, Toy2D
    from dkdm.diffusion import Schedule
    from dkdm.model import DiffusionModel
    from dkdm.trainer import TrainConfig, Trainer, TrainingDiverged

    monkeypatch.setattr(Trainer, "check_every", property(lambda self: 5))
    sched = Schedule.named("linear", 10)
    model = DiffusionModel.build("mlp:width=8,depth=1", (2,), sched)
    trainer = Trainer(model, NaNAfter(DataSource(Toy2D(), sched, 8), 6), TrainConfig(steps=20, ckpt_every=4),
                      tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match=r"non-finite at step 6 \(checked at step 8\)"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004"]
    assert not (tmp_path / "model").exists() and not (tmp_path / "dkdm_model.json").exists()


def test_the_python_api_runs_what_the_command_line_runs(teacher, tmp_path):
    # dkdm.distill(...) holds every rule of `dkdm distill`: same settings, same student, bit for bit
    import dkdm
    from dkdm.errors import DkdmError

    assert distill(teacher, tmp_path / "cli", "--seed", "3") == 0
    result = dkdm.distill(teacher=str(teacher), student="mlp:width=16,depth=1", steps=12, batch=16, rho=0.5, seed=3,
                          out=str(tmp_path / "api"), progress=False)
    assert result["out"] == tmp_path / "api" and result["last"]["step"] == 12 and result["stop_reason"] is None
    assert json.loads((tmp_path / "api" / "run.json").read_text()) == json.loads((tmp_path / "cli" / "run.json").read_text()) | {"out": str(tmp_path / "api")}
    want, got = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cli", "api"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(DkdmError, match="unknown setting.*stpes"):
        dkdm.distill(teacher=str(teacher), stpes=3, out=str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()
