"""Expert and data parallelism under MPI: P = 2 ranks launched with ``mpiexec -n 2``.

Each test starts a subprocess job with a timeout (a hang fails the test instead of the
suite). The workers compare P ranks with one process (tests/parallel_worker.py) or run
``python -m tinymoe train --parallel ...``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpi4py mpich)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("TINYMOE_THREADS", "1")
    return env


def mpirun(args: list[str], n: int = 2, timeout: float = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``mpiexec -n n python args...``; a job still running after ``timeout`` fails."""
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", ["data", "expert", "expert dropless"])
def test_two_ranks_match_one_process(mode: str) -> None:
    """3 AdamW steps on 2 ranks (micro-batch 2) == one process on the batch of 4: losses,
    aux/z, gradient norm, every gradient and every weight, float64 to 1e-9."""
    res = mpirun([str(ROOT / "tests" / "parallel_worker.py"), *mode.split()])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(f"OK {mode.split()[0]} P=2"), res.stdout + res.stderr
