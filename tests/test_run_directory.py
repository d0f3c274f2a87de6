"""Issue 20: a pool preparation that resumes, one run per directory, room on the disk, a soak of kills."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dkdm.cli import main
from dkdm.errors import DkdmError
from dkdm.formats import load_model
from dkdm.pool import KnowledgePool
from dkdm.runlock import LOCK, RunLock

from test_reliability import ENV, argv, run_cli, same, spawn, teacher, weights  # noqa: F401  (fixture)


def prep_argv(teacher, out, *extra, steps=20, rho=20):
    """A distillation whose exact preparation is long enough to be interrupted (rho 20: 12,800
    entries, one checkpoint of the preparation after every 16-entry chunk)."""
    return [*argv("distill", teacher, out, steps), "--rho", str(rho), "--prep", "exact", "--prep-batch", "16",
            "--prep-ckpt-every", "0", "--ckpt-every", "10", *extra]


FEW_CHECKPOINTS = ("--prep-ckpt-every", "300")  # a resumed run may change it: the rest of the pool at full speed


def preparation_done(out) -> int:
    root = Path(out) / "preparation" / "rank0"
    done = [int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "meta.json").exists()] if root.is_dir() else []
    return max(done, default=0)


@pytest.mark.parametrize("method", ["exact", "sampled", "shared"])
def test_resumed_preparation_is_the_uninterrupted_pool(teacher, method):
    t = load_model(teacher)

    def pool():
        return KnowledgePool(t, 32, "dynamic", rho=2.0, seed=3, preparation=method, prep_steps=5)

    whole, states = pool(), []
    whole.prepare(chunk=100, on_chunk=lambda s: states.append({k: v.clone() for k, v in s.items()}))
    per_chunk = 100 * 4 if method == "shared" else 100  # shared: a chunk is ~100 x0 for K - 1 = 4 bands
    assert [int(s["prep_done"]) for s in states] == list(range(per_chunk, whole.size, per_chunk))
    prepared = {k: v.clone() for k, v in whole.state_dict().items()}
    batch = whole.next_batch().x_t
    for state in (states[0], states[-1]):
        resumed = pool()
        resumed.prepare(chunk=100, resume=state)
        same(prepared, resumed.state_dict())
        assert torch.equal(batch, resumed.next_batch().x_t)


def test_kill_9_during_preparation_resumes_it_bit_identically(tmp_path, teacher):
    """rho 5: 3,200 entries in 200 chunks, killed after the 50th or later."""
    # in-process, one thread like the subprocesses; the pool does not depend on how often it is checkpointed
    assert main(prep_argv(teacher, tmp_path / "a", *FEW_CHECKPOINTS, rho=5)) == 0
    proc = spawn(prep_argv(teacher, tmp_path / "b", rho=5))
    t0 = time.time()
    while preparation_done(tmp_path / "b") < 800 and time.time() - t0 < 300:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = preparation_done(tmp_path / "b")
    assert 800 <= done < 3200 and not (tmp_path / "b" / "checkpoints").exists()
    r = subprocess.run([sys.executable, "-m", "dkdm.cli", *prep_argv(teacher, tmp_path / "b", "--resume",
                                                                  *FEW_CHECKPOINTS, rho=5)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "resuming the pool preparation:" in r.stderr
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not (tmp_path / "b" / "preparation").exists()  # dropped once the first checkpoint holds the pool


def test_a_second_run_on_the_same_directory_is_refused_and_a_stale_lock_taken_over(tmp_path, teacher):
    out = tmp_path / "b"
    proc = spawn(prep_argv(teacher, out, steps=50))
    t0 = time.time()
    while not (out / LOCK).exists() and time.time() - t0 < 120:
        time.sleep(0.02)
    tries = [subprocess.Popen([sys.executable, "-m", "dkdm.cli", *prep_argv(teacher, out, *extra, steps=50)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for extra in ([], ["--resume"])]  # both at once: each is refused while the first run holds the lock
    for r in tries:
        _, stderr = r.communicate(timeout=120)
        err = stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1, stderr
        assert f"in use by process {proc.pid}" in err[0] or "already holds a run" in err[0], err
    while preparation_done(out) == 0 and time.time() - t0 < 300:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid  # left behind by the killed run
    assert run_cli(prep_argv(teacher, out, "--resume", *FEW_CHECKPOINTS, "--prep-batch", "4096", steps=50)) == 0
    assert (out / "model.safetensors").exists() and not (out / LOCK).exists()


def test_lock_holders(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for pid, host, refused in ((live.pid, None, "in use by process"), (dead.pid, None, None),
                                   (os.getpid() + 1, "elsewhere", "on host elsewhere")):
            d = tmp_path / str(pid)
            d.mkdir()
            (d / LOCK).write_text(json.dumps({"pid": pid, "host": host or os.uname().nodename, "since": "then"}))
            lock = RunLock(d)
            if refused:
                with pytest.raises(DkdmError, match=refused):
                    lock.acquire()
            else:
                lock.acquire()
                assert json.loads((d / LOCK).read_text())["pid"] == os.getpid()
                lock.release()
                assert not (d / LOCK).exists()
    finally:
        live.kill()


def test_too_little_disk_is_refused_before_the_pool_is_prepared(tmp_path, teacher, capsys, monkeypatch):
    import shutil

    import dkdm.runlock as rl

    total, _, _ = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(rl.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(total, total - 1000, 1000))
    assert main(argv("distill", teacher, tmp_path / "d", 50)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the pool's preparation and first checkpoints needs" in err[0]
    assert "but" in err[0] and "has 1000 B free" in err[0], err
    assert not (tmp_path / "d").exists()  # nothing written, not even the lock


def test_too_little_disk_for_a_checkpoint_or_the_final_model_keeps_the_last_checkpoint(tmp_path, teacher, capsys,
                                                                                         monkeypatch):
    import shutil

    import dkdm.runlock as rl
    from dkdm.trainer import Trainer

    real, calls = Trainer.save, []

    def full_after_first(self):
        calls.append(self.step)
        if len(calls) == 2:
            monkeypatch.setattr(rl.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 10, 10))
        return real(self)

    monkeypatch.setattr(Trainer, "save", full_after_first)
    assert main(argv("train", teacher, tmp_path / "b", 300)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the checkpoint of step 100 needs" in err[0] and "has 10 B free" in err[0], err
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000000"]


@pytest.mark.slow
def test_soak_ten_kills_at_random_moments_end_bit_identical(tmp_path, teacher):
    """SIGKILL at 10 random moments of one distillation (preparation, training, checkpoint writing,
    the final save), resumed each time: the result is the uninterrupted run's, bit for bit."""
    args = lambda *extra: prep_argv(teacher, tmp_path / "b", "--ckpt-every", "20", *extra, steps=400)  # noqa: E731
    t0, preparing, prepared = time.time(), None, None
    proc = spawn(prep_argv(teacher, tmp_path / "a", "--ckpt-every", "20", steps=400))
    while proc.poll() is None:  # its first chunk saved: preparing; training's first checkpoint: prepared
        if preparing is None and (tmp_path / "a" / "preparation").is_dir():
            preparing = time.time() - t0
        if prepared is None and (tmp_path / "a" / "checkpoints").is_dir():
            prepared = time.time() - t0
        time.sleep(0.02)
    assert proc.returncode == 0 and None not in (preparing, prepared), proc.stderr.read()
    whole = time.time() - t0
    rng, phases, out = random.Random(0), [], tmp_path / "b"
    while len(phases) < 10:
        resume = (out / "checkpoints").is_dir() or (out / "preparation").is_dir() or (out / "run.json").is_file()
        proc = spawn(args(*(["--resume"] if resume else [])))
        # Each phase is reached by watching the run, not by guessing how long this CPU takes to start a
        # process: the first kill waits for the preparation's first saved chunk, then falls in the first half
        # of what the rest of the preparation took uninterrupted; every other kill waits for training's first
        # checkpoint, then falls in the first half of what the rest took (training, checkpoint writing, the
        # final save and report).
        mark, rest = ("preparation", prepared - preparing) if not phases else ("checkpoints", whole - prepared)
        while not (out / mark).is_dir() and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5) * rest)
        if proc.poll() is not None:  # finished before the kill
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        phases.append("training" if (out / "checkpoints").is_dir() else "preparation")
    assert run_cli(args("--resume")) == 0
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    print(f"kills: {phases}")
    assert "preparation" in phases and "training" in phases
