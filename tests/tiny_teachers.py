"""Every kind of teacher dkdm reads, built tiny and random in a test directory (no downloads).

``make(kind, root)`` writes the teacher and returns the command-line arguments that name it
(``--teacher PATH`` plus ``--teacher-config FLAGS`` for checkpoint files). The networks are small
enough for a CPU test to run a pool and a few distillation steps from each in about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

T = 20  # diffusion steps of every tiny teacher (a 1000-step ADM flags file aside: see ADM_FLAGS)

#: guided-diffusion flags of a tiny ADM UNet (new attention order, resblock up/down: the DKDM
#: authors' layout). channel_mult and num_head_channels exist only in guided-diffusion, so
#: rescale_timesteps defaults to false as there.
ADM_FLAGS = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
             "attention_resolutions": "4", "num_head_channels": 16, "learn_sigma": True, "noise_schedule": "cosine",
             "diffusion_steps": T, "use_new_attention_order": True, "resblock_updown": True, "dropout": 0.0,
             "use_fp16": False, "lr": 1e-4, "batch_size": 128, "ema_rate": "0.9999", "log_interval": 10,
             "save_interval": 10000, "resume_checkpoint": "", "microbatch": -1}
#: improved-diffusion flags as its image_train.py takes them (no channel_mult: 32x32 picks 1,2,2,2;
#: legacy attention order; sigma_small and its training flags; rescale_timesteps true by default).
IMPROVED_FLAGS = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "8",
                  "learn_sigma": False, "sigma_small": True, "dropout": 0.1, "diffusion_steps": T,
                  "noise_schedule": "cosine", "lr": 1e-4, "batch_size": 128, "microbatch": -1, "ema_rate": "0.9999",
                  "log_interval": 10, "save_interval": 10000, "resume_checkpoint": "", "use_fp16": False,
                  "fp16_scale_growth": 1e-3, "schedule_sampler": "uniform", "weight_decay": 0.0, "lr_anneal_steps": 0,
                  "data_dir": "/data/cifar_train", "use_kl": False, "rescale_learned_sigmas": True}

KINDS = ("dkdm-unet", "dkdm-dit-cond", "dkdm-mlp", "adm-pt", "adm-pt-cond", "adm-st", "adm-st-cond", "improved",
         "ddpm-eps-small", "ddpm-v-large", "ddpm-x0-learned", "ddim-eps", "ddim-v", "ldm", "dit-pipeline")
#: kinds whose teacher is class-conditional, and those among them with a null label (guidance)
CONDITIONAL = {"dkdm-dit-cond", "adm-pt-cond", "adm-st-cond", "dit-pipeline"}
GUIDED = {"dit-pipeline"}


def _perturb(net: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (libraries zero some output layers), so every layer matters."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def adm_checkpoint(root: Path, flags: dict, suffix: str, name: str = "adm") -> list[str]:
    from safetensors.torch import save_file

    from dkdm.nets.adm import ADMUNet
    from dkdm.nets.adm import parse_flags

    net = _perturb(ADMUNet(parse_flags(flags)))
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}{suffix}"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    cfg = root / f"{name}.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(flags))
    return ["--teacher", str(path), "--teacher-config", str(cfg)]


def _unet(in_ch: int, out_ch: int, attention: bool = False):
    from diffusers import UNet2DModel

    down = ("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D")
    up = ("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D")
    return _perturb(UNet2DModel(sample_size=8, in_channels=in_ch, out_channels=out_ch, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=4,
                                attention_head_dim=8))


def ddpm_pipeline(root: Path, name: str, prediction: str, variance: str, scheduler: str = "DDPMScheduler") -> Path:
    import diffusers
    from diffusers import DDPMPipeline

    unet = _unet(3, 6 if variance == "learned_range" else 3, attention=prediction == "epsilon")
    kw = {"variance_type": variance} if scheduler == "DDPMScheduler" else {}
    sched = getattr(diffusers, scheduler)(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                          prediction_type=prediction, clip_sample=True, **kw)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(root / name)
    return root / name


def ldm_pipeline(root: Path) -> Path:
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                 latent_channels=2, norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=2, sample_size=16)
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False)
    LDMPipeline(vqvae=vq, unet=_unet(2, 2), scheduler=sched).save_pretrained(root / "ldm")
    return root / "ldm"


def dit_pipeline(root: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=2, norm_num_groups=4, sample_size=16)
    dit = _perturb(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                         num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=4))
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=T),
                id2label={0: "a", 1: "b", 2: "c", 3: "d"}).save_pretrained(root / "dit")
    return root / "dit"


def dkdm_dir(root: Path, name: str, spec: str, shape) -> Path:
    from dkdm.diffusion import Schedule
    from dkdm.formats import save_model
    from dkdm.model import DiffusionModel

    model = DiffusionModel.build(spec, shape, Schedule.named("cosine", T), clip_x0=True)
    _perturb(model.net)
    save_model(model, root / name)
    return root / name


def make(kind: str, root) -> list[str]:
    """Write a tiny teacher of ``kind`` under ``root``; the CLI arguments that name it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(KINDS.index(kind))
    if kind == "dkdm-unet":
        return ["--teacher", str(dkdm_dir(root, kind, "unet:widths=8-16,layers=1,groups=4", (3, 8, 8)))]
    if kind == "dkdm-dit-cond":
        return ["--teacher", str(dkdm_dir(root, kind, "dit:patch=2,depth=1,width=16,heads=2,classes=3", (3, 8, 8)))]
    if kind == "dkdm-mlp":
        return ["--teacher", str(dkdm_dir(root, kind, "mlp:width=32,depth=1", (2,)))]
    if kind.startswith("adm-"):
        cond = kind.endswith("-cond")
        flags = {**ADM_FLAGS, **({"class_cond": True, "num_classes": 3, "learn_sigma": False} if cond else {})}
        return adm_checkpoint(root, flags, ".pt" if kind.startswith("adm-pt") else ".safetensors", kind)
    if kind == "improved":
        return adm_checkpoint(root, IMPROVED_FLAGS, ".pt", kind)
    if kind.startswith(("ddpm-", "ddim-")):
        prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[kind.split("-")[1]]
        variance = {"small": "fixed_small", "large": "fixed_large", "learned": "learned_range"}.get(
            kind.split("-")[-1], "fixed_small")
        scheduler = "DDIMScheduler" if kind.startswith("ddim") else "DDPMScheduler"
        return ["--teacher", str(ddpm_pipeline(root, kind, prediction, variance, scheduler))]
    if kind == "ldm":
        return ["--teacher", str(ldm_pipeline(root))]
    if kind == "dit-pipeline":
        return ["--teacher", str(dit_pipeline(root))]
    raise ValueError(kind)


def load(args: list[str]):
    """The teacher a ``make`` result names, loaded as the CLI loads it."""
    from dkdm.formats import load_model

    config = args[args.index("--teacher-config") + 1] if "--teacher-config" in args else None
    return load_model(args[1], config=config)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
