"""U-ViT (Bao et al., CVPR 2023): a ViT whose every input is a token (time, class, image patches),
with long skip connections between the shallow and the deep blocks, as a dkdm network.

A third family beside the CNNs (UNet, ADM) and the adaLN transformers (DiT): no convolution after
the patch embedding, no modulation; conditioning only through tokens and attention. The blocks
are pre-LayerNorm attention (``scaled_dot_product_attention``) and a 4x GELU MLP; each of the
deep blocks first mixes in its shallow twin's output, ``Linear(cat(x, skip))``. The decoder
writes each patch's p x p x C outputs from its token (rows ordered: patch position, channel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import timestep_embedding
from .family import WIDTH_SCALE, Family, checked_tokens, narrower


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, skip: bool):
        super().__init__()
        self.heads = heads
        self.skip = nn.Linear(2 * width, width) if skip else None
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, skip=None):
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class UViTNet(nn.Module):
    """U-ViT on C x H x W samples: ``depth`` blocks (depth // 2 in, one middle, depth // 2 out)."""

    def __init__(self, in_channels: int, out_channels: int, size: int, patch: int = 2, width: int = 128,
                 depth: int = 7, heads: int = 4, classes: int = 0):
        super().__init__()
        self.patch, self.out_channels, self.grid = patch, out_channels, size // patch
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.time = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.label = nn.Embedding(classes, width) if classes else None
        self.extras = 1 + (classes > 0)
        self.pos = nn.Parameter(torch.zeros(1, self.extras + self.grid ** 2, width))
        half = depth // 2
        self.inner = nn.ModuleList(_Block(width, heads, skip=False) for _ in range(half))
        self.middle = _Block(width, heads, skip=False)
        self.outer = nn.ModuleList(_Block(width, heads, skip=True) for _ in range(half))
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, patch * patch * out_channels)
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x, t, y=None):
        b = x.shape[0]
        tokens = [self.time(timestep_embedding(t, self.pos.shape[-1]).to(x.dtype))[:, None]]
        if self.label is not None:
            tokens.append(self.label(y)[:, None])
        h = torch.cat([*tokens, self.embed(x).flatten(2).transpose(1, 2)], dim=1) + self.pos
        skips = []
        for block in self.inner:
            h = block(h)
            skips.append(h)
        h = self.middle(h)
        for block in self.outer:
            h = block(h, skips.pop())
        out = self.decoder(self.norm(h))[:, self.extras:]  # [b, grid^2, p * p * C]
        g, p, c = self.grid, self.patch, self.out_channels
        return out.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)


def build(s: dict, c: int, h: int, out_channels: int) -> nn.Module:
    width, heads, patch = checked_tokens(s, h)
    return UViTNet(c, out_channels, h, patch, width, int(s["depth"]), heads, int(s["classes"]))


def _half(spec: dict, classes: int) -> dict:
    # fewer heads at about the teacher's head size, the same depth and patch
    heads = max(1, round(int(spec["heads"]) * WIDTH_SCALE))
    return {**spec, "width": narrower(int(spec["width"]), heads), "heads": heads, "classes": classes}


FAMILY = Family("uvit", {"patch": 2, "depth": 7, "width": 128, "heads": 4, "classes": 0}, build, _half,
                patch_ordered=True)
