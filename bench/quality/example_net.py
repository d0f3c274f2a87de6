"""A network dkdm does not know, named only by its import path (`--student example_net:ConvMixer`):
a ConvMixer (Trockman & Kolter 2022: patch embedding, then depthwise and pointwise convolutions at
one resolution, no down-sampling, no attention), with the timestep added to every block.

It takes the arguments dkdm passes to any imported class: sample_shape, out_channels, num_classes.
"""

import math

import torch
from torch import nn


def _time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Mix(nn.Module):
    def __init__(self, width: int, kernel: int):
        super().__init__()
        self.depthwise = nn.Sequential(nn.Conv2d(width, width, kernel, groups=width, padding=kernel // 2), nn.GELU(),
                                       nn.GroupNorm(8, width))
        self.pointwise = nn.Sequential(nn.Conv2d(width, width, 1), nn.GELU(), nn.GroupNorm(8, width))
        self.time = nn.Linear(width, width)

    def forward(self, h, temb):
        h = h + self.time(temb)[:, :, None, None]
        return self.pointwise(h + self.depthwise(h))


class ConvMixer(nn.Module):
    def __init__(self, sample_shape, out_channels, num_classes=0, width=96, depth=6, kernel=5):
        super().__init__()
        c = sample_shape[0]
        self.width = width
        self.embed = nn.Sequential(nn.Conv2d(c, width, 1), nn.GELU(), nn.GroupNorm(8, width))
        self.time = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        self.label = nn.Embedding(num_classes, width) if num_classes else None
        self.blocks = nn.ModuleList(_Mix(width, kernel) for _ in range(depth))
        self.out = nn.Conv2d(width, out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, y=None):
        temb = self.time(_time_features(t, self.width))
        if self.label is not None:
            temb = temb + self.label(y)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)
