"""Baselines, bootstrap intervals and verdicts: every finding as an effect against a baseline.

A number such as "the last quarter of a group loses 22% of its assignments" says nothing
until it is set against what routing *without* the property would give. This module holds
the pure statistics that do that (plain host arrays in, numbers out; no model, no files):

* **intervals** (:func:`bootstrap_ratio`): percentile bootstrap intervals of ratios of sums
  (drop rates, accuracies, agreements), resampling whole *units* (routing groups, windows,
  probe sequences) with replacement, because tokens inside one unit are not independent
  (they share one group's capacity, one window's text);
* **the random-routing baseline** (:func:`simulate_random_routing`,
  :func:`expected_drop_by_position`): balanced random routing at the model's E, k, group size,
  capacity and slot priority, simulated with :func:`tinymoe.routing.route` itself on random
  logits, and the exact drop probability of such routing under position priority (a small
  binomial formula, see :func:`expected_drop_by_position`);
* **the verdict rule** (:func:`verdict`), one rule for every finding::

      PASS  iff  effect interval low  >  baseline interval high
      (for a "lower than" finding: effect high < baseline low)

  i.e. the two 95% intervals do not overlap and the effect is on the claimed side. This is
  stricter than "the interval of the difference excludes 0"; a finding that passes it is
  not a sampling accident at the sizes measured. Intervals are percentile bootstrap
  intervals (level 95% unless told), over the units named in each section.

The known-answer tests (tests/test_findings.py) run these rules on synthetic routing:
random routing must NOT pass drop-towards-the-end, a position-only router must NOT pass
token specialization; a router that drops late tokens more than random does, and a
router that routes by token id, must pass.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from tinymoe import backend as B
from tinymoe import routing

np = B.np

__all__ = [
    "interval", "verdict", "unit_ids", "unit_sums", "resample_weights", "bootstrap_ratio",
    "simulate_random_routing", "expected_drop_by_position", "expected_drop_summary",
    "drop_unit_table", "drop_statistics", "random_drop_baseline", "drop_difference",
    "predictor_correct", "specialization_statistics", "split_half_agreement",
    "token_agreement", "ce_cost_by_position", "ceiling_by_probe_size", "LEVEL", "N_BOOT",
]

Array = Any
LEVEL = 0.95        # interval level of every verdict
N_BOOT = 1000       # bootstrap resamples


# =====================================================================================
# intervals and the verdict rule
# =====================================================================================

def interval(samples: Array, estimate: float, level: float = LEVEL) -> dict[str, float]:
    """Percentile interval of bootstrap ``samples`` [n_boot] around ``estimate`` (the value
    on the full data): ``{"estimate", "low", "high", "level"}``. NaN samples (an empty
    resample) are left out; all-NaN gives a NaN interval."""
    s = np.asarray(samples, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size == 0:
        lo = hi = float("nan")
    else:
        a = (1.0 - level) / 2.0
        lo, hi = (float(v) for v in np.quantile(s, [a, 1.0 - a]))
    return {"estimate": float(estimate), "low": lo, "high": hi, "level": float(level)}


def verdict(effect: Mapping[str, float], baseline: Mapping[str, float],
            direction: str = "greater") -> bool | None:
    """The one verdict rule of the analysis.

    ``direction="greater"``: True iff ``effect["low"] > baseline["high"]`` (the effect's
    interval lies entirely above the baseline's); ``"less"``: True iff
    ``effect["high"] < baseline["low"]``. None when either interval is NaN (not measured).
    """
    vals = (effect["low"], effect["high"], baseline["low"], baseline["high"])
    if any(v is None or not math.isfinite(float(v)) for v in vals):
        return None
    if direction == "greater":
        return bool(effect["low"] > baseline["high"])
    if direction == "less":
        return bool(effect["high"] < baseline["low"])
    raise ValueError(f"direction must be 'greater' or 'less', got {direction!r}")


def unit_ids(group_pos: Array) -> Array:
    """Index of the routing group of each token, from positions in the group [N] listed
    group after group (a new group starts where the position is 0): ``cumsum(pos == 0) - 1``."""
    pos = np.asarray(group_pos).reshape(-1)
    return np.cumsum(pos == 0) - 1                                         # [N]


def unit_sums(values: Array, units: Array, n_units: int | None = None) -> Array:
    """Sums of ``values`` [N] or [N, S] over each unit: [U] or [U, S]."""
    u = np.asarray(units, dtype=np.int64).reshape(-1)
    n = int(u.max()) + 1 if n_units is None else int(n_units)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        return np.bincount(u, weights=v, minlength=n)                     # [U]
    return np.stack([np.bincount(u, weights=v[:, j], minlength=n)
                     for j in range(v.shape[1])], axis=1)                 # [U, S]


def resample_weights(n_units: int, n_boot: int = N_BOOT, seed: int = 0) -> Array:
    """How often each unit is drawn in each bootstrap resample: ``[n_boot, U]`` counts,
    each row a draw of U units with replacement (multinomial with equal probabilities)."""
    rng = B.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot)  # [nb, U]


def bootstrap_ratio(num: Array, den: Array, n_boot: int = N_BOOT, seed: int = 0,
                    weights: Array | None = None) -> tuple[Array, Array]:
    """Ratio of sums and its bootstrap resamples over units.

    num, den [U] or [U, S] per-unit sums. Returns ``(estimate [S], samples [n_boot, S])``
    with ``estimate = sum_u num / sum_u den`` and each sample the same ratio over a
    resample of the units (``weights`` [n_boot, U] from :func:`resample_weights`, drawn
    here from ``seed`` if not given; pass the same weights to pair two statistics).
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    squeeze = num.ndim == 1
    if squeeze:
        num, den = num[:, None], den[:, None]                             # [U, 1]
    if weights is None:
        weights = resample_weights(num.shape[0], n_boot, seed)            # [nb, U]
    with np.errstate(invalid="ignore", divide="ignore"):
        est = num.sum(axis=0) / den.sum(axis=0)                           # [S]
        samples = (weights @ num) / (weights @ den)                       # [nb, S]
    if squeeze:
        return est[0], samples[:, 0]
    return est, samples


# =====================================================================================
# the random-routing baseline and the load-fluctuation formula
# =====================================================================================

def simulate_random_routing(n_groups: int, group_size: int, n_experts: int, top_k: int,
                            capacity_factor: float | None, min_capacity: int = 4,
                            capacity_mode: str = "openmoe", priority: str = "position",
                            seed: int = 0) -> tuple[Array, Array]:
    """Balanced random routing, through the model's own routing code.

    Logits ``z ~ N(0, 1)`` iid ``[n_groups * G, E]`` (so each token's top-k is a uniformly
    random ordered set of k distinct experts, and every expert is equally loaded on
    average) routed by :func:`tinymoe.routing.route` with the given group size, capacity
    factor, capacity formula and slot priority. Returns ``(kept [N, k] bool, group_pos [N])``.
    """
    rng = B.default_rng(seed)
    z = rng.standard_normal((n_groups * group_size, n_experts))            # [N, E]
    r = routing.route(z, top_k, capacity_factor, group_size, min_capacity, capacity_mode,
                      priority, rng=rng)
    pos = np.arange(n_groups * group_size, dtype=np.int64) % group_size   # [N]
    return np.asarray(r.kept), pos


def _log_binom_pmf(n: int, q: float, s: Array, logfact: Array) -> Array:
    """log P(Bin(n, q) = s) for an int array s (-inf outside 0..n)."""
    s = np.asarray(s, dtype=np.int64)
    ok = (s >= 0) & (s <= n)
    sc = np.clip(s, 0, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = math.log(q) if q > 0 else -math.inf
        l1q = math.log1p(-q) if q < 1 else -math.inf
        out = (logfact[n] - logfact[sc] - logfact[n - sc]
               + np.where(sc > 0, sc * lq, 0.0) + np.where(n - sc > 0, (n - sc) * l1q, 0.0))
    return np.where(ok, out, -np.inf)


def expected_drop_by_position(group_size: int, n_experts: int, top_k: int,
                              capacity: int) -> Array:
    """Exact drop probability of balanced random routing under position priority.

    Each token picks a uniformly random ordered set of k distinct experts, independently.
    With OpenMoE's k-major position order, the rank-r choice (r = 0 first) of the token at
    position p (0..G-1) to expert e waits behind (a) every other token's choices of rank
    < r, and (b) the rank-r choices of the p earlier tokens. An earlier token j < p puts
    one of these in e's queue with probability (r+1)/E (e among its first r+1 choices), a
    later token with probability r/E (e among its first r); the token's own earlier
    choices are not e. So its slot is

        S = Bin(p, (r+1)/E) + Bin(G-1-p, r/E),     dropped  iff  S >= C,

    two independent binomials. Returns ``P(drop)`` as ``[G, k]`` (position, rank). Rank 0
    is ``P(Bin(p, 1/E) >= C)``: zero until the expected first-choice load p/E nears C, then
    rising towards the end of the group: the position effect of *load fluctuation alone*.
    Its size shrinks as the group grows (the binomial's spread is sqrt(G) against a mean of
    G), so a fixed cf drops less in long groups.
    """
    G, E, k, C = int(group_size), int(n_experts), int(top_k), int(capacity)
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, G + 1)))])  # [G+1]
    out = np.zeros((G, k))
    s = np.arange(C)                                                      # slots 0..C-1
    for r in range(k):
        q1, q2 = (r + 1) / E, r / E
        for p in range(G):
            m = G - 1 - p
            a = np.exp(_log_binom_pmf(p, min(q1, 1.0), s, logfact))      # P(A = a), a < C
            if q2 == 0:
                keep = a.sum()                                            # P(A < C)
            else:
                b = np.exp(_log_binom_pmf(m, min(q2, 1.0), s, logfact))  # P(B = b), b < C
                cdf_b = np.cumsum(b)                                      # P(B <= b)
                keep = float((a * cdf_b[::-1]).sum())                    # sum_a P(A=a) P(B<=C-1-a)
            out[p, r] = max(0.0, 1.0 - float(keep))
    return out                                                            # [G, k]


def expected_drop_summary(group_size: int, n_experts: int, top_k: int, capacity: int
                          ) -> dict[str, Any]:
    """:func:`expected_drop_by_position` in the report's terms: overall, first and last
    quarter of group positions, for all choices and per rank; plus the curve [G]."""
    p = expected_drop_by_position(group_size, n_experts, top_k, capacity)  # [G, k]
    G = p.shape[0]
    q = np.arange(G) * 4 // G                                              # quarter [G]
    out: dict[str, Any] = {"capacity": int(capacity), "curve": p.mean(axis=1).tolist()}
    for name, cols in [("all", slice(None))] + [(f"rank{r}", slice(r, r + 1))
                                                for r in range(p.shape[1])]:
        v = p[:, cols].mean(axis=1)                                         # [G]
        out[name] = {"overall": float(v.mean()), "first_quarter": float(v[q == 0].mean()),
                     "last_quarter": float(v[q == 3].mean())}
    return out


# =====================================================================================
# drops with intervals
# =====================================================================================

def drop_unit_table(kept: Array, group_pos: Array, group_len: int, units: Array,
                    n_units: int | None = None) -> tuple[Array, Array]:
    """Per unit and quarter of group positions, dropped and all assignments of each column.

    kept [N, m] (m = layers * k columns); group_pos [N] in 0..group_len-1; units [N].
    Returns ``(dropped [U, 4, m], assignments [U, 4, m])`` (float64 counts).
    """
    kept = np.asarray(kept, dtype=bool)
    if kept.ndim == 1:
        kept = kept[:, None]
    q = np.asarray(group_pos).reshape(-1) * 4 // int(group_len)           # [N] in 0..3
    u = np.asarray(units, dtype=np.int64).reshape(-1)
    n_u = int(u.max()) + 1 if n_units is None else int(n_units)
    key = u * 4 + q                                                       # [N]
    drop = np.stack([np.bincount(key, weights=(~kept[:, j]).astype(np.float64),
                                 minlength=n_u * 4) for j in range(kept.shape[1])], axis=1)
    n = np.bincount(key, minlength=n_u * 4).astype(np.float64)            # [U*4]
    m = kept.shape[1]
    return drop.reshape(n_u, 4, m), np.repeat(n[:, None], m, axis=1).reshape(n_u, 4, m)


def drop_statistics(kept: Array, group_pos: Array, group_len: int, top_k: int,
                    units: Array | None = None, n_boot: int = N_BOOT, seed: int = 0
                    ) -> dict[str, Any]:
    """Drop rates with bootstrap intervals over routing groups.

    kept [N, L*k]: columns layer-major (layer 0's k ranks, then layer 1's ...), as
    :meth:`RoutingTrace.all_kept` gives. For ``all`` assignments and for each rank
    (``rank0`` = first choices, ``rank1`` = second choices ...): ``overall``,
    ``first_quarter``, ``last_quarter`` drop rates and ``gap`` = last - first quarter (the
    towards-the-end effect), each an :func:`interval`. Units: the routing groups
    (``units`` [N], default :func:`unit_ids` of ``group_pos``), resampled with
    replacement; all statistics share one set of resamples.
    """
    units = unit_ids(group_pos) if units is None else np.asarray(units)
    drop, n = drop_unit_table(kept, group_pos, group_len, units)           # [U, 4, m]
    m = drop.shape[2]
    w = resample_weights(drop.shape[0], n_boot, seed)                     # [nb, U]
    out: dict[str, Any] = {"n_units": int(drop.shape[0])}
    groups = [("all", np.arange(m))] + [(f"rank{r}", np.arange(r, m, top_k))
                                        for r in range(top_k)]
    for name, cols in groups:
        d = drop[:, :, cols].sum(axis=2)                                   # [U, 4]
        a = n[:, :, cols].sum(axis=2)                                      # [U, 4]
        num = np.concatenate([d.sum(axis=1, keepdims=True), d[:, [0, 3]]], axis=1)  # [U, 3]
        den = np.concatenate([a.sum(axis=1, keepdims=True), a[:, [0, 3]]], axis=1)
        est, smp = bootstrap_ratio(num, den, weights=w)                   # [3], [nb, 3]
        out[name] = {"overall": interval(smp[:, 0], est[0]),
                     "first_quarter": interval(smp[:, 1], est[1]),
                     "last_quarter": interval(smp[:, 2], est[2]),
                     "gap": interval(smp[:, 2] - smp[:, 1], est[2] - est[1])}
    return out


def random_drop_baseline(n_units: int, layers_per_unit: int, group_size: int,
                         n_experts: int, top_k: int, capacity_factor: float | None,
                         min_capacity: int = 4, capacity_mode: str = "openmoe",
                         priority: str = "position", n_boot: int = N_BOOT, seed: int = 0,
                         max_tokens: int = 1 << 20) -> dict[str, Any]:
    """:func:`drop_statistics` of balanced random routing at the same shape and sample size.

    A data set of ``n_units`` routing groups routed by ``layers_per_unit`` MoE layers is
    matched by units of ``layers_per_unit`` independent random groups (the layers'
    columns side by side). A pool of ``max(4 * n_units, 64)`` such units (capped at
    ``max_tokens`` routed tokens, at least ``n_units``) is simulated once; the intervals
    come from resampling ``n_units`` of them with replacement, i.e. the spread of the
    statistic over data sets of the data's size. Also returns ``capacity`` and, for
    position priority, ``expected`` (:func:`expected_drop_summary`, the exact values).
    """
    L = max(int(layers_per_unit), 1)
    pool = max(4 * n_units, 64)
    pool = max(n_units, min(pool, max_tokens // max(group_size * L, 1)))
    kept, pos = simulate_random_routing(pool * L, group_size, n_experts, top_k,
                                        capacity_factor, min_capacity, capacity_mode,
                                        priority, seed)                   # [pool*L*G, k]
    kept = kept.reshape(pool, L, group_size, top_k).transpose(0, 2, 1, 3)  # [pool, G, L, k]
    kept = kept.reshape(pool * group_size, L * top_k)                     # [pool*G, L*k]
    gpos = pos[: pool * group_size]
    units = np.arange(pool * group_size) // group_size
    drop, n = drop_unit_table(kept, gpos, group_size, units, pool)        # [pool, 4, m]
    rng = B.default_rng(seed + 1)
    w = np.stack([np.bincount(rng.integers(0, pool, n_units), minlength=pool)
                  for _ in range(n_boot)])                                # [nb, pool]
    cap = routing.capacity(group_size, n_experts, top_k, capacity_factor, min_capacity,
                           capacity_mode)
    out: dict[str, Any] = {"n_units": int(n_units), "pool_units": int(pool), "capacity": cap,
                           "group_size": int(group_size), "priority": priority}
    m = L * top_k
    for name, cols in [("all", np.arange(m))] + [(f"rank{r}", np.arange(r, m, top_k))
                                                 for r in range(top_k)]:
        d = drop[:, :, cols].sum(axis=2)
        a = n[:, :, cols].sum(axis=2)
        num = np.concatenate([d.sum(axis=1, keepdims=True), d[:, [0, 3]]], axis=1)
        den = np.concatenate([a.sum(axis=1, keepdims=True), a[:, [0, 3]]], axis=1)
        est, smp = bootstrap_ratio(num, den, weights=w)
        out[name] = {"overall": interval(smp[:, 0], est[0]),
                     "first_quarter": interval(smp[:, 1], est[1]),
                     "last_quarter": interval(smp[:, 2], est[2]),
                     "gap": interval(smp[:, 2] - smp[:, 1], est[2] - est[1])}
    if priority == "position" and capacity_factor:
        out["expected"] = expected_drop_summary(group_size, n_experts, top_k, cap)
    return out


def drop_difference(a: Mapping[str, Any], b: Mapping[str, Any], key: str = "overall",
                    n_boot: int = N_BOOT, seed: int = 0) -> dict[str, float]:
    """Effect size of data set ``a`` against data set ``b`` (independent samples): the
    interval of ``rate_a - rate_b`` for ``key`` in ("overall", "first_quarter",
    "last_quarter", "gap"), each side resampled over its own units. ``a`` and ``b`` are
    ``{"kept", "group_pos", "group_len", "top_k"}`` dicts."""
    vals = []
    samples = []
    for j, x in enumerate((a, b)):
        units = unit_ids(x["group_pos"])
        drop, n = drop_unit_table(x["kept"], x["group_pos"], x["group_len"], units)
        d, c = drop.sum(axis=2), n.sum(axis=2)                             # [U, 4]
        num = np.stack([d.sum(axis=1), d[:, 0], d[:, 3]], axis=1)          # [U, 3]
        den = np.stack([c.sum(axis=1), c[:, 0], c[:, 3]], axis=1)
        est, smp = bootstrap_ratio(num, den, n_boot, seed + 7 * j)
        pick = {"overall": lambda v: v[..., 0], "first_quarter": lambda v: v[..., 1],
                "last_quarter": lambda v: v[..., 2], "gap": lambda v: v[..., 2] - v[..., 1]}
        if key not in pick:
            raise ValueError(f"key must be one of {sorted(pick)}, got {key!r}")
        vals.append(float(pick[key](est)))
        samples.append(pick[key](smp))
    return interval(samples[0] - samples[1], vals[0] - vals[1])


def ce_cost_by_position(ce_with: Array, ce_without: Array, group_pos: Array, group_len: int,
                        n_bins: int = 4, n_boot: int = N_BOOT, seed: int = 0
                        ) -> dict[str, Any]:
    """The loss cost of the drops, per position bucket of the routing group.

    ce_with, ce_without [N]: each token's next-token cross-entropy with drops (a capacity
    factor) and without (dropless), on the same tokens in the same order. Per bin of
    group positions (equal width, ``n_bins``): ``mean(ce_with - ce_without)`` with a
    paired bootstrap interval over routing groups; ``overall`` likewise. Positive = the
    drops cost loss there.
    """
    diff = np.asarray(ce_with, dtype=np.float64) - np.asarray(ce_without, dtype=np.float64)
    pos = np.asarray(group_pos).reshape(-1)
    units = unit_ids(pos)
    b = pos * n_bins // int(group_len)                                    # [N]
    onehot = (b[:, None] == np.arange(n_bins)[None, :]).astype(np.float64)  # [N, nb]
    num = unit_sums(np.concatenate([diff[:, None], diff[:, None] * onehot], axis=1), units)
    den = unit_sums(np.concatenate([np.ones((diff.size, 1)), onehot], axis=1), units)
    est, smp = bootstrap_ratio(num, den, n_boot, seed)                    # [1+nb]
    starts = [-(-i * group_len // n_bins) for i in range(n_bins + 1)]
    return {"overall": interval(smp[:, 0], est[0]),
            "bins": [{"start": starts[i], "end": starts[i + 1],
                      **interval(smp[:, i + 1], est[i + 1])} for i in range(n_bins)]}


# =====================================================================================
# specialization with intervals
# =====================================================================================

def predictor_correct(fit_keys: Array, fit_experts: Array, score_keys: Array,
                      score_experts: Array, n_experts: int) -> Array:
    """[M] bool: whether the majority-expert predictor keyed by ``fit_keys`` (fit on the
    fit half, unseen keys -> the fit half's most used expert) gets each score token's
    top-1 expert right (the per-token form of :func:`.measures.predictor_accuracy`)."""
    from tinymoe.analysis.measures import _lookup, _top1, majority_expert  # noqa: PLC0415

    fit_e, score_e = _top1(fit_experts), _top1(score_experts)
    fallback = int(np.bincount(fit_e, minlength=n_experts).argmax())
    uniq, maj = majority_expert(fit_keys, fit_e, n_experts)
    pred, _ = _lookup(uniq, maj, np.asarray(score_keys).reshape(-1), fallback)
    return pred == score_e                                                # [M]


def specialization_statistics(token_ids: Array, positions: Array, experts: Array,
                              n_experts: int, window: Array, n_boot: int = N_BOOT,
                              seed: int = 0) -> dict[str, Any]:
    """Token-id specialization against its baselines, with intervals over score windows.

    Fit on even windows, score on odd windows (whole windows, so the halves share no
    text). Statistics (share of score tokens whose top-1 expert is predicted):

    * ``token_id``: the majority expert of the token id;
    * ``shuffled``: the same predictor after the experts are permuted across tokens
      (seed ``seed``): what the id predictor scores when routing ignores the id but has
      the same loads (about the majority-class share);
    * ``position``: the majority expert of the position in the sequence (a router that
      depends on the position scores high here, and at the shuffle on ``token_id``).

    Each is an :func:`interval` over the score windows (resampled with replacement; one
    set of resamples for all three). ``excess`` = token_id - shuffled (paired);
    ``skill`` = (token_id - shuffled) / (1 - shuffled): the share of the load-only
    predictor's errors that knowing the id removes, comparable between routers with
    different load balance (an unbalanced router has a high shuffled score).
    """
    ids = np.asarray(token_ids).reshape(-1)
    pos = np.asarray(positions).reshape(-1)
    from tinymoe.analysis.measures import _top1  # noqa: PLC0415

    e = _top1(experts)
    win = np.asarray(window, dtype=np.int64).reshape(-1)
    fit = win % 2 == 0
    score = ~fit
    if not fit.any() or not score.any():
        raise ValueError("specialization_statistics needs at least two windows")
    shuffled = e[B.default_rng(seed).permutation(e.size)]                  # [N]
    correct = np.stack([
        predictor_correct(ids[fit], e[fit], ids[score], e[score], n_experts),
        predictor_correct(ids[fit], shuffled[fit], ids[score], shuffled[score], n_experts),
        predictor_correct(pos[fit], e[fit], pos[score], e[score], n_experts)],
        axis=1).astype(np.float64)                                        # [M, 3]
    _, units = np.unique(win[score], return_inverse=True)                 # [M]
    num = unit_sums(correct, units)                                       # [U, 3]
    den = unit_sums(np.ones_like(correct), units)
    est, smp = bootstrap_ratio(num, den, n_boot, seed)                    # [3], [nb, 3]
    with np.errstate(invalid="ignore", divide="ignore"):
        skill_s = (smp[:, 0] - smp[:, 1]) / (1.0 - smp[:, 1])             # [nb]
        skill = (est[0] - est[1]) / (1.0 - est[1]) if est[1] < 1 else float("nan")
    return {"token_id": interval(smp[:, 0], est[0]), "shuffled": interval(smp[:, 1], est[1]),
            "position": interval(smp[:, 2], est[2]),
            "excess": interval(smp[:, 0] - smp[:, 1], est[0] - est[1]),
            "skill": interval(skill_s, skill),
            "n_score_windows": int(num.shape[0]), "n_score_tokens": int(score.sum())}


# =====================================================================================
# early routing: agreement with intervals and its ceiling
# =====================================================================================

def token_agreement(experts_then: Array, experts_final: Array, sequence: Array,
                    n_boot: int = N_BOOT, seed: int = 0) -> dict[str, float]:
    """Per-token agreement: the share of probe tokens (the same tokens in the same
    sequences at both steps) whose top-1 expert is the same, with an interval over probe
    sequences. Routing of a fixed input is deterministic, so the final snapshot agrees
    with itself exactly: the ceiling of this measure is 1 and needs no resampling."""
    from tinymoe.analysis.measures import _top1  # noqa: PLC0415

    same = (_top1(experts_then) == _top1(experts_final)).astype(np.float64)  # [N]
    _, units = np.unique(np.asarray(sequence).reshape(-1), return_inverse=True)
    est, smp = bootstrap_ratio(unit_sums(same, units), unit_sums(np.ones_like(same), units),
                               n_boot, seed)
    return interval(smp, est)


def split_half_agreement(token_ids: Array, experts_then: Array, experts_final: Array,
                         sequence: Array, n_experts: int, n_splits: int = 200,
                         seed: int = 0) -> dict[str, Any]:
    """Occurrence-weighted and per-id majority agreement, on split halves of the probe.

    The majority top-1 expert of a token id is estimated from its occurrences, so it is
    noisy when an id occurs a few times: the final routing compared with *itself* on
    another sample of text would not agree 100%. To measure every snapshot on the same
    footing, the probe sequences are split at random into two halves A and B
    (``n_splits`` times); the majority expert of each id at the earlier step is taken on
    half A, the final one on half B, and they are compared over the ids seen in both
    halves: per id (``ids``: each id counts once) and occurrence-weighted
    (``occurrences``: each id weighted by its occurrences in the whole probe). Both
    directions (A/B, B/A) of every split are averaged. With ``experts_then`` =
    ``experts_final`` this is the **ceiling**: the agreement of the final routing with
    itself under resampling. Each value is an :func:`interval` over the splits (the
    spread of the split-half estimate, not a sampling interval of the probe).
    """
    from tinymoe.analysis.measures import _top1, key_expert_counts  # noqa: PLC0415

    ids = np.asarray(token_ids).reshape(-1)
    a_ex, f_ex = _top1(experts_then), _top1(experts_final)
    seq = np.asarray(sequence).reshape(-1)
    useq, sidx = np.unique(seq, return_inverse=True)                      # [S], [N]
    if useq.size < 2:
        raise ValueError("split_half_agreement needs at least two probe sequences")
    uniq, total = key_expert_counts(ids, np.zeros_like(ids), 1)           # [U], [U, 1]
    total = total[:, 0].astype(np.float64)                                # occurrences [U]
    key = np.searchsorted(uniq, ids)                                      # [N] in 0..U-1
    rng = B.default_rng(seed)
    res = {"ids": [], "occurrences": []}
    for _ in range(n_splits):
        half = rng.permutation(useq.size) < useq.size // 2                 # [S] True = half A
        in_a = half[sidx]                                                 # [N]
        for then_mask, final_mask in ((in_a, ~in_a), (~in_a, in_a)):
            ct = np.zeros((uniq.size, n_experts))
            np.add.at(ct, (key[then_mask], a_ex[then_mask]), 1.0)
            cf = np.zeros((uniq.size, n_experts))
            np.add.at(cf, (key[final_mask], f_ex[final_mask]), 1.0)
            both = (ct.sum(axis=1) > 0) & (cf.sum(axis=1) > 0)            # [U]
            same = (ct.argmax(axis=1) == cf.argmax(axis=1)) & both
            res["ids"].append(same.sum() / max(both.sum(), 1))
            res["occurrences"].append((total * same).sum() / max((total * both).sum(), 1e-12))
    return {k: {**interval(np.asarray(v), float(np.mean(v))), "kind": "split-half spread"}
            for k, v in res.items()}



def ceiling_by_probe_size(token_ids: Array, experts: Array, window: Array, domain: Array,
                          n_experts: int, sizes: tuple[int, ...] = (4, 8, 16, 32, 64),
                          n_splits: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """How large a probe the majority measures of early routing need.

    From one routing of many held-out windows (token_ids, experts [N] or [N, k],
    window [N], domain [N]), for each ``n`` in ``sizes``: a probe of ``n`` windows per
    domain (spread evenly over the domain's windows, as the trainer's probe is), and the
    :func:`split_half_agreement` of this routing with itself on it: the ceiling the
    per-id and occurrence-weighted majority agreement can reach on a probe of that size.
    Sizes larger than a domain's windows are left out. Returns
    ``[{"per_domain", "n_tokens", "ids", "occurrences"}]`` (ceilings as estimates).
    """
    win = np.asarray(window).reshape(-1)
    dom = np.asarray(domain).reshape(-1)
    ids = np.asarray(token_ids).reshape(-1)
    ex = np.asarray(experts)
    per_dom = {int(d): np.unique(win[dom == d]) for d in np.unique(dom)}  # windows per domain
    out = []
    for n in sizes:
        if n < 1 or any(w.size < n for w in per_dom.values()):
            continue
        pick = np.concatenate([w[np.round(np.linspace(0, w.size - 1, n)).astype(int)]
                               for w in per_dom.values()])               # [n * D]
        m = np.isin(win, pick)                                           # [N]
        c = split_half_agreement(ids[m], ex[m], ex[m], win[m], n_experts, n_splits, seed)
        out.append({"per_domain": int(n), "n_tokens": int(m.sum()),
                    "ids": c["ids"]["estimate"], "occurrences": c["occurrences"]["estimate"]})
    return out
