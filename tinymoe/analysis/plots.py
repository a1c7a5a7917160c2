"""Figures of a routing-analysis report: one PNG per finding.

Each function takes a section of the JSON-ready report built by :mod:`.report`
(``report["specialization"]``, ``["early_routing"]``, ``["drops"]``), so a figure can be
redrawn from a saved ``analysis.json``; it runs no model and computes no measure. Drawn
with matplotlib's object API on an Agg canvas (:func:`tinymoe.plotting.agg_figure`: no
pyplot, no global state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tinymoe import backend as B
from tinymoe.plotting import agg_figure

np = B.np

__all__ = ["plot_specialization", "plot_domain_share", "plot_early_routing",
           "plot_drop_vs_position", "plot_report"]


def _figure(width: float, height: float) -> Any:
    """A figure in the analysis style: 110 dpi, constrained layout."""
    return agg_figure(width, height, dpi=110, layout="constrained")


def _save(fig: Any, path: str | Path) -> str:
    """Write ``fig`` as a PNG (making the folder); returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)


def plot_specialization(spec: Mapping[str, Any], path: str | Path) -> str:
    """Two panels per report: predictor accuracies per layer (token id, position, majority
    class, chance) and the paper's std measure for token ids and positions against their
    shuffled baselines and the maximum. ``spec`` is ``report["specialization"]``."""
    layers = spec["layers"]
    names = [f"block {L['layer']}" for L in layers]
    x = np.arange(len(layers))
    fig = _figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    bars = [("token id predictor", "token_id", "tab:blue"),
            ("position predictor", "position", "tab:orange"),
            ("majority class", "majority_class", "tab:gray")]
    init_bars = ([("token id predictor, untrained model", "token_id", "tab:blue"),
                  ("majority class, untrained model", "majority_class", "tab:gray")]
                 if all("init" in L for L in layers) else [])
    stats = all("statistics" in L for L in layers)
    if stats:            # the interval statistics: token id, position, shuffled labels
        bars = [("token id predictor", "token_id", "tab:blue"),
                ("position predictor", "position", "tab:orange"),
                ("token id, shuffled labels (baseline)", "shuffled", "tab:gray")]
    n_bars = len(bars) + len(init_bars)
    w = 0.8 / n_bars
    for j, (label, key, color) in enumerate(bars):
        if stats:
            iv = [L["statistics"][key] for L in layers]
            vals = [100 * v["estimate"] for v in iv]
            err = [[100 * (v["estimate"] - v["low"]) for v in iv],
                   [100 * (v["high"] - v["estimate"]) for v in iv]]
            ax1.bar(x + (j - (n_bars - 1) / 2) * w, vals, w, label=label + " (95% CI)",
                    color=color, yerr=err, capsize=3)
            continue
        vals = [100 * L["predictors"][key] for L in layers]
        ax1.bar(x + (j - (n_bars - 1) / 2) * w, vals, w, label=label, color=color)
    init_stats = stats and all("statistics" in L.get("init", {}) for L in layers)
    if init_bars and init_stats:
        init_bars = [("token id predictor, untrained model", "token_id", "tab:blue"),
                     ("shuffled labels, untrained model", "shuffled", "tab:gray")]
    for j, (label, key, color) in enumerate(init_bars, start=len(bars)):
        if init_stats:
            iv = [L["init"]["statistics"][key] for L in layers]
            ax1.bar(x + (j - (n_bars - 1) / 2) * w, [100 * v["estimate"] for v in iv], w,
                    label=label + " (95% CI)", color=color, alpha=0.4, hatch="..",
                    edgecolor="k", lw=0.3,
                    yerr=[[100 * (v["estimate"] - v["low"]) for v in iv],
                          [100 * (v["high"] - v["estimate"]) for v in iv]], capsize=3)
            continue
        vals = [100 * L["init"]["predictors"][key] for L in layers]
        ax1.bar(x + (j - (n_bars - 1) / 2) * w, vals, w, label=label, color=color, alpha=0.4,
                hatch="..", edgecolor="k", lw=0.3)
    ax1.axhline(100 * layers[0]["predictors"]["chance"], color="k", ls="--", lw=1,
                label="chance 1/E")
    ax1.set_xticks(x, names)
    ax1.set_ylabel("top-1 expert predicted correctly (%)")
    ax1.set_ylim(0, 125)
    ax1.set_yticks(range(0, 101, 20))
    ax1.set_title("How well does one feature predict the expert?\n(fit on half the held-out "
                  "windows, scored on the other half)")
    ax1.legend(fontsize=8, loc="upper right")
    bars2 = [("token ids", "token_id", "tab:blue", ""),
             ("token ids, shuffled", "token_id_shuffled", "tab:blue", "//"),
             ("positions", "position", "tab:orange", ""),
             ("positions, shuffled", "position_shuffled", "tab:orange", "//")]
    w = 0.8 / len(bars2)
    for j, (label, key, color, hatch) in enumerate(bars2):
        vals = [L["std"][key]["mean_std"] for L in layers]
        ax2.bar(x + (j - 1.5) * w, vals, w, label=label, color=color, hatch=hatch,
                alpha=0.5 if hatch else 1.0, edgecolor="k", lw=0.3)
    ax2.axhline(layers[0]["std"]["token_id"]["max_std"], color="k", ls="--", lw=1,
                label="maximum (always one expert)")
    ax2.set_ylim(0, layers[0]["std"]["token_id"]["max_std"] * 1.45)
    ax2.set_xticks(x, names)
    ax2.set_ylabel("std across experts of the routing distribution")
    ax2.set_title(f"Paper's measure: mean over ids seen >= {spec['min_count']} times\n"
                  "(higher = more specialised; shuffled = no specialization)")
    ax2.legend(fontsize=8, loc="upper right")
    fig.suptitle("Context-independent specialization: routing follows the token id")
    return _save(fig, path)


def plot_domain_share(spec: Mapping[str, Any], path: str | Path) -> str:
    """Grouped bars per MoE layer: share of each expert in each domain's assignments."""
    layers = spec["layers"]
    domains = spec["domains"]
    fig = _figure(max(6.0, 1.0 + 0.6 * spec["n_experts"]) * 1.0, 2.8 * len(layers) + 0.6)
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    x = np.arange(spec["n_experts"])
    w = 0.8 / max(len(domains), 1)
    for ax, L in zip(axes, layers):
        top = 0.0
        for j, d in enumerate(domains):
            vals = [100 * v for v in L["domain_share"][j]]
            top = max([top] + [v for v in vals if v == v])
            label = d + (" (not in training)" if d in spec.get("excluded", ()) else "")
            ax.bar(x + (j - (len(domains) - 1) / 2) * w, vals, w, label=label)
        ax.set_ylim(0, max(top, 100 / spec["n_experts"]) * 1.35)
        ax.axhline(100 / spec["n_experts"], color="k", ls="--", lw=1, label="uniform 1/E")
        ax.set_xticks(x, [str(e) for e in x])
        ax.set_xlabel("expert")
        ax.set_ylabel("share of assignments (%)")
        ax.set_title(f"block {L['layer']}: which experts each domain uses (all top-"
                     f"{spec['top_k']} choices)")
        ax.legend(fontsize=8, ncol=len(domains) + 1, loc="upper right")
    fig.suptitle("Expert share by domain (held-out text)")
    return _save(fig, path)


def plot_early_routing(early: Mapping[str, Any], path: str | Path) -> str:
    """Agreement with the final routing against the training step, per layer: per token
    (with its 95% interval band; ceiling 100%) and occurrence-weighted majority agreement
    on split halves of the probe, with its ceiling (final against itself) as a dotted
    line; the train loss on a second axis when the report has it."""
    fig = _figure(8.5, 4.8)
    ax = fig.subplots()
    steps = np.asarray(early["steps"], dtype=float)
    for j, L in enumerate(early["layers"]):
        color = f"C{j}"
        if "tokens_interval" in L:
            iv = L["tokens_interval"]
            ax.fill_between(steps, [100 * v["low"] for v in iv], [100 * v["high"] for v in iv],
                            color=color, alpha=0.2, lw=0)
            ax.plot(steps, [100 * v["estimate"] for v in iv], "-o", color=color, ms=3,
                    label=f"block {L['layer']}: per token (ceiling 100%)")
        else:
            ax.plot(steps, [100 * v for v in L["tokens"]], "-o", color=color, ms=3,
                    label=f"block {L['layer']}: per token")
        if "split_half" in L:
            ax.plot(steps, [100 * v["estimate"] for v in L["split_half"]["occurrences"]], "--",
                    color=color, label=f"block {L['layer']}: occurrence-weighted majority "
                                       "(split halves)")
            ax.axhline(100 * L["ceiling"]["occurrences"]["estimate"], color=color, ls=":",
                       lw=1, label=f"block {L['layer']}: its ceiling (final vs itself)")
        else:
            ax.plot(steps, [100 * v for v in L["occurrences"]], "--", color=color,
                    label=f"block {L['layer']}: occurrence-weighted majority")
    ax.axhline(100 * early["chance"], color="k", ls=":", lw=1, label="chance 1/E")
    ax.set_xlabel(f"training step (final snapshot: {early['final_step']})")
    ax.set_ylabel("same expert as at the final step (%)")
    ax.set_ylim(0, 102)
    if early.get("loss_curve"):
        ax2 = ax.twinx()
        ax2.plot(early["loss_curve"]["step"], early["loss_curve"]["ce"], color="0.6", lw=1)
        ax2.set_ylabel("train cross-entropy (grey)", color="0.4")
    ax.set_title("Early routing learning: agreement with the final routing, against its "
                 "ceiling", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


_STYLE = {"train_cf": ("tab:red", "-"), "eval_cf": ("tab:blue", "-"),
          "probability": ("tab:green", "-"), "larger_cf": ("tab:purple", "-"),
          "dropless": ("k", ":"), "compare_train_cf": ("tab:red", "--"),
          "compare_eval_cf": ("tab:blue", "--"), "paper_group": ("tab:cyan", "-")}


def plot_drop_vs_position(drops: Mapping[str, Any], path: str | Path) -> str:
    """One panel per data set, one line per routing setting: dropped share of expert
    assignments (all MoE layers) against the position in the routing group (as a fraction
    of the group, so runs with other group sizes share the axis); dotted: the drops that
    balanced random routing is expected to have at the same capacity (load fluctuation
    alone, :func:`.baselines.expected_drop_by_position`)."""
    datasets = [d for d in drops["datasets"] if not d.get("skipped")]
    fig = _figure(5.0 * max(len(datasets), 1) + 0.5, 5.2)
    axes = fig.subplots(1, max(len(datasets), 1), squeeze=False)[0]
    top = 1.0
    for ax, ds in zip(axes, datasets):
        for c in drops["curves"]:
            if c["dataset"] != ds["name"]:
                continue
            color, ls = _STYLE.get(c["setting"], (None, "-"))
            g = c.get("group_len", drops["n_positions"])
            mid = [(a + b) / 2 / g for a, b in zip(c["bin_start"], c["bin_end"])]
            rate = [100 * v for v in c["drop_rate"]]
            top = max(top, max((v for v in rate if v == v), default=0.0))
            ax.plot(mid, rate, ls, color=color, marker=".", label=c["label"])
            exp = c.get("baseline", {}).get("expected")
            if exp and c["setting"] in ("train_cf", "eval_cf", "paper_group"):
                curve = exp["curve"]                                       # [G]
                ax.plot((np.arange(len(curve)) + 0.5) / len(curve), [100 * v for v in curve],
                        ":", color=color, lw=1.5,
                        label=f"random routing, expected ({c['label']})")
        ax.set_title(f"{ds['title']}\n({ds['n_tokens']:,} tokens)", fontsize=10)
        ax.set_xlabel("position in the routing group (fraction of the group)")
        ax.set_ylabel("dropped expert assignments (%)")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylim(-0.02 * top, top * 1.08)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside lower center",
               ncol=min(len(labels), 2))
    fig.suptitle("Drop-towards-the-end: where in a group tokens lose their experts (all MoE "
                 f"layers; groups of {drops['n_positions']} tokens unless labelled)\n"
                 "dotted: expected drops of balanced random routing at the same capacity")
    return _save(fig, path)


def plot_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Every figure of an :func:`~tinymoe.analysis.report.analyze` report, as PNGs in
    ``out_dir``: {name: path} for specialization, domain_share, early_routing (when the run
    had snapshots) and drop_vs_position."""
    out_dir = Path(out_dir)
    figures = {"specialization": plot_specialization(report["specialization"],
                                                     out_dir / "specialization.png"),
               "domain_share": plot_domain_share(report["specialization"],
                                                 out_dir / "domain_share.png")}
    if report["early_routing"].get("available"):
        figures["early_routing"] = plot_early_routing(report["early_routing"],
                                                      out_dir / "early_routing.png")
    figures["drop_vs_position"] = plot_drop_vs_position(report["drops"],
                                                        out_dir / "drop_vs_position.png")
    return figures
