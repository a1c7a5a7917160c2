"""The benchmark's report: the table ``bench`` prints, from the report dict it also writes
as JSON (``--json``)."""
from __future__ import annotations

from typing import Any

__all__ = ["format_report", "format_parallel_report"]


def _h(x: float, unit: str = "") -> str:
    """A number with a k / M / G suffix."""
    for suffix, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.1f}{unit}"


def format_report(r: dict[str, Any]) -> str:
    """The printed table of a report built by :func:`tinymoe.bench.cli.run`."""
    m = r["machine"]
    lines = [f"tinymoe bench | device {m['device']} | {m['cores']} cores, {m['threads']} BLAS threads, "
             f"{m['kernel_threads']} kernel threads | BLAS {m['blas']}"
             + (f" | env {m['env']}" if m["env"] else "")
             + (" | malloc keeps freed blocks" if m.get("malloc_keeps_freed") else ""),
             f"load average before {r['load_before']}, after {r['load_after']}",
             f"GEMM roof (float32, {r['gemm_roof']['n']}^3, best of {len(r['gemm_roof']['seconds'])}): {_h(r['gemm_roof']['flops_per_s'], 'FLOP/s')}"
             + (f"   torch: {_h(r['torch_gemm_roof']['flops_per_s'], 'FLOP/s')}" if "torch_gemm_roof" in r else "")]
    if "ops" in r:
        o = r["ops"]
        mm = o["matmul"]
        lines += [f"op overhead ({o['n_ops']} adds on [4, 4]): {o['us_per_op_forward']:.2f} us/op forward with graph, "
                  f"{o['us_per_op_fwd_bwd']:.2f} us/op forward+backward, {o['us_per_op_bare_array']:.2f} us/op bare array",
                  f"matmul {mm['shape'][0]}x{mm['shape'][1]}x{mm['shape'][2]} forward+backward: "
                  f"{1e3 * mm['seconds']:.2f} ms vs {1e3 * mm['bare_seconds']:.2f} ms for the 3 bare GEMMs "
                  f"(ratio {mm['ratio']:.3f}), {_h(mm['flops_per_s'], 'FLOP/s')}"]
        if "torch" in o:
            t = o["torch"]
            lines.append(f"torch: {t['us_per_op_forward']:.2f} us/op forward, {t['us_per_op_fwd_bwd']:.2f} us/op "
                         f"forward+backward; matmul forward+backward {1e3 * t['matmul_seconds']:.2f} ms")
        return "\n".join(lines)
    f = r["flops"]
    lines += [f"config {r['config']}: {r['describe']}",
              f"batch [{r['batch']}, {r['seq']}], optimizer {r['optimizer']}, median of {r['steps']} "
              f"(warm-up {r['warmup']}, {r.get('settle', 0)} untimed before each repeat)",
              f"model FLOPs/token: forward {_h(f['forward_per_token'])}, train {_h(f['train_per_token'])} "
              f"(6 N + 12 L T d_attn, N = {_h(f['n_active_matmul_params'])} active matmul params, k experts per token)", ""]
    res = r["results"]
    names = [n for n in ("tinymoe", "torch") if n in res]
    head = f"{'phase':<11}" + "".join(f"| {n + ' tok/s':>14} {'MFU':>6} {'peak':>9} {'+peak':>9} " for n in names)
    if len(names) == 2:
        head += "| tinymoe/torch"
    lines += [head, "-" * len(head)]
    for ph in ("forward", "fwd_bwd", "step"):
        if ph not in res[names[0]]:
            continue
        row = f"{ph:<11}"
        for n in names:
            x = res[n][ph]
            mem = x["memory"]
            row += (f"| {x['tokens_per_s']:>14,.0f} {100 * x['mfu']:>5.1f}% {_h(mem['peak_rss'], 'B'):>9} "
                    f"{_h(mem['phase_peak_increase'], 'B'):>9} ")
        if len(names) == 2:
            row += f"| {r['ratio_tinymoe_over_torch'][ph]:.2f}x"
        lines.append(row)
    if "generate" in res[names[0]]:
        row = f"{'generate':<11}"
        for n in names:
            x = res[n]["generate"]
            row += f"| {x['tokens_per_s']:>14,.1f} {'':>6} {_h(x['memory']['peak_rss'], 'B'):>9} {'':>9} "
        if len(names) == 2:
            row += f"| {r['ratio_tinymoe_over_torch']['generate']:.2f}x"
        lines.append(row)
        g = res[names[0]]["generate"]
        extra = (f"; greedy tokens equal to torch's: {g['greedy_tokens_equal_to_torch']}"
                 if "greedy_tokens_equal_to_torch" in g else "")
        lines.append(f"generate: batch 1, {g['prompt']}-token prompt (prefill "
                     + ", ".join(f"{n} {1e3 * res[n]['generate']['prefill_seconds']:.1f} ms" for n in names)
                     + f"), then {g['new_tokens']} new tokens, decode tokens/s{extra}")
    if r.get("paired_ratios"):
        lines.append("tinymoe/torch per interleaved repeat pair, median [quartiles]: "
                     + "; ".join(f"{ph} {x['median']:.2f}x [{x['q1']:.2f}, {x['q3']:.2f}]"
                                 for ph, x in r["paired_ratios"].items()))
    timed = [ph for ph in ("forward", "fwd_bwd", "step") if ph in res[names[0]]]
    if timed and f.get("kept_fraction", 1.0) < 1.0:
        lines.append(f"MFU above counts k experts per token; capacity kept {100 * f['kept_fraction']:.0f}% of the "
                     "assignments on this batch, and counting only those: "
                     + "; ".join(f"{ph} " + " / ".join(f"{100 * res[n][ph]['mfu_kept']:.1f}%" for n in names)
                                 for ph in timed)
                     + (" (tinymoe / torch)" if len(names) == 2 else ""))
    for n in names:
        dc = res[n].get("step", res[n].get("fwd_bwd", {})).get("dtype_check")
        if dc is not None:
            lines.append(f"{n}: every parameter and grad float32: {'yes' if dc == 'ok' else dc}")
    lines.append("peak = process peak RSS during the phase; +peak = peak minus RSS before it"
                 + ("" if res[names[0]][next(iter(res[names[0]]))]["memory"]["peak_is_per_phase"]
                    else " (peak not resettable here: process-wide)"))
    if "by_function" in r:
        lines += [""] + _by_function_lines(r["by_function"])
    return "\n".join(lines)


def _by_function_lines(bf: dict[str, Any]) -> list[str]:
    """The ``--by-function`` table: ms per training step in each Function."""
    step = bf["step_ms"]
    lines = [f"tinymoe training step by autograd Function (mean of {bf['repeats']} timed steps, "
             f"{step:.2f} ms each with the timers on)",
             f"{'Function':<18} {'calls':>6} {'forward ms':>11} {'backward ms':>12} {'share':>6}"]
    for name, x in bf["functions"].items():
        both = x["forward_ms"] + x["backward_ms"]
        lines.append(f"{name:<18} {x['calls']:>6.1f} {x['forward_ms']:>11.3f} {x['backward_ms']:>12.3f} "
                     f"{100 * both / step:>5.1f}%")
    lines.append(f"{'outside Functions':<18} {'':>6} {bf['outside_ms']:>11.3f} {'':>12} "
                 f"{100 * bf['outside_ms'] / step:>5.1f}%   (autograd engine, optimizer, routing glue, Python)")
    return lines


def format_parallel_report(r: dict[str, Any]) -> str:
    """The printed table of ``bench --parallel`` (:mod:`tinymoe.bench.parallel_side`)."""
    m, x = r["machine"], r["parallel"]
    want = x["expected"]
    lines = [f"tinymoe bench --parallel {x['mode']} | {x['ranks']} MPI ranks | device {m['device']} | "
             f"{m['cores']} cores, {m['threads']} BLAS threads per rank | BLAS {m['blas']}",
             f"load average before {r['load_before']}, after {r['load_after']}",
             f"config {r['config']}: {r['describe']}",
             f"micro-batch [{x['micro_batch']}, {x['seq']}] per rank, global batch {x['global_batch']} "
             f"({x['tokens_per_step']:,} tokens per step), optimizer {r['optimizer']}, "
             f"median step of {r['steps']} (warm-up {r['warmup']})", ""]
    head = f"{'rank':>4} | {'step ms':>9} | {'compute ms':>10} {'%':>5} | {'all-to-all ms':>13} {'%':>5} | {'all-reduce ms':>13} {'%':>5}"
    lines += [head, "-" * len(head)]
    for q in x["per_rank"]:
        t = q["step_s"]
        lines.append(f"{q['rank']:>4} | {1e3 * t:>9.2f} | {1e3 * q['compute_s']:>10.2f} {100 * q['compute_s'] / t:>4.0f}% | "
                     f"{1e3 * q['alltoall_s']:>13.2f} {100 * q['alltoall_s'] / t:>4.0f}% | "
                     f"{1e3 * q['allreduce_s']:>13.2f} {100 * q['allreduce_s'] / t:>4.0f}%")
    lines.append(f"tokens/s (global batch / slowest rank's step): {x['tokens_per_s']:,.0f}")
    lines.append("all-to-all and all-reduce: time inside MPI (transfer, host staging, waiting for the "
                 "slowest rank); all-reduce includes the small ones (statistics, clipping norm); "
                 "compute = the rest")
    if x["mode"] == "expert":
        a = x["alltoall_bytes_per_layer"]
        lines.append(f"all-to-all bytes per MoE layer per step (one rank): "
                     + ", ".join(f"{k.replace('_', ' ')} {_h(v, 'B')}" for k, v in a.items())
                     + f"; total {_h(sum(a.values()), 'B')}, a fraction {x['ranks'] - 1}/{x['ranks']} leaves the rank")
        lines.append(f"formula per exchange: n k d bytes padding = {x['micro_batch'] * x['seq']} tokens x k x d x "
                     f"bytes x {want['padding']:.4f} (C = {want['capacity']} per group of {want['group']}) = "
                     f"{_h(want['alltoall_per_layer'], 'B')}: "
                     + ("equal to the counted bytes" if x["alltoall_matches_formula"] else "DIFFERS from the counted bytes"))
        lines.append(f"plus the filled-row mask sent with each dispatch (1 byte per buffer row): "
                     f"{_h(x['mask_bytes_per_layer'], 'B')} per MoE layer per step")
    lines.append(f"gradient all-reduce per step (one rank): {_h(x['allreduce_bytes'], 'B')}; formula "
                 f"{want['replicated_params']:,} replicated parameters x bytes = {_h(want['allreduce'], 'B')}: "
                 + ("equal" if x["allreduce_matches_formula"] else "DIFFERS")
                 + f"; small all-reduces {x['scalars_bytes']} B")
    return "\n".join(lines)
