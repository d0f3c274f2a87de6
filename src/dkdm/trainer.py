"""One training loop for every data source: a knowledge pool (distillation) or a data set.

A source is anything with ``next_batch() -> TrainingBatch``, ``state_dict()`` and
``load_state_dict()``; the loop does not know which kind it has. Devices and mixed precision
come from accelerate.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs

from .checkpoint import (flatten, optimizer_from_flat, optimizer_to_flat, resume_run, rng_state,
                         save_run, set_rng_state, unflatten)
from .devices import adamw, make_accelerator
from .compiling import compile_regions
from .diffusion import Reverse, TrainingBatch
from .ema import EMA
from .errors import DkdmError, TrainingDiverged
from .train_config import TrainConfig, lr_factor  # noqa: F401 (TrainConfig: re-exported with the loop)
from .layout import CHECKPOINTS, LOG_FILE
from .formats import save_model
from .interrupts import Interrupted, catch_signals, restore_signals
from .model import DiffusionModel
from .consistency import consistency_loss, sigma_power, skip_steps, teacher_ode_step
from .matching import generator_x0, matching_loss
from .objective import dkdm_loss
from .progress import progress_bar
from .tracking import append_log
from .peers import PeerLost, check_in_sync, peer_failures, roll_call
from .runlock import check_free_space


def _check_fits(student: DiffusionModel, source) -> None:
    """DkdmError where the student's schedule or classes are not those its batches come with."""
    source_schedule = getattr(source, "schedule", None)
    if source_schedule is not None and not (
        source_schedule.num_steps == student.schedule.num_steps
        and torch.allclose(source_schedule.betas, student.schedule.betas, rtol=1e-9, atol=1e-12)
    ):
        raise DkdmError(
            f"the student's schedule ({student.schedule.describe()}) is not the one its batches come from "
            f"({source_schedule.describe()}): give the student the teacher's schedule, or view the teacher "
            f"on the student's respacing (teacher.respaced(n), --student-steps n); a few-step run: --teacher the "
            f"one its --student was distilled from"
        )
    source_classes = getattr(source, "num_classes", 0)
    if student.num_classes and student.num_classes != source_classes:
        raise DkdmError(
            f"the student conditions on {student.num_classes} classes but its batches carry "
            f"{source_classes or 'no'} class labels; match the teacher's classes or build an unconditional student"
        )


class Trainer:
    """Train ``student`` on ``source``, writing logs, checkpoints and the final model to ``out``."""

    def __init__(self, student: DiffusionModel, source, config: TrainConfig, out, run_info: dict | None = None,
                 progress: bool = True, accelerator: Accelerator | None = None, callbacks=()):
        """``callbacks``: each is called on the main process after a step it is due at (every
        ``callback.every`` steps, default 1, and the last step) as ``callback(step, ema_weights)``;
        a non-empty string it returns stops the run there (checkpoint and model written) and
        becomes ``self.stop_reason``."""
        config.validate()
        _check_fits(student, source)
        self.student = student
        self.source = source
        self.cfg = config
        self.out = Path(out)
        self.run_info = dict(run_info or {})
        self.progress = progress
        self.accelerator = accelerator or make_accelerator(config.mixed_precision)
        self.step = 0
        self.ckpt_dir = self.out / CHECKPOINTS
        self._roll = None
        if self.accelerator.num_processes > 1:
            with self._peer_failures():
                self._roll = roll_call()
        self.callbacks = list(callbacks)
        self.stop_reason: str | None = None
        if config.cuda_graphs:
            config.check_cuda_graphs(self.accelerator.device.type, self.accelerator.num_processes)
        if config.channels_last:
            student.net.to(memory_format=torch.channels_last)
        student.net.to(self.accelerator.device)
        opt = adamw(student.net.parameters(), config.lr, config.weight_decay, self.accelerator.device, config.cuda_graphs,
                    config.adam_betas)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config.warmup, config.lr_decay, config.steps))
        self.net, self.opt, self.lr_sched = self.accelerator.prepare(student.net, opt, sched)
        self._plain_net = self.accelerator.unwrap_model(self.net)
        # compiled in place by regions (compiling.py): state-dict keys stay those of the plain network
        self._regions = compile_regions(self._plain_net) if config.compile else 0
        self._params = list(self.net.parameters())
        self.ema = EMA(self._plain_net, config.ema_decay)
        self._bookkeeping()
        self._graph = None
        if config.cuda_graphs:
            from .cudagraphs import GraphedStep

            self._graph = GraphedStep(self._graphed_update)
            if hasattr(source, "use_cuda_graphs"):
                source.use_cuda_graphs()
        self.log_path = self.out / LOG_FILE

    def _bookkeeping(self) -> None:
        """Per-step records kept on the device, allocated once (a captured update writes into them):
        (mse, vb, count) x quarter of t, summed until the next log line; and the finiteness record
        [all steps finite since the last check (0/1), finite steps since then]."""
        device, T = self.accelerator.device, self.student.schedule.num_steps
        self._sums = torch.zeros(4, 3, dtype=torch.float64, device=device)
        self._finite = torch.tensor([1, 0], dtype=torch.long, device=device)
        self._quarter = torch.arange(T, device=device) * 4 // T
        self._ones: dict[int, torch.Tensor] = {}
        self._check_every: int | None = None

    # the trainer's state (the file format and the ranks' shards: checkpoint.py) ---------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What every process shares, as flat tensors and JSON metadata: the student's weights, the
        EMA, the optimizer's moments, the learning-rate schedule, the config and the run's info."""
        opt_tensors, opt_meta = optimizer_to_flat(self.opt.state_dict())
        tensors = {**flatten("student", self._plain_net.state_dict()), **flatten("ema", self.ema.shadow),
                   **flatten("optim", opt_tensors)}
        meta = {"optimizer": opt_meta, "lr_scheduler": self.lr_sched.state_dict(), "config": asdict(self.cfg),
                "run": self.run_info, "world_size": self.accelerator.num_processes}
        return tensors, meta

    def rank_state_dict(self) -> dict[str, torch.Tensor]:
        """What each process keeps for itself: its source's state (its pool shard) and its RNGs."""
        return {**flatten("source", self.source.state_dict()), **flatten("rng", rng_state())}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Put a saved state back (the shared part and this process's own); the step from ``meta``."""
        self._plain_net.load_state_dict(unflatten("student", tensors))
        self.ema.load_state_dict(unflatten("ema", tensors))
        self.opt.load_state_dict(optimizer_from_flat(unflatten("optim", tensors), meta["optimizer"]))
        self.lr_sched.load_state_dict(meta["lr_scheduler"])
        self.source.load_state_dict(unflatten("source", tensors))
        set_rng_state(unflatten("rng", tensors))
        self.step = int(meta["step"])

    def checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: weights, EMA and two Adam moments, and the source's state."""
        weights = sum(p.numel() * 4 for p in self._params)
        return 4 * weights + sum(t.nbytes for t in self.source.state_dict().values() if torch.is_tensor(t))

    def save(self) -> Path:
        return save_run(self)

    def resume(self) -> int:
        """Restore the last good checkpoint (a damaged one is skipped with a warning); returns its step."""
        return resume_run(self)

    # the loop ---------------------------------------------------------------------------------
    @property
    def check_every(self) -> int:
        """Steps between finiteness checks of the loss: every step on the CPU, where the check is
        free; on an accelerator every log step, so that the loop never waits on the device (a
        non-finite step is still found before any checkpoint or model is written). Settable, so
        that bench/ops.py can count the accelerator path's ops on a CPU."""
        if self._check_every is not None:
            return self._check_every
        return 1 if self.accelerator.device.type == "cpu" else self.cfg.log_every

    @check_every.setter
    def check_every(self, steps: int) -> None:
        self._check_every = steps

    def _update(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of the student on ``batch``, with its loss statistics and finiteness
        record kept on the device. Nothing here reads the device or depends on the step number,
        so it can be captured as a CUDA graph. Returns the mean loss and the student's output."""
        cfg, student = self.cfg, self.student
        self.net.train()
        with self._autocast():
            y = batch.y if student.num_classes else None  # an unconditional student learns the marginal
            output = self.net(batch.x_t, batch.t) if y is None else self.net(batch.x_t, batch.t, y)
        terms = self._terms(output.float(), batch)
        loss = terms["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if cfg.grad_clip > 0:  # torch's foreach norm and scaling: no host sync
            self.accelerator.clip_grad_norm_(self._params, cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            n = len(batch.t)
            ones = self._ones.get(n)
            if ones is None:
                ones = self._ones[n] = torch.ones(n, device=self._sums.device)
            stats = torch.stack([terms["mse"].detach().float(), terms["vb"].detach().float(), ones], 1)
            self._sums.index_add_(0, self._quarter[batch.t], stats.double())
            if self.check_every > 1:  # x - x is 0 exactly when x is finite: two ops where isfinite takes four
                self._finite[:1].mul_((loss - loss) == 0)
                self._finite[1:].add_(self._finite[:1])
        return loss, output

    def _terms(self, output, batch) -> dict[str, torch.Tensor]:
        """The objective's per-sample ``loss`` and the two terms the log keeps (``mse``, ``vb``): the
        DKDM objective's; for a consistency student its distance to the target (as ``mse``, ``vb`` 0);
        for a matching generator the mean square of its gradient (as ``mse``, ``vb`` 0)."""
        student = self.student
        if self.cfg.objective == "dkdm":
            return dkdm_loss(student.schedule, output, batch.x_t, batch.t, batch.target, student.prediction,
                             student.variance, self.cfg.vlb_weight, self.cfg.simple_weight, self.cfg.vlb_mean_grad)
        if self.cfg.objective == "matching":  # the gradient from both scores; then the fake score follows x_g
            x_g = generator_x0(student.schedule, output[:, :batch.x_t.shape[1]], batch.x_t, batch.t)
            grad = self.source.judge(x_g)  # the fake score steps too, with its own optimizer
            square = grad.pow(2).flatten(1).mean(1)
            return {"mse": square, "vb": torch.zeros_like(square), "loss": matching_loss(x_g, grad)}
        schedule, c = student.schedule, batch.x_t.shape[1]
        s = (batch.t - skip_steps(schedule.num_steps, student.extra["sampler"]["grid"])).clamp_(min=0)
        x_s = teacher_ode_step(schedule, batch.target, batch.x_t, batch.t, s)
        y = batch.y if student.num_classes else None
        with torch.no_grad(), self._autocast():  # the target: the student itself under a stop-gradient
            target = self.net(x_s, s) if y is None else self.net(x_s, s, y)
        terms = consistency_loss(schedule, output[:, :c], target.float()[:, :c], batch.x_t, batch.t, x_s, s,
                                 student.prediction, sigma_power(student.sampler_steps))
        return {"mse": terms["distance"], "vb": torch.zeros_like(terms["distance"]), "loss": terms["loss"]}

    def _graph_inputs(self, batch) -> tuple:
        target = batch.target
        return (batch.x_t, batch.t, batch.y if self.student.num_classes else None, target.eps, target.x0, target.mean,
                target.log_variance)

    def _graphed_update(self, x_t, t, y, eps, x0, mean, log_variance):
        """``_update`` on the tensors of a batch that the loss reads (``_graph_inputs``): the arguments
        of its CUDA graph."""
        target = Reverse(eps=eps, x0=x0, mean=mean, variance=None, log_variance=log_variance)
        return self._update(TrainingBatch(x_t=x_t, t=t, target=target, y=y))

    def _autocast(self):
        if self._graph is None:
            return self.accelerator.autocast()
        return self.accelerator.autocast(AutocastKwargs(cache_enabled=False))  # capture needs autocast uncached

    def _diverged_advice(self) -> str:
        return (f"stopped, last good checkpoint kept in {self.ckpt_dir}; a non-finite teacher means a broken "
                f"teacher or pool, a non-finite student: lower --lr or enable --grad-clip")

    def _log(self, record: dict) -> None:
        append_log(self.accelerator, self.log_path, record)

    def train(self) -> dict:
        """Run to ``config.steps``; returns the last logged record. Saves the EMA model at the end.

        In a multi-process run, a process that dies makes the others stop with ``PeerLost`` (which
        rank, and where to resume). Their signal handlers stay in place then: the launcher's SIGTERM
        that follows a failed process must not cut that report short."""
        stop: list[int] = []
        previous = catch_signals(stop)
        lost = False
        try:
            with self._peer_failures():
                return self._run(stop)
        except PeerLost:
            lost = True
            raise
        finally:
            if not lost:
                restore_signals(previous)

    def _peer_failures(self):
        return peer_failures(self.accelerator, self._roll, lambda: self.step, self.ckpt_dir)

    def _run(self, stop: list[int]) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._sums.zero_()
        self._reset_finite()
        check_every = self.check_every
        checked_at = self.step
        last, t0, n0 = {}, time.time(), self.step
        acc = self.accelerator
        bar = progress_bar(cfg.steps, "train", initial=self.step, disable=not self.progress or not acc.is_main_process)
        try:
            while self.step < cfg.steps:
                batch = self.source.next_batch()
                loss, output = self._step(batch)
                if check_every == 1 and not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at step {self.step + 1}: {batch.first_nonfinite(output)}; "
                        f"{self._diverged_advice()}"
                    )
                self.lr_sched.step()
                self.step += 1
                if self._regions and self.step == n0 + 1 and acc.is_main_process:
                    print(f"compile: the first step took {time.time() - t0:.1f} s ({self._regions} regions of the student "
                          f"compiled; kernels cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']})", file=sys.stderr,
                          flush=True)
                self.ema.update(self._plain_net, self.step)
                finished = self._after_step() if self.callbacks else False
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or finished:
                    last = self._log_line(len(batch.t), (self.step - n0) / max(time.time() - t0, 1e-9))
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                saved = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or finished
                if check_every > 1 and (saved or stop or self.step % check_every == 0):
                    self._check_finite(checked_at)
                    checked_at = self.step
                if saved:
                    self.save()
                if stop:
                    path = self.save() if not saved else self.ckpt_dir
                    name = signal.Signals(stop[0]).name
                    raise Interrupted(f"{name} at step {self.step}: checkpoint written to {path}; continue with "
                                      f"--resume", stop[0])
                if finished:
                    break
        finally:
            bar.close()
        if acc.is_main_process:
            # the weights, and their copy in a diffusers pipeline where the student has one
            check_free_space(self.out, 2 * sum(t.nbytes for t in self.ema.shadow.values()), "the final model")
            save_model(self.student, self.out, {k: v for k, v in self.ema.shadow.items()})
        acc.wait_for_everyone()
        return last

    def _log_line(self, batch_size: int, rate: float) -> dict:
        """The log record of the steps since the last one (loss terms overall and by quarter of t,
        summed on the device and read once), written to log.jsonl by the main process."""
        acc, cfg = self.accelerator, self.cfg
        sums = self._sums
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
            self._check_ranks_in_sync()
        q = sums.tolist()  # one read of the device per log line: [quarter][mse, vb, count]
        total = max(sum(r[2] for r in q), 1.0)
        mse, vb = sum(r[0] for r in q) / total, sum(r[1] for r in q) / total
        record = {
            "step": self.step, "loss": cfg.simple_weight * mse + cfg.vlb_weight * vb, "mse": mse,
            "vb": vb, "lr": float(self.lr_sched.get_last_lr()[0]),
            **{f"mse_q{i}": r[0] / max(r[2], 1.0) for i, r in enumerate(q)},
            **{f"vb_q{i}": r[1] / max(r[2], 1.0) for i, r in enumerate(q)},
            "steps_per_s": rate,
            "samples_per_s": rate * batch_size * acc.num_processes,
            **({"teacher_calls": self.source.teacher_calls} if hasattr(self.source, "teacher_calls") else {}),
            **({"processes": acc.num_processes, "ranks_in_sync": True} if acc.num_processes > 1 else {}),
        }
        if acc.is_main_process:
            self._log(record)
        self._sums.zero_()
        return record

    def _check_finite(self, checked_at: int) -> None:
        """TrainingDiverged where a step since ``checked_at`` had a non-finite loss (read from the
        device's record only here, so the loop never waits on it in between)."""
        finite, good = self._finite.tolist()
        if not finite:
            raise TrainingDiverged(
                f"loss became non-finite at step {checked_at + good + 1} (checked at step {self.step}); "
                f"{self._diverged_advice()} (--log-every 1 checks every step and names the tensor)"
            )
        self._reset_finite()

    def _step(self, batch):
        """The update on ``batch``: plain, or replayed as a CUDA graph (keyed on the learning rates,
        which a captured optimizer step holds fixed: the warm-up's steps run plain)."""
        if self._graph is None:
            return self._update(batch)
        args = self._graph_inputs(batch)
        key = tuple(g["lr"] for g in self.opt.param_groups)
        if self._graph.graph is not None:
            return self._graph(*args, key=key)
        with warnings.catch_warnings():  # the plain steps before capture: torch warns that they are not captured
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            return self._graph(*args, key=key)

    def _reset_finite(self) -> None:
        self._finite.fill_(0)
        self._finite[:1].fill_(1)

    def _after_step(self) -> bool:
        """Run the callbacks due at this step; True when one of them stopped the run."""
        due = [cb for cb in self.callbacks if self.step % getattr(cb, "every", 1) == 0 or self.step == self.cfg.steps]
        if not due:
            return False
        acc = self.accelerator
        if acc.is_main_process:
            for cb in due:
                self.stop_reason = cb(self.step, self.ema.shadow) or self.stop_reason
        finished = torch.tensor([self.stop_reason is not None], device=acc.device)
        if acc.num_processes > 1:  # every process stops at the step the main one decided on
            from accelerate.utils import broadcast

            finished = broadcast(finished, from_process=0)
        return bool(finished)

    def _check_ranks_in_sync(self) -> None:
        check_in_sync(self.accelerator, self.accelerator.unwrap_model(self.net), self.step)
