"""Watching a run without data: is the student still getting closer to its teacher?

Every ``every`` steps (``--eval-every``) the EMA student is scored on
- a held-out set of pool states (x_t, t, label, the teacher's targets), prepared as the pool is
  but from its own noise, so never trained on: the DKDM loss terms (epsilon error, KL) overall and
  by quarter of t;
- the data-free sample score: the Fréchet distance of its samples to the teacher's samples from
  the same noise, in the teacher's own features (metrics/teacher_fd.py);
- the run's metric (``evaluation.score``: digits-FID, sliced W2, ...) on the same samples, where
  a reference data set is known.
Each evaluation is a line of log.jsonl (``"kind": "eval"``) and redraws training.png.
``Plateau`` is the rule of ``--steps auto``.

The held-out set and the teacher's statistics are taken once and kept in monitor.safetensors,
and the rule replays its history from log.jsonl, so a resumed run scores and stops exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .diffusion import Reverse, TrainingBatch
from .errors import DkdmError
from .tracking import append_log, read_log
from .layout import LOG_FILE
from .evaluation import HEADLINES
from .model import DiffusionModel
from .objective import dkdm_loss

MONITOR_FILE = "monitor.safetensors"
PLOT_FILE = "training.png"
STOP_FILE = "stop.json"
HELDOUT_SEED = 991  # offset of the held-out set's seed from the run's (its noise is not the pool's)
FLOOR_SEED = 7919  # offset of the second teacher sample set, whose distance to the first is the score's floor


@dataclass
class MonitorConfig:
    """What an evaluation costs: ``num`` student samples of ``steps`` steps (None: min(25, T)) and
    ``heldout`` student forwards; ``patience`` > 0 stops on a plateau (``--steps auto``)."""

    every: int
    num: int = 1000
    steps: int | None = None
    heldout: int = 512
    seed: int = 0
    patience: int = 0
    min_delta: float = 0.01

    def validate(self) -> None:
        if self.every < 1:
            raise DkdmError(f"--eval-every must be at least 1, got {self.every}")
        if self.num < 2:
            raise DkdmError(f"--monitor-num must be at least 2, got {self.num}")
        if self.heldout < 0:
            raise DkdmError(f"--heldout must be >= 0, got {self.heldout}")
        if self.patience < 0:
            raise DkdmError(f"--patience must be >= 0, got {self.patience}")


@torch.no_grad()
def heldout_error(model: DiffusionModel, batch: TrainingBatch, vlb_weight: float, chunk: int = 1024) -> dict:
    """The DKDM loss terms of ``model`` on a fixed batch: overall and by quarter of t."""
    T = model.schedule.num_steps
    mse, vb = [], []
    for i in range(0, len(batch.t), chunk):
        part = slice(i, i + chunk)
        x, t = batch.x_t[part], batch.t[part]
        y = batch.y[part] if batch.y is not None and model.num_classes else None
        target = Reverse(**{f: getattr(batch.target, f)[part] for f in Reverse.FIELDS})
        terms = dkdm_loss(model.schedule, model(x, t, y).float(), x, t, target, model.prediction, model.variance,
                          vlb_weight)
        mse.append(terms["mse"].double().cpu())
        vb.append(terms["vb"].double().cpu())
    mse, vb = torch.cat(mse), torch.cat(vb)
    q = (batch.t.cpu() * 4 // T)
    rec = {"heldout_loss": float(mse.mean() + vlb_weight * vb.mean()), "heldout_mse": float(mse.mean()),
           "heldout_vb": float(vb.mean())}
    for i in range(4):
        sel = q == i
        rec[f"heldout_mse_q{i}"] = float(mse[sel].mean()) if sel.any() else math.nan
        rec[f"heldout_vb_q{i}"] = float(vb[sel].mean()) if sel.any() else math.nan
    return rec


def headline(record: dict) -> str | None:
    """The key of the run metric in an evaluation record, if it has one."""
    return next((k for k in HEADLINES if k in record), None)  # the run metric plotted and printed


class Plateau:
    """The stopping rule of ``--steps auto``.

    A score improves when it falls below ``(1 - min_delta)`` times its best so far. The run stops
    at the first evaluation after which either
    (a) every watched score has gone ``patience`` evaluations without improving, or
    (b) a score with a noise floor (the data-free score: the distance between two sets of teacher
        samples from different noise) has stayed at or below it for ``patience`` evaluations in a
        row: the student's samples can no longer be told from its teacher's at this sample
        count, so gains of the other scores no longer show in samples.
    Scores missing from a record (no teacher, no held-out set) are not watched.
    """

    def __init__(self, keys, patience: int, min_delta: float = 0.01, floors: dict[str, float] | None = None):
        self.keys = list(keys)
        self.patience = patience
        self.min_delta = min_delta
        self.floors = dict(floors or {})
        self.best = {k: (math.inf, None) for k in self.keys}
        self.waited = {k: 0 for k in self.keys}
        self.below = {k: 0 for k in self.keys}

    def update(self, step: int, record: dict) -> str | None:
        watched = [k for k in self.keys if k in record]
        for k in watched:
            v, (best, _) = record[k], self.best[k]
            if math.isfinite(v) and (not math.isfinite(best) or v < best * (1 - self.min_delta)):
                self.best[k], self.waited[k] = (v, step), 0
            else:
                self.waited[k] += 1
            self.below[k] = self.below[k] + 1 if k in self.floors and v <= self.floors[k] else 0
        for k in watched:
            if self.below[k] >= self.patience:
                return (f"{k} {record[k]:.4g} has stayed at or below its noise floor {self.floors[k]:.4g} for "
                        f"{self.patience} evaluations: the student's samples cannot be told from its teacher's at "
                        f"this sample count")
        if not watched or any(self.waited[k] < self.patience for k in watched):
            return None
        bests = ", ".join(f"{k} {self.best[k][0]:.4g} at step {self.best[k][1]}" for k in watched)
        return (f"plateau: no score improved by {self.min_delta:.0%} in the last {self.patience} evaluations "
                f"(best {bests})")


class Monitor:
    """A ``Trainer`` callback: evaluates the EMA student every ``config.every`` steps (and at the
    last); with ``config.patience`` it stops the run on a plateau of the held-out error and the
    data-free score (``Plateau``) and says why."""

    def __init__(self, student: DiffusionModel, out, config: MonitorConfig, last_step: int, teacher=None, pool=None,
                 reference: str | None = None, vlb_weight: float = 1.0, guidance: float = 1.0, device="cpu",
                 progress: bool = True, accelerator=None):
        """``accelerator``: its experiment trackers get each evaluation and a grid of its samples."""
        config.validate()
        self.accelerator = accelerator
        self.cfg = config
        self.every = config.every
        self.out = Path(out)
        self.last_step = last_step
        self.teacher, self.pool, self.reference = teacher, pool, reference
        self.vlb_weight, self.guidance, self.progress = vlb_weight, guidance, progress
        self.device = torch.device(device)
        T = (teacher or student).schedule.num_steps
        self.steps = min(config.steps or 25, T)  # the teacher's reference; a few-step student samples in its K
        self.student_steps = student.sampler_steps or self.steps
        self.model = DiffusionModel(  # the EMA weights are loaded into this copy; the decoder is shared
            _copy_net(student.net), student.schedule, student.sample_shape, student.prediction, student.variance,
            student.clip_x0, spec=student.spec, extra=student.extra, num_classes=student.num_classes,
            null_class=student.null_class, decoder=student.decoder).to(self.device).eval().requires_grad_(False)
        self.heldout: TrainingBatch | None = None
        self.stats: dict[str, torch.Tensor] | None = None
        self.floor: float | None = None
        self.last: dict = {}
        self.stop_step: int | None = None
        self.rule = Plateau(["heldout_loss", "teacher_fd"], config.patience, config.min_delta) \
            if config.patience else None

    # set-up ----------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {"num": self.cfg.num, "steps": self.steps, "heldout": self.cfg.heldout if self.pool else 0,
                "seed": self.cfg.seed, "guidance": self.guidance}

    def cost(self) -> str:
        """What set-up and each evaluation cost, in teacher and student sample-steps."""
        from .pool import preparation_cost

        parts = []
        if self.pool is not None and self.cfg.heldout:
            prep = preparation_cost("shuffled", self.cfg.heldout, self.pool.num_steps, self.pool.preparation,
                                    self.pool.prep_steps)
            parts.append(f"held-out set of {self.cfg.heldout} pool states ~{prep + self.cfg.heldout:,} teacher sample-steps")
        if self.teacher is not None:
            parts.append(f"teacher reference and noise floor 2 x {self.cfg.num} samples x {self.steps} steps")
        each = f"{self.cfg.num} student samples x {self.student_steps} step{'s' * (self.student_steps > 1)}" + (
            f" + {self.cfg.heldout} held-out forwards" if self.pool is not None and self.cfg.heldout else "")
        return (f"evaluation every {self.every} steps: {each}" + (f"; once: {', '.join(parts)}" if parts else "")
                + (f"; stops on a plateau of {self.cfg.patience} evaluations, at most {self.last_step} steps"
                   if self.rule else ""))

    def setup(self, resume: bool = False) -> bool:
        """Take the held-out set and the teacher's statistics, or read them back on resume, then
        replay the stopping rule over log.jsonl (which the trainer has cut back to the checkpoint).
        True when the rule had already stopped the run at the checkpoint it resumes from."""
        path = self.out / MONITOR_FILE
        if path.exists():
            self._load(path)
        else:
            self._build()
            self._save(path)
        if self.rule and self.floor is not None:
            self.rule.floors["teacher_fd"] = self.floor
        stopped = None
        if resume:
            for rec in read_log(self.out / LOG_FILE):
                if rec.get("kind") == "eval":
                    self.last = rec
                    stopped = self.rule.update(rec["step"], rec) if self.rule else None
        if stopped is not None:
            self.stop_step = self.last["step"]
        return stopped is not None

    def _build(self) -> None:
        from .evaluation import teacher_statistics
        from .metrics.features import frechet_distance

        if self.pool is not None and self.cfg.heldout:
            self.heldout = self.pool.held_out(self.cfg.heldout, self.cfg.seed + HELDOUT_SEED)
        if self.teacher is not None:
            self.stats, other = (teacher_statistics(self.teacher, self.cfg.num, self.steps, seed, self.guidance,
                                                    progress=self.progress, cache=False)
                                 for seed in (self.cfg.seed, self.cfg.seed + FLOOR_SEED))
            self.floor = frechet_distance(self.stats["mean"], self.stats["cov"], other["mean"], other["cov"])

    def _save(self, path: Path) -> None:
        tensors = {}
        if self.heldout is not None:
            b = self.heldout
            tensors.update({"x_t": b.x_t, "t": b.t, **({"y": b.y} if b.y is not None else {}),
                            **{f"target.{f}": getattr(b.target, f) for f in Reverse.FIELDS}})
        if self.stats is not None:
            tensors.update({f"teacher.{k}": v for k, v in self.stats.items()})
            tensors["teacher_fd_floor"] = torch.tensor(self.floor, dtype=torch.float64)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"settings": json.dumps(self.settings(), sort_keys=True)})
        tmp.replace(path)

    def _load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {}).get("settings", "{}"))
        if saved != json.loads(json.dumps(self.settings(), sort_keys=True)):
            raise DkdmError(f"{path} was taken with other evaluation settings ({saved}, now {self.settings()}); "
                            f"resume with the same --monitor-num, --monitor-steps, --heldout and --seed")
        t = load_file(str(path))
        dev = self.device
        if "x_t" in t:
            target = Reverse(**{f: t[f"target.{f}"].to(dev) for f in Reverse.FIELDS})
            self.heldout = TrainingBatch(x_t=t["x_t"].to(dev), t=t["t"].to(dev), target=target,
                                         y=t["y"].to(dev) if "y" in t else None)
        stats = {k[len("teacher."):]: v for k, v in t.items() if k.startswith("teacher.")}
        self.stats = stats or None
        self.floor = float(t["teacher_fd_floor"]) if "teacher_fd_floor" in t else None

    # the callback ----------------------------------------------------------------------------
    def __call__(self, step: int, ema: dict[str, torch.Tensor]) -> str | None:
        t0 = time.time()
        self.model.net.load_state_dict(ema)
        tracked = self.accelerator is not None and bool(self.accelerator.trackers)
        record, images = self.evaluate(want_images=tracked)
        record = {"step": step, "kind": "eval", **record, "eval_s": round(time.time() - t0, 3)}
        self.last = record
        append_log(self.accelerator if tracked else None, self.out / LOG_FILE, record)
        if tracked:
            from .tracking import log_samples

            log_samples(self.accelerator, images, step)
        reason = self.rule.update(step, record) if self.rule else None
        if self.rule and reason is None and step >= self.last_step:
            reason = f"reached the maximum of {self.last_step} steps before a plateau"
        self._say(record)
        if reason is not None:
            self._stopped(step, reason)
        self.plot()
        return reason

    @torch.no_grad()
    def evaluate(self, want_images: bool = False) -> tuple[dict, torch.Tensor | None]:
        """Scores of the model as it now is (held-out error, data-free score, run metric), and its
        samples as images (a latent model's decoded once) where the metric or ``want_images`` needs them."""
        from .evaluation import data_free_score, score

        rec = {}
        if self.heldout is not None:
            rec.update(heldout_error(self.model, self.heldout, self.vlb_weight))
        # the teacher reference's seed: the same noise, and for a student of the teacher's classes the same labels
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        samples, labels = self.model.sample(self.cfg.num, self.student_steps, g, return_labels=True)
        if self.stats is not None:
            rec["teacher_fd"] = data_free_score(self.teacher, samples, self.stats)
            rec["teacher_fd_floor"] = self.floor
        images = self.model.decode(samples) if self.reference or want_images else None
        if self.reference:
            metrics = score(images, self.reference, labels)
            rec.update({k: v for k, v in metrics.items() if isinstance(v, float)})
        return rec, images

    def _say(self, rec: dict) -> None:
        from tqdm.auto import tqdm

        parts = []
        if "heldout_mse" in rec:
            parts.append("held-out mse " + " / ".join(f"{rec[f'heldout_mse_q{i}']:.4g}" for i in range(4))
                         + f" (by quarter of t), kl {rec['heldout_vb']:.4g}")
        if "teacher_fd" in rec:
            parts.append(f"teacher FD {rec['teacher_fd']:.4g} (floor {rec['teacher_fd_floor']:.4g})")
        key = headline(rec)
        if key:
            parts.append(f"{key} {rec[key]:.4g}")
        tqdm.write(f"eval step {rec['step']}: " + ", ".join(parts) + f" ({rec['eval_s']:.1f} s)", file=sys.stderr)

    def _stopped(self, step: int, reason: str) -> None:
        self.stop_step = step
        info = {"step": step, "reason": reason}
        if self.rule:
            info["best"] = {k: {"value": v, "step": s} for k, (v, s) in self.rule.best.items() if s is not None}
        (self.out / STOP_FILE).write_text(json.dumps(info, indent=1))
        from tqdm.auto import tqdm

        tqdm.write(f"stopped at step {step}: {reason} (written to {self.out / STOP_FILE})", file=sys.stderr)

    def plot(self) -> None:
        """Redraw training.png from log.jsonl (after each evaluation, and once the run has ended)."""
        plot_run(self.out, self.stop_step)


def plot_run(out, stop_step: int | None = None) -> Path | None:
    """RUN/training.png from RUN/log.jsonl (the step --steps auto stopped at: ``stop_step``, or
    stop.json's); None when the run has logged nothing yet."""
    from .plots import plot_log

    out = Path(out)
    records = read_log(out / LOG_FILE) if (out / LOG_FILE).is_file() else []
    if not records:
        return None
    if stop_step is None and (out / STOP_FILE).is_file():
        stop_step = json.loads((out / STOP_FILE).read_text()).get("step")
    metric = next((headline(r) for r in records if r.get("kind") == "eval" and headline(r)), None)
    return plot_log(records, out / PLOT_FILE, metric, stop_step)


def _copy_net(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    from .students import unwrap

    return copy.deepcopy(unwrap(net)[0])
