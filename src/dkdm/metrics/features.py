"""Fréchet distance, k-NN precision/recall and the Inception score of sets of feature vectors.

Library-agnostic: the digits metrics, the Inception metrics and any other feature space use these,
so they are tested once against closed forms whatever network made the features. The Fréchet
distance is computed in float64 through an eigen-decomposition (no scipy), which is exact for the
symmetric PSD matrices involved. Distances for precision/recall are taken in blocks of rows, so
50,000 x 50,000 pairs (the ADM evaluator's sets) never sit in memory at once.
"""

from __future__ import annotations

import math

import torch


def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)."""
    s1 = _sqrt_psd(cov1)
    inner = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * inner)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = 4096) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019): the share of each set inside the other's k-NN manifold (a sample
    is inside if it lies within the distance of some point to that point's k-th nearest neighbour)."""
    real, fake = real.double(), fake.double()

    def radii(x):  # the k-th neighbour's distance, the 0 self-distance being the first
        return torch.cat([torch.cdist(x[i:i + block], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), block)])

    def inside(points, centres, r):
        return torch.cat([(torch.cdist(points[i:i + block], centres) <= r[None]).any(1)
                          for i in range(0, len(points), block)]).double().mean()

    return float(inside(fake, real, radii(real))), float(inside(real, fake, radii(fake)))


def inception_score(logits: torch.Tensor, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over consecutive splits of ``split_size`` samples (the
    ADM evaluator's splits: 10 at 50,000 samples), from classifier logits, in float64."""
    scores = []
    for i in range(0, len(logits), split_size):
        log_p = torch.log_softmax(logits[i:i + split_size].double(), dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - math.log(len(log_p))
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return sum(scores) / len(scores)
