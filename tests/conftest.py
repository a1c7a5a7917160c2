"""Shared fixtures: every test that takes ``backend`` runs once per array backend.

"cpu" is NumPy. "cuda" is CuPy when it imports and sees a GPU; without a GPU it is the
strict stand-in of tests/strict_xp.py (NumPy underneath, CuPy's names and rules on top:
NumPy operands refused, host syncs counted), so the device path runs on every CI run. The
header of the run says which one "cuda" is.

Every test starts on the CPU and ends there (autouse ``_pin_device``), whatever
``TINYMOE_DEVICE`` says: the environment variable is for users, and it is removed for the
subprocesses the suite starts.

The oracle is imported one way everywhere: ``from tests.oracle... import ...`` (pytest puts
the repository root on ``sys.path``, as ``tests/`` is a package). Subprocesses the suite
starts (the lessons, the CLI) get the same root first on ``PYTHONPATH``, so they too run
this checkout, whether or not (and wherever) tinymoe is installed.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import importlib.util

import pytest

# The suite needs what requirements.txt installs (torch is the oracle). Without it, say so
# in one line before anything imports them, instead of a page of collection errors.
_NEEDED = ("numpy", "tqdm", "matplotlib", "threadpoolctl", "torch")
_MISSING = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
_MISSING_LINE = (f"the test environment lacks {', '.join(_MISSING)}: run `pip install -r "
                 "requirements.txt` from the repository root first")
if "numpy" in _MISSING:              # this file itself needs NumPy (through tinymoe.backend)
    pytest.exit(_MISSING_LINE, returncode=pytest.ExitCode.USAGE_ERROR)

os.environ.setdefault("TINYMOE_FAST", "1")   # lessons run in fast mode inside the suite
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _ROOT])

# TINYMOE_DEVICE is for users: the suite chooses its devices itself (and its subprocesses
# start on the CPU). Removed before tinymoe is imported, which would act on it.
os.environ.pop("TINYMOE_DEVICE", None)

from tinymoe import backend as B  # noqa: E402
from tests import strict_xp  # noqa: E402

_CUDA = B.cuda_available()


def pytest_configure(config):  # noqa: ANN001
    if _MISSING:
        pytest.exit(_MISSING_LINE, returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_report_header(config):  # noqa: ANN001
    if _CUDA:
        return "tinymoe backends: numpy, cupy (GPU found)"
    return "tinymoe backends: numpy, strict CuPy stand-in for 'cuda' (no GPU visible: tests/strict_xp.py)"


@pytest.fixture(autouse=True)
def _pin_device():
    """Each test starts on the CPU with no stand-in registered, and is put back there."""
    B.register_device_module(None)
    B.set_device("cpu")
    yield
    B.register_device_module(None)
    B.set_device("cpu")


@contextlib.contextmanager
def device(name: str):
    """Run a block on ``name``: "cpu", or "cuda" (CuPy with a GPU, else the strict stand-in)."""
    if name == "cuda" and not _CUDA:
        with strict_xp.use_strict_device():
            B.set_device("cuda")
            yield name
        return
    B.set_device(name)
    try:
        yield name
    finally:
        B.set_device("cpu")


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    """Switch tinymoe to a backend for one test and back to NumPy afterwards."""
    with device(request.param) as name:
        yield name


@pytest.fixture
def strict():
    """The strict stand-in as device "cuda" (even with a GPU present), for the tests that
    count host syncs or check host/device mixing; yields the tests/strict_xp module."""
    with strict_xp.use_strict_device():
        B.set_device("cuda")
        yield strict_xp


@pytest.fixture
def threads():
    """``threads(n)`` sets the kernel/BLAS thread count for one test; restored afterwards."""
    before = B.get_num_threads()
    yield B.set_num_threads
    B.set_num_threads(before)
