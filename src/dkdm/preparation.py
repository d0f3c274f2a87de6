"""How a knowledge pool's entries are prepared: the method ``--prep auto`` resolves to (exact,
sampled or shared), the teacher's batch while preparing, and the bands of stops shared preparation
splits the steps into. ``pool.KnowledgePool.prepare`` does the work, ``pool.preparation_cost``
counts it.
"""

from __future__ import annotations

import contextlib
import torch

from .choices import PREPARATIONS
from .diffusion import respaced_times
from .errors import DkdmError


@contextlib.contextmanager
def _without_autotuning():
    """cuDNN's autotuner (on for the fixed-shape training steps) searches its algorithms again for
    every new input size; exact preparation's batch shrinks at almost every step, so there each of
    up to T sizes would pay a search that is never reused."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def resolve_preparation(method: str, num_steps: int, prep_steps: int, size: int | None = None,
                        train_forwards: int | None = None) -> str:
    """``auto``: exact where K >= T/2; else sampled, or shared where sampled preparation's N * K
    teacher steps would exceed the training's ``train_forwards`` (a short run that it would dominate).

    Sampled gave students like exact preparation's (docs/results.md). Shared costs about a K-th of
    sampled but draws K - 1 times fewer distinct samples: on digits, where sampled preparation was
    1.7x the training's teacher forwards, it lost nothing (2 seeds); on toy2d, where the two are
    equal, it was worse on 8 of 9 seeds (docs/defaults.md), so it is taken only where it pays.
    """
    if method not in PREPARATIONS:
        raise DkdmError(f"unknown pool preparation {method!r}; choose one of {', '.join(PREPARATIONS)}")
    if method != "auto":
        return method
    if 2 * prep_steps >= num_steps:
        return "exact"
    if size is not None and train_forwards is not None and size * prep_steps > train_forwards:
        return "shared"
    return "sampled"


def preparation_batch(chunk: int | None, device) -> int:
    """The teacher's batch while preparing: by default 1,024 on a CPU (the bundled teacher with two
    threads: 3,100-3,500 samples/s at 1,024, 2,770 at 256, 2,440 at 2,048; one thread: the same at
    256 and 1,024), and 8,192 on accelerators."""
    if chunk is None:
        return 1024 if torch.device(device).type == "cpu" else 8192
    if chunk < 1:
        raise DkdmError(f"--prep-batch must be at least 1, got {chunk}")
    return chunk


def _bands(num_steps: int, prep_steps: int) -> int:
    """How many bands of stops shared preparation splits [1, T-1] into: the intervals between the
    distinct times of a K-step respaced sampler."""
    return len(respaced_times(num_steps, prep_steps)) - 1
