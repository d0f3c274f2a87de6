"""The DKDM objective: L = L*simple + lambda * L*vlb (the DKDM paper, arXiv 2409.03550).

One loss serves data-free and data-based training alike: the target reverse step is the
teacher's (distillation) or the true forward posterior (ordinary training, improved-DDPM's hybrid
loss with the KL used at every t, as the DKDM authors' code does).
"""

from __future__ import annotations

import torch

from .diffusion import Reverse, Schedule, kl_bits

#: The authors' code adds the per-step KL (mean over elements, bits) with weight 1; at
#: T = 1000 steps this equals improved-DDPM's lambda = 0.001 on L_vlb = T * E_t[KL].
DEFAULT_VLB_WEIGHT = 1.0


def dkdm_loss(
    schedule: Schedule,
    student_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    target: Reverse,
    prediction: str = "epsilon",
    variance: str = "learned_range",
    vlb_weight: float = DEFAULT_VLB_WEIGHT,
    simple_weight: float = 1.0,
    vlb_mean_grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-sample loss terms ``mse``, ``vb`` and ``loss`` (``simple_weight * mse + vlb_weight * vb``)
    for a student's raw output.

    The KL sees the student's mean through a stop-gradient, so it trains only the variance
    channels (``vlb_mean_grad`` lifts it: the ablation of docs/questions.md); a fixed-variance
    student has no KL term. The student's mean is not clamped.
    """
    if variance == "learned_range":
        pred, v = student_output.chunk(2, dim=1)
        frozen = torch.cat([pred if vlb_mean_grad else pred.detach(), v], dim=1)
        vb = kl_bits(target, schedule.reverse(frozen, x_t, t, prediction, variance))
    else:
        pred = student_output
        vb = torch.zeros(x_t.shape[0], dtype=student_output.dtype, device=x_t.device)
    student_eps = pred if prediction == "epsilon" else schedule.eps_and_x0(pred, x_t, t, prediction)[0]
    mse = (target.eps.to(student_eps.dtype) - student_eps).pow(2).flatten(1).mean(1)
    simple = mse if simple_weight == 1.0 else simple_weight * mse  # the default step dispatches no extra op (bench/ops.py)
    return {"mse": mse, "vb": vb, "loss": torch.add(simple, vb, alpha=vlb_weight)}
