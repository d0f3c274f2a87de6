"""diffusers pixel pipelines as teachers: read as diffusers itself reads them, offline."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from dkdm.cli import main
from dkdm.diffusion import reverse_sample
from dkdm.errors import DkdmError
from dkdm.formats import load_model


def tiny_pipeline(path, prediction="epsilon", variance="fixed_small", scheduler=DDPMScheduler, steps=50):
    torch.manual_seed(0)
    out = 6 if variance == "learned_range" else 3
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=out, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    kw = {"variance_type": variance} if scheduler is DDPMScheduler else {}
    sched = scheduler(num_train_timesteps=steps, beta_schedule="squaredcos_cap_v2", prediction_type=prediction,
                      clip_sample=True, **kw)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return unet, sched


@pytest.mark.parametrize("prediction, variance", [
    ("epsilon", "fixed_small"), ("v_prediction", "fixed_large"), ("sample", "learned_range"),
])
def test_pipeline_teacher_steps_like_the_diffusers_scheduler(tmp_path, prediction, variance):
    unet, sched = tiny_pipeline(tmp_path / "p", prediction, variance)
    teacher = load_model(tmp_path / "p")
    assert (teacher.prediction, teacher.variance, teacher.clip_x0) == (prediction, variance, True)
    assert teacher.sample_shape == (3, 8, 8) and teacher.schedule.num_steps == 50
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    for t in (3, 20, 49):
        tt = torch.full((2,), t)
        with torch.no_grad():
            out = unet(x, tt).sample
            step = teacher.reverse(x, tt)
        prev = sched.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        mine = reverse_sample(step, tt, noise)
        assert ((mine - prev).abs().max() / prev.abs().max()).item() < 1e-5, t


def test_ddim_scheduler_dirs_load_and_distill(tmp_path):
    tiny_pipeline(tmp_path / "p", scheduler=DDIMScheduler)
    teacher = load_model(tmp_path / "p")
    assert teacher.variance == "fixed_small"
    assert main(["distill", "--teacher", str(tmp_path / "p"), "--student", "unet:widths=8-16,layers=1,groups=4",
                 "--pool", "iterative", "--batch", "4", "--steps", "2", "--no-progress", "--out",
                 str(tmp_path / "run")]) == 0
    cfg = json.loads((tmp_path / "run" / "dkdm_model.json").read_text())
    assert cfg["sample_shape"] == [3, 8, 8] and cfg["schedule"]["num_steps"] == 50


def test_unsupported_scheduler_or_variance_is_named(tmp_path):
    tiny_pipeline(tmp_path / "p")
    cfg_path = tmp_path / "p" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(DkdmError, match="EulerDiscreteScheduler is not supported; use one of DDPMScheduler"):
        load_model(tmp_path / "p")
    cfg_path.write_text(json.dumps({**cfg, "variance_type": "learned"}))
    with pytest.raises(DkdmError, match="variance_type 'learned' is not supported"):
        load_model(tmp_path / "p")


def test_hub_id_offline_says_how_to_use_a_local_path(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["distill", "--teacher", "google/ddpm-cifar10-32", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "huggingface-cli download google/ddpm-cifar10-32 --local-dir DIR" in err and len(err.strip().splitlines()) == 1


def tiny_ldm(path):
    from diffusers import LDMPipeline, VQModel

    torch.manual_seed(0)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                 latent_channels=2, norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=2, sample_size=16)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    sched = DDIMScheduler(num_train_timesteps=30, beta_schedule="linear")
    LDMPipeline(vqvae=vq, unet=unet, scheduler=sched).save_pretrained(path)


def test_latent_pipeline_teacher_distills_in_latent_space_into_an_ldm_pipeline(tmp_path):
    from diffusers import LDMPipeline

    tiny_ldm(tmp_path / "ldm")
    teacher = load_model(tmp_path / "ldm")
    assert teacher.sample_shape == (2, 8, 8) and teacher.decoder is not None and not teacher.clip_x0
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(tmp_path / "ldm"), "--student", "unet:widths=8-16,layers=1,groups=4",
                 "--pool", "shuffled", "--batch", "4", "--steps", "3", "--no-progress", "--out", str(out)]) == 0
    student = load_model(out)
    assert student.sample_shape == (2, 8, 8) and student.decoder is not None
    # decoding goes through the teacher's autoencoder, with LDMPipeline's scaling
    z = torch.randn(2, 2, 8, 8)
    vq = LDMPipeline.from_pretrained(tmp_path / "ldm").vqvae
    with torch.no_grad():
        want = vq.decode(z / vq.config.scaling_factor).sample
    assert torch.allclose(student.decode(z), want, atol=1e-5)
    # plain diffusers samples from the student
    pipe = LDMPipeline.from_pretrained(out)
    img = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 16, 16, 3)
    assert main(["sample", "--model", str(out), "--num", "4", "--steps", "3", "--out", str(tmp_path / "s.npz"),
                 "--no-progress"]) == 0
    import numpy as np

    saved = np.load(tmp_path / "s.npz")
    assert saved["samples"].shape == (4, 3, 16, 16) and saved["latents"].shape == (4, 2, 8, 8)


def test_dit_pipeline_teacher_is_class_conditional_latent_and_its_student_is_a_dit_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=2, norm_num_groups=4, sample_size=16)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=4)
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=40),
                id2label={0: "a", 1: "b", 2: "c", 3: "d"}).save_pretrained(tmp_path / "dit")
    teacher = load_model(tmp_path / "dit")
    assert (teacher.num_classes, teacher.null_class, teacher.variance) == (4, 4, "learned_range")
    assert teacher.sample_shape == (2, 8, 8) and teacher.decoder is not None
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 10, 39]), torch.tensor([0, 3, 1])
    with torch.no_grad():
        assert torch.allclose(teacher(x, t, y), dit(x, timestep=t, class_labels=y).sample)
        # guidance uses the pretrained table's null row
        guided = teacher.output(x, t, y, guidance=4.0)
        null = dit(x, timestep=t, class_labels=torch.full_like(y, 4)).sample
        cond = dit(x, timestep=t, class_labels=y).sample
    assert torch.allclose(guided[:, :2], null[:, :2] + 4.0 * (cond[:, :2] - null[:, :2]), atol=1e-5)
    out = tmp_path / "student"
    # pos_grid=0: diffusers' own patch positions, which a DiTPipeline can hold (a 4 x 4 grid is stretched otherwise)
    assert main(["distill", "--teacher", str(tmp_path / "dit"), "--student", "dit:patch=2,depth=1,width=16,heads=2,pos_grid=0",
                 "--guidance", "2.0", "--pool", "shuffled", "--batch", "4", "--steps", "3", "--no-progress",
                 "--out", str(out)]) == 0
    student = load_model(out)
    assert student.num_classes == 4 and student.decoder is not None
    pipe = DiTPipeline.from_pretrained(out)
    img = pipe(class_labels=[0, 3], guidance_scale=1.0, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 16, 16, 3)


def test_written_pipelines_carry_clipping_to_fast_schedulers(tmp_path):
    """Clipping is written as thresholding at 1 too: DDPM steps are unchanged, DPM-Solver inherits it."""
    from diffusers import DPMSolverMultistepScheduler

    from dkdm.diffusion import Schedule
    from dkdm.formats import save_model
    from dkdm.model import DiffusionModel

    schedule = Schedule.named("cosine", 50)
    model = DiffusionModel.build("unet:widths=8-16,layers=1,groups=4", (3, 8, 8), schedule, clip_x0=True)
    save_model(model, tmp_path / "m")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "m")
    assert pipe.scheduler.config.thresholding and pipe.scheduler.config.sample_max_value == 1.0
    assert DPMSolverMultistepScheduler.from_config(pipe.scheduler.config).config.thresholding
    plain = DDPMScheduler(**schedule.to_diffusers(), variance_type="learned_range", clip_sample=True)
    x, out = torch.randn(2, 3, 8, 8), 30 * torch.randn(2, 6, 8, 8)
    for t in (49, 10, 1):
        a = pipe.scheduler.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        b = plain.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert load_model(tmp_path / "m").clip_x0


def test_dynamic_thresholding_is_refused_clipping_as_thresholding_is_read(tmp_path):
    tiny_pipeline(tmp_path / "p")
    cfg_path = tmp_path / "p" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(clip_sample=False, thresholding=True, sample_max_value=1.0)
    cfg_path.write_text(json.dumps(cfg))
    assert load_model(tmp_path / "p").clip_x0
    cfg.update(sample_max_value=1.5)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DkdmError, match="dynamic thresholding"):
        load_model(tmp_path / "p")
