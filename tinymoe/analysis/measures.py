"""Pure measures of routing: plain host arrays in, numbers out (no model, no files).

The inputs are what a router decided for N tokens, as NumPy arrays: token ids, positions
(in the sequence or in the routing group), domains, the chosen experts ``[N]`` or
``[N, k]`` (rank 0 = best) and the kept flags ``[N, k]``. Every function here is
deterministic given its arguments (the one random baseline takes a ``seed``), so each is
tested on synthetic routing with a known answer. The three sections follow the paper's
three findings (see :mod:`tinymoe.analysis`):

1. context-independent specialization: majority-expert predictors, the std measure of
   OpenMoE section 5.1, expert share by domain, top tokens per expert;
2. early routing learning: agreement of each routing snapshot with the final one;
3. drop-towards-the-end: dropped fraction of assignments by position in the group.

Imports nothing else from the analysis package (:mod:`.collect` runs the model and
gathers these arrays).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from tinymoe import backend as B

np = B.np

__all__ = [
    "key_expert_counts", "majority_expert", "predictor_accuracy", "specialization_predictors",
    "routing_std", "max_routing_std", "shuffled_routing_std", "expert_share_by_domain",
    "token_label", "top_tokens_per_expert", "majority_agreement", "early_routing",
    "position_in_group", "drop_by_position", "drop_quarters",
]

Array = Any


# =====================================================================================
# 1. context-independent specialization (pure functions)
# =====================================================================================

def _top1(experts: Array) -> Array:
    """Top-1 experts [N] from ``[N]`` or ``[N, k]`` (rank 0 = best) int arrays."""
    e = np.asarray(experts)
    return e[:, 0] if e.ndim == 2 else e.reshape(-1)


def key_expert_counts(keys: Array, experts: Array, n_experts: int) -> tuple[Array, Array]:
    """Contingency table of keys against experts.

    keys [N] ints; experts [N] (one expert per token) or [N, k] (every choice counts).
    Returns ``(unique_keys [U], counts [U, E])`` with ``counts[u, e]`` = number of
    (token, choice) pairs with key ``unique_keys[u]`` routed to expert e.
    """
    keys = np.asarray(keys).reshape(-1)
    ex = np.asarray(experts)
    if ex.ndim == 1:
        ex = ex[:, None]                                                  # [N] -> [N, 1]
    if ex.shape[0] != keys.shape[0]:
        raise ValueError(f"keys has {keys.shape[0]} entries but experts has {ex.shape[0]} rows")
    if ex.size and (int(ex.min()) < 0 or int(ex.max()) >= n_experts):
        raise ValueError(f"expert index out of range for n_experts={n_experts}")
    uniq, inv = np.unique(keys, return_inverse=True)                      # [U], [N]
    flat = (inv.reshape(-1, 1) * n_experts + ex).ravel()                  # [N * k]
    counts = np.bincount(flat, minlength=uniq.size * n_experts)           # [U * E]
    return uniq, counts.reshape(uniq.size, n_experts).astype(np.int64)    # [U], [U, E]


def majority_expert(keys: Array, experts: Array, n_experts: int) -> tuple[Array, Array]:
    """For each key the expert it is most often routed to (ties -> lower index).

    Returns ``(unique_keys [U], majority [U])``.
    """
    uniq, counts = key_expert_counts(keys, _top1(experts), n_experts)
    return uniq, counts.argmax(axis=1)                                    # [U], [U]


def _lookup(uniq: Array, values: Array, query: Array, default: int) -> tuple[Array, Array]:
    """``values[u]`` where ``uniq[u] == query``, else ``default``; and the found mask."""
    if uniq.size == 0:
        return np.full(query.shape, default, dtype=np.int64), np.zeros(query.shape, bool)
    idx = np.searchsorted(uniq, query)                                    # [M]
    idx_c = np.minimum(idx, uniq.size - 1)
    found = uniq[idx_c] == query                                          # [M]
    return np.where(found, values[idx_c], default), found


def predictor_accuracy(fit_keys: Array, fit_experts: Array, score_keys: Array,
                       score_experts: Array, n_experts: int) -> dict[str, float]:
    """Accuracy of the majority-expert predictor keyed by ``fit_keys``.

    Fit: for each key of the fit half, its most frequent top-1 expert. Score: the share of
    score-half tokens whose top-1 expert equals the prediction for their key; a key never
    seen in the fit half is predicted as the fit half's most used expert. ``coverage`` is
    the share of score tokens whose key was seen in the fit half.
    """
    fit_e = _top1(fit_experts)
    score_e = _top1(score_experts)
    score_keys = np.asarray(score_keys).reshape(-1)
    if score_e.size == 0 or fit_e.size == 0:
        raise ValueError("predictor_accuracy needs tokens in both the fit and the score half")
    fallback = int(np.bincount(fit_e, minlength=n_experts).argmax())
    uniq, maj = majority_expert(fit_keys, fit_e, n_experts)
    pred, found = _lookup(uniq, maj, score_keys, fallback)                # [M], [M]
    return {"accuracy": float((pred == score_e).mean()), "coverage": float(found.mean()),
            "n_keys": int(uniq.size)}


def specialization_predictors(token_ids: Array, positions: Array, experts: Array,
                              n_experts: int, fit_mask: Array) -> dict[str, Any]:
    """How much of the top-1 routing the token id alone (or the position alone) explains.

    token_ids, positions [N]; experts [N] or [N, k] (the top-1 = column 0 is used);
    fit_mask [N] bool: True = fit half, False = score half (split by whole windows so the
    halves share no text). Returns accuracies of the id predictor, the position
    predictor, the majority class (always the fit half's most used expert), chance 1/E,
    ``sampling_sd`` = sqrt(p (1 - p) / n_score) at p = 1/E, the spread of a predictor
    that knows nothing, and the skills ``(accuracy - majority) / (1 - majority)``: the
    share of the majority-class predictor's errors that knowing the id (or position)
    removes, comparable between routers with different load balance.
    """
    e = _top1(experts)
    ids = np.asarray(token_ids).reshape(-1)
    pos = np.asarray(positions).reshape(-1)
    fit = np.asarray(fit_mask, dtype=bool).reshape(-1)
    if not (ids.size == pos.size == e.size == fit.size):
        raise ValueError(f"token_ids, positions, experts and fit_mask differ in length "
                         f"({ids.size}, {pos.size}, {e.size}, {fit.size})")
    score = ~fit
    by_id = predictor_accuracy(ids[fit], e[fit], ids[score], e[score], n_experts)
    by_pos = predictor_accuracy(pos[fit], e[fit], pos[score], e[score], n_experts)
    most_used = int(np.bincount(e[fit], minlength=n_experts).argmax())
    n_score = int(score.sum())
    p = 1.0 / n_experts
    base = float((e[score] == most_used).mean())

    def skill(acc: float) -> float:
        return (acc - base) / (1.0 - base) if base < 1.0 else float("nan")

    return {
        "token_id": by_id["accuracy"], "token_id_coverage": by_id["coverage"],
        "position": by_pos["accuracy"],
        "token_id_skill": skill(by_id["accuracy"]), "position_skill": skill(by_pos["accuracy"]),
        "majority_class": base,
        "chance": p, "sampling_sd": math.sqrt(p * (1 - p) / max(n_score, 1)),
        "n_fit": int(fit.sum()), "n_score": n_score,
    }


def max_routing_std(n_experts: int, top_k: int = 1) -> float:
    """Largest possible std across experts of a routing distribution: all mass on k
    experts, ``d = 1/k`` there: ``sqrt(1/(k E) - 1/E^2)`` (k = 1: ``sqrt(E - 1) / E``)."""
    return math.sqrt(1.0 / (top_k * n_experts) - 1.0 / n_experts ** 2)


def routing_std(keys: Array, experts: Array, n_experts: int, min_count: int = 16
                ) -> dict[str, float]:
    """The paper's specialization measure (OpenMoE section 5.1).

    For each key with at least ``min_count`` tokens: ``d_e = n(key, e) / n(key)`` over the
    E experts (top-1 when ``experts`` is [N]; every choice, normalised, when [N, k]); its
    population std across experts ``sqrt(mean_e (d_e - 1/E)^2)``. Returns the mean over
    keys (``mean_std``), ``max_std`` (:func:`max_routing_std`), ``relative`` = mean/max,
    ``n_keys`` and ``token_share`` (share of tokens whose key qualifies).
    """
    ex = np.asarray(experts)
    k = ex.shape[1] if ex.ndim == 2 else 1
    uniq, counts = key_expert_counts(keys, ex, n_experts)                 # [U], [U, E]
    totals = counts.sum(axis=1)                                           # [U]
    ok = totals >= max(int(min_count), 1) * k                             # [U]
    max_std = max_routing_std(n_experts, k)
    if not ok.any():
        return {"mean_std": float("nan"), "max_std": max_std, "relative": float("nan"),
                "n_keys": 0, "token_share": 0.0}
    dist = counts[ok] / totals[ok, None]                                  # [U', E]
    std = dist.std(axis=1)                                                # [U']
    mean = float(std.mean())
    rel = mean / max_std if max_std > 0 else float("nan")   # k = E (expert choice): no spread
    return {"mean_std": mean, "max_std": max_std, "relative": rel,
            "n_keys": int(ok.sum()), "token_share": float(totals[ok].sum() / totals.sum())}


def shuffled_routing_std(keys: Array, experts: Array, n_experts: int, min_count: int = 16,
                         seed: int = 0) -> dict[str, float]:
    """:func:`routing_std` after permuting the experts across tokens: the value that the
    same key counts and expert loads give when routing ignores the key (sampling noise)."""
    ex = np.asarray(experts)
    perm = B.default_rng(seed).permutation(ex.shape[0])                   # [N]
    return routing_std(keys, ex[perm], n_experts, min_count)


def expert_share_by_domain(experts: Array, domain: Array, n_experts: int, n_domains: int
                           ) -> Array:
    """``share[d, e]`` = fraction of domain d's assignments (every top-k choice) that go
    to expert e; rows sum to 1 (a domain without tokens gives a row of NaN)."""
    ex = np.asarray(experts)
    if ex.ndim == 1:
        ex = ex[:, None]                                                  # [N] -> [N, 1]
    dom = np.asarray(domain, dtype=np.int64).reshape(-1)                  # [N]
    if dom.size != ex.shape[0]:
        raise ValueError(f"domain has {dom.size} entries but experts has {ex.shape[0]} rows")
    flat = (dom[:, None] * n_experts + ex).ravel()                        # [N * k]
    counts = np.bincount(flat, minlength=n_domains * n_experts).reshape(n_domains, n_experts)
    totals = counts.sum(axis=1, keepdims=True)                            # [D, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / totals                                            # [D, E]


def token_label(tokenizer: Any, token_id: int) -> str:
    """A short printable label of one token: spaces as '␣', newlines as '\\n', bytes that
    are not valid UTF-8 on their own as '\\xNN', BOS/EOS as <bos>/<eos>."""
    i = int(token_id)
    if i == getattr(tokenizer, "bos_id", None):
        return "<bos>"
    if i == getattr(tokenizer, "eos_id", None):
        return "<eos>"
    if hasattr(tokenizer, "token_bytes"):
        raw = tokenizer.token_bytes(i)
    elif getattr(tokenizer, "name", "") == "byte" and i < 256:
        raw = bytes([i])
    else:
        raw = tokenizer.decode([i]).encode("utf-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw)
    text = (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
            .replace("\r", "\\r").replace(" ", "␣"))
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def top_tokens_per_expert(token_ids: Array, experts: Array, n_experts: int, n_top: int = 8,
                          min_count: int = 16) -> list[dict[str, list[dict[str, float]]]]:
    """Per expert: the ids most often routed to it (top-1), and the most specific ones.

    ``frequent``: top ``n_top`` ids by n(id, e), with ``share`` = n(id, e) / n(e).
    ``specific``: among ids with at least ``min_count`` tokens, top ``n_top`` by
    ``p = P(e | id) = n(id, e) / n(id)``, with ``lift = P(e | id) / P(e)``.
    """
    uniq, counts = key_expert_counts(token_ids, _top1(experts), n_experts)  # [U], [U, E]
    per_id = counts.sum(axis=1)                                             # [U]
    per_expert = counts.sum(axis=0)                                         # [E]
    n = max(int(per_id.sum()), 1)
    eligible = np.flatnonzero(per_id >= max(int(min_count), 1))
    out = []
    for e in range(n_experts):
        freq_order = np.argsort(-counts[:, e], kind="stable")[:n_top]
        frequent = [{"id": int(uniq[u]), "count": int(counts[u, e]),
                     "share": float(counts[u, e] / max(per_expert[e], 1))}
                    for u in freq_order if counts[u, e] > 0]
        p_e = per_expert[e] / n
        cond = counts[eligible, e] / per_id[eligible]                       # [U']
        spec_order = eligible[np.argsort(-cond, kind="stable")[:n_top]]
        specific = [{"id": int(uniq[u]), "count": int(per_id[u]),
                     "p": float(counts[u, e] / per_id[u]),
                     "lift": float(counts[u, e] / per_id[u] / p_e) if p_e > 0 else float("nan")}
                    for u in spec_order if counts[u, e] > 0]
        out.append({"expert": e, "n_tokens": int(per_expert[e]), "frequent": frequent,
                    "specific": specific})
    return out


# =====================================================================================
# 2. early routing learning (pure functions)
# =====================================================================================

def majority_agreement(token_ids: Array, experts_then: Array, experts_final: Array,
                       n_experts: int, final_token_ids: Array | None = None
                       ) -> dict[str, float]:
    """Agreement of an earlier routing with the final one on a probe batch.

    ``ids``: share of token ids (present in both) whose majority top-1 expert is the same;
    ``occurrences``: the same, each id weighted by its number of tokens (in the final
    probe); ``tokens``: share of tokens with the same top-1 expert (only when both runs
    saw the same token sequence, else NaN). Routing unrelated to the final one gives
    about 1/E on all three.
    """
    ids_then = np.asarray(token_ids).reshape(-1)
    ids_final = ids_then if final_token_ids is None else np.asarray(final_token_ids).reshape(-1)
    u_then, m_then = majority_expert(ids_then, experts_then, n_experts)
    u_final, c_final = key_expert_counts(ids_final, _top1(experts_final), n_experts)
    m_final = c_final.argmax(axis=1)
    w_final = c_final.sum(axis=1)
    pred, found = _lookup(u_then, m_then, u_final, -1)                    # [U_final]
    if not found.any():
        raise ValueError("the snapshots share no token id")
    same = (pred == m_final) & found
    tokens = float("nan")
    if ids_then.shape == ids_final.shape and np.array_equal(ids_then, ids_final):
        tokens = float((_top1(experts_then) == _top1(experts_final)).mean())
    return {"ids": float(same[found].mean()),
            "occurrences": float(w_final[same].sum() / w_final[found].sum()),
            "tokens": tokens, "n_ids": int(found.sum())}


def early_routing(snapshots: Sequence[Mapping[str, Any]], n_experts: int) -> dict[str, Any]:
    """Agreement of every snapshot with the last one, per MoE layer.

    ``snapshots``: dicts with ``step`` (int), ``token_ids`` [N] and ``experts``
    {layer: [N] or [N, k]}, in any order (sorted by step here). Returns ``steps``,
    ``final_step`` and per layer lists ``ids``, ``occurrences``, ``tokens`` aligned with
    ``steps`` (the last entry is 1).
    """
    if not snapshots:
        raise ValueError("early_routing needs at least one snapshot")
    snaps = sorted(snapshots, key=lambda s: int(s["step"]))
    final = snaps[-1]
    layers = sorted(int(k) for k in final["experts"])
    out: dict[str, Any] = {"steps": [int(s["step"]) for s in snaps],
                           "final_step": int(final["step"]), "chance": 1.0 / n_experts,
                           "layers": []}
    for layer in layers:
        rows: dict[str, list[float]] = {"ids": [], "occurrences": [], "tokens": []}
        for s in snaps:
            ex = {int(k): v for k, v in s["experts"].items()}
            if layer not in ex:
                raise ValueError(f"snapshot at step {s['step']} has no layer {layer}")
            a = majority_agreement(s["token_ids"], ex[layer], final["experts"][_key(final, layer)],
                                   n_experts, final["token_ids"])
            for name in rows:
                rows[name].append(a[name])
        out["layers"].append({"layer": layer, **rows})
    return out


def _key(snapshot: Mapping[str, Any], layer: int) -> Any:
    """The key under which ``layer`` is stored in a snapshot's ``experts`` dict."""
    for k in snapshot["experts"]:
        if int(k) == layer:
            return k
    raise KeyError(layer)


# =====================================================================================
# 3. drop-towards-the-end (pure functions)
# =====================================================================================

def position_in_group(batch_size: int, seq_len: int, group_size: int | None) -> Array:
    """Index of each token of a [B, T] batch (flattened row-major) inside its routing group.

    Groups are contiguous runs of G tokens (tinymoe.routing): G = T when ``group_size`` is
    None (one sequence per group), one group of all B*T tokens when ``group_size >= B*T``.
    Returns ``[B*T]`` int64 = ``arange(B*T) % G``.
    """
    n = batch_size * seq_len
    g = seq_len if group_size is None else min(int(group_size), n)
    return np.arange(n, dtype=np.int64) % g                               # [B*T]


def drop_by_position(kept: Array, positions: Array, n_positions: int, n_bins: int = 16
                     ) -> dict[str, Any]:
    """Dropped fraction of assignments by position in the group, in equal-width bins.

    kept [N, k] (or [N]) bool; positions [N] in 0..n_positions-1. Position p falls in bin
    ``p * n_bins // n_positions``. Returns ``bin_start`` / ``bin_end`` (positions
    [start, end)), ``drop_rate`` per bin (NaN where a bin is empty), ``n_assignments`` per
    bin and ``overall`` = dropped / all assignments.
    """
    kept = np.asarray(kept, dtype=bool)
    if kept.ndim == 1:
        kept = kept[:, None]
    pos = np.asarray(positions).reshape(-1)
    if pos.size != kept.shape[0]:
        raise ValueError(f"positions has {pos.size} entries but kept has {kept.shape[0]} rows")
    if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= n_positions):
        raise ValueError(f"positions must lie in [0, {n_positions})")
    n_bins = max(1, min(int(n_bins), int(n_positions)))
    b = pos * n_bins // n_positions                                       # [N]
    dropped = (~kept).sum(axis=1)                                         # [N]
    n_drop = np.bincount(b, weights=dropped, minlength=n_bins)            # [n_bins]
    n_all = np.bincount(b, minlength=n_bins) * kept.shape[1]              # [n_bins]
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = n_drop / n_all
    starts = [-(-i * n_positions // n_bins) for i in range(n_bins + 1)]   # ceil(i n / nb)
    return {"bin_start": starts[:-1], "bin_end": starts[1:], "drop_rate": rate.tolist(),
            "n_assignments": n_all.astype(np.int64).tolist(),
            "overall": float(dropped.sum() / max(kept.size, 1))}


def drop_quarters(kept: Array, positions: Array, n_positions: int) -> dict[str, float]:
    """Drop rate in the first and in the last quarter of group positions."""
    q = drop_by_position(kept, positions, n_positions, n_bins=4)
    return {"first_quarter": q["drop_rate"][0], "last_quarter": q["drop_rate"][-1],
            "overall": q["overall"]}


