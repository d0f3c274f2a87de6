"""Host work per training step: the aten ops the loop dispatches outside the networks.

On a GPU every such op is a kernel launch the Python thread has to issue, so a step whose
networks need a few milliseconds of arithmetic can still wait on the host (issue 14). This counts,
on the CPU and with the accelerator code path's settings (the deferred finiteness check), the ops
of a steady-state step of the Trainer by region:

- the networks: the student's forward, the teacher's forward, the backward pass;
- outside them, what dkdm's own code issues: the rest of the student update (``Trainer._update``:
  the loss, loss statistics, the finiteness record), the rest of the teacher's step
  (``KnowledgePool._advance``: its reverse-step math and sample), and the host loop (the pool's
  draw, restarts and write-back, a data-based batch, the EMA);
- the library routines dkdm calls once a step, counted apart: the optimizer's step and gradient
  clipping. How many aten ops torch's own Python dispatches inside them is torch's business and
  changes between its releases (46 and 48 for the same update with two torch builds, issue 26);
  what dkdm owes is that they are fused or foreach calls whose count does not grow with the
  student's number of weight tensors.

With ``--cuda-graphs`` the update and the teacher's step are replayed as graphs, so the host
dispatches only the host loop's ops plus a copy per graph input and one replay per graph: that
count is printed too. View ops only make metadata and profiler markers launch nothing; both are
counted apart. Reads of a tensor's value by the host (``.item()`` and the like: device syncs on
an accelerator) are counted as syncs.

    python bench/ops.py              # default digits teacher and student, grad clipping on
    python bench/ops.py --record     # also append the counts to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from speed import add_row
from window import StepWindow

HERE = Path(__file__).resolve().parent
SYNCS = {"_local_scalar_dense", "is_nonzero", "equal", "item"}
MARKERS = {"_record_function_enter_new", "_record_function_exit", "_unsafe_view"}
NETWORKS = ("student forward", "teacher forward", "backward")
TABLE = ("| date | code | step | grad clip | ops outside the networks | update / teacher step / host loop | "
         "with --cuda-graphs | host reads | networks: student forward / teacher forward / backward |")
OUTSIDE = ("update", "teacher step", "host loop")
LIBRARY = "optimizer and clipping"  # torch's routines, called once a step (see the docstring)


def _launches(func) -> bool:
    return not func.is_view and func.__name__.split(".")[0] not in MARKERS


class _Counter(TorchDispatchMode):
    """Counts dispatched ops by region while ``counting`` is on."""

    def __init__(self):
        super().__init__()
        self.counting = False
        self.region = ["host loop"]
        self.ops = collections.defaultdict(collections.Counter)  # region -> op name -> count
        self.free = collections.Counter()  # region -> views and markers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            region = self.region[-1]
            if _launches(func):
                self.ops[region][func.__name__.split(".")[0]] += 1
            else:
                self.free[region] += 1
        return func(*args, **(kwargs or {}))

    def within(self, name: str, fn):
        """``fn`` with its ops counted in region ``name``."""
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.region.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.region.pop()

        return wrapped


def _region(counter: _Counter, module: torch.nn.Module, name: str) -> None:
    def enter(*_):
        counter.region.append(name)

    def leave(*_):
        counter.region.pop()

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def count_step_ops(make_trainer, teacher_net=None, warm: int = 3, n: int = 4) -> dict:
    """Ops per step by region for the trainer ``make_trainer(wrap)`` builds around ``wrap(source)``.

    The trainer checks finiteness at its log lines only (what it does on accelerators), and no
    log line or checkpoint falls inside the counted window.
    """
    counter = _Counter()

    def wrap(source):
        return StepWindow(source, warm + 1, n, lambda i: setattr(counter, "counting", i < n))

    trainer = make_trainer(wrap)
    trainer.check_every = trainer.cfg.log_every = trainer.cfg.ckpt_every = 10 ** 6
    trainer.cfg.steps = trainer.source.steps_needed
    trainer._update = counter.within("update", trainer._update)
    trainer.opt.step = counter.within(LIBRARY, trainer.opt.step)
    trainer.accelerator.clip_grad_norm_ = counter.within(LIBRARY, trainer.accelerator.clip_grad_norm_)
    pool = trainer.source._source
    graph_inputs = 5 + bool(trainer.student.num_classes)  # x_t, t, the teacher's eps, mean, log-variance (, y)
    if hasattr(pool, "_advance"):
        pool._advance = counter.within("teacher step", pool._advance)
        graph_inputs += 3 + (pool.y is not None)  # x, s, noise (, y)
    _region(counter, trainer.student.net, "student forward")
    if teacher_net is not None:
        _region(counter, teacher_net, "teacher forward")
    original = torch.Tensor.backward
    torch.Tensor.backward = counter.within("backward", original)
    try:
        with counter:
            trainer.train()
    finally:
        torch.Tensor.backward = original
    per_region = {r: sum(counter.ops[r].values()) / n for r in (*NETWORKS, *OUTSIDE, LIBRARY)}
    outside = collections.Counter()
    for r in OUTSIDE:
        outside.update(counter.ops[r])
    graphs = 1 + hasattr(pool, "_advance")
    return {"per_region": per_region, "outside": sum(per_region[r] for r in OUTSIDE),
            "free": sum(counter.free[r] for r in OUTSIDE) / n,
            "with_cuda_graphs": per_region["host loop"] + graph_inputs + graphs,
            "outside_ops": {k: v / n for k, v in outside.most_common()},
            "library": per_region[LIBRARY], "library_ops": {k: v / n for k, v in counter.ops[LIBRARY].most_common()},
            "syncs": sum(v for r in counter.ops.values() for k, v in r.items() if k in SYNCS) / n}


def default_trainers(tmp: Path, grad_clip: float = 1.0, student_spec: str = "unet:widths=24-48,layers=1,groups=8",
                     batch: int = 16):
    """(name, make_trainer, teacher net) for a DKDM step and a data-based step of the digits set-up."""
    from dkdm.data import DataSource, builtin_dataset
    from dkdm.formats import load_model
    from dkdm.model import DiffusionModel
    from dkdm.pool import KnowledgePool
    from dkdm.trainer import TrainConfig, Trainer

    teacher = load_model("builtin:digits").requires_grad_(False)

    def student():
        torch.manual_seed(0)
        return DiffusionModel.build(student_spec, teacher.sample_shape, teacher.schedule, clip_x0=True)

    def cfg():
        return TrainConfig(steps=1, lr=1e-4, grad_clip=grad_clip, ema_decay=0.999)

    def dkdm(wrap):
        pool = KnowledgePool(teacher, batch, "dynamic", rho=0.002, seed=0, preparation="sampled", prep_steps=2)
        pool.prepare()
        return Trainer(student(), wrap(pool), cfg(), tmp / "dkdm", progress=False)

    def data(wrap):
        source = DataSource(builtin_dataset("digits"), teacher.schedule, batch, seed=0)
        return Trainer(student(), wrap(source), cfg(), tmp / "data", progress=False)

    return [("DKDM step", dkdm, teacher.net), ("data-based step", data, None)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grad-clip", type=float, default=1.0, help="gradient clipping (TrainConfig's default: on)")
    ap.add_argument("--record", action="store_true", help="append the counts to bench/RESULTS.md")
    ap.add_argument("--note", default="", help="what the recorded row measures (e.g. the commit)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, teacher_net in default_trainers(Path(tmp), args.grad_clip):
            r = count_step_ops(make, teacher_net)
            pr = r["per_region"]
            print(f"{name}: {r['outside']:.0f} ops outside the networks (update {pr['update']:.0f}, teacher step "
                  f"{pr['teacher step']:.0f}, host loop {pr['host loop']:.0f}; +{r['free']:.0f} views and markers; "
                  f"+{r['library']:.0f} in torch's optimizer step and clipping), "
                  f"{r['syncs']:.0f} host reads; with --cuda-graphs {r['with_cuda_graphs']:.0f} | networks: student "
                  f"forward {pr['student forward']:.0f}, teacher forward {pr['teacher forward']:.0f}, backward "
                  f"{pr['backward']:.0f}")
            print("   outside: " + ", ".join(f"{k} {v:g}" for k, v in r["outside_ops"].items()))
            rows.append((name, r))
    if args.record:
        for name, r in rows:
            pr = r["per_region"]
            add_row(HERE / "RESULTS.md", TABLE,
                    f"| {time.strftime('%Y-%m-%d')} | {args.note} | {name} | {args.grad_clip:g} | {r['outside']:.0f} | "
                    f"{pr['update']:.0f} / {pr['teacher step']:.0f} / {pr['host loop']:.0f} | "
                    f"{r['with_cuda_graphs']:.0f} | {r['syncs']:.0f} | {pr['student forward']:.0f} / "
                    f"{pr['teacher forward']:.0f} / {pr['backward']:.0f} |",
                    "## Host work per step (`bench/ops.py`, issue 14)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
