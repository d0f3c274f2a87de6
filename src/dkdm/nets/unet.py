"""diffusers' ``UNet2DModel`` as a dkdm network: the ``unet`` family."""

from __future__ import annotations

from torch import nn

from ..errors import DkdmError
from .family import WIDTH_SCALE, Family, narrower


class UNetNet(nn.Module):
    """diffusers ``UNet2DModel`` behind the ``net(x, t)`` signature."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y, return_dict=False)[0]


def build(s: dict, c: int, h: int, out_channels: int) -> nn.Module:
    from diffusers import UNet2DModel

    widths = [int(w) for w in s["widths"]]
    levels = len(widths)
    if h % (2 ** (levels - 1)):
        raise DkdmError(f"a unet with {levels} levels needs image size divisible by {2 ** (levels - 1)}, got {h}")
    groups = int(s["groups"])
    if any(w % groups for w in widths):
        raise DkdmError(f"unet widths {widths} must all be divisible by groups={groups}")
    attn = {int(a) for a in s["attn"]}
    if any(a >= levels for a in attn):
        raise DkdmError(f"attn levels {sorted(attn)} out of range for {levels} levels (0..{levels - 1})")
    down = [("AttnDownBlock2D" if i in attn else "DownBlock2D") for i in range(levels)]
    up = [("AttnUpBlock2D" if i in attn else "UpBlock2D") for i in reversed(range(levels))]
    unet = UNet2DModel(
        sample_size=h, in_channels=c, out_channels=out_channels, block_out_channels=widths,
        layers_per_block=int(s["layers"]), down_block_types=down, up_block_types=up,
        norm_num_groups=groups, attention_head_dim=min(widths), num_class_embeds=int(s["classes"]) or None,
    )
    return UNetNet(unet)


def _half(widths, layers: int, attn, groups: int, classes: int) -> dict:
    # GroupNorm must divide every width: the most groups dividing the teacher's whose multiples come
    # within a quarter of each target width
    targets = [w * WIDTH_SCALE for w in widths]
    for g in (d for d in range(groups, 0, -1) if groups % d == 0):
        narrow = [narrower(w, g) for w in widths]
        if all(abs(n - x) <= 0.25 * x for n, x in zip(narrow, targets)):
            break
    return {"type": "unet", "widths": narrow, "layers": layers, "attn": list(attn), "groups": g, "classes": classes}


def _half_of_net(net: UNetNet, classes: int) -> dict:
    c = net.unet.config
    attn = [i for i, name in enumerate(c.down_block_types) if "Attn" in name]
    return _half(c.block_out_channels, c.layers_per_block, attn, c.norm_num_groups, classes)


FAMILY = Family("unet", {"widths": [32, 64], "layers": 1, "attn": [], "groups": 8, "classes": 0}, build,
                lambda spec, classes: _half(spec["widths"], spec["layers"], spec["attn"], spec["groups"], classes),
                UNetNet, _half_of_net)
