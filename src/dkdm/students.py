"""Networks of any architecture, built from a short spec.

A spec is ``type[:key=value,...]`` (lists joined with ``-``, e.g. ``unet:widths=32-64,attn=1``)
or a mapping with a ``type`` key (a YAML block). Two more forms bring networks dkdm does not
build itself: ``package.module:Class[:key=value,...]`` (any ``nn.Module`` the user can import,
constructed with ``sample_shape``, ``out_channels``, ``num_classes`` and the spec's values; see
nets/imported.py) and a diffusers model config file ``config.json`` (its ``_class_name`` one of
``DIFFUSERS_CLASSES``). Every network is wrapped to the one signature the rest of dkdm uses,
``net(x, t) -> tensor``, so the pool, objective and trainer never see which library built it.
"""

from __future__ import annotations

import math

from torch import nn

from .errors import DkdmError
from .nets.adm import ADMNet, ADMUNet, channel_plan
from .nets.dit import DiTNet, init_dit, stretch_positions
from .nets.mlp import MLPNet
from .nets.unet import UNetNet
from .nets.uvit import UViTNet

DEFAULTS = {
    "mlp": {"width": 256, "depth": 4, "temb": 64, "classes": 0},
    "unet": {"widths": [32, 64], "layers": 1, "attn": [], "groups": 8, "classes": 0},
    "dit": {"patch": 2, "depth": 4, "width": 128, "heads": 4, "pos_grid": 16, "classes": 0},
    "uvit": {"patch": 2, "depth": 7, "width": 128, "heads": 4, "classes": 0},
}
#: Fields that may be 0 (classes=0: unconditional; pos_grid=0: diffusers' own positions).
MAY_BE_ZERO = {"classes", "pos_grid"}
#: Fields added after models were saved without them, with the value that rebuilds those models
#: as they were trained (a saved spec lacking the field gets this, not today's default).
LEGACY = {"dit": {"pos_grid": 0}}
SPEC_HELP = (
    "TYPE or TYPE:key=value,...: mlp:width=256,depth=4; unet:widths=32-64,layers=1,attn=1,groups=8; "
    "dit:patch=2,depth=4,width=128,heads=4,pos_grid=16; uvit:patch=2,depth=7,width=128,heads=4; adm:num_channels=64,num_res_blocks=2,... (guided-diffusion "
    "flags); every type takes classes=K for K-class conditioning"
)
KINDS = (*DEFAULTS, "adm", "import", "diffusers")
#: diffusers model classes a ``--student config.json`` may name (fresh weights, dkdm's wrappers).
DIFFUSERS_CLASSES = ("UNet2DModel", "DiTTransformer2DModel")


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


def _fields(rest: str, text: str) -> dict:
    fields = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise DkdmError(f"cannot parse {item!r} in model spec {text!r}: expected key=value; specs look like {SPEC_HELP}")
        fields[key.strip()] = _value(val.strip())
    return fields


def _is_import_path(text: str) -> bool:
    """``package.module:Class...`` or ``module:Class...`` (a name before any key=value), not ``unet:...``."""
    head, _, rest = text.partition(":")
    first = rest.partition(":")[0].partition(",")[0]
    return "." in head or (head.strip() not in KINDS and bool(first.strip()) and "=" not in first)


def _import_spec(text: str) -> dict:
    """``package.module:Class[:key=value,...]`` as a spec; ``classes=K`` is the ``num_classes`` argument."""
    module, _, rest = text.partition(":")
    name, _, rest = rest.partition(":")
    if not name.strip().isidentifier():
        raise DkdmError(f"model spec {text!r} looks like an import path: write package.module:Class[:key=value,...]")
    kwargs = _fields(rest, text)
    classes = kwargs.pop("classes", 0)
    return {"type": "import", "target": f"{module.strip()}:{name.strip()}", "classes": classes, "kwargs": kwargs}


def _diffusers_spec(path: str) -> dict:
    """A diffusers model config file as a spec: its fields, in and out channels and size set by the data."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise DkdmError(f"student config {path} does not exist")
    try:
        config = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DkdmError(f"student config {path} is not a JSON file ({e.__class__.__name__}: {e})")
    if not isinstance(config, dict):
        raise DkdmError(f"student config {path} must be a JSON object (a diffusers model's config.json)")
    return {"type": "diffusers", "config": config, "classes": 0}


def _checked_external(spec: dict) -> dict:
    """An ``import`` or ``diffusers`` spec mapping, validated (nothing is imported yet)."""
    kind = spec["type"]
    extra = set(spec) - {"type", "classes", "target", "kwargs"} if kind == "import" else set(spec) - {"type", "classes", "config"}
    classes = spec.get("classes", 0)
    if extra or not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
        raise DkdmError(f"a {kind} spec takes {'target, kwargs' if kind == 'import' else 'config'} and classes "
                        f"(a non-negative integer); got {', '.join(sorted(map(str, spec)))}")
    if kind == "import":
        target, kwargs = spec.get("target"), spec.get("kwargs") or {}
        if not isinstance(target, str) or target.count(":") != 1 or not isinstance(kwargs, dict):
            raise DkdmError(f"an import spec's target is package.module:Class and its kwargs a mapping, got {target!r}")
        return {"type": "import", "target": target, "classes": classes, "kwargs": dict(kwargs)}
    config = spec.get("config")
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in DIFFUSERS_CLASSES:
        raise DkdmError(f"a student config must be a diffusers model config whose _class_name is one of "
                        f"{', '.join(DIFFUSERS_CLASSES)}; got {name!r}")
    return {"type": "diffusers", "config": dict(config), "classes": classes}


def family_of(spec: dict) -> str:
    """A parsed spec's family, for the rules in ``defaults``: its type (unet, adm, dit, uvit, mlp,
    import); a diffusers config file's as the class it names (UNet2DModel: unet, DiT...: dit); a
    network given as an object (no spec): custom."""
    if spec is None:
        return "custom"
    if spec["type"] == "diffusers":
        return "unet" if spec["config"].get("_class_name") == "UNet2DModel" else "dit"
    return spec["type"]


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
        elif text.endswith(".json"):
            spec = _diffusers_spec(text)
        elif _is_import_path(text):
            spec = _import_spec(text)
        else:
            kind, _, rest = text.partition(":")
            spec = {"type": kind.strip(), **_fields(rest, text)}
    if not isinstance(spec, dict) or "type" not in spec:
        raise DkdmError(f"model spec must name a type; specs look like {SPEC_HELP}")
    kind = spec["type"]
    if kind not in KINDS:
        raise DkdmError(f"unknown model type {kind!r}; choose one of {', '.join(KINDS)} (specs: {SPEC_HELP})")
    if kind == "adm":
        from .nets.adm import parse_flags

        return {"type": "adm", **parse_flags(spec)}
    if kind in ("import", "diffusers"):
        return _checked_external(spec)
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
            ok = isinstance(val, int) and not isinstance(val, bool) and (val > 0 or (key in MAY_BE_ZERO and val == 0))
        if not ok:
            kind_of = "a list of integers (a-b-c)" if isinstance(default, list) else "a positive integer"
            raise DkdmError(f"model spec field {key}={val!r} must be {kind_of}; specs look like {SPEC_HELP}")
    return full


def saved_spec(spec):
    """A spec read from a model directory, completed the way the model was built when it was saved."""
    if isinstance(spec, dict):
        return {**LEGACY.get(spec.get("type"), {}), **spec}
    return spec


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
    c, h, _ = shape
    if kind == "diffusers":
        return _diffusers_net(s, c, h, out_channels)
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
        from .nets.adm import parse_flags

        flags = {**s, "in_channels": c, "image_size": h}  # the data decides these two
        if out_channels not in (c, 2 * c):
            raise DkdmError(f"an adm model outputs {c} or {2 * c} channels, not {out_channels}")
        flags["learn_sigma"] = out_channels == 2 * c
        return ADMNet(ADMUNet(parse_flags(flags)))
    if kind == "uvit":
        width, heads, patch = _checked_tokens(s, h)
        return UViTNet(c, out_channels, h, patch, width, int(s["depth"]), heads, int(s["classes"]))
    if kind == "dit":
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
    raise DkdmError(f"unknown model type {kind!r}")


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


def num_classes(spec: dict | None) -> int:
    """Classes a spec conditions on (0: unconditional)."""
    if not spec:
        return 0
    if spec["type"] == "adm":
        return int(spec["num_classes"]) if spec.get("class_cond") else 0
    return int(spec.get("classes", 0))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# default students ----------------------------------------------------------------------------
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


def format_spec(spec: dict) -> str:
    """A spec as the one-line ``type:key=value`` text that parses back to it (fields at their
    defaults left out)."""
    spec = parse_spec(spec)
    if spec["type"] == "import":
        fields = {**spec["kwargs"], **({"classes": spec["classes"]} if spec["classes"] else {})}
        return spec["target"] + "".join(f":{k}={v}" if i == 0 else f",{k}={v}" for i, (k, v) in enumerate(fields.items()))
    if spec["type"] == "diffusers":
        import json

        return json.dumps(spec, sort_keys=True)  # YAML-readable: parse_spec takes it back
    if spec["type"] == "adm":
        from .nets.adm import FLAG_DEFAULTS

        defaults = FLAG_DEFAULTS
    else:
        defaults = DEFAULTS[spec["type"]]

    def text(v):
        if isinstance(v, (list, tuple)):
            return "-".join(text(x) for x in v)
        if isinstance(v, bool):
            return str(v).lower()
        return str(v).replace(",", "-")  # ADM's "16,8" lists read back as 16-8

    fields = [f"{k}={text(v)}" for k, v in spec.items()
              if k != "type" and v != defaults.get(k) and v not in ("", None)]
    return spec["type"] + (":" + ",".join(fields) if fields else "")


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
