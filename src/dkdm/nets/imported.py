"""A network the user names by its import path, ``package.module:Class``, as a dkdm network.

dkdm imports the module, constructs ``Class(sample_shape=..., out_channels=..., num_classes=...,
**kwargs)`` (``out_channels`` is the sample's channels, doubled for a learned variance;
``num_classes`` 0 for an unconditional model) and calls ``forward(x, t)``, or ``forward(x, t, y)``
when it conditions on classes. A model directory records the import path; loading one imports it
only where the user names it (``DKDM_TRUST_IMPORT``), so a downloaded directory runs no code.
"""

from __future__ import annotations

import importlib
import os

from torch import nn

from ..errors import DkdmError

TRUST_ENV = "DKDM_TRUST_IMPORT"
#: Import paths this process built a network from on the user's word (a --student spec, or a run it
#: resumes): its own report and checkpoints load them back without asking again.
_BUILT: set[str] = set()


def import_class(target: str) -> type:
    """The ``nn.Module`` subclass ``package.module:Class`` names; DkdmError in one line otherwise."""
    module, _, name = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # the user's module may fail in any way while it is imported
        raise DkdmError(f"cannot import {module} for the network {target} ({e.__class__.__name__}: {e})")
    cls = getattr(mod, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise DkdmError(f"{target}: {module} has no torch.nn.Module subclass named {name}")
    return cls


class ImportedNet(nn.Module):
    """The user's module behind dkdm's ``net(x, t, y=None)``."""

    def __init__(self, net: nn.Module, conditional: bool):
        super().__init__()
        self.net, self.conditional = net, conditional

    def forward(self, x, t, y=None):
        return self.net(x, t, y) if self.conditional else self.net(x, t)


def build_imported(target: str, sample_shape: tuple, out_channels: int, num_classes: int, kwargs: dict) -> ImportedNet:
    cls = import_class(target)
    try:
        net = cls(sample_shape=tuple(sample_shape), out_channels=out_channels, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise DkdmError(f"{target}(sample_shape=..., out_channels=..., num_classes=..., "
                        f"{', '.join(f'{k}=...' for k in kwargs)}) failed: {e}")
    _BUILT.add(target)
    return ImportedNet(net, num_classes > 0)


def check_trusted(target: str, where) -> None:
    """Refuse to import ``target`` for a model read from ``where`` unless the user named it."""
    trusted = {t.strip() for t in os.environ.get(TRUST_ENV, "").split(",") if t.strip()} | _BUILT
    if target not in trusted and target.partition(":")[0] not in trusted:
        raise DkdmError(f"{where} holds a network of {target}, which loading imports (runs its code); to allow it, "
                        f"set {TRUST_ENV}={target}")
