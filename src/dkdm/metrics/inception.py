"""Inception metrics (FID, IS, precision, recall, density, coverage; sFID where the network gives spatial features)
of RGB samples against a user's reference, in the feature space of torch-fidelity's Inception.

torch-fidelity ports the TF Inception graph of 2015-12-05 that the ADM evaluator (and so the
DKDM paper) uses, with TF1's bilinear resize to 299: its pool3 features and logits are the ones
the ADM evaluator computes. It needs torchvision, so it is an optional extra
(``pip install 'dkdm[inception]'``) imported only when a metric is asked for, with the user's
local weights (the pt_inception file torch-fidelity would otherwise download). The arithmetic
(features.py) and the reference readers (references.py) take any feature network, so they are
tested with a stand-in. torch-fidelity has no spatial (mixed_6/conv) features, so sFID is given
only by an extractor that provides ``spatial`` features.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import DkdmError
from . import cache_dir
from .features import density_coverage, frechet_distance, inception_score, mean_cov, precision_recall
from .references import RGBReference, extract, reference_features


def check_weights(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DkdmError(f"--inception-weights {p} does not exist; pass the local pt_inception weights file")
    if not p.is_file():
        raise DkdmError(f"--inception-weights {p} is not a file")
    with open(p, "rb") as f:
        head = f.read(8)
    if not (head.startswith(b"PK") or len(head) == 8 and int.from_bytes(head, "little") < 10**8):
        raise DkdmError(f"--inception-weights {p} is neither a torch zip archive nor safetensors; pass pt_inception weights")
    return p


def check_rgb(sample_shape) -> None:
    if len(sample_shape) != 3 or sample_shape[0] != 3:
        raise DkdmError(
            f"Inception metrics apply to RGB image models; this model draws {list(sample_shape)} samples "
            "(for digits use the default digits-FID)"
        )


def load_backend():
    try:
        import torch_fidelity  # noqa: F401
    except Exception as e:  # ImportError, or torchvision failing to load its operators
        raise DkdmError(
            f"Inception metrics need the optional extra: pip install 'dkdm[inception]' "
            f"(torch-fidelity + a torchvision matching your torch); it failed to load: {e.__class__.__name__}"
        )
    return torch_fidelity


def _weights_file(path: Path) -> Path:
    """The weights as a file torch-fidelity can load, checked to hold tensors only: a ``.pth`` that
    needs no unpickling of code, or safetensors converted once into the cache."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
        out = cache_dir() / f"inception-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}.pth"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, out)
        return out
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, or not a torch file
        raise DkdmError(f"--inception-weights {path} is not a plain weights file ({e.__class__.__name__}); dkdm never "
                        f"unpickles code: pass the pt_inception state dict")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DkdmError(f"--inception-weights {path} does not hold a state dict")
    return path


class TorchFidelityInception:
    """torch-fidelity's ``inception-v3-compat``: pool3 (2048) features and unbiased logits, as the
    ADM evaluator takes them, of uint8 images of any size (resized inside, as TF's graph does)."""

    def __init__(self, weights, device="cpu"):
        load_backend()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = check_weights(weights)
        self.device = torch.device(device)
        self.name = f"torch-fidelity-inception-v3-compat-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=str(_weights_file(path)))
        except RuntimeError as e:
            raise DkdmError(f"--inception-weights {path} do not fit torch-fidelity's Inception: {str(e).splitlines()[0]}")
        self.net = net.to(self.device).eval()

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images)
        return {"pool": pool, "logits": logits}


def load_extractor(weights, device="cpu"):
    """The Inception network the metrics use (replaceable in tests by any extractor)."""
    return TorchFidelityInception(weights, device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] as the uint8 images ADM's sampling script saves (scaled, clamped, truncated)."""
    return ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


class InceptionMetric:
    """FID / IS / precision / recall (and sFID) of samples against one RGB reference, in one feature
    network's space; the reference's side is computed once (and cached on disk)."""

    def __init__(self, reference: RGBReference, extractor, k: int = 3):
        self.reference = reference
        self.extractor = extractor
        self.k = k
        self._ref: dict | None = None

    def describe(self) -> dict:
        return {"reference": self.reference.source, "reference_sha256": self.reference.key,
                "features": self.extractor.name, "reference_images": len(self.reference) or None}

    def reference_side(self, progress=None) -> dict:
        if self._ref is None:
            if self.reference.stats is not None:
                self._ref = dict(self.reference.stats)
            else:
                feats = reference_features(self.reference, self.extractor, progress)
                self._ref = {"features": feats["pool"], **dict(zip(("mu", "sigma"), mean_cov(feats["pool"])))}
                if "spatial" in feats:
                    self._ref.update(zip(("mu_s", "sigma_s"), mean_cov(feats["spatial"])))
        return self._ref

    def __call__(self, samples: torch.Tensor, progress=None) -> dict:
        """Metrics of images in [-1, 1] (N x 3 x H x W), e.g. a model's decoded samples."""
        check_rgb(tuple(samples.shape[1:]))
        ref = self.reference_side()
        fake = extract(self.extractor, to_uint8(samples), progress=progress)
        if fake["pool"].shape[1] != ref["mu"].shape[0]:
            raise DkdmError(f"the reference statistics are {ref['mu'].shape[0]}-d but the feature network gives "
                            f"{fake['pool'].shape[1]}-d features; the statistics must come from the same network")
        out = {"fid": frechet_distance(ref["mu"], ref["sigma"], *mean_cov(fake["pool"]))}
        if "spatial" in fake and "mu_s" in ref:
            out["sfid"] = frechet_distance(ref["mu_s"], ref["sigma_s"], *mean_cov(fake["spatial"]))
        if "logits" in fake:
            out["inception_score"] = inception_score(fake["logits"])
        if "features" in ref:  # 50,000 x 50,000 distances: on the network's device
            dev = getattr(self.extractor, "device", "cpu")
            real, pool = ref["features"].to(dev), fake["pool"].to(dev)
            out["precision"], out["recall"] = precision_recall(real, pool, self.k)
            out["density"], out["coverage"] = density_coverage(real, pool)
        return out
