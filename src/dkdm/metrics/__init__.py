"""Sample-quality metrics. Each metric module imports only what it needs, lazily."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where reference features and statistics are kept between runs: $DKDM_CACHE or ~/.cache/dkdm."""
    return Path(os.environ.get("DKDM_CACHE", Path.home() / ".cache" / "dkdm"))
