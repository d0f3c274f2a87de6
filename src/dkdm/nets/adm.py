"""OpenAI's ADM UNet (guided-diffusion's ``UNetModel``), written from the published architecture.

Parameter names match guided-diffusion's state dicts key for key, so a checkpoint loads without
the original code; the network is configured by guided-diffusion's own flag names
(``parse_flags``: defaults filled in, training-only flags dropped, typos refused). A teacher from
a checkpoint (``formats/adm.py``) and an ``adm`` student are the same network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DkdmError
from .embedding import timestep_embedding

#: guided-diffusion's defaults (script_util.model_and_diffusion_defaults), plus in/out channels,
#: improved-diffusion's sigma_small and the sampling scripts' clip_denoised. rescale_timesteps has no
#: default here: the two code bases disagree on it (see _rescale_timesteps).
FLAG_DEFAULTS = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "dropout": 0.0,
    "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": False,
    "use_fp16": False, "use_new_attention_order": False, "learn_sigma": False, "sigma_small": False,
    "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False,
    "predict_xstart": False, "rescale_timesteps": None, "rescale_learned_sigmas": False, "in_channels": 3,
    "num_classes": 1000, "clip_denoised": True,
}
#: Flags the training and sampling scripts of improved-/guided-diffusion save beside the model's that
#: change neither the network nor its reverse step: accepted and dropped.
IGNORED_FLAGS = {
    "data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch",
    "ema_rate", "log_interval", "save_interval", "resume_checkpoint", "fp16_scale_growth", "num_samples",
    "use_ddim", "model_path", "classifier_scale", "classifier_path", "classifier_use_fp16", "classifier_width",
    "classifier_depth", "classifier_attention_resolutions", "classifier_use_scale_shift_norm",
    "classifier_resblock_updown", "classifier_pool",
}
#: Flags only one code base has: they tell which defaults a flags file was written against.
IMPROVED_ONLY = {"sigma_small"}
GUIDED_ONLY = {"num_head_channels", "channel_mult", "resblock_updown", "use_new_attention_order"} | {
    k for k in IGNORED_FLAGS if k.startswith("classifier_")}
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


def parse_flags(flags: dict) -> dict:
    """Full, validated flags from an improved-/guided-diffusion flag mapping.

    Training-only flags are dropped; unknown names are refused, so a typo never goes unnoticed.
    """
    if not isinstance(flags, dict):
        raise DkdmError("an ADM config must be a mapping of guided-diffusion flags (e.g. num_channels: 128)")
    given = {k: v for k, v in flags.items() if k != "type" and k not in IGNORED_FLAGS}
    if {"large_size", "small_size"} & set(given):
        raise DkdmError("ADM large_size / small_size describe a super-resolution model, which dkdm does not "
                        "support (its network also takes the low-resolution image)")
    unknown = set(given) - set(FLAG_DEFAULTS)
    if unknown:
        raise DkdmError(f"unknown ADM flag(s) {', '.join(sorted(unknown))}; guided-diffusion flags are "
                        f"{', '.join(sorted(FLAG_DEFAULTS))} (training-only flags such as lr are ignored)")
    f = {**FLAG_DEFAULTS, **given}
    respacing = f["timestep_respacing"]
    if respacing not in ("", None) and str(respacing) != str(f["diffusion_steps"]):
        raise DkdmError("ADM timestep_respacing is a sampling setting; give the checkpoint's full schedule "
                        "(timestep_respacing: \"\") and choose sampling steps in dkdm")
    f["timestep_respacing"] = ""
    f["rescale_timesteps"] = _rescale_timesteps(given, f)
    try:
        channel_plan(f)
    except (TypeError, ValueError) as e:
        raise DkdmError(f"bad ADM flags ({e}); channel_mult looks like 1,2,2,2 and attention_resolutions like 16,8")
    return f


def _rescale_timesteps(given: dict, f: dict) -> bool:
    """Whether the network sees t scaled to 0..1000: as stated, else by the code base's default.

    improved-diffusion defaults rescale_timesteps to true, guided-diffusion to false; the flags of
    only one of them tell which a file was written for. The choice only matters when
    diffusion_steps is not 1000, and there a wrong guess would silently feed the network wrong
    timesteps, so an undecidable file is refused.
    """
    if given.get("rescale_timesteps") is not None:
        return bool(given["rescale_timesteps"])
    improved, guided = bool(IMPROVED_ONLY & set(given)), bool(GUIDED_ONLY & set(given))
    if improved != guided:
        return improved
    try:
        if int(f["diffusion_steps"]) == 1000:
            return False  # 1000 / diffusion_steps = 1: both conventions feed the same t
    except (TypeError, ValueError):
        raise DkdmError(f"ADM diffusion_steps must be an integer, got {f['diffusion_steps']!r}")
    raise DkdmError(f"the ADM flags do not say rescale_timesteps, which at diffusion_steps {f['diffusion_steps']} "
                    f"changes the timesteps the network sees: improved-diffusion's default is true, "
                    f"guided-diffusion's false; add rescale_timesteps: true or false to the flags file")


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
