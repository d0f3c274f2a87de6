"""Networks of any architecture, built from a spec (``specs.py``), and the default student of a teacher.

Every network is wrapped to the one signature the rest of dkdm uses,
``net(x, t) -> tensor``, so the pool, objective and trainer never see which library built it.
"""

from __future__ import annotations


from torch import nn

from .errors import DkdmError
# the spec functions, re-exported: a spec and the network it builds are used together
from .specs import (SPEC_DEFAULTS, DIFFUSERS_CLASSES, KINDS, SPEC_HELP, family_of, format_spec,  # noqa: F401
                    num_classes, parse_spec, saved_spec)
from .nets import FAMILIES
from .nets.adm import ADMNet, ADMUNet, channel_plan
from .nets.dit import DiTNet, init_dit
from .nets.family import WIDTH_SCALE
from .nets.unet import UNetNet

def build_net(spec, sample_shape, out_channels: int) -> nn.Module:
    """Build the network for ``spec`` on data of ``sample_shape`` (C,H,W or D)."""
    s = parse_spec(spec)
    shape = tuple(sample_shape)
    kind = s["type"]
    if kind == "import":
        from .nets.imported import build_imported

        return build_imported(s["target"], shape, out_channels, int(s["classes"]), s["kwargs"])
    family = FAMILIES.get(kind)
    if family is not None and not family.images:
        if len(shape) != 1:
            raise DkdmError(f"an {kind} takes vector data, but the data has shape {list(shape)}; use unet or dit")
        return family.build(s, 1, shape[0], out_channels)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DkdmError(f"a {kind} takes square images (C,H,W), but the data has shape {list(shape)}; use mlp")
    if family is not None:
        return family.build(s, shape[0], shape[1], out_channels)
    builders = {"diffusers": _diffusers_net, "adm": _adm_net}
    if kind not in builders:
        raise DkdmError(f"unknown model type {kind!r}")
    return builders[kind](s, shape[0], shape[1], out_channels)


def _adm_net(s: dict, c: int, h: int, out_channels: int) -> nn.Module:
    from .nets.adm import parse_flags

    flags = {**s, "in_channels": c, "image_size": h}  # the data decides these two
    if out_channels not in (c, 2 * c):
        raise DkdmError(f"an adm model outputs {c} or {2 * c} channels, not {out_channels}")
    flags["learn_sigma"] = out_channels == 2 * c
    return ADMNet(ADMUNet(parse_flags(flags)))


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
    family = FAMILIES.get(spec["type"]) if spec is not None else None
    if family is not None:
        return parse_spec(family.half(spec, classes))
    for family in FAMILIES.values():  # a teacher of a known family loaded from another format
        if family.net_type is not None and isinstance(net, family.net_type):
            return parse_spec(family.half_of_net(net, classes))
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
        if spec["type"] in FAMILIES and FAMILIES[spec["type"]].patch_ordered:  # rows (patch position, channel)
            positions = int(spec["patch"]) ** 2
            rows = source.reshape(positions, 2, -1, *source.shape[1:])[:, 0]
            out[key] = rows.reshape(target.shape).clone()
        else:
            out[key] = source[:target.shape[0]].clone()
    return out
