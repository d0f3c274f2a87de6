"""Sliced Wasserstein-2 distance of 2-D samples to a data set whose quantiles are known exactly."""

from __future__ import annotations

import math

import torch

NUM_PROJECTIONS = 64
NUM_SAMPLES = 4000


def directions(num: int = NUM_PROJECTIONS) -> torch.Tensor:
    """Fixed, evenly spread unit directions on the half circle (no randomness in the metric)."""
    angles = math.pi * (torch.arange(num, dtype=torch.float64) + 0.5) / num
    return torch.stack([angles.cos(), angles.sin()], 1)


def sliced_w2(samples: torch.Tensor, dataset, num_projections: int = NUM_PROJECTIONS) -> float:
    """sqrt(mean over directions of W2^2(projected samples, projected true distribution)).

    Each 1-D W2 compares the sorted projections with the true quantiles at the midpoints
    (i - 1/2)/n, so the reference has no sampling noise of its own.
    """
    x = samples.double()
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"sliced W2 needs 2-D samples [N, 2], got {list(samples.shape)}")
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    d = directions(num_projections)
    proj = torch.sort(x @ d.T, dim=0).values.T  # [P, N]
    n = x.shape[0]
    probs = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    q = dataset.projected_quantiles(d, probs)
    return float(((proj - q) ** 2).mean().sqrt())
