import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("DKDM_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
ADM = SHARED / "testdata" / "adm"


@pytest.fixture(scope="session")
def adm_reference():
    path = ADM / "adm_reference.safetensors"
    if not path.exists():
        pytest.skip(f"reference tensors not found at {path} (they ship in ../shared, not in a clone)")
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep metric caches out of the user's home during tests."""
    old = os.environ.get("DKDM_CACHE")
    os.environ["DKDM_CACHE"] = str(tmp_path_factory.mktemp("dkdm-cache"))
    yield
    if old is None:
        os.environ.pop("DKDM_CACHE", None)
    else:
        os.environ["DKDM_CACHE"] = old
