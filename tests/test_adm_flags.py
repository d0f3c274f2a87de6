"""improved-diffusion and guided-diffusion flag files load as their scripts read them.

Checked against the two code bases' own definitions, computed here independently: the reverse
step's variance in float64 from the betas (fixed_small = the posterior variance with
sigma_small, else beta_t), the timesteps the network sees (rescaled to 0..1000 where
rescale_timesteps is on, improved-diffusion's default and not guided-diffusion's), and the
training-only flags the scripts save being accepted without changing anything.
"""

import numpy as np
import pytest
import torch
import yaml

import tiny_teachers as tt
from dkdm.cli import main
from dkdm.errors import DkdmError
from dkdm.formats import load_model
from dkdm.nets.adm import ADMUNet
from dkdm.nets.adm import parse_flags


def _cosine_betas(steps):
    """improved-diffusion's cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999."""
    abar = lambda s: np.cos((s / steps + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - abar(i + 1) / abar(i), 0.999) for i in range(steps)])


def _write(tmp_path, flags, suffix=".pt"):
    return tt.adm_checkpoint(tmp_path, flags, suffix, "m")


@pytest.mark.parametrize("sigma_small, learn_sigma, want", [
    (True, False, "fixed_small"), (False, False, "fixed_large"), (True, True, "learned_range"),
])
def test_sigma_small_selects_the_variance_as_improved_diffusion_does(tmp_path, sigma_small, learn_sigma, want):
    args = _write(tmp_path, {**tt.IMPROVED_FLAGS, "sigma_small": sigma_small, "learn_sigma": learn_sigma})
    model = load_model(args[1], config=args[3])
    assert model.variance == want
    if learn_sigma:
        return
    b = _cosine_betas(tt.T)
    abar = np.cumprod(1 - b)
    posterior = b * (1 - np.concatenate([[1.0], abar[:-1]])) / (1 - abar)
    expected = posterior if sigma_small else np.concatenate([[posterior[1]], b[1:]])  # improved's fixed_large
    x = torch.randn(tt.T, 3, 32, 32)
    with torch.no_grad():
        step = model.reverse(x, torch.arange(tt.T))
    got = step.variance[:, 0, 0, 0].double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_improved_diffusion_flags_rescale_timesteps_by_default(tmp_path):
    """improved-diffusion feeds the network t * 1000 / diffusion_steps unless told otherwise."""
    args = _write(tmp_path, tt.IMPROVED_FLAGS)
    model = load_model(args[1], config=args[3])
    assert model.spec["rescale_timesteps"] is True and "lr" not in model.spec and "data_dir" not in model.spec
    plain = ADMUNet(parse_flags({**tt.IMPROVED_FLAGS, "rescale_timesteps": False})).eval()
    plain.load_state_dict(model.net.adm.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 17])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), plain(x, t.double() * 1000 / tt.T).float(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x, t), plain(x, t), atol=1e-3)
    stated = _write(tmp_path / "s", {**tt.IMPROVED_FLAGS, "rescale_timesteps": False})
    assert load_model(stated[1], config=stated[3]).spec["rescale_timesteps"] is False


def test_guided_diffusion_flags_do_not_rescale_and_an_undecidable_file_is_refused():
    guided = parse_flags(tt.ADM_FLAGS)  # channel_mult / num_head_channels: guided-diffusion's flags
    assert guided["rescale_timesteps"] is False
    neither = {"image_size": 32, "num_channels": 32, "learn_sigma": True}
    assert parse_flags({**neither, "diffusion_steps": 1000})["rescale_timesteps"] is False  # 1000/1000: same t
    with pytest.raises(DkdmError, match="add rescale_timesteps: true or false"):
        parse_flags({**neither, "diffusion_steps": 4000})
    assert parse_flags({**neither, "diffusion_steps": 4000, "rescale_timesteps": True})["rescale_timesteps"]


def test_training_and_sampling_flags_are_accepted_and_unknown_names_refused():
    flags = {**tt.ADM_FLAGS, "use_kl": True, "rescale_learned_sigmas": True, "schedule_sampler": "loss-second-moment",
             "weight_decay": 0.05, "lr_anneal_steps": 100, "fp16_scale_growth": 1e-3, "num_samples": 50000,
             "use_ddim": False, "model_path": "/m.pt", "classifier_scale": 1.0, "timestep_respacing": str(tt.T)}
    parsed = parse_flags(flags)
    net, base = ADMUNet(parsed), ADMUNet(parse_flags(tt.ADM_FLAGS))
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    for bad, message in [({"num_chanels": 32}, "unknown ADM flag(s) num_chanels"),
                         ({"timestep_respacing": "250"}, "timestep_respacing is a sampling setting"),
                         ({"large_size": 256, "small_size": 64}, "super-resolution")]:
        with pytest.raises(DkdmError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_flags({**tt.ADM_FLAGS, **bad})


def test_clip_denoised_false_turns_off_x0_clipping(tmp_path):
    args = _write(tmp_path, {**tt.ADM_FLAGS, "clip_denoised": False})
    assert not load_model(args[1], config=args[3]).clip_x0
    args = _write(tmp_path / "d", tt.ADM_FLAGS)
    assert load_model(args[1], config=args[3]).clip_x0


def test_convert_to_diffusers_refuses_rescaled_timesteps(tmp_path, capsys):
    args = _write(tmp_path, {**tt.ADM_FLAGS, "rescale_timesteps": True})  # UNet2DModel knows no scaling of t
    assert main(["convert", "--checkpoint", args[1], "--config", args[3], "--format", "diffusers",
                 "--out", str(tmp_path / "out")]) == 2
    assert "rescale_timesteps" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", args[1], "--config", args[3], "--out", str(tmp_path / "dkdm")]) == 0
    again = load_model(tmp_path / "dkdm")
    assert again.spec["rescale_timesteps"] is True


def test_flags_file_written_by_hand_as_yaml_distills(tmp_path):
    """The README's improved-diffusion CIFAR-10 flags (shrunk), as a user would copy them into YAML."""
    flags = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "learn_sigma": True, "dropout": 0.3,
             "diffusion_steps": tt.T, "noise_schedule": "cosine", "lr": 1e-4, "batch_size": 128, "sigma_small": False,
             "attention_resolutions": "8"}
    args = _write(tmp_path, flags, ".safetensors")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(flags))
    assert main(["distill", *args, "--pool", "shuffled", "--batch", "2", "--steps", "1", "--prep", "sampled",
                 "--prep-steps", "2", "--no-progress", "--no-report", "--out", str(tmp_path / "run")]) == 0
    student = load_model(tmp_path / "run")
    assert student.spec["type"] == "adm" and student.spec["rescale_timesteps"] is True


def test_class_cond_checkpoint_without_a_class_count_reads_it_from_its_weights(tmp_path, capsys):
    """guided-diffusion's scripts take no class-count flag (NUM_CLASSES is 1000 in its code), so a
    10-class checkpoint's flags say only ``class_cond: true``: it loads, says so in one line, and
    computes what the same checkpoint loaded with ``num_classes: 10`` computes."""
    flags = {**tt.IMPROVED_FLAGS, "class_cond": True, "num_classes": 10}
    args = _write(tmp_path, flags)
    as_written = tmp_path / "as_written.yaml"
    as_written.write_text(yaml.safe_dump({k: v for k, v in flags.items() if k != "num_classes"}))
    model = load_model(args[1], config=str(as_written))
    err = capsys.readouterr().err
    assert "10 classes, read from its label_emb.weight" in err and len(err.strip().splitlines()) == 1
    given = load_model(args[1], config=args[3])
    assert model.num_classes == given.num_classes == 10
    x, t, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 7, 15]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(model.net(x, t, y), given.net(x, t, y), rtol=0, atol=0)
    assert capsys.readouterr().err == ""  # the count given: nothing to say
    # a count given that the weights contradict is named in one line
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({**flags, "num_classes": 1000}))
    with pytest.raises(DkdmError, match=r"label_emb.weight has shape \[10, .*check num_classes"):
        load_model(args[1], config=str(wrong))
