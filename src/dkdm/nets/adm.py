"""OpenAI's ADM UNet (guided-diffusion's ``UNetModel``), written from the published architecture.

Parameter names match guided-diffusion's state dicts key for key, so a checkpoint loads without
the original code; the network is configured by guided-diffusion's flags, already parsed and
checked by the format (``teachers/adm.py``). A teacher from a checkpoint and an ``adm`` student
are the same network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DkdmError
from .embedding import timestep_embedding

#: channel_mult per image size when the flag is empty, as guided-diffusion chooses it (improved-diffusion
#: has the same for 256 and 64 and adds 32, which the DKDM authors' fork keeps).
DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
                32: (1, 2, 2, 2)}


def channel_plan(f: dict) -> tuple[tuple, list[int]]:
    """channel_mult as numbers and the attention downsampling factors, as guided-diffusion derives them."""
    size = int(f["image_size"])
    mult = f["channel_mult"]
    if mult in ("", None):
        if size not in DEFAULT_MULT:
            raise DkdmError(f"ADM image_size {size} has no default channel_mult; set channel_mult (e.g. 1,2,2,2)")
        mult = DEFAULT_MULT[size]
    elif isinstance(mult, str):
        mult = tuple(float(m) if "." in m else int(m) for m in mult.split(","))
    elif not isinstance(mult, (list, tuple)):
        mult = (mult,)
    res = f["attention_resolutions"]
    if isinstance(res, (list, tuple)):
        res = [int(r) for r in res]
    elif isinstance(res, int):
        res = [res]
    else:
        res = [int(r) for r in str(res).split(",") if r.strip()]
    return tuple(mult), sorted({size // r for r in res})


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and weight dtype (as ADM does)."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def _norm(ch):
    return GroupNorm32(32, ch)


class _Resample(nn.Module):
    def __init__(self, ch, use_conv, out_ch, up):
        super().__init__()
        self.up = up
        if use_conv:
            conv = nn.Conv2d(ch, out_ch, 3, padding=1) if up else nn.Conv2d(ch, out_ch, 3, stride=2, padding=1)
            setattr(self, "conv" if up else "op", conv)
        self.use_conv = use_conv

    def forward(self, x):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if self.use_conv else x
        return self.op(x) if self.use_conv else F.avg_pool2d(x, 2, 2)


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, dropout, out_ch, scale_shift, up=False, down=False):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.updown = up or down
        if self.updown:
            self.h_upd = _Resample(ch, False, ch, up)
            self.x_upd = _Resample(ch, False, ch, up)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(_norm(out_ch), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.scale_shift = scale_shift
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over positions; ``new_order`` splits q/k/v before heads (QKVAttention).

    Computed by ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs) with
    the 1x1 convolutions applied as linear maps over positions, so that q, k and v come out as
    [batch, heads, positions, channels] with channels contiguous, as those kernels want them.
    """

    def __init__(self, ch, num_heads, head_channels, new_order):
        super().__init__()
        if head_channels != -1:
            if ch % head_channels:
                raise DkdmError(f"ADM channels {ch} not divisible by num_head_channels {head_channels}")
            num_heads = ch // head_channels
        self.heads = num_heads
        self.new_order = new_order
        self.norm = _norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        length, n = x.shape[-1], self.heads
        qkv = F.linear(self.norm(x).transpose(1, 2), self.qkv.weight.squeeze(-1), self.qkv.bias)  # [b, L, 3c]
        # channel order of qkv: (q|k|v, head, ch) in the new order, (head, q|k|v, ch) in the legacy one
        qkv = qkv.view(b, length, 3, n, c // n) if self.new_order else qkv.view(b, length, n, 3, c // n).transpose(2, 3)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # the default scale 1/sqrt(ch) is ADM's 1/sqrt(sqrt(ch)) applied to both q and k
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, c)
        h = F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return (x + h.transpose(1, 2)).reshape(b, c, *spatial)


class _Block(nn.ModuleList):
    """A sequence whose ResBlocks also take the embedding (TimestepEmbedSequential)."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion's UNetModel; parameter names match its state dicts exactly."""

    def __init__(self, f: dict):
        super().__init__()
        mult, attn_ds = channel_plan(f)
        mc, drop = int(f["num_channels"]), float(f["dropout"])
        out_ch = f["in_channels"] * (2 if f["learn_sigma"] else 1)
        ss, updown, new = bool(f["use_scale_shift_norm"]), bool(f["resblock_updown"]), bool(f["use_new_attention_order"])
        heads, head_ch = int(f["num_heads"]), int(f["num_head_channels"])
        heads_up = heads if int(f["num_heads_upsample"]) == -1 else int(f["num_heads_upsample"])
        emb = mc * 4
        self.model_channels = mc
        self.time_scale = 1000.0 / int(f["diffusion_steps"]) if f["rescale_timesteps"] else 1.0
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.num_classes = int(f["num_classes"]) if f["class_cond"] else None
        if self.num_classes:
            self.label_emb = nn.Embedding(self.num_classes, emb)
        ch = input_ch = int(mult[0] * mc)
        self.input_blocks = nn.ModuleList([_Block([nn.Conv2d(f["in_channels"], ch, 3, padding=1)])])
        chans, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(int(f["num_res_blocks"])):
                layers = [ResBlock(ch, emb, drop, int(m * mc), ss)]
                ch = int(m * mc)
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, heads, head_ch, new))
                self.input_blocks.append(_Block(layers))
                chans.append(ch)
            if level != len(mult) - 1:
                down = ResBlock(ch, emb, drop, ch, ss, down=True) if updown else _Resample(ch, True, ch, up=False)
                self.input_blocks.append(_Block([down]))
                chans.append(ch)
                ds *= 2
        self.middle_block = _Block([ResBlock(ch, emb, drop, ch, ss), AttentionBlock(ch, heads, head_ch, new),
                                    ResBlock(ch, emb, drop, ch, ss)])
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(int(f["num_res_blocks"]) + 1):
                layers = [ResBlock(ch + chans.pop(), emb, drop, int(mc * m), ss)]
                ch = int(mc * m)
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, heads_up, head_ch, new))
                if level and i == int(f["num_res_blocks"]):
                    layers.append(ResBlock(ch, emb, drop, ch, ss, up=True) if updown else _Resample(ch, True, ch, up=True))
                    ds //= 2
                self.output_blocks.append(_Block(layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(input_ch, out_ch, 3, padding=1))

    def forward(self, x, t, y=None):
        # the embedding is computed in float32 and then joins the weights' dtype (bf16 / fp16 teachers)
        temb = timestep_embedding(t * self.time_scale, self.model_channels)
        emb = self.time_embed(temb.to(self.time_embed[0].weight.dtype))
        if self.num_classes:
            if y is None:
                raise DkdmError("this ADM model is class-conditional; it needs class labels")
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class ADMNet(nn.Module):
    """An OpenAI ADM UNet (guided-diffusion layout)."""

    def __init__(self, adm):
        super().__init__()
        self.adm = adm

    def forward(self, x, t, y=None):
        return self.adm(x, t, y)
