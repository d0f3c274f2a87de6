"""The benchmarks' guards and set-ups: the host work of a training step stays bounded (bench/ops.py),
and bench/speed.py's scales are the layouts they name and run end to end at a toy size."""

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import ops  # noqa: E402
import speed  # noqa: E402


@pytest.fixture(scope="module")
def step_ops():
    with tempfile.TemporaryDirectory() as tmp:
        return {name: ops.count_step_ops(make, teacher_net, warm=2, n=2)
                for name, make, teacher_net in ops.default_trainers(Path(tmp), batch=4)}


def test_ops_outside_the_networks_per_step_are_bounded(step_ops):
    """What dkdm's own code dispatches outside the networks each step: 62 for a DKDM step (the
    teacher step's and the loss's diffusion math are most of them), 50 for a data-based step
    (measured 2026-12-04; 1,139 and 1,129 before issue 14). These are aten ops that dkdm's code
    calls directly, the same on every CPU and CPU build. torch's optimizer step and gradient
    clipping are counted apart: how many ops torch's own Python issues inside them changes between
    torch builds (10 and 12 for the same step, issue 26), so they are bounded only loosely here and
    by the next test, which checks that they do not grow with the student. A step must not read the
    device from the host, and the loop must not grow host work unnoticed."""
    dkdm, data = step_ops["DKDM step"], step_ops["data-based step"]
    assert dkdm["outside"] <= 62 and data["outside"] <= 50, (dkdm["outside_ops"], data["outside_ops"])
    # fused AdamW and foreach clipping: about a dozen ops in any torch build; a per-tensor loop, hundreds
    assert dkdm["library"] <= 24 and data["library"] <= 24, (dkdm["library_ops"], data["library_ops"])
    assert dkdm["syncs"] == data["syncs"] == 0
    # with --cuda-graphs the update and the teacher step are replays: the host issues the pool's
    # draw and write-back, the EMA, the graphs' input copies and the two replays
    assert dkdm["with_cuda_graphs"] <= 22 and data["with_cuda_graphs"] <= 21
    # the networks are counted apart, so the split is not vacuous
    assert dkdm["per_region"]["teacher forward"] > 50 and dkdm["per_region"]["backward"] > 50


def test_ops_per_step_do_not_grow_with_the_number_of_weight_tensors():
    """Optimizer, clipping and EMA are fused or foreach: a student with twice the tensors costs
    the same number of ops outside the networks, dkdm's and torch's routines' alike (a per-tensor
    loop would add hundreds)."""
    with tempfile.TemporaryDirectory() as tmp:
        counts = []
        for spec in ("unet:widths=8-16,layers=1,groups=4", "unet:widths=8-16-16,layers=2,groups=4"):
            _, make, teacher_net = ops.default_trainers(Path(tmp) / spec, student_spec=spec, batch=4)[0]
            r = ops.count_step_ops(make, teacher_net, warm=2, n=1)
            counts.append((r["outside"], r["library"], r["per_region"]["backward"]))
    assert counts[0][:2] == counts[1][:2] and counts[1][2] > 1.5 * counts[0][2]


def test_scales_are_the_layouts_they_name():
    from dkdm.model import DiffusionModel
    from dkdm.students import count_parameters
    from dkdm.formats.adm import schedule_from_flags
    from dkdm.nets.adm import parse_flags

    schedule = schedule_from_flags(parse_flags({}))

    def params(spec, shape):
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            return count_parameters(DiffusionModel.build(spec, shape, schedule).net)

    for scale, teacher_params in (("cifar10", 52_546_438), ("imagenet64", 121_063_942)):
        s = speed.SCALES[scale]
        assert params({"type": "adm", **s["teacher"]}, s["shape"]) == teacher_params  # improved-DDPM's layouts
        for spec in s["students"].values():
            assert 8.5e6 < params(spec, s["shape"]) < 11e6, spec


def test_speed_runs_a_scale_end_to_end_at_toy_size(capsys):
    assert speed.main(["--scale", "cifar10", "--tiny", "--students", "adm,dit", "--steps", "1", "--warmup", "1",
                       "--rounds", "1", "--device", "cpu", "--no-record"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("[cifar10")]
    assert [line.split(" | ")[1].split()[0] for line in lines] == ["adm", "dit"]
    for line in lines:
        assert "(c)/((b)+(u)) = " in line and "samples/s" in line and "TFLOP/s" in line
    flops = [line for line in out if line.startswith("(f) FLOPs per sample")]
    assert len(flops) == 2 and all("student update" in line and "of measured matmul" in line for line in flops)


def test_the_digits_row_measures_the_default_student():
    from dkdm.formats import load_model
    from dkdm.students import default_student_spec, format_spec

    assert format_spec(default_student_spec(load_model("builtin:digits"))) == speed.DIGITS_STUDENT


def test_flop_counts_match_the_closed_form_of_an_mlp():
    # every Linear costs 2 * in * out per sample forward; the update's backward twice that (the weights'
    # and the inputs' gradients), less the inputs' gradients of the two layers reading x and the
    # sinusoidal time embedding, which need none
    from dkdm.diffusion import Schedule
    from dkdm.model import DiffusionModel

    model = DiffusionModel.build("mlp:width=16,depth=2", (4,), Schedule.named("linear", 20))
    linears = [m for m in model.net.modules() if isinstance(m, torch.nn.Linear)]
    forward = sum(2 * m.in_features * m.out_features for m in linears)
    got_forward, got_update = speed._student_flops(model, 8, torch.device("cpu"))
    assert got_forward / 8 == forward
    no_input_grad = sum(2 * m.in_features * m.out_features for m in (model.net.inp, model.net.time[0]))
    assert got_update / 8 - forward == 2 * forward - no_input_grad


def test_rows_go_to_the_end_of_their_table(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\ntext after\n")
    speed.add_row(path, "| a | b |", "| 3 | 4 |", "## t")
    speed.add_row(path, "| c |", "| 5 |", "## new table")
    assert path.read_text() == ("# Benchmark results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n\ntext after\n"
                                "\n## new table\n\n| c |\n|---|\n| 5 |\n")


def test_every_command_of_the_questions_runner_parses_and_names_what_it_builds(tmp_path):
    """bench/quality/questions.py's grids (issue 28): each run's and each input's command is one the
    command line takes, every teacher and synthetic set a row names is built first, once, and a
    question's rows are distinct runs."""
    sys.path.insert(0, str(BENCH / "quality"))
    import questions

    from dkdm.flags import build_parser

    todo = [(q, row, seed) for q in questions.QUESTIONS for row in questions.QUESTIONS[q] for seed in (0, 1, 2)]
    inputs = questions.inputs_of(tmp_path, todo)
    runs = [questions.command_of(tmp_path, *job) for job in todo]
    parser = build_parser()
    for cmd in inputs + runs:
        assert cmd[1:3] == ["-m", "dkdm.cli"]
        parser.parse_args(cmd[3:])
    built = {cmd[-1] for cmd in inputs}
    assert len(built) == len(inputs) == len(questions.TEACHERS) + 3 * 3  # every teacher, 3 set sizes x 3 seeds
    named = {arg for cmd in runs for arg in cmd if arg.startswith(str(tmp_path / "teachers"))
             or arg.startswith(str(tmp_path / "synthetic"))}
    assert named == built
    assert len({cmd[-1] for cmd in runs}) == len(runs)
    assert len(questions.QUESTIONS["rho"]) == 4 * 5 and len(questions.QUESTIONS["ceiling"]) == 9


def test_the_fewstep_table_trains_every_dkdm_student_before_the_few_step_runs_and_keeps_their_walls(tmp_path,
                                                                                                   monkeypatch):
    """bench/quality/fewstep.py --jobs (issue 27, the table in one GPU call): each run once, the DKDM
    students of every seed before any few-step student (which start from them); a reused run's wall
    is the one recorded when it was trained."""
    sys.path.insert(0, str(BENCH / "quality"))
    import fewstep

    calls = []
    monkeypatch.setattr(fewstep, "run", lambda out, name, seed, threads: calls.append((name, seed, threads)))
    fewstep.train_all(tmp_path, [0, 1, 2], jobs=4)
    assert sorted(calls) == sorted((n, s, 1) for n in fewstep.RUNS for s in (0, 1, 2))
    kinds = [fewstep.RUNS[name][0] for name, _, _ in calls]
    assert kinds.index("fewstep") == kinds.count("distill") == 6
    calls.clear()
    fewstep.train_all(tmp_path, [0, 1], jobs=2, only=("matching2-dit",))  # --runs: and what it starts from
    assert calls == [("dkdm-dit", 0, 1), ("dkdm-dit", 1, 1), ("matching2-dit", 0, 1), ("matching2-dit", 1, 1)]
    monkeypatch.undo()
    d = tmp_path / "fewstep-unet-s0"
    d.mkdir()
    (d / "dkdm_model.json").write_text("{}")
    assert fewstep.run(tmp_path, "fewstep-unet", 0, 1) == (d, 0.0)
    (d / "wall_s.txt").write_text("123\n")
    assert fewstep.run(tmp_path, "fewstep-unet", 0, 1) == (d, 123.0)


def test_progressive_distillations_target_lands_its_one_step_where_the_two_steps_landed():
    """bench/quality/fewstep_progressive.py: the x0 target (Salimans & Ho eq. 8) makes one DDIM step
    from t land exactly on x_s, in float64 against the closed form of the step, and is x_s at the end."""
    sys.path.insert(0, str(BENCH / "quality"))
    import fewstep_progressive as pd
    from dkdm.diffusion import Schedule

    schedule = Schedule.named("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x, x_s = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t, s = torch.tensor([999, 700, 500, 260, 40, 30]), torch.tensor([749, 500, 250, 10, 0, -1])
    x0 = pd.x0_target(schedule, x, t, x_s, s)
    ab = schedule.alphas_cumprod.double()
    for i in range(5):
        a_t, a_s = ab[t[i]], ab[s[i]]
        eps = (x[i].double() - a_t.sqrt() * x0[i].double()) / (1 - a_t).sqrt()
        torch.testing.assert_close(a_s.sqrt() * x0[i].double() + (1 - a_s).sqrt() * eps, x_s[i].double(),
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pd.ddim_to(schedule, x, x0, t, s), x_s, rtol=1e-4, atol=1e-4)
    assert pd.grid(4, 1000) == [999, 749, 499, 249] and pd.grid(8, 1000)[::2] == pd.grid(4, 1000)


def test_two_runners_of_one_out_each_keep_the_others_rows(tmp_path):
    """bench/quality/questions.py: grids run at once into one --out merge their results under a lock;
    a row run again replaces its old result."""
    from concurrent.futures import ProcessPoolExecutor

    sys.path.insert(0, str(BENCH / "quality"))
    import questions

    store = tmp_path / "questions.json"
    rows = [[{"question": "ceiling", "row": f"r{i}", "seed": s, "digits_fid": float(i)} for s in range(50)]
            for i in range(8)]
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(questions.merge_results, [store] * 8, rows))
    assert sorted((r["row"], r["seed"]) for r in json.loads(store.read_text())) == \
        sorted((f"r{i}", s) for i in range(8) for s in range(50))
    again = questions.merge_results(store, [{"question": "ceiling", "row": "r0", "seed": 0, "digits_fid": 9.5}])
    assert len(again) == 400 and [r["digits_fid"] for r in again if (r["row"], r["seed"]) == ("r0", 0)] == [9.5]


def test_a_stopped_runner_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """bench/quality/questions.py: each row goes into questions.json as it finishes, so a runner
    stopped mid-grid (here: its second row raises) loses none of the rows it already ran."""
    sys.path.insert(0, str(BENCH / "quality"))
    import questions

    def fake_run(out, question, row, seed):
        if seed == 1:
            raise KeyboardInterrupt
        return {"question": question, "row": row, "seed": seed, "digits_fid": 11.0}

    monkeypatch.setattr(questions, "run", fake_run)
    monkeypatch.setattr(questions, "inputs_of", lambda out, todo: [])
    with pytest.raises(KeyboardInterrupt):
        questions.main(["--question", "objective", "--rows", "L*simple alone (lambda 0)", "--seeds", "0", "1",
                        "--jobs", "1", "--out", str(tmp_path)])
    kept = json.loads((tmp_path / "questions.json").read_text())
    assert [(r["row"], r["seed"]) for r in kept] == [("L*simple alone (lambda 0)", 0)]


def test_a_row_whose_command_another_question_ran_is_that_run(tmp_path, monkeypatch):
    """bench/quality/questions.py: the ceiling's 1x rows are the default DKDM student and the
    diversity question's data-based student (the same commands): a finished twin's run is reused, not
    run again, and a rendered table fills a row it lacks from its twin without replacing one it has."""
    sys.path.insert(0, str(BENCH / "quality"))
    import questions

    assert ("diversity", "DKDM (default)") in questions.twins("ceiling", "DKDM, 1x budget")
    assert questions.twins("ceiling", "data-based, 1x budget") == [("diversity", "data-based, same network and budget")]
    assert questions.twins("ceiling", "DKDM, 2x budget") == []
    twin = tmp_path / "diversity" / "data-based--same-network-and-budget-s1"
    twin.mkdir(parents=True)
    (twin / "metrics.json").write_text(json.dumps({"model": {"digits_fid": 12.5, "recall": 0.8}}))
    monkeypatch.setattr(questions.subprocess, "run", lambda *a, **k: pytest.fail("ran a twin's command again"))
    got = questions.run(tmp_path, "ceiling", "data-based, 1x budget", 1)
    assert (got["row"], got["digits_fid"], got["recall"]) == ("data-based, 1x budget", 12.5, 0.8)
    results = [{"question": "diversity", "row": "DKDM (default)", "seed": s, "digits_fid": 10.0 + s} for s in (0, 1)]
    results.append({"question": "ceiling", "row": "DKDM, 1x budget", "seed": 1, "digits_fid": 99.0})
    filled = {(r["row"], r["seed"]): r["digits_fid"] for r in questions.with_twins(results) if r["question"] == "ceiling"}
    assert filled == {("DKDM, 1x budget", 0): 10.0, ("DKDM, 1x budget", 1): 99.0}


def test_the_ceiling_plot_draws_budgets_and_synthetic_sets(tmp_path):
    """bench/quality/questions.py --render: the ceiling's figure, from rows of every kind, with a
    missing seed and a missing set size."""
    sys.path.insert(0, str(BENCH / "quality"))
    import questions

    rows = [{"question": "ceiling", "row": row, "seed": s, "digits_fid": 10.0 + s, "recall": 0.8,
             "teacher_fid": None if "DKDM" not in row else 11.0}
            for row in questions.QUESTIONS["ceiling"] if "16x" not in row for s in (0, 1)]
    questions.plot_ceiling(rows, tmp_path / "ceiling.png")
    assert (tmp_path / "ceiling.png").stat().st_size > 10_000


def test_the_seeds_script_names_a_missing_run_in_one_line_before_drawing_anything(tmp_path, capsys):
    """bench/quality/fewstep_seeds.py: a run directory that is not there (a killed run's worker) is
    a usage error (exit 2) naming it, not a traceback after the other runs were drawn."""
    sys.path.insert(0, str(BENCH / "quality"))
    import fewstep_seeds

    with pytest.raises(SystemExit) as exit:
        fewstep_seeds.main(["builtin:digits", str(tmp_path / "gone"), "--seeds", "1", "--teacher-mean", "10"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"{tmp_path / 'gone'} does not exist") and "Traceback" not in "".join(err)
