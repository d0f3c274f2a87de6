"""Networks a user would write, named on the command line by their import path (tests/test_any_network.py)."""

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """Two convolutions and a timestep embedding, the constructor dkdm calls for an imported class."""

    def __init__(self, sample_shape, out_channels, num_classes, width=16):
        super().__init__()
        c = sample_shape[0]
        self.sample_shape, self.num_classes = tuple(sample_shape), num_classes
        self.inp = nn.Conv2d(c, width, 3, padding=1)
        self.temb = nn.Embedding(1000, width)
        self.label = nn.Embedding(num_classes, width) if num_classes else None
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.inp(x) + self.temb(t)[:, :, None, None]
        if self.label is not None:
            h = h + self.label(y)[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


class NotANetwork:
    pass


class WrongArguments(nn.Module):
    def __init__(self, channels):
        super().__init__()
