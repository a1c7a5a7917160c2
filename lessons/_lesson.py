"""Set-up shared by the lessons (lesson plumbing, not part of tinymoe).

- Makes ``import tinymoe`` work from a fresh clone (adds the repository root to
  ``sys.path`` when tinymoe is not installed).
- ``FAST``: True when the environment variable ``TINYMOE_FAST=1`` is set (the test suite
  runs every lesson this way: same code, smaller sizes, fewer steps).
- ``OUT``: the folder where figures go: ``$TINYMOE_LESSON_OUT``, else ``lessons/out/``.
- ``show(fig, name)``: save a figure as ``OUT/name`` and show it inline in a notebook.
- Matplotlib uses the non-interactive Agg backend when run as a script, so
  ``python lessons/NN_name.py`` never opens a window.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

try:  # a fresh clone without `pip install -e .`
    import tinymoe  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
    import tinymoe  # noqa: F401

FAST: bool = os.environ.get("TINYMOE_FAST", "0").strip().lower() not in ("", "0", "false", "no")
OUT: Path = Path(os.environ.get("TINYMOE_LESSON_OUT") or HERE / "out")
OUT.mkdir(parents=True, exist_ok=True)

IN_NOTEBOOK = "ipykernel" in sys.modules

import matplotlib  # noqa: E402

if not IN_NOTEBOOK:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def show(fig, name: str) -> Path:
    """Save ``fig`` as OUT/name (PNG), print where, show it inline in a notebook."""
    path = OUT / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"[figure] {path}")
    if IN_NOTEBOOK:
        plt.show()
    else:
        plt.close(fig)
    return path


class timer:
    """``with timer("what"):`` prints the wall time of the block."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> "timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        print(f"[time] {self.what}: {self.seconds:.2f} s")


print(f"lesson set-up: fast mode {'ON' if FAST else 'off'}, figures go to {OUT}")
