"""The library takes objects (issue 30): ``dkdm.distill(teacher=DiffusionModel, student=nn.Module)``
with every rule of a run: the report, run.json, the lock and resume from Python."""

import json

import pytest
import torch

import dkdm
from custom_nets import TinyConvNet
from dkdm.cli import main
from dkdm.errors import DkdmError
from dkdm.formats import load_model
from dkdm.metrics.teacher_fd import weights_fingerprint
from tiny_teachers import load, make

FAST = {"batch": 4, "rho": 0.5, "warmup": 1, "progress": False}


def test_a_teacher_model_and_a_student_network_distil_report_and_resume_from_python(tmp_path):
    teacher = load(make("dkdm-unet", tmp_path / "t"))
    digest = weights_fingerprint(teacher.net)
    net = TinyConvNet((3, 8, 8), 6, 0, width=12)
    out = tmp_path / "run"
    result = dkdm.distill(teacher=teacher, student=net, out=str(out), steps=4, eval_num=8, eval_steps=2, **FAST)
    run = json.loads((out / "run.json").read_text())
    assert run["teacher"] == f"python:UNetNet@{digest}" and run["student"] == "python:TinyConvNet"
    assert result["last"]["step"] == 4 and (out / "metrics.json").exists() and (out / "samples.png").exists()
    saved = load_model(out, net=TinyConvNet((3, 8, 8), 6, 0, width=12))
    assert saved.variance == "learned_range" and saved.extra["teacher"] == run["teacher"]
    assert not all(torch.equal(a, b) for a, b in zip(saved.net.state_dict().values(),
                                                       TinyConvNet((3, 8, 8), 6, 0, width=12).state_dict().values()))
    # resumed from Python with the same objects; a different teacher is refused, as is the command line
    result = dkdm.distill(teacher=teacher, student=TinyConvNet((3, 8, 8), 6, 0, width=12), out=str(out), steps=6,
                          resume=True, no_report=True, **FAST)
    assert result["last"]["step"] == 6
    other = load(make("dkdm-unet", tmp_path / "t2"))
    with torch.no_grad():
        next(other.net.parameters()).add_(1.0)
    with pytest.raises(DkdmError, match="teacher"):
        dkdm.distill(teacher=other, student=net, out=str(out), steps=8, resume=True, **FAST)
    assert main(["distill", "--out", str(out), "--resume", "--steps", "8", "--no-progress"]) == 2


def test_a_fixed_variance_network_a_model_and_bad_objects(tmp_path, capsys):
    from dkdm.model import DiffusionModel

    teacher = load(make("dkdm-unet", tmp_path / "t"))
    out = tmp_path / "fixed"
    dkdm.distill(teacher=teacher, student=TinyConvNet((3, 8, 8), 3, 0), out=str(out), steps=2, no_report=True, **FAST)
    assert load_model(out, net=TinyConvNet((3, 8, 8), 3, 0)).variance == "fixed_small"
    student = DiffusionModel.student_of(teacher, "dit:patch=2,depth=1,width=16,heads=2")
    dkdm.distill(teacher=teacher, student=student, out=str(tmp_path / "model"), steps=2, no_report=True, **FAST)
    assert load_model(tmp_path / "model").spec["type"] == "dit"  # a spec'd model loads back by itself
    with pytest.raises(DkdmError, match="not a bare Linear"):
        dkdm.distill(teacher=torch.nn.Linear(2, 2), out=str(tmp_path / "a"), steps=1, **FAST)
    with pytest.raises(DkdmError, match="outputs 5 channels"):
        dkdm.distill(teacher=teacher, student=TinyConvNet((3, 8, 8), 5, 0), out=str(tmp_path / "b"), steps=1, **FAST)
    with pytest.raises(DkdmError, match="failed on a sample of the teacher's shape"):
        dkdm.distill(teacher=teacher, student=TinyConvNet((1, 8, 8), 2, 0), out=str(tmp_path / "c"), steps=1, **FAST)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_teacher_object_scored_against_a_data_set_is_cached_by_its_weights(tmp_path, monkeypatch):
    """The bundled teacher given as an object, with --reference digits: its report rows are cached
    by its weights (it has no directory), and the second run reads them back."""
    monkeypatch.setenv("DKDM_CACHE", str(tmp_path / "cache"))
    teacher = load_model("builtin:digits")
    common = dict(student="unet:widths=8-16,layers=1,groups=4", steps=2, rho=0.01, prep_steps=2, eval_num=16,
                  eval_steps=2, reference="digits", progress=False)
    first = dkdm.distill(teacher=teacher, out=str(tmp_path / "a"), **common)
    cached = list((tmp_path / "cache").glob("eval-*.json"))
    assert len(cached) == 1 and "digits_fid" in first["report"]["teacher"]
    second = dkdm.distill(teacher=load_model("builtin:digits"), out=str(tmp_path / "b"), **common)
    assert second["report"]["teacher"] == first["report"]["teacher"]
    assert list((tmp_path / "cache").glob("eval-*.json")) == cached


def test_fewstep_takes_a_teacher_object_and_its_distill_runs_pool(tmp_path, capsys):
    teacher = load(make("dkdm-unet", tmp_path / "t"))
    run = tmp_path / "d"
    dkdm.distill(teacher=teacher, student="unet:widths=8-16,layers=1,groups=4", out=str(run), steps=2, no_report=True,
                 **FAST)
    capsys.readouterr()
    result = dkdm.fewstep(teacher=teacher, student=str(run), sampler_steps=4, out=str(tmp_path / "f"), steps=2,
                          no_report=True, **FAST)
    assert result["last"]["step"] == 2 and "taken over from" in capsys.readouterr().err
    with pytest.raises(DkdmError, match="not a network object"):
        dkdm.fewstep(teacher=teacher, student=TinyConvNet((3, 8, 8), 3, 0), sampler_steps=2, out=str(tmp_path / "g"))
