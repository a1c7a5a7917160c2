"""Shared fixtures: every test that takes ``backend`` runs once per available array backend.

NumPy always runs. CuPy runs when it imports and sees a GPU; otherwise its cases are
skipped with the reason, and the header of the run says which backends are active.

The oracle is imported one way everywhere: ``from tests.oracle... import ...`` (pytest puts
the repository root on ``sys.path``, as ``tests/`` is a package). Subprocesses the suite
starts (the lessons, the CLI) get the same root first on ``PYTHONPATH``, so they too run
this checkout, whether or not (and wherever) tinymoe is installed.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TINYMOE_FAST", "1")   # lessons run in fast mode inside the suite
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _ROOT])

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
