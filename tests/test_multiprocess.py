"""Two CPU processes over gloo (torchrun): same student on every rank, own pool shards, resume."""

import json
import os
import subprocess
import sys

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
    # resuming needs the same number of processes
    r1 = subprocess.run([sys.executable, "-m", "dkdm.cli", "distill", *TINY, "--steps", "8", "--resume", "--out",
                         str(out)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r1.returncode == 2 and "same number of processes" in r1.stderr
    r2 = launch(2, "distill", *TINY, "--steps", "8", "--resume", "--out", str(out))
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 8
