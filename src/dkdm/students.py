"""Networks of any architecture, built from a short spec.

A spec is ``type[:key=value,...]`` (lists joined with ``-``, e.g. ``unet:widths=32-64,attn=1``)
or a mapping with a ``type`` key (a YAML block). Every network is wrapped to the one signature
the rest of dkdm uses, ``net(x, t) -> tensor``, so the pool, objective and trainer never see
which library built it. Any other ``torch.nn.Module`` with that signature works through the
Python API.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import DkdmError

DEFAULTS = {
    "mlp": {"width": 256, "depth": 4, "temb": 64, "classes": 0},
    "unet": {"widths": [32, 64], "layers": 1, "attn": [], "groups": 8, "classes": 0},
    "dit": {"patch": 2, "depth": 4, "width": 128, "heads": 4, "classes": 0},
}
SPEC_HELP = (
    "(any type takes classes=K for K-class conditioning)  mlp[:width=256,depth=4]  |  unet[:widths=32-64,layers=1,attn=1,groups=8]  |  "
    "dit[:patch=2,depth=4,width=128,heads=4]  |  adm[:num_channels=64,num_res_blocks=2,...] (guided-diffusion flags)"
)
KINDS = (*DEFAULTS, "adm")


def _value(text: str):
    if "-" in text.strip("-"):
        return [_value(p) for p in text.split("-")]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_spec(spec) -> dict:
    """A full spec (type plus every field) from a string or mapping; DkdmError if it is bad."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            import yaml

            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise DkdmError(f"model spec {text!r} is not valid YAML ({e.__class__.__name__})")
        else:
            kind, _, rest = text.partition(":")
            fields = {}
            for item in filter(None, rest.split(",")):
                key, eq, val = item.partition("=")
                if not eq or not key.strip():
                    raise DkdmError(
                        f"cannot parse {item!r} in model spec {text!r}: expected key=value; "
                        f"specs look like {SPEC_HELP}"
                    )
                fields[key.strip()] = _value(val.strip())
            spec = {"type": kind.strip(), **fields}
    if not isinstance(spec, dict) or "type" not in spec:
        raise DkdmError(f"model spec must name a type; specs look like {SPEC_HELP}")
    kind = spec["type"]
    if kind not in KINDS:
        raise DkdmError(f"unknown model type {kind!r}; choose one of {', '.join(KINDS)} ({SPEC_HELP})")
    if kind == "adm":
        from .teachers.adm import parse_flags

        return {"type": "adm", **parse_flags(spec)}
    unknown = set(spec) - set(DEFAULTS[kind]) - {"type"}
    if unknown:
        raise DkdmError(
            f"unknown field(s) {', '.join(sorted(unknown))} for a {kind} model; "
            f"it takes {', '.join(DEFAULTS[kind])}"
        )
    full = {"type": kind, **DEFAULTS[kind], **{k: v for k, v in spec.items() if k != "type"}}
    for key, default in DEFAULTS[kind].items():
        val = full[key]
        if isinstance(default, list):
            val = full[key] = [] if val in ("", None) else (val if isinstance(val, list) else [val])
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in val)
        else:
            ok = isinstance(val, int) and not isinstance(val, bool) and (val > 0 or (key == "classes" and val == 0))
        if not ok:
            kind_of = "a list of integers (a-b-c)" if isinstance(default, list) else "a positive integer"
            raise DkdmError(f"model spec field {key}={val!r} must be {kind_of}; specs look like {SPEC_HELP}")
    return full


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


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
        h = self.inp(x) + self.time(timestep_embedding(t, self.temb))
        if y is not None:
            h = h + self.label(y)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class UNetNet(nn.Module):
    """diffusers ``UNet2DModel`` behind the ``net(x, t)`` signature."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y, return_dict=False)[0]


class DiTNet(nn.Module):
    """diffusers ``DiTTransformer2DModel``; unconditional models use one class. Label dropout is
    off (dkdm never drops labels while training), but a pretrained table's null row is kept."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit
        for m in dit.modules():
            if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):
                m.dropout_prob = 0.0

    def forward(self, x, t, y=None):
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if y is None else y
        return self.dit(x, timestep=t, class_labels=labels, return_dict=False)[0]


class ADMNet(nn.Module):
    """An OpenAI ADM UNet (guided-diffusion layout)."""

    def __init__(self, adm):
        super().__init__()
        self.adm = adm

    def forward(self, x, t, y=None):
        return self.adm(x, t, y)


def build_net(spec, sample_shape, out_channels: int) -> nn.Module:
    """Build the network for ``spec`` on data of ``sample_shape`` (C,H,W or D)."""
    s = parse_spec(spec)
    shape = tuple(sample_shape)
    kind = s["type"]
    if kind == "mlp":
        if len(shape) != 1:
            raise DkdmError(f"an mlp takes vector data, but the data has shape {list(shape)}; use unet or dit")
        return MLPNet(shape[0], out_channels, int(s["width"]), int(s["depth"]), int(s["temb"]), int(s["classes"]))
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DkdmError(f"a {kind} takes square images (C,H,W), but the data has shape {list(shape)}; use mlp")
    c, h, _ = shape
    if kind == "unet":
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
    if kind == "adm":
        from .teachers.adm import ADMUNet, parse_flags

        flags = {**s, "in_channels": c, "image_size": h}  # the data decides these two
        if out_channels not in (c, 2 * c):
            raise DkdmError(f"an adm model outputs {c} or {2 * c} channels, not {out_channels}")
        flags["learn_sigma"] = out_channels == 2 * c
        return ADMNet(ADMUNet(parse_flags(flags)))
    if kind == "dit":
        from diffusers import DiTTransformer2DModel

        width, heads, patch = int(s["width"]), int(s["heads"]), int(s["patch"])
        if width % heads:
            raise DkdmError(f"dit width {width} must be divisible by heads {heads}")
        if h % patch:
            raise DkdmError(f"dit patch {patch} must divide the image size {h}")
        dit = DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=width // heads, in_channels=c,
            out_channels=out_channels, num_layers=int(s["depth"]), sample_size=h, patch_size=patch,
            num_embeds_ada_norm=int(s["classes"]) or 1,
        )
        return DiTNet(dit)
    raise DkdmError(f"unknown model type {kind!r}")


def num_classes(spec: dict | None) -> int:
    """Classes a spec conditions on (0: unconditional)."""
    if not spec:
        return 0
    if spec["type"] == "adm":
        return int(spec["num_classes"]) if spec.get("class_cond") else 0
    return int(spec.get("classes", 0))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
