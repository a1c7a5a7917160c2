"""One forward + backward of OpenMoE-Base/16E (float32) on a [1, 512] batch: time and memory.

    python scripts/openmoe_base_step.py [--seq 512] [--preset openmoe-base] [--profile]

Prints the time of each phase (build, forward, backward), the resident memory after each
phase and the peak RSS (resource.getrusage ru_maxrss). ``--profile`` adds the top entries
of a cProfile of the forward + backward. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402  (script: host data only)

from tinymoe import backend as B  # noqa: E402
from tinymoe.config import count_parameters, get_preset  # noqa: E402
from tinymoe.nn.model import OpenMoE  # noqa: E402


def rss_gb() -> float:
    """Current resident set size in GB (Linux /proc; 0 elsewhere)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return 0.0


def peak_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KB on Linux
    return kb / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="openmoe-base")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: TINYMOE_DEVICE or cpu)")
    args = ap.parse_args()
    if args.device:
        B.set_device(args.device)

    cfg = get_preset(args.preset, dtype="float32")
    counts = count_parameters(cfg)
    print(f"{args.preset}: {cfg.describe()}")
    print(f"parameters: {counts['total'] / 1e6:.1f}M total, {counts['active'] / 1e6:.1f}M active; "
          f"device {B.get_device()}")

    t0 = time.perf_counter()
    model = OpenMoE(cfg, seed=0)
    t_build = time.perf_counter() - t0
    print(f"build     {t_build:7.2f} s   rss {rss_gb():6.2f} GB")

    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    out = model(x, targets=y)
    _ = float(out.loss.item())
    t_fwd = time.perf_counter() - t0
    print(f"forward   {t_fwd:7.2f} s   rss {rss_gb():6.2f} GB   loss {out.loss.item():.4f} "
          f"(ce {out.ce.item():.4f}, aux {out.aux_loss.item():.4f}, z {out.z_loss.item():.4f})")
    t0 = time.perf_counter()
    out.loss.backward()
    if B.get_device() == "cuda":
        B.xp.cuda.Device().synchronize()
    t_bwd = time.perf_counter() - t0
    if prof:
        prof.disable()
    n_grads = sum(p.grad is not None for p in model.parameters())
    print(f"backward  {t_bwd:7.2f} s   rss {rss_gb():6.2f} GB   ({n_grads} parameter grads)")
    drops = ", ".join(f"L{s.layer} {100 * s.dropped_fraction:.1f}% (C={s.capacity})" for s in out.routing)
    print(f"routing drops: {drops}")
    print(f"step (fwd+bwd) {t_fwd + t_bwd:.2f} s, {args.batch * args.seq / (t_fwd + t_bwd):.0f} tokens/s; "
          f"peak RSS {peak_gb():.2f} GB")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
