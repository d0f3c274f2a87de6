"""Any network as a student: an import path (package.module:Class) or a diffusers model config file."""

import json

import pytest
import torch

from dkdm.cli import main
from dkdm.errors import DkdmError
from dkdm.formats import load_model
from dkdm.students import build_net, format_spec, parse_spec
from tiny_teachers import make

FAST = ["--steps", "6", "--batch", "4", "--rho", "0.5", "--no-report", "--no-progress", "--warmup", "1"]


def test_an_import_path_parses_formats_back_and_builds_with_the_data_shape():
    spec = parse_spec("custom_nets:TinyConvNet:width=12")
    assert spec == {"type": "import", "target": "custom_nets:TinyConvNet", "classes": 0, "kwargs": {"width": 12}}
    assert parse_spec(format_spec(spec)) == spec
    net = build_net(spec, (3, 8, 8), 6)
    assert net.net.sample_shape == (3, 8, 8) and net.net.inp.out_channels == 12 and net.net.out.out_channels == 6
    assert net(torch.randn(2, 3, 8, 8), torch.tensor([0, 5])).shape == (2, 6, 8, 8)
    assert parse_spec("unet:widths=8-16")["type"] == "unet"  # a built-in type is not an import


def test_a_network_named_by_its_import_path_distils_saves_and_loads_back(tmp_path, monkeypatch):
    teacher = make("dkdm-unet", tmp_path / "t")
    out = tmp_path / "run"
    assert main(["distill", *teacher, "--student", "custom_nets:TinyConvNet:width=12", "--out", str(out), *FAST]) == 0
    # loading imports the module only where the user names it (a fresh process: nothing built yet)
    from dkdm.nets import imported

    monkeypatch.setattr(imported, "_BUILT", set())
    with pytest.raises(DkdmError, match="DKDM_TRUST_IMPORT=custom_nets:TinyConvNet"):
        load_model(out)
    monkeypatch.setenv("DKDM_TRUST_IMPORT", "custom_nets:TinyConvNet")
    model = load_model(out)
    assert type(model.net.net).__name__ == "TinyConvNet" and model.net.net.inp.out_channels == 12
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.net.state_dict().items())
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 7, 19])
    assert torch.isfinite(model(x, t)).all()


def test_a_run_of_an_imported_network_reports_and_resumes_without_naming_it_again(tmp_path):
    # the run's own report loads the student back: the class the user named is trusted in that process
    teacher = make("dkdm-unet", tmp_path / "t")
    out = tmp_path / "run"
    with_report = [a for a in FAST if a != "--no-report"] + ["--eval-num", "8", "--eval-steps", "2"]
    assert main(["distill", *teacher, "--student", "custom_nets:TinyConvNet", "--out", str(out), *with_report]) == 0
    assert (out / "metrics.json").exists() and (out / "samples.png").exists()


def test_an_imported_network_of_a_conditional_teacher_gets_the_labels(tmp_path):
    teacher = make("dkdm-dit-cond", tmp_path / "t")
    out = tmp_path / "run"
    assert main(["distill", *teacher, "--student", "custom_nets:TinyConvNet", "--out", str(out), *FAST]) == 0
    spec = json.loads((out / "dkdm_model.json").read_text())["spec"]
    assert spec["classes"] == 3 and spec["target"] == "custom_nets:TinyConvNet"


@pytest.mark.parametrize("cls", ["UNet2DModel", "DiTTransformer2DModel"])
def test_a_diffusers_config_file_is_a_student(tmp_path, cls):
    import diffusers

    if cls == "UNet2DModel":
        model = diffusers.UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1)
    else:
        model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                                num_layers=1, sample_size=32, patch_size=2)
    model.save_config(tmp_path / "cfg")
    config = tmp_path / "cfg" / "config.json"
    teacher = make("dkdm-unet", tmp_path / "t")
    out = tmp_path / "run"
    assert main(["distill", *teacher, "--student", str(config), "--out", str(out), *FAST]) == 0
    back = load_model(out)  # no code named: diffusers' own classes only
    inner = back.net.unet if cls == "UNet2DModel" else back.net.dit
    assert type(inner).__name__ == cls
    # the file's architecture, the data's channels and size (3x8x8, learned variance: 6 out)
    assert inner.config.in_channels == 3 and inner.config.out_channels == 6 and inner.config.sample_size == 8
    if cls == "UNet2DModel":
        assert tuple(inner.config.block_out_channels) == (8, 16)
    else:
        assert inner.config.num_layers == 1 and inner.config.attention_head_dim == 8


@pytest.mark.parametrize("spec,msg", [
    ("no_such_module_xyz.nets:Net", "cannot import no_such_module_xyz.nets"),
    ("custom_nets:Missing", "no torch.nn.Module subclass named Missing"),
    ("custom_nets:NotANetwork", "no torch.nn.Module subclass named NotANetwork"),
    ("custom_nets:WrongArguments", "WrongArguments.*failed"),
    ("custom_nets:TinyConvNet:depth", "expected key=value"),
    ("missing_config.json", "does not exist"),
])
def test_bad_network_names_fail_in_one_line(tmp_path, capsys, spec, msg):
    teacher = make("dkdm-unet", tmp_path / "t")
    assert main(["distill", *teacher, "--student", spec, "--out", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    import re

    assert re.search(msg, err), err


def test_a_config_of_another_class_is_refused(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(DkdmError, match="_class_name is one of UNet2DModel"):
        parse_spec(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(DkdmError, match="JSON object"):
        parse_spec(str(bad))
