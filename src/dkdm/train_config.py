"""The training loop's settings (``TrainConfig``, checked once) and its learning-rate schedule.

``TrainConfig()``'s defaults are the command line's (``settings.COMMON_DEFAULTS``); a distillation's
steps, batch, lr, warm-up, EMA and clipping follow from the student and the problem instead
(``defaults.distill_defaults``), which ``dkdm.distill`` applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .choices import LR_DECAYS, MIXED_PRECISIONS
from .errors import DkdmError
from .matching import BETAS as MATCHING_BETAS
from .settings import COMMON_DEFAULTS


_D = COMMON_DEFAULTS
OBJECTIVES = ("dkdm", "consistency", "matching")
DECAY_STAGES = 100  # a decaying learning rate changes this many times a run (a CUDA graph is captured per value)


def lr_factor(warmup: int, decay: str, steps: int):
    """The learning rate's factor at step s: a linear warm-up over ``warmup`` steps, then constant,
    or a cosine from 1 to 0 at step ``steps``, held constant over each of ``DECAY_STAGES`` stages
    (on a GPU, each value is captured once as a CUDA graph and replayed)."""
    warm = max(1, warmup)

    def factor(s: int) -> float:
        f = min(1.0, (s + 1) / warm)
        if decay == "cosine" and steps > warm:
            stage = min(DECAY_STAGES, int(DECAY_STAGES * max(0, s - warm) / (steps - warm)))
            f *= 0.5 * (1 + math.cos(math.pi * stage / DECAY_STAGES))
        return f

    return factor


@dataclass
class TrainConfig:
    """The loop's settings, defaulting to the command line's (``settings.COMMON_DEFAULTS``). A
    distillation's steps, batch, lr, warm-up, EMA and clipping follow from the student and the
    problem instead (``defaults.distill_defaults``); ``dkdm.distill`` applies those rules."""

    steps: int = _D["steps"]
    lr: float = _D["lr"]
    weight_decay: float = _D["weight_decay"]
    ema_decay: float = _D["ema"]
    grad_clip: float = _D["grad_clip"]
    warmup: int = _D["warmup"]
    lr_decay: str = _D["lr_decay"]  # after the warm-up: "constant", or "cosine" to 0 at the last step
    mixed_precision: str = _D["mixed_precision"]
    log_every: int = _D["log_every"]
    ckpt_every: int = _D["ckpt_every"]
    keep_checkpoints: int = _D["keep_checkpoints"]
    vlb_weight: float = _D["vlb_weight"]
    simple_weight: float = _D["simple_weight"]  # weight of L*simple (0: the VLB term alone)
    vlb_mean_grad: bool = _D["vlb_mean_grad"]  # the KL's gradient reaches the student's mean (no stop-gradient)
    compile: bool = False  # torch.compile the student's forward (the backward follows)
    channels_last: bool = False  # channels-last weights: faster convolutions on GPUs in reduced precision
    cuda_graphs: bool = False  # replay the student update (and a pool's teacher step) as CUDA graphs
    objective: str = "dkdm"  # "dkdm" (L*simple + lambda L*vlb); a few-step student's "consistency" or "matching"

    @property
    def adam_betas(self) -> tuple[float, float]:
        """AdamW's betas: torch's, but no momentum for a matching generator, whose gradient comes from a
        fake score that moves every step (digits seed 0, one step at 600 steps: digits-FID 12.3 with
        (0, 0.99), 15.6 with (0.9, 0.999); bench/quality/fewstep_dmd.py --beta1)."""
        return MATCHING_BETAS if self.objective == "matching" else (0.9, 0.999)

    def validate(self) -> None:
        if self.steps < 1:
            raise DkdmError(f"--steps must be at least 1, got {self.steps}")
        if self.simple_weight < 0 or self.vlb_weight < 0 or self.simple_weight == self.vlb_weight == 0:
            raise DkdmError(f"--simple-weight and --vlb-weight must be >= 0 and not both 0, got "
                            f"{self.simple_weight:g} and {self.vlb_weight:g}")
        if not self.lr > 0:
            raise DkdmError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise DkdmError(f"--ema must be in [0, 1), got {self.ema_decay}")
        if self.ckpt_every < 1 or self.log_every < 1:
            raise DkdmError("--ckpt-every and --log-every must be at least 1")
        if self.objective not in OBJECTIVES:
            raise DkdmError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.lr_decay not in LR_DECAYS:
            raise DkdmError(f"--lr-decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise DkdmError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")

    def check_cuda_graphs(self, device_type: str, processes: int) -> None:
        """DkdmError where --cuda-graphs cannot run: no CUDA device, fp16, several processes, --compile."""
        why = ("needs a CUDA device, and this machine has none (drop the flag)" if device_type != "cuda" else
               "cannot replay --mixed-precision fp16 (its loss scaler reads the device every step); use bf16"
               if self.mixed_precision == "fp16" else
               "runs one process; drop it under torchrun / accelerate launch" if processes > 1 else
               "does not capture distribution matching (two networks step); drop it" if self.objective == "matching" else
               "and --compile are alternatives; choose one" if self.compile else None)
        if why:
            raise DkdmError(f"--cuda-graphs {why}")
