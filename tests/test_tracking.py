"""--report-to: the trackers get what log.jsonl gets (read back from TensorBoard's own event files)
and a grid of samples at each evaluation; a tracker that is not installed is one line, exit 2."""

import json

import pytest

from dkdm.cli import main

tb = pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "teacher"
    assert main(["train", "--data", "digits", "--model", "unet:widths=8-16,layers=1,groups=4", "--diffusion-steps",
                 "20", "--steps", "10", "--batch", "16", "--no-progress", "--no-report", "--out", str(out)]) == 0
    return out


def test_tensorboard_gets_every_log_record_the_scores_and_sample_grids(teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--student", "unet:widths=8-16,layers=1,groups=4", "--batch",
                 "8", "--rho", "0.5", "--steps", "12", "--log-every", "3", "--eval-every", "6", "--monitor-num", "32",
                 "--monitor-steps", "5", "--heldout", "16", "--no-progress", "--no-report", "--report-to", "tensorboard",
                 "--out", str(run)]) == 0
    events = EventAccumulator(str(run / "tracking" / "dkdm"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") != "eval"]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in train] == [3, 6, 9, 12] and [r["step"] for r in evals] == [6, 12]
    for key in ("loss", "mse", "vb", "lr", "mse_q0", "mse_q3", "samples_per_s", "teacher_calls"):
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got == pytest.approx({r["step"]: r[key] for r in train}, rel=1e-6), key
    for key in ("heldout_mse", "teacher_fd", "digits_fid"):
        got = {e.step: e.value for e in events.Scalars(f"eval/{key}")}
        assert got == pytest.approx({r["step"]: r[key] for r in evals}, rel=1e-6), key
    grids = events.Images("samples")
    assert sorted(g.step for g in grids) == [6, 12]  # one grid of the evaluation's samples each
    assert all(g.width >= 8 * 4 and g.height >= 8 * 4 for g in grids)


def test_a_tracker_that_is_not_installed_is_one_line(teacher, tmp_path, capsys):
    from accelerate.utils import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    assert main(["distill", "--teacher", str(teacher), "--report-to", "wandb", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dkdm distill: error: --report-to wandb: wandb is not installed: pip install wandb (or drop it "
                   "from --report-to)"]
    assert not (tmp_path / "run").exists()
    assert main(["distill", "--teacher", str(teacher), "--report-to", "tensorbord", "--out", str(tmp_path / "r")]) == 2
    assert "unknown tracker(s) tensorbord" in capsys.readouterr().err
