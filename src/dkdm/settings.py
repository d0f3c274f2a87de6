"""The settings of a run: every command's defaults, and how a YAML file and given values override them.

One table of defaults serves the command line and the Python API alike (``dkdm.runs``), so a
setting means the same wherever it is given. Distillation leaves ``DISTILL_RULED`` open:
``defaults.distill_defaults`` derives them from the student and the problem.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DkdmError

#: Settings that suit each built-in data set (flags and --config override them).
DATA_DEFAULTS = {
    "toy2d": {"model": "mlp:width=128,depth=3", "schedule": "linear", "diffusion_steps": 100, "batch": 256, "lr": 1e-3,
              "ema": 0.995, "steps": 3000},
    "digits": {"model": "unet:widths=32-64,layers=2,groups=8", "schedule": "cosine",
               "diffusion_steps": 1000, "batch": 128, "lr": 5e-4, "ema": 0.999, "steps": 12000,
               "warmup": 200},
}
#: Distillation settings that ``defaults.distill_defaults`` derives from the student and the problem
#: where neither flags nor --config give them (the same rules for every teacher).
DISTILL_RULED = {"steps": None, "batch": None, "lr": None, "ema": None, "grad_clip": None, "warmup": None,
                 "lr_decay": None, "rho": None}
COMMON_DEFAULTS = {
    "seed": 0, "steps": 2000, "batch": 128, "lr": 1e-4, "weight_decay": 0.0, "ema": 0.9999,
    "grad_clip": 1.0, "warmup": 0, "lr_decay": "constant", "mixed_precision": "no", "log_every": 50, "ckpt_every": 500,
    "keep_checkpoints": 2, "vlb_weight": 1.0, "simple_weight": 1.0, "vlb_mean_grad": False, "no_report": False,
    "eval_num": None, "eval_steps": None, "compile": False, "channels_last": False, "cuda_graphs": False,
    "eval_every": None, "monitor_num": 1000, "monitor_steps": None, "patience": None, "max_steps": None,
    "report_to": None, "push_to_hub": None,
}
TRAIN_DEFAULTS = {"data": "toy2d", "real_fraction": None, "synthetic": None, "model": "mlp", "schedule": "cosine", "diffusion_steps": 1000,
                  "variance": "learned_range", "prediction": "epsilon"}
DISTILL_DEFAULTS = {"teacher": "builtin:digits", "teacher_config": None, "student": None, "student_steps": None, "guidance": 1.0, "teacher_dtype": "float32", "pool": "dynamic",
                    "pool_dtype": "float32", "prep_batch": None, "prep": "auto", "prep_steps": None, "prep_ckpt_every": 300.0,
                    "variance": "learned_range", "heldout": 512, "reference": None,
                    "inception_weights": None, "dry_run": False}
#: ``dkdm fewstep``: distill's settings (``--student`` then names the DKDM student's directory) and these;
#: teacher None: the one the student records (``rundir.recorded_teacher``), else distill's default.
FEWSTEP_DEFAULTS = {"teacher": None, "sampler_steps": 4, "fewstep_objective": None, "fewstep_prediction": "v_prediction",
                    "consistency_grid": None}
RUN_DIRECTORY = {"out": None, "resume": False}
#: What RUN/run.json records beside the settings (ignored where run.json is read as a --config).
RECORDED = ("command", "processes")
#: Settings a resumed run may change: how long it trains, and how it logs, checkpoints, reports and
#: runs; not what it learns from or how (those stay as RUN/run.json saved them).
RESUMABLE = {"steps", "max_steps", "patience", "log_every", "ckpt_every", "keep_checkpoints", "no_report",
             "eval_num", "eval_steps", "eval_every", "prep_batch", "prep_ckpt_every", "compile", "channels_last",
             "cuda_graphs", "report_to", "push_to_hub", "dry_run"}


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
