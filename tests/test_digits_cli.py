"""Digits end to end at toy size: train and distill write a diffusers pipeline, a grid and metrics."""

import json

import pytest
import torch

from dkdm.cli import main

TINY = ["--diffusion-steps", "20", "--model", "unet:widths=8-16,layers=1,groups=4", "--batch", "16",
        "--eval-num", "60", "--eval-steps", "5", "--no-progress"]


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "teacher"
    assert main(["train", "--data", "digits", "--steps", "20", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_pipeline_grid_and_metrics(digits_teacher):
    from diffusers import DDPMPipeline

    metrics = json.loads((digits_teacher / "metrics.json").read_text())
    assert set(metrics) == {"model", "real train split"}
    for key in ("digits_fid", "precision", "recall", "class_histogram"):
        assert key in metrics["model"]
    assert sum(metrics["model"]["class_histogram"]) == 60
    from PIL import Image

    img = Image.open(digits_teacher / "samples.png")
    assert img.size[0] > 100 and img.size[1] > 50  # 10 columns x 6 rows of enlarged 8x8 digits
    pipe = DDPMPipeline.from_pretrained(digits_teacher)
    out = pipe(batch_size=2, num_inference_steps=5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 8, 8, 1) and (out >= 0).all() and (out <= 1).all()


def test_diffusers_unet_matches_our_model(digits_teacher):
    from diffusers import UNet2DModel

    from dkdm.formats import load_model

    ours = load_model(digits_teacher)
    theirs = UNet2DModel.from_pretrained(digits_teacher / "unet").eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 7, 19])
    with torch.no_grad():
        assert torch.equal(ours(x, t), theirs(x, t).sample)


def test_distill_from_digits_teacher_reports_both(digits_teacher, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(digits_teacher), "--student", "dit:patch=2,depth=1,width=16,heads=2",
                 "--steps", "10", "--batch", "8", "--rho", "0.1", "--eval-num", "60", "--eval-steps", "5",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| student |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student", "real train split", "student vs teacher"}
    assert (out / "samples.png").exists()


@pytest.mark.parametrize("argv,msg", [
    (["distill", "--teacher", "builtin:cifar10"], "unknown built-in model"),
    (["distill", "--teacher", "{teacher}", "--student", "unet:widths=8-16-16-16-16,groups=4"], "divisible by 16"),
    (["distill", "--teacher", "{teacher}", "--student", "mlp"], "vector data"),
    (["distill", "--teacher", "{teacher}", "--student", "dit:patch=3"], "must divide the image size"),
    (["evaluate", "--model", "{teacher}", "--inception-weights", "{tmp}/none.pth"], "does not exist"),
    (["evaluate", "--model", "{teacher}", "--inception-weights", "{tmp}/notes.txt"], "neither a torch zip"),
    (["evaluate", "--model", "{teacher}", "--inception-weights", "{tmp}/w.safetensors"], "apply to RGB image models"),
    (["sample", "--model", "{teacher}", "--out", "{tmp}/x.jpg"], ".png"),
])
def test_digits_bad_input(digits_teacher, tmp_path, capsys, argv, msg):
    argv = [a.format(teacher=digits_teacher, tmp=tmp_path) for a in argv] + ["--no-progress"]
    (tmp_path / "notes.txt").write_text("these are not weights")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    if argv[0] == "distill":
        argv += ["--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "r").exists()
