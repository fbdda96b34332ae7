"""Test-suite set-up: runs before any test module imports torch or triton.

- Without CUDA, Triton kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be set before triton is
  first imported, so it is decided here from the driver's presence (not by importing torch first).
- The `gpu` marker is honoured by one hook: such tests are skipped when no CUDA device is present.
- `one_thread`: a fixture that runs a test with one torch intra-op thread and restores the count after.
"""

import os
import shutil

import pytest


def _has_cuda_driver() -> bool:
    # Cheap check that imports neither torch nor triton: an NVIDIA driver exposes /dev/nvidia0 or nvidia-smi.
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


if not _has_cuda_driver():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _cuda_available() -> bool:
    if not _has_cuda_driver():
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (restored after): on a loaded 2-core machine intra-op threads spin
    against each other (measured ~50x slower small ops)."""
    import torch  # here, not at the top: this module must run before torch is imported

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
