"""Where a run computes: accelerate's Accelerator (CPU or GPUs, processes, mixed precision) and the
fastest AdamW that device has."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .errors import DkdmError


def make_accelerator(mixed_precision: str = "no", log_with=None, logging_dir=None) -> Accelerator:
    """accelerate's Accelerator; without CUDA it uses the CPU, and under torchrun / accelerate
    launch several CPU processes train together over gloo. On CUDA, cuDNN autotunes its
    convolution algorithms (every step has the same shapes, so the first step's search pays off).
    ``log_with``: the experiment trackers (``tracking.parse``), writing under ``logging_dir``."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    elif mixed_precision == "fp16":
        raise DkdmError("--mixed-precision fp16 needs a CUDA device; on a CPU it would silently train in float32 "
                        "(use bf16, which CPUs run under autocast, or drop the flag)")
    project = None
    if log_with:
        from accelerate.utils import ProjectConfiguration

        project = ProjectConfiguration(project_dir=str(logging_dir), logging_dir=str(logging_dir))
    kwargs = dict(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                  log_with=list(log_with) if log_with else None, project_config=project)
    try:
        return Accelerator(**kwargs)
    except ValueError as e:  # an earlier run in this process (Python API) chose another precision
        if "already been initialized" not in str(e):
            raise
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # the process group (PartialState) stays
        return Accelerator(**kwargs)


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` for new tensors (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


_FUSED_CPU_ADAMW = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)


def adamw(params, lr: float, weight_decay: float, device: torch.device, capturable: bool = False,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW as one fused kernel over all tensors (CUDA; CPU since torch 2.4, where it is also 5x
    faster than the per-tensor loop on the default digits student); elsewhere the foreach form.
    A CUDA graph replays the fused step only if it is capturable (its step count on the device)."""
    if device.type == "cuda" or (device.type == "cpu" and _FUSED_CPU_ADAMW):
        kind = {"fused": True, "capturable": capturable}
    else:
        kind = {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), **kind)
