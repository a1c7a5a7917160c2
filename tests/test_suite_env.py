"""The suite refuses to run without what requirements.txt installs, in one line.

A Python without torch (the oracle) or matplotlib used to stop with a page of collection
errors. Here pytest runs in a subprocess whose import path holds only NumPy and pytest
itself (links into this environment's site-packages, ``python -S``): the run must end at
once with exit status 4 and one line naming what is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_KEEP = ("numpy", "numpy.libs", "pytest", "_pytest", "pluggy", "iniconfig", "packaging",
         "pygments", "py.py")


def test_missing_requirements_are_one_line(tmp_path: Path) -> None:
    site = Path(np.__file__).resolve().parent.parent
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in _KEEP:
        if (site / name).exists():
            (lib / name).symlink_to(site / name)
    if not (lib / "pytest").exists():
        pytest.skip("pytest does not live beside numpy here")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CI")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(lib)])
    res = subprocess.run([sys.executable, "-S", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--co", str(ROOT / "tests")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    out = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode == 4, res.stdout + res.stderr
    assert len(out) == 1, out
    for name in ("torch", "matplotlib", "tqdm"):
        assert name in out[0], out[0]
    assert "pip install -r requirements.txt" in out[0]
