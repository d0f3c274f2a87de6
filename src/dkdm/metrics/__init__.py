"""Sample-quality metrics. Each metric module imports only what it needs, lazily."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where reference features and statistics are kept between runs: $DKDM_CACHE or ~/.cache/dkdm."""
    return Path(os.environ.get("DKDM_CACHE", Path.home() / ".cache" / "dkdm"))


def cached(name: str | None, compute):
    """The tensors ``compute()`` returns, kept as ``cache_dir() / name`` (safetensors): read back when
    present and readable (an unreadable file is removed), else computed and written atomically. A
    read-only cache only costs recomputation; ``name`` None computes without caching."""
    from safetensors.torch import load_file, save_file

    if name is None:
        return compute()
    path = cache_dir() / name
    if path.exists():
        try:
            return load_file(str(path))
        except Exception:
            path.unlink(missing_ok=True)
    tensors = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass
    return tensors
