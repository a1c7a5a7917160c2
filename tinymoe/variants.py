"""The routing-variants lab: ``python -m tinymoe compare-routers``.

Trains one model per router variant on the same data, seed and budget (steps, batch,
sequence length, learning-rate schedule), each in its own run folder
``<out>/<variant>/``, then measures every model the same way and writes one report:
``<out>/report.md``, ``<out>/report.json`` and one PNG per analysis with one line per
variant (``<out>/figures/``).

Variants (:data:`VARIANTS`; the maths is in :mod:`tinymoe.routing_variants`):

=================  ====================================================================
``openmoe``        the base preset unchanged: top-2 token choice, Switch aux loss
``expert_choice``  each expert takes its top-C tokens of a group (C = k G / E:
                   ``capacity_mode=k_scaled``, cf 1 at train and eval); no aux loss
``noisy``          noisy top-k gating (trainable noise, renormalised top-k = Shazeer's
                   softmax over the kept logits), with the aux loss
``bias_balanced``  DeepSeek-V3 bias balancing, rate 1e-3, aux loss off
``sigmoid_bias``   DeepSeek-V3's combination: sigmoid scores (gates = the chosen scores
                   normalised to sum 1), bias balancing at rate 1e-3, aux loss off
``fine_grained``   DeepSeekMoE: every expert split in m (``--fine-grained-split``,
                   default 2: mE experts of width f/m, top-mk) and s shared experts of
                   that width (``--shared-experts``, default m: OpenMoE's shared width);
                   ``capacity_mode=k_scaled``, since OpenMoE's C = cf G / E has no k and
                   would give 2k assignments per token the slots of k / 2
``switch``         Switch Transformer: top-1, ``capacity_mode=k_scaled``
=================  ====================================================================

Measures, all on held-out text of every domain:

- held-out loss per domain (nats per byte) at the end of training (the trainer's eval);
- tokens/s of training (from each run's ``log.jsonl``; a shared or busy machine makes it
  noisy: compare within one report only);
- load balance over training: on the trainer's routing snapshots of a fixed probe batch,
  max load / mean load and the coefficient of variation (std / mean) of the experts'
  loads, averaged over MoE layers. Load = assignments the router makes before capacity
  (token choice; this is what balancing controls) or tokens each expert takes (expert
  choice: C per group, balanced by construction);
- dropped share by position in the routing group
  (:func:`tinymoe.analysis.drop_by_position` on :func:`tinymoe.analysis.collect_routing`)
  at the train and at the eval capacity factor; for expert choice the share of tokens
  that got **no** expert, by position;
- the leak (:func:`tinymoe.routing_variants.routing_changed`): share of tokens in the
  first half of a window whose experts change when the second half is replaced.

Resumable: a variant whose run folder holds a checkpoint at ``--steps`` is not trained
again; one that stopped early is resumed. ``--fast``: the toy preset, a few steps, a small
slice of the corpus (seconds; the test suite and lesson 15 use it).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from tinymoe import backend as B
from tinymoe.config import ModelConfig, get_preset, preset_names
from tinymoe.flags import positive_int
from tinymoe.routing_variants import fine_grained, routing_changed

np = B.np

__all__ = ["VARIANTS", "variant_config", "compare_routers", "analysis_summary", "ANALYSIS_BUDGET",
           "add_arguments", "run"]

VARIANTS: dict[str, tuple[str, Callable[[ModelConfig], ModelConfig]]] = {
    "openmoe": ("OpenMoE: top-k token choice, aux loss", lambda c: c),
    "expert_choice": ("expert choice (Zhou et al. 2022), C = k G / E, no aux loss",
                      lambda c: c.replace(router_type="expert_choice", capacity_mode="k_scaled",
                                          capacity_factor=1.0, eval_capacity_factor=1.0,
                                          aux_loss_coef=0.0)),
    "noisy": ("noisy top-k gating (Shazeer et al. 2017), renormalised top-k, aux loss",
              lambda c: c.replace(router_noise=True, renormalize=True)),
    "bias_balanced": ("bias balancing (DeepSeek-V3), rate 1e-3, no aux loss",
                      lambda c: c.replace(router_bias_rate=1e-3, aux_loss_coef=0.0)),
    "sigmoid_bias": ("DeepSeek-V3's router: sigmoid scores normalised over the top-k, bias "
                     "balancing at rate 1e-3, no aux loss",
                     lambda c: c.replace(router_score="sigmoid", renormalize=True,
                                         router_bias_rate=1e-3, aux_loss_coef=0.0)),
    "fine_grained": ("fine-grained: experts split m ways + s shared experts (DeepSeekMoE), "
                     "k-scaled capacity",
                     lambda c: fine_grained(c, 2, shared_experts=2).replace(capacity_mode="k_scaled")),
    "switch": ("Switch: top-1, k-scaled capacity",
               lambda c: c.replace(top_k=1, capacity_mode="k_scaled")),
}


def variant_config(name: str, base: ModelConfig, split: int = 2,
                   shared_experts: int | None = None) -> ModelConfig:
    """The model config of variant ``name`` built on ``base``; one-line ValueError if unknown.

    ``split`` (m) and ``shared_experts`` (s; None: s = m, which keeps OpenMoE's shared FFN
    width) are used by ``fine_grained`` only (:func:`tinymoe.routing_variants.fine_grained`).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown router variant {name!r}: choose from {', '.join(VARIANTS)}")
    if name == "fine_grained":
        s = split if shared_experts is None else shared_experts
        return fine_grained(base, split, shared_experts=s).replace(capacity_mode="k_scaled")
    return VARIANTS[name][1](base)


# ---------------------------------------------------------------------------- measures
def _load_over_training(folder: Path, n_experts: int, expert_choice: bool) -> dict[str, list[float]]:
    """max/mean load and CV per routing snapshot (mean over MoE layers)."""
    steps, max_mean, cv = [], [], []
    for p in sorted((folder / "snapshots").glob("step_*.npz"),
                    key=lambda p: int(p.stem.split("_")[1])):
        with np.load(p) as z:
            idx, kept, step = z["expert_index"].astype(np.int64), z["kept"], int(z["step"])
        ratios, cvs = [], []
        for layer in range(idx.shape[0]):
            e = idx[layer].reshape(-1, idx.shape[-1])                      # [N, k]
            chosen = e[kept[layer].reshape(e.shape)] if expert_choice else e.reshape(-1)
            load = np.bincount(chosen, minlength=n_experts).astype(np.float64)  # [E]
            ratios.append(float(load.max() / load.mean()))
            cvs.append(float(load.std() / load.mean()))
        steps.append(step)
        max_mean.append(float(np.mean(ratios)))
        cv.append(float(np.mean(cvs)))
    return {"step": steps, "max_over_mean": max_mean, "cv": cv}


def _drops(model: Any, windows: Any, domain: Any, names: list[str], cf: float | None,
           n_bins: int) -> dict[str, Any]:
    """Dropped share by position at capacity factor ``cf`` (expert choice: no-expert share)."""
    from tinymoe.analysis import collect_routing, drop_by_position  # noqa: PLC0415

    trace = collect_routing(model, windows, domain, domain_names=names, eval_capacity_factor=cf)
    if model.cfg.router_type == "expert_choice":
        kept = np.stack([k.any(axis=1) for k in trace.kept], axis=1)        # [N, L]: got an expert
    else:
        kept = trace.all_kept()                                           # [N, L k]
    out = drop_by_position(kept, trace.group_pos, trace.group_len, n_bins=n_bins)
    out["what"] = ("tokens with no expert" if model.cfg.router_type == "expert_choice"
                   else "dropped assignments")
    return out


def _tokens_per_s(folder: Path) -> float:
    """Mean training tokens/s over the train events of ``log.jsonl`` (NaN if none)."""
    rates = []
    log = folder / "log.jsonl"
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            ev = json.loads(line)
            if ev.get("event") == "train" and "tokens_per_s" in ev:
                rates.append(float(ev["tokens_per_s"]))
    return float(np.mean(rates)) if rates else float("nan")


# ---------------------------------------------------------------------------- the lab
def _train_variant(cfg: ModelConfig, tc: Any, threads: int | None = None) -> tuple[str, str]:
    """Train (or resume, or reuse) one variant's run in ``tc.out_dir``; returns (status,
    error message): status "reused" (finished before), "trained", "resumed" or "error".
    ``threads``: set in a worker process of :func:`compare_routers`'s ``jobs``."""
    from tinymoe.checkpoint import load_checkpoint  # noqa: PLC0415
    from tinymoe.train import train  # noqa: PLC0415

    if threads is not None:
        B.keep_freed_memory()
        B.set_num_threads(threads)
    ckpt_path = Path(tc.out_dir) / "checkpoint.npz"
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if ckpt is not None and ckpt.step >= tc.steps:
        return "reused", ""
    res = train(None if ckpt is not None else cfg,
                tc.replace(resume=str(ckpt_path) if ckpt is not None else None), progress=False)
    if res.status != "done":
        return "error", res.message
    return ("trained" if ckpt is None else "resumed"), ""


def _train_all(todo: dict[str, tuple[ModelConfig, Any]], jobs: int,
               threads: int) -> dict[str, tuple[str, str]]:
    """Train the variants ``todo`` (name -> (config, train config)) ``jobs`` at a time in
    spawned worker processes of ``threads`` threads each; name -> (status, message)."""
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

    with ProcessPoolExecutor(max_workers=jobs,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_train_variant, cfg, tc, threads)
                   for name, (cfg, tc) in todo.items()}
        return {name: f.result() for name, f in futures.items()}


# budgets of the routing analysis run on every variant (those of the routing study)
ANALYSIS_BUDGET = dict(max_tokens=16384, drop_tokens=8192, init_tokens=8192, batch_size=16,
                       n_boot=1000, n_splits=50)
FAST_ANALYSIS_BUDGET = dict(max_tokens=384, drop_tokens=192, init_tokens=192, batch_size=4,
                            n_boot=50, n_splits=4)


def _rows(rep: dict[str, Any], finding: str, baseline: str = "", *words: str) -> list[dict[str, Any]]:
    """The findings rows of an analysis report for ``finding`` whose baseline name starts
    with ``baseline`` and whose measure contains every one of ``words``."""
    return [r for r in rep["findings"] if r["finding"] == finding
            and r["baseline_name"].startswith(baseline) and all(w in r["measure"] for w in words)]


def analysis_summary(rep: dict[str, Any]) -> dict[str, Any]:
    """What the lab reports of :func:`tinymoe.analysis.analyze` on one variant: the
    specialization, early-routing and drop-towards-the-end rows (each an effect against
    its baseline with intervals and a verdict, as in the routing study) and their counts
    over MoE blocks, plus the early-routing curve (per-token agreement with the final
    routing, mean over blocks, against the fraction of training)."""
    spec = _rows(rep, "context-independent specialization", "shuffled")
    pos = _rows(rep, "context-independent specialization", "position")
    adds = _rows(rep, "what training adds to specialization")
    early = _rows(rep, "early routing learning", "ceiling")
    drops = {f"{cf}_{which}": _rows(rep, "drop-towards-the-end", "random",
                                    "in_distribution", f"({cf})", f"{which} choices")
             for cf in ("train", "eval") for which in ("all", "first")}
    er = rep.get("early_routing", {})
    curve = None
    if er.get("available") and er.get("layers"):
        n = len(er["steps"])
        curve = {"fraction": [s / max(er["final_step"], 1) for s in er["steps"]],
                 "tokens": [float(np.mean([lay["tokens"][i] for lay in er["layers"]])) for i in range(n)]}
    mean = lambda rows, key: float(np.mean([r[key]["estimate"] for r in rows])) if rows else None  # noqa: E731
    return {
        "specialization": {"id_accuracy": mean(spec, "effect"), "shuffled": mean(spec, "baseline"),
                           "position": mean(pos, "baseline"), "blocks": len(spec),
                           "blocks_pass": sum(a["verdict"] and b["verdict"] for a, b in zip(spec, pos)),
                           "per_block": [r["effect"]["estimate"] for r in spec],
                           "per_block_shuffled": [r["baseline"]["estimate"] for r in spec]},
        "training_adds": {"blocks": len(adds), "blocks_pass": sum(bool(r["verdict"]) for r in adds)},
        "early_routing": {"agreement": mean(early, "effect"), "blocks": len(early),
                          "reproduced": sum(r["verdict"] is True for r in early),
                          "not_reproduced": sum(r["verdict"] is False for r in early),
                          "measure": early[0]["measure"] if early else None, "curve": curve},
        "drops": {k: (v[0] if v else None) for k, v in drops.items()},
        "findings": rep["findings"]}


def compare_routers(routers: Sequence[str], *, base: ModelConfig, train_cfg: Any, out: str | Path,
                    n_windows: int = 16, n_bins: int = 8, progress: bool = True, split: int = 2,
                    shared_experts: int | None = None, jobs: int = 1,
                    analysis_budget: dict[str, int] | None = None) -> dict[str, Any]:
    """Train (or reuse) one run per variant and measure them; returns the report dict and
    writes ``report.json``, ``report.md`` and ``figures/*.png`` under ``out``.

    ``train_cfg`` is a :class:`tinymoe.train.TrainConfig`; its ``out_dir`` is replaced by
    ``<out>/<variant>`` and everything else is shared by all variants. ``split`` and
    ``shared_experts``: the fine-grained variant's m and s (:func:`variant_config`).
    ``jobs > 1``: the runs are trained that many at a time in worker processes, the
    threads of this process split between them (the same weights as one at a time); the
    measures then run here. Every variant also gets the routing study's analysis
    (:func:`tinymoe.analysis.analyze` with its snapshots and an untrained control, budgets
    ``analysis_budget``, default :data:`ANALYSIS_BUDGET`), summarised by
    :func:`analysis_summary`.
    """
    from tinymoe.analysis import analyze, load_snapshots  # noqa: PLC0415
    from tinymoe.nn.model import OpenMoE  # noqa: PLC0415

    budget = dict(ANALYSIS_BUDGET if analysis_budget is None else analysis_budget)
    from tinymoe.analysis import token_windows  # noqa: PLC0415
    from tinymoe.checkpoint import load_checkpoint, load_model  # noqa: PLC0415
    from tinymoe.data import encode_corpus  # noqa: PLC0415
    from tinymoe.session import load_data  # noqa: PLC0415

    routers = list(dict.fromkeys(routers))
    cfgs = {name: variant_config(name, base, split, shared_experts)
            for name in routers}                                         # all errors before training
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"routers": routers, "steps": train_cfg.steps, "seed": train_cfg.seed,
                              "base": base.to_dict(), "variants": {}}
    corpus = load_data(train_cfg)
    todo = {name: (cfgs[name], train_cfg.replace(out_dir=str(out / name))) for name in routers}
    done: dict[str, tuple[str, str]] = {}
    if jobs > 1:
        threads = max(1, B.get_num_threads() // jobs)
        if progress:
            print(f"compare-routers: training {', '.join(routers)}: {jobs} at a time, "
                  f"{threads} thread(s) each", flush=True)
        done = _train_all(todo, jobs, threads)
    for name in routers:
        folder = out / name
        ckpt_path = folder / "checkpoint.npz"
        if name not in done and progress:
            print(f"compare-routers: {name} ({VARIANTS[name][0]})", flush=True)
        status, message = done.get(name) or _train_variant(*todo[name])
        if status == "error":
            raise ValueError(f"compare-routers: {name}: {message}")
        model, tokenizer, cfg = load_model(ckpt_path)
        extra = load_checkpoint(ckpt_path).extra
        _, val = encode_corpus(corpus, tokenizer)
        names = list(val)
        seq = train_cfg.seq_len or cfg.max_seq_len
        per = [token_windows(val[d], seq, max(n_windows // len(names), 1)) for d in names]
        windows = np.concatenate(per)                                    # [n, T+1]
        domain = np.concatenate([np.full(len(w), i) for i, w in enumerate(per)])
        leak = routing_changed(model, windows[:, :-1], seq // 2, seed=train_cfg.seed)
        report["variants"][name] = {
            "description": VARIANTS[name][0], "status": status, "model_config": cfg.to_dict(),
            "held_out": extra.get("last_eval"), "tokens_per_s": _tokens_per_s(folder),
            "load": _load_over_training(folder, cfg.n_experts, cfg.router_type == "expert_choice"),
            "drops_train_cf": _drops(model, windows, domain, names, cfg.capacity_factor, n_bins),
            "drops_eval_cf": _drops(model, windows, domain, names, cfg.eval_capacity_factor, n_bins),
            "leak": leak}
        if progress:
            print(f"compare-routers: routing analysis of {name}", flush=True)
        rep = analyze(model, tokenizer, corpus, snapshots=load_snapshots(folder / "snapshots"),
                      init_model=OpenMoE(cfg.replace(), seed=1).eval(), seq_len=seq, **budget)
        report["variants"][name]["analysis"] = analysis_summary(rep)
    _write(report, out)
    return report


# ---------------------------------------------------------------------------- outputs
def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (the numbers of report.json, rounded)."""
    rows = report["variants"]
    domains = [d for d in next(iter(rows.values()))["held_out"] if d != "mean"]
    lines = [f"# compare-routers: {len(rows)} variants, {report['steps']} steps, seed {report['seed']}", "",
             "## held-out loss (nats per byte) and throughput", "",
             "| variant | " + " | ".join(domains) + " | mean | tokens/s |",
             "|---" * (len(domains) + 3) + "|"]
    for name, r in rows.items():
        ho = r["held_out"]
        lines.append(f"| {name} | " + " | ".join(_fmt(ho[d]["nats_per_byte"]) for d in domains)
                     + f" | {_fmt(ho['mean']['nats_per_byte'])} | {_fmt(r['tokens_per_s'], ',.0f')} |")
    lines += ["", "## load balance over training (probe batch; mean over MoE layers)", "",
              "| variant | max/mean load first | max/mean load last | CV first | CV last |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        ld = r["load"]
        if ld["step"]:
            lines.append(f"| {name} | {_fmt(ld['max_over_mean'][0])} | {_fmt(ld['max_over_mean'][-1])} | "
                         f"{_fmt(ld['cv'][0])} | {_fmt(ld['cv'][-1])} |")
    lines += ["", "## dropped share (expert choice: tokens with no expert)", "",
              "| variant | train cf overall | train cf last bin | eval cf overall | eval cf last bin | leak |",
              "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        a, b = r["drops_train_cf"], r["drops_eval_cf"]
        lines.append(f"| {name} | {_fmt(a['overall'])} | {_fmt(a['drop_rate'][-1])} | {_fmt(b['overall'])} | "
                     f"{_fmt(b['drop_rate'][-1])} | {_fmt(r['leak']['changed'])} |")
    lines += ["", "leak = share of (token, MoE layer) pairs in the first half of a window whose experts "
              "change when only the second half of the window is replaced.", ""]
    if all("analysis" in r for r in rows.values()):
        lines += ["## the routing study's analyses on each variant (`tinymoe.analysis.analyze`, one seed)", "",
                  "| variant | token-id predictor, mean over blocks (shuffled labels) | blocks above "
                  "both baselines | blocks where training adds id skill | early routing: per-token "
                  "agreement with the final routing (mean over blocks) | blocks reproduced / not | "
                  "drop gap last - first quarter, train cf [interval] (random) | same, eval cf |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            a = r["analysis"]
            sp, er, dr = a["specialization"], a["early_routing"], a["drops"]

            def gap(row: dict[str, Any] | None) -> str:
                if row is None:
                    return "n/a"
                e = row["effect"]
                return (f"{100 * e['estimate']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}] "
                        f"({100 * row['baseline']['estimate']:.1f}%) {'PASS' if row['verdict'] else 'fail'}")

            pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            lines.append(f"| {name} | {pct(sp['id_accuracy'])} ({pct(sp['shuffled'])}) | "
                         f"{sp['blocks_pass']} of {sp['blocks']} | {a['training_adds']['blocks_pass']} of "
                         f"{a['training_adds']['blocks']} | {pct(er['agreement'])} | "
                         f"{er['reproduced']} / {er['not_reproduced']} of {er['blocks']} | "
                         f"{gap(dr['train_all'])} | {gap(dr['eval_all'])} |")
        first = next(iter(rows.values()))["analysis"]["early_routing"]["measure"]
        lines += ["", "Each cell is an effect against its baseline with a 95% bootstrap interval and the "
                  "routing study's verdict rule (docs/findings.md); early routing is judged at the first "
                  f"snapshot at or after 25% of training ({first}); drop gaps are in-distribution, all "
                  "choices, against balanced random routing at the same shape and capacity. One seed per "
                  "variant: differences between variants smaller than the spread over seeds of one "
                  "variant are not differences.", ""]
    return "\n".join(lines)


def _write(report: dict[str, Any], out: Path) -> None:
    from tinymoe.jsonio import json_ready  # noqa: PLC0415

    figs = _plot(report, out / "figures")
    report["figures"] = figs
    (out / "report.json").write_text(json.dumps(json_ready(report), indent=1, allow_nan=False),
                                     encoding="utf-8")
    (out / "report.md").write_text(format_markdown(report) + "\n"
                                   + "\n".join(f"![{Path(f).stem}](figures/{Path(f).name})" for f in figs) + "\n",
                                   encoding="utf-8")


def _plot(report: dict[str, Any], folder: Path) -> list[str]:
    """One PNG per analysis, one line per variant."""
    from tinymoe.plotting import agg_figure  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    rows = report["variants"]
    paths = []

    def save(fig: Any, name: str) -> None:
        path = folder / name
        fig.savefig(path, format="png")
        paths.append(str(path))

    fig = agg_figure(6, 3.5, dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for name, r in rows.items():
        doms = [d for d in r["held_out"] if d != "mean"]
        ax.plot(doms, [r["held_out"][d]["nats_per_byte"] for d in doms], marker="o", label=name)
    ax.set_ylabel("held-out nats per byte")
    ax.set_title("held-out loss per domain")
    ax.legend(fontsize=8)
    save(fig, "held_out_loss.png")

    fig = agg_figure(9, 3.5, dpi=110, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for name, r in rows.items():
        ax1.plot(r["load"]["step"], r["load"]["max_over_mean"], marker=".", label=name)
        ax2.plot(r["load"]["step"], r["load"]["cv"], marker=".", label=name)
    ax1.set_xlabel("step"), ax1.set_ylabel("max load / mean load"), ax1.set_title("load balance")
    ax2.set_xlabel("step"), ax2.set_ylabel("CV of expert load"), ax2.set_title("load spread")
    ax1.legend(fontsize=8)
    save(fig, "load_balance.png")

    for key, title in (("drops_train_cf", "train capacity factor"), ("drops_eval_cf", "eval capacity factor")):
        fig = agg_figure(6, 3.5, dpi=110, layout="constrained")
        ax = fig.add_subplot()
        for name, r in rows.items():
            d = r[key]
            mid = [(s + e - 1) / 2 for s, e in zip(d["bin_start"], d["bin_end"])]
            ax.plot(mid, d["drop_rate"], marker="o", label=name)
        ax.set_xlabel("position in routing group")
        ax.set_ylabel("dropped share (EC: no expert)")
        ax.set_title(f"drops by position, {title}")
        ax.legend(fontsize=8)
        save(fig, f"{key}.png")

    if all("analysis" in r for r in rows.values()):
        fig = agg_figure(10, 3.5, dpi=110, layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        for i, (name, r) in enumerate(rows.items()):
            a = r["analysis"]
            color = f"C{i % 10}"
            sp = a["specialization"]
            ax1.plot(range(len(sp["per_block"])), sp["per_block"], marker="o", color=color, label=name)
            ax1.plot(range(len(sp["per_block"])), sp["per_block_shuffled"], ls=":", color=color)
            curve = a["early_routing"]["curve"]
            if curve:
                ax2.plot(curve["fraction"], curve["tokens"], marker=".", color=color, label=name)
        ax1.set_xlabel("MoE block (index among MoE blocks)")
        ax1.set_ylabel("top-1 expert predicted from token id")
        ax1.set_title("specialization (dotted: shuffled labels)")
        ax2.set_xlabel("fraction of training")
        ax2.set_ylabel("per-token agreement with final routing")
        ax2.set_title("early routing (mean over MoE blocks)")
        ax1.legend(fontsize=7)
        save(fig, "analysis.png")

    fig = agg_figure(6, 3.0, dpi=110, layout="constrained")
    ax = fig.add_subplot()
    names = list(rows)
    ax.plot(names, [rows[n]["leak"]["changed"] for n in names], marker="o")
    ax.set_ylabel("share of early tokens re-routed")
    ax.set_title("routing leak: later tokens changed")
    save(fig, "leak.png")
    return paths


# ---------------------------------------------------------------------------- CLI
def _routers(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown router variant(s) {', '.join(bad) or '(none)'}: "
                                         f"choose from {', '.join(VARIANTS)}")
    return names




def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``python -m tinymoe compare-routers``."""
    p.add_argument("--routers", type=_routers, default=list(VARIANTS),
                   help=f"comma-separated variants; choices: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--config", default="mini", choices=preset_names(),
                   help="base preset every variant is built on (default: mini)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer updates per variant (default: 300; with --fast: 6)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per update (default: 16)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order, routing noise (default: 0)")
    p.add_argument("--data", default=None, help="text file or folder (default: the built-in corpus)")
    p.add_argument("--max-chars", type=positive_int, default=None,
                   help="cut each domain's train text to this many characters")
    p.add_argument("--out", default="runs/compare-routers",
                   help="folder: one run folder per variant, report.md/json, figures/ (default: runs/compare-routers)")
    p.add_argument("--fast", action="store_true",
                   help="seconds: toy preset, 6 steps (or --steps), batch 4 x 32 tokens, 6000 "
                        "characters per domain, a snapshot every 2 steps")
    p.add_argument("--fine-grained-split", type=positive_int, default=2, metavar="M",
                   help="fine_grained: split every expert into M of 1/M the width, top-k times M (default: 2)")
    p.add_argument("--shared-experts", type=int, default=None, metavar="S",
                   help="fine_grained: S always-on shared experts of the small width (default: M, "
                        "the width of OpenMoE's shared FFN; 0: none)")
    p.add_argument("--threads", type=positive_int, default=None, help="BLAS/kernel threads")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="variants trained at once, each in its own process with --threads / N "
                        "threads (default: 1); the measures run after, in this process")


def run(args: argparse.Namespace) -> int:
    """Train and compare; prints where the report went."""
    from tinymoe.train import TrainConfig  # noqa: PLC0415

    if args.fast:
        base = get_preset("toy")
        tc = TrainConfig(steps=args.steps or 6, batch_size=4, seq_len=32, warmup=1, eval_every=0, eval_batches=2,
                         save_every=0, log_every=1, snapshot_every=2, seed=args.seed, max_chars=6000,
                         data=args.data, out_dir=str(args.out))
    else:
        base = get_preset(args.config)
        steps = args.steps or 300
        tc = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         warmup=min(60, max(steps // 10, 1)), eval_every=0, save_every=0,
                         log_every=max(steps // 30, 1), snapshot_every=max(steps // 10, 1),
                         seed=args.seed, data=args.data, max_chars=args.max_chars, out_dir=str(args.out))
    report = compare_routers(args.routers, base=base, train_cfg=tc, out=args.out,
                             split=args.fine_grained_split, shared_experts=args.shared_experts,
                             jobs=args.jobs,
                             analysis_budget=FAST_ANALYSIS_BUDGET if args.fast else None)
    print(format_markdown(report))
    print(f"report: {Path(args.out) / 'report.md'} (+ report.json, figures/)")
    return 0
