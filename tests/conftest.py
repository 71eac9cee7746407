"""Shared test set-up: the Triton interpreter, GPU skips, RNG isolation and the shared data directory."""
import os

# Triton decorates its kernels at import time and reads TRITON_INTERPRET then, so this must come first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Items marked ``needs_cuda`` (the marker is declared in pyproject.toml) skip when no GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Every test leaves the torch, numpy and random generators as it found them."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    yield
    torch.set_rng_state(torch_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared research data (GUIDE §3): ``$PYZSL_DATA``, else ``../shared/data`` next to the repository."""
    configured = os.environ.get("PYZSL_DATA")
    root = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        source = "PYZSL_DATA" if configured else "the default ../shared/data (set PYZSL_DATA to override)"
        pytest.skip(f"shared data directory {root} not found ({source})")
    return root


@pytest.fixture
def one_thread():
    """One torch thread: tiny matrices on a busy 2-core machine run far faster without OpenMP barrier stalls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
