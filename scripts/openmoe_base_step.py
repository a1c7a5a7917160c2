"""One forward + backward of OpenMoE-Base/16E (float32) on a [1, 512] batch: time and memory.

    python scripts/openmoe_base_step.py [--seq 512] [--preset openmoe-base] [--profile]
                                        [--optimizer none|adamw|adafactor] [--steps N]
                                        [--threads N] [--system-malloc]

Prints the time of each phase (build, forward, backward and, with ``--optimizer``, the
gradient clip + optimizer step), the resident memory after each phase and the peak RSS
(resource.getrusage ru_maxrss). ``--steps N`` repeats the whole training step N times (the
optimizer state is allocated on the first). ``--profile`` adds the top entries of a
cProfile of the last step. Run each setting in a fresh process: the peak is per process.
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import time

from tinymoe import backend as B  # first: before NumPy loads, see backend.py
from tinymoe.config import count_parameters, get_preset
from tinymoe.nn.model import OpenMoE
from tinymoe.bench.tinymoe_side import bench_train_config
from tinymoe.optim import clip_grad_norm_, configure_optimizers


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
    ap.add_argument("--optimizer", choices=("none", "adamw", "adafactor"), default="none",
                    help="also clip the gradients to norm 1 and take one optimizer step")
    ap.add_argument("--steps", type=int, default=1, help="training steps to run (default 1)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: TINYMOE_DEVICE or cpu)")
    ap.add_argument("--threads", type=int, default=None, help="BLAS + kernel threads (default: every core)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's malloc settings alone (the CLI calls B.keep_freed_memory())")
    args = ap.parse_args()
    if not args.system_malloc:
        B.keep_freed_memory()
    if args.threads:
        B.set_num_threads(args.threads)
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

    rng = B.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    params = list(model.parameters())
    opt = None
    if args.optimizer in ("adamw", "adafactor"):   # built as `train` and `bench` build it
        opt = configure_optimizers(model, bench_train_config(args.optimizer))

    prof = None
    for step in range(1, args.steps + 1):
        if opt is not None:
            opt.zero_grad()
        else:
            model.zero_grad()
        if args.profile and step == args.steps:
            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        out = model(x, targets=y)
        loss = float(out.loss.item())
        t_fwd = time.perf_counter() - t0
        print(f"[step {step}] forward   {t_fwd:7.2f} s   rss {rss_gb():6.2f} GB   loss {loss:.4f} "
              f"(ce {out.ce.item():.4f}, aux {out.aux_loss.item():.4f}, z {out.z_loss.item():.4f})")
        drops = ", ".join(f"L{s.layer} {100 * s.dropped_fraction:.1f}% (C={s.capacity})" for s in out.routing)
        t0 = time.perf_counter()
        out.loss.backward()
        del out
        B.synchronize()
        t_bwd = time.perf_counter() - t0
        n_grads = sum(p.grad is not None for p in params)
        print(f"[step {step}] backward  {t_bwd:7.2f} s   rss {rss_gb():6.2f} GB   ({n_grads} parameter grads)")
        t_opt = 0.0
        if opt is not None:
            t0 = time.perf_counter()
            gnorm = clip_grad_norm_(params, 1.0)
            opt.step()
            B.synchronize()
            t_opt = time.perf_counter() - t0
            print(f"[step {step}] clip+{args.optimizer} {t_opt:6.2f} s   rss {rss_gb():6.2f} GB   (grad norm {gnorm:.3f})")
        if prof:
            prof.disable()
        total = t_fwd + t_bwd + t_opt
        print(f"[step {step}] routing drops: {drops}")
        print(f"[step {step}] step {total:.2f} s, {args.batch * args.seq / total:.0f} tokens/s; "
              f"peak RSS so far {peak_gb():.2f} GB")
    print(f"peak RSS {peak_gb():.2f} GB ({args.optimizer}, batch [{args.batch}, {args.seq}], {args.steps} step(s))")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
