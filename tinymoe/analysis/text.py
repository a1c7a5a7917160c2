"""The terminal text of a report: plain tables of the numbers in ``analysis.json``.

:func:`format_report` reads only the JSON-ready report built by :mod:`.report` (or that
report reloaded from ``analysis.json``: NaN then reads back as None and prints as "-"),
so every number it prints is in the JSON. Computes nothing new and runs no model.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from tinymoe.analysis.report import cf_label

__all__ = ["format_report"]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = []
    for i, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j])
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
        out.append(f"Share of the probe batch whose majority top-1 expert equals the one at the "
                   f"final step {early['final_step']} (occurrences / ids; chance "
                   f"{_pct(early['chance'])}):")
        header = ["step"] + [f"block {L['layer']}" for L in early["layers"]]
        rows = [[str(s)] + [f"{_pct(L['occurrences'][i])} / {_pct(L['ids'][i])}"
                            for L in early["layers"]] for i, s in enumerate(early["steps"])]
        out.append(_table(header, rows))

    drops = report["drops"]
    out.append("")
    out.append(f"== 3. Drop-towards-the-end (positions 0..{drops['n_positions'] - 1} of a routing "
               "group; all MoE layers) ==")
    rows = []
    for ds in drops["datasets"]:
        if ds.get("skipped"):
            continue
        for c in drops["curves"]:
            if c["dataset"] != ds["name"]:
                continue
            first, last = c["first_quarter"], c["last_quarter"]
            ratio = last / first if first and last is not None else float("nan")
            rows.append([ds["name"], c["label"], _pct(c["overall"], 2),
                         _pct(c["first_quarter"], 2), _pct(c["last_quarter"], 2),
                         _num(ratio, 1) if ratio == ratio else ("inf" if last else "-"),
                         _pct(c["first_choice"]["overall"], 2), _num(c["ce"])])
    out.append(_table(["data", "setting", "dropped", "first quarter", "last quarter",
                       "last/first", "1st choices dropped", "CE"], rows))
    for ds in drops["datasets"]:
        if ds.get("skipped"):
            out.append(f"{ds['title']}: skipped ({ds['skipped']})")

    summ = report.get("summary")
    if summ:
        out.append("")
        out.append("== Findings (rules in analysis.json, summary) ==")
        sp = summ["specialization"]
        out.append(f"context-independent specialization: "
                   f"{'REPRODUCED' if sp['reproduced'] else 'NOT reproduced'} "
                   + "; ".join(f"block {r['layer']}: id {_pct(r['token_id'])} vs position "
                               f"{_pct(r['position'])} vs majority {_pct(r['majority_class'])}, "
                               f"std {_num(r['std_token_id'])} vs {_num(r['std_position'])}"
                               + (f" (untrained control: id {_pct(r['untrained_token_id'])})"
                                  if r.get("untrained_token_id") is not None else "")
                               for r in sp["per_layer"]))
        er = summ["early_routing"]
        if er["reproduced"] is None:
            out.append(f"early routing learning: not measured ({er['why']})")
        else:
            verdict = "REPRODUCED" if er["reproduced"] else "NOT reproduced"
            out.append(f"early routing learning: {verdict}"
                       f" (agreement at step {er['step']}: "
                       + ", ".join(_pct(v) for v in er["agreement_occurrences"]) + ")")
        dt = summ["drop_towards_the_end"]
        out.append("drop-towards-the-end: at the train cf on "
                   + (", ".join(dt["reproduced_at_train_cf"]) or "no data set")
                   + "; at the eval cf on "
                   + (", ".join(dt["reproduced_at_eval_cf"]) or "no data set"))
    if report.get("figures"):
        out.append("")
        out.append("figures: " + ", ".join(report["figures"].values()))
    if "wall_seconds" in report:
        out.append(f"analysis wall time: {report['wall_seconds']:.1f}s")
    return "\n".join(out)


