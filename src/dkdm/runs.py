"""The rules of a run: ``train`` and ``distill`` from settings, for the command line and for Python.

Everything a run decides lives here, not in the command line, so ``dkdm.runs.distill(...)`` does
what ``dkdm distill`` does: settings merged from defaults, a YAML file and the given values
(``settings.merge``); the run directory checked and locked; a new run prepared and checkpointed
at step 0, or a stopped one resumed; training; the report. Messages about cost and progress go to
stderr; the result comes back to the caller.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DkdmError
from .layout import CHECKPOINTS, RUN_JSON
from .settings import (COMMON_DEFAULTS, DATA_DEFAULTS, DISTILL_DEFAULTS, DISTILL_RULED, FEWSTEP_DEFAULTS, RUN_DIRECTORY,
                       TRAIN_DEFAULTS, checked_batch, command_of, merge, read_config, resumed)

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
    s = merge([COMMON_DEFAULTS, TRAIN_DEFAULTS, RUN_DIRECTORY], config, settings)  # the data set's defaults below
    data_name = s["data"]
    dataset = load_dataset(data_name)
    if (s["real_fraction"] is None) != (s["synthetic"] is None):
        raise DkdmError("--real-fraction P and --synthetic DIR go together: P% of --data, the rest from DIR")
    if s["real_fraction"] is not None:
        if not hasattr(dataset, "images") or isinstance(dataset, SampleSet):
            raise DkdmError(f"--real-fraction needs a built-in image data set as --data (digits), got {data_name}")
        dataset = MixedSet(dataset, SampleSet(s["synthetic"]), s["real_fraction"], seed=s["seed"] or 0)
    reference = reference_of(dataset)
    s = merge([COMMON_DEFAULTS, TRAIN_DEFAULTS, DATA_DEFAULTS.get(reference, {}), RUN_DIRECTORY], config, settings)
    cfg = _train_config(s)
    watch = _monitor_config(s)
    out = _check_out(s)
    if int(s["diffusion_steps"]) < 2:
        raise DkdmError(f"--diffusion-steps must be at least 2, got {s['diffusion_steps']}")
    schedule = Schedule.named(s["schedule"], int(s["diffusion_steps"]))
    torch.manual_seed(int(s["seed"]))
    model = DiffusionModel.build(
        s["model"], dataset.sample_shape, schedule, variance=s["variance"], prediction=s["prediction"],
        clip_x0=dataset.clip_x0, extra={"data": reference, **({"trained_on": dataset.name} if dataset.name != reference else {})},
    )
    acc = make_accelerator(cfg.mixed_precision, *_trackers(s))
    classes = getattr(dataset, "num_classes", 0)
    if model.num_classes and model.num_classes != classes:
        raise DkdmError(f"the model conditions on {model.num_classes} classes but {dataset.name} has "
                        f"{classes or 'no'} labels; use classes={classes} in the spec" if classes else
                        f"the model conditions on classes but {dataset.name} has no labels; drop classes= from the spec")
    source = DataSource(dataset, schedule, int(s["batch"]), seed=_rank_seed(s, acc), device=acc.device,
                        conditional=bool(model.num_classes))
    info = {"student": model.describe(), "source": source.describe()}
    trainer = Trainer(model, source, cfg, out, info, progress=progress, accelerator=acc)
    return _run(trainer, s, out, progress, monitor=_monitor(watch, trainer, reference=reference, progress=progress))


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
    s = merge([COMMON_DEFAULTS, DISTILL_DEFAULTS, DISTILL_RULED, RUN_DIRECTORY], config, settings)
    return _distillation(s, progress, objects)


def fewstep(config=None, progress: bool = True, **settings) -> dict | None:
    """The second stage (``dkdm fewstep``): a DKDM student (``student``: its run or model directory, of
    any architecture) made a K-step sampler (``sampler_steps``) by consistency distillation on the
    teacher's pool (``consistency.py``), with every rule of ``distill`` (defaults, lock, resume,
    report). Returns what ``distill`` returns."""
    config, settings = _saved("fewstep", config, settings)
    s = merge([COMMON_DEFAULTS, DISTILL_DEFAULTS, DISTILL_RULED, FEWSTEP_DEFAULTS, RUN_DIRECTORY], config, settings)
    if not s["student"]:
        raise DkdmError("--student is required: the run or model directory of the student to make a few-step "
                        "sampler (e.g. the --out of `dkdm distill`)")
    if s["steps"] == "auto" or s["eval_every"] is not None:
        raise DkdmError("--steps auto and --eval-every watch a DKDM student (held-out epsilon error, many-step samples); "
                        "a few-step student is scored by its report: give fewstep a number of --steps")
    if int(s["sampler_steps"]) < 1:
        raise DkdmError(f"--sampler-steps must be at least 1, got {s['sampler_steps']}")
    return _distillation(s, progress)


def _few_step_student(s: dict, teacher):
    """The DKDM student ``s["student"]`` names, as a consistency student of ``s["sampler_steps"]`` steps."""
    from .formats import load_model
    from .model import DiffusionModel

    start = load_model(s["student"], role="student")
    if tuple(start.sample_shape) != tuple(teacher.sample_shape) or start.schedule.num_steps != teacher.schedule.num_steps:
        raise DkdmError(f"--student {s['student']} models samples of shape {list(start.sample_shape)} over "
                        f"{start.schedule.num_steps} steps, the teacher {list(teacher.sample_shape)} over "
                        f"{teacher.schedule.num_steps}: start from a student of this teacher")
    grid = None if s["consistency_grid"] is None else int(s["consistency_grid"])
    return DiffusionModel.few_step_of(start, int(s["sampler_steps"]), s["fewstep_prediction"], grid)


#: What a DKDM run's pool must share with a few-step run's for the latter to take it over.
POOL_SETTINGS = ("pool", "batch", "rho", "pool_dtype", "guidance", "prep", "prep_steps")


def _run_json(run_dir) -> dict | None:
    """A run directory's run.json, or None where it has none or it is unreadable."""
    try:
        saved = json.loads((Path(run_dir) / RUN_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def _saved_setting(run_dir, key: str, default):
    """``key`` of a run directory's run.json, or ``default`` where it has none (or no readable run.json)."""
    return (_run_json(run_dir) or {}).get(key, default)


def _reusable_pool(s: dict, teacher_ref: str, acc) -> tuple[Path | None, str]:
    """The DKDM run (``--student RUN``) whose pool a few-step run takes over, so it spends no teacher
    steps preparing one, and a line saying so; (None, why not) where the run's teacher or pool
    settings differ or it kept no checkpoint. The pool itself is read when the run starts
    (``checkpoint.saved_pool``), not for a dry run or a resumed one."""
    from .checkpoint import list_checkpoints

    run = Path(s["student"]) / RUN_JSON
    if not run.is_file():
        return None, "preparing a pool (--student is a model directory, not a distill run)"
    saved = _run_json(run.parent)
    if saved is None:
        return None, f"preparing a pool ({run} is unreadable)"
    differ = [k for k in POOL_SETTINGS if str(saved.get(k)) != str(s.get(k))]
    if saved.get("teacher") is None or teacher_reference(saved["teacher"]) != teacher_ref:
        differ.insert(0, "teacher")
    if int(saved.get("processes", 1)) != acc.num_processes:
        differ.append("processes")
    if differ:
        return None, f"preparing a pool (the run's {', '.join(differ)} differ from this one's)"
    if not list_checkpoints(Path(s["student"]) / CHECKPOINTS):
        return None, "preparing a pool (the run kept no checkpoint)"
    return Path(s["student"]), f"pool: taken over from {s['student']}'s last checkpoint (the same teacher and pool settings)"


def _teacher(s: dict, device, given=None):
    """The run's teacher (``given``, else loaded from ``s["teacher"]``), frozen, at the run's
    inference dtype, memory layout and compilation."""
    import torch

    from .formats import load_model
    from .objects import is_object_reference

    if given is not None:
        teacher = given.to(device)
    elif is_object_reference(s["teacher"]):
        raise DkdmError(f"this run's teacher was a Python object ({s['teacher']}): resume it from Python with the same "
                        f"teacher, dkdm.distill(teacher=model, out={str(s['out'])!r}, resume=True)")
    else:
        teacher = load_model(s["teacher"], device=device, role="teacher", config=s["teacher_config"])
    teacher.requires_grad_(False)
    teacher.set_inference_dtype(s["teacher_dtype"])
    if s["channels_last"]:
        teacher.net.to(memory_format=torch.channels_last)
    if s["compile"]:
        from .compiling import compile_regions

        compile_regions(teacher.net)
    return teacher


def _student(s: dict, teacher, data_name, teacher_ref: str, given=None):
    """The run's fresh student: a few-step one from ``s["student"]``'s DKDM student (fewstep), the
    object ``given``, or the spec ``s["student"]`` names (default: the teacher's family at half width)."""
    from .model import DiffusionModel
    from .objects import is_object_reference, student_from_object

    if s.get("sampler_steps") is not None:
        return _few_step_student(s, teacher)
    if given is not None:
        student = student_from_object(given, teacher)
        student.extra.update({"data": data_name, "teacher": teacher_ref})
        return student
    if is_object_reference(s["student"]):
        raise DkdmError(f"this run's student was a Python object ({s['student']}): resume it from Python with a "
                        f"network of the same class, dkdm.distill(..., student=net, out={str(s['out'])!r}, resume=True)")
    return DiffusionModel.student_of(teacher, s["student"], variance=s["variance"],
                                     extra={"data": data_name, "teacher": teacher_ref})


@dataclass
class _Plan:
    """What a distillation decided before it spends anything: the models, the settings the rules
    gave (``ruled``, also written into the settings), the loop's and monitor's configs, the pool's
    size, memory and preparation cost, the pool a few-step run takes over, and the report's size."""
    few: bool
    acc: Any
    teacher: Any
    student: Any
    teacher_ref: str
    reference: Any
    ruled: dict
    cfg: Any
    watch: Any
    out: Path
    size: int
    mem: int
    prep: int
    prep_batch: int
    inherit_from: Path | None
    inherit_note: str
    report: Any


def _distillation(s: dict, progress: bool, objects: dict | None = None) -> dict | None:
    """A distillation from merged settings: DKDM (``distill``), or consistency (``fewstep``);
    ``objects``: a teacher or student given as an object (``objects.take_objects``). The named
    steps: plan (models, settings, pool), announce, prepare the pool, train, report (``_run``)."""
    from .pool import KnowledgePool
    from .trainer import Trainer

    plan = _plan(s, objects or {})
    acc, teacher = plan.acc, plan.teacher
    if s["dry_run"]:  # the plan, and no pool allocated, nothing written
        if acc.is_main_process:
            _announce(plan, s)
            print("dry run: stopped before preparing the pool", file=sys.stderr)
        return {"out": plan.out, "last": None, "stop_reason": "dry run", "report": None}
    pool = KnowledgePool(teacher, int(s["batch"]), s["pool"], float(s["rho"]), s["pool_dtype"],
                         seed=_rank_seed(s, acc), device=acc.device, preparation=s["prep"], prep_steps=int(s["prep_steps"]),
                         guidance=float(s["guidance"]))
    info = {"student": plan.student.describe(), "source": pool.describe(), "teacher": plan.teacher_ref}
    trainer = Trainer(plan.student, pool, plan.cfg, plan.out, info, progress=progress, accelerator=acc)
    monitor = _monitor(plan.watch, trainer, teacher, pool, plan.reference, float(s["guidance"]), progress=progress)
    return _run(trainer, s, plan.out, progress, lambda resume: _prepare(plan, s, pool, info, resume, progress),
                teacher=teacher, monitor=monitor, reference=plan.reference)


def _plan(s: dict, objects: dict) -> _Plan:
    """Load the teacher, choose the student, decide the settings and plan the pool and the report."""
    import torch

    from .devices import make_accelerator

    few = s.get("sampler_steps") is not None
    s["out"] = s["out"] or _default_out("fewstep" if few else "distill")
    acc = make_accelerator(s["mixed_precision"], *_trackers(s))
    teacher = _teacher(s, acc.device, objects.get("teacher"))
    reference, data_name = _distill_reference(s, teacher, acc.device)
    teacher_ref = teacher_reference(s["teacher"])
    if s["student_steps"] is not None:
        # the pool runs the teacher on the student's steps, so every batch is a step the student takes
        teacher = teacher.respaced(int(s["student_steps"]))
    torch.manual_seed(int(s["seed"]))
    student = _student(s, teacher, data_name, teacher_ref, objects.get("student"))
    ruled, cfg = _decide_settings(s, teacher, student, few)
    watch = _monitor_config(s)
    size, mem, prep, prep_batch = _plan_pool(s, teacher, cfg, acc, few)
    inherit_from, inherit_note = _reusable_pool(s, teacher_ref, acc) if few else (None, "")
    # a few-step student's report costs little (K steps), its teacher's is most often cached by its distill run;
    # the run's own cost in network passes per sample: the teacher's (preparation, one per trained sample)
    # and the student's updates (forward and backward, about three forwards each)
    run_cost = prep + cfg.steps * int(s["batch"]) * (1 + UPDATE_PASSES)
    report = _report_size(s, reference, teacher, None if few else run_cost)
    return _Plan(few, acc, teacher, student, teacher_ref, reference, ruled, cfg, watch, Path(s["out"]), size, mem,
                 prep, prep_batch, inherit_from, inherit_note, report)


def _decide_settings(s: dict, teacher, student, few: bool):
    """What flags and --config leave open, from the student and the problem (``defaults``), written
    into ``s``; the settings the rules gave and the loop's config."""
    import math

    from .defaults import distill_defaults, fewstep_defaults, step_budget
    from .students import count_parameters, family_of

    if s["batch"] is not None:  # the rules divide by it
        checked_batch(s["batch"])
    rules = fewstep_defaults if few else distill_defaults
    family = family_of(student.spec)
    ruled = rules(count_parameters(student.net), teacher.sample_shape, teacher.schedule.num_steps,
                  {k: s[k] for k in DISTILL_RULED}, family)
    s.update({k: v.value for k, v in ruled.items()})
    budget = step_budget(teacher.schedule.num_steps, math.prod(teacher.sample_shape), int(s["batch"]), family)
    return ruled, _train_config(s, fixed_default=budget, objective="consistency" if few else "dkdm")


def _plan_pool(s: dict, teacher, cfg, acc, few: bool) -> tuple[int, int, int, int]:
    """The pool's entries, bytes, preparation cost (teacher sample-steps) and preparation batch;
    the preparation (``--prep auto``) and its steps resolved into ``s``; the run directory checked."""
    from .costs import check_pool_fits
    from .defaults import PREP_STEPS
    from .pool import pool_memory_bytes, pool_size, preparation_batch, preparation_cost, resolve_preparation

    size = pool_size(s["pool"], float(s["rho"]), teacher.schedule.num_steps, int(s["batch"]))
    _check_out(s)
    T = teacher.schedule.num_steps
    if s["prep_steps"] is None:  # PREP_STEPS sampling steps, or all of a shorter process
        s["prep_steps"] = min(PREP_STEPS, T)
    mem = pool_memory_bytes(size, teacher.sample_shape, s["pool_dtype"])
    if few and s["prep"] == "auto":  # as the distill run resolved it, so that its pool can be taken over
        s["prep"] = _saved_setting(s["student"], "prep", "auto")
    s["prep"] = resolve_preparation(s["prep"], T, int(s["prep_steps"]), size, cfg.steps * int(s["batch"]))
    prep_batch = preparation_batch(None if s["prep_batch"] is None else int(s["prep_batch"]), acc.device)
    if not float(s["prep_ckpt_every"]) >= 0:
        raise DkdmError(f"--prep-ckpt-every must be >= 0 seconds, got {s['prep_ckpt_every']}")
    prep = preparation_cost(s["pool"], size, T, s["prep"], int(s["prep_steps"]))
    check_pool_fits(mem, size, teacher.sample_shape, s, acc.device)
    return size, mem, prep, prep_batch


def _announce(plan: _Plan, s: dict) -> None:
    """The student, the rules' settings, the pool's size and cost and the report's, before any is spent."""
    from .defaults import describe

    teacher, T, n = plan.teacher, plan.teacher.schedule.num_steps, plan.acc.num_processes
    print(_student_line(plan, s), file=sys.stderr)
    if plan.ruled:
        print(f"defaults: {describe(plan.ruled)}", file=sys.stderr)
    if plan.reference is None and teacher.decoder is None:
        from .data import builtin_names_of_shape

        names = builtin_names_of_shape(teacher.sample_shape)
        if names:
            print(f"the teacher records no data set, so the report has the data-free score only; its samples "
                  f"have the shape of {' / '.join(names)}: --reference NAME adds that data set's metrics",
                  file=sys.stderr)
    print(
        f"pool: {s['pool']}, {plan.size} entries x {list(teacher.sample_shape)} {s['pool_dtype']} = "
        f"{plan.mem / 2**20:.1f} MiB; "
        + (f"{s['prep']} preparation ~{plan.prep:,} teacher sample-steps" if plan.inherit_from is None else "no preparation")
        + f"; training {'up to ' * (s['steps'] == 'auto')}"
        f"{plan.cfg.steps:,} steps, {plan.cfg.steps * int(s['batch']):,} teacher sample-forwards"
        + (f" (each of {n} processes: its own pool shard and batches)" if n > 1 else ""),
        file=sys.stderr,
    )
    if plan.few:
        print(plan.inherit_note, file=sys.stderr)
    if plan.few and not s["no_report"]:
        print(f"report: {plan.report.num:,} samples of the student at its {s['sampler_steps']} steps and of the teacher "
              f"at {plan.report.steps or T} (the teacher's cached across runs: drawn once, most often by the distill run)",
              file=sys.stderr)
    else:
        print("report: none (--no-report)" if s["no_report"] else plan.report.describe(T), file=sys.stderr)


def _student_line(plan: _Plan, s: dict) -> str:
    from .students import count_parameters, format_spec

    student, params = plan.student, f"{count_parameters(plan.student.net):,}"
    teacher = f"{count_parameters(plan.teacher.net):,}"
    if plan.few:
        return (f"few-step student: {format_spec(student.spec)} from {s['student']}, {params} parameters (teacher: "
                f"{teacher}), consistency distillation to sample in {s['sampler_steps']} steps (predicting "
                f"{student.prediction})")
    name = s["student"] if student.spec is None else format_spec(student.spec)
    return f"student: {name}, {params} parameters (teacher: {teacher}){'' if s['student'] else '; --student SPEC picks another'}"


def _prepare(plan: _Plan, s: dict, pool, info: dict, resume: bool, progress: bool) -> None:
    """A new run, or one stopped while preparing: announce it, prepare (or finish preparing) the pool,
    or take over the pool of the distill run a few-step run starts from."""
    from .checkpoint import PreparationCheckpoints
    from .costs import Estimate
    from .interrupts import catch_signals, restore_signals
    from .progress import progress_bar

    acc = plan.acc
    stop: list = []
    saver = PreparationCheckpoints(plan.out, acc.process_index, {**info, "seed": s["seed"], "processes": acc.num_processes},
                                   every_s=float(s["prep_ckpt_every"]), stop=stop)
    state = saver.latest(warn=lambda m: print(m, file=sys.stderr)) if resume else None
    if acc.is_main_process:
        _announce(plan, s)
        if state is not None:
            print(f"resuming the pool preparation: {int(state['prep_done']):,} of {plan.size:,} entries were prepared",
                  file=sys.stderr)
    if plan.inherit_from is not None and state is None:
        from .checkpoint import saved_pool

        inherited = saved_pool(plan.inherit_from, acc.process_index)
        if inherited is not None:
            pool.load_state_dict(inherited)
            pool.teacher_calls = pool.prep_calls = 0  # this run's count starts here
            return
        print(f"{plan.inherit_from}'s checkpoints are unreadable: preparing a pool", file=sys.stderr)
    estimate = Estimate(plan.prep, plan.cfg.steps * int(s["batch"]), acc.is_main_process)
    previous = catch_signals(stop)  # Ctrl-C: save after the chunk in flight, then stop
    try:
        with progress_bar(plan.prep, "pool", unit="teacher sample-step", unit_scale=True,
                          disable=not progress or plan.prep == 0 or not acc.is_main_process) as bar:
            pool.prepare(chunk=plan.prep_batch, progress=bar, resume=state,
                         on_chunk=lambda st: (estimate(pool.prep_calls), saver(st)))
        if stop:  # the signal came in the last chunk: keep the whole pool
            saver.interrupt(pool.preparation_state())
    finally:
        restore_signals(previous)


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


def _distill_reference(s: dict, teacher, device):
    """What the run is scored against (--eval-every, the report) and the built-in data set the student
    records: the teacher's data set; a built-in one named by --reference; or, with
    --inception-weights, the user's RGB reference (ADM batch, statistics or image folder)."""
    data_name = teacher.extra.get("data")
    if s["inception_weights"]:
        from .evaluation import reference_for
        from .metrics.inception import check_rgb, check_weights

        check_weights(s["inception_weights"])
        if teacher.decoder is None:
            check_rgb(teacher.sample_shape)
        if not s["reference"]:
            raise DkdmError("--inception-weights scores against a reference you supply: --reference REF.npz (an ADM "
                            "reference batch or statistics) or a folder of images")
        return reference_for(s["reference"], s["inception_weights"], device), data_name
    if s["reference"]:
        from .evaluation import check_reference

        check_reference(s["reference"], None if teacher.decoder is not None else teacher.sample_shape)
        return s["reference"], s["reference"]
    return data_name, data_name


#: A student update's cost in forward passes of the student (forward, then a backward of about two).
UPDATE_PASSES = 3


def _report_size(s: dict, reference, teacher, run_cost: int):
    """The end-of-run report's samples and steps (``evaluation.report_size``): a quick try gets a
    quick report, sized to the run's own network passes where --eval-num / --eval-steps are
    not given. An Inception reference the user supplies keeps its full size (its FID is only
    comparable at the count and steps the user asked for). Sized values go into the settings, so
    run.json says what the report drew."""
    from .evaluation import report_size

    budget = run_cost if reference is None or isinstance(reference, str) else None
    size = report_size(reference, None if s["eval_num"] is None else int(s["eval_num"]),
                       None if s["eval_steps"] is None else int(s["eval_steps"]), teacher.schedule.num_steps,
                       teacher.sample_shape, budget)
    if size.sized:
        s["eval_num"], s["eval_steps"] = size.num, size.steps
    return size


def _trackers(s: dict) -> tuple[list[str], Path | None]:
    """--report-to's trackers (checked before anything is loaded, as --push-to-hub's repo id) and
    where their files go."""
    from .tracking import TRACKING_DIR, parse

    if s.get("push_to_hub"):
        from .formats.hub import check_repo_id

        check_repo_id(s["push_to_hub"])
    return parse(s["report_to"]), Path(s["out"]) / TRACKING_DIR if s.get("out") else None


def _default_out(command: str) -> str:
    import time

    return str(Path("dkdm-runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _check_out(s: dict) -> Path:
    if not s.get("out"):
        raise DkdmError("--out DIR is required: the run directory to create")
    out = Path(s["out"])
    if out.exists() and not out.is_dir():
        raise DkdmError(f"--out {out} is a file; choose a directory path")
    from .checkpoint import has_preparation, list_checkpoints
    from .runlock import LOCK

    others = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    is_run = (out / RUN_JSON).is_file() or bool(list_checkpoints(out / CHECKPOINTS)) or has_preparation(out)
    if s.get("resume"):
        if not out.exists():
            raise DkdmError(f"--resume: {out} has no checkpoint to resume from (it does not exist); drop --resume to "
                            f"start a new run there")
        if not is_run:
            raise DkdmError(f"--resume: {out} holds no dkdm run (no run.json, checkpoints/ or preparation/, but "
                            f"{_names(others)}); name the run directory with --out")
    elif others:
        if is_run:
            raise DkdmError(f"--out {out} already holds a run; pass --resume to continue it or choose another directory")
        raise DkdmError(f"--out {out} is not empty ({_names(others)}) and holds no dkdm run; choose a new or empty "
                        f"directory")
    return out


def _names(names: list[str]) -> str:
    return "nothing" if not names else ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _train_config(s: dict, fixed_default: int | None = None, objective: str = "dkdm"):
    """The loop's settings; ``--steps auto`` trains up to --max-steps (default 4x ``fixed_default``)
    and evaluates every --eval-every steps (default: a 20th of the fixed default budget)."""
    from .trainer import TrainConfig

    if s["steps"] == "auto":
        if fixed_default is None:
            raise DkdmError("--steps auto needs a teacher (it watches the held-out error and data-free score of "
                            "`dkdm distill`); give train a number of steps")
        s["max_steps"] = int(s["max_steps"] or 4 * fixed_default)
        s["eval_every"] = int(s["eval_every"] or max(1, fixed_default // 20))
        s["patience"] = int(4 if s["patience"] is None else s["patience"])
        if s["patience"] < 1 or s["max_steps"] < 1:
            raise DkdmError(f"--patience and --max-steps must be at least 1, got {s['patience']} and {s['max_steps']}")
    else:
        for key in ("max_steps", "patience"):
            if s.get(key) is not None:
                raise DkdmError(f"--{key.replace('_', '-')} goes with --steps auto; with a fixed --steps it has no effect")
    cfg = TrainConfig(
        steps=int(s["max_steps"] if s["steps"] == "auto" else s["steps"]), lr=float(s["lr"]),
        weight_decay=float(s["weight_decay"]),
        ema_decay=float(s["ema"]), grad_clip=float(s["grad_clip"]), warmup=int(s["warmup"]), lr_decay=s["lr_decay"],
        mixed_precision=s["mixed_precision"], log_every=int(s["log_every"]), ckpt_every=int(s["ckpt_every"]),
        keep_checkpoints=int(s["keep_checkpoints"]), vlb_weight=float(s["vlb_weight"]),
        simple_weight=float(s["simple_weight"]), vlb_mean_grad=bool(s["vlb_mean_grad"]),
        compile=bool(s["compile"]), channels_last=bool(s["channels_last"]), cuda_graphs=bool(s["cuda_graphs"]),
        objective=objective,
    )
    cfg.validate()
    checked_batch(s["batch"])
    return cfg


def _monitor_config(s: dict):
    """The settings of --eval-every / --steps auto, checked (None: the run is not watched)."""
    if s.get("eval_every") is None:
        return None
    from .monitor import MonitorConfig

    config = MonitorConfig(every=int(s["eval_every"]), num=int(s["monitor_num"]),
                           steps=None if s["monitor_steps"] is None else int(s["monitor_steps"]),
                           heldout=int(s.get("heldout") or 0), seed=int(s["seed"]),
                           patience=int(s["patience"] or 0))
    config.validate()
    return config


def _monitor(config, trainer, teacher=None, pool=None, reference=None, guidance: float = 1.0, progress=True):
    """The --eval-every / --steps auto callback of a run, or None."""
    if config is None:
        return None
    from .monitor import Monitor

    return Monitor(trainer.student, trainer.out, config, trainer.cfg.steps, teacher=teacher, pool=pool,
                   accelerator=trainer.accelerator,
                   reference=reference, vlb_weight=trainer.cfg.vlb_weight, guidance=guidance,
                   device=trainer.accelerator.device, progress=progress)


def _run(trainer, s: dict, out: Path, progress: bool, prepare=None, teacher=None, monitor=None, reference=None) -> None:
    """``_run_locked`` holding the run directory's lock (one run per directory)."""
    from .runlock import RunLock

    acc = trainer.accelerator
    lock, created, error = RunLock(out), not out.exists(), ""
    if acc.is_main_process:
        try:
            lock.acquire()
        except DkdmError as e:
            error = str(e)
    if acc.num_processes > 1:  # every process stops if the main one could not take the lock
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error:
        raise DkdmError(error)
    try:
        return _run_locked(trainer, s, out, progress, prepare, teacher, monitor, reference)
    finally:
        lock.release()
        if created and acc.is_main_process and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no directory behind


def _run_locked(trainer, s: dict, out: Path, progress: bool, prepare=None, teacher=None, monitor=None, reference=None) -> None:
    """Resume or start (optionally preparing the pool first, then checkpointing it), train, report
    (against ``reference``, default: the data set the student records)."""
    acc = trainer.accelerator
    acc.wait_for_everyone()  # every process has checked --out before the main one writes into it
    if monitor is not None and acc.is_main_process:
        print(monitor.cost(), file=sys.stderr)
    from .checkpoint import list_checkpoints

    if s.get("resume") and list_checkpoints(trainer.ckpt_dir):
        _resume(trainer, s, out, monitor)
    else:
        _start(trainer, s, out, prepare, monitor)
    if monitor is not None:
        trainer.callbacks.append(monitor)
    from .tracking import finish, start

    start(acc, s)
    try:
        last = trainer.train()
    finally:
        finish(acc)
    if not acc.is_main_process:
        return None
    return _finish(trainer, s, out, last, progress, teacher, monitor, reference)


def _resume(trainer, s: dict, out: Path, monitor) -> None:
    """A stopped run back at its last checkpoint, with what a resumed run may change saved."""
    from .checkpoint import drop_preparation

    acc = trainer.accelerator
    step = trainer.resume()
    if acc.is_main_process:
        _write_settings(out, s, acc.num_processes)  # with what a resumed run may change (e.g. --steps)
        drop_preparation(out)  # left by a run killed between its first checkpoint and dropping it
        print(f"resuming {out} from step {step}", file=sys.stderr)
        if monitor is not None and monitor.setup(resume=True):
            trainer.cfg.steps = step  # the rule had already stopped the run at its last checkpoint


def _start(trainer, s: dict, out: Path, prepare, monitor) -> None:
    """A new run (or one stopped before its first checkpoint): its settings saved, the pool prepared,
    the first checkpoint written (it holds the prepared pool)."""
    import torch

    from .checkpoint import drop_preparation, has_preparation
    from .runlock import check_free_space

    acc = trainer.accelerator
    main = acc.is_main_process
    if prepare is not None:
        check_free_space(out, 2 * trainer.checkpoint_bytes(), "the pool's preparation and first checkpoints")
    if main:  # before the preparation, so that a run stopped while preparing resumes from its settings
        if s.get("resume") and not has_preparation(out):
            print(f"{out} was stopped before it saved anything: starting it afresh with its settings", file=sys.stderr)
        _write_settings(out, s, acc.num_processes)
    if prepare is not None:
        try:
            prepare(bool(s.get("resume")))
        except DkdmError:  # a refused run leaves nothing behind (an interrupted one its settings)
            if main and not s.get("resume") and not has_preparation(out):
                (out / RUN_JSON).unlink(missing_ok=True)
            raise
    if main and monitor is not None:
        monitor.setup()
    torch.manual_seed(int(s["seed"]) + 1)
    acc.wait_for_everyone()
    trainer.save()
    if main:  # the first checkpoint holds the prepared pool
        drop_preparation(out)


def _finish(trainer, s: dict, out: Path, last, progress: bool, teacher, monitor, reference) -> dict:
    """After training, on the main process: the curves, the report, the model card, the push."""
    import copy

    from .evaluation import write_report
    from .formats import load_model, resolve_model_dir
    from .formats.hub import push, write_model_card
    from .monitor import plot_run
    from .objects import is_object_reference
    from .students import count_parameters

    result = {"out": out, "last": last, "stop_reason": trainer.stop_reason, "report": None}
    if monitor is not None or not s.get("no_report"):  # the curves, the last line included (dkdm report redraws)
        plot_run(out, monitor.stop_step if monitor is not None else None)
    if trainer.stop_reason:
        print(f"stopped at step {trainer.step}: {trainer.stop_reason}", file=sys.stderr)
    reference = reference if reference is not None else trainer.student.extra.get("data")
    if (reference or teacher is not None) and not s.get("no_report"):
        custom = trainer.student.spec is None  # a network given as an object: load its weights into a copy
        model = load_model(out, device=trainer.accelerator.device,
                           net=copy.deepcopy(trainer.student.net) if custom else None)
        heldout = {k: v for k, v in monitor.last.items() if k.startswith("heldout_")} if monitor else None
        teacher_dir = None if is_object_reference(s.get("teacher")) else s.get("teacher") and resolve_model_dir(s["teacher"])
        result["report"] = write_report(out, model, reference, teacher=teacher, teacher_dir=teacher_dir,
                                        seed=int(s["seed"]), progress=progress, num=s["eval_num"],
                                        steps=s["eval_steps"], guidance=float(s.get("guidance") or 1.0), heldout=heldout)
    write_model_card(out, count_parameters(teacher.net) if teacher is not None else None)
    written = [f for f in ("metrics.json", "samples.png", "training.png", "stop.json", "README.md") if (out / f).exists()]
    print(f"run directory: {out} ({', '.join(written)})", file=sys.stderr)
    if s.get("push_to_hub"):
        print(f"pushed to {push(out, s['push_to_hub'])}", file=sys.stderr)
    return result


def _write_settings(out: Path, s: dict, processes: int) -> None:
    """RUN/run.json: the settings (every rule applied), which command ran them and on how many processes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_JSON).write_text(json.dumps({**s, "command": command_of(s), "processes": processes}, indent=1,
                                             default=str))


def _rank_seed(s: dict, acc) -> int:
    """Each process draws its own batches (its own pool shard): the seed is offset by the rank.
    Rank 0 keeps the run's seed, so a single process reproduces earlier runs."""
    return int(s["seed"]) + 100003 * acc.process_index


def teacher_reference(teacher) -> str:
    """How a run records its teacher: builtin names and Hub ids as given, paths made absolute."""
    from .formats.pipelines import looks_like_hub_id

    from .objects import is_object_reference

    text = str(teacher)
    if text.startswith("builtin:") or looks_like_hub_id(text) or is_object_reference(text):
        return text
    return str(Path(text).resolve())
