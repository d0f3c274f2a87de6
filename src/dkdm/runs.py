"""The rules of a run: ``train``, ``distill`` and ``fewstep`` from settings, for the command line and
for Python.

Everything a run decides lives here and in the modules it calls, not in the command line, so
``dkdm.runs.distill(...)`` does what ``dkdm distill`` does: settings merged from defaults, a YAML
file and the given values, typed and checked (``settings.built``, or a resumed run's run.json); then a distillation's
plan and pool (``distillation.py``), the run directory's rules (``rundir.py``), and the locked run
itself: start or resume, training, the report (``runloop.py``). Messages about cost and progress go
to stderr; the result comes back to the caller.
"""

from __future__ import annotations

import json
from pathlib import Path

from .distillation import distillation
from .errors import DkdmError
from .layout import RUN_JSON
from .rundir import check_out, recorded_teacher
from .runloop import make_monitor, monitor_config, rank_seed, run, trackers, train_config
from .settings import (DATA_DEFAULTS, DISTILL_DEFAULTS, DistillSettings, FewstepSettings, TrainSettings, built,
                       read_config, resumed)

#: What a finished run returns: its directory, the last log record (loss terms, lr, step rate),
#: why it stopped early (``--steps auto``, else None) and the report's rows (None without one).
RESULT = ("out", "last", "stop_reason", "report")


def train(config=None, progress: bool = True, **settings) -> dict | None:
    """Data-based training (teachers and baselines): ``dkdm train``'s run, settings as its flags
    (``data="digits"``, ``model=...``, ``steps=...``; ``config``: a YAML file of them). Returns a dict
    with the keys of ``RESULT`` on the main process, None on the others."""
    import torch
    from .data import DataSource, MixedSet, SampleSet, load_dataset, reference_of
    from .diffusion import Schedule
    from .model import DiffusionModel
    from .devices import make_accelerator
    from .trainer import Trainer

    config, settings = _saved("train", config, settings)
    s = built(TrainSettings, config, settings)
    dataset = load_dataset(s.data)  # the data set's defaults below
    if (s.real_fraction is None) != (s.synthetic is None):
        raise DkdmError("--real-fraction P and --synthetic DIR go together: P% of --data, the rest from DIR")
    if s.real_fraction is not None:
        if not hasattr(dataset, "images") or isinstance(dataset, SampleSet):
            raise DkdmError(f"--real-fraction needs a built-in image data set as --data (digits), got {s.data}")
        dataset = MixedSet(dataset, SampleSet(s.synthetic), s.real_fraction, seed=s.seed)
    reference = reference_of(dataset)
    s = built(TrainSettings, config, settings, DATA_DEFAULTS.get(reference, {}))
    cfg = train_config(s)
    watch = monitor_config(s)
    out = check_out(s)
    schedule = Schedule.named(s.schedule, s.diffusion_steps)
    torch.manual_seed(s.seed)
    model = DiffusionModel.build(
        s.model, dataset.sample_shape, schedule, variance=s.variance, prediction=s.prediction,
        clip_x0=dataset.clip_x0, extra={"data": reference, **({"trained_on": dataset.name} if dataset.name != reference else {})},
    )
    acc = make_accelerator(cfg.mixed_precision, *trackers(s))
    classes = getattr(dataset, "num_classes", 0)
    if model.num_classes and model.num_classes != classes:
        raise DkdmError(f"the model conditions on {model.num_classes} classes but {dataset.name} has "
                        f"{classes or 'no'} labels; use classes={classes} in the spec" if classes else
                        f"the model conditions on classes but {dataset.name} has no labels; drop classes= from the spec")
    source = DataSource(dataset, schedule, s.batch, seed=rank_seed(s, acc), device=acc.device,
                        conditional=bool(model.num_classes))
    info = {"student": model.describe(), "source": source.describe()}
    trainer = Trainer(model, source, cfg, out, info, progress=progress, accelerator=acc)
    return run(trainer, s, out, progress, monitor=make_monitor(watch, trainer, reference=reference, progress=progress))


def distill(config=None, progress: bool = True, **settings) -> dict | None:
    """Data-free distillation (DKDM): ``dkdm distill``'s run with every rule of it (the student from
    the teacher, the defaults from the student and the problem, per-rank seeds and pool shards, the
    teacher's dtype / layout / compilation, the preparation, the lock, resume and the report).
    Settings as its flags (``teacher=...``, ``student=...``, ``steps=...``; ``config``: a YAML file
    of them). ``teacher`` may also be a ``DiffusionModel`` and ``student`` a ``DiffusionModel`` or an
    ``nn.Module`` called as ``net(x, t[, y])`` (``objects.py``; the teacher is frozen and moved to the
    run's device in place). Returns a dict with the keys of ``RESULT`` on the main process, None on
    the others."""
    from .objects import take_objects

    settings, objects = take_objects(settings)
    config, settings = _saved("distill", config, settings)
    s = built(DistillSettings, config, settings)
    return distillation(s, progress, objects)


def fewstep(config=None, progress: bool = True, **settings) -> dict | None:
    """The second stage (``dkdm fewstep``): a DKDM student (``student``: its run or model directory, of
    any architecture) made a K-step sampler (``sampler_steps``) by consistency distillation on the
    teacher's pool (``consistency.py``) or by distribution matching (``matching.py``; the default for
    one step), with every rule of ``distill`` (defaults, lock, resume, report). ``teacher`` may be a ``DiffusionModel`` as in ``distill``. Returns what ``distill`` returns."""
    from .objects import take_objects

    settings, objects = take_objects(settings)
    if "student" in objects:
        raise DkdmError("fewstep's student is the run or model directory of a distillation (student=\"runs/d\"), "
                        "not a network object")
    config, settings = _saved("fewstep", config, settings)
    s = built(FewstepSettings, config, settings)
    if not s.student:
        raise DkdmError("--student is required: the run or model directory of the student to make a few-step "
                        "sampler (e.g. the --out of `dkdm distill`)")
    if s.teacher is None:  # the one the student was distilled from
        s.teacher = recorded_teacher(s.student) or DISTILL_DEFAULTS["teacher"]
    return distillation(s, progress, objects)


def _saved(command: str, config, settings: dict):
    """``config`` and ``settings`` as the run uses them: with --resume of a run that saved its
    settings (RUN/run.json), the saved ones with what may change (``settings.resumed``), so a
    stopped run continues with no flag but --out and --resume."""
    asked = {**(read_config(config) if config else {}), **{k: v for k, v in settings.items() if v is not None}}
    path = Path(asked["out"]) / RUN_JSON if asked.get("resume") and asked.get("out") else None
    if path is None or not path.is_file():
        return config, settings
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DkdmError(f"--resume: cannot read the run's settings {path}: {e.__class__.__name__}: {e}")
    if not isinstance(saved, dict):
        raise DkdmError(f"--resume: {path} does not hold a run's settings")
    return None, resumed(command, saved, asked, str(path))

