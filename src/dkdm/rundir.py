"""The run directory's rules: where a run goes by default, whether --out may hold it (a new run,
or the one --resume continues), the settings it saves (run.json) and reads back, and how run.json
records a teacher."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DkdmError
from .layout import CHECKPOINTS, MODEL_JSON, RUN_JSON


def default_out(command: str) -> str:
    import time

    return str(Path("dkdm-runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_out(s) -> Path:
    if not s.out:
        raise DkdmError("--out DIR is required: the run directory to create")
    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise DkdmError(f"--out {out} is a file; choose a directory path")
    from .checkpoint import has_preparation, list_checkpoints
    from .runlock import LOCK

    others = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    is_run = (out / RUN_JSON).is_file() or bool(list_checkpoints(out / CHECKPOINTS)) or has_preparation(out)
    if s.resume:
        if not out.exists():
            raise DkdmError(f"--resume: {out} has no checkpoint to resume from (it does not exist); drop --resume to "
                            f"start a new run there")
        if not is_run:
            raise DkdmError(f"--resume: {out} holds no dkdm run (no run.json, checkpoints/ or preparation/, but "
                            f"{_names(others)}); name the run directory with --out")
    elif others:
        if is_run:
            raise DkdmError(f"--out {out} already holds a run; pass --resume to continue it or choose another directory")
        raise DkdmError(f"--out {out} is not empty ({_names(others)}) and holds no dkdm run; choose a new or empty "
                        f"directory")
    return out


def _names(names: list[str]) -> str:
    return "nothing" if not names else ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def write_settings(out: Path, s, processes: int) -> None:
    """RUN/run.json: the settings (every rule applied), which command ran them and on how many processes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_JSON).write_text(json.dumps({**s.as_dict(), "processes": processes}, indent=1,
                                             default=str))


def run_json(run_dir) -> dict | None:
    """A run directory's run.json, or None where it has none or it is unreadable."""
    try:
        saved = json.loads((Path(run_dir) / RUN_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def saved_setting(run_dir, key: str, default):
    """``key`` of a run directory's run.json, or ``default`` where it has none (or no readable run.json)."""
    return (run_json(run_dir) or {}).get(key, default)


def recorded_teacher(student_dir) -> str | None:
    """The teacher a DKDM student's model directory records (dkdm_model.json: the path made absolute),
    else its run's (run.json, as given): a few-step run given no --teacher learns from it. None where
    there is none to load (an in-process object, or nothing recorded)."""
    from .objects import is_object_reference

    try:
        teacher = json.loads((Path(student_dir) / MODEL_JSON).read_text()).get("teacher")
    except (OSError, json.JSONDecodeError, AttributeError):
        teacher = None
    teacher = teacher or saved_setting(student_dir, "teacher", None)
    return None if teacher is None or is_object_reference(str(teacher)) else str(teacher)


def teacher_reference(teacher) -> str:
    """How a run records its teacher: builtin names and Hub ids as given, paths made absolute."""
    from .formats.pipelines import looks_like_hub_id

    from .objects import is_object_reference

    text = str(teacher)
    if text.startswith("builtin:") or looks_like_hub_id(text) or is_object_reference(text):
        return text
    return str(Path(text).resolve())
