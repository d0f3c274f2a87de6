"""Model formats, one module each with its reader and its writer, and the one resolver.

- ``dkdm_dir.py``: dkdm's model directory (``dkdm_model.json`` + weights), and ``builtin:NAME``;
- ``pipelines.py``: diffusers pipelines (DDPM / DDIM / LDM / DiT), local or by Hub id;
- ``adm.py``: OpenAI ADM / guided-diffusion checkpoints with their flags, and their conversion.

``load_model(ref)`` turns any reference a user may give (a path, ``builtin:NAME``, a Hub id, a
checkpoint file with its flags) into a ``DiffusionModel``, deciding its format once.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import DkdmError
from ..model import DiffusionModel
from .adm import load_checkpoint_file
from .dkdm_dir import MODEL_JSON, load_dir, read_model_config, resolve_model_dir, save_model
from .pipelines import fetch, is_pipeline_dir, load_pipeline_dir, looks_like_hub_id

__all__ = ["load_model", "save_model", "read_model_config", "resolve_model_dir", "load_checkpoint_file"]


def load_model(directory, device="cpu", role: str = "model", net: nn.Module | None = None,
               config=None) -> DiffusionModel:
    """The model ``directory`` names: a dkdm model directory, ``builtin:NAME``, a diffusers pipeline
    directory or Hub id, or an ADM checkpoint file with its flags file ``config``. Pass ``net``
    for a dkdm directory of a model built from a custom module."""
    text = str(directory)
    if Path(text).is_file():
        if role == "model" and config is None:  # sample / evaluate take directories only
            raise DkdmError(f"{text} is a file, not a model directory: --model takes a dkdm model directory, a "
                            f"diffusers pipeline directory or Hub id, or builtin:NAME; an ADM checkpoint becomes one "
                            f"with `dkdm convert --checkpoint FILE --config FLAGS --out DIR`")
        return load_checkpoint_file(directory, config, device, role)
    if config is not None:
        if not Path(text).exists() and not text.startswith("builtin:"):
            raise DkdmError(f"checkpoint {text} does not exist")
        raise DkdmError(f"--{role}-config describes an ADM checkpoint file, but {text} is a model directory, which "
                        f"describes itself; drop --{role}-config")
    if not text.startswith("builtin:"):
        p = fetch(text) if looks_like_hub_id(text) else Path(text)
        if p.is_dir() and is_pipeline_dir(p) and not (p / MODEL_JSON).exists():
            return load_pipeline_dir(p, device)
        directory = p
    return load_dir(directory, device, role, net)
