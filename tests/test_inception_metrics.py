"""Inception metrics for RGB models (issue 15): the arithmetic against float64 closed forms and
scipy, the reference readers and the whole scoring path with a stand-in feature network, and the
torch-fidelity path where that library imports (skipped with the reason elsewhere: it needs a
torchvision that loads)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_teachers as tt
from dkdm.cli import main
from dkdm.errors import DkdmError
from dkdm.evaluation import reference_for, score
from dkdm.metrics.features import density_coverage, frechet_distance, inception_score, mean_cov, precision_recall
from dkdm.metrics.inception import InceptionMetric, load_backend, to_uint8
from dkdm.metrics.references import read_reference


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The ADM evaluator's formula: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), float64 numpy/scipy."""
    from scipy import linalg

    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_and_the_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1
    assert frechet_distance(*mean_cov(a), *mean_cov(b)) == pytest.approx(_scipy_fid(a.numpy(), b.numpy()), rel=1e-9)
    # N(m1, diag c1) and N(m2, diag c2): |m1 - m2|^2 + sum (sqrt c1 - sqrt c2)^2
    m1, m2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    c1, c2 = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)
    want = float(((m1 - m2) ** 2).sum() + ((c1.sqrt() - c2.sqrt()) ** 2).sum())
    assert frechet_distance(m1, torch.diag(c1), m2, torch.diag(c2)) == pytest.approx(want, rel=1e-12)


def test_precision_recall_in_blocks_equal_the_brute_force_definition():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(300, 5, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(250, 5, generator=g, dtype=torch.float64) + 0.5

    def brute(r, f, k=3):  # explicit differences, no cdist
        rr = ((r[:, None] - r[None]) ** 2).sum(-1).sqrt().sort(1).values[:, k]
        ff = ((f[:, None] - f[None]) ** 2).sum(-1).sqrt().sort(1).values[:, k]
        d = ((f[:, None] - r[None]) ** 2).sum(-1).sqrt()
        return (d <= rr[None]).any(1).double().mean().item(), (d.T <= ff[None]).any(1).double().mean().item()

    want = brute(real, fake)
    assert 0.1 < want[0] < 0.99 and 0.1 < want[1] < 0.99  # a case where both can be wrong
    for block in (7, 64, 4096):
        assert precision_recall(real, fake, block=block) == pytest.approx(want, abs=1e-12)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_density_coverage_in_blocks_equal_the_brute_force_definition():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(300, 5, generator=g, dtype=torch.float64)
    fake = 0.7 * torch.randn(250, 5, generator=g, dtype=torch.float64) + 0.4

    def brute(r, f, k=5):  # Naeem et al.'s formulas with explicit differences, no cdist
        rr = ((r[:, None] - r[None]) ** 2).sum(-1).sqrt().sort(1).values[:, k]
        inside = ((f[:, None] - r[None]) ** 2).sum(-1).sqrt() <= rr[None]  # [fake, real]
        return inside.double().sum().item() / (k * len(f)), inside.any(0).double().mean().item()

    want = brute(real, fake)
    assert 0.1 < want[1] < 0.99 and want[0] > 1  # a case where both can be wrong: fakes crowd the middle
    for block in (7, 64, 4096):
        assert density_coverage(real, fake, block=block) == pytest.approx(want, abs=1e-12)


def test_density_coverage_of_a_copy_and_of_a_dropped_mode():
    # four well-separated modes; a copy covers everything at density ~1, dropping a mode costs a
    # quarter of the coverage while the kept samples stay as dense (precision cannot see it)
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0], [20, 0], [0, 20], [20, 20]])
    real = (centres[torch.arange(800) % 4] + torch.randn(800, 2, generator=g)).double()
    fresh = (centres[torch.arange(800) % 4] + torch.randn(800, 2, generator=g)).double()
    assert density_coverage(real, real.clone()) == (pytest.approx(1.0, abs=0.3), 1.0)
    density, coverage = density_coverage(real, fresh)
    assert density == pytest.approx(1.0, abs=0.15) and coverage > 0.9
    three = fresh[torch.arange(800) % 4 != 3]
    d3, c3 = density_coverage(real, three)
    assert c3 == pytest.approx(coverage * 0.75, abs=0.03) and d3 == pytest.approx(density, abs=0.15)
    assert precision_recall(real, three)[0] > 0.95


def test_inception_score_matches_its_closed_forms():
    # K classes predicted with certainty, each equally often: IS = K
    logits = 50 * F.one_hot(torch.arange(40) % 8, 8).double()
    assert inception_score(logits) == pytest.approx(8.0, rel=1e-9)
    # two classes, p(y|x) = (a, 1-a) and (1-a, a) half each: p(y) uniform, KL = a log 2a + (1-a) log 2(1-a)
    a = 0.8
    row = torch.tensor([np.log(a), np.log(1 - a)], dtype=torch.float64)
    logits = torch.stack([row, row.flip(0)] * 50)
    want = np.exp(a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a)))
    assert inception_score(logits) == pytest.approx(want, rel=1e-12)
    # splits are scored apart and averaged (the ADM evaluator's 5,000-sample splits)
    certain, uniform = 50 * F.one_hot(torch.arange(10) % 2, 2).double(), torch.zeros(10, 2, dtype=torch.float64)
    assert inception_score(torch.cat([certain, uniform]), split_size=10) == pytest.approx((2.0 + 1.0) / 2, rel=1e-9)


class StandIn:
    """A stand-in for Inception: 2x2 average-pooled pixels (12 features) and a fixed linear head."""

    def __init__(self, spatial=False):
        self.name = "stand-in-avgpool2" + ("-spatial" if spatial else "")  # names the cached features
        self.images_seen = 0
        self.head = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
        self.spatial = spatial

    def __call__(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.images_seen += len(images)
        f = F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)
        out = {"pool": f, "logits": f @ self.head}
        if self.spatial:
            out["spatial"] = F.adaptive_avg_pool2d(images.float() / 255, 1).flatten(1)
        return out


def _np_features(nhwc: np.ndarray) -> np.ndarray:
    """The stand-in's features computed independently with numpy (2x2 block means, channel-major)."""
    n, h, w, c = nhwc.shape
    x = nhwc.astype(np.float64).reshape(n, 2, h // 2, 2, w // 2, c).mean((2, 4)) / 255
    return x.transpose(0, 3, 1, 2).reshape(n, 12)


@pytest.fixture
def reference_images():
    g = np.random.default_rng(0)
    return g.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)


def _samples():
    return torch.rand(50, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2.2 - 1.1  # some outside [-1, 1]


def test_rgb_metrics_of_samples_against_an_adm_reference_batch(tmp_path, reference_images):
    np.savez(tmp_path / "VIRTUAL_tiny.npz", arr_0=reference_images)
    metric = reference_for(tmp_path / "VIRTUAL_tiny.npz", extractor=StandIn())
    samples = _samples()
    got = score(samples, metric)
    # independent path: ADM's uint8 conversion (scale, clip, truncate), numpy features, scipy FID
    u8 = np.clip((samples.double().numpy() + 1) * 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    real, fake = _np_features(reference_images), _np_features(u8)
    assert got["fid"] == pytest.approx(_scipy_fid(real, fake), rel=1e-5)
    want_pr = precision_recall(torch.from_numpy(real), torch.from_numpy(fake))
    assert (got["precision"], got["recall"]) == pytest.approx(want_pr, abs=0.02)  # float32 features
    want_dc = density_coverage(torch.from_numpy(real), torch.from_numpy(fake))
    assert (got["density"], got["coverage"]) == pytest.approx(want_dc, abs=0.02)
    assert got["inception_score"] == pytest.approx(inception_score(torch.from_numpy(fake) @ StandIn().head.double()),
                                                   rel=1e-5)
    assert torch.equal(to_uint8(samples), torch.from_numpy(u8).permute(0, 3, 1, 2))


def test_folder_and_statistics_references_give_the_same_fid(tmp_path, reference_images):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i, img in enumerate(reference_images):
        Image.fromarray(img).save(tmp_path / "imgs" / f"{i:03d}.png")
    np.savez(tmp_path / "batch.npz", arr_0=reference_images)
    mu, sigma = mean_cov(torch.from_numpy(_np_features(reference_images)))
    np.savez(tmp_path / "stats.npz", mu=mu.numpy(), sigma=sigma.numpy())
    samples = _samples()
    fids = [score(samples, reference_for(tmp_path / name, extractor=StandIn()))
            for name in ("batch.npz", "imgs", "stats.npz")]
    assert fids[0]["fid"] == pytest.approx(fids[1]["fid"], rel=1e-9)
    assert fids[2]["fid"] == pytest.approx(fids[0]["fid"], rel=1e-5)
    assert "precision" not in fids[2]  # statistics alone have no manifold to compare with


def test_reference_features_are_cached_by_content(tmp_path, reference_images):
    np.savez(tmp_path / "ref.npz", arr_0=reference_images)
    first = StandIn()
    a = score(_samples(), reference_for(tmp_path / "ref.npz", extractor=first))
    assert first.images_seen == 60 + 50
    second = StandIn()
    b = score(_samples(), reference_for(tmp_path / "ref.npz", extractor=second))
    assert second.images_seen == 50 and a == b  # the reference's features came from the cache
    np.savez(tmp_path / "ref.npz", arr_0=reference_images[:40])  # new content, new features
    third = StandIn()
    score(_samples(), reference_for(tmp_path / "ref.npz", extractor=third))
    assert third.images_seen == 40 + 50


def test_sfid_where_the_network_gives_spatial_features(tmp_path, reference_images):
    np.savez(tmp_path / "ref.npz", arr_0=reference_images)
    got = score(_samples(), reference_for(tmp_path / "ref.npz", extractor=StandIn(spatial=True)))
    u8 = to_uint8(_samples())
    ref_sp = F.adaptive_avg_pool2d(torch.from_numpy(reference_images).permute(0, 3, 1, 2).float() / 255, 1).flatten(1)
    fake_sp = F.adaptive_avg_pool2d(u8.float() / 255, 1).flatten(1)
    assert got["sfid"] == pytest.approx(_scipy_fid(ref_sp.double().numpy(), fake_sp.double().numpy()), rel=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p / "r.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32)), "must be uint8"),
    (lambda p: np.savez(p / "r.npz", arr_0=np.zeros((4, 8, 8), np.uint8)), "N x H x W x 3"),
    (lambda p: np.savez(p / "r.npz", images=np.zeros((4, 8, 8, 3), np.uint8)), "holds images; a reference .npz"),
    (lambda p: np.savez(p / "r.npz", mu=np.zeros(3), sigma=np.zeros((2, 2))), "sigma its square covariance"),
    (lambda p: (p / "r.npz").write_text("not numpy"), "cannot read reference"),
])
def test_bad_references_are_named(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DkdmError, match=message):
        read_reference(tmp_path / "r.npz")
    with pytest.raises(DkdmError, match="does not exist"):
        read_reference(tmp_path / "none.npz")


def test_statistics_from_another_network_are_refused(tmp_path):
    np.savez(tmp_path / "s.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(DkdmError, match="2048-d but the feature network gives 12-d"):
        score(_samples(), reference_for(tmp_path / "s.npz", extractor=StandIn()))


def test_reference_for_keeps_builtin_names_and_asks_for_weights(tmp_path, reference_images):
    assert reference_for("digits") == "digits"
    np.savez(tmp_path / "ref.npz", arr_0=reference_images)
    with pytest.raises(DkdmError, match="--inception-weights"):
        reference_for(tmp_path / "ref.npz")
    with pytest.raises(DkdmError, match="built-in data set with its own metrics"):
        reference_for("digits", extractor=StandIn())


@pytest.mark.parametrize("kind", ["ddpm-eps-small", "ldm"])
def test_evaluate_scores_an_rgb_model_from_the_command_line(kind, tmp_path, capsys, monkeypatch, reference_images):
    import dkdm.metrics.inception as inception

    monkeypatch.setattr(inception, "load_extractor", lambda weights, device="cpu": StandIn())
    model = tt.make(kind, tmp_path)[1]
    size = 16 if kind == "ldm" else 8  # the LDM's samples are decoded to 16x16 images
    np.savez(tmp_path / "ref.npz", arr_0=np.resize(reference_images, (60, size, size, 3)))
    torch.save({"w": torch.zeros(1)}, tmp_path / "pt_inception.pth")
    assert main(["evaluate", "--model", model, "--inception-weights", str(tmp_path / "pt_inception.pth"),
                 "--reference", str(tmp_path / "ref.npz"), "--num", "12", "--steps", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert {"fid", "inception_score", "precision", "recall"} <= set(result) and result["num_samples"] == 12
    assert result["reference"]["reference_images"] == 60 and result["fid"] > 0
    assert "scoring 12 samples of 3 steps (36 model sample-steps)" in captured.err


def test_evaluate_names_what_is_missing(tmp_path, capsys):
    model = tt.make("ddpm-eps-small", tmp_path)[1]
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pth")
    argv = ["evaluate", "--model", model, "--inception-weights", str(tmp_path / "w.pth"), "--no-progress"]
    assert main(argv) == 2
    assert "--reference REF.npz" in capsys.readouterr().err
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    try:
        load_backend()
    except DkdmError:
        assert main([*argv, "--reference", str(tmp_path / "ref.npz")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install 'dkdm[inception]'" in err[0]


def test_sample_writes_an_adm_evaluator_batch_for_rgb_models(tmp_path):
    model = tt.make("ddpm-eps-small", tmp_path)[1]
    assert main(["sample", "--model", model, "--num", "3", "--steps", "2", "--out", str(tmp_path / "s.npz"),
                 "--no-progress"]) == 0
    z = np.load(tmp_path / "s.npz")
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (3, 8, 8, 3)
    assert np.array_equal(z["arr_0"], to_uint8(torch.from_numpy(z["samples"])).permute(0, 2, 3, 1).numpy())


def test_torch_fidelity_inception_path(tmp_path, monkeypatch, reference_images):
    """The library path end to end, with random Inception weights written in the pt_inception layout."""
    try:
        load_backend()
    except DkdmError as e:
        pytest.skip(f"torch-fidelity does not load here ({e})")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from dkdm.metrics.inception import load_extractor

    with monkeypatch.context() as m:  # a random network, only to write its state dict
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        m.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "pt_inception.pth")
    np.savez(tmp_path / "ref.npz", arr_0=reference_images)
    extractor = load_extractor(tmp_path / "pt_inception.pth")
    metric = InceptionMetric(read_reference(tmp_path / "ref.npz"), extractor)
    got = metric(_samples()[:20])
    assert got["fid"] > 0 and got["inception_score"] >= 1 and 0 <= got["precision"] <= 1
    same = metric((torch.from_numpy(reference_images).permute(0, 3, 1, 2).float() + 0.5) / 127.5 - 1)
    assert abs(same["fid"]) < 1e-3 * got["fid"] + 1e-6


def test_distill_scores_an_rgb_student_during_training_and_in_its_report(tmp_path, capsys, monkeypatch,
                                                                        reference_images):
    """Issue 15 item 3 for RGB teachers: --eval-every and the final report use the Inception metrics."""
    import dkdm.metrics.inception as inception

    monkeypatch.setattr(inception, "load_extractor", lambda weights, device="cpu": StandIn())
    teacher = tt.make("ddpm-eps-small", tmp_path)[1]
    np.savez(tmp_path / "ref.npz", arr_0=reference_images)
    torch.save({"w": torch.zeros(1)}, tmp_path / "pt_inception.pth")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", teacher, "--student", "unet:widths=8-16,groups=4", "--batch", "4",
                 "--steps", "4", "--eval-every", "2", "--monitor-num", "12", "--monitor-steps", "3", "--heldout", "8",
                 "--eval-num", "12", "--eval-steps", "3", "--reference", str(tmp_path / "ref.npz"),
                 "--inception-weights", str(tmp_path / "pt_inception.pth"), "--no-progress", "--out", str(out)]) == 0
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(r["fid"] > 0 and "teacher_fd" in r for r in evals)
    report = json.loads((out / "metrics.json").read_text())
    assert report["student"]["fid"] > 0 and report["teacher"]["fid"] > 0
    assert report["student"]["reference"]["reference_images"] == 60
    assert json.loads((out / "dkdm_model.json").read_text()).get("data") is None  # no built-in data set recorded
    # the weights without a reference, and a reference of another shape, are one-line errors
    assert main(["distill", "--teacher", teacher, "--inception-weights", str(tmp_path / "pt_inception.pth"),
                 "--no-progress", "--out", str(tmp_path / "x")]) == 2
    assert "--reference REF.npz" in capsys.readouterr().err
