"""The settings of a run: one typed class per command (``TrainSettings``, ``DistillSettings``,
``FewstepSettings``), each setting defined once with its default, kind and range or choices; how a
YAML file and given values override the defaults (``merge``), and the typed, checked settings a run
uses (``typed``); what a resumed run may change.

One definition serves the command line (its help's defaults, ``flags.py``) and the Python API alike
(``dkdm.runs``), so a setting means the same wherever it is given. Distillation leaves
``DISTILL_RULED`` open: ``defaults.distill_defaults`` derives them from the student and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from .choices import (DTYPES, FAKE_FROM, FEWSTEP_OBJECTIVES, FEWSTEP_PREDICTIONS, LR_DECAYS, MIXED_PRECISIONS,
                      POOL_KINDS, PREDICTIONS, PREPARATIONS, SCHEDULES, VARIANCES)
from .errors import DkdmError

#: Settings that suit each built-in data set (flags and --config override them).
DATA_DEFAULTS = {
    "toy2d": {"model": "mlp:width=128,depth=3", "schedule": "linear", "diffusion_steps": 100, "batch": 256, "lr": 1e-3,
              "ema": 0.995, "steps": 3000},
    "digits": {"model": "unet:widths=32-64,layers=2,groups=8", "schedule": "cosine",
               "diffusion_steps": 1000, "batch": 128, "lr": 5e-4, "ema": 0.999, "steps": 12000,
               "warmup": 200},
}
STEPS = "steps"  # a setting's kind: a number of iterations, or "auto"
SPEC = "spec"  # a setting's kind: a model spec, a string or (from a YAML file) a mapping of its fields


def _s(default, kind, choices=None, at_least=None, above=None, below=None, unit=""):
    """One setting: its default, its kind (int, float, str, bool, STEPS or SPEC) and its range or choices,
    checked once when a run's settings are built (``typed``)."""
    return field(default=default, metadata={"kind": kind, "choices": choices, "at_least": at_least, "above": above,
                                            "below": below, "unit": unit})


@dataclass
class RunSettings:
    """What every training run takes: the loop, its logging and checkpoints, the objective's weights,
    speed options, watching and the report, trackers, and the run directory. ``None``: not given
    (a rule decides, or the option is off). RUN/run.json is its serialisation (``as_dict``)."""

    command: ClassVar[str] = ""
    without_flag: ClassVar[tuple] = ()
    seed: int = _s(0, int)
    steps: int | str | None = _s(2000, STEPS, at_least=1)
    batch: int | None = _s(128, int, at_least=1)
    lr: float | None = _s(1e-4, float, above=0)
    weight_decay: float = _s(0.0, float, at_least=0)
    ema: float | None = _s(0.9999, float, at_least=0, below=1)
    grad_clip: float | None = _s(1.0, float, at_least=0)
    warmup: int | None = _s(0, int, at_least=0)
    lr_decay: str | None = _s("constant", str, LR_DECAYS)
    mixed_precision: str = _s("no", str, MIXED_PRECISIONS)
    log_every: int = _s(50, int, at_least=1)
    ckpt_every: int = _s(500, int, at_least=1)
    keep_checkpoints: int = _s(2, int)
    vlb_weight: float = _s(1.0, float, at_least=0)
    simple_weight: float = _s(1.0, float, at_least=0)
    vlb_mean_grad: bool = _s(False, bool)
    no_report: bool = _s(False, bool)
    eval_num: int | None = _s(None, int)
    eval_steps: int | None = _s(None, int)
    compile: bool = _s(False, bool)
    channels_last: bool = _s(False, bool)
    cuda_graphs: bool = _s(False, bool)
    eval_every: int | None = _s(None, int, at_least=1)
    monitor_num: int = _s(1000, int, at_least=2)
    monitor_steps: int | None = _s(None, int)
    patience: int | None = _s(None, int)
    max_steps: int | None = _s(None, int)
    report_to: str | None = _s(None, str)
    push_to_hub: str | None = _s(None, str)
    out: str | None = _s(None, str)
    resume: bool = _s(False, bool)

    def as_dict(self) -> dict:
        """The settings as RUN/run.json records them (with the command that ran them)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "command": self.command}

    def update(self, values: dict) -> None:
        """Write decided values (a rule's, a resolved preparation's) into the settings, checked."""
        for name, value in values.items():
            setattr(self, name, _checked(_field(type(self), name), value))


@dataclass
class TrainSettings(RunSettings):
    """``dkdm train``: data-based training (teachers and baselines); a data set's defaults (DATA_DEFAULTS) apply."""

    command: ClassVar[str] = "train"
    data: str = _s("toy2d", str)
    real_fraction: float | None = _s(None, float)
    synthetic: str | None = _s(None, str)
    model: str | dict = _s("mlp", SPEC)
    schedule: str = _s("cosine", str, SCHEDULES)
    diffusion_steps: int = _s(1000, int, at_least=2)
    variance: str = _s("learned_range", str, VARIANCES)
    prediction: str = _s("epsilon", str, PREDICTIONS)


@dataclass
class DistillSettings(RunSettings):
    """``dkdm distill``: DKDM. The loop's settings left None follow from the student and the problem
    (``defaults.distill_defaults``, written back with ``update``)."""

    command: ClassVar[str] = "distill"
    steps: int | str | None = _s(None, STEPS, at_least=1)
    batch: int | None = _s(None, int, at_least=1)
    lr: float | None = _s(None, float, above=0)
    ema: float | None = _s(None, float, at_least=0, below=1)
    grad_clip: float | None = _s(None, float, at_least=0)
    warmup: int | None = _s(None, int, at_least=0)
    lr_decay: str | None = _s(None, str, LR_DECAYS)
    rho: float | None = _s(None, float, above=0)
    teacher: str | None = _s("builtin:digits", str)
    teacher_config: str | None = _s(None, str)
    student: str | dict | None = _s(None, SPEC)
    student_steps: int | None = _s(None, int, at_least=1)
    guidance: float = _s(1.0, float)
    teacher_dtype: str = _s("float32", str, DTYPES)
    pool: str = _s("dynamic", str, POOL_KINDS)
    pool_dtype: str = _s("float32", str, DTYPES)
    prep_batch: int | None = _s(None, int, at_least=1)
    prep: str = _s("auto", str, PREPARATIONS)
    prep_steps: int | None = _s(None, int)
    prep_ckpt_every: float = _s(300.0, float, at_least=0, unit=" seconds")
    variance: str = _s("learned_range", str, VARIANCES)
    heldout: int = _s(512, int, at_least=0)
    reference: str | None = _s(None, str)
    inception_weights: str | None = _s(None, str)
    dry_run: bool = _s(False, bool)


@dataclass
class FewstepSettings(DistillSettings):
    """``dkdm fewstep``: distill's settings (``student`` names the DKDM student's run or model
    directory) and the sampler's. ``teacher`` None: the one the student records
    (``rundir.recorded_teacher``), else distill's default."""

    command: ClassVar[str] = "fewstep"
    #: distill's settings of the student it builds: a few-step run's student is the DKDM student's own
    #: network and steps, so they have no flag here (a --config may still hold them, as for distill).
    without_flag: ClassVar[tuple] = ("student_steps", "variance")
    teacher: str | None = _s(None, str)
    student: str | None = _s(None, str)  # the DKDM student's run or model directory
    sampler_steps: int = _s(4, int, at_least=1)
    fewstep_objective: str | None = _s(None, str, FEWSTEP_OBJECTIVES)
    fewstep_prediction: str = _s("v_prediction", str, FEWSTEP_PREDICTIONS)
    consistency_grid: int | None = _s(None, int)
    fake_lr: float | None = _s(None, float, above=0)  # matching's fake score (None: the generator's --lr)
    fake_updates: int = _s(1, int, at_least=1)  # matching's fake-score steps per generator step
    fake_from: str | None = _s(None, str, FAKE_FROM)  # matching's fake score: a copy of which model (None: the rule)


COMMANDS = {cls.command: cls for cls in (TrainSettings, DistillSettings, FewstepSettings)}


def defaults_of(cls, base=None) -> dict:
    """``cls``'s settings and their defaults (those ``base`` holds left out)."""
    skip = {f.name for f in fields(base)} if base else set()
    return {f.name: f.default for f in fields(cls) if f.name not in skip}


#: The tables the help and ``merge`` read, from the classes above (one definition of each setting).
RUN_DIRECTORY = {"out": None, "resume": False}
COMMON_DEFAULTS = {k: v for k, v in defaults_of(RunSettings).items() if k not in RUN_DIRECTORY}
TRAIN_DEFAULTS = defaults_of(TrainSettings, RunSettings)
#: Distillation settings that ``defaults.distill_defaults`` derives from the student and the problem
#: where neither flags nor --config give them (the same rules for every teacher).
DISTILL_RULED = {k: None for k in ("steps", "batch", "lr", "ema", "grad_clip", "warmup", "lr_decay", "rho")}
DISTILL_DEFAULTS = {k: v for k, v in defaults_of(DistillSettings, RunSettings).items() if k not in DISTILL_RULED}
FEWSTEP_DEFAULTS = defaults_of(FewstepSettings, DistillSettings)
FEWSTEP_DEFAULTS["teacher"] = None
#: What RUN/run.json records beside the settings (ignored where run.json is read as a --config).
RECORDED = ("command", "processes")
#: Settings a resumed run may change: how long it trains, and how it logs, checkpoints, reports and
#: runs; not what it learns from or how (those stay as RUN/run.json saved them).
RESUMABLE = {"steps", "max_steps", "patience", "log_every", "ckpt_every", "keep_checkpoints", "no_report",
             "eval_num", "eval_steps", "eval_every", "prep_batch", "prep_ckpt_every", "compile", "channels_last",
             "cuda_graphs", "report_to", "push_to_hub", "dry_run"}


def built(cls, config=None, given: dict | None = None, *layers: dict):
    """A command's settings: ``cls``'s defaults <- ``layers`` (e.g. a data set's) <- the YAML file
    ``config`` <- ``given`` (``merge``), typed and checked (``typed``)."""
    return typed(cls, merge([defaults_of(cls), *layers], config, given))


def typed(cls, values: dict):
    """A run's settings as ``cls`` (merged values: ``merge``, or a resumed run's), each converted to
    its kind and checked against its range or choices: DkdmError naming the flag, otherwise."""
    return cls(**{f.name: _checked(f, values[f.name]) for f in fields(cls) if f.name in values})


def _field(cls, name: str):
    return next(f for f in fields(cls) if f.name == name)


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", STEPS: "a number of steps or auto",
               SPEC: "a model spec (a string, or a mapping of its fields)"}


def _checked(f, value):
    """``value`` of the setting ``f``, converted to its kind and checked (None stays None: not given)."""
    if value is None:
        return None
    m, flag = f.metadata, f"--{f.name.replace('_', '-')}"
    kind = m["kind"]
    try:
        if kind is STEPS:
            value = value if value == "auto" else _number(value, int)
        elif kind in (int, float):
            value = _number(value, kind)
        elif kind is bool or kind is SPEC:
            if not isinstance(value, bool if kind is bool else (str, dict)):
                raise ValueError
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise DkdmError(f"{flag} must be {_KIND_NAMES[kind]}, got {value!r}")
    if m["choices"] is not None and value not in m["choices"]:
        raise DkdmError(f"{flag} must be one of {', '.join(m['choices'])}, got {value!r}")
    if isinstance(value, (str, bool, dict)):
        return value
    if m["at_least"] is not None and m["below"] is not None and not m["at_least"] <= value < m["below"]:
        raise DkdmError(f"{flag} must be in [{m['at_least']:g}, {m['below']:g}), got {value}")
    if m["at_least"] is not None and not value >= m["at_least"]:
        bound = f"at least {m['at_least']}" if kind in (int, STEPS) else f">= {m['at_least']:g}{m['unit']}"
        raise DkdmError(f"{flag} must be {bound}, got {value}")
    if m["above"] is not None and not value > m["above"]:
        raise DkdmError(f"{flag} must be > {m['above']:g}, got {value}")
    return value


def _number(value, kind):
    """``value`` as an int or a float (YAML reads 1e-3 as a string; an int must be a whole number)."""
    if isinstance(value, bool):
        raise TypeError
    number = float(value) if kind is float else value if isinstance(value, int) else float(value)
    if kind is int:
        if number != int(number):
            raise ValueError
        return int(number)
    return number


def checked_batch(batch) -> int:
    """``--batch`` as an int, DkdmError unless it is at least 1 (the rules and the pool divide by it)."""
    if int(batch) < 1:
        raise DkdmError(f"--batch must be at least 1, got {batch}")
    return int(batch)


def read_config(path) -> dict:
    """A YAML mapping of settings, keys with dashes or underscores."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DkdmError(f"cannot read config {path}: {e.__class__.__name__}: {e}")
    if not isinstance(loaded, dict):
        raise DkdmError(f"config {path} must be a YAML mapping of settings")
    return {k.replace("-", "_"): v for k, v in loaded.items() if k not in RECORDED}


def merge(defaults, config=None, given: dict | None = None) -> dict:
    """``defaults`` (dicts, later ones win) <- the YAML file ``config`` <- ``given`` (None: not given).

    A setting that no default names is refused, from the file and from ``given`` alike."""
    merged: dict = {}
    for d in defaults:
        merged.update(d)
    for where, values in ((f"config {config}: ", read_config(config) if config else {}),
                          ("", {k: v for k, v in (given or {}).items() if v is not None})):
        unknown = set(values) - set(merged)
        if unknown:
            raise DkdmError(f"{where}unknown setting(s) {', '.join(sorted(unknown))}")
        merged.update(values)
    return merged


def command_of(settings: dict) -> str:
    """The command a run's settings belong to: what run.json records, else distill where there is a teacher."""
    return settings.get("command") or ("fewstep" if "sampler_steps" in settings else
                                       "distill" if "teacher" in settings else "train")


def _same(given, saved) -> bool:
    if given == saved or str(given) == str(saved):
        return True
    try:
        return float(given) == float(saved)
    except (TypeError, ValueError):
        return isinstance(given, str) and isinstance(saved, str) and Path(given).resolve() == Path(saved).resolve()


def resumed(command: str, saved: dict, asked: dict, where: str) -> dict:
    """The settings of a resumed run: those it saved (``where``: its run.json), with the ``asked``
    ones (a YAML file's and the given values) that may change (``RESUMABLE``) or that the run left
    to a rule (saved as None). DkdmError naming every other asked value that differs."""
    kind = command_of(saved)
    if kind != command:
        raise DkdmError(f"--resume: {where} is a `dkdm {kind}` run; continue it with `dkdm {kind} --out ... --resume`")
    settings = {k: v for k, v in saved.items() if k not in RECORDED}
    differ = []
    for key, value in asked.items():
        if key in RUN_DIRECTORY or key in RESUMABLE or settings.get(key) is None or key not in settings:
            settings[key] = value
        elif not _same(value, settings[key]):
            differ.append(f"--{key.replace('_', '-')} {value} (saved {settings[key]})")
    if differ:
        changeable = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUMABLE))
        raise DkdmError(f"--resume: these settings differ from the run ({where}): {'; '.join(differ)}. A resumed "
                        f"run keeps its own settings and may change only {changeable}: drop the others, or start a "
                        f"new run in another --out")
    return settings
