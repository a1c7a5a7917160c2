"""The terminal text of a report: plain tables of the numbers in ``analysis.json``.

:func:`format_report` reads only the JSON-ready report built by :mod:`.report` (or that
report reloaded from ``analysis.json``: NaN then reads back as None and prints as "-"),
so every number it prints is in the JSON. Computes nothing new and runs no model.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from tinymoe.analysis.report import cf_label

__all__ = ["format_report", "findings_lines", "format_markdown"]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A plain text table: the first ``left`` columns left-aligned, the others right-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = []
    for i, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[j]) if j < left else c.rjust(widths[j])
                               for j, c in enumerate(r)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{100 * v:.{digits}f}%"


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.{digits}f}"


def _ci(v: Any, digits: int = 1, pct: bool = True) -> str:
    """``"37.5% [36.9, 38.1]"``: an interval dict as estimate [low, high]; "-" if absent."""
    if not v:
        return "-"
    f = (lambda x: _pct(x, digits)) if pct else (lambda x: _num(x, digits))
    lo, hi = f(v.get("low")), f(v.get("high"))
    if pct:
        lo, hi = lo.rstrip("%"), hi.rstrip("%")
    return f"{f(v.get('estimate'))} [{lo}, {hi}]"


def _verdict(v: Any) -> str:
    return {True: "PASS", False: "fail"}.get(v, "undecided")


def findings_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The findings table (finding, measure, effect, baseline, 95% intervals, verdict)."""
    if not rows:
        return []
    out = ["== Findings: effect against baseline, 95% bootstrap intervals ==",
           "(PASS iff the effect's interval lies entirely above the baseline's; rules in "
           "analysis.json, summary)"]
    pct = lambda r: "CE" not in r["measure"]  # noqa: E731
    out.append(_table(["finding", "measure", "effect [95% CI]", "baseline", "baseline [95% CI]",
                       "verdict"],
                      [[r["finding"], r["measure"], _ci(r["effect"], 1, pct(r)),
                        r["baseline_name"], _ci(r["baseline"], 1, pct(r)), _verdict(r["verdict"])]
                       for r in rows], left=2))
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """The terminal text of a report (works on the report or on its JSON reloaded)."""
    out: list[str] = []
    cfg = report["config"]
    if "checkpoint" in report:
        out.append(f"checkpoint: {report['checkpoint']} (step {report.get('step', '?')})")
    out.append(f"model: {cfg['describe']}")
    data = report["data"]
    out.append(f"data: {data['source']}; held-out tokens per domain: "
               + ", ".join(f"{k} {v:,}" for k, v in data["val_tokens"].items())
               + (f"; left out of training: {', '.join(data['excluded_in_training'])}"
                  if data["excluded_in_training"] else "; every domain was seen in training"))

    spec = report["specialization"]
    E = spec["n_experts"]
    out.append("")
    out.append(f"== 1. Context-independent specialization ({spec['n_tokens']:,} held-out tokens, "
               f"E={E}, top-1 expert, eval {cf_label(spec['capacity_factor'])}, "
               f"CE {_num(spec['ce'])}) ==")
    out.append("Majority-expert predictors (fit on even windows, scored on odd windows):")
    def pred_row(name: str, p: Mapping[str, Any]) -> list[str]:
        return [name, _pct(p["token_id"]), _pct(p["position"]), _pct(p["majority_class"]),
                _pct(p["chance"]), _pct(p["sampling_sd"], 2), _num(p.get("token_id_skill"), 2),
                _num(p.get("position_skill"), 2), _pct(p["token_id_coverage"])]

    rows = [pred_row(f"block {L['layer']}", L["predictors"]) for L in spec["layers"]]
    rows += [pred_row(f"block {L['layer']}, untrained", L["init"]["predictors"])
             for L in spec["layers"] if "init" in L]
    out.append(_table(["layer", "token id", "position", "majority class", "chance 1/E",
                       "sd(chance)", "id skill", "pos skill", "id coverage"], rows))
    out.append("(skill = (accuracy - majority class) / (1 - majority class): share of the "
               "majority-class errors that the feature removes)")
    if all("statistics" in L for L in spec["layers"]):
        out.append("")
        out.append("Token-id predictor against its baselines (95% intervals over score windows; "
                   "shuffled = experts permuted across tokens, the id predictor's score "
                   "without specialization):")
        rows = []
        for L in spec["layers"]:
            st = L["statistics"]
            ist = L.get("init", {}).get("statistics")
            rows.append([f"block {L['layer']}", _ci(st["token_id"]), _ci(st["shuffled"]),
                         _ci(st["position"]), _ci(st["skill"]),
                         _ci(ist["token_id"]) if ist else "-",
                         _ci(ist["shuffled"]) if ist else "-", _ci(ist["skill"]) if ist else "-"])
        out.append(_table(["layer", "token id", "shuffled labels", "position", "id skill",
                           "untrained: token id", "shuffled", "id skill"], rows))
        out.append("(id skill = (token id - shuffled) / (1 - shuffled): share of the load-only "
                   "predictor's errors that the id removes; what training adds = trained skill "
                   "against the untrained router's)")
    out.append("")
    max_std = spec["layers"][0]["std"]["token_id"]["max_std"]
    out.append(f"Paper's measure: std across experts of each key's top-1 distribution, mean over "
               f"keys seen >= {spec['min_count']} times (max {_num(max_std)} = always one "
               "expert):")
    rows = []
    for L in spec["layers"]:
        s = L["std"]
        rows.append([f"block {L['layer']}", _num(s["token_id"]["mean_std"]),
                     _num(s["token_id_shuffled"]["mean_std"]), s["token_id"]["n_keys"],
                     _pct(s["token_id"]["token_share"]), _num(s["position"]["mean_std"]),
                     _num(s["position_shuffled"]["mean_std"]), s["position"]["n_keys"],
                     _num(s["token_id_topk"]["mean_std"])])
    for L in spec["layers"]:
        if "init" in L:
            i = L["init"]
            shuffled = [_num(i[k]["mean_std"]) if k in i else ""
                        for k in ("std_token_id_shuffled", "std_position_shuffled")]
            rows.append([f"block {L['layer']}, untrained", _num(i["std_token_id"]["mean_std"]),
                         shuffled[0], i["std_token_id"]["n_keys"],
                         _pct(i["std_token_id"]["token_share"]),
                         _num(i["std_position"]["mean_std"]), shuffled[1],
                         i["std_position"]["n_keys"], ""])
    out.append(_table(["layer", "token ids", "shuffled", "#ids", "tokens covered", "positions",
                       "shuffled", "#pos", f"ids, top-{spec['top_k']}"], rows))
    out.append("")
    out.append("Token-id predictor within each domain (token id / position / majority class):")
    rows = [[f"block {L['layer']}"] + [
        f"{_pct(v['token_id'], 0)} / {_pct(v['position'], 0)} / {_pct(v['majority_class'], 0)}"
        if v else "-" for v in (L["per_domain"].get(d) for d in spec["domains"])]
        for L in spec["layers"]]
    out.append(_table(["layer"] + spec["domains"], rows))
    for L in spec["layers"]:
        out.append("")
        out.append(f"Expert share by domain, block {L['layer']} (all top-{spec['top_k']} "
                   "choices; uniform = " + _pct(1 / E) + "; largest deviation from uniform "
                   + _pct(L.get("domain_share_max_deviation")) + "):")
        rows = [[d] + [_pct(v, 1) for v in L["domain_share"][j]]
                for j, d in enumerate(spec["domains"])]
        out.append(_table(["domain"] + [f"e{e}" for e in range(E)], rows))
    for L in spec["layers"]:
        out.append("")
        out.append(f"Top tokens per expert, block {L['layer']} (most frequent [share of the "
                   f"expert's tokens] | most specific [P(expert|id), ids seen >= "
                   f"{spec['min_count']}x]):")
        rows = []
        for t in L["top_tokens"]:
            freq = " ".join(f"{i['text']}[{_pct(i['share'], 0)}]" for i in t["frequent"][:5])
            specific = " ".join(f"{i['text']}[{_pct(i['p'], 0)}]" for i in t["specific"][:5])
            rows.append([f"e{t['expert']}", f"{t['n_tokens']:,}", freq, specific])
        out.append(_table(["expert", "tokens", "most frequent", "most specific"], rows))

    early = report["early_routing"]
    out.append("")
    out.append("== 2. Early routing learning ==")
    if not early.get("available"):
        out.append(f"not measured: {early.get('note', '')}")
    else:
        if early.get("note"):
            out.append(early["note"])
        probe = early.get("probe")
        if probe:
            out.append(f"probe batch: {probe['n_tokens']:,} tokens in {probe['n_sequences']} "
                       f"sequences, {probe['n_ids']} distinct ids; {len(early['steps'])} "
                       "snapshots (recommended: one at least every 5% of training, "
                       "--snapshot-every)")
        sizes = {L["layer"]: L.get("probe_ceiling") for L in spec["layers"]}
        if any(sizes.values()):
            out.append("Ceiling of the majority measures against the probe size (this model's "
                       "routing of held-out windows, split halves; occurrence-weighted / per id):")
            ns = [r["per_domain"] for r in next(v for v in sizes.values() if v)]
            rows = [[f"block {layer}"] + [f"{_pct(r['occurrences'])} / {_pct(r['ids'])}"
                                          for r in v] for layer, v in sizes.items() if v]
            out.append(_table(["layer"] + [f"{n} windows/domain" for n in ns], rows))
            ok = [n for n in ns if all(min(r["occurrences"], r["ids"]) >= 0.95
                                       for v in sizes.values() if v
                                       for r in v if r["per_domain"] == n)]
            out.append("smallest probe reaching a 95% ceiling in every layer: "
                       + (f"{ok[0]} windows per domain" if ok else
                          f"none up to {ns[-1]} windows per domain"))
        for L in early["layers"]:
            if "ceiling" in L:
                c = L["ceiling"]
                out.append(f"block {L['layer']}: ceiling of the majority measures (final "
                           f"routing against itself on split halves of the probe): "
                           f"occurrence-weighted {_pct(c['occurrences']['estimate'])}, per id "
                           f"{_pct(c['ids']['estimate'])}"
                           + ("" if L.get("probe_ok") else
                              " -- below 95%: the probe is too small for these measures "
                              "to separate early from late routing"))
        out.append(f"Agreement with the final routing (step {early['final_step']}; chance "
                   f"{_pct(early['chance'])}). per token: share of probe tokens with the same "
                   "top-1 expert [95% interval over probe sequences; ceiling 100%]; occ./ids: "
                   "majority expert per id on split halves, occurrence-weighted / each id "
                   "once (compare with the ceiling above):")
        header = ["step"] + (["train CE"] if "loss" in early else [])
        for L in early["layers"]:
            header += [f"block {L['layer']} per token", "occ. / ids (split halves)"]
        rows = []
        for i, s in enumerate(early["steps"]):
            r = [str(s)] + ([_num(early["loss"][i])] if "loss" in early else [])
            for L in early["layers"]:
                r.append(_ci(L["tokens_interval"][i]) if "tokens_interval" in L
                         else _pct(L["tokens"][i]))
                r.append(f"{_pct(L['split_half']['occurrences'][i]['estimate'])} / "
                         f"{_pct(L['split_half']['ids'][i]['estimate'])}" if "split_half" in L
                         else f"{_pct(L['occurrences'][i])} / {_pct(L['ids'][i])} (full probe)")
            rows.append(r)
        out.append(_table(header, rows))

    drops = report["drops"]
    out.append("")
    out.append(f"== 3. Drop-towards-the-end (positions 0..{drops['n_positions'] - 1} of a routing "
               "group; all MoE layers) ==")
    out.append("Dropped share of expert assignments; gap = last minus first quarter of the "
               "group [95% interval over routing groups]; random = balanced random routing at "
               "the same E, k, group size, capacity and slot priority:")
    rows = []
    for ds in drops["datasets"]:
        if ds.get("skipped"):
            continue
        for c in drops["curves"]:
            if c["dataset"] != ds["name"]:
                continue
            st, base = c.get("stats"), c.get("baseline")
            rows.append([ds["name"], c["label"], _pct(c["overall"], 1),
                         _pct(c["first_quarter"], 1), _pct(c["last_quarter"], 1),
                         _pct(st["rank0"]["overall"]["estimate"], 1) if st else
                         _pct(c["first_choice"]["overall"], 1),
                         _pct(st["rank1"]["overall"]["estimate"], 1)
                         if st and "rank1" in st else "-",
                         _ci(st["all"]["gap"]) if st else "-",
                         _ci(base["all"]["gap"]) if base else "-", _num(c["ce"])])
    out.append(_table(["data", "setting", "dropped", "first quarter", "last quarter",
                       "1st choices", "2nd choices", "gap", "gap, random routing", "CE"], rows))
    exp = {}
    for c in drops["curves"]:
        if c.get("baseline", {}).get("expected") and c["model"] == "main":
            exp.setdefault((c["baseline"]["group_size"], c["baseline"]["capacity"]), c)
    if exp:
        out.append("")
        out.append("Expected drops from load fluctuation alone (exact, balanced random routing, "
                   "position priority; slot S = Bin(p, (r+1)/E) + Bin(G-1-p, r/E), dropped iff "
                   "S >= C):")
        rows = []
        for (g, cap), c in exp.items():
            e = c["baseline"]["expected"]
            rows.append([f"G={g}, C={cap}", _pct(e["all"]["overall"]),
                         _pct(e["all"]["first_quarter"]), _pct(e["all"]["last_quarter"]),
                         _pct(e["rank0"]["overall"]),
                         _pct(e["rank1"]["overall"]) if "rank1" in e else "-"])
        out.append(_table(["group, capacity", "dropped", "first quarter", "last quarter",
                           "1st choices", "2nd choices"], rows))
    costs = [(ds["name"], st, v) for ds in drops["datasets"] if ds.get("ce_cost")
             for st, v in ds["ce_cost"].items()]
    if costs:
        out.append("")
        out.append("Loss cost of the drops: per-token CE at the setting minus CE dropless on the "
                   "same tokens, by quarter of the routing group (nats; [95% interval over "
                   "groups]):")
        rows = [[n, st, _ci(v["overall"], 3, False)] + [_ci(b, 3, False) for b in v["bins"]]
                for n, st, v in costs]
        out.append(_table(["data", "setting", "all", "Q1", "Q2", "Q3", "Q4"], rows))
    if drops.get("effects"):
        out.append("")
        out.append("Data sets against each other at the eval cf (difference of drop rates "
                   "[95% interval]):")
        rows = [[f"{e['dataset']} - {e['against']}", _ci(e["all"]["overall"]),
                 _ci(e["all"]["last_quarter"]), _ci(e["all"]["gap"]),
                 _ci(e["first_choice"]["overall"])] for e in drops["effects"]]
        out.append(_table(["data", "dropped", "last quarter", "gap", "1st choices dropped"],
                          rows))
    for ds in drops["datasets"]:
        if ds.get("skipped"):
            out.append(f"{ds['title']}: skipped ({ds['skipped']})")

    summ = report.get("summary")
    if summ:
        out.append("")
        out.append("== Verdicts (rules in analysis.json, summary) ==")
        sp = summ["specialization"]
        out.append("context-independent specialization: "
                   + {True: "REPRODUCED", False: "NOT reproduced"}.get(sp["reproduced"],
                                                                       "not measured")
                   + "; " + "; ".join(
                       f"block {r['layer']}: id {_pct(r['token_id'])} vs position "
                       f"{_pct(r['position'])} vs majority {_pct(r['majority_class'])}"
                       + (f" (untrained: id {_pct(r['untrained_token_id'])})"
                          if r.get("untrained_token_id") is not None else "")
                       for r in sp["per_layer"])
                   + "; training adds to it: "
                   + {True: "yes", False: "no (not beyond the untrained router)"}.get(
                       sp.get("training_adds"), "not measured"))
        er = summ["early_routing"]
        if "agreement_tokens" not in er:
            out.append(f"early routing learning: not measured ({er['why']})")
        else:
            out.append("early routing learning: "
                       + {True: "REPRODUCED", False: "NOT reproduced"}.get(er["reproduced"],
                                                                           "undecided")
                       + f" (per-token agreement at step {er['step']}, "
                       f"{er['fraction']:.0%} of training: "
                       + ", ".join(_ci(v) for v in er["agreement_tokens"])
                       + "; threshold 90% of the ceiling 100%)")
        dt = summ["drop_towards_the_end"]
        out.append("drop-towards-the-end beyond random routing: at the train cf on "
                   + (", ".join(dt["reproduced_at_train_cf"]) or "no data set")
                   + "; at the eval cf on "
                   + (", ".join(dt["reproduced_at_eval_cf"]) or "no data set")
                   + "; with paper-like groups on "
                   + (", ".join(dt.get("reproduced_at_paper_group", [])) or "no data set"))
    if report.get("findings"):
        out.append("")
        out += findings_lines(report["findings"])
    if report.get("figures"):
        out.append("")
        out.append("figures: " + ", ".join(report["figures"].values()))
    if "wall_seconds" in report:
        out.append(f"analysis wall time: {report['wall_seconds']:.1f}s")
    return "\n".join(out)




def format_markdown(report: Mapping[str, Any]) -> str:
    """``analysis.md``: the findings table as a markdown table, then the full text report
    in a code block (both read only the JSON-ready report)."""
    lines = ["# Routing analysis", ""]
    if "checkpoint" in report:
        lines += [f"checkpoint: `{report['checkpoint']}` (step {report.get('step', '?')})", ""]
    rows = report.get("findings") or []
    if rows:
        lines += ["## Findings", "",
                  "Each row: an effect against a baseline with 95% bootstrap intervals; "
                  "PASS iff the effect's interval lies entirely above the baseline's.", "",
                  "| finding | measure | effect [95% CI] | baseline | baseline [95% CI] | "
                  "verdict |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['finding']} | {r['measure']} | {_ci(r['effect'])} | "
                         f"{r['baseline_name']} | {_ci(r['baseline'])} | "
                         f"{_verdict(r['verdict'])} |")
        lines.append("")
    figs = report.get("figures") or {}
    for name, path in figs.items():
        lines.append(f"![{name}]({path.rsplit('/', 1)[-1]})")
    lines += ["", "## Full report", "", "```", format_report(report), "```", ""]
    return "\n".join(lines)
