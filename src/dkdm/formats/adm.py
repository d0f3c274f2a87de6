"""OpenAI ADM (guided-diffusion / improved-diffusion / DDPM-IP) checkpoints, loaded unchanged,
and converted to a diffusers ``UNet2DModel``.

A checkpoint is a state dict (``.pt`` read weights-only, or safetensors) and the flags file it was
trained with; the flags configure the network (``nets/adm.py``, key for key the same parameter
names) and give the diffusion: schedule, learned sigma, epsilon or x0 prediction.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from ..diffusion import Schedule
from ..errors import DkdmError
from ..model import DiffusionModel
from ..nets.adm import ADMUNet, AttentionBlock, ResBlock, _Resample, channel_plan, parse_flags

def prediction_and_variance(f: dict) -> tuple[str, str]:
    """What the network outputs and its reverse-step variance, as improved-/guided-diffusion read the flags:
    learned range if sigma is learned, else the small posterior variance with sigma_small, else beta_t."""
    variance = "learned_range" if f["learn_sigma"] else "fixed_small" if f["sigma_small"] else "fixed_large"
    return ("sample" if f["predict_xstart"] else "epsilon"), variance


def schedule_from_flags(f: dict) -> Schedule:
    if f["noise_schedule"] not in ("linear", "cosine"):
        raise DkdmError(f"ADM noise_schedule {f['noise_schedule']!r} is not supported; use linear or cosine")
    return Schedule.named(f["noise_schedule"], int(f["diffusion_steps"]))


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a ``.pt`` loaded with ``weights_only=True`` (no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise DkdmError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise DkdmError(f"cannot read {p}: {e}; the file is corrupt or not safetensors")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or others for non-weights files
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise DkdmError(
            f"{p} is not a plain weights file that loads without running code ({first[:200]}); dkdm never unpickles "
            f"arbitrary objects: save the model's state_dict() (or convert it to safetensors) and pass that"
        )
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not any(torch.is_tensor(v) for v in obj.values()):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise DkdmError(f"{p} does not hold a state dict (a mapping of parameter names to tensors)")
    return obj


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load ``state`` into ``net``, naming the first key that is missing, extra or of another shape."""
    own = net.state_dict()
    for k, v in own.items():
        if k not in state:
            raise DkdmError(f"{source} does not fit this ADM config: it lacks {k} (the config expects shape "
                            f"{list(v.shape)}); check the flags against the ones the checkpoint was trained with")
        if tuple(state[k].shape) != tuple(v.shape):
            raise DkdmError(f"{source} does not fit this ADM config: {k} has shape {list(state[k].shape)} in the "
                            f"checkpoint but {list(v.shape)} in the config; check "
                            + ("num_classes" if k == "label_emb.weight" else
                               "num_channels, channel_mult, num_res_blocks, attention_resolutions and learn_sigma"))
    extra = sorted(set(state) - set(own))
    if extra:
        raise DkdmError(f"{source} does not fit this ADM config: it has {extra[0]} (and {len(extra) - 1} more) that the "
                        f"config does not build; check attention_resolutions, class_cond and resblock_updown")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def read_flag_file(path):
    """The guided-diffusion flags of a YAML or JSON file, as written (``parse_flags`` checks them)."""
    import yaml

    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DkdmError(f"cannot read ADM config {p}: {e.__class__.__name__}: {e}")


def read_flags(path) -> dict:
    """guided-diffusion flags from a YAML or JSON file, defaults filled in and checked."""
    return parse_flags(read_flag_file(path))


def class_count_from_weights(flags, state: dict[str, torch.Tensor]):
    """``flags`` with ``num_classes`` read from the checkpoint's ``label_emb.weight`` where the flags
    say ``class_cond`` but give no count, and the line that says so (None where nothing was read).

    guided-diffusion's scripts take no class-count flag (NUM_CLASSES is 1000 in its code, and
    forks change the constant), so a class-conditional checkpoint's flags as written rarely hold it.
    """
    if not isinstance(flags, dict) or not flags.get("class_cond") or flags.get("num_classes") is not None:
        return flags, None
    emb = state.get("label_emb.weight")
    if emb is None or emb.dim() != 2:
        return flags, None
    n = int(emb.shape[0])
    return {**flags, "num_classes": n}, (f"ADM checkpoint: {n} classes, read from its label_emb.weight (the flags say "
                                         f"class_cond but give no num_classes)")


def _adm_sequence(net: ADMUNet) -> list[nn.Module]:
    """ADM's ResBlocks / attention / resamplers in forward order (input, middle, output)."""
    seq = []
    for block in [*net.input_blocks[1:], net.middle_block, *net.output_blocks]:
        seq.extend(m for m in block if isinstance(m, (ResBlock, AttentionBlock, _Resample)))
    return seq


def _diffusers_sequence(unet) -> list[nn.Module]:
    """UNet2DModel's resnets / attentions / resamplers in the same order as ``_adm_sequence``."""
    def level(block, resamplers):
        for i, res in enumerate(block.resnets):
            yield res
            if getattr(block, "attentions", None):
                yield block.attentions[i]
        yield from resamplers or []

    mid = unet.mid_block
    return [*(m for b in unet.down_blocks for m in level(b, b.downsamplers)),
            mid.resnets[0], mid.attentions[0], mid.resnets[1],
            *(m for b in unet.up_blocks for m in level(b, b.upsamplers))]


def to_diffusers(f: dict, net: ADMUNet):
    """The same network as a diffusers ``UNet2DModel`` (weights copied), or DkdmError where diffusers
    cannot express the ADM config (per-level head counts, legacy attention order with several heads)."""
    unet = _diffusers_unet(f)
    ours, theirs = _adm_sequence(net), _diffusers_sequence(unet)
    if len(ours) != len(theirs):
        raise DkdmError(f"cannot map this ADM config onto UNet2DModel ({len(ours)} vs {len(theirs)} blocks)")
    state = {}
    names = {id(m): n for n, m in unet.named_modules()}
    for a, d in zip(ours, theirs):
        _map_block(a, d, names[id(d)], state)
    for prefix, module in (("conv_in", net.input_blocks[0][0]), ("time_embedding.linear_1", net.time_embed[0]),
                           ("time_embedding.linear_2", net.time_embed[2]), ("conv_norm_out", net.out[0]),
                           ("conv_out", net.out[2]), *((("class_embedding", net.label_emb),) if net.num_classes else ())):
        _put(state, prefix, module)
    missing = set(unet.state_dict()) - set(state)
    if missing:
        raise DkdmError(f"cannot map this ADM config onto UNet2DModel: {sorted(missing)[0]} has no ADM counterpart")
    unet.load_state_dict(state)
    return unet.eval()


def _diffusers_unet(f: dict):
    """A fresh UNet2DModel of the ADM flags ``f``'s architecture, or DkdmError where it has none."""
    from diffusers import UNet2DModel

    mult, attn_ds = channel_plan(f)
    mc, nrb = int(f["num_channels"]), int(f["num_res_blocks"])
    if mult[0] != 1 or any(float(m) != int(m) for m in mult):
        raise DkdmError("diffusers' UNet2DModel needs integer channel_mult starting at 1 for this conversion")
    if int(f["num_head_channels"]) == -1:
        raise DkdmError("ADM num_heads without num_head_channels gives each level its own head size; diffusers' "
                        "UNet2DModel has one attention_head_dim: keep the checkpoint as a dkdm ADM model instead")
    if f["rescale_timesteps"] and int(f["diffusion_steps"]) != 1000:
        raise DkdmError("ADM rescale_timesteps scales t by 1000 / diffusion_steps; UNet2DModel cannot: keep the "
                        "checkpoint as a dkdm ADM model instead")
    if int(f["num_heads_upsample"]) not in (-1, int(f["num_heads"])):
        raise DkdmError("ADM num_heads_upsample differs from num_heads: not expressible in UNet2DModel")
    updown = bool(f["resblock_updown"])
    attn = [2 ** i in attn_ds for i in range(len(mult))]
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D", "UpBlock2D")
    down = ["AttnDownBlock2D" if a else plain_down for a in attn]
    up = ["AttnUpBlock2D" if a else plain_up for a in attn][::-1]
    c = int(f["in_channels"])
    return UNet2DModel(
        sample_size=int(f["image_size"]), in_channels=c, out_channels=c * (2 if f["learn_sigma"] else 1),
        block_out_channels=[mc * int(m) for m in mult], layers_per_block=nrb, down_block_types=down,
        up_block_types=up, downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv",
        attention_head_dim=int(f["num_head_channels"]), norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if f["use_scale_shift_norm"] else "default", flip_sin_to_cos=True,
        freq_shift=0, dropout=float(f["dropout"]), num_class_embeds=int(f["num_classes"]) if f["class_cond"] else None,
        num_train_timesteps=int(f["diffusion_steps"]),
    )


def _put(state: dict, prefix: str, module: nn.Module) -> None:
    for k, v in module.state_dict().items():
        state[f"{prefix}.{k}"] = v


def _map_block(a, d, p: str, state: dict) -> None:
    """ADM block ``a``'s weights under the names of its diffusers counterpart ``d`` (at path ``p``)."""
    if isinstance(a, ResBlock):
        if type(d).__name__ != "ResnetBlock2D":
            raise DkdmError(f"cannot map ADM blocks onto UNet2DModel at {p}")
        for src, dst in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                         ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")):
            mod = a.get_submodule(src)
            if list(mod.state_dict()):
                _put(state, f"{p}.{dst}", mod)
    elif isinstance(a, AttentionBlock):
        ch = a.qkv.weight.shape[1]
        w, b = a.qkv.weight[:, :, 0], a.qkv.bias
        if not a.new_order:  # legacy: heads outermost, then q/k/v
            n = a.heads
            w = w.reshape(n, 3, ch // n, ch).transpose(0, 1).reshape(3 * ch, ch)
            b = b.reshape(n, 3, ch // n).transpose(0, 1).reshape(3 * ch)
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            state[f"{p}.{name}.weight"] = w[i * ch:(i + 1) * ch]
            state[f"{p}.{name}.bias"] = b[i * ch:(i + 1) * ch]
        _put(state, f"{p}.group_norm", a.norm)
        state[f"{p}.to_out.0.weight"] = a.proj_out.weight[:, :, 0]
        state[f"{p}.to_out.0.bias"] = a.proj_out.bias
    elif a.use_conv:
        _put(state, f"{p}.conv", a.conv if a.up else a.op)


def load_checkpoint_file(path, config, device="cpu", role: str = "teacher") -> DiffusionModel:
    """An ADM / guided-diffusion checkpoint (.pt or .safetensors) configured by its flags file."""
    if config is None:
        raise DkdmError(f"{path} is a checkpoint file: pass the guided-diffusion flags it was trained with "
                        f"(YAML or JSON) with --{role}-config FILE")
    given = read_flag_file(config)
    flags = parse_flags(given)  # the flags' own mistakes first, then the checkpoint's
    state = read_state_dict(path)
    given, note = class_count_from_weights(given, state)
    if note:
        flags = parse_flags(given)
        print(note, file=sys.stderr)
    prediction, variance = prediction_and_variance(flags)
    c, size = int(flags["in_channels"]), int(flags["image_size"])
    model = DiffusionModel.build({"type": "adm", **flags}, (c, size, size), schedule_from_flags(flags),
                                 variance=variance, prediction=prediction, clip_x0=bool(flags["clip_denoised"]),
                                 extra={"converted_from": str(Path(path).resolve())})
    load_weights(model.net.adm, state, path)
    return model.to(device).eval()
