"""RGB reference sets for Inception-style metrics, as users hold them, with cached features.

Three forms: an ADM-evaluator reference batch (``.npz`` whose ``arr_0`` is uint8 images N x H x
W x 3, like the paper's ``VIRTUAL_*.npz``), a folder of images, or precomputed statistics (``.npz``
with ``mu`` and ``sigma``, and ``mu_s`` / ``sigma_s`` for sFID). Features of a reference are
computed once per feature network and kept in the cache keyed by the reference's bytes, because
a 50,000-image reference costs minutes of Inception forwards. Nothing here knows which network
makes the features: any ``extractor`` (a callable on uint8 images returning a dict of features,
with a ``name``) is accepted, so the readers are tested with a stand-in network.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DkdmError
from . import cached

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class RGBReference:
    """Images (uint8, N x 3 x H x W) or, for a statistics file, their Gaussian fits only."""

    source: str
    key: str  # hash of the reference's content: the cache key
    images: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] | None = None  # mu, sigma (and mu_s, sigma_s)

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)


def _hash_files(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _check_images(images: np.ndarray, source) -> torch.Tensor:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DkdmError(f"{source}: reference images must be uint8 N x H x W x 3 (RGB), got {images.dtype} "
                        f"{list(images.shape)}")
    if len(images) < 2:
        raise DkdmError(f"{source}: a reference needs at least 2 images, got {len(images)}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def _read_npz(p: Path) -> RGBReference:
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DkdmError(f"cannot read reference {p}: {e.__class__.__name__}: {e}")
    key = _hash_files([p])
    if "arr_0" in arrays:
        return RGBReference(str(p), key, images=_check_images(arrays["arr_0"], p))
    if "mu" in arrays and "sigma" in arrays:
        stats = {k: torch.from_numpy(arrays[k]).double() for k in ("mu", "sigma", "mu_s", "sigma_s") if k in arrays}
        if stats["mu"].dim() != 1 or stats["sigma"].shape != (len(stats["mu"]),) * 2:
            raise DkdmError(f"{p}: mu must be a vector and sigma its square covariance, got {list(stats['mu'].shape)} "
                            f"and {list(stats['sigma'].shape)}")
        return RGBReference(str(p), key, stats=stats)
    raise DkdmError(f"{p} holds {', '.join(arrays) or 'nothing'}; a reference .npz holds arr_0 (uint8 images, as the "
                    f"ADM evaluator's reference batches) or mu and sigma (statistics)")


def _read_folder(d: Path) -> RGBReference:
    from PIL import Image

    files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DkdmError(f"reference folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                images.append(np.asarray(img.convert("RGB")))
        except OSError as e:
            raise DkdmError(f"cannot read reference image {f}: {e}")
        if images[-1].shape != images[0].shape:
            raise DkdmError(f"reference images must share one size: {files[0].name} is {images[0].shape[1]}x"
                            f"{images[0].shape[0]}, {f.name} is {images[-1].shape[1]}x{images[-1].shape[0]}")
    return RGBReference(str(d), _hash_files(files), images=_check_images(np.stack(images), d))


def read_reference(path) -> RGBReference:
    """An RGB reference from an ``.npz`` (images as ``arr_0``, or ``mu`` / ``sigma``) or a folder of images."""
    p = Path(path)
    if p.is_dir():
        return _read_folder(p)
    if p.is_file() and p.suffix == ".npz":
        return _read_npz(p)
    if not p.exists():
        raise DkdmError(f"reference {p} does not exist")
    raise DkdmError(f"reference {p}: pass an ADM reference batch or statistics (.npz) or a folder of images")


@torch.no_grad()
def extract(extractor, images: torch.Tensor, batch_size: int = 200, progress=None) -> dict[str, torch.Tensor]:
    """The extractor's features of uint8 images, batch by batch, gathered on the CPU."""
    device = getattr(extractor, "device", "cpu")
    parts: dict[str, list] = {}
    for i in range(0, len(images), batch_size):
        for name, value in extractor(images[i:i + batch_size].to(device)).items():
            parts.setdefault(name, []).append(value.float().cpu())
        if progress is not None:
            progress.update(min(batch_size, len(images) - i))
    return {name: torch.cat(values) for name, values in parts.items()}


def reference_features(reference: RGBReference, extractor, progress=None) -> dict[str, torch.Tensor]:
    """The features of a reference's images, from the cache when this network has seen its bytes."""

    tag = hashlib.sha256(extractor.name.encode()).hexdigest()[:8]
    return cached(f"rgbref-{reference.key}-{tag}.safetensors",
                  lambda: extract(extractor, reference.images, progress=progress))
