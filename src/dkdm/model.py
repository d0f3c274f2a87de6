"""A diffusion model: a network plus the process it models, saved as a self-describing directory.

A model directory holds ``dkdm_model.json`` (architecture spec, data shape, output
parameterization, schedule) and ``model.safetensors`` (weights). Teachers and students are both
``DiffusionModel``s; the pool, the trainer and the samplers only use this class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .diffusion import PREDICTIONS, VARIANCES, Schedule, reverse_sample
from .errors import DkdmError
from .nets.dit import has_diffusers_positions
from .students import build_net, parse_spec, saved_spec, student_spec
from .students import num_classes as _num_classes

MODEL_JSON = "dkdm_model.json"
WEIGHTS = "model.safetensors"
ASSETS = Path(__file__).resolve().parent / "assets"
#: Teachers shipped inside the package, named ``builtin:NAME`` on the command line.
BUILTIN_TEACHERS = {"digits": ASSETS / "digits_teacher"}


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


def resolve_model_dir(path) -> Path:
    """A model directory path, or ``builtin:NAME`` for a teacher shipped with dkdm."""
    text = str(path)
    if text.startswith("builtin:"):
        name = text[len("builtin:"):]
        if name not in BUILTIN_TEACHERS:
            raise DkdmError(f"unknown built-in model {text!r}; choose one of "
                            f"{', '.join('builtin:' + k for k in BUILTIN_TEACHERS)}")
        return BUILTIN_TEACHERS[name]
    return Path(path)


class DiffusionModel(nn.Module):
    """``net(x, t)`` with the schedule and output parameterization needed to read its output."""

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        sample_shape,
        prediction: str = "epsilon",
        variance: str = "learned_range",
        clip_x0: bool = False,
        spec: dict | None = None,
        extra: dict | None = None,
        num_classes: int | None = None,
        null_class: int | None = None,
        decoder: nn.Module | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise DkdmError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if variance not in VARIANCES:
            raise DkdmError(f"unknown variance type {variance!r}; choose one of {', '.join(VARIANCES)}")
        self.net = net
        self.schedule = schedule
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.prediction = prediction
        self.variance = variance
        self.clip_x0 = clip_x0
        self.spec = spec
        self.extra = dict(extra or {})
        self.num_classes = num_classes if num_classes is not None else _num_classes(spec)
        self.null_class = null_class  # label of the unconditional model, for classifier-free guidance
        self.decoder = decoder  # a latent model's autoencoder (shared with its teacher), or None

    @classmethod
    def build(cls, spec, sample_shape, schedule: Schedule, variance="learned_range", **kw):
        """A fresh model of architecture ``spec`` (learned variance doubles the output channels)."""
        spec = parse_spec(spec)
        channels = sample_shape[0]
        out = 2 * channels if variance == "learned_range" else channels
        net = build_net(spec, sample_shape, out)
        return cls(net, schedule, sample_shape, variance=variance, spec=spec, **kw)

    @classmethod
    def student_of(cls, teacher: "DiffusionModel", spec=None, variance="learned_range", **kw) -> "DiffusionModel":
        """A fresh student for ``teacher``: architecture ``spec`` (default: the teacher's family at about
        half its width, ``students.default_student_spec``) on the teacher's data shape, schedule,
        classes, x0 clipping and (latent models) autoencoder, predicting epsilon."""
        return cls.build(student_spec(teacher, spec), teacher.sample_shape, teacher.schedule, variance=variance,
                         prediction="epsilon", clip_x0=teacher.clip_x0, decoder=teacher.decoder, **kw)

    def forward(self, x, t, y=None):
        dt = self.inference_dtype
        if dt is not None:
            x = x.to(dt)
        out = self.net(x, t) if y is None else self.net(x, t, y)
        return out if dt is None else out.float()

    inference_dtype = None

    def set_inference_dtype(self, dtype: str) -> "DiffusionModel":
        """Run the network in bfloat16 / float16 (a teacher: faster forwards, slightly different
        targets); outputs come back as float32 so the diffusion math stays in full precision.
        The weights are cast in place: going back to float32 keeps their rounding."""
        dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise DkdmError(f"unknown teacher dtype {dtype!r}; choose one of {', '.join(dtypes)}")
        self.inference_dtype = dtypes[dtype]
        self.net.to(self.inference_dtype or torch.float32)
        return self

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images from samples: a latent model decodes them with its autoencoder."""
        if self.decoder is None:
            return x
        dev = next(self.decoder.parameters()).device
        return torch.cat([self.decoder.decode(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])

    def labels_for(self, n: int, generator=None, device="cpu", prior: torch.Tensor | None = None):
        """Class labels for n samples: uniform over the classes, or drawn from ``prior``."""
        if not self.num_classes:
            return None
        if prior is not None:
            return torch.multinomial(prior.to(device).double(), n, replacement=True, generator=generator)
        return torch.randint(0, self.num_classes, (n,), generator=generator, device=device)

    def output(self, x, t, y=None, guidance: float = 1.0):
        """The network output; with ``guidance`` != 1, classifier-free guided towards ``y``.

        Guidance mixes the prediction channels only; a learned variance comes from the
        conditional output.
        """
        out = self(x, t, y)
        if guidance == 1.0 or y is None:
            return out
        if self.null_class is None:
            raise DkdmError("classifier-free guidance needs a model with an unconditional (null) label; this one has none")
        uncond = self(x, t, torch.full_like(y, self.null_class))
        c = x.shape[1]
        mixed = uncond[:, :c] + guidance * (out[:, :c] - uncond[:, :c])
        return torch.cat([mixed, out[:, c:]], dim=1)

    def respaced(self, num_steps: int) -> "DiffusionModel":
        """This model on an evenly respaced schedule of ``num_steps`` steps (shares the weights).

        Each of its steps jumps between kept steps of the original schedule; the network still
        sees the original timesteps. A teacher viewed this way feeds a student with fewer steps.
        """
        if num_steps == self.schedule.num_steps:
            return self
        try:
            sched, tmap = self.schedule.respace(num_steps)
        except ValueError as e:
            raise DkdmError(f"cannot respace {self.schedule.num_steps} steps to {num_steps}: {e}")
        view = DiffusionModel(_Respaced(self.net, tmap), sched, self.sample_shape, self.prediction, self.variance,
                              self.clip_x0, spec=self.spec, extra=self.extra, num_classes=self.num_classes,
                              null_class=self.null_class, decoder=self.decoder)
        view.inference_dtype = self.inference_dtype  # the shared weights keep their dtype, so must the inputs
        return view

    def reverse(self, x, t, schedule: Schedule | None = None, t_model=None, clip_x0=None, y=None,
                guidance: float = 1.0):
        """The model's reverse step at (x, t[, label y]); ``schedule``/``t_model`` for respaced sampling."""
        out = self.output(x, t if t_model is None else t_model, y, guidance)
        sched = schedule or self.schedule
        clip = self.clip_x0 if clip_x0 is None else clip_x0
        return sched.reverse(out.float(), x, t, self.prediction, self.variance, clip_x0=clip)

    @torch.no_grad()
    def sample(self, num: int, steps: int | None = None, generator=None, batch_size: int = 1024, progress=None,
               labels: torch.Tensor | None = None, guidance: float = 1.0):
        """Ancestral sampling with ``steps`` evenly respaced steps (default: all of them).

        A class-conditional model draws uniform labels unless ``labels`` are given.
        """
        device = next(self.parameters(), torch.empty(0)).device
        if steps is None or steps == self.schedule.num_steps:
            sched, tmap = self.schedule, torch.arange(self.schedule.num_steps)
        else:
            sched, tmap = self.schedule.respace(steps)
        tmap = tmap.to(device)
        if labels is None:
            labels = self.labels_for(num, generator, device)
        self.last_labels = labels
        chunks = []
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            y = None if labels is None else labels[start:start + n].to(device)
            x = torch.randn((n, *self.sample_shape), generator=generator, device=device)
            for i in reversed(range(sched.num_steps)):
                t = torch.full((n,), i, device=device, dtype=torch.long)
                step = self.reverse(x, t, schedule=sched, t_model=tmap[t], y=y, guidance=guidance)
                x = reverse_sample(step, t, torch.randn(x.shape, generator=generator, device=device))
                if progress is not None:
                    progress.update(n)
            chunks.append(x.cpu())
        return torch.cat(chunks)

    # persistence -----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "format": "dkdm-model",
            "version": 1,
            "spec": self.spec,
            "sample_shape": list(self.sample_shape),
            "prediction": self.prediction,
            "variance": self.variance,
            "clip_x0": self.clip_x0,
            "schedule": self.schedule.config,
            "num_classes": self.num_classes,
            **({"null_class": self.null_class} if self.null_class is not None else {}),
            **self.extra,
        }

    def save(self, directory, state_dict: dict | None = None) -> None:
        """Write the model directory; ``state_dict`` overrides the weights (e.g. the EMA).

        An unconditional UNet is written as a diffusers ``DDPMPipeline`` (``model_index.json``,
        ``unet/``, ``scheduler/``) beside ``dkdm_model.json``, so plain diffusers can sample from
        it (``DDPMPipeline`` cannot pass class labels); other models keep their weights in
        ``model.safetensors``.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.net.state_dict()
        sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        if self.spec is not None and self.spec["type"] == "unet" and not self.num_classes:
            self._save_pipeline(d, sd)
        else:
            tmp = d / (WEIGHTS + ".tmp")
            save_file(sd, str(tmp))
            os.replace(tmp, d / WEIGHTS)
            if (self.spec is not None and self.spec["type"] == "dit" and self.num_classes and self.decoder is not None
                    and has_diffusers_positions(self.net.dit)):
                self._save_dit_pipeline(d, sd)
            elif self.decoder is not None:  # no pipeline holds the autoencoder: keep it beside the weights
                self.decoder.vae.save_pretrained(d / "vae", safe_serialization=True)
        tmpj = d / (MODEL_JSON + ".tmp")
        tmpj.write_text(json.dumps(self.describe(), indent=1))
        os.replace(tmpj, d / MODEL_JSON)


    def _save_dit_pipeline(self, d: Path, state: dict) -> None:
        """Beside model.safetensors, a DiTPipeline (transformer + the teacher's VAE) for plain diffusers.

        DiTPipeline drops a learned variance and uses its own null label (1000) for guidance, so
        the scheduler is written with fixed_small variance; sample it with guidance_scale=1 unless
        the model has 1000 classes. Only a DiT that numbers its patches as diffusers does gets one
        (students.stretch_positions): DiTPipeline would rebuild another position table."""
        from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

        dit = DiTTransformer2DModel.from_config(self.net.dit.config)
        dit.load_state_dict({k[len("dit."):]: v for k, v in state.items()})
        scheduler = DDPMScheduler(**self.schedule.to_diffusers(), variance_type="fixed_small",
                                  prediction_type=self.prediction, clip_sample=False)
        id2label = {i: str(i) for i in range(self.num_classes)}
        DiTPipeline(transformer=dit, vae=self.decoder.vae, scheduler=scheduler, id2label=id2label).save_pretrained(
            d, safe_serialization=True)

    def _save_pipeline(self, d: Path, state: dict) -> None:
        """A DDPMPipeline, or for a latent model an LDMPipeline holding the teacher's autoencoder."""
        from diffusers import DDPMPipeline, LDMPipeline, UNet2DModel

        unet = UNet2DModel.from_config(self.net.unet.config)
        unet.load_state_dict({k[len("unet."):]: v for k, v in state.items()})
        scheduler = ddpm_scheduler(self.schedule, self.variance, self.prediction, self.clip_x0)
        if self.decoder is not None:
            LDMPipeline(vqvae=self.decoder.vae, unet=unet, scheduler=scheduler).save_pretrained(d, safe_serialization=True)
        else:
            DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(d, safe_serialization=True)


class _Respaced(nn.Module):
    """A network called with respaced indices, mapped back to the timesteps it was trained on."""

    def __init__(self, net: nn.Module, tmap: torch.Tensor):
        super().__init__()
        self.inner = net
        self.register_buffer("tmap", tmap, persistent=False)

    def forward(self, x, t, y=None):
        t = self.tmap.to(t.device)[t]
        return self.inner(x, t) if y is None else self.inner(x, t, y)


def _decoder_of(d: Path):
    """The autoencoder saved beside a latent model (LDMPipeline or DiTPipeline layout), if any."""
    for name in ("vqvae", "vae"):
        if (d / name).is_dir():
            from .teachers.diffusers_dir import LatentDecoder

            if (d / "model_index.json").exists():
                class_name = json.loads((d / "model_index.json").read_text()).get(name, [None, None])[1]
            else:  # saved on its own (a latent student no pipeline holds)
                class_name = json.loads((d / name / "config.json").read_text()).get("_class_name")
            return LatentDecoder.load(d / name, class_name)
    return None


def _read_weights(d: Path, role: str) -> dict:
    """The weights of a model directory, from model.safetensors or a diffusers unet/ folder."""
    diffusers_unet = d / "unet" / "diffusion_pytorch_model.safetensors"
    path, prefix = (d / WEIGHTS, "") if (d / WEIGHTS).exists() else (diffusers_unet, "unet.")
    if not path.exists():
        raise DkdmError(f"{role} directory {d} has no {WEIGHTS} (nor unet/); the run may not have finished (see its checkpoints/)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DkdmError(f"cannot read {path}: {e}; the file is corrupt or not safetensors")
    return {prefix + k: v for k, v in state.items()}


def read_model_config(directory, role: str = "model") -> dict:
    d = resolve_model_dir(directory)
    if not d.exists():
        raise DkdmError(f"{role} directory {d} does not exist")
    if not d.is_dir():
        raise DkdmError(f"{role} path {d} is not a directory; pass a directory written by `dkdm train` or `dkdm distill`")
    cfg_path = d / MODEL_JSON
    if not cfg_path.exists():
        raise DkdmError(
            f"{d} is not a dkdm model directory (no {MODEL_JSON}); pass a directory written by "
            f"`dkdm train` or `dkdm distill`"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DkdmError(f"cannot read {cfg_path}: {e}")
    if cfg.get("format") != "dkdm-model":
        raise DkdmError(f"{cfg_path} is not a dkdm model description (format={cfg.get('format')!r})")
    return cfg


def load_checkpoint_file(path, config, device="cpu", role: str = "teacher") -> DiffusionModel:
    """An ADM / guided-diffusion checkpoint (.pt or .safetensors) configured by its flags file."""
    from .teachers.adm import (load_weights, prediction_and_variance, read_flags, read_state_dict,
                               schedule_from_flags)

    if config is None:
        raise DkdmError(f"{path} is a checkpoint file: pass the guided-diffusion flags it was trained with "
                        f"(YAML or JSON) with --{role}-config FILE")
    flags = read_flags(config)
    prediction, variance = prediction_and_variance(flags)
    c, size = int(flags["in_channels"]), int(flags["image_size"])
    model = DiffusionModel.build({"type": "adm", **flags}, (c, size, size), schedule_from_flags(flags),
                                 variance=variance, prediction=prediction, clip_x0=bool(flags["clip_denoised"]),
                                 extra={"converted_from": str(Path(path).resolve())})
    load_weights(model.net.adm, read_state_dict(path), path)
    return model.to(device).eval()


def load_pipeline_dir(d: Path, device="cpu") -> DiffusionModel:
    """A plain diffusers DDPM/DDIM pipeline directory (no dkdm_model.json) as a model."""
    from .nets.dit import DiTNet
    from .nets.unet import UNetNet
    from .teachers.diffusers_dir import read_pipeline

    p = read_pipeline(d)
    net = p["net"]
    size = net.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    model = DiffusionModel(UNetNet(net) if p["kind"] == "unet" else DiTNet(net), p["schedule"],
                           (net.config.in_channels, h, w), p["prediction"], p["variance"], p["clip"],
                           extra={"diffusers": str(d)}, decoder=p["decoder"], num_classes=p["num_classes"],
                           null_class=p["null_class"])
    return model.to(device).eval()


def load_model(directory, device="cpu", role: str = "model", net: nn.Module | None = None,
               config=None) -> DiffusionModel:
    """Load a model directory (or an ADM checkpoint file with its flags ``config``); pass ``net``
    for a model built from a custom module."""
    text = str(directory)
    if Path(text).is_file():
        return load_checkpoint_file(directory, config, device, role)
    if config is not None:
        if not Path(text).exists() and not text.startswith("builtin:"):
            raise DkdmError(f"checkpoint {text} does not exist")
        raise DkdmError(f"--{role}-config describes an ADM checkpoint file, but {text} is a model directory, which "
                        f"describes itself; drop --{role}-config")
    if not text.startswith("builtin:"):
        from .teachers.diffusers_dir import fetch, is_pipeline_dir, looks_like_hub_id

        p = fetch(text) if looks_like_hub_id(text) else Path(text)
        if p.is_dir() and is_pipeline_dir(p) and not (p / MODEL_JSON).exists():
            return load_pipeline_dir(p, device)
        directory = p
    cfg = read_model_config(directory, role)
    d = resolve_model_dir(directory)
    try:
        schedule = Schedule.from_config(cfg["schedule"])
        shape = cfg["sample_shape"]
        if net is None and cfg["spec"] is None:
            raise DkdmError(f"{d} holds a model built from a custom nn.Module; load it with load_model(dir, net=...)")
        if net is None:
            model = DiffusionModel.build(
                saved_spec(cfg["spec"]), shape, schedule, variance=cfg["variance"], prediction=cfg["prediction"],
                clip_x0=cfg["clip_x0"], extra={k: v for k, v in cfg.items() if k not in _CORE},
                null_class=cfg.get("null_class"), decoder=_decoder_of(d),
            )
        else:
            model = DiffusionModel(net, schedule, shape, cfg["prediction"], cfg["variance"], cfg["clip_x0"],
                                   num_classes=cfg.get("num_classes", 0), null_class=cfg.get("null_class"))
    except (KeyError, TypeError, ValueError) as e:
        raise DkdmError(f"{d / MODEL_JSON} is malformed ({e.__class__.__name__}: {e})")
    state = _read_weights(d, role)
    try:
        model.net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise DkdmError(f"the weights in {d} do not fit the architecture in {MODEL_JSON}: {first[1].strip() if len(first) > 1 else first[0]}")
    return model.to(device).eval()


_CORE = {"format", "version", "spec", "sample_shape", "prediction", "variance", "clip_x0", "schedule",
         "num_classes", "null_class"}
