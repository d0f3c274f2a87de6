"""A report sized to its run: a quick try gets a quick report, announced before anything is spent."""

import json

import pytest

from dkdm.cli import main
from dkdm.evaluation import REPORT_FLOOR, REPORT_MIN_NUM, report_size


def test_a_long_run_keeps_the_references_report_and_a_short_one_is_sized_to_its_cost():
    # the default digits run (0.64M teacher sample-steps of preparation, 6,000 x 64 forwards)
    full = report_size("digits", None, None, 1000, (1, 8, 8), 640_000 + 6000 * 64)
    assert (full.num, full.steps, full.sized) == (1437, 100, False)
    assert full.cost == 2 * (1437 + 64) * 100  # teacher and student, samples and picture pairs
    # a 20-step try: 2,000 + 160 teacher sample-steps; its report may spend at most the floor
    quick = report_size(None, None, None, 1000, (3, 16, 16), 2_160)
    assert quick.sized and quick.cost <= REPORT_FLOOR and quick.num >= REPORT_MIN_NUM and 2 <= quick.steps <= 25
    # every budget: within max(budget, floor) unless the smallest report is bigger
    for budget in (0, 5_000, 50_000, 200_000, 10 ** 6):
        r = report_size(None, None, None, 1000, (3, 16, 16), budget)
        assert r.cost <= max(budget, REPORT_FLOOR) or (r.num, r.steps) == (REPORT_MIN_NUM, 10), (budget, r)
    # what the user gives is kept; an Inception reference (budget None) keeps its size
    assert report_size(None, 1000, None, 1000, (3, 16, 16), 2_160)[:2] == (1000, 100)
    assert report_size(None, None, None, 1000, (3, 16, 16), None)[:2] == (1000, 100)


@pytest.mark.parametrize("given", [[], ["--eval-num", "150", "--eval-steps", "20"]])
def test_the_report_is_announced_with_the_plan_and_draws_what_it_said(tmp_path, capsys, given):
    out = tmp_path / "d"
    assert main(["distill", "--steps", "10", "--batch", "8", "--rho", "0.01", "--out", str(out), "--no-progress",
                 *given]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("report: "))
    assert err.index(line) < err.index("run directory")
    num, steps = (int(v.replace(",", "")) for v in line.split()[1:5:3])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["student"]["num_samples"] == num and metrics["student"]["sampling_steps"] == steps
    assert ("sized to the run" in line) == (not given)
    if given:
        assert (num, steps) == (150, 20)
    assert json.loads((out / "run.json").read_text())["eval_num"] == num
