"""Networks of any architecture, built from a spec (``specs.py``), and the default student of a teacher.

Every network is wrapped to the one signature the rest of dkdm uses,
``net(x, t) -> tensor``, so the pool, objective and trainer never see which library built it.
"""

from __future__ import annotations

import math

from torch import nn

from .errors import DkdmError
# the spec functions, re-exported: a spec and the network it builds are used together
from .specs import (DEFAULTS, DIFFUSERS_CLASSES, KINDS, SPEC_HELP, family_of, format_spec,  # noqa: F401
                    num_classes, parse_spec, saved_spec)
from .nets.adm import ADMNet, ADMUNet, channel_plan
from .nets.dit import DiTNet, init_dit, stretch_positions
from .nets.mlp import MLPNet
from .nets.unet import UNetNet
from .nets.uvit import UViTNet

def build_net(spec, sample_shape, out_channels: int) -> nn.Module:
    """Build the network for ``spec`` on data of ``sample_shape`` (C,H,W or D)."""
    s = parse_spec(spec)
    shape = tuple(sample_shape)
    kind = s["type"]
    if kind == "import":
        from .nets.imported import build_imported

        return build_imported(s["target"], shape, out_channels, int(s["classes"]), s["kwargs"])
    if kind == "mlp":
        if len(shape) != 1:
            raise DkdmError(f"an mlp takes vector data, but the data has shape {list(shape)}; use unet or dit")
        return MLPNet(shape[0], out_channels, int(s["width"]), int(s["depth"]), int(s["temb"]), int(s["classes"]))
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DkdmError(f"a {kind} takes square images (C,H,W), but the data has shape {list(shape)}; use mlp")
    builders = {"diffusers": _diffusers_net, "unet": _unet_net, "adm": _adm_net, "uvit": _uvit_net, "dit": _dit_net}
    if kind not in builders:
        raise DkdmError(f"unknown model type {kind!r}")
    return builders[kind](s, shape[0], shape[1], out_channels)


def _unet_net(s: dict, c: int, h: int, out_channels: int) -> nn.Module:
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


def _adm_net(s: dict, c: int, h: int, out_channels: int) -> nn.Module:
    from .nets.adm import parse_flags

    flags = {**s, "in_channels": c, "image_size": h}  # the data decides these two
    if out_channels not in (c, 2 * c):
        raise DkdmError(f"an adm model outputs {c} or {2 * c} channels, not {out_channels}")
    flags["learn_sigma"] = out_channels == 2 * c
    return ADMNet(ADMUNet(parse_flags(flags)))


def _uvit_net(s: dict, c: int, h: int, out_channels: int) -> nn.Module:
    width, heads, patch = _checked_tokens(s, h)
    return UViTNet(c, out_channels, h, patch, width, int(s["depth"]), heads, int(s["classes"]))


def _dit_net(s: dict, c: int, h: int, out_channels: int) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    width, heads, patch = _checked_tokens(s, h)
    dit = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=c,
        out_channels=out_channels, num_layers=int(s["depth"]), sample_size=h, patch_size=patch,
        num_embeds_ada_norm=int(s["classes"]) or 1,
    )
    init_dit(dit)
    stretch_positions(dit, int(s["pos_grid"]))
    return DiTNet(dit)


def _checked_tokens(s: dict, h: int) -> tuple[int, int, int]:
    """A transformer spec's (dit, uvit) width, heads and patch, checked against each other and the image size."""
    width, heads, patch = int(s["width"]), int(s["heads"]), int(s["patch"])
    if width % heads:
        raise DkdmError(f"{s['type']} width {width} must be divisible by heads {heads}")
    if h % patch:
        raise DkdmError(f"{s['type']} patch {patch} must divide the image size {h}")
    return width, heads, patch


def _diffusers_net(s: dict, c: int, h: int, out_channels: int) -> nn.Module:
    """A fresh diffusers model from a config file's fields; the data sets its channels and size."""
    import diffusers

    config = {k: v for k, v in s["config"].items() if not k.startswith("_")}
    config.update(in_channels=c, out_channels=out_channels, sample_size=h)
    name, classes = s["config"]["_class_name"], int(s["classes"])
    try:
        if name == "UNet2DModel":
            config["num_class_embeds"] = classes or None
            return UNetNet(diffusers.UNet2DModel.from_config(config))
        config["num_embeds_ada_norm"] = classes or 1
        dit = diffusers.DiTTransformer2DModel.from_config(config)
    except (TypeError, ValueError, AttributeError) as e:
        raise DkdmError(f"the {name} config does not build on {c}x{h}x{h} data ({e.__class__.__name__}: {e})")
    init_dit(dit)
    return DiTNet(dit)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def unwrap(net: nn.Module, t: int = 0) -> tuple[nn.Module, int]:
    """The network behind dkdm's wrappers (torch.compile's ``_orig_mod``, a respaced view's ``inner``
    with its timestep map ``tmap``) and the timestep ``t`` of the outer network as the inner one's."""
    while True:
        if isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod
        elif isinstance(getattr(net, "inner", None), nn.Module) and hasattr(net, "tmap"):
            net, t = net.inner, int(net.tmap[t])
        else:
            return net, t


#: Width factor of the default student: 1/sqrt(2) of every width, about half the teacher's parameters
#: (a layer's weights grow with the square of its width). Smaller digits students (231k, 164k
#: against 367k) were 1.2-1.4x behind at equal steps (docs/digits-default.md, docs/results.md);
#: a DKDM step costs a teacher forward whatever the student.
WIDTH_SCALE = 1 / math.sqrt(2)


def _narrower(width: int, multiple: int) -> int:
    """``width`` * WIDTH_SCALE, the nearest multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, round(width * WIDTH_SCALE / multiple) * multiple)


def _half_unet(widths, layers: int, attn, groups: int, classes: int) -> dict:
    # GroupNorm must divide every width: the most groups dividing the teacher's whose multiples come
    # within a quarter of each target width
    targets = [w * WIDTH_SCALE for w in widths]
    for g in (d for d in range(groups, 0, -1) if groups % d == 0):
        narrow = [_narrower(w, g) for w in widths]
        if all(abs(n - x) <= 0.25 * x for n, x in zip(narrow, targets)):
            break
    return {"type": "unet", "widths": narrow, "layers": layers, "attn": list(attn), "groups": g, "classes": classes}


def _half_dit(width: int, heads: int, depth: int, patch: int, classes: int) -> dict:
    # fewer heads at about the teacher's head size; DiT's sin-cos position embedding needs width % 4 == 0
    heads = max(1, round(heads * WIDTH_SCALE))
    step = heads * 4 // math.gcd(heads, 4)
    return {"type": "dit", "patch": patch, "depth": depth, "width": _narrower(width, step), "heads": heads,
            "classes": classes}


def _half_adm(flags: dict) -> dict:
    """The ADM flags at about num_channels / sqrt(2), keeping every level divisible as ADM needs
    (GroupNorm of 32 groups, the attention heads): the nearest width that fits, at most the teacher's."""
    mult, _ = channel_plan(flags)
    mc, head_ch, heads = int(flags["num_channels"]), int(flags["num_head_channels"]), int(flags["num_heads"])

    def fits(c):
        chans = [int(m * c) for m in mult]
        return all(ch % 32 == 0 and (ch % head_ch == 0 if head_ch != -1 else ch % heads == 0) for ch in chans)

    target = mc * WIDTH_SCALE
    half = min((c for c in range(1, mc + 1) if fits(c)), key=lambda c: (abs(c - target), c), default=mc)
    return {**flags, "num_channels": half}


def _half_uvit(spec: dict, classes: int) -> dict:
    # fewer heads at about the teacher's head size, the same depth and patch
    heads = max(1, round(int(spec["heads"]) * WIDTH_SCALE))
    return {**spec, "width": _narrower(int(spec["width"]), heads), "heads": heads, "classes": classes}


def default_student_spec(teacher) -> dict:
    """The student dkdm distills into when none is named: the teacher's family (adm, unet, dit,
    uvit, mlp) at about half its parameters (every width / sqrt(2), same depth), conditioned on the
    teacher's classes.

    A diffusers UNet2DModel teacher gets a dkdm ``unet`` (its levels, res-blocks and attention
    levels), a DiT a ``dit`` of the same depth and patch. A teacher of unknown architecture (a
    custom module) gets the smallest default of the data's shape: a ``unet`` for images, an ``mlp``
    for vectors.
    """
    classes = int(teacher.num_classes or 0)
    spec = teacher.spec
    net, _ = unwrap(teacher.net)
    if spec is not None and spec["type"] == "adm":
        out = _half_adm({k: v for k, v in spec.items() if k != "type"})
        out.update(class_cond=bool(classes), **({"num_classes": classes} if classes else {}))
        return parse_spec({"type": "adm", **out})
    if spec is not None and spec["type"] == "mlp":
        return parse_spec({**spec, "width": _narrower(int(spec["width"]), 8), "classes": classes})
    if spec is not None and spec["type"] == "unet":
        return parse_spec(_half_unet(spec["widths"], spec["layers"], spec["attn"], spec["groups"], classes))
    if spec is not None and spec["type"] == "dit":
        return parse_spec(_half_dit(spec["width"], spec["heads"], spec["depth"], spec["patch"], classes))
    if spec is not None and spec["type"] == "uvit":
        return parse_spec(_half_uvit(spec, classes))
    if isinstance(net, UNetNet):
        c = net.unet.config
        attn = [i for i, name in enumerate(c.down_block_types) if "Attn" in name]
        return parse_spec(_half_unet(c.block_out_channels, c.layers_per_block, attn, c.norm_num_groups, classes))
    if isinstance(net, DiTNet):
        c = net.dit.config
        return parse_spec(_half_dit(c.num_attention_heads * c.attention_head_dim, c.num_attention_heads,
                                    c.num_layers, c.patch_size, classes))
    return parse_spec({"type": "mlp" if len(teacher.sample_shape) == 1 else "unet", "classes": classes})


def student_spec(teacher, given=None) -> dict:
    """The student's spec for ``teacher``: ``given`` (a spec string or mapping), else the default.

    A class-conditional teacher's student conditions on the same classes unless its spec names
    them (``classes=0``, or ``class_cond`` for adm, learns the class-marginal distribution).
    """
    if given is None:
        return default_student_spec(teacher)
    spec = parse_spec(given)
    key = "class_cond" if spec["type"] == "adm" else "classes"
    named = (key in given) if isinstance(given, dict) else (f"{key}=" in str(given))
    if teacher.num_classes and not named:
        if spec["type"] == "adm":
            spec = parse_spec({**spec, "class_cond": True, "num_classes": int(teacher.num_classes)})
        else:
            spec["classes"] = int(teacher.num_classes)
    return spec


def drop_variance_outputs(spec: dict, state: dict, fresh: dict) -> dict:
    """``state`` of a learned-variance network (2C outputs: prediction, then variance) made to fit the
    fixed-variance network of the same spec whose state is ``fresh`` (C outputs): the output layer
    keeps the prediction's rows (for a DiT, within each patch position: its head writes p x p x 2C)."""
    out = dict(state)
    for key, target in fresh.items():
        source = state[key]
        if source.shape == target.shape:
            continue
        if source.shape[0] != 2 * target.shape[0] or source.shape[1:] != target.shape[1:]:
            raise DkdmError(f"cannot drop the variance outputs of {key}: shape {list(source.shape)} against "
                            f"{list(target.shape)}")
        if spec["type"] in ("dit", "uvit"):  # rows ordered (patch position, channel)
            positions = int(spec["patch"]) ** 2
            rows = source.reshape(positions, 2, -1, *source.shape[1:])[:, 0]
            out[key] = rows.reshape(target.shape).clone()
        else:
            out[key] = source[:target.shape[0]].clone()
    return out
