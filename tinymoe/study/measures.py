"""The study's own measures: held-out loss per window (of two models, or of one model with
and without its experts), the spread over seeds, and the scale criteria.

Held-out loss in nats per byte over a set of windows is a ratio of sums,

    L = sum_w nll_w / sum_w bytes_w        (nll_w: summed next-token CE of window w,
                                            bytes_w: UTF-8 bytes of its target tokens)

so its 95% interval is the percentile bootstrap over whole windows
(:func:`tinymoe.analysis.bootstrap_ratio`, :func:`tinymoe.analysis.interval`); the cost
of a change on the same windows is the paired ratio ``sum_w (nll'_w - nll_w) / sum_w
bytes_w`` with its own interval. **Removing the experts** = evaluating at capacity 0
(:data:`ZERO_CAPACITY`: ``C = max(round(1e-9 G / E), 0) = 0``, so every expert
assignment is dropped and an MoE block keeps only its shared FFN and the residual).

The spread over seeds of a final loss is its [min, max] range; the MoE "beats" a dense
model by more than the spread when the two ranges do not overlap (every MoE seed below
every dense seed: :func:`tinymoe.analysis.verdict` with ``direction="less"`` on the
ranges). :func:`scale_criteria` applies the two criteria the study needs before its
findings describe a model whose experts matter.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from tinymoe import backend as B
from tinymoe.analysis import bootstrap_ratio, collect_routing, interval, token_windows, verdict

np = B.np

__all__ = ["ZERO_CAPACITY", "REMOVAL_MIN", "window_losses", "compare_losses", "seed_summary",
           "scale_criteria", "CAVEAT_TAIL"]

# Capacity 0 in eval mode: a positive factor that rounds to 0 slots (0 itself means
# dropless), and no lower bound.
ZERO_CAPACITY = {"eval_capacity_factor": 1e-9, "min_capacity": 0}
REMOVAL_MIN = 0.3            # nats/byte the experts must be worth (scale criterion 1)
CAVEAT_TAIL = "the findings are reported at this scale with that caveat"

Array = Any


def window_losses(model: Any, windows: Array, byte_len: Array, batch_size: int = 16,
                  **overrides: Any) -> dict[str, Any]:
    """Summed next-token CE and target bytes of each window [n, T+1] (model in eval mode,
    routing ``overrides`` as in :func:`tinymoe.analysis.collect_routing`).

    Returns ``nll`` [n], ``bytes`` [n] (windows the routing groups could not take stay 0:
    they weigh nothing in a ratio) and ``kept``: the share of expert assignments kept
    (mean over MoE layers; None for a dense model)."""
    w = np.asarray(windows, dtype=np.int64)
    trace = collect_routing(model, w, None, batch_size, **overrides)
    n = w.shape[0]
    targets = w[trace.window, trace.position + 1]                         # [N]
    nll = np.bincount(trace.window, weights=trace.token_ce, minlength=n)  # [n]
    nbytes = np.bincount(trace.window, weights=np.asarray(byte_len)[targets].astype(np.float64),
                         minlength=n)                                     # [n]
    kept = float(np.mean([k.mean() for k in trace.kept])) if trace.kept else None
    return {"nll": nll, "bytes": nbytes, "kept": kept}


def _ratio(num: Array, den: Array, n_boot: int, seed: int) -> dict[str, float]:
    est, samples = bootstrap_ratio(num, den, n_boot, seed)
    return interval(samples, float(est))


def compare_losses(first: tuple[Any, Mapping[str, Any]], second: tuple[Any, Mapping[str, Any]],
                   val_tok: Mapping[str, Array], byte_len: Array, seq_len: int,
                   n_windows: int, batch_size: int = 16, n_boot: int = 1000, seed: int = 0,
                   progress: Any = None) -> dict[str, Any]:
    """Held-out nats/byte of ``first`` and ``second`` (each ``(model, routing overrides)``)
    on the same ``n_windows`` windows of each domain of ``val_tok``, and the paired
    difference ``first - second``, each with a 95% interval over windows (same resamples
    for all three). Per domain and ``"all"`` (every window of every domain pooled).

    Returns ``{domain: {"first", "second", "diff": interval dicts, "windows", "bytes",
    "kept_first", "kept_second"}}``. ``progress``: an optional callable wrapping the
    domain iterator (a tqdm)."""
    out: dict[str, Any] = {}
    pooled: dict[str, list[Array]] = {"a": [], "b": [], "bytes": []}
    names = list(val_tok)
    for name in (progress(names) if progress is not None else names):
        w = token_windows(val_tok[name], seq_len, n_windows)               # [n, T+1]
        a = window_losses(first[0], w, byte_len, batch_size, **first[1])
        b = window_losses(second[0], w, byte_len, batch_size, **second[1])
        den = b["bytes"]
        out[name] = {"first": _ratio(a["nll"], den, n_boot, seed),
                     "second": _ratio(b["nll"], den, n_boot, seed),
                     "diff": _ratio(a["nll"] - b["nll"], den, n_boot, seed),
                     "windows": int(w.shape[0]), "bytes": int(den.sum()),
                     "kept_first": a["kept"], "kept_second": b["kept"]}
        pooled["a"].append(a["nll"])
        pooled["b"].append(b["nll"])
        pooled["bytes"].append(den)
    a_all, b_all, d_all = (np.concatenate(pooled[k]) for k in ("a", "b", "bytes"))
    out["all"] = {"first": _ratio(a_all, d_all, n_boot, seed),
                  "second": _ratio(b_all, d_all, n_boot, seed),
                  "diff": _ratio(a_all - b_all, d_all, n_boot, seed),
                  "windows": int(d_all.size), "bytes": int(d_all.sum())}
    return out


def seed_summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd, [min, max] and range of one final loss over seeds; ``estimate``/
    ``low``/``high`` = mean/min/max (the interval the study's verdicts use for seeds)."""
    v = [float(x) for x in values]
    if not v or any(not math.isfinite(x) for x in v):
        nan = float("nan")
        return {"n": len(v), "values": v, "mean": nan, "sd": nan, "min": nan, "max": nan,
                "range": nan, "estimate": nan, "low": nan, "high": nan}
    mean = statistics.fmean(v)
    return {"n": len(v), "values": v, "mean": mean,
            "sd": statistics.stdev(v) if len(v) > 1 else float("nan"),
            "min": min(v), "max": max(v), "range": max(v) - min(v),
            "estimate": mean, "low": min(v), "high": max(v)}


def scale_criteria(removal_all: Mapping[str, float], moe: Mapping[str, Any],
                   dense_active: Mapping[str, Any], threshold: float = REMOVAL_MIN
                   ) -> dict[str, Any]:
    """The two conditions under which the study's model is at a scale where the experts
    matter, and the caveat to print when one fails.

    1. ``experts_matter``: removing every expert (capacity 0) costs at least
       ``threshold`` nats/byte on held-out text: the 95% interval of the pooled cost
       ``removal_all`` lies above ``threshold`` (low end > threshold).
    2. ``beats_dense_active``: the MoE's final held-out loss beats the dense model of
       equal active parameters by more than the seed spread: the [min, max] ranges over
       seeds do not overlap (MoE max < dense min); needs >= 2 seeds of each (else None).

    Returns ``{"experts_matter", "beats_dense_active" (True / False / None), "met",
    "reasons" [str], "caveat" (None when met), "rules"}``.
    """
    reasons: list[str] = []
    low = removal_all.get("low")
    if low is None or not math.isfinite(float(low)):
        matter: bool | None = None
        reasons.append("the expert-removal cost was not measured")
    else:
        matter = bool(float(low) > threshold)
        if not matter:
            reasons.append(f"removing every expert costs {removal_all['estimate']:.3f} "
                           f"nats/byte (95% interval {removal_all['low']:.3f} to "
                           f"{removal_all['high']:.3f}), not clearly >= {threshold:g}")
    if min(int(moe["n"]), int(dense_active["n"])) < 2:
        beats: bool | None = None
        reasons.append(f"the MoE-vs-dense comparison has {min(moe['n'], dense_active['n'])} "
                       "seed(s): its seed spread is unknown (needs >= 2)")
    else:
        beats = verdict(moe, dense_active, "less")
        if not beats:
            reasons.append(f"the MoE (final {moe['mean']:.3f} nats/byte, seeds "
                           f"{moe['min']:.3f} to {moe['max']:.3f}) does not beat the dense "
                           f"model of equal active parameters ({dense_active['mean']:.3f}, "
                           f"seeds {dense_active['min']:.3f} to {dense_active['max']:.3f}) "
                           "by more than the seed spread")
    met = matter is True and beats is True
    caveat = None if met else "caveat: " + "; ".join(reasons) + f": {CAVEAT_TAIL}."
    return {"experts_matter": matter, "beats_dense_active": beats, "met": met,
            "reasons": reasons, "caveat": caveat, "threshold": threshold,
            "rules": {"experts_matter": f"95% interval of the pooled capacity-0 cost lies "
                                        f"above {threshold:g} nats/byte",
                      "beats_dense_active": "MoE's [min, max] final loss over seeds lies "
                                            "entirely below the dense-equal-active model's"}}
