"""``--compile`` by regions: torch.compile each repeated block of a network in place, not the whole.

A diffusion network is a few block types repeated (ADM's ResBlock and AttentionBlock, diffusers'
ResnetBlock2D / Attention / BasicTransformerBlock, U-ViT's blocks): compiling each block in place
(``nn.Module.compile``) lets dynamo reuse one compiled graph for every block of a type and shape,
so compile time grows with the number of distinct blocks, not the depth, and the network keeps
its module tree and state-dict names (checkpoints, the EMA and saving see no wrapper). A network
with none of these blocks (an MLP, a user's module) is compiled whole. Inductor's compiled kernels
are cached on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under dkdm's cache directory), so a
second run of the same shapes compiles from the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def _region_types() -> tuple[type, ...]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    from .nets.adm import AttentionBlock, ResBlock
    from .nets.uvit import _Block as UViTBlock

    return ResBlock, AttentionBlock, ResnetBlock2D, Attention, BasicTransformerBlock, UViTBlock


def keep_compile_cache() -> Path:
    """Point inductor's on-disk cache at dkdm's cache directory unless the user set one; where it is."""
    from .metrics import cache_dir

    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor")))


def compile_regions(net: nn.Module, mode: str | None = None) -> int:
    """Compile ``net``'s repeated blocks in place (the outermost of nested ones); the whole ``net``
    where it has none. Returns how many regions were compiled (1 for a whole network)."""
    keep_compile_cache()
    types, done = _region_types(), []
    for name, module in net.named_modules():
        if isinstance(module, types) and not any(name.startswith(d + ".") for d in done):
            module.compile(mode=mode)
            done.append(name)
    if not done:
        net.compile(mode=mode)
        return 1
    return len(done)
