"""Set-up shared by the lessons (lesson plumbing, not part of tinymoe).

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
ROOT = HERE.parent   # the repository (commands run from there)

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
    if IN_NOTEBOOK:                       # display the figure itself: works whatever the backend
        from IPython.display import display
        display(fig)
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


# ---------------------------------------------------------------------------------------
# The small trained model that lessons 9-12 study (trained by lesson 9, reused by 10-12).
# ---------------------------------------------------------------------------------------

def shared_run_configs():
    """(model config, train config) of the run lessons 9-12 share.

    Normal mode: the ``mini`` preset (the default of ``python -m tinymoe train``), 300
    updates of 16 x 128 bytes, routing snapshots every 20 updates. Fast mode: ``toy``, 30
    updates on a small cut of the corpus (just enough to exercise the code).
    """
    from tinymoe.config import get_preset
    from tinymoe.train import TrainConfig

    if FAST:
        return get_preset("toy"), TrainConfig(
            steps=30, batch_size=8, seq_len=64, max_chars=20_000, lr=3e-3, warmup=5,
            eval_every=0, eval_batches=2, snapshot_every=5, save_every=0, log_every=5,
            out_dir=str(OUT / "run_toy_fast"))
    return get_preset("mini"), TrainConfig(
        steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup=30,
        eval_every=100, eval_batches=4, snapshot_every=20, save_every=100, log_every=10,
        out_dir=str(OUT / "run_mini_300"))


def shared_run(progress: bool = True) -> Path:
    """The checkpoint of the shared run: reused when ``OUT`` already holds it (lesson 9
    trains it), otherwise trained now with ``tinymoe.train.train``."""
    from tinymoe.checkpoint import CheckpointError, load_checkpoint
    from tinymoe.train import train

    model_cfg, train_cfg = shared_run_configs()
    ckpt = Path(train_cfg.out_dir) / "checkpoint.npz"
    if ckpt.exists():
        try:
            c = load_checkpoint(ckpt)
            if (c.step == train_cfg.steps and c.model_config.to_dict() == model_cfg.to_dict()
                    and c.train_config.get("steps") == train_cfg.steps):
                print(f"reusing the trained model in {ckpt}")
                return ckpt
        except CheckpointError as e:
            print(f"cannot reuse {ckpt} ({e}); training again")
    print(f"training the shared model ({'toy, fast mode' if FAST else 'mini'}) into {train_cfg.out_dir} ...")
    result = train(model_cfg, train_cfg.replace(overwrite=True), progress=progress)
    if result.status != "done":
        raise RuntimeError(f"training did not finish: {result.message}")
    return ckpt
