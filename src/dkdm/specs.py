"""Model specs: the short text (or mapping) that names a network's family and sizes, parsed,
checked, written back and read from saved models.

A spec is ``type[:key=value,...]`` (lists joined with ``-``, e.g. ``unet:widths=32-64,attn=1``)
or a mapping with a ``type`` key (a YAML block). Two more forms bring networks dkdm does not
build itself: ``package.module:Class[:key=value,...]`` (any ``nn.Module`` the user can import,
constructed with ``sample_shape``, ``out_channels``, ``num_classes`` and the spec's values; see
nets/imported.py) and a diffusers model config file ``config.json`` (its ``_class_name`` one of
``DIFFUSERS_CLASSES``). ``students.build_net`` builds the network a spec names.
"""

from __future__ import annotations

from .errors import DkdmError
from .nets import FAMILIES


SPEC_DEFAULTS = {name: family.defaults for name, family in FAMILIES.items()}


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


KINDS = (*SPEC_DEFAULTS, "adm", "import", "diffusers")


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
    unknown = set(spec) - set(SPEC_DEFAULTS[kind]) - {"type"}
    if unknown:
        raise DkdmError(
            f"unknown field(s) {', '.join(sorted(unknown))} for a {kind} model; "
            f"it takes {', '.join(SPEC_DEFAULTS[kind])}"
        )
    full = {"type": kind, **SPEC_DEFAULTS[kind], **{k: v for k, v in spec.items() if k != "type"}}
    for key, default in SPEC_DEFAULTS[kind].items():
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


def num_classes(spec: dict | None) -> int:
    """Classes a spec conditions on (0: unconditional)."""
    if not spec:
        return 0
    if spec["type"] == "adm":
        return int(spec["num_classes"]) if spec.get("class_cond") else 0
    return int(spec.get("classes", 0))


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
        defaults = SPEC_DEFAULTS[spec["type"]]

    def text(v):
        if isinstance(v, (list, tuple)):
            return "-".join(text(x) for x in v)
        if isinstance(v, bool):
            return str(v).lower()
        return str(v).replace(",", "-")  # ADM's "16,8" lists read back as 16-8

    fields = [f"{k}={text(v)}" for k, v in spec.items()
              if k != "type" and v != defaults.get(k) and v not in ("", None)]
    return spec["type"] + (":" + ",".join(fields) if fields else "")
