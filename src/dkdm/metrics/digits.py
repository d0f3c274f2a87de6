"""digits-FID: the analogue of FID for 8x8 digits, in the feature space of a small shipped classifier.

Inception features mean nothing on 8x8 grey digits, so dkdm ships a small CNN trained on the
digits train split (``scripts/train_digits_classifier.py``; weights in ``dkdm/assets``). Its
128-d penultimate layer plays Inception's pool3 role: digits-FID is the Fréchet distance
between Gaussian fits of real and generated features; precision/recall use k-NN manifolds in
the same space; the classifier's predictions give the class histogram.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import DkdmError
from . import cached
from .features import density_coverage, frechet_distance, mean_cov, precision_recall

WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier.safetensors"
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, FEATURE_DIM), nn.GELU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def embed(self, x):
        return self.features(self.conv(x))

    def forward(self, x):
        return self.head(self.embed(x))


def load_classifier(path: Path = WEIGHTS) -> DigitsClassifier:
    if not path.exists():
        raise DkdmError(f"digits classifier weights missing at {path}; run scripts/train_digits_classifier.py")
    net = DigitsClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def embed(net: DigitsClassifier, images: torch.Tensor, batch: int = 2048):
    feats, preds = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float().clamp(-1, 1)
        f = net.embed(x)
        feats.append(f)
        preds.append(net.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def reference_features(split: str = "test") -> torch.Tensor:
    """Features of a real split, cached on disk keyed by the classifier's weights."""
    from ..data import Digits

    key = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()[:16]
    return cached(f"digits-{split}-{key}.safetensors",
                  lambda: {"features": embed(load_classifier(), Digits(split).images)[0]})["features"]


def digits_metrics(images: torch.Tensor, split: str = "test", labels: torch.Tensor | None = None) -> dict:
    """digits-FID, precision, recall, density, coverage and the predicted-class histogram of ``images``
    [N,1,8,8] with its total-variation distance from the uniform one (``class_tv``: 0 when every digit
    is drawn equally often, 0.1 when one of ten is never drawn and the rest equally); with the
    ``labels`` a conditional model drew them for, the classifier's agreement with them."""
    real = reference_features(split)
    fake, preds = embed(load_classifier(), images)
    fid = frechet_distance(*mean_cov(real), *mean_cov(fake))
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    hist = torch.bincount(preds, minlength=10)
    tv = 0.5 * (hist.double() / hist.sum() - 0.1).abs().sum()
    out = {"digits_fid": fid, "precision": precision, "recall": recall, "density": density, "coverage": coverage,
           "class_histogram": hist.tolist(), "class_tv": float(tv),
           "missing_classes": [i for i in range(10) if hist[i] == 0]}
    if labels is not None:
        out["label_accuracy"] = (preds.cpu() == labels.cpu()).double().mean().item()
    return out
