"""Real data for ordinary (data-based) training: built-in data sets and the noising data source.

Distillation never reads this module's data; it exists to train teachers and baselines and to
evaluate against the truth.
"""

from __future__ import annotations

import math

import torch

from .diffusion import Schedule, TrainingBatch
from .errors import DkdmError


class Toy2D:
    """A mixture of 8 isotropic Gaussians evenly spaced on a ring: the exact density is known."""

    name = "toy2d"
    sample_shape = (2,)
    clip_x0 = False

    def __init__(self, modes: int = 8, radius: float = 1.5, std: float = 0.15):
        self.modes, self.radius, self.std = modes, radius, std
        angles = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
        self.centers = radius * torch.stack([angles.cos(), angles.sin()], 1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.randint(0, self.modes, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.centers[k] + self.std * noise).float()

    def projected_quantiles(self, directions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Exact quantiles of the data projected on unit ``directions`` [P,2] at ``probs`` [N].

        Inverts the 1-D mixture CDF by bisection in float64; returns [P, N].
        """
        means = directions.double() @ self.centers.T  # [P, K]
        lo = torch.full((len(directions), len(probs)), -self.radius - 12 * self.std, dtype=torch.float64)
        hi = -lo
        target = probs.double()[None]
        for _ in range(60):
            mid = (lo + hi) / 2
            z = (mid[:, :, None] - means[:, None, :]) / self.std
            cdf = torch.special.ndtr(z).mean(-1)
            below = cdf < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (lo + hi) / 2


class Digits:
    """scikit-learn's handwritten digits (1,797 8x8 images, shipped with scikit-learn), in [-1, 1].

    A fixed split: a seeded permutation puts 360 images (20%) in ``test`` and the rest in
    ``train``. Only ``train`` teaches; ``test`` is the reference for evaluation.
    """

    name = "digits"
    sample_shape = (1, 8, 8)
    clip_x0 = True
    test_size = 360

    def __init__(self, split: str = "train"):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
            raise DkdmError(f"the digits data set needs scikit-learn ({e}); pip install scikit-learn")
        if split not in ("train", "test", "all"):
            raise DkdmError(f"unknown digits split {split!r}; choose train, test or all")
        raw = load_digits()
        images = torch.tensor(raw.images, dtype=torch.float32) / 8.0 - 1.0
        labels = torch.tensor(raw.target, dtype=torch.long)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(20240903))
        test, train = order[: self.test_size], order[self.test_size:]
        idx = {"train": train, "test": test, "all": order}[split]
        self.split = split
        self.images = images[idx].unsqueeze(1)
        self.labels = labels[idx]

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.images[torch.randint(0, len(self.images), (n,), generator=generator)]


BUILTIN = {"toy2d": Toy2D, "digits": Digits}


def builtin_dataset(name: str):
    if name not in BUILTIN:
        raise DkdmError(f"unknown built-in data set {name!r}; choose one of {', '.join(BUILTIN)}")
    return BUILTIN[name]()


class DataSource:
    """Ordinary diffusion training batches: x0 from the data, t uniform, the true posterior as target."""

    def __init__(self, dataset, schedule: Schedule, batch_size: int, seed: int = 0, device="cpu"):
        self.dataset = dataset
        self.schedule = schedule
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.samples_served = 0

    def next_batch(self) -> TrainingBatch:
        g, b = self.generator, self.batch_size
        x0 = self.dataset.sample(b, g)
        t = torch.randint(0, self.schedule.num_steps, (b,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x0, t, noise = x0.to(self.device), t.to(self.device), noise.to(self.device)
        x_t = self.schedule.q_sample(x0, t, noise)
        self.samples_served += b
        return TrainingBatch(x_t=x_t, t=t, target=self.schedule.q_posterior(x0, x_t, t))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rng": self.generator.get_state(), "samples_served": torch.tensor(self.samples_served)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["rng"])
        self.samples_served = int(state["samples_served"])

    def describe(self) -> dict:
        return {"source": "data", "dataset": self.dataset.name, "batch": self.batch_size}
