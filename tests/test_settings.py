"""The typed settings of a run (settings.py): each setting defined once, the flags parsed by its
definition, a YAML file's values converted and checked once with a one-line error, and run.json
the settings' own serialisation, read back to the same typed values."""

import argparse
import json
from dataclasses import fields

import pytest

from dkdm import settings
from dkdm.cli import build_parser, main
from dkdm.errors import DkdmError
from dkdm.settings import DistillSettings, FewstepSettings, TrainSettings, typed

CLASSES = {"train": TrainSettings, "distill": DistillSettings, "fewstep": FewstepSettings}


def _distill(values: dict) -> DistillSettings:
    tables = [settings.COMMON_DEFAULTS, settings.DISTILL_DEFAULTS, settings.DISTILL_RULED, settings.RUN_DIRECTORY]
    return typed(DistillSettings, settings.merge(tables, None, values))


@pytest.mark.parametrize("command", list(CLASSES))
def test_every_flag_of_a_setting_parses_as_its_definition(command):
    """A flag's type and choices are the setting's (no list copied into the parser), and every
    setting has its flag but those its class names (``without_flag``), and no flag is left over."""
    cls = CLASSES[command]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    actions = {a.dest: a for a in sub._actions if a.option_strings}
    assert set(actions) - {f.name for f in fields(cls)} == {"config", "help", "no_progress"}
    for f in fields(cls):
        if f.name in cls.without_flag:
            assert f.name not in actions
            continue
        a = actions[f.name]
        kind, choices = f.metadata["kind"], f.metadata["choices"]
        if kind is bool:
            assert a.nargs == 0, f.name
        elif kind in (int, float):
            assert a.type is kind, f.name
        assert a.choices is choices, f.name


def test_values_are_converted_to_their_kind_once():
    s = _distill({"lr": "1e-3", "batch": "32", "steps": "auto", "rho": 1, "prep_ckpt_every": 0})
    assert (s.lr, s.batch, s.steps, s.rho, s.prep_ckpt_every) == (1e-3, 32, "auto", 1.0, 0.0)
    assert type(s.lr) is float and type(s.batch) is int and type(s.rho) is float
    assert (s.ema, s.teacher, s.pool) == (None, "builtin:digits", "dynamic")  # a rule's, and the defaults


def test_a_spec_from_a_yaml_file_stays_a_mapping():
    spec = {"type": "adm", "num_channels": 64, "attention_resolutions": "16,8", "use_fp16": None}
    assert _distill({"student": spec}).student == spec
    assert _distill({"student": "unet:widths=8-16"}).student == "unet:widths=8-16"
    with pytest.raises(DkdmError, match="--student must be a model spec"):
        _distill({"student": 3})


@pytest.mark.parametrize("values, message", [
    ({"batch": "abc"}, "--batch must be an integer, got 'abc'"),
    ({"batch": 2.5}, "--batch must be an integer, got 2.5"),
    ({"batch": True}, "--batch must be an integer, got True"),
    ({"batch": 0}, "--batch must be at least 1, got 0"),
    ({"steps": "forever"}, "--steps must be a number of steps or auto, got 'forever'"),
    ({"lr": 0}, "--lr must be > 0, got 0.0"),
    ({"ema": 1}, "--ema must be in [0, 1), got 1.0"),
    ({"pool": "deep"}, "--pool must be one of iterative, shuffled, dynamic, got 'deep'"),
    ({"prep_ckpt_every": -1}, "--prep-ckpt-every must be >= 0 seconds, got -1.0"),
    ({"dry_run": "yes"}, "--dry-run must be true or false, got 'yes'"),
])
def test_a_wrong_value_is_one_line_naming_its_flag(values, message):
    with pytest.raises(DkdmError) as e:
        _distill(values)
    assert str(e.value) == message


def test_a_yaml_files_values_are_checked_like_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("teacher-dtype: float8\n")
    assert main(["distill", "--config", str(config), "--dry-run", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--teacher-dtype must be one of float32, float16, bfloat16, got 'float8'")


def test_run_json_is_the_settings_serialisation(tmp_path):
    """A run's run.json holds every field of its class with the command, typed as the run used them,
    and reads back (as --resume reads it) to the same settings."""
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-3\nbatch: '16'\n")  # YAML reads 1e-3 and '16' as strings
    out = tmp_path / "t"
    assert main(["train", "--config", str(config), "--data", "toy2d", "--model", "mlp:width=16,depth=1", "--steps", "2",
                 "--diffusion-steps", "10", "--no-progress", "--no-report", "--out", str(out)]) == 0
    saved = json.loads((out / "run.json").read_text())
    assert saved["command"] == "train" and saved["processes"] == 1
    assert saved["lr"] == 1e-3 and saved["batch"] == 16 and saved["steps"] == 2
    assert set(saved) == {f.name for f in fields(TrainSettings)} | {"command", "processes"}
    again = typed(TrainSettings, {k: v for k, v in saved.items() if k not in settings.RECORDED})
    assert again.as_dict() == {k: v for k, v in saved.items() if k != "processes"}
