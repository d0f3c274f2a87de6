"""diffusers' ``UNet2DModel`` as a dkdm network."""

from __future__ import annotations

from torch import nn


class UNetNet(nn.Module):
    """diffusers ``UNet2DModel`` behind the ``net(x, t)`` signature."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y, return_dict=False)[0]
