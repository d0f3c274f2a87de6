"""diffusers pipelines, read and written: a ``UNet2DModel`` (or a DiT transformer) with a
DDPM-family scheduler, in pixel space or, for an ``LDMPipeline`` / ``DiTPipeline``, in the latent
space of its autoencoder. Students are written back in the same layout, so plain diffusers loads them.

A local directory written by ``save_pretrained`` (``model_index.json``, ``unet/``,
``scheduler/``), or a Hub id (e.g. ``google/ddpm-cifar10-32``) fetched with huggingface_hub when
online. The scheduler's config gives the schedule, the output parameterization and the variance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from ..diffusion import Schedule
from ..errors import DkdmError
from ..model import DiffusionModel
from ..nets.dit import DiTNet
from ..nets.unet import UNetNet

PIPELINES = ("DDPMPipeline", "DDIMPipeline", "LDMPipeline", "DiTPipeline")
TRANSFORMERS = ("DiTTransformer2DModel", "Transformer2DModel")
AUTOENCODERS = ("VQModel", "AutoencoderKL")
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
#: diffusers variance_type -> dkdm variance (the *_log forms differ only in how diffusers computes them)
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
             "fixed_large_log": "fixed_large", "learned_range": "learned_range"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_pipeline_dir(d: Path) -> bool:
    return (d / "model_index.json").exists()


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not Path(text).exists()


def fetch(repo_id: str) -> Path:
    """Download (or find in the local cache) a Hub pipeline; offline, say how to pass a local path."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["model_index.json", "unet/*", "scheduler/*"]))
    except Exception as e:  # network, auth and missing-repo errors all end here
        raise DkdmError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({e.__class__.__name__}); offline or private? "
            f"download it where you have access (huggingface-cli download {repo_id} --local-dir DIR) and pass "
            f"--teacher DIR"
        )


class LatentDecoder(nn.Module):
    """The teacher's autoencoder: latents -> images, with the scaling LDMPipeline applies."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def decode(self, z):
        return self.vae.decode(z / self.vae.config.scaling_factor).sample  # as LDMPipeline and DiTPipeline do

    @classmethod
    def load(cls, directory: Path, class_name: str) -> "LatentDecoder":
        if class_name not in AUTOENCODERS:
            raise DkdmError(f"{directory}: autoencoder {class_name} is not supported; use one of {', '.join(AUTOENCODERS)}")
        import diffusers

        try:
            vae = getattr(diffusers, class_name).from_pretrained(str(directory))
        except (OSError, ValueError, EnvironmentError) as e:
            raise DkdmError(f"cannot load the {class_name} in {directory}: {e}")
        return cls(vae.eval().requires_grad_(False))


def read_pipeline(d: Path) -> dict:
    """What dkdm needs of a diffusers pipeline directory: the network (``kind`` unet or dit), schedule,
    prediction, variance, clip_x0, the latent decoder (None in pixel space) and the classes."""
    try:
        index = json.loads((d / "model_index.json").read_text())
        sched_cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DkdmError(f"cannot read the diffusers pipeline in {d}: {e}")
    pipe = index.get("_class_name")
    if pipe not in PIPELINES:
        raise DkdmError(f"{d} holds a {pipe}; dkdm reads {', '.join(PIPELINES)} directories")
    sched_cls = sched_cfg.get("_class_name")
    if pipe != "DiTPipeline" and sched_cls not in SCHEDULERS:
        raise DkdmError(f"{d}: scheduler {sched_cls} is not supported; use one of {', '.join(SCHEDULERS)}")
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise DkdmError(f"{d}: prediction_type {prediction!r} is not supported; use epsilon, v_prediction or sample")
    try:
        schedule = Schedule.from_diffusers(sched_cfg)
    except ValueError as e:
        raise DkdmError(f"{d}: {e}")
    import diffusers

    # the schedulers clip by thresholding when it is on (at sample_max_value 1 that is plain clipping),
    # else by clip_sample within clip_sample_range
    thresholding = bool(sched_cfg.get("thresholding", False))
    if thresholding and float(sched_cfg.get("sample_max_value", 1.0)) != 1.0:
        raise DkdmError(f"{d}: dynamic thresholding (sample_max_value {sched_cfg['sample_max_value']}) is not "
                        f"supported; dkdm clips x0 to [-1, 1], which is thresholding with sample_max_value 1")
    clip_by_range = not thresholding and bool(sched_cfg.get("clip_sample", True))
    out = {"schedule": schedule, "prediction": prediction, "decoder": None, "num_classes": 0, "null_class": None,
           "clip": thresholding or clip_by_range}
    if pipe == "DiTPipeline":
        cls = index.get("transformer", [None, None])[1]
        if cls not in TRANSFORMERS:
            raise DkdmError(f"{d}: its transformer is a {cls}; dkdm reads {' / '.join(TRANSFORMERS)}")
        net = _load(getattr(diffusers, cls), d / "transformer")
        cfg = net.config
        out.update(kind="dit", net=net, num_classes=int(cfg.num_embeds_ada_norm), null_class=int(cfg.num_embeds_ada_norm),
                   variance="learned_range" if cfg.out_channels == 2 * cfg.in_channels else "fixed_small",
                   decoder=LatentDecoder.load(d / "vae", index.get("vae", [None, None])[1]), clip=False)
        return out
    vt = sched_cfg.get("variance_type", "fixed_small") if sched_cls == "DDPMScheduler" else "fixed_small"
    if vt not in VARIANCES:
        raise DkdmError(f"{d}: variance_type {vt!r} is not supported; use one of {', '.join(VARIANCES)}")
    if clip_by_range and pipe != "LDMPipeline" and float(sched_cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise DkdmError(f"{d}: clip_sample_range {sched_cfg['clip_sample_range']} is not supported (dkdm clips x0 to [-1, 1])")
    unet_cls = index.get("unet", [None, None])[1]
    if unet_cls != "UNet2DModel":
        raise DkdmError(f"{d}: its unet is a {unet_cls}; dkdm reads UNet2DModel teachers")
    unet = _load(diffusers.UNet2DModel, d / "unet")
    want = unet.config.in_channels * (2 if VARIANCES[vt] == "learned_range" else 1)
    if unet.config.out_channels != want:
        raise DkdmError(f"{d}: the unet outputs {unet.config.out_channels} channels but variance_type {vt!r} "
                        f"needs {want}")
    out.update(kind="unet", net=unet, variance=VARIANCES[vt])
    if pipe == "LDMPipeline":
        out.update(decoder=LatentDecoder.load(d / "vqvae", index.get("vqvae", [None, None])[1]), clip=False)
    return out


def _load(cls, directory: Path):
    try:
        return cls.from_pretrained(str(directory))
    except (OSError, ValueError, EnvironmentError) as e:
        raise DkdmError(f"cannot load the {cls.__name__} in {directory}: {e}")


def load_pipeline_dir(d: Path, device="cpu") -> DiffusionModel:
    """A plain diffusers DDPM/DDIM pipeline directory (no dkdm_model.json) as a model."""
    p = read_pipeline(d)
    net = p["net"]
    size = net.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    model = DiffusionModel(UNetNet(net) if p["kind"] == "unet" else DiTNet(net), p["schedule"],
                           (net.config.in_channels, h, w), p["prediction"], p["variance"], p["clip"],
                           extra={"diffusers": str(d)}, decoder=p["decoder"], num_classes=p["num_classes"],
                           null_class=p["null_class"])
    return model.to(device).eval()


def ddpm_scheduler(schedule: Schedule, variance: str, prediction: str, clip_x0: bool):
    """The diffusers DDPMScheduler a written pipeline carries.

    Clipping x0 to [-1, 1] is also written as thresholding with sample_max_value 1 (the same
    operation in DDPMScheduler), because that is the flag DPM-Solver, UniPC and the other fast
    schedulers read through ``from_config``: without it they sample a clipping-trained model
    without its clipping (digits teacher, DPM-Solver++ at 25 steps: digits-FID 280 against 9).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(**schedule.to_diffusers(), variance_type=variance, prediction_type=prediction,
                         clip_sample=clip_x0, thresholding=clip_x0, sample_max_value=1.0)


def lcm_scheduler(model):
    """The diffusers LCMScheduler that samples a few-step (consistency) student as dkdm does:
    ``DDPMPipeline.from_pretrained(dir)(num_inference_steps=K)``."""
    from diffusers import LCMScheduler

    from ..consistency import SIGMA_DATA, TIMESTEP_SCALING

    assert SIGMA_DATA == 0.5  # LCMScheduler fixes it
    return LCMScheduler(**model.schedule.to_diffusers(), prediction_type=model.prediction,
                        original_inference_steps=int(model.extra["sampler"]["grid"]),
                        timestep_scaling=TIMESTEP_SCALING, clip_sample=model.clip_x0, clip_sample_range=1.0)


def write_ddpm_pipeline(model, d: Path, state: dict) -> None:
    """A DDPMPipeline, or for a latent model an LDMPipeline holding the teacher's autoencoder."""
    from diffusers import DDPMPipeline, LDMPipeline, UNet2DModel

    unet = UNet2DModel.from_config(model.net.unet.config)
    unet.load_state_dict({k[len("unet."):]: v for k, v in state.items()})
    if model.sampler_steps:
        scheduler = lcm_scheduler(model)
    else:
        scheduler = ddpm_scheduler(model.schedule, model.variance, model.prediction, model.clip_x0)
    if model.decoder is not None:
        LDMPipeline(vqvae=model.decoder.vae, unet=unet, scheduler=scheduler).save_pretrained(d, safe_serialization=True)
    else:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(d, safe_serialization=True)


def write_dit_pipeline(model, d: Path, state: dict) -> None:
    """Beside model.safetensors, a DiTPipeline (transformer + the teacher's VAE) for plain diffusers.

    DiTPipeline drops a learned variance and uses its own null label (1000) for guidance, so
    the scheduler is written with fixed_small variance; sample it with guidance_scale=1 unless
    the model has 1000 classes. Only a DiT that numbers its patches as diffusers does gets one
    (students.stretch_positions): DiTPipeline would rebuild another position table."""
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    dit = DiTTransformer2DModel.from_config(model.net.dit.config)
    dit.load_state_dict({k[len("dit."):]: v for k, v in state.items()})
    scheduler = DDPMScheduler(**model.schedule.to_diffusers(), variance_type="fixed_small",
                              prediction_type=model.prediction, clip_sample=False)
    id2label = {i: str(i) for i in range(model.num_classes)}
    DiTPipeline(transformer=dit, vae=model.decoder.vae, scheduler=scheduler, id2label=id2label).save_pretrained(
        d, safe_serialization=True)
