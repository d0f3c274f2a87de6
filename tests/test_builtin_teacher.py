"""The digits teacher shipped in the package, and the no-argument `dkdm distill` (slow)."""

import json

import pytest
import torch

from dkdm.formats import load_model
from dkdm.formats.dkdm_dir import BUILTIN_TEACHERS

TEACHER = BUILTIN_TEACHERS["digits"]


def test_bundled_teacher_is_the_kind_of_model_the_paper_distils():
    size = sum(f.stat().st_size for f in TEACHER.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    m = load_model("builtin:digits")
    assert m.variance == "learned_range" and m.schedule.num_steps == 1000
    assert m.schedule.config["schedule"] == "cosine" and m.spec["type"] == "unet"
    assert m.sample_shape == (1, 8, 8) and m.extra["data"] == "digits"


def test_bundled_teacher_samples_through_plain_diffusers():
    from diffusers import DDPMPipeline

    from dkdm.metrics.digits import load_classifier

    pipe = DDPMPipeline.from_pretrained(TEACHER)
    images = pipe(batch_size=32, num_inference_steps=20, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (32, 8, 8, 1)
    # digits, not noise: the shipped classifier is sure of most of them, and of none of 32 noise images
    classifier = load_classifier()

    def confidence(x):
        with torch.no_grad():
            return classifier(torch.as_tensor(x).permute(0, 3, 1, 2).float() * 2 - 1).softmax(-1).amax(-1)

    noise = torch.rand(32, 8, 8, 1, generator=torch.Generator().manual_seed(1)).numpy()
    assert (confidence(images) > 0.9).float().mean() >= 0.75
    assert (confidence(noise) > 0.9).float().mean() <= 0.25


@pytest.mark.slow
def test_default_distill_meets_the_digits_targets(tmp_path, capsys):
    from dkdm.cli import main

    assert main(["distill", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    teacher, student, real = m["teacher"], m["student"], m["real train split"]
    print(json.dumps({k: {kk: m[k][kk] for kk in ("digits_fid", "precision", "recall")}
                      for k in ("teacher", "student", "real train split")}))
    assert student["digits_fid"] <= 1.5 * teacher["digits_fid"]
    assert student["recall"] >= 0.8 * teacher["recall"]
    assert student["missing_classes"] == []
    assert teacher["digits_fid"] <= 1.5 * real["digits_fid"]
