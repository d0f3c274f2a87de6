"""Faults a long run meets: kill -9, SIGTERM, a damaged checkpoint, a full disk, a broken teacher."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dkdm.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "dkdm"


def cmd(kind, out, steps, *extra):
    if kind == "train":
        args = ["train", "--data", "toy2d", "--model", "mlp:width=16,depth=1", "--diffusion-steps", "20",
                "--batch", "32"]
    else:
        args = ["distill", "--teacher", "TEACHER", "--student", "mlp:width=16,depth=1", "--batch", "32",
                "--rho", "0.5"]
    return [*args, "--steps", str(steps), "--ckpt-every", "100", "--log-every", "10", "--no-progress",
            "--no-report", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "teacher"
    assert main(cmd("train", out, 50)) == 0
    return out


def argv(kind, teacher, out, steps, *extra):
    return [str(teacher) if a == "TEACHER" else a for a in cmd(kind, out, steps, *extra)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # bit-identity needs the same thread count in every run


def spawn(args):
    return subprocess.Popen([sys.executable, "-m", "dkdm.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def run_cli(args) -> int:
    return subprocess.run([sys.executable, "-m", "dkdm.cli", *args], capture_output=True, env=ENV).returncode


def wait_for_step(out, step, proc, timeout=300):
    log = Path(out) / "log.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.exists():
            lines = log.read_text().splitlines()
            try:
                if lines and json.loads(lines[-1])["step"] >= step:
                    return
            except json.JSONDecodeError:  # a line being written
                pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("run did not reach the step in time")


def weights(out):
    d = Path(out)
    f = d / "model.safetensors"
    return load_file(str(f if f.exists() else d / "unet" / "diffusion_pytorch_model.safetensors"))


def last_raw_student(out):
    last = sorted((Path(out) / "checkpoints").iterdir())[-1]
    return {k: v for k, v in load_file(str(last / "state.safetensors")).items() if k.startswith(("student.", "ema."))}


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", [pytest.param("train", marks=pytest.mark.slow), "distill"])  # one loop for both
def test_kill_9_then_resume_gives_bit_identical_student_and_ema(tmp_path, teacher, kind):
    steps = 700  # killed at step 350 or later: 350 steps of margin, several seconds at these networks' speed
    assert main(argv(kind, teacher, tmp_path / "a", steps)) == 0  # in-process, one thread like the subprocesses
    proc = spawn(argv(kind, teacher, tmp_path / "b", steps))
    wait_for_step(tmp_path / "b", 350, proc)  # past the checkpoints at 100..300, between two of them
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    assert run_cli(argv(kind, teacher, tmp_path / "b", steps, "--resume")) == 0
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    same(last_raw_student(tmp_path / "a"), last_raw_student(tmp_path / "b"))
    # the log holds each step once: lines written after the checkpoint were replaced on resume
    logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(10, steps + 1, 10))


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, teacher):
    steps = 500  # stopped at step 150 or later
    assert main(argv("distill", teacher, tmp_path / "a", steps)) == 0  # in-process, one thread like the subprocesses
    proc = spawn(argv("distill", teacher, tmp_path / "b", steps))
    wait_for_step(tmp_path / "b", 150, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    m = re.search(r"SIGTERM at step (\d+): checkpoint written", err.strip().splitlines()[-1])
    assert m and "Traceback" not in err, err
    stopped = int(m.group(1))
    assert (tmp_path / "b" / "checkpoints" / f"step_{stopped:08d}").is_dir()
    assert run_cli(argv("distill", teacher, tmp_path / "b", steps, "--resume")) == 0
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, teacher, capsys):
    assert main(argv("train", teacher, tmp_path / "a", 300)) == 0
    assert main(argv("train", teacher, tmp_path / "b", 200, "--keep-checkpoints", "3")) == 0
    ckpts = sorted((tmp_path / "b" / "checkpoints").iterdir())
    state = ckpts[-1] / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the tensor data: still parses, wrong numbers
    state.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(argv("train", teacher, tmp_path / "b", 300, "--resume")) == 0
    err = capsys.readouterr().err
    assert "does not match its checksum" in err and "falling back to the previous checkpoint" in err
    assert "resuming" in err and "from step 100" in err
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, teacher, capsys, monkeypatch):
    import errno

    import dkdm.checkpoint as ck

    real = ck.save_file
    calls = []

    def flaky(tensors, path):
        calls.append(path)
        if len(calls) == 3:  # step 0 and 100 fit, step 200 finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ck, "save_file", flaky)
    assert main(argv("train", teacher, tmp_path / "b", 300)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "previous checkpoint is kept" in err[0]
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names[-1] == "step_00000100" and not any(n.startswith(".tmp") for n in names)
    monkeypatch.setattr(ck, "save_file", real)
    assert main(argv("train", teacher, tmp_path / "b", 300, "--resume")) == 0


def test_non_finite_teacher_stops_naming_the_teacher_the_step_and_t(tmp_path, teacher, capsys):
    from dkdm.diffusion import Schedule
    from dkdm.errors import DkdmError
    from dkdm.formats import load_model, save_model
    from dkdm.model import DiffusionModel
    from dkdm.pool import KnowledgePool
    from dkdm.trainer import TrainConfig, Trainer, TrainingDiverged

    broken = tmp_path / "broken"
    m = load_model(teacher)
    state = {k: v.clone() for k, v in m.net.state_dict().items()}
    state[next(k for k in state if k.endswith("weight"))][0].fill_(float("nan"))
    save_model(m, broken, state)
    assert main(argv("distill", broken, tmp_path / "d", 50)) == 2  # caught while preparing the pool
    err = capsys.readouterr().err
    assert "the teacher produced NaN/inf while preparing the pool" in err
    assert not (tmp_path / "d").exists()

    class NanAtThree(torch.nn.Module):  # a teacher that fails at one timestep only
        def forward(self, x, t):
            return torch.where((t == 3)[:, None], torch.full_like(x, float("nan")), 0.1 * x)

    sched = Schedule.named("linear", 20)
    bad = DiffusionModel(NanAtThree(), sched, (2,), variance="fixed_small")
    pool = KnowledgePool(bad, 8, "iterative", seed=0)
    pool.prepare()
    student = DiffusionModel.build("mlp:width=8,depth=1", (2,), sched, variance="fixed_small")
    trainer = Trainer(student, pool, TrainConfig(steps=40), tmp_path / "r", progress=False)
    trainer.save()
    with pytest.raises(TrainingDiverged) as e:
        trainer.train()
    assert "at step 17: the teacher's epsilon is not finite at t=[3, 3, 3, 3]" in str(e.value)
    assert isinstance(e.value, DkdmError)


def test_no_pickle_or_unsafe_torch_load_in_the_package():
    offenders = []
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\bimport (c?pickle|dill|joblib)\b|\bpickle\.|allow_pickle\s*=\s*True", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders
    assert any("torch.load(" in p.read_text() for p in SRC.rglob("*.py"))  # the one .pt reader is checked
