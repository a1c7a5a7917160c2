"""The study's report: the findings table, ``findings.md``, and the two figures of its own.

:func:`findings_rows` turns the study's sections into rows of one table, finding /
measure / effect / baseline / interval / verdict (the analysis's format,
:func:`tinymoe.analysis.findings_table`, plus a ``unit``): (a) expert removal, (b) MoE
against its dense twins, (c) the routing analysis of the main MoE, (d) the held-out
domain. :func:`format_markdown` writes the page from the JSON-ready study dict only, so
it can be rebuilt from ``findings.json``; :func:`plot_loss_vs_flops` and
:func:`plot_removal` draw from the same dict.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from tinymoe.analysis import verdict
from tinymoe.plotting import agg_figure

__all__ = ["findings_rows", "format_markdown", "plot_loss_vs_flops", "plot_removal",
           "KIND_LABELS", "FAST_NOTE"]

KIND_LABELS = {"moe": "MoE", "dense_active": "dense, equal active params",
               "dense_total": "dense, equal total params", "moe_without": "MoE without a domain"}
FAST_NOTE = ("FAST MODE (--fast): a toy model trained for a few steps on a few thousand "
             "characters with tiny budgets, to test the pipeline. The numbers and verdicts "
             "below are NOT meaningful.")
_ZERO = {"estimate": 0.0, "low": 0.0, "high": 0.0}


def _iv(v: Mapping[str, Any] | None) -> dict[str, float] | None:
    return None if v is None else {k: float(v[k]) if v[k] is not None else float("nan")
                                   for k in ("estimate", "low", "high")}


def _unit(row: Mapping[str, Any]) -> str:
    """Unit of a routing-analysis row: its measures are shares, except a CE (nats)."""
    return "nats" if "CE" in row["measure"] else "%"


def findings_rows(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every row of the study's table; ``unit`` is "nats/byte", "nats" or "%" (a share)."""
    rows: list[dict[str, Any]] = []
    nb = "nats/byte"
    rem = study.get("removal")
    if rem:
        cf = rem["eval_capacity_factor"]
        for dom, r in rem["domains"].items():
            pooled = dom == "all"
            thr = study["scale"]["threshold"]
            base = {"estimate": thr, "low": thr, "high": thr} if pooled else _ZERO
            rows.append({
                "finding": "experts matter (expert removal)",
                "measure": (f"{'all domains pooled' if pooled else dom}: held-out loss at "
                            f"capacity 0 minus at eval cf {cf:g} (every expert assignment "
                            "dropped; same windows)"),
                "effect": _iv(r["diff"]),
                "baseline_name": (f"scale criterion {thr:g}" if pooled else "no cost"),
                "baseline": base, "verdict": verdict(r["diff"], base), "unit": nb,
                "rule": "effect interval above baseline"})
    comp = study.get("comparison")
    if comp:
        moe = comp["moe"]
        for kind in ("dense_active", "dense_total"):
            d = comp[kind]
            p = study["models"][kind]["params"]
            rows.append({
                "finding": "MoE against a dense model",
                "measure": (f"final held-out loss (mean of domains), MoE vs {KIND_LABELS[kind]} "
                            f"(d_ff {p['d_ff']}, {p['total']:,} params); [min, max] over "
                            f"{moe['n']} seed(s)"),
                "effect": _iv(moe), "baseline_name": KIND_LABELS[kind], "baseline": _iv(d),
                "verdict": verdict(moe, d, "less"), "unit": nb,
                "rule": "MoE range entirely below the dense range (lower is better)"})
    for r in (study.get("analysis_rows") or {}).get("main", []):
        rows.append({**r, "unit": _unit(r)})
    held = study.get("held_out")
    if held:
        dom = held["domain"]
        for name, r in held["loss"].items():
            if name == "all":
                continue
            what = "left-out domain" if name == dom else "control, seen by both"
            rows.append({
                "finding": "held-out domain",
                "measure": (f"{name} ({what}): held-out loss, MoE trained without {dom} minus "
                            "the main MoE (same windows)"),
                "effect": _iv(r["diff"]), "baseline_name": "no difference",
                "baseline": _ZERO,
                "verdict": (verdict(r["diff"], _ZERO) if name == dom else
                            bool(verdict(r["diff"], _ZERO) or verdict(r["diff"], _ZERO,
                                                                      "less"))),
                "unit": nb,
                "rule": ("effect interval above 0" if name == dom
                         else "effect interval excludes 0 (either sign)")})
        for r in (study.get("analysis_rows") or {}).get("without", []):
            if "held_out_domain" in r["measure"]:
                rows.append({**r, "finding": "held-out domain: " + r["finding"],
                             "unit": _unit(r)})
    return rows


def _fmt(x: Any, unit: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{100 * x:.1f}%" if unit == "%" else f"{x:.3f}"


def _ci(v: Mapping[str, Any] | None, unit: str) -> str:
    if not v:
        return "-"
    lo, hi = _fmt(v["low"], unit).rstrip("%"), _fmt(v["high"], unit).rstrip("%")
    return f"{_fmt(v['estimate'], unit)} [{lo}, {hi}]"


def _verdict(v: Any) -> str:
    return {True: "PASS", False: "fail"}.get(v, "undecided")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return out


def format_markdown(study: Mapping[str, Any]) -> str:
    """``findings.md`` from the JSON-ready study dict (see :mod:`tinymoe.study.cli`)."""
    L: list[str] = ["# Routing study: findings", ""]
    if study.get("fast"):
        L += [f"**{FAST_NOTE}**", ""]
    scale = study["scale"]
    if scale.get("caveat"):
        L += [f"**{scale['caveat']}**", ""]
    h = study["host"]
    L += [f"Command: `{study['command']}`", "",
          f"Wall time {study['wall_seconds']:.0f} s on {h['cpu']} ({h['cores']} cores), "
          f"{h['threads']} thread(s), load average {h['load_start']} at the start and "
          f"{h['load_end']} at the end; python {h['python']}, numpy {h['numpy']}.", ""]
    s = study["settings"]
    L += [f"Recipe: preset `{s['preset']}`, {s['steps']} updates of {s['batch_size']} x "
          f"{study['seq_len']} tokens, {s['seeds']} seed(s), data "
          f"{s['data'] or 'built-in corpus'}"
          + (f" cut to {s['max_chars']:,} characters per domain" if s["max_chars"] else "")
          + f"; held-out domain of (d): `{s['without']}`.", ""]
    L += ["## Models", ""]
    L += _table(["model", "d_ff", "total params", "active params", "train FLOPs / update",
                 "config"],
                [[KIND_LABELS[k], m["params"]["d_ff"], f"{m['params']['total']:,}",
                  f"{m['params']['active']:,}", f"{m['flops_per_update']:.3g}", m["describe"]]
                 for k, m in study["models"].items() if k != "moe_without"])
    L += ["", "Dense twins: same d_model, layers, heads, vocabulary and sequence length; "
          "every block a dense SwiGLU FFN of width d_ff, chosen so the active (resp. total) "
          "parameter count is the closest a whole d_ff gets to the MoE's. FLOPs: "
          "6 N_active + 12 L T d_attn per token (`tinymoe.bench.measure.model_flops`; the "
          "MoE's experts counted at all k assignments, no capacity drops).", ""]
    L += ["## Findings", "",
          "Each row: an effect against a baseline with an interval: 95% bootstrap "
          "interval over held-out windows (expert removal, held-out domain) or score "
          "units (routing analysis), [min, max] over seeds for the MoE-vs-dense rows. "
          "PASS iff the effect's interval lies entirely on the claimed side of the "
          "baseline's (rule column). Losses in nats/byte, shares in %.", ""]
    L += _table(["finding", "measure", "effect [interval]", "baseline", "baseline [interval]",
                 "verdict", "rule"],
                [[r["finding"], r["measure"], _ci(r["effect"], r["unit"]), r["baseline_name"],
                  _ci(r["baseline"], r["unit"]), _verdict(r["verdict"]), r["rule"]]
                 for r in study["findings"]])
    L += ["", "## Scale criteria", ""]
    for key in ("experts_matter", "beats_dense_active"):
        L.append(f"- {scale['rules'][key]}: **{_verdict(scale[key])}**")
    L += ["", ("Both met: the findings describe a model whose experts matter." if scale["met"]
               else scale["caveat"]), ""]
    L += ["## Final held-out loss per run", ""]
    L += _table(["run", "model", "seed", "this invocation", "final nats/byte (mean)",
                 "per domain"],
                [[r["name"], KIND_LABELS[r["kind"]], r["seed"],
                  f"{r['action']}" + (f" from step {r['from_step']}" if r["action"] == "resumed"
                                      else ""),
                  _fmt(r.get("final_mean"), "nats"),
                  ", ".join(f"{k} {_fmt(v, 'nats')}" for k, v in (r.get("final") or {}).items())]
                 for r in study["runs"]])
    figs = study.get("figures") or {}
    if figs:
        L += ["", "## Figures", ""]
        for name, path in figs.items():
            L += [f"![{name}]({Path(path).name})", ""]
    for key, title in (("main", "Routing analysis of the main MoE (seed 0)"),
                       ("without", f"Routing analysis of the MoE trained without "
                                   f"{s['without']}")):
        text = (study.get("analysis_text") or {}).get(key)
        if text:
            L += ["", f"<details><summary>{title}</summary>", "", "```", text, "```", "",
                  "</details>"]
    L.append("")
    return "\n".join(L)


_COLORS = {"moe": "tab:blue", "dense_active": "tab:orange", "dense_total": "tab:green"}


def plot_loss_vs_flops(runs: Sequence[Mapping[str, Any]], path: str | Path) -> str:
    """Held-out loss (mean of domains, nats/byte) against training FLOPs, one line per run,
    one colour per model kind (the "why MoE" picture). The MoE trained without a domain
    is left out (its mean is over other domains)."""
    fig = agg_figure(7.0, 4.5, dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    seen = set()
    for r in runs:
        c = r.get("curve") or {}
        if r["kind"] not in _COLORS or not c.get("flops"):
            continue
        label = None if r["kind"] in seen else KIND_LABELS[r["kind"]]
        seen.add(r["kind"])
        ax.plot(c["flops"], c["nats_per_byte"], marker="o", ms=3, lw=1.2,
                color=_COLORS[r["kind"]], label=label, alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out loss, nats/byte (mean of domains)")
    ax.set_title("Held-out loss against training compute (one line per seed)")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)


def plot_removal(removal: Mapping[str, Any], path: str | Path,
                 threshold: float | None = None) -> str:
    """The cost of removing every expert (held-out loss at capacity 0 minus at the eval
    capacity factor, same windows) per domain and pooled, with 95% intervals over
    windows; ``threshold``: the scale criterion, drawn as a dashed line."""
    doms = list(removal["domains"])
    diff = [removal["domains"][d]["diff"] for d in doms]
    est = [v["estimate"] for v in diff]
    err = [[e - v["low"] for e, v in zip(est, diff)], [v["high"] - e for e, v in zip(est, diff)]]
    fig = agg_figure(6.5, 4.0, dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(doms)))
    ax.bar(x, est, width=0.6, color=["tab:red"] * (len(doms) - 1) + ["tab:purple"],
           yerr=err, capsize=4)
    ax.axhline(0.0, color="black", lw=0.8)
    if threshold is not None:
        ax.axhline(threshold, color="gray", ls="--", lw=1.0,
                   label=f"scale criterion: {threshold:g} nats/byte")
        ax.legend()
    ax.set_xticks(x)
    ax.set_xticklabels(doms)
    ax.set_ylabel("held-out loss increase, nats/byte")
    ax.set_title(f"Cost of removing every expert (capacity 0 vs eval cf "
                 f"{removal['eval_capacity_factor']:g}), main MoE")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)
