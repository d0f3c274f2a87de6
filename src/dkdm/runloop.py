"""A run once its trainer is built: the run directory locked, a new run started (its pool prepared
and checkpointed at step 0) or a stopped one resumed, the training, then the curves, the report,
the model card and the push; and the loop's and the monitor's configs from a run's settings."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import DkdmError
from .layout import RUN_JSON
from .rundir import write_settings
from .settings import RunSettings

def trackers(s: RunSettings) -> tuple[list[str], Path | None]:
    """--report-to's trackers (checked before anything is loaded, as --push-to-hub's repo id) and
    where their files go."""
    from .tracking import TRACKING_DIR, parse

    if s.push_to_hub:
        from .formats.hub import check_repo_id

        check_repo_id(s.push_to_hub)
    return parse(s.report_to), Path(s.out) / TRACKING_DIR if s.out else None


def rank_seed(s: RunSettings, acc) -> int:
    """Each process draws its own batches (its own pool shard): the seed is offset by the rank.
    Rank 0 keeps the run's seed, so a single process reproduces earlier runs."""
    return s.seed + 100003 * acc.process_index


def train_config(s: RunSettings, fixed_default: int | None = None, objective: str = "dkdm"):
    """The loop's settings; ``--steps auto`` trains up to --max-steps (default 4x ``fixed_default``)
    and evaluates every --eval-every steps (default: a 20th of the fixed default budget)."""
    from dataclasses import fields

    from .train_config import TrainConfig

    if s.steps == "auto":
        if fixed_default is None:
            raise DkdmError("--steps auto needs a teacher (it watches the held-out error and data-free score of "
                            "`dkdm distill`); give train a number of steps")
        s.max_steps = s.max_steps or 4 * fixed_default
        s.eval_every = s.eval_every or max(1, fixed_default // 20)
        s.patience = 4 if s.patience is None else s.patience
        if s.patience < 1 or s.max_steps < 1:
            raise DkdmError(f"--patience and --max-steps must be at least 1, got {s.patience} and {s.max_steps}")
    else:
        for key in ("max_steps", "patience"):
            if getattr(s, key) is not None:
                raise DkdmError(f"--{key.replace('_', '-')} goes with --steps auto; with a fixed --steps it has no effect")
    # the loop's config is the run's settings of the same names (TrainConfig's ema_decay: --ema), its
    # steps resolved (--steps auto: up to --max-steps) and the objective the command trains
    resolved = {"steps": s.max_steps if s.steps == "auto" else s.steps, "ema_decay": s.ema, "objective": objective}
    cfg = TrainConfig(**{f.name: resolved[f.name] if f.name in resolved else getattr(s, f.name) for f in fields(TrainConfig)})
    cfg.validate()
    return cfg


def monitor_config(s: RunSettings):
    """The settings of --eval-every / --steps auto, checked (None: the run is not watched)."""
    if s.eval_every is None:
        return None
    from .monitor import MonitorConfig

    config = MonitorConfig(every=s.eval_every, num=s.monitor_num, steps=s.monitor_steps,
                           heldout=getattr(s, "heldout", 0), seed=s.seed, patience=s.patience or 0)
    config.validate()
    return config


def make_monitor(config, trainer, teacher=None, pool=None, reference=None, guidance: float = 1.0, progress=True):
    """The --eval-every / --steps auto callback of a run, or None."""
    if config is None:
        return None
    from .monitor import Monitor

    if trainer.student.sampler_steps:  # a few-step student: its K-step samples alone (the DKDM terms are not its loss)
        pool = None
    return Monitor(trainer.student, trainer.out, config, trainer.cfg.steps, teacher=teacher, pool=pool,
                   accelerator=trainer.accelerator,
                   reference=reference, vlb_weight=trainer.cfg.vlb_weight, guidance=guidance,
                   device=trainer.accelerator.device, progress=progress)


def run(trainer, s: RunSettings, out: Path, progress: bool, prepare=None, teacher=None, monitor=None, reference=None) -> None:
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


def _run_locked(trainer, s: RunSettings, out: Path, progress: bool, prepare=None, teacher=None, monitor=None, reference=None) -> None:
    """Resume or start (optionally preparing the pool first, then checkpointing it), train, report
    (against ``reference``, default: the data set the student records)."""
    acc = trainer.accelerator
    acc.wait_for_everyone()  # every process has checked --out before the main one writes into it
    if monitor is not None and acc.is_main_process:
        print(monitor.cost(), file=sys.stderr)
    from .checkpoint import list_checkpoints

    if s.resume and list_checkpoints(trainer.ckpt_dir):
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


def _resume(trainer, s: RunSettings, out: Path, monitor) -> None:
    """A stopped run back at its last checkpoint, with what a resumed run may change saved."""
    from .checkpoint import drop_preparation

    acc = trainer.accelerator
    step = trainer.resume()
    if acc.is_main_process:
        write_settings(out, s, acc.num_processes)  # with what a resumed run may change (e.g. --steps)
        drop_preparation(out)  # left by a run killed between its first checkpoint and dropping it
        print(f"resuming {out} from step {step}", file=sys.stderr)
        if monitor is not None and monitor.setup(resume=True):
            trainer.cfg.steps = step  # the rule had already stopped the run at its last checkpoint


def _start(trainer, s: RunSettings, out: Path, prepare, monitor) -> None:
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
        if s.resume and not has_preparation(out):
            print(f"{out} was stopped before it saved anything: starting it afresh with its settings", file=sys.stderr)
        write_settings(out, s, acc.num_processes)
    if prepare is not None:
        try:
            prepare(s.resume)
        except DkdmError:  # a refused run leaves nothing behind (an interrupted one its settings)
            if main and not s.resume and not has_preparation(out):
                (out / RUN_JSON).unlink(missing_ok=True)
            raise
    if main and monitor is not None:
        monitor.setup()
    torch.manual_seed(s.seed + 1)
    acc.wait_for_everyone()
    trainer.save()
    if main:  # the first checkpoint holds the prepared pool
        drop_preparation(out)


def _finish(trainer, s: RunSettings, out: Path, last, progress: bool, teacher, monitor, reference) -> dict:
    """After training, on the main process: the curves, the report, the model card, the push."""
    import copy

    from .evaluation import write_report
    from .formats import load_model, resolve_model_dir
    from .formats.hub import push, write_model_card
    from .monitor import plot_run
    from .objects import is_object_reference
    from .students import count_parameters

    result = {"out": out, "last": last, "stop_reason": trainer.stop_reason, "report": None}
    if monitor is not None or not s.no_report:  # the curves, the last line included (dkdm report redraws)
        plot_run(out, monitor.stop_step if monitor is not None else None)
    if trainer.stop_reason:
        print(f"stopped at step {trainer.step}: {trainer.stop_reason}", file=sys.stderr)
    reference = reference if reference is not None else trainer.student.extra.get("data")
    if (reference or teacher is not None) and not s.no_report:
        custom = trainer.student.spec is None  # a network given as an object: load its weights into a copy
        model = load_model(out, device=trainer.accelerator.device,
                           net=copy.deepcopy(trainer.student.net) if custom else None)
        heldout = {k: v for k, v in monitor.last.items() if k.startswith("heldout_")} if monitor else None
        teacher_ref = getattr(s, "teacher", None)
        teacher_dir = None if is_object_reference(teacher_ref) else teacher_ref and resolve_model_dir(teacher_ref)
        result["report"] = write_report(out, model, reference, teacher=teacher, teacher_dir=teacher_dir,
                                        seed=s.seed, progress=progress, num=s.eval_num,
                                        steps=s.eval_steps, guidance=getattr(s, "guidance", 1.0), heldout=heldout)
    write_model_card(out, count_parameters(teacher.net) if teacher is not None else None)
    written = [f for f in ("metrics.json", "samples.png", "training.png", "stop.json", "README.md") if (out / f).exists()]
    print(f"run directory: {out} ({', '.join(written)})", file=sys.stderr)
    if s.push_to_hub:
        print(f"pushed to {push(out, s.push_to_hub)}", file=sys.stderr)
    return result
