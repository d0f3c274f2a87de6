"""What a run reports to experiment trackers (``--report-to``): accelerate's TensorBoard, Weights &
Biases and MLflow trackers, fed the numbers of every log.jsonl record and, at each ``--eval-every``
evaluation, a grid of the samples it drew.

The trackers are optional packages, imported by accelerate only when a run asks for them; a missing
one is a one-line error before the run starts, with the command that installs it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import DkdmError

TRACKERS = ("tensorboard", "wandb", "mlflow")
#: Where a run's tracker files go, under its directory (``tensorboard --logdir RUN/tracking``).
TRACKING_DIR = "tracking"
PROJECT = "dkdm"


def parse(value) -> list[str]:
    """``--report-to``: none, all, or trackers separated by commas; DkdmError when one is unknown or missing."""
    if value in (None, "", "none"):
        return []
    names = list(TRACKERS) if value == "all" else [v.strip() for v in str(value).split(",") if v.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise DkdmError(f"--report-to {value}: unknown tracker(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(TRACKERS)}, all or none (several separated by commas)")
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    missing = [n for n in names if not available[n]()]
    if missing:
        raise DkdmError(f"--report-to {value}: {', '.join(missing)} is not installed: pip install {' '.join(missing)} "
                        f"(or drop it from --report-to)")
    return names


def start(accelerator, settings) -> None:
    """Open the trackers (main process) with the run's settings as its configuration."""
    if not accelerator.log_with:
        return
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.as_dict().items()}
    accelerator.init_trackers(PROJECT, config=config)


def log_record(accelerator, record: dict) -> None:
    """The numbers of one log.jsonl record at its step."""
    if not accelerator.trackers:
        return
    values = {k: v for k, v in record.items() if k not in ("step", "kind") and isinstance(v, (int, float))
              and not isinstance(v, bool) and math.isfinite(v)}
    if record.get("kind") == "eval":
        values = {f"eval/{k}": v for k, v in values.items()}
    accelerator.log(values, step=int(record["step"]))


def log_samples(accelerator, images, step: int, num: int = 64) -> None:
    """A grid of up to ``num`` samples (images in [-1, 1], [N, C, H, W] with 1 or 3 channels)."""
    if not accelerator.trackers or images.dim() != 4 or images.shape[1] not in (1, 3):
        return
    batch = ((images[:num].float().clamp(-1, 1) + 1) / 2).cpu()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": batch.numpy()}, step=step, dataformats="NCHW")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": list(batch.permute(0, 2, 3, 1).numpy())}, step=step)


def finish(accelerator) -> None:
    """Close the trackers (their files flushed). Not ``end_training``: that also tears down the
    process group, which the report and a Python caller's next run may still need."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def append_log(accelerator, path, record: dict) -> None:
    """One record appended to a run's log.jsonl (one JSON object a line) and sent to the trackers."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if accelerator is not None:
        log_record(accelerator, record)


def read_log(path) -> list[dict]:
    """The records of a log.jsonl (a line cut short by a kill is skipped)."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
