"""Training checkpoints as safetensors + JSON, written atomically.

A checkpoint is a directory ``checkpoints/step_NNNNNNNN`` holding ``state.safetensors`` (every
tensor: student, EMA, optimizer moments, data-source state such as the pool, RNG states) and
``meta.json`` (step, optimizer hyper-parameters, lr schedule, run config). It is assembled in a
temporary directory and renamed into place, so a crash never leaves a half-written checkpoint
under a final name. ``meta.json`` records the SHA-256 of every tensor file, so a checkpoint
damaged later (a truncated copy, a bad disk) is detected on load instead of resuming from garbage.
No pickle anywhere: a checkpoint from a stranger is safe to load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DkdmError
from .layout import CHECKPOINTS
from .runlock import check_free_space

PREFIX = "step_"


def flatten(prefix: str, tensors: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in tensors.items()}


def unflatten(prefix: str, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, val in pstate.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{name}"] = val
            else:
                scalars[f"{pid}.{name}"] = val
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, val in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def _tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp_{PREFIX}{step:08d}"


def write_rank_shard(root, step: int, rank: int, tensors: dict[str, torch.Tensor]) -> None:
    """A non-main process's own state (its pool shard, its RNG) into the checkpoint being written."""
    tmp = _tmp_dir(Path(root), step)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / f"rank{rank}.safetensors"))


def read_rank_shard(path, rank: int) -> dict[str, torch.Tensor]:
    f = Path(path) / f"rank{rank}.safetensors"
    try:
        return load_file(str(f))
    except (OSError, SafetensorError) as e:
        raise DkdmError(f"checkpoint {path} lacks a readable shard for process {rank} ({e})")


def save_checkpoint(root, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 2,
                    shards: list[str] = ()) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = _tmp_dir(root, step)
    if not shards:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    missing = [s for s in shards if not (tmp / f"{s}.safetensors").exists()]
    if missing:
        raise DkdmError(f"checkpoint at step {step}: the shards of {', '.join(missing)} were not written")
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        sums = {f.name: _sha256(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta, "sha256": sums}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DkdmError(f"cannot write the checkpoint of step {step} in {root} ({e.strerror or e}); the previous "
                        f"checkpoint is kept: free space or fix the directory, then continue with --resume")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").exists())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path) -> dict:
    """meta.json of a checkpoint whose files match their recorded checksums; DkdmError otherwise."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        for name, want in meta.get("sha256", {}).items():
            if _sha256(path / name) != want:
                raise DkdmError(f"checkpoint {path}: {name} does not match its checksum (truncated or corrupt)")
    except (OSError, json.JSONDecodeError) as e:
        raise DkdmError(f"checkpoint {path} is unreadable ({e})")
    return meta


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    meta = verify_checkpoint(path)
    try:
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, SafetensorError) as e:
        raise DkdmError(f"checkpoint {path} is unreadable ({e}); delete it to resume from an earlier one")
    return tensors, meta


def latest_good_checkpoint(root, warn=None) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint that verifies; damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            tensors, meta = load_checkpoint(path)
        except DkdmError as e:
            if warn is not None:
                warn(f"warning: {e}; falling back to the previous checkpoint")
            continue
        return path, tensors, meta
    return None


def saved_pool(run_dir, rank: int = 0) -> dict[str, torch.Tensor] | None:
    """The pool state (process ``rank``'s shard) of the newest good checkpoint of the run in
    ``run_dir``, or None where it has none."""
    found = latest_good_checkpoint(Path(run_dir) / CHECKPOINTS)
    if found is None:
        return None
    path, tensors, _ = found
    if rank:
        tensors = {**tensors, **read_rank_shard(path, rank)}
    pool = unflatten("source", tensors)
    return pool if "x" in pool and "s" in pool else None


PREPARATION = "preparation"


class PreparationCheckpoints:
    """A pool preparation's progress, kept so that an interrupted one resumes where it stopped.

    At the paper's scale exact preparation is days of teacher steps. The pool hands its state after
    each chunk (``KnowledgePool.preparation_state``); every ``every_s`` seconds it is written as a
    checkpoint (atomic, with checksums) under ``RUN/preparation/rank<r>``: each process its own
    shard. ``meta`` (the run's settings that shape the pool) is stored with it and must match on
    resume. The directory is removed once training's first checkpoint holds the prepared pool.
    A signal noted in ``stop`` (``interrupts.catch_signals``) saves the state after the chunk in
    flight and stops with ``Interrupted``, so a Ctrl-C loses at most one chunk.
    """

    def __init__(self, out, rank: int, meta: dict, every_s: float = 300.0, stop: list | None = None):
        self.root = Path(out) / PREPARATION / f"rank{rank}"
        self.meta = meta
        self.every_s = every_s
        self.stop = stop if stop is not None else []
        self._last = None

    def __call__(self, state: dict[str, torch.Tensor]) -> None:
        import time

        now = time.monotonic()
        if self._last is None:
            self._last = now
        if self.stop:
            self.interrupt(state)
        if now - self._last < self.every_s:
            return
        self._save(state)
        self._last = time.monotonic()

    def _save(self, state: dict[str, torch.Tensor]) -> None:
        save_checkpoint(self.root, int(state["prep_done"]), flatten("pool", state), {"run": self.meta}, keep=1)

    def interrupt(self, state: dict[str, torch.Tensor]) -> None:
        """Save ``state`` and raise ``Interrupted`` for the first signal in ``stop``."""
        import signal

        from .interrupts import Interrupted

        done = int(state["prep_done"])
        self._save(state)
        name = signal.Signals(self.stop[0]).name
        raise Interrupted(f"{name} while preparing the pool: {done:,} of {int(state['x'].shape[0]):,} entries "
                          f"prepared and saved in {self.root.parent}; continue with --resume", self.stop[0])

    def latest(self, warn=None) -> dict[str, torch.Tensor] | None:
        """The saved state to resume from (None: nothing saved); DkdmError if it belongs to other settings."""
        found = latest_good_checkpoint(self.root, warn)
        if found is None:
            return None
        path, tensors, meta = found
        saved = meta.get("run", {})
        differ = [k for k in sorted(set(saved) | set(self.meta)) if saved.get(k) != self.meta.get(k)]
        if differ:
            k = differ[0]
            raise DkdmError(f"--resume: the pool preparation in {path.parent} was made with other settings ({k}: saved "
                            f"{saved.get(k)}, now {self.meta.get(k)}); resume with the same settings")
        return unflatten("pool", tensors)


def has_preparation(out) -> bool:
    root = Path(out) / PREPARATION
    return root.is_dir() and any(list_checkpoints(d) for d in root.iterdir() if d.is_dir())


def drop_preparation(out) -> None:
    shutil.rmtree(Path(out) / PREPARATION, ignore_errors=True)


# a trainer's state (Trainer.state_dict) as a checkpoint, every rank's shard beside it ---------
def save_run(trainer) -> Path:
    """Checkpoint: the shared state from the main process, every rank's source (pool shard) and RNG."""
    acc = trainer.accelerator
    own = trainer.rank_state_dict()
    if not acc.is_main_process:
        write_rank_shard(trainer.ckpt_dir, trainer.step, acc.process_index, own)
        acc.wait_for_everyone()
        acc.wait_for_everyone()
        return trainer.ckpt_dir
    shared, meta = trainer.state_dict()
    tensors = {**shared, **own}
    check_free_space(trainer.ckpt_dir, sum(t.nbytes for t in tensors.values()), f"the checkpoint of step {trainer.step}")
    acc.wait_for_everyone()  # every rank's shard is written into the temporary directory
    path = save_checkpoint(trainer.ckpt_dir, trainer.step, tensors, meta, trainer.cfg.keep_checkpoints,
                           shards=[f"rank{r}" for r in range(1, acc.num_processes)])
    acc.wait_for_everyone()
    return path

def resume_run(trainer) -> int:
    """Put the last good checkpoint back into ``trainer``; returns its step."""
    if not list_checkpoints(trainer.ckpt_dir):
        raise DkdmError(f"--resume: {trainer.out} has no checkpoint to resume from; drop --resume to start afresh")
    found = latest_good_checkpoint(trainer.ckpt_dir, warn=lambda m: print(m, file=sys.stderr))
    if found is None:
        raise DkdmError(f"--resume: every checkpoint in {trainer.ckpt_dir} is damaged; start afresh in a new --out")
    path, tensors, meta = found
    acc = trainer.accelerator
    if int(meta.get("world_size", 1)) != acc.num_processes:
        raise DkdmError(f"--resume: the run in {trainer.out} was trained by {meta.get('world_size', 1)} processes, "
                        f"this launch has {acc.num_processes}; resume with the same number of processes")
    if acc.process_index:
        tensors = {**tensors, **read_rank_shard(path, acc.process_index)}
    saved = meta.get("run", {})
    for key in ("student", "source", "teacher"):
        if key in saved and key in trainer.run_info and saved[key] != trainer.run_info[key]:
            raise DkdmError(
                f"--resume: the {key} settings differ from the run in {trainer.out} "
                f"(saved {saved[key]}, now {trainer.run_info[key]}); resume with the same settings"
            )
    trainer.load_state_dict(tensors, meta)
    _truncate_log(trainer, trainer.step)
    return trainer.step

def _truncate_log(trainer, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not trainer.accelerator.is_main_process or not trainer.log_path.exists():
        return
    keep = []
    for line in trainer.log_path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    tmp = trainer.log_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, trainer.log_path)
