"""dkdm's own model directory: ``dkdm_model.json`` (spec, data shape, parameterization, schedule)
beside the weights, read and written here.

The weights are ``model.safetensors``, or, for an unconditional UNet, the ``unet/`` of a diffusers
``DDPMPipeline`` written beside the JSON (``pipelines.py``), so plain diffusers loads the same
directory. Teachers shipped in the package are dkdm directories named ``builtin:NAME``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..diffusion import Schedule
from ..layout import MODEL_JSON, WEIGHTS
from ..errors import DkdmError
from ..model import DiffusionModel
from ..nets.dit import has_diffusers_positions
from ..students import saved_spec
from .pipelines import write_ddpm_pipeline, write_dit_pipeline

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: Teachers shipped inside the package, named ``builtin:NAME`` on the command line.
BUILTIN_TEACHERS = {"digits": ASSETS / "digits_teacher"}
_CORE = {"format", "version", "spec", "sample_shape", "prediction", "variance", "clip_x0", "schedule",
         "num_classes", "null_class"}


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


def read_weights(d: Path, role: str) -> dict:
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


def decoder_of(d: Path):
    """The autoencoder saved beside a latent model (LDMPipeline or DiTPipeline layout), if any."""
    for name in ("vqvae", "vae"):
        if (d / name).is_dir():
            from .pipelines import LatentDecoder

            if (d / "model_index.json").exists():
                class_name = json.loads((d / "model_index.json").read_text()).get(name, [None, None])[1]
            else:  # saved on its own (a latent student no pipeline holds)
                class_name = json.loads((d / name / "config.json").read_text()).get("_class_name")
            return LatentDecoder.load(d / name, class_name)
    return None


def load_dir(directory, device="cpu", role: str = "model", net: nn.Module | None = None) -> DiffusionModel:
    """A dkdm model directory (or ``builtin:NAME``); ``net`` for a model built from a custom module."""
    cfg = read_model_config(directory, role)
    d = resolve_model_dir(directory)
    try:
        schedule = Schedule.from_config(cfg["schedule"])
        shape = cfg["sample_shape"]
        if net is None and cfg["spec"] is None:
            raise DkdmError(f"{d} holds a model built from a custom nn.Module; load it with load_model(dir, net=...)")
        if net is None and isinstance(cfg["spec"], dict) and cfg["spec"].get("type") == "import":
            from ..nets.imported import check_trusted

            check_trusted(str(cfg["spec"].get("target")), d)
        if net is None:
            model = DiffusionModel.build(
                saved_spec(cfg["spec"]), shape, schedule, variance=cfg["variance"], prediction=cfg["prediction"],
                clip_x0=cfg["clip_x0"], extra={k: v for k, v in cfg.items() if k not in _CORE},
                null_class=cfg.get("null_class"), decoder=decoder_of(d),
            )
        else:
            model = DiffusionModel(net, schedule, shape, cfg["prediction"], cfg["variance"], cfg["clip_x0"],
                                   extra={k: v for k, v in cfg.items() if k not in _CORE},
                                   num_classes=cfg.get("num_classes", 0), null_class=cfg.get("null_class"),
                                   decoder=decoder_of(d))
    except (KeyError, TypeError, ValueError) as e:
        raise DkdmError(f"{d / MODEL_JSON} is malformed ({e.__class__.__name__}: {e})")
    state = read_weights(d, role)
    try:
        model.net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise DkdmError(f"the weights in {d} do not fit the architecture in {MODEL_JSON}: {first[1].strip() if len(first) > 1 else first[0]}")
    return model.to(device).eval()


def save_model(model, directory, state_dict: dict | None = None) -> None:
    """Write ``model``'s directory; ``state_dict`` overrides the weights (e.g. the EMA).

    An unconditional UNet is written as a diffusers ``DDPMPipeline`` (``model_index.json``,
    ``unet/``, ``scheduler/``) beside ``dkdm_model.json``, so plain diffusers can sample from
    it (``DDPMPipeline`` cannot pass class labels); other models keep their weights in
    ``model.safetensors``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.net.state_dict()
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if model.spec is not None and model.spec["type"] == "unet" and not model.num_classes:
        write_ddpm_pipeline(model, d, sd)
    else:
        tmp = d / (WEIGHTS + ".tmp")
        save_file(sd, str(tmp))
        os.replace(tmp, d / WEIGHTS)
        if (model.spec is not None and model.spec["type"] == "dit" and model.num_classes and model.decoder is not None
                and has_diffusers_positions(model.net.dit)):
            write_dit_pipeline(model, d, sd)
        elif model.decoder is not None:  # no pipeline holds the autoencoder: keep it beside the weights
            model.decoder.vae.save_pretrained(d / "vae", safe_serialization=True)
    tmpj = d / (MODEL_JSON + ".tmp")
    tmpj.write_text(json.dumps(model.describe(), indent=1))
    os.replace(tmpj, d / MODEL_JSON)
