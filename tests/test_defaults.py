"""The settings a distillation derives from its student and problem (issue 16): one rule set for
every teacher, the user's flags and config winning, each default printed with its reason."""

import json
import math

import pytest
import torch

import tiny_teachers as tt
from dkdm.cli import main
from dkdm.defaults import distill_defaults, learning_rate, step_budget, warmup_steps
from dkdm.ema import EMA


@pytest.mark.parametrize("params, want", [(2e5, 1e-3), (1e6, 1e-3), (4e6, 5e-4), (35.7e6, 1.674e-4), (1e8, 1e-4),
                                          (6.75e8, 1e-4)])
def test_learning_rate_falls_with_the_square_root_of_the_students_size(params, want):
    assert learning_rate(int(params)) == pytest.approx(want, rel=1e-3)


def test_step_budget_scales_with_T_and_sample_size_and_inversely_with_batch():
    assert step_budget(1000, 64, 128) == 1200  # digits: the bundled teacher's measured budget (issue 26)
    assert step_budget(1000, 3 * 32 * 32, 128) == 57_600  # CIFAR-10 at the paper's batch
    assert step_budget(2000, 64, 64) == 2 * step_budget(1000, 64, 64)
    assert step_budget(1000, 64, 128) == step_budget(1000, 64, 64) // 2
    assert step_budget(100, 2, 64) == 1000 and step_budget(1000, 3 * 256 * 256, 128) == 400_000  # the bounds


def test_warmup_is_a_fiftieth_of_the_run_within_bounds():
    assert [warmup_steps(n) for n in (10, 6000, 20_000, 144_000, 10**6)] == [200, 200, 400, 2880, 5000]


def test_defaults_follow_the_problem_and_given_values_win():
    small = distill_defaults(500_000, (1, 8, 8), 1000)
    assert {k: s.value for k, s in small.items()} == {"batch": 128, "rho": 0.2, "steps": 1200, "lr": 1e-3,
                                                      "lr_decay": "cosine", "warmup": 200, "ema": 0.9999,
                                                      "grad_clip": 1.0}
    assert all(s.why for s in small.values())
    big = distill_defaults(14_000_000, (3, 32, 32), 1000)
    assert big["batch"].value == 128 and big["steps"].value == 57_600 and big["warmup"].value == 1152
    assert big["rho"].value == 0.4  # the paper's pool from its sample size up
    assert big["lr"].value == pytest.approx(1e-3 / math.sqrt(14))
    # given values are not defaults, and the rules that depend on them follow them
    given = distill_defaults(500_000, (1, 8, 8), 1000, {"batch": 32, "lr": 3e-4, "steps": None})
    assert "batch" not in given and "lr" not in given and given["steps"].value == 4800
    assert given["warmup"].value == 200
    assert distill_defaults(500_000, (1, 8, 8), 1000, {"steps": 50_000})["warmup"].value == 1000
    assert distill_defaults(500_000, (1, 8, 8), 1000, {"steps": "auto"})["warmup"].value == 200  # the fixed budget's


def test_cosine_decay_follows_its_closed_form_in_100_stages_after_the_warm_up():
    from dkdm.trainer import lr_factor

    f = lr_factor(200, "cosine", 1200)
    assert [f(s) for s in (0, 99, 199)] == [1 / 200, 100 / 200, 1.0]  # the linear warm-up
    for s in range(200, 1200):
        stage = (s - 200) * 100 // 1000
        assert f(s) == pytest.approx(0.5 * (1 + math.cos(math.pi * stage / 100)), abs=1e-12)
    assert len({f(s) for s in range(200, 1200)}) == 100 and f(1199) < 3e-4
    assert {lr_factor(200, "constant", 1200)(s) for s in range(200, 1200)} == {1.0}


def test_ema_0_9999_equals_0_999_until_its_warm_up_reaches_0_999():
    """The defaults say EMA 0.9999 changes nothing on runs shorter than ~9,000 steps: the warm-up
    (1+s)/(10+s) stays below 0.999 until step 8,990, so both decays give the same weights there."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    a, b = EMA(net, 0.999), EMA(net, 0.9999)
    for step in [*range(20), *range(8950, 8990)]:
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        a.update(net, step)
        b.update(net, step)
    assert all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
    a.update(net, 9500)
    b.update(net, 9500)
    assert not torch.equal(a.shadow["weight"], b.shadow["weight"])


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    args = ["distill", *tt.make("dkdm-unet", tmp_path), "--rho", "0.5", "--prep-steps", "2", "--no-report",
            "--no-progress", "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads((out / "run.json").read_text())


def test_distill_prints_the_rule_defaults_and_flags_and_config_win(tmp_path, capsys):
    from dkdm.formats import load_model
    from dkdm.students import count_parameters

    run = _run(tmp_path, "a", "--steps", "3")
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if l.startswith("defaults: "))
    params = count_parameters(load_model(tmp_path / "a").net)
    assert run["lr"] == learning_rate(params) and f"lr 0.001 (for a {params / 1e6:.2g}M-parameter student" in line
    assert (run["batch"], run["warmup"], run["ema"], run["grad_clip"], run["steps"]) == (128, 200, 0.9999, 1.0, 3)
    assert "batch 128 (" in line and "steps" not in line.split("(")[0]  # --steps was given: not a default
    assert run["lr_decay"] == "cosine" and "lr-decay cosine (" in line
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ema: 0.99\n")
    run = _run(tmp_path, "b", "--steps", "3", "--lr", "3e-4", "--batch", "8", "--config", str(cfg))
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("defaults: "))
    assert (run["lr"], run["batch"], run["ema"], run["warmup"]) == (3e-4, 8, 0.99, 200)
    assert not any(f"{k} " in line for k in ("lr", "batch", "ema"))
    assert "warmup 200" in line and "grad-clip 1" in line


def test_a_teacher_recording_digits_gets_the_generic_rules(tmp_path, capsys):
    """No data-set-keyed distillation defaults: the bundled digits teacher's student is the generic
    default student at the generic rules' settings."""
    from dkdm.formats import load_model
    from dkdm.students import count_parameters, default_student_spec

    out = tmp_path / "d"
    assert main(["distill", "--steps", "1", "--rho", "0.001", "--prep-steps", "2", "--no-report", "--no-progress",
                 "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    student = load_model(out)
    assert student.spec == default_student_spec(load_model("builtin:digits"))
    assert run["lr"] == learning_rate(count_parameters(student.net)) and run["batch"] == 128
    assert (run["ema"], run["grad_clip"]) == (0.9999, 1.0)


def test_a_teacher_without_a_data_set_gets_a_hint_about_reference(tmp_path, capsys):
    """A teacher that records no data set: the report can only be data-free, and distill says which
    built-in set has its sample shape; with --reference (or another shape) nothing is hinted."""
    common = ["--steps", "1", "--batch", "8", "--rho", "0.5", "--prep-steps", "2", "--no-report", "--no-progress"]
    teacher = tt.make("dkdm-mlp", tmp_path)  # 2-D samples, like toy2d
    assert main(["distill", *teacher, *common, "--out", str(tmp_path / "a")]) == 0
    assert "its samples have the shape of toy2d: --reference NAME" in capsys.readouterr().err
    assert main(["distill", *teacher, *common, "--reference", "toy2d", "--out", str(tmp_path / "b")]) == 0
    assert "--reference NAME" not in capsys.readouterr().err
    assert main(["distill", *tt.make("dkdm-unet", tmp_path), *common, "--out", str(tmp_path / "c")]) == 0  # 3x8x8
    assert "--reference NAME" not in capsys.readouterr().err


def test_families_without_a_convolutional_down_sampling_path_get_more_steps_and_a_larger_rate():
    """docs/questions.md: at the UNet's budget a DiT, a U-ViT and a ConvMixer scored 3.4x, 17x and 2.7x
    the UNet student; they get 2.5x the budget (the U-ViT and the DiT 5x) and up to 3x the rate, tapering
    to the UNet's rule."""
    from dkdm.defaults import CONV_FAMILIES

    assert set(CONV_FAMILIES) == {"unet", "adm", "mlp"}
    for family in ("dit", "uvit", "import"):
        steps = 6000 if family in ("uvit", "dit") else 3000  # U-ViT and DiT measured at 2.5x and 5x: 5x
        assert step_budget(1000, 64, 128, family) == steps and step_budget(1000, 64, 64, family) == 2 * steps
        assert learning_rate(826_000, family) == pytest.approx(3e-3)  # the digits DiT's measured rate
        assert learning_rate(3_000_000, family) == pytest.approx(1e-3)  # 3e-3 x 1M / 3M
        for params in (9_000_000, 35_000_000, 675_000_000):  # from ~9M: the UNet's rule
            assert learning_rate(params, family) == learning_rate(params)
        d = distill_defaults(826_000, (1, 8, 8), 1000, family=family)
        assert (d["steps"].value, d["lr"].value, d["warmup"].value) == (steps, pytest.approx(3e-3), 200)
        assert f"family {family}" in d["steps"].why and f"family {family}" in d["lr"].why
    for family in CONV_FAMILIES:
        d = distill_defaults(826_000, (1, 8, 8), 1000, family=family)
        assert (d["steps"].value, d["lr"].value) == (1200, 1e-3) and "family" not in d["steps"].why + d["lr"].why
    assert step_budget(1000, 3 * 256 * 256, 128, "dit") == 400_000  # the bounds hold


def test_family_of_names_the_rule_each_student_gets(tmp_path):
    from dkdm.students import family_of, parse_spec

    assert [family_of(parse_spec(t)) for t in ("unet", "dit", "uvit", "mlp", "adm:num_channels=32")] == \
        ["unet", "dit", "uvit", "mlp", "adm"]
    assert family_of(parse_spec("example_net:ConvMixer:width=8")) == "import"
    for name, family in (("UNet2DModel", "unet"), ("DiTTransformer2DModel", "dit")):
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps({"_class_name": name}))
        assert family_of(parse_spec(str(config))) == family


def test_a_dit_student_is_distilled_at_its_familys_budget_and_rate(tmp_path, capsys):
    out = tmp_path / "dit"
    assert main(["distill", "--student", "dit:width=32,heads=2,depth=1", "--dry-run", "--no-progress",
                 "--out", str(out)]) == 0
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("defaults: "))
    assert "steps 6,000 (12 training samples" in line and "family dit" in line and "lr 0.003 (" in line
