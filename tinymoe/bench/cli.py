"""``python -m tinymoe bench``: the flags, and the run that times both sides phase by phase
(see the package docstring, ``tinymoe/bench/__init__.py``, for what is measured)."""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tinymoe import backend as B
from tinymoe.bench.measure import (PeakMemory, function_times, gemm_roof, load_average, machine_info, median_time,
                                   model_flops, op_overhead, set_threads)
from tinymoe.bench.report import format_report
from tinymoe.jsonio import json_ready
from tinymoe.bench.tinymoe_side import TinymoeSide, bench_train_config, check_dtype
from tinymoe.config import get_preset, preset_names

__all__ = ["add_arguments", "run", "OPTIMIZERS"]

from tinymoe.optim import OPTIMIZERS  # noqa: E402  (one vocabulary: optim owns the optimizer names)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m tinymoe bench``."""
    from tinymoe.parallel import MODES  # noqa: PLC0415  (the one vocabulary; MPI loads lazily)

    p.description = ("Throughput (tokens/s), model FLOPs utilisation against the backend's GEMM "
                     "rate, and peak memory of forward, forward+backward, a training step and "
                     "KV-cache generation; optionally side by side with the same model in PyTorch.")
    p.add_argument("--config", default="small", help=f"preset: {', '.join(preset_names())} (default: small)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default: 16, 1 for openmoe-*)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the model's max_seq_len, "
                   "512 for openmoe-*)")
    p.add_argument("--steps", type=int, default=5, help="timed repeats per phase (median reported; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each phase (default 1)")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed runs of a side just before each of its timed repeats, so that it is "
                        "not timed while the other side's thread pool winds down (torch's OpenMP "
                        "workers spin for milliseconds after its last op) and its own threads and "
                        "caches are warm; 0 = strict alternation, one timed run each (default 1)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the PyTorch side: the same model on the same weights, written for speed "
                        "with PyTorch's own kernels (tinymoe/bench/torch_side.py; needs torch)")
    p.add_argument("--side", choices=("both", "tinymoe", "torch"), default="both",
                   help="run only one side (for absolute memory in a fresh process); 'torch' implies "
                        "--compare-torch")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for BLAS, tinymoe's row-parallel kernels and torch (default: every "
                        "core); needs threadpoolctl to set NumPy's BLAS")
    p.add_argument("--phases", default=None,
                   help="comma list of forward, fwd_bwd, step, generate (default: all; with "
                        "--parallel only step)")
    p.add_argument("--gen-prompt", type=int, default=None,
                   help="prompt tokens for generation (default 64, at most half of max_seq_len)")
    p.add_argument("--gen-new", type=int, default=None,
                   help="new tokens for generation (default 64, at most what max_seq_len leaves)")
    p.add_argument("--roof-size", type=int, default=None,
                   help="n of the n x n GEMMs that measure the roof (default 2048 CPU, 8192 GPU)")
    p.add_argument("--ops", action="store_true", help="op-level mode: per-op overhead and matmul vs bare GEMMs")
    p.add_argument("--by-function", action="store_true",
                   help="after the phases, time --steps more training steps of the tinymoe side with a "
                        "timer on every autograd Function's forward and backward: where a step's time "
                        "goes, per Function (the timers add a little to the step)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write every number to this JSON file")
    p.add_argument("--parallel", choices=MODES, default="none",
                   help="time a training step on P MPI ranks (run under mpiexec -n P; see "
                        "tinymoe/bench/parallel_side.py): the step split into compute, all-to-all "
                        "and all-reduce, bytes moved per MoE layer against the formula, tokens/s. "
                        "--batch is then the per-rank micro-batch; none (default) = the "
                        "one-process benchmark")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); prints a table."""
    if args.device is not None:
        B.set_device(args.device)
    if args.steps < 1 or args.warmup < 0 or args.settle < 0:
        raise ValueError(f"--steps={args.steps} must be >= 1, --warmup={args.warmup} and "
                         f"--settle={args.settle} >= 0")
    if args.parallel != "none":
        return _run_parallel(args)
    if args.phases is None:
        args.phases = "forward,fwd_bwd,step,generate"
    if args.side == "torch":
        args.compare_torch = True
    threads = set_threads(args.threads)
    report: dict[str, Any] = {"machine": machine_info(threads), "load_before": load_average()}
    torch_side = _import_torch_side(threads) if args.compare_torch else None

    roof = gemm_roof(args.roof_size, repeats=max(7, args.steps))
    report["gemm_roof"] = roof
    if torch_side is not None:
        report["torch_gemm_roof"] = torch_side.torch_gemm_roof(roof["n"], max(7, args.steps), median_time)

    if args.ops:
        report["ops"] = op_overhead(args.steps, None if torch_side is None else torch_side.torch)
        ok = True
    else:
        ok = _bench_model(args, report, roof, torch_side)
        # the roof again after the phases, keeping the better: one slow spell of the machine
        # during the first measurement would otherwise inflate every MFU
        again = gemm_roof(args.roof_size, repeats=max(7, args.steps))
        if again["flops_per_s"] > roof["flops_per_s"]:
            again["seconds"] = roof["seconds"] + again["seconds"]
            report["gemm_roof"] = again
            for phases in report.get("results", {}).values():
                for r in phases.values():
                    if "flops_per_s" in r:
                        r["mfu"] = r["flops_per_s"] / again["flops_per_s"]
                        r["mfu_kept"] = r["flops_per_s_kept"] / again["flops_per_s"]
        else:
            roof["seconds"] = roof["seconds"] + again["seconds"]
    report["load_after"] = load_average()
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(json_ready(report, nonfinite="keep"), indent=2))
        print(f"wrote {args.json}")
    return 0 if ok else 1

def _shape(args: argparse.Namespace) -> tuple[Any, int, int]:
    """(model config, batch, seq) from ``--config``, ``--batch``, ``--seq``."""
    big = args.config.startswith("openmoe")
    cfg = get_preset(args.config)
    batch = args.batch if args.batch is not None else (1 if big else 16)
    seq = args.seq if args.seq is not None else (512 if big else cfg.max_seq_len)
    if batch < 1 or not 1 <= seq <= cfg.max_seq_len:
        raise ValueError(f"--batch={batch} must be >= 1 and --seq={seq} between 1 and max_seq_len={cfg.max_seq_len}")
    return cfg, batch, seq


def _run_parallel(args: argparse.Namespace) -> int:
    """``bench --parallel data|expert`` on every rank of ``mpiexec -n P``; rank 0 prints."""
    from tinymoe.bench.parallel_side import bench_parallel  # noqa: PLC0415
    from tinymoe.bench.report import format_parallel_report  # noqa: PLC0415
    from tinymoe.parallel import call_on_every_rank, setup  # noqa: PLC0415

    if args.compare_torch or args.side != "both" or args.ops:
        raise ValueError("--parallel times tinymoe's training step only: drop --compare-torch, "
                         "--side and --ops")
    if args.phases not in (None, "step"):
        raise ValueError(f"--parallel times the training step only (--phases step), not {args.phases!r}")
    cfg, batch, seq = _shape(args)
    par = setup(args.parallel, "bench")     # one line without mpiexec
    threads = set_threads(args.threads)
    report: dict[str, Any] = {"machine": machine_info(threads), "load_before": load_average(),
                              "config": args.config, "describe": cfg.describe(),
                              "optimizer": args.optimizer, "steps": args.steps, "warmup": args.warmup}
    res = call_on_every_rank(par, bench_parallel, par, args, cfg, batch, seq)
    if not par.is_root:
        return 0
    report.update(parallel=res, load_after=load_average())
    print(format_parallel_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(json_ready(report, nonfinite="keep"), indent=2))
        print(f"wrote {args.json}")
    return 0


def _import_torch_side(threads: dict[str, Any]) -> Any:
    """The torch side (``tinymoe.bench.torch_side``), imported only for --compare-torch, with
    torch set to the benchmark's threads and device."""
    try:
        from tinymoe.bench import torch_side  # noqa: PLC0415  (optional: needs torch)
    except ImportError as e:
        if e.name != "torch" and not str(e.name).startswith("torch."):
            raise
        raise ValueError("--compare-torch needs PyTorch (pip install torch)") from None
    torch_side.setup_torch(threads, B.get_device())
    return torch_side


def paired_ratios(tinymoe_seconds: list[float], torch_seconds: list[float]) -> dict[str, Any]:
    """tinymoe/torch throughput of each interleaved repeat pair (torch's time over
    tinymoe's: the two ran seconds apart, under the same load) -> the ratios, their median
    and quartiles. Less moved by a slow drift of the machine's speed than the ratio of the
    two medians, and the spread says how much one run can be trusted."""
    ratios = sorted(b / a for a, b in zip(tinymoe_seconds, torch_seconds))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratios": ratios, "median": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def _bench_model(args: argparse.Namespace, report: dict[str, Any], roof: dict[str, Any], torch_side: Any) -> bool:
    """Time every phase of ``args.phases`` on both sides (repeats interleaved), into ``report``;
    False when a float32 check failed."""
    cfg, batch, seq = _shape(args)
    if cfg.ffn_kind != "swiglu":       # model_flops counts 3 d f per FFN; the torch side is SwiGLU
        raise ValueError(f"bench: --config {args.config} has ffn_kind={cfg.ffn_kind!r}; bench "
                         "supports the swiglu presets only")
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = sorted(set(phases) - {"forward", "fwd_bwd", "step", "generate"})
    if unknown:
        raise ValueError(f"unknown --phases {unknown}: use forward, fwd_bwd, step, generate")
    gen_prompt = args.gen_prompt if args.gen_prompt is not None else min(64, cfg.max_seq_len // 2)
    gen_new = args.gen_new if args.gen_new is not None else min(64, cfg.max_seq_len - gen_prompt)
    if "generate" in phases and (gen_prompt < 1 or gen_new < 1 or gen_prompt + gen_new > cfg.max_seq_len):
        raise ValueError(f"--gen-prompt={gen_prompt} + --gen-new={gen_new} must be >= 1 each and fit "
                         f"max_seq_len={cfg.max_seq_len}")
    tokens = batch * seq
    train_cfg = bench_train_config(args.optimizer)
    tm = TinymoeSide(cfg, batch, seq, train_cfg, args.seed)
    flops = model_flops(cfg, seq)
    kept = model_flops(cfg, seq, tm.kept_fraction())
    flops["kept_fraction"] = kept["kept_fraction"]
    flops["train_per_token_kept"] = kept["train_per_token"]
    flops["forward_per_token_kept"] = kept["forward_per_token"]
    report.update(config=args.config, describe=cfg.describe(), batch=batch, seq=seq, optimizer=args.optimizer,
                  steps=args.steps, warmup=args.warmup, settle=args.settle, flops=flops, side=args.side)
    th = None
    if torch_side is not None:
        th = torch_side.TorchSide(cfg, tm.model.state_dict(), tm.x, tm.y, train_cfg)
    if args.side == "torch":
        del tm
        gc.collect()
        tm = None
    elif args.side == "tinymoe":
        th = None

    sides = {"tinymoe": tm, "torch": th}
    results: dict[str, dict[str, Any]] = {"tinymoe": {}, "torch": {}}
    ok = True
    per_token = {"forward": flops["forward_per_token"], "fwd_bwd": flops["train_per_token"],
                 "step": flops["train_per_token"]}
    for phase in [ph for ph in phases if ph != "generate"]:
        # memory: one untimed run of each side under a fresh peak (this is also the warm-up)
        for name, side in sides.items():
            if side is None:
                continue
            with PeakMemory() as mem:
                getattr(side, phase)()
            results[name][phase] = {"memory": mem.as_dict()}
        # time: repeats interleaved side by side
        times: dict[str, list[float]] = {n: [] for n, s in sides.items() if s is not None}
        for _ in range(max(args.warmup - 1, 0)):
            for name in times:
                getattr(sides[name], phase)()
        for _ in range(args.steps):
            for name in times:
                for _ in range(args.settle):                   # untimed: the other side winds down
                    getattr(sides[name], phase)()
                sides[name].sync()
                t0 = time.perf_counter()
                getattr(sides[name], phase)()
                sides[name].sync()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            med = statistics.median(ts)
            r = results[name][phase]
            r.update(seconds=med, all_seconds=ts, tokens_per_s=tokens / med,
                     flops_per_s=per_token[phase] * tokens / med,
                     flops_per_s_kept=per_token[phase] * (kept["train_per_token"] / flops["train_per_token"])
                     * tokens / med)
            r["mfu"] = r["flops_per_s"] / roof["flops_per_s"]
            r["mfu_kept"] = r["flops_per_s_kept"] / roof["flops_per_s"]
        if phase in ("fwd_bwd", "step") and tm is not None:
            bad = check_dtype(tm.model, cfg.dtype)
            results["tinymoe"][phase]["dtype_check"] = bad or "ok"
            if bad:
                ok = False
                print(f"error: not {cfg.dtype}: {', '.join(bad[:5])}", file=sys.stderr)

    if "generate" in phases:
        prompt = B.default_rng(args.seed + 3).integers(0, cfg.vocab_size, size=(1, gen_prompt))
        n_new = gen_new
        gen: dict[str, list] = {n: [] for n, s in sides.items() if s is not None}
        ids_of: dict[str, list[int]] = {}
        for name in gen:                                       # warm-up, and memory
            with PeakMemory() as mem:
                ids_of[name] = sides[name].generate(prompt, n_new)[2]
            results[name]["generate"] = {"memory": mem.as_dict()}
        for _ in range(args.steps):
            for name in gen:
                for _ in range(args.settle):
                    sides[name].generate(prompt, n_new)
                gen[name].append(sides[name].generate(prompt, n_new)[:2])
        for name, runs in gen.items():
            pre = statistics.median(r[0] for r in runs)
            dec = statistics.median(r[1] for r in runs)
            results[name]["generate"].update(
                prompt=gen_prompt, new_tokens=n_new, prefill_seconds=pre, decode_seconds=dec,
                tokens_per_s=(n_new - 1) / dec if n_new > 1 else float("nan"),
                prefill_tokens_per_s=gen_prompt / pre)
        if len(ids_of) == 2:
            same = sum(a == b for a, b in zip(ids_of["tinymoe"], ids_of["torch"]))
            results["tinymoe"]["generate"]["greedy_tokens_equal_to_torch"] = f"{same}/{n_new}"

    if args.by_function and tm is not None:
        report["by_function"] = function_times(tm.step, args.steps)
    report["results"] = {k: v for k, v in results.items() if v}
    if th is not None and tm is not None:
        report["ratio_tinymoe_over_torch"] = {
            ph: results["tinymoe"][ph]["tokens_per_s"] / results["torch"][ph]["tokens_per_s"]
            for ph in results["tinymoe"] if ph in results["torch"]}
        report["paired_ratios"] = {ph: paired_ratios(results["tinymoe"][ph]["all_seconds"],
                                                     results["torch"][ph]["all_seconds"])
                                   for ph in report["ratio_tinymoe_over_torch"]
                                   if "all_seconds" in results["tinymoe"][ph]}
    return ok
