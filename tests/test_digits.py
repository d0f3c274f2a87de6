"""Digits data, the shipped feature classifier, and digits-FID / precision / recall."""

import numpy as np
import pytest
import torch

from dkdm.data import Digits
from dkdm.metrics.digits import digits_metrics, embed, load_classifier
from dkdm.metrics.features import frechet_distance, mean_cov, precision_recall


def test_split_is_fixed_disjoint_and_scaled():
    train, test, again = Digits("train"), Digits("test"), Digits("test")
    assert len(train) == 1437 and len(test) == 360
    assert torch.equal(test.images, again.images)
    assert train.images.min() == -1 and train.images.max() == 1 and train.images.shape[1:] == (1, 8, 8)
    a = {tuple(x.flatten().tolist()) for x in train.images}
    b = {tuple(x.flatten().tolist()) for x in test.images}
    assert len(b - a) > 340  # (a few digits in the set are pixel-identical duplicates)


def test_shipped_classifier_is_accurate_on_the_test_split():
    test = Digits("test")
    _, pred = embed(load_classifier(), test.images)
    assert (pred == test.labels).float().mean() >= 0.97


def test_frechet_distance_matches_closed_form_and_scipy():
    # diagonal covariances commute: FD = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    c1, c2 = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)), torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(1 + 1 + 4, rel=1e-10)
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    c1, c2 = a @ a.T, b @ b.T
    ref = np.trace(c1.numpy() + c2.numpy() - 2 * linalg.sqrtm(c1.numpy() @ c2.numpy()).real)
    assert frechet_distance(torch.zeros(6, dtype=torch.float64), c1, torch.zeros(6, dtype=torch.float64), c2) == pytest.approx(ref, rel=1e-8)


def test_precision_recall_see_coverage_and_fidelity():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 4, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    collapsed = real[real[:, 0] > 1.0]  # faithful samples from one corner only
    p, r = precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.5


def test_digits_metrics_rank_real_above_broken_models():
    train = Digits("train").images
    real = digits_metrics(train)
    assert real["missing_classes"] == [] and real["recall"] > 0.6 and real["precision"] > 0.6
    only_zeros = train[Digits("train").labels == 0]
    collapsed = digits_metrics(only_zeros)
    assert collapsed["missing_classes"] == list(range(1, 10))
    assert collapsed["digits_fid"] > 5 * real["digits_fid"] and collapsed["recall"] < 0.3
    # the diversity figures see the collapse that precision does not
    assert real["coverage"] > 0.8 and real["density"] > 0.7 and real["class_tv"] < 0.02
    assert collapsed["coverage"] < 0.2 and collapsed["class_tv"] > 0.85
    nine = digits_metrics(train[Digits("train").labels != 7])  # one mode dropped, the rest intact
    assert nine["class_tv"] == pytest.approx(0.1, abs=0.02) and nine["missing_classes"] in ([], [7])
    assert nine["coverage"] < real["coverage"] - 0.05 and nine["precision"] > 0.95 * real["precision"]
    noise = digits_metrics(torch.rand(500, 1, 8, 8) * 2 - 1)
    assert noise["digits_fid"] > 5 * real["digits_fid"]
    assert noise["precision"] < 0.5 * real["precision"] and noise["recall"] < 0.2
