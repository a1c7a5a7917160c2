"""Shared fixtures: every test that takes ``backend`` runs once per available array backend.

NumPy always runs. CuPy runs when it imports and sees a GPU; otherwise its cases are
skipped with the reason, and the header of the run says which backends are active.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TINYMOE_FAST", "1")   # lessons run in fast mode inside the suite

from tinymoe import backend as B  # noqa: E402

_CUDA = B.cuda_available()


def pytest_report_header(config):  # noqa: ANN001
    if _CUDA:
        return "tinymoe backends: numpy, cupy (GPU found)"
    return "tinymoe backends: numpy (cupy skipped: CuPy not importable or no GPU visible)"


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    """Switch tinymoe to a backend for one test and back to NumPy afterwards."""
    if request.param == "cuda" and not _CUDA:
        pytest.skip("cupy backend: CuPy not importable or no GPU visible on this machine")
    B.set_device(request.param)
    try:
        yield request.param
    finally:
        B.set_device("cpu")


@pytest.fixture
def threads():
    """``threads(n)`` sets the kernel/BLAS thread count for one test; restored afterwards."""
    before = B.get_num_threads()
    yield B.set_num_threads
    B.set_num_threads(before)
