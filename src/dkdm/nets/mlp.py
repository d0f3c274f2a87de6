"""A residual MLP for vector data (the toy problems)."""

from __future__ import annotations

from torch import nn

from .embedding import timestep_embedding
from .family import Family, narrower


class MLPNet(nn.Module):
    """A residual MLP for vector data, conditioned on a sinusoidal timestep embedding."""

    def __init__(self, dim: int, out_dim: int, width: int, depth: int, temb: int, classes: int = 0):
        super().__init__()
        self.temb = temb
        if classes:
            self.label = nn.Embedding(classes, width)
        self.inp = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(temb, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))

    def forward(self, x, t, y=None):
        temb = timestep_embedding(t, self.temb).to(self.inp.weight.dtype)  # bf16 / fp16 weights: one dtype
        h = self.inp(x) + self.time(temb)
        if y is not None:
            h = h + self.label(y)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def build(s: dict, c: int, dim: int, out_channels: int) -> nn.Module:
    return MLPNet(dim, out_channels, int(s["width"]), int(s["depth"]), int(s["temb"]), int(s["classes"]))


FAMILY = Family("mlp", {"width": 256, "depth": 4, "temb": 64, "classes": 0}, build,
                lambda spec, classes: {**spec, "width": narrower(int(spec["width"]), 8), "classes": classes},
                images=False)
