"""The report: all three findings of one model as one JSON-ready dict.

:func:`analyze` is the whole analysis of a checkpoint's model on a corpus's held-out text:
it cuts the text into windows, routes them (:mod:`.collect`) under each routing setting,
applies the measures (:mod:`.measures`) and returns nested dicts and lists of plain
numbers and strings: the content of ``analysis.json``. :func:`specialization_report` and
:func:`drop_report` build its sections 1 and 3; :func:`_summary` states one verdict per
finding by fixed rules. Writes no file and draws nothing (:mod:`.plots` and :mod:`.text`
turn a report into figures and terminal text; :mod:`.cli` writes them).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from tinymoe import backend as B
from tinymoe.analysis.collect import RoutingTrace, collect_routing, token_windows
from tinymoe.analysis.measures import (
    drop_by_position, drop_quarters, early_routing, expert_share_by_domain, routing_std,
    shuffled_routing_std, specialization_predictors, token_label, top_tokens_per_expert)

np = B.np

__all__ = ["analyze", "specialization_report", "drop_report", "cf_label"]

Array = Any


def cf_label(cf: float | None) -> str:
    """``"cf 1.25"``, or ``"dropless"`` for a capacity factor of None or 0."""
    return "dropless" if not cf else f"cf {cf:g}"


def _drop_curve(trace: RoutingTrace, n_bins: int) -> dict[str, Any]:
    """Drop-vs-position numbers of one trace: all layers together, and per layer."""
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
            "ce": trace.ce, "per_layer": per_layer}


def _routing_label(cfg: Any, setting: str, large_cf: float, compare_name: str = "compare"
                   ) -> tuple[str, dict[str, Any]]:
    """(legend label, config overrides) of one named routing setting."""
    prio = cfg.slot_priority
    if setting in ("train_cf", "compare_train_cf"):
        ov = {"eval_capacity_factor": cfg.capacity_factor}
        label = f"{prio}, {cf_label(cfg.capacity_factor)} (train)"
    elif setting in ("eval_cf", "compare_eval_cf"):
        ov = {"eval_capacity_factor": cfg.eval_capacity_factor}
        label = f"{prio}, {cf_label(cfg.eval_capacity_factor)} (eval)"
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
            init_tokens: int = 16384, log: Any = None) -> dict[str, Any]:
    """All three findings for ``model`` on ``corpus`` (a tinymoe.data.Corpus; held-out
    ``val`` text is used). ``excluded``: domains of the corpus left out of training.
    ``init_model``: an untrained model of the same config, routed on (up to
    ``init_tokens`` per domain of) the same text as a control: how much token-id
    specialization a random router already shows.
    Returns the report: nested dicts and lists of plain numbers and strings (JSON-ready).
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
        init_model, init_tokens)
    log(f"specialization: routed {report['specialization']['n_tokens']:,} held-out tokens "
        f"(and the untrained control's) in {time.perf_counter() - t0:.1f}s")

    # 2. early routing, from the trainer's snapshots
    if snapshots:
        report["early_routing"] = {"available": True, "note": snapshot_note,
                                   **early_routing(snapshots, E)}
    else:
        report["early_routing"] = {"available": False,
                                   "note": snapshot_note or "no routing snapshots given"}

    # 3. drops: the same data sets under every routing setting
    t0 = time.perf_counter()
    datasets = _drop_datasets(tokenizer, val_text, val_tok, names, in_dist, list(excluded), T,
                              max(1, drop_tokens // T), seed)
    if large_cf is None:
        large_cf = 2.0 * max(cfg.eval_capacity_factor or 0.0, cfg.capacity_factor or 0.0) or 4.0
    runs = [(model, s) for s in ("train_cf", "eval_cf", "probability", "larger_cf", "dropless")]
    if compare_model is not None:
        runs += [(compare_model, "compare_train_cf"), (compare_model, "compare_eval_cf")]
    report["drops"] = drop_report(runs, datasets, batch_size, n_bins, large_cf, compare_name)
    log(f"drops: {len(report['drops']['curves'])} routing runs in "
        f"{time.perf_counter() - t0:.1f}s")
    report["summary"] = _summary(report)
    return report


def specialization_report(model: Any, tokenizer: Any, windows: Sequence[Array],
                          names: Sequence[str], excluded: Sequence[str] = (),
                          batch_size: int = 16, min_count: int = 16, n_top: int = 8,
                          seed: int = 0, init_model: Any = None, init_tokens: int = 16384
                          ) -> dict[str, Any]:
    """Finding 1 on held-out windows (``windows[d]`` [n_d, T+1] of domain ``names[d]``):
    predictors, the std measure with shuffled baselines, per-domain predictors, domain
    shares and top tokens per MoE layer; plus the untrained control when ``init_model``
    is given (on up to ``init_tokens`` tokens per domain of the same windows)."""
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
                compare_name: str = "compare") -> dict[str, Any]:
    """Finding 3: every (model, setting) of ``runs`` on every data set of ``datasets``
    (dicts with ``name``, ``title``, ``windows``, ``domain``, ``domain_names`` or
    ``skipped``). Settings: see :func:`_routing_label`."""
    curves = []
    n_positions = 0
    kept_sets = []
    for ds in datasets:
        info = {k: v for k, v in ds.items() if k in ("name", "title", "skipped")}
        kept_sets.append(info)
        if ds.get("skipped"):
            continue
        for m, s in runs:
            label, ov = _routing_label(m.cfg, s, large_cf, compare_name)
            tr = collect_routing(m, ds["windows"], ds["domain"], batch_size, ds["domain_names"],
                                 **ov)
            info["n_tokens"] = tr.n_tokens
            n_positions = max(n_positions, tr.group_len)
            curves.append({"dataset": ds["name"], "setting": s, "label": label,
                           "model": compare_name if s.startswith("compare_") else "main",
                           "capacity_factor": ov["eval_capacity_factor"],
                           "slot_priority": ov.get("slot_priority", m.cfg.slot_priority),
                           **_drop_curve(tr, n_bins)})
    return {"n_positions": n_positions, "n_bins": n_bins, "larger_cf": large_cf,
            "datasets": kept_sets, "curves": curves}


def _at_fraction(early: Mapping[str, Any], frac: float) -> tuple[int, int] | None:
    """Index and step of the first snapshot at or after ``frac`` of the final step and
    before the final one; None when there is none."""
    steps = early["steps"]
    target = frac * early["final_step"]
    for i, s in enumerate(steps[:-1]):
        if s >= target:
            return i, s
    return None


def _summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """One verdict per finding, by fixed rules stated in the text, with the numbers."""
    out: dict[str, Any] = {}
    spec = report["specialization"]["layers"]
    ok = [L["predictors"]["token_id"] > L["predictors"]["majority_class"]
          + max(0.05, 3 * L["predictors"]["sampling_sd"])
          and L["std"]["token_id"]["mean_std"] > 2 * L["std"]["position"]["mean_std"]
          for L in spec]
    out["specialization"] = {
        "reproduced": bool(all(ok)),
        "rule": "in every MoE layer the token-id predictor beats the majority class by more "
                "than max(5 points, 3 sampling sd) and the token-id std is more than twice "
                "the position std",
        "per_layer": [{"layer": L["layer"], "token_id": L["predictors"]["token_id"],
                       "position": L["predictors"]["position"],
                       "majority_class": L["predictors"]["majority_class"],
                       "std_token_id": L["std"]["token_id"]["mean_std"],
                       "std_position": L["std"]["position"]["mean_std"],
                       "untrained_token_id": (L["init"]["predictors"]["token_id"]
                                              if "init" in L else None)} for L in spec]}
    early = report["early_routing"]
    rule = ("at the first snapshot at or after 25% of training (and before the last one), "
            "at least 80% of token occurrences already have their final majority expert in "
            "every layer")
    at = _at_fraction(early, 0.25) if early.get("available") else None
    if at is not None:
        i, step = at
        vals = [L["occurrences"][i] for L in early["layers"]]
        out["early_routing"] = {"reproduced": bool(min(vals) >= 0.8), "step": step,
                                "rule": rule, "agreement_occurrences": vals}
    else:
        out["early_routing"] = {"reproduced": None, "rule": rule,
                                "why": "no snapshots" if not early.get("available") else
                                "no snapshot between 25% of training and the last one"}
    drops = report["drops"]
    per_ds = []
    for ds in drops["datasets"]:
        if ds.get("skipped"):
            continue
        row = {"dataset": ds["name"]}
        for s in ("train_cf", "eval_cf"):
            c = next(c for c in drops["curves"] if c["dataset"] == ds["name"] and c["setting"] == s)
            first, last = c["first_quarter"], c["last_quarter"]
            row[s] = {"first_quarter": first, "last_quarter": last,
                      "towards_end": bool(last >= 0.01 and last > 1.5 * first)}
        per_ds.append(row)
    out["drop_towards_the_end"] = {
        "rule": "drop rate in the last quarter of group positions >= 1% and > 1.5x the "
                "first quarter",
        "datasets": per_ds,
        "reproduced_at_train_cf": [r["dataset"] for r in per_ds if r["train_cf"]["towards_end"]],
        "reproduced_at_eval_cf": [r["dataset"] for r in per_ds if r["eval_cf"]["towards_end"]]}
    return out


