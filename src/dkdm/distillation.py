"""A distillation's plan and its pool, before the loop: the teacher loaded (or given as an object),
the student chosen, the settings the rules leave decided, the pool sized, costed and prepared (or
taken over from the distill run a few-step run starts from), and the plan announced before any of
it is spent. ``distillation`` runs the named steps; ``runloop.run`` trains and reports."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DkdmError
from .announcement import announce
from .layout import CHECKPOINTS, RUN_JSON
from .rundir import check_out, default_out, run_json, saved_setting, teacher_reference
from .runloop import make_monitor, monitor_config, rank_seed, run, trackers, train_config
from .settings import DISTILL_RULED, DistillSettings

#: What a DKDM run's pool must share with a few-step run's for the latter to take it over.
POOL_SETTINGS = ("pool", "batch", "rho", "pool_dtype", "guidance", "prep", "prep_steps")


#: A student update's cost in forward passes of the student (forward, then a backward of about two).
UPDATE_PASSES = 3


@dataclass
class _Plan:
    """What a distillation decided before it spends anything: the models, the settings the rules
    gave (``ruled``, also written into the settings), the loop's and monitor's configs, the pool's
    size, memory and preparation cost, the pool a few-step run takes over, and the report's size."""
    few: bool
    matching: bool
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


def distillation(s: DistillSettings, progress: bool, objects: dict | None = None) -> dict | None:
    """A distillation from merged settings: DKDM (``distill``), or consistency (``fewstep``);
    ``objects``: a teacher or student given as an object (``objects.take_objects``). The named
    steps: plan (models, settings, pool), announce, prepare the pool, train, report (``run``)."""
    from .pool import KnowledgePool
    from .trainer import Trainer

    plan = _plan(s, objects or {})
    acc, teacher = plan.acc, plan.teacher
    if s.dry_run:  # the plan, and no pool allocated, nothing written
        if acc.is_main_process:
            announce(plan, s)
            print(f"dry run: stopped before {'training' if plan.matching else 'preparing the pool'}", file=sys.stderr)
        return {"out": plan.out, "last": None, "stop_reason": "dry run", "report": None}
    if plan.matching:  # no pool: the generator's own samples, judged by the teacher and a fake score
        return _matching(plan, s, progress)
    pool = KnowledgePool(teacher, s.batch, s.pool, s.rho, s.pool_dtype,
                         seed=rank_seed(s, acc), device=acc.device, preparation=s.prep, prep_steps=s.prep_steps,
                         guidance=s.guidance)
    info = {"student": plan.student.describe(), "source": pool.describe(), "teacher": plan.teacher_ref}
    trainer = Trainer(plan.student, pool, plan.cfg, plan.out, info, progress=progress, accelerator=acc)
    monitor = make_monitor(plan.watch, trainer, teacher, pool, plan.reference, s.guidance, progress=progress)
    return run(trainer, s, plan.out, progress, lambda resume: _prepare(plan, s, pool, info, resume, progress),
                teacher=teacher, monitor=monitor, reference=plan.reference)


def _fake_score(s: DistillSettings, teacher):
    """Matching's fake score: a float32 trainable copy of the DKDM student, or of the teacher (``--fake-from``),
    loaded afresh: the run's teacher may hold weights rounded to --teacher-dtype, or compiled regions."""
    from .formats import load_model
    from .objects import is_object_reference

    if s.fake_from == "student":
        return load_model(s.student, role="student").float()
    if not is_object_reference(s.teacher):
        return load_model(s.teacher, role="teacher", config=s.teacher_config).float()
    fake = copy.deepcopy(teacher).set_inference_dtype("float32")  # a Python object: as the run holds it
    fake.net.requires_grad_(True)
    return fake


def _matching(plan: "_Plan", s: DistillSettings, progress: bool) -> dict | None:
    """A few-step run by distribution matching: the fake score a second copy of the DKDM student (or of
    the teacher: ``_fake_score``), the generator's inputs its own (``matching.MatchingSource``); nothing
    to prepare."""
    from .matching import MatchingSource
    from .trainer import Trainer

    acc = plan.acc
    fake = _fake_score(s, plan.teacher)
    source = MatchingSource(plan.student, plan.teacher, fake, s.batch, s.fake_lr or plan.cfg.lr, device=acc.device,
                            seed=rank_seed(s, acc), fake_updates=s.fake_updates)
    info = {"student": plan.student.describe(), "source": source.describe(), "teacher": plan.teacher_ref}
    trainer = Trainer(plan.student, source, plan.cfg, plan.out, info, progress=progress, accelerator=acc)

    def start(resume: bool) -> None:  # nothing to prepare: the plan is announced
        if acc.is_main_process:
            announce(plan, s)

    monitor = make_monitor(plan.watch, trainer, plan.teacher, None, plan.reference, s.guidance, progress=progress)
    return run(trainer, s, plan.out, progress, start, teacher=plan.teacher, monitor=monitor, reference=plan.reference)


def _plan(s: DistillSettings, objects: dict) -> _Plan:
    """Load the teacher, choose the student, decide the settings and plan the pool and the report."""
    import torch

    from .devices import make_accelerator

    few = s.command == "fewstep"
    s.out = s.out or default_out("fewstep" if few else "distill")
    acc = make_accelerator(s.mixed_precision, *trackers(s))
    teacher = _teacher(s, acc.device, objects.get("teacher"))
    reference, data_name = _distill_reference(s, teacher, acc.device)
    teacher_ref = teacher_reference(s.teacher)
    if s.student_steps is not None:
        # the pool runs the teacher on the student's steps, so every batch is a step the student takes
        teacher = teacher.respaced(s.student_steps)
    torch.manual_seed(s.seed)
    start = _fewstep_start(s, teacher) if few else None
    objective = _fewstep_objective(s, start) if few else None
    matching = few and s.fewstep_objective == "matching"
    fake_from = _fake_from(s, start) if matching else None
    student = _few_step_student(s, start, teacher) if few else _student(s, teacher, data_name, teacher_ref,
                                                                          objects.get("student"))
    ruled, cfg = _decide_settings(s, teacher, student, few)
    ruled = {**({"fewstep_objective": objective} if objective else {}),
             **({"fake_from": fake_from} if fake_from else {}), **ruled}
    watch = monitor_config(s)
    if matching:  # no pool: the generator draws its own samples
        check_out(s)
        size, mem, prep, prep_batch, inherit_from, inherit_note = 0, 0, 0, 0, None, ""
    else:
        size, mem, prep, prep_batch = _plan_pool(s, teacher, cfg, acc, few)
        inherit_from, inherit_note = _reusable_pool(s, teacher_ref, acc) if few else (None, "")
    # a few-step student's report costs little (K steps), its teacher's is most often cached by its distill run;
    # the run's own cost in network passes per sample: the teacher's (preparation, one per trained sample)
    # and the student's updates (forward and backward, about three forwards each)
    run_cost = prep + cfg.steps * s.batch * (1 + UPDATE_PASSES)
    report = _report_size(s, reference, teacher, None if few else run_cost)
    return _Plan(few, matching, acc, teacher, student, teacher_ref, reference, ruled, cfg, watch, Path(s.out), size, mem,
                 prep, prep_batch, inherit_from, inherit_note, report)


def _fewstep_objective(s: DistillSettings, start):
    """The few-step objective the rules give for the DKDM student ``start`` where --fewstep-objective
    is not given (written into ``s``), or None."""
    from .defaults import fewstep_objective
    from .students import family_of

    if s.fewstep_objective is not None:
        return None
    rule = fewstep_objective(s.sampler_steps, family_of(start.spec))
    s.fewstep_objective = rule.value
    return rule


def _fake_from(s: DistillSettings, start):
    """Where matching's fake score starts by the rules where --fake-from is not given (written into
    ``s``), or None. A run resumed from before the flag existed had the student's copy."""
    from .defaults import Setting, fake_score_from
    from .students import family_of

    if s.fake_from is not None:
        return None
    rule = Setting("student", "the run began before --fake-from") if s.resume else \
        fake_score_from(family_of(start.spec), s.sampler_steps)
    s.fake_from = rule.value
    return rule


def _teacher(s: DistillSettings, device, given=None):
    """The run's teacher (``given``, else loaded from ``s.teacher``), frozen, at the run's
    inference dtype, memory layout and compilation."""
    import torch

    from .formats import load_model
    from .objects import is_object_reference

    if given is not None:
        teacher = given.to(device)
    elif is_object_reference(s.teacher):
        raise DkdmError(f"this run's teacher was a Python object ({s.teacher}): resume it from Python with the same "
                        f"teacher, dkdm.distill(teacher=model, out={str(s.out)!r}, resume=True)")
    else:
        teacher = load_model(s.teacher, device=device, role="teacher", config=s.teacher_config)
    teacher.requires_grad_(False)
    teacher.set_inference_dtype(s.teacher_dtype)
    if s.channels_last:
        teacher.net.to(memory_format=torch.channels_last)
    if s.compile:
        from .compiling import compile_regions

        compile_regions(teacher.net)
    return teacher


def _student(s: DistillSettings, teacher, data_name, teacher_ref: str, given=None):
    """The run's fresh student (distill): the object ``given``, or the spec ``s.student`` names
    (default: the teacher's family at half width)."""
    from .model import DiffusionModel
    from .objects import is_object_reference, student_from_object

    if given is not None:
        student = student_from_object(given, teacher)
        student.extra.update({"data": data_name, "teacher": teacher_ref})
        return student
    if is_object_reference(s.student):
        raise DkdmError(f"this run's student was a Python object ({s.student}): resume it from Python with a "
                        f"network of the same class, dkdm.distill(..., student=net, out={str(s.out)!r}, resume=True)")
    return DiffusionModel.student_of(teacher, s.student, variance=s.variance,
                                     extra={"data": data_name, "teacher": teacher_ref})


def _fewstep_start(s: DistillSettings, teacher):
    """The DKDM student ``s.student`` names (a few-step run starts from it), checked against the teacher."""
    from .formats import load_model

    start = load_model(s.student, role="student")
    if tuple(start.sample_shape) != tuple(teacher.sample_shape) or start.schedule.num_steps != teacher.schedule.num_steps:
        raise DkdmError(f"--student {s.student} models samples of shape {list(start.sample_shape)} over "
                        f"{start.schedule.num_steps} steps, the teacher {list(teacher.sample_shape)} over "
                        f"{teacher.schedule.num_steps}: start from a student of this teacher")
    return start


def _few_step_student(s: DistillSettings, start, teacher):
    """The DKDM student ``start`` as a few-step student of ``s.sampler_steps`` steps (a consistency
    student, or a distribution-matching generator)."""
    from .model import DiffusionModel

    if s.fewstep_objective == "matching":
        return _generator(s, start, teacher)
    given = [flag for flag, v in (("--fake-lr", s.fake_lr), ("--fake-updates", s.fake_updates != 1),
                                  ("--fake-from", s.fake_from)) if v]
    if given:
        raise DkdmError(f"{' and '.join(given)} belong{'s' if len(given) == 1 else ''} to --fewstep-objective "
                        f"matching (its fake score); a consistency student has none")
    return DiffusionModel.few_step_of(start, s.sampler_steps, s.fewstep_prediction, s.consistency_grid)


def _generator(s: DistillSettings, start, teacher):
    """The DKDM student ``start`` as a distribution-matching generator of ``s.sampler_steps`` steps."""
    from .matching import generator_schedule
    from .model import DiffusionModel

    if s.consistency_grid is not None or s.fewstep_prediction != "v_prediction":
        raise DkdmError("--consistency-grid and --fewstep-prediction belong to --fewstep-objective consistency; "
                        "a matching generator predicts epsilon on its own timesteps")
    if start.num_classes or teacher.num_classes:
        raise DkdmError("--fewstep-objective matching makes unconditional generators; for a class-conditional "
                        "teacher use --fewstep-objective consistency")
    schedule = generator_schedule(teacher.schedule)
    if not 1 <= s.sampler_steps <= schedule.num_steps:
        raise DkdmError(f"--sampler-steps must be in 1..{schedule.num_steps}, got {s.sampler_steps}")
    return DiffusionModel.few_step_of(start, s.sampler_steps, "epsilon", schedule.num_steps, schedule,
                                      "matching")


def _decide_settings(s: DistillSettings, teacher, student, few: bool):
    """What flags and --config leave open, from the student and the problem (``defaults``), written
    into ``s``; the settings the rules gave and the loop's config."""
    from .defaults import distill_defaults, fewstep_defaults, run_budget
    from .students import count_parameters, family_of

    rules = fewstep_defaults if few else distill_defaults
    family = family_of(student.spec)
    objective = s.fewstep_objective if few else "dkdm"
    extra = {"objective": objective, "sampler_steps": s.sampler_steps} if few else {}
    ruled = rules(count_parameters(student.net), teacher.sample_shape, teacher.schedule.num_steps,
                  {k: getattr(s, k) for k in DISTILL_RULED}, family, **extra)
    s.update({k: v.value for k, v in ruled.items()})
    budget = run_budget(teacher.schedule.num_steps, teacher.sample_shape, s.batch, family, objective)
    return ruled, train_config(s, fixed_default=budget, objective=objective)


def _plan_pool(s: DistillSettings, teacher, cfg, acc, few: bool) -> tuple[int, int, int, int]:
    """The pool's entries, bytes, preparation cost (teacher sample-steps) and preparation batch;
    the preparation (``--prep auto``) and its steps resolved into ``s``; the run directory checked."""
    from .costs import check_pool_fits
    from .defaults import PREP_STEPS
    from .pool import pool_memory_bytes, pool_size, preparation_cost
    from .choices import PREPARATIONS
    from .preparation import preparation_batch, resolve_preparation

    size = pool_size(s.pool, s.rho, teacher.schedule.num_steps, s.batch)
    check_out(s)
    T = teacher.schedule.num_steps
    if s.prep_steps is None:  # PREP_STEPS sampling steps, or all of a shorter process
        s.prep_steps = min(PREP_STEPS, T)
    mem = pool_memory_bytes(size, teacher.sample_shape, s.pool_dtype)
    if few and s.prep == "auto":  # as the distill run resolved it, so that its pool can be taken over
        saved = saved_setting(s.student, "prep", "auto")  # an older dkdm's name: "auto" (no takeover)
        s.prep = saved if saved in PREPARATIONS else "auto"
    s.prep = resolve_preparation(s.prep, T, s.prep_steps, size, cfg.steps * s.batch)
    prep_batch = preparation_batch(s.prep_batch, acc.device)
    prep = preparation_cost(s.pool, size, T, s.prep, s.prep_steps)
    check_pool_fits(mem, size, teacher.sample_shape, s, acc.device)
    return size, mem, prep, prep_batch


def _reusable_pool(s: DistillSettings, teacher_ref: str, acc) -> tuple[Path | None, str]:
    """The DKDM run (``--student RUN``) whose pool a few-step run takes over, so it spends no teacher
    steps preparing one, and a line saying so; (None, why not) where the run's teacher or pool
    settings differ or it kept no checkpoint. The pool itself is read when the run starts
    (``checkpoint.saved_pool``), not for a dry run or a resumed one."""
    from .checkpoint import list_checkpoints

    run = Path(s.student) / RUN_JSON
    if not run.is_file():
        return None, "preparing a pool (--student is a model directory, not a distill run)"
    saved = run_json(run.parent)
    if saved is None:
        return None, f"preparing a pool ({run} is unreadable)"
    differ = [k for k in POOL_SETTINGS if str(saved.get(k)) != str(getattr(s, k))]
    if saved.get("teacher") is None or teacher_reference(saved["teacher"]) != teacher_ref:
        differ.insert(0, "teacher")
    if int(saved.get("processes", 1)) != acc.num_processes:
        differ.append("processes")
    if differ:
        return None, f"preparing a pool (the run's {', '.join(differ)} differ from this one's)"
    if not list_checkpoints(Path(s.student) / CHECKPOINTS):
        return None, "preparing a pool (the run kept no checkpoint)"
    return Path(s.student), f"pool: taken over from {s.student}'s last checkpoint (the same teacher and pool settings)"


def _distill_reference(s: DistillSettings, teacher, device):
    """What the run is scored against (--eval-every, the report) and the built-in data set the student
    records: the teacher's data set; a built-in one named by --reference; or, with
    --inception-weights, the user's RGB reference (ADM batch, statistics or image folder)."""
    data_name = teacher.extra.get("data")
    if s.inception_weights:
        from .evaluation import reference_for
        from .metrics.inception import check_rgb, check_weights

        check_weights(s.inception_weights)
        if teacher.decoder is None:
            check_rgb(teacher.sample_shape)
        if not s.reference:
            raise DkdmError("--inception-weights scores against a reference you supply: --reference REF.npz (an ADM "
                            "reference batch or statistics) or a folder of images")
        return reference_for(s.reference, s.inception_weights, device), data_name
    if s.reference:
        from .evaluation import check_reference

        check_reference(s.reference, None if teacher.decoder is not None else teacher.sample_shape)
        return s.reference, s.reference
    return data_name, data_name


def _report_size(s: DistillSettings, reference, teacher, run_cost: int):
    """The end-of-run report's samples and steps (``evaluation.report_size``): a quick try gets a
    quick report, sized to the run's own network passes where --eval-num / --eval-steps are
    not given. An Inception reference the user supplies keeps its full size (its FID is only
    comparable at the count and steps the user asked for). Sized values go into the settings, so
    run.json says what the report drew."""
    from .evaluation import report_size

    budget = run_cost if reference is None or isinstance(reference, str) else None
    size = report_size(reference, s.eval_num, s.eval_steps, teacher.schedule.num_steps,
                       teacher.sample_shape, budget)
    if size.sized:
        s.eval_num, s.eval_steps = size.num, size.steps
    return size


def _prepare(plan: _Plan, s: DistillSettings, pool, info: dict, resume: bool, progress: bool) -> None:
    """A new run, or one stopped while preparing: announce it, prepare (or finish preparing) the pool,
    or take over the pool of the distill run a few-step run starts from."""
    from .checkpoint import PreparationCheckpoints
    from .costs import Estimate
    from .interrupts import catch_signals, restore_signals
    from .progress import progress_bar

    acc = plan.acc
    stop: list = []
    saver = PreparationCheckpoints(plan.out, acc.process_index, {**info, "seed": s.seed, "processes": acc.num_processes},
                                   every_s=s.prep_ckpt_every, stop=stop)
    state = saver.latest(warn=lambda m: print(m, file=sys.stderr)) if resume else None
    if acc.is_main_process:
        announce(plan, s)
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
    estimate = Estimate(plan.prep, plan.cfg.steps * s.batch, acc.is_main_process)
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
