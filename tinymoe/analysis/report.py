"""The report: all three findings of one model as one JSON-ready dict.

:func:`analyze` is the whole analysis of a checkpoint's model on a corpus's held-out text:
it cuts the text into windows, routes them (:mod:`.collect`) under each routing setting,
applies the measures (:mod:`.measures`) and returns nested dicts and lists of plain
numbers and strings: the content of ``analysis.json``. :func:`specialization_report`,
:func:`early_routing_report` and :func:`drop_report` build its sections 1-3, each with
the baselines and bootstrap intervals of :mod:`.baselines`; :func:`_summary` states one
verdict per finding by the interval rule (:func:`.baselines.verdict`) and
:func:`findings_table` lists every effect / baseline / interval / verdict. Writes no file
and draws nothing (:mod:`.plots` and :mod:`.text`
turn a report into figures and terminal text; :mod:`.cli` writes them).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from tinymoe import backend as B
from tinymoe.analysis import baselines as S
from tinymoe.analysis.collect import RoutingTrace, collect_routing, token_windows
from tinymoe.analysis.measures import (
    drop_by_position, drop_quarters, early_routing, expert_share_by_domain, routing_std,
    shuffled_routing_std, specialization_predictors, token_label, top_tokens_per_expert)

np = B.np

__all__ = ["analyze", "specialization_report", "drop_report", "early_routing_report",
           "early_routing_verdict",
           "findings_table", "cf_label", "EARLY_FRACTION", "EARLY_THRESHOLD"]

EARLY_FRACTION = 0.25    # "early": the first snapshot at or after this share of training
EARLY_THRESHOLD = 0.9    # "fixed": per-token agreement with the final routing >= this
                         # share of its ceiling (the ceiling of per-token agreement is 1)

Array = Any


def cf_label(cf: float | None) -> str:
    """``"cf 1.25"``, or ``"dropless"`` for a capacity factor of None or 0."""
    return "dropless" if not cf else f"cf {cf:g}"


def _drop_curve(trace: RoutingTrace, n_bins: int, n_boot: int = S.N_BOOT, seed: int = 0
                ) -> dict[str, Any]:
    """Drop-vs-position numbers of one trace: all layers together, and per layer; ``stats``
    = :func:`.baselines.drop_statistics` (intervals over routing groups, all choices and
    each rank separately)."""
    n_pos = trace.group_len
    curve = drop_by_position(trace.all_kept(), trace.group_pos, n_pos, n_bins)
    quarters = drop_quarters(trace.all_kept(), trace.group_pos, n_pos)
    rank0 = drop_quarters(np.stack([k[:, 0] for k in trace.kept], axis=1), trace.group_pos,
                          n_pos)
    per_layer = []
    for layer, kept in zip(trace.layers, trace.kept):
        c = drop_by_position(kept, trace.group_pos, n_pos, n_bins)
        q = drop_quarters(kept, trace.group_pos, n_pos)
        per_layer.append({"layer": layer, "overall": c["overall"], "drop_rate": c["drop_rate"],
                          "first_quarter": q["first_quarter"], "last_quarter": q["last_quarter"]})
    return {**curve, "first_quarter": quarters["first_quarter"],
            "last_quarter": quarters["last_quarter"],
            "first_choice": {"overall": rank0["overall"], "first_quarter": rank0["first_quarter"],
                             "last_quarter": rank0["last_quarter"]},
            "ce": trace.ce, "per_layer": per_layer,
            "n_groups": int(S.unit_ids(trace.group_pos)[-1] + 1),
            "stats": S.drop_statistics(trace.all_kept(), trace.group_pos, n_pos, trace.top_k,
                                       n_boot=n_boot, seed=seed)}


def _routing_label(cfg: Any, setting: str, large_cf: float, compare_name: str = "compare",
                   paper_group: int | None = None) -> tuple[str, dict[str, Any]]:
    """(legend label, config overrides) of one named routing setting."""
    prio = cfg.slot_priority
    if setting in ("train_cf", "compare_train_cf"):
        ov = {"eval_capacity_factor": cfg.capacity_factor}
        label = f"{prio}, {cf_label(cfg.capacity_factor)} (train)"
    elif setting in ("eval_cf", "compare_eval_cf"):
        ov = {"eval_capacity_factor": cfg.eval_capacity_factor}
        label = f"{prio}, {cf_label(cfg.eval_capacity_factor)} (eval)"
    elif setting == "paper_group":
        if not paper_group:
            raise ValueError("the paper_group setting needs paper_group (tokens per group)")
        ov = {"eval_capacity_factor": cfg.eval_capacity_factor, "group_size": int(paper_group)}
        label = (f"{prio}, {cf_label(cfg.eval_capacity_factor)} (eval), groups of "
                 f"{paper_group} tokens")
    elif setting == "probability":
        ov = {"eval_capacity_factor": cfg.capacity_factor, "slot_priority": "probability"}
        label = f"cure: probability priority, {cf_label(cfg.capacity_factor)}"
    elif setting == "larger_cf":
        ov = {"eval_capacity_factor": large_cf}
        label = f"cure: {prio}, larger cf {large_cf:g}"
    elif setting == "dropless":
        ov = {"eval_capacity_factor": 0.0}
        label = "cure: dropless (cf 0)"
    else:
        raise ValueError(f"unknown routing setting {setting!r}")
    if setting.startswith("compare_"):
        label = f"{compare_name} model: " + label
    return label, ov


def analyze(model: Any, tokenizer: Any, corpus: Any, *, excluded: Sequence[str] = (),
            compare_model: Any = None, compare_name: str = "compare", snapshots: Sequence[
                Mapping[str, Any]] | None = None, snapshot_note: str = "",
            max_tokens: int = 65536, drop_tokens: int = 16384, batch_size: int = 16,
            seq_len: int | None = None, min_count: int = 16, n_top: int = 8, n_bins: int = 16,
            large_cf: float | None = None, seed: int = 0, init_model: Any = None,
            init_tokens: int = 16384, loss_curve: Sequence[tuple[int, float]] | None = None,
            paper_group: int | None = None, n_boot: int = S.N_BOOT, n_splits: int = 50,
            log: Any = None) -> dict[str, Any]:
    """All three findings for ``model`` on ``corpus`` (a tinymoe.data.Corpus; held-out
    ``val`` text is used). ``excluded``: domains of the corpus left out of training.
    ``init_model``: an untrained model of the same config, routed on (up to
    ``init_tokens`` per domain of) the same text as a control: how much token-id
    specialization a random router already shows. ``loss_curve``: (step, train CE) pairs
    of the run, set against the early-routing agreement. ``paper_group``: tokens per
    routing group of the paper-like drop run (default ``batch_size * T``: a whole batch
    of sequences per group, as OpenMoE's 4096-token groups hold several sequences).
    ``n_boot``: bootstrap resamples of every interval; ``n_splits``: random split halves
    of the early-routing probe.
    Returns the report: nested dicts and lists of plain numbers and strings (JSON-ready);
    ``report["findings"]`` is the table finding / measure / effect / baseline / interval /
    verdict (:func:`findings_table`).
    """
    log = log or (lambda *_: None)
    cfg = model.cfg
    E = cfg.n_experts
    T = int(seq_len or cfg.max_seq_len)
    if not 1 <= T <= cfg.max_seq_len:
        raise ValueError(f"seq_len={T} must be between 1 and max_seq_len={cfg.max_seq_len}")
    for name in excluded:
        if name not in corpus.domains:
            raise ValueError(f"excluded domain {name!r} is not in the data "
                             f"(domains: {', '.join(corpus.domains)})")
    names = list(corpus.domains)
    in_dist = [n for n in names if n not in excluded]
    if not in_dist:
        raise ValueError("every domain of the data is marked as left out of training")
    # Held-out text, cut to what the budget needs before tokenising (a BPE is slow on MB).
    char_budget = 8 * max(max_tokens, drop_tokens) + 8 * T
    val_text = {n: corpus.domains[n].val[:char_budget] for n in names}
    val_tok = {n: np.asarray(tokenizer.encode(t), dtype=np.int64) for n, t in val_text.items()}
    short = [n for n in names if val_tok[n].size < 2 * T + 2]
    if short:
        raise ValueError(f"held-out text of domain(s) {', '.join(short)} is shorter than two "
                         f"windows of {T + 1} tokens")
    report: dict[str, Any] = {
        "config": {"n_experts": E, "top_k": cfg.top_k, "moe_layers": cfg.moe_layers,
                   "capacity_factor": cfg.capacity_factor,
                   "eval_capacity_factor": cfg.eval_capacity_factor,
                   "slot_priority": cfg.slot_priority, "group_size": cfg.group_size,
                   "capacity_mode": cfg.capacity_mode, "min_capacity": cfg.min_capacity,
                   "seq_len": T, "describe": cfg.describe()},
        "data": {"source": corpus.source, "domains": names, "excluded_in_training": list(excluded),
                 "val_tokens": {n: int(val_tok[n].size) for n in names}},
    }

    # 1. specialization: every domain's held-out text, at the eval capacity factor
    t0 = time.perf_counter()
    win = [token_windows(val_tok[n], T, max(2, max_tokens // T)) for n in names]   # [n_d, T+1]
    report["specialization"] = specialization_report(
        model, tokenizer, win, names, excluded, batch_size, min_count, n_top, seed,
        init_model, init_tokens, n_boot)
    log(f"specialization: routed {report['specialization']['n_tokens']:,} held-out tokens "
        f"(and the untrained control's) in {time.perf_counter() - t0:.1f}s")

    # 2. early routing, from the trainer's snapshots
    if snapshots:
        report["early_routing"] = {"available": True, "note": snapshot_note,
                                   **early_routing_report(snapshots, E, loss_curve, n_boot,
                                                          n_splits, seed)}
    else:
        report["early_routing"] = {"available": False,
                                   "note": snapshot_note or "no routing snapshots given"}

    # 3. drops: the same data sets under every routing setting
    t0 = time.perf_counter()
    datasets = _drop_datasets(tokenizer, val_text, val_tok, names, in_dist, list(excluded), T,
                              max(1, drop_tokens // T), seed)
    if large_cf is None:
        large_cf = 2.0 * max(cfg.eval_capacity_factor or 0.0, cfg.capacity_factor or 0.0) or 4.0
    settings = ["train_cf", "eval_cf", "probability", "larger_cf", "dropless"]
    if paper_group is None:
        paper_group = batch_size * T
    model_group = cfg.group_size or T
    if paper_group > model_group:
        settings.insert(2, "paper_group")
    runs = [(model, s) for s in settings]
    if compare_model is not None:
        runs += [(compare_model, "compare_train_cf"), (compare_model, "compare_eval_cf")]
    report["drops"] = drop_report(runs, datasets, batch_size, n_bins, large_cf, compare_name,
                                  paper_group=paper_group, n_boot=n_boot, seed=seed)
    log(f"drops: {len(report['drops']['curves'])} routing runs in "
        f"{time.perf_counter() - t0:.1f}s")
    report["summary"] = _summary(report)
    report["findings"] = findings_table(report)
    return report


def specialization_report(model: Any, tokenizer: Any, windows: Sequence[Array],
                          names: Sequence[str], excluded: Sequence[str] = (),
                          batch_size: int = 16, min_count: int = 16, n_top: int = 8,
                          seed: int = 0, init_model: Any = None, init_tokens: int = 16384,
                          n_boot: int = S.N_BOOT) -> dict[str, Any]:
    """Finding 1 on held-out windows (``windows[d]`` [n_d, T+1] of domain ``names[d]``):
    predictors, the std measure with shuffled baselines, per-domain predictors, domain
    shares and top tokens per MoE layer; ``statistics``
    (:func:`.baselines.specialization_statistics`: the id predictor against the
    shuffled-label and the position predictors, intervals over windows);
    ``probe_ceiling`` (:func:`.baselines.ceiling_by_probe_size`: the ceiling of the
    early-routing majority measures for probes of 4, 8, ... windows per domain, from this
    model's routing: which probe size reaches 95%); plus the
    untrained control when ``init_model`` is given (on up to ``init_tokens`` tokens per
    domain of the same windows), with its own ``statistics``."""
    E = model.cfg.n_experts
    T = windows[0].shape[1] - 1
    dom = [np.full(w.shape[0], d, dtype=np.int64) for d, w in enumerate(windows)]
    trace = collect_routing(model, np.concatenate(windows), np.concatenate(dom), batch_size,
                            names)
    fit = trace.window % 2 == 0                       # even windows fit, odd windows score
    layers = []
    for layer, ex in zip(trace.layers, trace.expert_index):
        per_domain = {}
        for d, n in enumerate(names):
            m = trace.domain == d
            if (fit & m).any() and (~fit & m).any():
                p = specialization_predictors(trace.token_ids[m], trace.position[m], ex[m], E,
                                              fit[m])
                per_domain[n] = {k: p[k] for k in ("token_id", "position", "majority_class",
                                                   "n_score")}
        share = expert_share_by_domain(ex, trace.domain, E, len(names))  # [D, E]
        top = top_tokens_per_expert(trace.token_ids, ex, E, n_top, min_count)
        for t in top:
            for item in t["frequent"] + t["specific"]:
                item["text"] = token_label(tokenizer, item["id"])
        top1 = ex[:, 0]                                                   # [N]
        layers.append({
            "layer": layer,
            "predictors": specialization_predictors(trace.token_ids, trace.position, ex, E, fit),
            "statistics": S.specialization_statistics(trace.token_ids, trace.position, ex, E,
                                                      trace.window, n_boot, seed),
            "probe_ceiling": S.ceiling_by_probe_size(trace.token_ids, ex, trace.window,
                                                     trace.domain, E, seed=seed),
            "per_domain": per_domain,
            "std": {"token_id": routing_std(trace.token_ids, top1, E, min_count),
                    "token_id_shuffled": shuffled_routing_std(trace.token_ids, top1, E,
                                                              min_count, seed),
                    "position": routing_std(trace.position, top1, E, min_count),
                    "position_shuffled": shuffled_routing_std(trace.position, top1, E,
                                                              min_count, seed),
                    "token_id_topk": routing_std(trace.token_ids, ex, E, min_count)},
            "domain_share": share.tolist(),
            "domain_share_max_deviation": float(np.nanmax(np.abs(share - 1.0 / E))),
            "top_tokens": top,
        })
    if init_model is not None:
        keep = max(2, init_tokens // T)
        sub = [np.round(np.linspace(0, w.shape[0] - 1, min(keep, w.shape[0]))).astype(int)
               for w in windows]                              # windows spread over each domain
        init = collect_routing(init_model, np.concatenate([w[i] for w, i in zip(windows, sub)]),
                               np.concatenate([d[i] for d, i in zip(dom, sub)]), batch_size,
                               names)
        for L, ex in zip(layers, init.expert_index):
            L["init"] = {
                "n_tokens": init.n_tokens,
                "predictors": specialization_predictors(init.token_ids, init.position, ex, E,
                                                        init.window % 2 == 0),
                "statistics": S.specialization_statistics(init.token_ids, init.position, ex,
                                                          E, init.window, n_boot, seed),
                "std_token_id": routing_std(init.token_ids, ex[:, 0], E, min_count),
                "std_token_id_shuffled": shuffled_routing_std(init.token_ids, ex[:, 0], E,
                                                              min_count, seed),
                "std_position": routing_std(init.position, ex[:, 0], E, min_count),
                "std_position_shuffled": shuffled_routing_std(init.position, ex[:, 0], E,
                                                              min_count, seed)}
    return {"n_tokens": trace.n_tokens, "n_experts": E, "top_k": model.cfg.top_k,
            "min_count": min_count, "domains": list(names), "excluded": list(excluded),
            "ce": trace.ce, "capacity_factor": model.cfg.eval_capacity_factor,
            "layers": layers}


def _drop_datasets(tokenizer: Any, val_text: Mapping[str, str], val_tok: Mapping[str, Array],
                   names: list[str], in_dist: list[str], excluded: list[str], T: int,
                   n_win: int, seed: int) -> list[dict[str, Any]]:
    """The three drop data sets (``windows`` [n, T+1], ``domain`` [n] or [n, T+1],
    ``domain_names``), or a ``skipped`` reason."""
    from tinymoe.data import Corpus, DomainText, multi_turn_text  # noqa: PLC0415

    def from_domains(doms: list[str], per: int) -> dict[str, Any]:
        w = [token_windows(val_tok[n], T, per) for n in doms]
        d = [np.full(x.shape[0], names.index(n), dtype=np.int64) for x, n in zip(w, doms)]
        return {"windows": np.concatenate(w), "domain": np.concatenate(d), "domain_names": names}

    out = [{"name": "in_distribution",
            "title": "in-distribution held-out text (" + ", ".join(in_dist) + ")",
            **from_domains(in_dist, max(1, n_win // len(in_dist)))}]
    if len(in_dist) >= 2:
        cut = Corpus({n: DomainText(train="", val=val_text[n]) for n in in_dist}, source="val")
        hi = min(max(3, T // 2), min(int(val_tok[n].size) for n in in_dist))
        lo = min(max(2, T // 8), hi)
        mixed = multi_turn_text(cut, tokenizer, n_seqs=n_win, seq_len=T + 1,
                                segment_len=(lo, hi), split="val", seed=seed)
        out.append({"name": "multi_turn",
                     "title": f"multi-turn: segments of {lo}-{hi} tokens from alternating "
                              "domains", "windows": mixed.tokens, "domain": mixed.domain,
                     "domain_names": list(mixed.domain_names)})
    else:
        out.append({"name": "multi_turn", "title": "multi-turn",
                    "skipped": "needs at least two in-distribution domains"})
    if excluded:
        out.append({"name": "held_out_domain",
                    "title": "domain left out of training: " + ", ".join(excluded),
                    **from_domains(excluded, max(1, n_win // len(excluded)))})
    else:
        out.append({"name": "held_out_domain", "title": "domain left out of training",
                    "skipped": "the checkpoint was trained on every domain of the data "
                               "(train with an excluded domain to see this case)"})
    return out


def drop_report(runs: Sequence[tuple[Any, str]], datasets: Sequence[dict[str, Any]],
                batch_size: int = 16, n_bins: int = 16, large_cf: float = 4.0,
                compare_name: str = "compare", paper_group: int | None = None,
                n_boot: int = S.N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Finding 3: every (model, setting) of ``runs`` on every data set of ``datasets``
    (dicts with ``name``, ``title``, ``windows``, ``domain``, ``domain_names`` or
    ``skipped``). Settings: see :func:`_routing_label`.

    Each curve carries ``stats`` (drop rates with intervals over routing groups, all
    choices and per rank) and, where the setting drops, ``baseline``: the same statistics
    of balanced random routing at the same E, k, group size, capacity, capacity formula
    and slot priority, with as many groups and layers
    (:func:`.baselines.random_drop_baseline`; for position priority it also holds the
    exact load-fluctuation values, ``baseline["expected"]``). Per data set:
    ``ce_cost`` = per-token CE at the setting minus CE dropless on the same tokens, by
    position bucket (4 quarters of the group), for the main model's drop settings.
    ``effects``: every pair of data sets (in-distribution, multi-turn, held-out domain:
    the later one minus the earlier one), difference of drop rates with intervals (all
    choices and first choices; overall, last quarter, gap), at the eval capacity factor.
    """
    curves = []
    n_positions = 0
    kept_sets = []
    traces: dict[tuple[str, str], RoutingTrace] = {}
    base_cache: dict[tuple[Any, ...], dict[str, Any]] = {}
    for ds in datasets:
        info = {k: v for k, v in ds.items() if k in ("name", "title", "skipped")}
        kept_sets.append(info)
        if ds.get("skipped"):
            continue
        for m, st in runs:
            label, ov = _routing_label(m.cfg, st, large_cf, compare_name, paper_group)
            tr = collect_routing(m, ds["windows"], ds["domain"], batch_size, ds["domain_names"],
                                 **ov)
            if st != "paper_group":
                info["n_tokens"] = tr.n_tokens
                n_positions = max(n_positions, tr.group_len)
            cf = ov["eval_capacity_factor"]
            prio = ov.get("slot_priority", m.cfg.slot_priority)
            curve = {"dataset": ds["name"], "setting": st, "label": label,
                     "model": compare_name if st.startswith("compare_") else "main",
                     "capacity_factor": cf, "slot_priority": prio, "group_len": tr.group_len,
                     **_drop_curve(tr, n_bins, n_boot, seed)}
            if cf:
                key = (curve["n_groups"], len(tr.layers), tr.group_len, m.cfg.n_experts,
                       m.cfg.top_k, cf, m.cfg.min_capacity,
                       ov.get("capacity_mode", m.cfg.capacity_mode), prio)
                if key not in base_cache:
                    base_cache[key] = S.random_drop_baseline(
                        curve["n_groups"], len(tr.layers), tr.group_len, m.cfg.n_experts,
                        m.cfg.top_k, cf, m.cfg.min_capacity, key[7], prio, n_boot, seed)
                curve["baseline"] = base_cache[key]
            curves.append(curve)
            if not st.startswith("compare_"):
                traces[(ds["name"], st)] = tr
        free = traces.get((ds["name"], "dropless"))
        if free is not None:
            info["ce_cost"] = {
                st: S.ce_cost_by_position(traces[(ds["name"], st)].token_ce, free.token_ce,
                                          traces[(ds["name"], st)].group_pos,
                                          traces[(ds["name"], st)].group_len, 4, n_boot, seed)
                for st in ("train_cf", "eval_cf", "paper_group") if (ds["name"], st) in traces}
    effects = []
    names = [ds["name"] for ds in kept_sets if (ds["name"], "eval_cf") in traces]
    pairs = [(a, b) for j, b in enumerate(names) for a in names[j + 1:]]
    for a_name, b_name in pairs:
        other, ref = traces[(a_name, "eval_cf")], traces[(b_name, "eval_cf")]
        row: dict[str, Any] = {"dataset": a_name, "against": b_name, "setting": "eval_cf"}
        for what, cols in (("all", None), ("first_choice", 0)):
            a, b = ({"kept": t.all_kept() if cols is None else
                     np.stack([k[:, cols] for k in t.kept], axis=1),
                     "group_pos": t.group_pos, "group_len": t.group_len} for t in (other, ref))
            row[what] = {key: S.drop_difference(a, b, key, n_boot, seed)
                         for key in ("overall", "last_quarter", "gap")}
        effects.append(row)
    return {"n_positions": n_positions, "n_bins": n_bins, "larger_cf": large_cf,
            "paper_group": paper_group, "datasets": kept_sets, "curves": curves,
            "effects": effects}


def early_routing_report(snapshots: Sequence[Mapping[str, Any]], n_experts: int,
                         loss_curve: Sequence[tuple[int, float]] | None = None,
                         n_boot: int = S.N_BOOT, n_splits: int = 50, seed: int = 0
                         ) -> dict[str, Any]:
    """Finding 2 from every snapshot the run has: :func:`.measures.early_routing` plus,
    per layer and snapshot,

    * ``tokens_interval``: per-token agreement (the same probe token's top-1 expert at
      that step and at the final step) with an interval over probe sequences. Its ceiling
      is exactly 1 (routing a fixed input is deterministic): it needs no resampling;
    * ``split_half``: per-id and occurrence-weighted *majority* agreement measured on
      random split halves of the probe (majority at that step on one half, final
      majority on the other; :func:`.baselines.split_half_agreement`), and ``ceiling``:
      the same for the final snapshot against itself: how well a probe of this size can
      show agreement at all. ``probe_ok`` = both ceilings >= 95%; below that the majority
      measures cannot separate early from late routing and the probe must grow (the
      trainer's probe batch).

    ``loss``: the train CE of the logged step nearest each snapshot (from ``loss_curve``).
    """
    base = early_routing(snapshots, n_experts)
    snaps = sorted(snapshots, key=lambda x: int(x["step"]))
    final = snaps[-1]
    ids = np.asarray(final["token_ids"]).reshape(-1)
    seq = np.asarray(final.get("sequence", np.arange(ids.size))).reshape(-1)
    same_probe = all(np.array_equal(np.asarray(x["token_ids"]).reshape(-1), ids)
                     for x in snaps)
    n_seq = int(np.unique(seq).size)
    base["probe"] = {"n_tokens": int(ids.size), "n_sequences": n_seq,
                     "n_ids": int(np.unique(ids).size), "same_probe": bool(same_probe)}
    for L in base["layers"]:
        layer = L["layer"]
        fe = final["experts"][_layer_key(final, layer)]
        if not same_probe:
            continue
        exs = [x["experts"][_layer_key(x, layer)] for x in snaps]
        L["tokens_interval"] = [S.token_agreement(e, fe, seq, n_boot, seed) for e in exs]
        if n_seq >= 2:
            sh = [S.split_half_agreement(ids, e, fe, seq, n_experts, n_splits, seed)
                  for e in exs]
            L["split_half"] = {k: [x[k] for x in sh] for k in ("ids", "occurrences")}
            L["ceiling"] = sh[-1]
            L["probe_ok"] = bool(min(sh[-1]["ids"]["estimate"],
                                     sh[-1]["occurrences"]["estimate"]) >= 0.95)
    if loss_curve:
        pts = sorted((int(a), float(b)) for a, b in loss_curve)
        st = np.asarray([p[0] for p in pts])
        base["loss_curve"] = {"step": [p[0] for p in pts], "ce": [p[1] for p in pts]}
        base["loss"] = [pts[int(np.abs(st - x).argmin())][1] for x in base["steps"]]
    return base


def _layer_key(snapshot: Mapping[str, Any], layer: int) -> Any:
    for k in snapshot["experts"]:
        if int(k) == layer:
            return k
    raise KeyError(layer)


def _at_fraction(early: Mapping[str, Any], frac: float) -> tuple[int, int] | None:
    """Index and step of the first snapshot at or after ``frac`` of the final step and
    before the final one; None when there is none."""
    steps = early["steps"]
    target = frac * early["final_step"]
    for i, s in enumerate(steps[:-1]):
        if s >= target:
            return i, s
    return None


_ONE = {"estimate": 1.0, "low": 1.0, "high": 1.0, "level": S.LEVEL}


def early_routing_verdict(early: Mapping[str, Any], fraction: float = EARLY_FRACTION,
                          threshold: float = EARLY_THRESHOLD) -> dict[str, Any]:
    """The early-routing verdict of an :func:`early_routing_report` section (the rule is
    stated in :func:`_summary` and in the returned ``rule``): per-token agreement with the
    final routing at the first snapshot at or after ``fraction`` of training, against the
    ceiling 1 with the margin ``threshold``; ``reproduced`` True / False / None."""
    rule = (f"at the first snapshot at or after {fraction:.0%} of training (before "
            "the last), the 95% interval of the per-token agreement with the final routing "
            f"(ceiling 1) has its low end >= {threshold:g} in every layer: reproduced; "
            f"its high end < {threshold:g} in some layer: not reproduced; else "
            "undecided")
    available = early.get("available", "steps" in early)
    at = _at_fraction(early, fraction) if available else None
    if at is not None and all("tokens_interval" in L for L in early["layers"]):
        i, step = at
        ivs = [L["tokens_interval"][i] for L in early["layers"]]
        if all(v["low"] >= threshold for v in ivs):
            rep: bool | None = True
        elif any(v["high"] < threshold for v in ivs):
            rep = False
        else:
            rep = None
        return {
            "reproduced": rep, "step": step, "fraction": step / early["final_step"],
            "rule": rule, "agreement_tokens": ivs,
            "agreement_occurrences": [L["occurrences"][i] for L in early["layers"]],
            "first_snapshot": [L["tokens_interval"][0] for L in early["layers"]],
            "learned_since_first": [S.verdict(L["tokens_interval"][i],
                                              L["tokens_interval"][0])
                                    for L in early["layers"]],
            "ceiling_occurrences": [L["ceiling"]["occurrences"]["estimate"]
                                    if "ceiling" in L else None for L in early["layers"]],
            "probe_ok": [L.get("probe_ok") for L in early["layers"]]}
    why = ("no snapshots" if not available else
           f"no snapshot between {fraction:.0%} of training and the last one"
           if at is None else "the snapshots do not share one probe batch")
    return {"reproduced": None, "rule": rule, "why": why}



def _summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """One verdict per finding, each an effect against a baseline with intervals
    (:func:`.baselines.verdict`: PASS iff the effect's 95% interval lies entirely above
    the baseline's). The rules, as stored in ``rule``:

    * **specialization**: in every MoE layer the token-id predictor's accuracy interval
      lies above (a) the shuffled-label baseline's (the same predictor with the experts
      permuted across tokens) and (b) the position predictor's. A router that depends
      only on the position fails (a); a router that ignores both fails (a).
      ``training_adds`` (separate): the trained router's skill over its shuffle
      ((id - shuffled) / (1 - shuffled) accuracy) lies above the untrained router's.
    * **early routing**: at the first snapshot at or after 25% of training (before the
      last), the per-token agreement with the final routing (ceiling exactly 1) has its
      interval's low end >= 0.9 in every layer: REPRODUCED; its high end < 0.9 in some
      layer: NOT reproduced; otherwise undecided (None). Baseline: the ceiling 1 (and,
      reported, the agreement at the first snapshot: unlearned routing).
    * **drop-towards-the-end** per data set and capacity setting: the towards-the-end gap
      (last-quarter minus first-quarter drop rate, all MoE layers, all choices) lies above
      the gap of balanced random routing at the same shape, capacity and slot priority.
    """
    out: dict[str, Any] = {}
    spec = report["specialization"]["layers"]
    per_layer = []
    for L in spec:
        st = L.get("statistics")
        row = {"layer": L["layer"], "token_id": L["predictors"]["token_id"],
               "position": L["predictors"]["position"],
               "majority_class": L["predictors"]["majority_class"],
               "std_token_id": L["std"]["token_id"]["mean_std"],
               "std_position": L["std"]["position"]["mean_std"],
               "untrained_token_id": (L["init"]["predictors"]["token_id"]
                                      if "init" in L else None)}
        if st:
            row["vs_shuffled"] = S.verdict(st["token_id"], st["shuffled"])
            row["vs_position"] = S.verdict(st["token_id"], st["position"])
            ist = L.get("init", {}).get("statistics")
            row["training_adds"] = S.verdict(st["skill"], ist["skill"]) if ist else None
        per_layer.append(row)
    have = all("vs_shuffled" in r for r in per_layer)
    out["specialization"] = {
        "reproduced": (bool(all(r["vs_shuffled"] and r["vs_position"] for r in per_layer))
                       if have and per_layer else None),
        "training_adds": (None if not have or any(r.get("training_adds") is None
                                                  for r in per_layer)
                          else bool(all(r["training_adds"] for r in per_layer))),
        "rule": "in every MoE layer the 95% interval of the token-id predictor's accuracy "
                "lies above the shuffled-label baseline's and above the position "
                "predictor's (intervals over score windows); training adds specialization "
                "iff the trained skill (id - shuffled) / (1 - shuffled) lies above the "
                "untrained model's",
        "per_layer": per_layer}

    out["early_routing"] = early_routing_verdict(report["early_routing"])

    drops = report["drops"]
    per_ds = []
    for ds in drops["datasets"]:
        if ds.get("skipped"):
            continue
        row = {"dataset": ds["name"]}
        for st in ("train_cf", "eval_cf", "paper_group"):
            c = next((c for c in drops["curves"] if c["dataset"] == ds["name"]
                      and c["setting"] == st), None)
            if c is None:
                continue
            entry = {"first_quarter": c["first_quarter"], "last_quarter": c["last_quarter"],
                     "towards_end": None}
            if "stats" in c and "baseline" in c:
                entry.update(gap=c["stats"]["all"]["gap"],
                             baseline_gap=c["baseline"]["all"]["gap"],
                             towards_end=S.verdict(c["stats"]["all"]["gap"],
                                                   c["baseline"]["all"]["gap"]),
                             more_than_random=S.verdict(c["stats"]["all"]["overall"],
                                                        c["baseline"]["all"]["overall"]))
            row[st] = entry
        per_ds.append(row)

    def passing(st: str) -> list[str]:
        return [r["dataset"] for r in per_ds if r.get(st, {}).get("towards_end")]

    out["drop_towards_the_end"] = {
        "rule": "the 95% interval of the towards-the-end gap (last-quarter minus "
                "first-quarter drop rate, all MoE layers and choices; intervals over "
                "routing groups) lies above the gap of balanced random routing at the same "
                "E, k, group size, capacity and slot priority",
        "datasets": per_ds,
        "reproduced_at_train_cf": passing("train_cf"),
        "reproduced_at_eval_cf": passing("eval_cf"),
        "reproduced_at_paper_group": passing("paper_group")}
    return out


def _iv(v: Mapping[str, float] | None) -> dict[str, float] | None:
    return None if v is None else {k: v[k] for k in ("estimate", "low", "high")}


def findings_table(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's findings as rows ``{finding, measure, effect, baseline_name,
    baseline, verdict, rule}`` (effect and baseline: ``{estimate, low, high}`` 95%
    intervals; verdict True / False / None = not measured), one row per MoE layer or data
    set, from the report's sections (computes no new measure)."""
    rows: list[dict[str, Any]] = []
    spec = report["specialization"]["layers"]
    for L in spec:
        st = L.get("statistics")
        if not st:
            continue
        rows.append({"finding": "context-independent specialization",
                     "measure": f"block {L['layer']}: token-id predictor accuracy",
                     "effect": _iv(st["token_id"]), "baseline_name": "shuffled labels",
                     "baseline": _iv(st["shuffled"]),
                     "verdict": S.verdict(st["token_id"], st["shuffled"]),
                     "rule": "effect interval above baseline interval"})
        rows.append({"finding": "context-independent specialization",
                     "measure": f"block {L['layer']}: token-id predictor accuracy",
                     "effect": _iv(st["token_id"]), "baseline_name": "position predictor",
                     "baseline": _iv(st["position"]),
                     "verdict": S.verdict(st["token_id"], st["position"]),
                     "rule": "effect interval above baseline interval"})
        ist = L.get("init", {}).get("statistics")
        if ist:
            rows.append({"finding": "what training adds to specialization",
                         "measure": f"block {L['layer']}: id skill (id - shuffled) / "
                                    "(1 - shuffled)",
                         "effect": _iv(st["skill"]), "baseline_name": "untrained router",
                         "baseline": _iv(ist["skill"]),
                         "verdict": S.verdict(st["skill"], ist["skill"]),
                         "rule": "effect interval above baseline interval"})
    early = report["early_routing"]
    er = report.get("summary", {}).get("early_routing") or _summary(report)["early_routing"]
    if er.get("agreement_tokens"):
        for L, iv, first in zip(early["layers"], er["agreement_tokens"], er["first_snapshot"]):
            rows.append({"finding": "early routing learning",
                         "measure": f"block {L['layer']}: per-token agreement with the final "
                                    f"routing at step {er['step']} "
                                    f"({er['fraction']:.0%} of training)",
                         "effect": _iv(iv), "baseline_name": "ceiling (final vs itself)",
                         "baseline": _iv(_ONE),
                         "verdict": (True if iv["low"] >= EARLY_THRESHOLD else
                                     False if iv["high"] < EARLY_THRESHOLD else None),
                         "rule": f"low end >= {EARLY_THRESHOLD:g} x ceiling: yes; high end "
                                 "below: no; else undecided"})
            rows.append({"finding": "early routing learning",
                         "measure": f"block {L['layer']}: per-token agreement at step "
                                    f"{er['step']}",
                         "effect": _iv(iv), "baseline_name": f"first snapshot (step "
                                                             f"{early['steps'][0]})",
                         "baseline": _iv(first), "verdict": S.verdict(iv, first),
                         "rule": "effect interval above baseline interval"})
    for c in report["drops"]["curves"]:
        if c["model"] != "main" or "baseline" not in c or "stats" not in c:
            continue
        if c["setting"] not in ("train_cf", "eval_cf", "paper_group"):
            continue
        for rank, name in (("all", "all choices"), ("rank0", "first choices")):
            rows.append({"finding": "drop-towards-the-end",
                         "measure": f"{c['dataset']}, {c['label']}: last - first quarter "
                                    f"drop rate, {name}",
                         "effect": _iv(c["stats"][rank]["gap"]),
                         "baseline_name": "random routing, same shape and capacity",
                         "baseline": _iv(c["baseline"][rank]["gap"]),
                         "verdict": S.verdict(c["stats"][rank]["gap"],
                                              c["baseline"][rank]["gap"]),
                         "rule": "effect interval above baseline interval"})
    zero = {"estimate": 0.0, "low": 0.0, "high": 0.0}
    for e in report["drops"].get("effects", []):
        for what, name in (("all", "all choices"), ("first_choice", "first choices")):
            iv = e[what]["overall"]
            rows.append({"finding": "drops differ between data sets",
                         "measure": f"{e['dataset']} minus {e['against']}, eval cf: overall "
                                    f"drop rate, {name}",
                         "effect": _iv(iv), "baseline_name": "no difference", "baseline": zero,
                         "verdict": bool(S.verdict(iv, zero) or S.verdict(iv, zero, "less")),
                         "rule": "effect interval excludes 0 (either sign)"})
    return rows
