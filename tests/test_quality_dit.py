"""bench/quality/dit.py: every student of the cross-architecture table gets the same budget, its DiT runs
are the grid's (results carry over), and the report pairs seeds when it forms the issue's ratios."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))

import dit  # noqa: E402
import grid  # noqa: E402


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_every_student_gets_the_same_budget_and_the_dit_runs_are_the_grids(tmp_path):
    jobs = {j["name"]: j for j in dit.jobs_for(tmp_path, 600, [0, 1], "/t/dit")}
    runs = [j for j in jobs.values() if j["cmds"]]
    assert {j["method"] for j in runs} == {dit.UNET2UNET, dit.DATABASED, dit.UNET2DIT, dit.DIT2DIT}
    for flag in ("--steps", "--batch", "--ema", "--warmup", "--grad-clip"):
        assert len({_flag(j["cmds"][0], flag) for j in runs}) == 1, flag
    dits = [j for j in runs if j["method"] != dit.UNET2UNET]
    assert {_flag(j["cmds"][0], "--lr") for j in dits} == {grid.DIT_HYPER[grid.DIT_HYPER.index("--lr") + 1]}
    assert len({_flag(j["cmds"][0], "--model" if j["cmds"][0][0] == "train" else "--student") for j in dits}) == 1
    assert _flag(jobs["dit2dit_v2_s1"]["cmds"][0], "--teacher") == "/t/dit"
    assert _flag(jobs["dit2dit_v2_s1"]["cmds"][0], "--seed") == "1"
    theirs = {j["name"]: j for j in grid.jobs_for(tmp_path, 600, [0, 1])}
    for name in ("databased_dit_s0", "unet2dit_v2_s1"):
        assert jobs[name]["cmds"] == theirs[name]["cmds"]
    assert not any(j["method"] == dit.DIT2DIT for j in dit.jobs_for(tmp_path, 600, [0], None))


def test_report_ratios_pair_the_seeds(tmp_path):
    jobs = dit.jobs_for(tmp_path, 600, [0, 1], None)
    (tmp_path / "results").mkdir()
    fids = {"unet2unet_s0": 10.0, "unet2unet_s1": 20.0, "unet2dit_v2_s0": 15.0, "unet2dit_v2_s1": 20.0,
            "databased_dit_s0": 12.0}
    for name, f in fids.items():
        ev = {"digits_fid": f, "precision": 0.9, "recall": 0.8, "num_samples": 1437, "sampling_steps": 100}
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps(
            {"name": name, "wall_s": 1.0, "commands": ["x"], "evals": {"600": ev}}))
    text = dit.report(tmp_path, jobs, 600)
    # per seed 1.50 and 1.00; of the means 17.5 / 15
    assert f"| {dit.UNET2DIT} / {dit.UNET2UNET} | 1.50, 1.00 | 1.17 (2 seeds) | <= 1.5 |" in text
    # only seed 0 has both rows
    assert f"| {dit.UNET2DIT} / {dit.DATABASED} | 1.25 | 1.25 (1 seed) | <= 1.2 |" in text
    assert "| 15.00 | 20.00 | 17.50 ± 3.54 |" in text
