"""The command line as a new user meets it (issue 18): help with every default, --version, resume
from a run's own settings, Ctrl-C while the pool is prepared, and the cost said before it is spent."""

import argparse
import re
import json
import shutil
import signal
from dataclasses import fields

import pytest
import torch
from helpers import same, weights

from dkdm.cli import build_parser, main
from dkdm.settings import COMMON_DEFAULTS
from dkdm.trainer import TrainConfig

SMALL = ["--student", "mlp:width=16,depth=1", "--batch", "16", "--rho", "0.5", "--no-progress", "--no-report"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "teacher"
    assert main(["train", "--data", "toy2d", "--steps", "30", "--diffusion-steps", "20", "--batch", "32", "--model",
                 "mlp:width=32,depth=1", "--no-progress", "--no-report", "--out", str(out)]) == 0
    return out


def _subparsers():
    ap = build_parser()
    return next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices


def _same_value(shown: str, value) -> bool:
    try:
        return float(shown) == float(value)
    except (TypeError, ValueError):
        return shown == str(value)


@pytest.mark.parametrize("command", ["train", "distill", "fewstep"])
def test_the_default_each_flags_help_gives_is_the_one_its_run_uses(command):
    """The help's "(default: X)" against the settings table the run merges (settings.py)."""
    from dkdm import settings

    tables = {"train": [settings.COMMON_DEFAULTS, settings.TRAIN_DEFAULTS],
              "distill": [settings.COMMON_DEFAULTS, settings.DISTILL_DEFAULTS],
              "fewstep": [settings.COMMON_DEFAULTS, settings.DISTILL_DEFAULTS, settings.FEWSTEP_DEFAULTS]}[command]
    merged = {k: v for t in tables for k, v in t.items()}
    checked = 0
    for action in _subparsers()[command]._actions:
        value = merged.get(action.dest)
        if not action.option_strings or value is None or value is False or isinstance(value, dict):
            continue
        if command == "train" and action.dest in settings.DATA_DEFAULTS.get("digits", {}):
            continue  # per data set: test_help_shows_the_defaults_a_run_uses
        if command != "train" and action.dest in settings.DISTILL_RULED:
            continue
        shown = re.findall(r"\(default:? ([^)]+)\)", action.help or "")
        assert shown, f"dkdm {command} {action.option_strings[0]} gives no default: {action.help!r}"
        text = re.split(r": |; ", shown[-1])[0].strip()  # "1: the authors' code" -> "1"
        assert _same_value(text, value), f"dkdm {command} {action.option_strings[0]}: help says {text!r}, the run " \
            f"uses {value!r}"
        checked += 1
    assert checked >= 10


def test_help_shows_the_defaults_a_run_uses(capsys):
    assert main(["distill", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("--rho RHO dynamic pool size in batches per diffusion step (paper: 0.4) (default: from the student and "
            "the problem") in text
    assert "from the student and the problem" in text  # --steps, --batch, --lr ... follow the rules
    for fmt in ("dkdm model directory", "DDPMPipeline", "LDMPipeline", "DiTPipeline", "guided-diffusion", "builtin:digits"):
        assert fmt in text, fmt
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: toy2d: 3000; digits: 12000; other data: 2000)" in text


def test_version(capsys):
    import dkdm

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dkdm {dkdm.__version__} (torch {torch.__version__.split('+')[0]}")


def test_the_loop_defaults_are_the_command_lines():
    names = {"ema_decay": "ema"}
    for f in fields(TrainConfig):
        key = names.get(f.name, f.name)
        if key in COMMON_DEFAULTS:
            assert getattr(TrainConfig(), f.name) == COMMON_DEFAULTS[key], f.name
    from dkdm.objective import DEFAULT_VLB_WEIGHT

    assert COMMON_DEFAULTS["vlb_weight"] == DEFAULT_VLB_WEIGHT


def _stopped_at_first_checkpoint(run):
    """What a run killed right after its step-5 checkpoint leaves (its later files removed)."""
    for c in (run / "checkpoints").iterdir():
        if int(c.name.split("_")[1]) > 5:
            shutil.rmtree(c)
    for name in ("model.safetensors", "dkdm_model.json"):
        (run / name).unlink()


def test_resume_needs_no_flag_but_out_and_may_extend_the_run(teacher, tmp_path, capsys):
    full, run = tmp_path / "full", tmp_path / "run"
    args = ["distill", "--teacher", str(teacher), *SMALL, "--ckpt-every", "5", "--keep-checkpoints", "5"]
    assert main([*args, "--steps", "10", "--out", str(full)]) == 0
    assert main([*args, "--steps", "10", "--out", str(run)]) == 0
    _stopped_at_first_checkpoint(run)
    capsys.readouterr()
    assert main(["distill", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert f"resuming {run} from step 5" in capsys.readouterr().err
    same(weights(full), weights(run))
    # the saved settings as a --config: the number of processes it records is not a setting
    assert main(["distill", "--config", str(run / "run.json"), "--out", str(run), "--resume", "--steps", "14"]) == 0
    saved = json.loads((run / "run.json").read_text())
    assert saved["steps"] == 14 and saved["command"] == "distill" and saved["processes"] == 1
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == 14
    # a flag that would change what the run learns is refused, naming it and the saved value
    capsys.readouterr()
    assert main(["distill", "--out", str(run), "--resume", "--lr", "0.5", "--batch", "16"]) == 2
    err = capsys.readouterr().err
    assert "settings differ from the run" in err and "--lr 0.5 (saved 0.001)" in err and "--batch 16" not in err
    # the same settings as a new run elsewhere
    assert main(["distill", "--config", str(run / "run.json"), "--out", str(tmp_path / "copy"), "--steps", "10"]) == 0
    same(weights(full), weights(tmp_path / "copy"))


def test_a_run_stopped_before_it_saved_anything_starts_afresh_with_its_settings(teacher, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher), *SMALL, "--steps", "6"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    run.mkdir()
    shutil.copy(tmp_path / "ref" / "run.json", run / "run.json")
    (run / "run.json").write_text((run / "run.json").read_text().replace(str(tmp_path / "ref"), str(run)))
    capsys.readouterr()
    assert main(["distill", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "stopped before it saved anything: starting it afresh" in capsys.readouterr().err
    same(weights(tmp_path / "ref"), weights(run))


def test_ctrl_c_while_preparing_saves_the_pool_and_resume_finishes_it(teacher, tmp_path, capsys, monkeypatch):
    import dkdm.interrupts

    args = ["distill", "--teacher", str(teacher), *SMALL, "--steps", "6", "--prep", "exact", "--prep-batch", "16"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    real = dkdm.interrupts.catch_signals

    def ctrl_c_at_once(stop):
        stop.append(signal.SIGINT)
        return {}

    monkeypatch.setattr(dkdm.interrupts, "catch_signals", ctrl_c_at_once)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main([*args, "--out", str(run)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"dkdm distill: SIGINT while preparing the pool: 16 of 160 entries prepared and saved in "
                       f"{run / 'preparation'}; continue with --resume"), err[-1]
    monkeypatch.setattr(dkdm.interrupts, "catch_signals", real)
    assert main(["distill", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "resuming the pool preparation: 16 of 160 entries were prepared" in capsys.readouterr().err
    same(weights(tmp_path / "ref"), weights(run))


def test_plain_keyboard_interrupt_says_interrupted(monkeypatch, capsys):
    import dkdm.cli

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(dkdm.cli.COMMANDS, "evaluate", interrupt)
    assert main(["evaluate", "--model", "x"]) == 130
    assert capsys.readouterr().err.strip() == "dkdm evaluate: interrupted"


def test_the_cost_is_estimated_after_the_first_chunks_and_a_long_preparation_said_plainly(teacher, tmp_path, capsys,
                                                                                          monkeypatch):
    import dkdm.costs

    monkeypatch.setattr(dkdm.costs, "LONG_PREPARATION_S", 0.0)
    assert main(["distill", "--teacher", str(teacher), *SMALL, "--steps", "4", "--prep", "exact", "--prep-batch", "16",
                 "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "estimate: the pool's preparation " in err and "teacher sample-steps/s measured" in err
    assert "warning: preparing the pool takes about" in err


def test_the_python_api_page_teacher_from_a_plain_module_and_betas_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "Schedule(betas)" in b)
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "readme_example"}
    exec(compile(block, "docs/python-api.md", "exec"), scope)
    assert scope["teacher"].schedule.num_steps == 1000 and scope["pool"].prepared
    assert (tmp_path / "runs" / "custom" / "model.safetensors").is_file()
