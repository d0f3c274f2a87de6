"""The Hugging Face Hub: a model directory's card (README.md, in the Hub's format) and its upload.

The card is written at the end of every run from what the directory holds (its settings, model
config, metrics and samples), so ``dkdm push`` uploads a directory that explains itself. The upload
goes through huggingface_hub; nothing here runs at import time or without being asked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..layout import MODEL_JSON, RUN_JSON, WEIGHTS
from ..errors import DkdmError

CARD = "README.md"
#: Never uploaded: training state (large, and only for --resume) and the run lock.
PRIVATE = ["checkpoints/*", "preparation/*", ".lock", "*.tmp", "*.tmp.png"]
TAGS = ["dkdm", "data-free-distillation", "knowledge-distillation", "diffusion"]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _parameters(d: Path) -> int | None:
    """Parameters in the directory's weights (the diffusers pipeline's network, or model.safetensors)."""
    from safetensors import safe_open

    files = sorted(d.glob("unet/*.safetensors")) or sorted(d.glob("transformer/*.safetensors")) or \
        sorted(d.glob(WEIGHTS))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def _command(run: dict) -> str:
    """The run as a command line: every setting it saved that is set (the rules' values included)."""
    from ..settings import RECORDED, command_of

    parts = [f"dkdm {command_of(run)}"]
    for k, v in run.items():
        if k in RECORDED or k == "resume" or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {v}")
    return " ".join(parts)


def _metric_rows(metrics: dict) -> list[str]:
    rows = []
    for name, m in metrics.items():
        if not isinstance(m, dict):
            continue
        values = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float))
        if values:
            count = f" ({m['num_samples']:,} samples, {_steps(m['sampling_steps'])})" if "num_samples" in m else ""
            rows.append(f"| {name} | {values}{count} |")
    return rows


def model_card(directory, repo_id: str | None = None, teacher_parameters: int | None = None) -> str:
    """The card of a model directory (a string): YAML front matter the Hub reads, then the facts."""
    d = Path(directory)
    run, config, metrics = _read(d / RUN_JSON), _read(d / MODEL_JSON), _read(d / "metrics.json")
    pipeline = _read(d / "model_index.json").get("_class_name")
    teacher = run.get("teacher") or config.get("extra", {}).get("teacher")
    from .pipelines import looks_like_hub_id

    shape = config.get("sample_shape") or []
    front = ["---", f"library_name: {'diffusers' if pipeline else 'dkdm'}",
             f"pipeline_tag: {'unconditional-image-generation' if len(shape) == 3 else 'other'}",
             "tags:", *(f"- {t}" for t in TAGS)]
    if teacher and looks_like_hub_id(str(teacher)):
        front.append(f"base_model: {teacher}")
    front += ["---", ""]
    name = repo_id or d.name
    student = _parameters(d)
    lines = [f"# {name}", ""]
    if teacher:  # only a distilled model records one
        lines += [f"A diffusion model distilled data-free from the teacher `{teacher}` with "
                  f"[dkdm](https://arxiv.org/abs/2409.03550) (DKDM): the teacher's denoising steps were its only "
                  f"training data.", ""]
    else:
        lines += ["A diffusion model trained with dkdm.", ""]
    spec = config.get("spec") or {"type": "custom nn.Module"}
    facts = [f"- architecture: `{spec.get('type', '?')}` " + ", ".join(f"{k}={v}" for k, v in spec.items() if k != "type"),
             f"- samples: {shape}, {_num_steps(config.get('schedule') or {})} diffusion steps, predicts "
             f"{config.get('prediction', '?')}, variance {config.get('variance', '?')}"]
    times = _sampler_times(config)
    if times:
        facts.append(_sampler_fact(config["sampler"], run.get("student", "?"), times))
    if student:
        facts.append(f"- parameters: {student:,}" + (f" (teacher: {teacher_parameters:,}, "
                                                     f"{student / teacher_parameters:.2f}x)" if teacher_parameters else ""))
    lines += facts + [""]
    rows = _metric_rows(metrics)
    if rows:
        lines += ["## Metrics", "", "| model | metrics |", "|---|---|", *rows, ""]
    if (d / "samples.png").is_file():
        lines += ["## Samples", "", "![samples](samples.png)", ""]
        if teacher:
            lines += ["Teacher and student, drawn from the same noise.", ""]
    lines += ["## Use", "", "```python", *_use(pipeline, name, config, times), "```", ""]
    if run:
        lines += ["## How it was made", "", "```bash", _command(run), "```", ""]
    return "\n".join(front + lines)


def write_model_card(directory, teacher_parameters: int | None = None) -> Path:
    path = Path(directory) / CARD
    tmp = path.with_name(CARD + ".tmp")
    tmp.write_text(model_card(directory, teacher_parameters=teacher_parameters))
    tmp.replace(path)
    return path


def check_repo_id(repo_id: str) -> None:
    """DkdmError unless ``repo_id`` has the Hub's USER/NAME form (checked before a run, not after it)."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", str(repo_id)):
        raise DkdmError(f"repo id {repo_id!r} must look like USER/NAME or ORG/NAME")


def push(directory, repo_id: str, private: bool = False, token: str | None = None, api=None) -> str:
    """Upload a model directory (its card first written where it has none) to the Hub repo
    ``repo_id``; returns the repo's URL. ``api``: a stand-in for ``huggingface_hub.HfApi`` (tests)."""
    d = Path(directory)
    if not (d / MODEL_JSON).is_file() and not (d / "model_index.json").is_file():
        raise DkdmError(f"{d} is not a model directory (no dkdm_model.json or model_index.json): push the --out of a run")
    check_repo_id(repo_id)
    if not (d / CARD).is_file():
        write_model_card(d)
    if api is None:
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise DkdmError("pushing needs huggingface_hub: pip install huggingface_hub")
        api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(d), repo_id=repo_id, ignore_patterns=PRIVATE,
                          commit_message="dkdm push")
    except Exception as e:  # huggingface_hub's errors: offline, no token, no permission, HTTP
        reason = " ".join(str(e).split())[:300].rstrip(".") or e.__class__.__name__
        raise DkdmError(f"cannot push {d} to {repo_id}: {e.__class__.__name__}: {reason}. Log in with `hf auth login` "
                        f"or set HF_TOKEN, check the network (HF_HUB_OFFLINE must be unset), then run "
                        f"`dkdm push {d} {repo_id}` again")
    return str(url)


def _sampler_times(config: dict) -> list[int] | None:
    """A few-step student's K timesteps (None for another model)."""
    sampler = config.get("sampler")
    if not sampler:
        return None
    from ..consistency import timesteps_for

    return timesteps_for(sampler, int(sampler["steps"]), int(_num_steps(config.get("schedule") or {})))


def _sampler_fact(sampler: dict, start: str, times: list[int]) -> str:
    """The card's line on how a few-step student was made and is sampled (at ``times``)."""
    k = int(sampler["steps"])
    if sampler.get("objective") == "matching":
        how = (f"a generator made from the DKDM student `{start}` by distribution matching against the teacher's "
               f"score (`dkdm fewstep --fewstep-objective matching`), its first step at t = {sampler['grid'] - 1} of "
               f"the teacher's schedule; sampled by diffusers' LCMScheduler (`DDPMPipeline(num_inference_steps={k})`)")
    else:
        how = (f"a consistency model made from the DKDM student `{start}` by consistency distillation on the "
               f"teacher's pool (`dkdm fewstep`); sampled by diffusers' LCMScheduler at the timesteps {times} "
               f"(`scheduler.set_timesteps(timesteps={times})`, then `scheduler.step` on the UNet's output; "
               f"`DDPMPipeline(num_inference_steps={k})` takes LCMScheduler's evenly spaced ones, worse on digits)")
    return f"- samples in {_steps(k)} (any of 1..{sampler['grid']}): {how}"


def _use(pipeline: str | None, name: str, config: dict, times: list[int] | None) -> list[str]:
    """The card's code: the pipeline's call, for a consistency student the loop at its K ``times``."""
    if not pipeline:
        return ["from dkdm.formats import load_model", "", f'model = load_model("{name}")', "samples = model.sample(16)"]
    sampler = config.get("sampler")
    lines = [f"from diffusers import {pipeline}", "", f'pipe = {pipeline}.from_pretrained("{name}")']
    if not sampler or sampler.get("objective") == "matching":
        steps_arg = f", num_inference_steps={sampler['steps']}" if sampler else ""
        return lines + [f"images = pipe(batch_size=16{steps_arg}).images"]
    shape = ", ".join(str(int(v)) for v in config.get("sample_shape") or [])
    return ["import torch", *lines, f"pipe.scheduler.set_timesteps(timesteps={times})",
            f"x = torch.randn(16, {shape})",
            "for t in pipe.scheduler.timesteps:",
            "    x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x).prev_sample",
            "images = (x / 2 + 0.5).clamp(0, 1)"]


def _num_steps(schedule: dict):
    """A schedule config's number of steps: named, or the length of its betas (a matching generator's cut schedule)."""
    return schedule.get("num_steps") or len(schedule.get("betas") or []) or "?"


def _steps(k) -> str:
    return f"{k} step" if str(k) == "1" else f"{k} steps"
