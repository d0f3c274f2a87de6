"""Fréchet distance, k-NN precision/recall and density/coverage, and the Inception score of sets
of feature vectors.

Library-agnostic: the digits metrics, the Inception metrics and any other feature space use these,
so they are tested once against closed forms whatever network made the features. The Fréchet
distance is computed in float64 through an eigen-decomposition (no scipy), which is exact for the
symmetric PSD matrices involved. Distances for the k-NN metrics are taken in blocks of rows, so
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


def _radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour in x (its 0 self-distance comes first)."""
    return torch.cat([torch.cdist(x[i:i + block], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), block)])


def _balls_holding(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor, block: int) -> torch.Tensor:
    """For each point, how many of the balls B(centres_i, r_i) hold it."""
    return torch.cat([(torch.cdist(points[i:i + block], centres) <= r[None]).sum(1)
                      for i in range(0, len(points), block)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = 4096) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019): the share of each set inside the other's k-NN manifold (a sample
    is inside if it lies within the distance of some point to that point's k-th nearest neighbour)."""
    real, fake = real.double(), fake.double()
    precision = (_balls_holding(fake, real, _radii(real, k, block), block) > 0).double().mean()
    recall = (_balls_holding(real, fake, _radii(fake, k, block), block) > 0).double().mean()
    return float(precision), float(recall)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5, block: int = 4096) -> tuple[float, float]:
    """Naeem et al. (2020), with the real k-NN balls only (robust to fake outliers):
    density = how many real balls hold a fake sample, on average, divided by k (about 1 when the two
    sets follow one distribution; above 1 where fakes crowd the dense regions), and coverage = the
    share of real balls that hold at least one fake sample (drops when modes are missed)."""
    real, fake = real.double(), fake.double()
    r = _radii(real, k, block)
    density = _balls_holding(fake, real, r, block).double().mean() / k
    covered = torch.cat([(torch.cdist(real[i:i + block], fake) <= r[i:i + block, None]).any(1)
                         for i in range(0, len(real), block)])
    return float(density), float(covered.double().mean())


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
