"""The one-shot commands as library functions: sample a synthetic set, convert an ADM checkpoint,
draw samples, evaluate a model. ``dkdm synth / convert / sample / evaluate`` only call these."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import DkdmError
from .layout import LOG_FILE, MODEL_JSON
from .rundir import teacher_reference
from .settings import checked_batch


def synth(out, teacher="builtin:digits", num: int | None = None, steps: int = 100, batch: int = 1024, seed: int = 0,
          teacher_config=None, progress: bool = True) -> Path:
    """A sample set of ``num`` teacher samples (default: as many as the teacher's data set has):
    the data-free baseline's data. Returns its directory."""
    import time

    from .data import save_sample_set
    from .evaluation import draw
    from .formats import load_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DkdmError(f"--out {out} already exists; choose a new directory for the sample set")
    model = load_model(teacher, role="teacher", config=teacher_config)
    data = model.extra.get("data")
    if num is None:
        from .data import builtin_dataset

        ref = builtin_dataset(data) if data else None
        if ref is None or not hasattr(ref, "images"):
            raise DkdmError("the teacher does not record an image data set whose size to match; pass --num N")
        num = len(ref.images)
    checked_batch(batch)
    seed = seed or 0
    t0 = time.time()
    x = draw(model, num, steps, seed, progress, batch_size=batch)
    teacher_ref = teacher_reference(teacher)
    save_sample_set(out, x, {"reference": data, "teacher": teacher_ref, "steps": steps, "seed": seed,
                             "clip_x0": model.clip_x0, "teacher_sample_steps": num * steps,
                             "wall_s": round(time.time() - t0, 2)})
    if x.dim() == 4:
        from .images import save_grid

        save_grid(x[:100], out / "preview.png", nrow=10)
    print(f"wrote {num} teacher samples ({steps} steps, {num * steps:,} teacher sample-steps) to {out}; "
          f"train on them with: dkdm train --data {out}", file=sys.stderr)
    return out


def convert(checkpoint, config, out, format: str = "dkdm") -> Path:
    """An ADM / guided-diffusion checkpoint (and its flags file) as a dkdm model directory, or as a
    diffusers ``DDPMPipeline`` (``format="diffusers"``). Returns the directory."""
    from .formats import load_checkpoint_file, save_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DkdmError(f"--out {out} already exists; choose a new directory")
    model = load_checkpoint_file(checkpoint, config, role="checkpoint")
    if format == "diffusers":
        from diffusers import DDPMPipeline

        from .formats.pipelines import ddpm_scheduler
        from .formats.adm import to_diffusers

        unet = to_diffusers(model.spec, model.net.adm)
        scheduler = ddpm_scheduler(model.schedule, model.variance, model.prediction, model.clip_x0)
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    else:
        save_model(model, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: ADM UNet, {n:,} parameters, {model.variance} variance, {model.prediction} prediction, "
          f"T={model.schedule.num_steps}; use it as --teacher {out}", file=sys.stderr)
    return out


def sample(model, out, num: int = 1000, steps: int | None = None, seed: int = 0, progress: bool = True) -> Path:
    """``num`` samples of a model into ``out``: .npz (arrays; RGB also as the ADM evaluator's
    ``arr_0``) or .png (an image grid). Returns the file."""
    import numpy as np

    from .evaluation import draw
    from .formats import load_model

    out = Path(out)
    if out.suffix not in (".npz", ".png"):
        raise DkdmError(f"--out {out}: write samples as .npz (arrays) or .png (an image grid)")
    if num < 1:
        raise DkdmError(f"--num must be at least 1, got {num}")
    model = load_model(model)
    if out.suffix == ".png" and len(model.sample_shape) != 3:
        raise DkdmError(f"--out {out}: a PNG grid needs image samples; this model draws {list(model.sample_shape)} vectors, use .npz")
    x = draw(model, num, steps, seed or 0, progress)
    latents, x = x, model.decode(x)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        from .images import save_grid

        save_grid(x, out)
    else:
        arrays = {"samples": x.numpy(), **({"latents": latents.numpy()} if model.decoder is not None else {})}
        if x.dim() == 4 and x.shape[1] == 3:  # RGB: also as the ADM evaluator reads a sample batch
            from .metrics.inception import to_uint8

            arrays["arr_0"] = to_uint8(x).permute(0, 2, 3, 1).numpy()
        np.savez(out, **arrays)
    print(f"wrote {num} samples {list(x.shape[1:])} to {out}", file=sys.stderr)
    return out


def evaluate(model, reference=None, num: int | None = None, steps: int | None = None, seed: int = 0,
             inception_weights=None, progress: bool = True) -> dict:
    """Metrics of a model's samples against ``reference`` (default: the data set the model or its
    teacher learned); with ``inception_weights``, FID / IS / precision / recall of an RGB model
    against the user's reference. Returns ``{"model": ..., metric: value, ...}``."""
    from .data import builtin_dataset
    from .evaluation import evaluate_model
    from .formats import load_model, resolve_model_dir

    if inception_weights:
        return _evaluate_rgb(model, reference, inception_weights, num, steps, seed, progress)
    ref = _reference_for(model, reference)
    dataset = builtin_dataset(ref)
    net = load_model(model)
    if tuple(net.sample_shape) != tuple(dataset.sample_shape):
        raise DkdmError(f"model samples have shape {list(net.sample_shape)} but {ref} has {list(dataset.sample_shape)}")
    result, _ = evaluate_model(net, resolve_model_dir(model), ref, num, steps, seed or 0, progress)
    return {"model": str(model), **result}


def _evaluate_rgb(model_ref, reference, inception_weights, num, steps, seed, progress) -> dict:
    """Inception metrics of an RGB model (a latent model's decoded samples) against the user's reference."""
    import torch

    from .evaluation import default_num, evaluate_model, reference_for
    from .metrics.inception import check_rgb, check_weights
    from .formats import load_model, resolve_model_dir

    check_weights(inception_weights)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_ref, device=device)
    if model.decoder is None:
        check_rgb(model.sample_shape)
    if not reference:
        raise DkdmError("Inception metrics compare with a reference you supply: --reference REF.npz (an ADM reference "
                        "batch, arr_0 uint8 images, or statistics mu/sigma) or a folder of images")
    metric = reference_for(reference, inception_weights, device)
    num = num or default_num(metric)
    sampling = steps or model.sampler_steps or model.schedule.num_steps
    against = (f"{reference} ({len(metric.reference):,} images, their features cached)" if len(metric.reference)
               else f"the statistics in {reference}")
    print(f"scoring {num:,} samples of {sampling} steps ({num * sampling:,} model sample-steps) against {against}",
          file=sys.stderr)
    result, _ = evaluate_model(model, resolve_model_dir(model_ref), metric, num, steps, seed or 0, progress)
    return {"model": str(model_ref), **result}


def _reference_for(model_dir, given):
    from .formats import read_model_config

    if given:
        return given
    cfg = read_model_config(model_dir)
    if cfg.get("data"):
        return cfg["data"]
    raise DkdmError(f"{model_dir} does not record its data set; pass --reference NAME")


def push(directory, repo_id: str, private: bool = False) -> str:
    """``dkdm push``: a model directory and its card to the Hub repo ``repo_id``; returns its URL."""
    from .formats.hub import push as upload

    return upload(directory, repo_id, private=private)


def report(directory) -> list[Path]:
    """``dkdm report``: redraw a run's training.png from its log.jsonl, and write its model card
    (README.md) where it has none; returns the files written."""
    from .formats.hub import CARD, write_model_card
    from .monitor import plot_run

    d = Path(directory)
    if not (d / LOG_FILE).is_file() and not (d / MODEL_JSON).is_file():
        raise DkdmError(f"{d} is not a run directory (no log.jsonl or dkdm_model.json)")
    written = [p for p in [plot_run(d)] if p is not None]
    if (d / MODEL_JSON).is_file() and not (d / CARD).is_file():
        written.append(write_model_card(d))
    return written
