"""Real data for ordinary (data-based) training: built-in data sets and the noising data source.

Distillation never reads this module's data; it exists to train teachers and baselines and to
evaluate against the truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
        self._centers: dict[torch.device, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return self.modes  # the mixture component is the class

    def sample_labeled(self, n: int, generator: torch.Generator | None = None):
        """n samples and their modes, drawn on the generator's device."""
        device = generator.device if generator is not None else torch.device("cpu")
        centers = self._centers.get(device)
        if centers is None:  # copied once: a host-to-device copy per draw would wait for the device
            centers = self._centers[device] = self.centers.to(device)
        k = torch.randint(0, self.modes, (n,), generator=generator, device=device)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64, device=device)
        return (centers[k] + self.std * noise).float(), k

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample_labeled(n, generator)[0]

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

    num_classes = 10

    def sample_labeled(self, n: int, generator: torch.Generator | None = None):
        idx = torch.randint(0, len(self.images), (n,), generator=generator)
        return self.images[idx], self.labels[idx]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample_labeled(n, generator)[0]


BUILTIN = {"toy2d": Toy2D, "digits": Digits}
SAMPLES_JSON = "dataset.json"
SAMPLES_FILE = "samples.safetensors"


def builtin_names_of_shape(sample_shape) -> list[str]:
    """The built-in data sets whose samples have this shape (a hint, never a guess acted on)."""
    return [name for name, cls in BUILTIN.items() if tuple(cls.sample_shape) == tuple(sample_shape)]


def builtin_dataset(name: str):
    if name not in BUILTIN:
        raise DkdmError(f"unknown built-in data set {name!r}; choose one of {', '.join(BUILTIN)}")
    return BUILTIN[name]()


class _ImageSet:
    """Draws uniformly (with replacement) from ``self.images``: the sampling every image set shares."""

    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.images[torch.randint(0, len(self.images), (n,), generator=generator)]


class SampleSet(_ImageSet):
    """A fixed set of samples on disk (``dkdm synth`` writes them): the data-free baseline's data.

    ``reference`` names the built-in data set the samples stand in for, so models trained on them
    are evaluated against the same truth as every other student.
    """

    clip_x0 = True

    def __init__(self, directory):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        meta_path = d / SAMPLES_JSON
        if not d.is_dir() or not meta_path.exists():
            raise DkdmError(f"{d} is neither a built-in data set ({', '.join(BUILTIN)}) nor a sample set written "
                            f"by `dkdm synth` (no {SAMPLES_JSON})")
        try:
            meta = json.loads(meta_path.read_text())
            images = load_file(str(d / SAMPLES_FILE))["samples"].float()
        except (OSError, json.JSONDecodeError, SafetensorError, KeyError) as e:
            raise DkdmError(f"cannot read the sample set in {d}: {e.__class__.__name__}: {e}; write it again with `dkdm synth`")
        if meta.get("format") != "dkdm-samples" or list(images.shape[1:]) != meta.get("sample_shape"):
            raise DkdmError(f"{d / SAMPLES_JSON} does not describe {d / SAMPLES_FILE}; write it again with `dkdm synth`")
        self.name = str(d)
        self.meta = meta
        self.reference = meta.get("reference")
        self.sample_shape = tuple(meta["sample_shape"])
        self.clip_x0 = bool(meta.get("clip_x0", True))
        self.images = images


def save_sample_set(directory, samples: torch.Tensor, meta: dict) -> Path:
    """Write a sample set atomically (a temporary directory renamed into place)."""
    from safetensors.torch import save_file

    d = Path(directory)
    tmp = d.with_name(d.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({"samples": samples.float().contiguous()}, str(tmp / SAMPLES_FILE))
    info = {"format": "dkdm-samples", "version": 1, "num": len(samples), "sample_shape": list(samples.shape[1:]), **meta}
    (tmp / SAMPLES_JSON).write_text(json.dumps(info, indent=1))
    if d.exists():
        d.rmdir()
    tmp.rename(d)
    return d


class MixedSet(_ImageSet):
    """The data-limited baseline: ``percent`` % of the real set, the rest teacher samples, same total size.

    Which real and synthetic items are kept is fixed by ``seed``.
    """

    def __init__(self, real, synthetic: SampleSet, percent: float, seed: int = 0):
        if not 0 <= percent <= 100:
            raise DkdmError(f"--real-fraction must be a percentage in 0..100, got {percent}")
        if tuple(real.sample_shape) != tuple(synthetic.sample_shape):
            raise DkdmError(f"--synthetic {synthetic.name} holds {list(synthetic.sample_shape)} samples but "
                            f"{real.name} has {list(real.sample_shape)}")
        total = len(real.images)
        n_real = round(total * percent / 100)
        if len(synthetic) < total - n_real:
            raise DkdmError(f"--synthetic {synthetic.name} holds {len(synthetic)} samples; {percent}% real data needs "
                            f"{total - n_real} to fill the set to {total}: synthesize at least that many")
        g = torch.Generator().manual_seed(seed)
        keep_real = torch.randperm(total, generator=g)[:n_real]
        keep_syn = torch.randperm(len(synthetic), generator=g)[: total - n_real]
        self.name = f"{real.name}+{percent:g}%real+{synthetic.name}"
        self.reference = real.name
        self.sample_shape = real.sample_shape
        self.clip_x0 = real.clip_x0
        self.num_real = n_real
        self.images = torch.cat([real.images[keep_real], synthetic.images[keep_syn]])


def load_dataset(name_or_dir: str):
    """A built-in data set by name, or a sample set directory."""
    if name_or_dir in BUILTIN:
        return builtin_dataset(name_or_dir)
    return SampleSet(name_or_dir)


def reference_of(dataset) -> str:
    """The built-in data set a training set stands for (itself when built in)."""
    return getattr(dataset, "reference", None) or dataset.name


class DataSource:
    """Ordinary diffusion training batches: x0 from the data, t uniform, the true posterior as target.

    Batches are drawn on the training device by a generator that lives there: an image set is
    copied to the device once, so a step moves no data from the host and never waits on it. On a
    CPU the draws are the ones a CPU generator has always made.
    """

    def __init__(self, dataset, schedule: Schedule, batch_size: int, seed: int = 0, device="cpu",
                 conditional: bool = False):
        if conditional and not getattr(dataset, "num_classes", 0):
            raise DkdmError(f"a class-conditional model needs labelled data; {dataset.name} has no labels")
        self.conditional = conditional
        self.num_classes = dataset.num_classes if conditional else 0
        self.dataset = dataset
        self.schedule = schedule
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        images = getattr(dataset, "images", None)
        self._images = None if images is None else images.to(self.device)
        self._labels = dataset.labels.to(self.device) if conditional and self._images is not None else None
        self.samples_served = 0

    def _sample(self, n: int):
        """x0 and labels (or None): image sets by index on the device, other data sets draw themselves."""
        g = self.generator
        if self._images is None:
            return self.dataset.sample_labeled(n, g) if self.conditional else (self.dataset.sample(n, g), None)
        idx = torch.randint(0, len(self._images), (n,), generator=g, device=self.device)
        return self._images[idx], None if self._labels is None else self._labels[idx]

    def next_batch(self) -> TrainingBatch:
        g, b = self.generator, self.batch_size
        x0, y = self._sample(b)
        t = torch.randint(0, self.schedule.num_steps, (b,), generator=g, device=self.device)
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        x_t = self.schedule.q_sample(x0, t, noise)
        self.samples_served += b
        return TrainingBatch(x_t=x_t, t=t, target=self.schedule.q_posterior(x0, x_t, t), y=y)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rng": self.generator.get_state(), "samples_served": torch.tensor(self.samples_served)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["rng"])
        self.samples_served = int(state["samples_served"])

    def describe(self) -> dict:
        return {"source": "data", "dataset": self.dataset.name, "batch": self.batch_size,
                **({"conditional": True} if self.conditional else {})}
