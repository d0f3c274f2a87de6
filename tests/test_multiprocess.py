"""Two CPU processes over gloo (torchrun): same student on every rank, own pool shards, resume, a rank that dies."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

TINY = ["--teacher", "builtin:digits", "--student", "unet:widths=8-16,layers=1,groups=4", "--batch", "8",
        "--rho", "0.01", "--prep", "sampled", "--prep-steps", "4", "--log-every", "1", "--no-progress",
        "--no-report"]


def launch(nproc, *args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29500 + os.getpid() % 1000), "-m", "dkdm.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_two_processes_train_one_student_with_their_own_pool_shards(tmp_path):
    out = tmp_path / "run"
    r = launch(2, "distill", *TINY, "--steps", "6", "--ckpt-every", "3", "--keep-checkpoints", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == list(range(1, 7))  # one log line per step, from the main process
    assert all(rec["processes"] == 2 and rec["ranks_in_sync"] for rec in log)
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    main_pool = load_file(str(ckpt / "state.safetensors"))
    other_pool = load_file(str(ckpt / "rank1.safetensors"))
    assert main_pool["source.x"].shape == other_pool["source.x"].shape
    assert not (main_pool["source.x"] == other_pool["source.x"]).all()  # shards differ: no duplicated work
    # each shard's stops were drawn uniformly on its own (no skew of t across ranks)
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2


def test_two_processes_train_one_matching_generator_each_with_its_own_fake_score(tmp_path):
    out = tmp_path / "gen"
    r = launch(2, "fewstep", "--student", "builtin:digits", "--sampler-steps", "1", "--batch", "4", "--steps", "4",
               "--ckpt-every", "2", "--log-every", "1", "--no-progress", "--no-report", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "distribution matching" in r.stderr and "no pool" in r.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(rec["processes"] == 2 and rec["ranks_in_sync"] for rec in log)  # one generator
    assert log[-1]["teacher_calls"] == 4 * 4  # the main process's own count
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    fakes = [load_file(str(ckpt / name)) for name in ("state.safetensors", "rank1.safetensors")]
    key = next(k for k in fakes[0] if k.startswith("source.fake."))
    assert not torch.equal(fakes[0][key], fakes[1][key])  # each rank's fake score followed its own samples


def test_two_processes_train_one_consistency_student_with_their_own_pool_shards(tmp_path):
    out = tmp_path / "few"
    r = launch(2, "fewstep", "--student", "builtin:digits", "--sampler-steps", "4", *TINY[4:], "--steps", "4",
               "--ckpt-every", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "consistency distillation" in r.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [1, 2, 3, 4]
    assert all(rec["processes"] == 2 and rec["ranks_in_sync"] for rec in log)  # one student
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    pools = [load_file(str(ckpt / name))["source.x"] for name in ("state.safetensors", "rank1.safetensors")]
    assert pools[0].shape == pools[1].shape and not torch.equal(*pools)  # each rank its own shard
    from dkdm.formats import load_model

    assert load_model(out).sampler_steps == 4


@pytest.mark.slow  # two more launches
def test_a_two_process_run_resumes_with_two_processes_only(tmp_path):
    out = tmp_path / "run"
    r = launch(2, "distill", *TINY, "--steps", "6", "--ckpt-every", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    r1 = subprocess.run([sys.executable, "-m", "dkdm.cli", "distill", *TINY, "--steps", "8", "--resume", "--out",
                         str(out)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r1.returncode == 2 and "same number of processes" in r1.stderr
    r2 = launch(2, "distill", *TINY, "--steps", "8", "--resume", "--out", str(out))
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 8


def _children(pid):
    """pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"])


def _final_weights(out):
    f = out / "model.safetensors"
    return load_file(str(f if f.exists() else out / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the ranks' processes through /proc (Linux)")
@pytest.mark.slow  # five 2-process launches: 15-20 s on 2 cores
@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_that_dies_stops_the_other_in_one_line_and_resume_is_bit_identical(tmp_path, victim):
    run = [*TINY, "--steps", "24", "--ckpt-every", "5"]
    base = tmp_path / "base"
    r = launch(2, "distill", *run, "--out", str(base))
    assert r.returncode == 0, r.stderr[-2000:]

    cut = tmp_path / "cut"
    port = str(29500 + (os.getpid() + 7 + victim) % 1000)
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                              port, "-m", "dkdm.cli", "distill", *run, "--out", str(cut)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = cut / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 7):
        assert agent.poll() is None and time.monotonic() < deadline, "the run ended before it could be cut"
        time.sleep(0.02)
    ranks = {_rank_of(p): p for p in _children(agent.pid)}
    # stopped first, so the other rank cannot finish the run while the kill is on its way
    os.kill(ranks[victim], signal.SIGSTOP)
    killed_at = time.monotonic()
    os.kill(ranks[victim], signal.SIGKILL)
    survivor = ranks[1 - victim]
    while os.path.exists(f"/proc/{survivor}") and time.monotonic() - killed_at < 60:
        time.sleep(0.05)
    stopped_after = time.monotonic() - killed_at
    _, err = agent.communicate(timeout=120)
    assert stopped_after < 30, f"rank {1 - victim} still ran {stopped_after:.0f} s after rank {victim} died"
    lines = [line for line in err.splitlines() if line.startswith("dkdm distill:")]
    assert len(lines) == 1, err[-3000:]
    assert f"rank {victim} (pid {ranks[victim]}) of this run stopped" in lines[0]
    assert f"rank {1 - victim} stopped at step" in lines[0] and "--resume continues from" in lines[0]
    # no traceback through dkdm's code (the launcher prints its own; a clone in a folder named dkdm is no hit)
    assert not re.search(r'File "[^"]*/dkdm/(?:[^"/]+/)?[^"/]+\.py"', err), err[-3000:]
    assert f"exitcode  : 4 (pid: {survivor})" in err  # the survivor's own exit, not the launcher's SIGTERM

    r = launch(2, "distill", *run, "--resume", "--out", str(cut))
    assert r.returncode == 0, r.stderr[-2000:]
    want, got = _final_weights(base), _final_weights(cut)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
