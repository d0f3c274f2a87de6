import os
from pathlib import Path

import pytest
import torch

# One thread in the test process (its subprocesses get OMP_NUM_THREADS=1 too): the suite's networks
# are tiny, and with two OpenMP threads on a machine whose other core is busy every op waits on a
# spinning thread (a toy MLP step: 42 steps/s against 874 with one thread, issue 26), which made
# the suite take 35 minutes beside two other jobs.
torch.set_num_threads(1)

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
