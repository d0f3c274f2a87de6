"""configs/: the paper's settings as files. Each teacher flags file builds the paper's teacher
(parameters counted on the meta device), each run config its student at the paper's size, and each
runs `dkdm distill --config ... --dry-run` against a small stand-in teacher of the same shape."""

from pathlib import Path

import pytest
import torch

from dkdm.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: (run config, its teacher flags file or None, sample shape, paper's teacher and student parameters in M)
RUNS = [("cifar10_32", "cifar10_32", (3, 32, 32), 57, 14), ("imagenet_32", "imagenet_32", (3, 32, 32), 57, 14),
        ("celeba_64", "celeba_64", (3, 64, 64), 295, 57), ("celebahq_256_latent", None, (3, 64, 64), None, None)]


def _parameters(spec, shape) -> int:
    from dkdm.model import DiffusionModel
    from dkdm.diffusion import Schedule
    from dkdm.students import count_parameters

    schedule = Schedule.named("cosine", 1000)
    with torch.device("meta"):  # no memory for the weights
        model = DiffusionModel.build(spec, shape, schedule)
    return count_parameters(model.net)


@pytest.mark.parametrize("name, teacher, shape, teacher_m, student_m", RUNS, ids=[r[0] for r in RUNS])
def test_config_builds_the_papers_models_and_dry_runs(name, teacher, shape, teacher_m, student_m, tmp_path, capsys):
    from dkdm.formats.adm import read_flags
    from dkdm.settings import read_config

    config = read_config(CONFIGS / f"{name}.yaml")
    if teacher is not None:
        flags = read_flags(CONFIGS / "teachers" / f"{teacher}.yaml")
        assert _parameters({"type": "adm", **flags}, shape) / 1e6 == pytest.approx(teacher_m, rel=0.03)
        assert _parameters(config["student"], shape) / 1e6 == pytest.approx(student_m, rel=0.05)
    stand_in = tmp_path / "teacher"
    c, size = shape[0], shape[1]
    assert main(["train", "--data", "digits", "--steps", "1", "--diffusion-steps", "1000", "--no-progress", "--no-report",
                 "--model", "unet:widths=8-8,layers=1,groups=4", "--out", str(tmp_path / "digits")]) == 0
    from dkdm.formats import load_model, save_model
    from dkdm.model import DiffusionModel

    small = load_model(tmp_path / "digits")
    save_model(DiffusionModel.build("unet:widths=8-8,layers=1,groups=4", (c, size, size), small.schedule,
                                    variance="learned_range", clip_x0=True), stand_in)
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["distill", "--config", str(CONFIGS / f"{name}.yaml"), "--teacher", str(stand_in), "--dry-run",
                 "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "dry run: stopped before preparing the pool" in err and not out.exists()
    entries = round(float(config["rho"]) * 1000) * int(config["batch"])
    assert f"pool: dynamic, {entries} entries x {list(shape)}" in err
    if student_m:
        assert f"student: adm:" in err
