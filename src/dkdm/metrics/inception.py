"""Inception metrics (FID, sFID, IS, precision, recall) for RGB image models, through torch-fidelity.

torch-fidelity needs torchvision, so it is an optional extra (``pip install 'dkdm[inception]'``)
imported only here. Offline use requires the user's local Inception weights (the pt_inception
file torch-fidelity would download). Its FID follows the TF-Inception port the ADM evaluator
also uses, so numbers are comparable up to resizing and sample count; sFID (spatial features)
is specific to the ADM evaluator and is reported only where the library provides it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DkdmError


def check_weights(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DkdmError(f"--inception-weights {p} does not exist; pass the local pt_inception weights file")
    if not p.is_file():
        raise DkdmError(f"--inception-weights {p} is not a file")
    with open(p, "rb") as f:
        head = f.read(8)
    if not (head.startswith(b"PK") or len(head) == 8 and int.from_bytes(head, "little") < 10**8):
        raise DkdmError(f"--inception-weights {p} is neither a torch zip archive nor safetensors; pass pt_inception weights")
    return p


def check_rgb(sample_shape) -> None:
    if len(sample_shape) != 3 or sample_shape[0] != 3:
        raise DkdmError(
            f"Inception metrics apply to RGB image models; this model draws {list(sample_shape)} samples "
            "(for digits use the default digits-FID)"
        )


def load_backend():
    try:
        import torch_fidelity  # noqa: F401
    except Exception as e:  # ImportError, or torchvision failing to load its operators
        raise DkdmError(
            f"Inception metrics need the optional extra: pip install 'dkdm[inception]' "
            f"(torch-fidelity + a torchvision matching your torch); it failed to load: {e.__class__.__name__}"
        )
    return torch_fidelity
