"""Routing analysis: the OpenMoE paper's three findings, as numbers, tables and plots.

Xue et al. 2024 ("OpenMoE", section 5) report three properties of a trained MoE router:

1. **Context-independent specialization.** The expert a token goes to depends mostly on
   the token id, hardly on the context or the domain. Measured here per MoE layer on
   held-out text by
   (a) a *majority-expert predictor*: fit on one half of the windows, for each key (token
       id, or position id) the most frequent top-1 expert; scored on the other half as
       the share of tokens whose top-1 expert it predicts. Compared with chance 1/E and
       with the honest baseline "always predict the most used expert" (majority class);
   (b) the paper's measure: for each key seen at least ``m`` times, the distribution
       ``d_e = n(key, e) / n(key)`` of its top-1 expert; its standard deviation across the
       E experts ``sqrt(mean_e (d_e - 1/E)^2)``, averaged over keys. 0 = spread evenly,
       maximal ``sqrt(E - 1) / E`` = always the same expert. A shuffled baseline (experts
       permuted across tokens) shows the value finite samples give without any
       specialization;
   (c) the share of each expert in each domain's assignments;
   (d) the top tokens of each expert (most frequent, and most specific by lift
       ``P(e | id) / P(e)``).
2. **Early routing learning.** Routing is fixed early in training: for each routing
   snapshot of a fixed probe batch (written by the trainer with ``--snapshot-every``), the
   share of token ids (and of token occurrences) whose majority top-1 expert equals the
   one at the final snapshot.
3. **Drop-towards-the-end.** With ``position`` slot priority, slots fill in token order, so
   when an expert is over-subscribed the *late* tokens of a group are the ones dropped.
   Dropped fraction of assignments against the position inside the routing group, at the
   train and eval capacity factors, on in-distribution text, on "multi-turn" sequences
   stitched from several domains, and on a domain left out of training; then the cures on
   the same data: dropless, ``probability`` slot priority, a larger capacity factor, and
   (``--compare``) a model trained with the shifted data mixed in.

Every measure is a pure function of plain host arrays (testable on synthetic routing);
:func:`collect_routing` runs a model and gathers those arrays; :func:`run` is the
``python -m tinymoe analyze`` command.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from tinymoe import backend as B

np = B.np

__all__ = [
    # pure measures
    "key_expert_counts", "majority_expert", "predictor_accuracy", "specialization_predictors",
    "routing_std", "max_routing_std", "shuffled_routing_std", "expert_share_by_domain",
    "top_tokens_per_expert", "majority_agreement", "early_routing", "position_in_group",
    "drop_by_position", "drop_quarters", "token_label", "token_windows",
    # report sections
    "specialization_report", "drop_report",
    # collection from a model
    "RoutingTrace", "routing_settings", "collect_routing", "load_snapshots",
    # plots and report
    "plot_specialization", "plot_domain_share", "plot_early_routing",
    "plot_drop_vs_position", "format_report", "analyze", "add_arguments", "run",
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
    return {"mean_std": mean, "max_std": max_std, "relative": mean / max_std,
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


# =====================================================================================
# collecting routing from a model
# =====================================================================================

@dataclass
class RoutingTrace:
    """Routing of many tokens by one model under one setting, as host arrays.

    Per token [N]: ``token_ids``, ``position`` (index in its sequence), ``group_pos``
    (index in its routing group), ``domain`` (index into ``domain_names``), ``window``
    (which input window). Per MoE layer (``layers`` = block indices): ``expert_index``
    [N, k] and ``kept`` [N, k]. ``group_len`` = positions per group, ``ce`` = mean
    next-token cross-entropy over the tokens.
    """

    token_ids: Array
    position: Array
    group_pos: Array
    domain: Array
    window: Array
    layers: list[int]
    expert_index: list[Array]
    kept: list[Array]
    n_experts: int
    top_k: int
    group_len: int
    domain_names: list[str] = field(default_factory=list)
    ce: float = float("nan")

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.size)

    def all_kept(self) -> Array:
        """kept of every layer side by side: [N, n_layers * k] (for drops over all layers)."""
        return np.concatenate(self.kept, axis=1)


_ROUTING_FIELDS = ("capacity_factor", "eval_capacity_factor", "slot_priority", "group_size",
                   "min_capacity", "capacity_mode")


@contextlib.contextmanager
def routing_settings(model: Any, **overrides: Any) -> Iterator[None]:
    """Temporarily change routing fields of the config the model reads at forward time
    (``eval_capacity_factor``, ``slot_priority`` ...); restored on exit.

    The MoE layers read ``self.cfg`` on every forward (tinymoe.nn.moe.MoE), so this
    evaluates a cure on the loaded weights without copying the model.
    """
    bad = [k for k in overrides if k not in _ROUTING_FIELDS]
    if bad:
        raise ValueError(f"not a routing setting: {', '.join(bad)} "
                         f"(choose from {', '.join(_ROUTING_FIELDS)})")
    cfgs = {id(m.cfg): m.cfg for m in model.modules() if hasattr(m, "cfg")}
    saved = [(c, {k: getattr(c, k) for k in overrides}) for c in cfgs.values()]
    try:
        for c, _ in saved:
            for k, v in overrides.items():
                setattr(c, k, v)
            c.validate()
        yield
    finally:
        for c, old in saved:
            for k, v in old.items():
                setattr(c, k, v)


def _usable_rows(n_rows: int, seq_len: int, group_size: int | None) -> bool:
    """A batch of n_rows sequences can be cut into routing groups (tinymoe.routing)."""
    n = n_rows * seq_len
    return group_size is None or group_size >= n or n % group_size == 0


def collect_routing(model: Any, windows: Array, domain: Array | None = None,
                    batch_size: int = 16, domain_names: Sequence[str] = (),
                    **overrides: Any) -> RoutingTrace:
    """Run ``model`` (eval mode, no gradients) on token windows and keep its routing.

    windows [n, T+1] int: inputs ``w[:, :-1]``, next-token targets ``w[:, 1:]``.
    domain: None, [n] (one domain per window) or [n, T+1] / [n, T] (per token).
    ``overrides``: routing settings for this run (see :func:`routing_settings`); the model
    runs in eval mode, so its capacity factor is ``eval_capacity_factor``.
    A trailing batch whose size does not split into routing groups is left out.
    """
    from tinymoe.autograd import no_grad  # noqa: PLC0415 (analysis imports model code lazily)

    w = np.asarray(windows, dtype=np.int64)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"windows must be [n, T+1] with T >= 1, got shape {w.shape}")
    n_win, seq = w.shape[0], w.shape[1] - 1
    if domain is None:
        dom = np.zeros((n_win, seq), dtype=np.int64)
    else:
        d = np.asarray(domain, dtype=np.int64)
        dom = (np.broadcast_to(d[:, None], (n_win, seq)) if d.ndim == 1 else d[:, :seq])
    cfg = model.cfg
    was_training = getattr(model, "training", False)
    model.eval()
    parts: dict[str, list[Array]] = {k: [] for k in ("ids", "pos", "gpos", "dom", "win")}
    experts: dict[int, list[Array]] = {}
    kept: dict[int, list[Array]] = {}
    ce_sum, n_ce, group_len = 0.0, 0, 0
    try:
        with routing_settings(model, **overrides), no_grad():
            for s in range(0, n_win, batch_size):
                rows = w[s: s + batch_size]                               # [b, T+1]
                b = rows.shape[0]
                if not _usable_rows(b, seq, cfg.group_size):
                    continue
                out = model(rows[:, :-1], rows[:, 1:])
                ce_sum += float(B.to_numpy(out.ce.data)) * b * seq
                n_ce += b * seq
                gpos = position_in_group(b, seq, cfg.group_size)          # [b*T]
                group_len = max(group_len, int(gpos.max()) + 1)
                parts["ids"].append(rows[:, :-1].reshape(-1))
                parts["pos"].append(np.tile(np.arange(seq, dtype=np.int64), b))
                parts["gpos"].append(gpos)
                parts["dom"].append(dom[s: s + b].reshape(-1))
                parts["win"].append(np.repeat(np.arange(s, s + b, dtype=np.int64), seq))
                for st in out.routing:
                    experts.setdefault(st.layer, []).append(B.to_numpy(st.expert_index))
                    kept.setdefault(st.layer, []).append(B.to_numpy(st.kept))
    finally:
        model.train(was_training)
    if n_ce == 0:
        raise ValueError(f"no batch of {batch_size} windows of {seq} tokens fits the routing "
                         f"group size {cfg.group_size}")
    layers = sorted(experts)
    return RoutingTrace(
        token_ids=np.concatenate(parts["ids"]), position=np.concatenate(parts["pos"]),
        group_pos=np.concatenate(parts["gpos"]), domain=np.concatenate(parts["dom"]),
        window=np.concatenate(parts["win"]), layers=layers,
        expert_index=[np.concatenate(experts[i]).astype(np.int64) for i in layers],
        kept=[np.concatenate(kept[i]).astype(bool) for i in layers],
        n_experts=cfg.n_experts, top_k=cfg.top_k, group_len=group_len,
        domain_names=list(domain_names), ce=ce_sum / n_ce)


_SNAPSHOT_RE = re.compile(r"step_?(\d+)\.npz$")


def load_snapshots(folder: str | Path) -> list[dict[str, Any]]:
    """Routing snapshots written by the trainer (``<out_dir>/snapshots/step_N.npz``).

    Trainer format (tinymoe.train): ``step``, ``tokens`` [N, T] (the fixed probe batch),
    ``layers`` [L] (block indices), ``expert_index`` [L, N, T, k], ``top1`` [L, N, T],
    ``kept``, ``probs_top1``, ``domain``. Also accepted: ``token_ids`` / ``ids`` for the
    tokens and one array per layer named ``experts_<layer>`` (or ``layer_<layer>``,
    ``expert_index_<layer>``, ``top1_<layer>``). The step comes from ``step`` or the file
    name. Returns dicts for :func:`early_routing`, sorted by step.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.npz") if _SNAPSHOT_RE.search(p.name))
    snaps = []
    for p in files:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        ids = next((data[k] for k in ("tokens", "token_ids", "ids") if k in data), None)
        if ids is None:
            raise ValueError(f"{p}: routing snapshot has no token_ids")
        per_layer: dict[int, Array] = {}
        for k, v in data.items():
            m = re.fullmatch(r"(?:experts|layer|expert_index|top1)_(\d+)", k)
            if m:
                per_layer[int(m.group(1))] = v
        if not per_layer:
            stacked = next((data[k] for k in ("expert_index", "experts", "top1") if k in data),
                           None)
            if stacked is None:
                raise ValueError(f"{p}: routing snapshot has no expert arrays")
            layer_ids = (data["layers"].tolist() if "layers" in data
                         else list(range(stacked.shape[0])))
            per_layer = {int(layer): stacked[j] for j, layer in enumerate(layer_ids)}
        ids = np.asarray(ids).reshape(-1)
        per_layer = {k: np.asarray(v).reshape(ids.size, -1) for k, v in per_layer.items()}
        step = int(data["step"]) if "step" in data else int(_SNAPSHOT_RE.search(p.name).group(1))
        snaps.append({"step": step, "token_ids": ids, "experts": per_layer, "path": str(p)})
    return sorted(snaps, key=lambda s: s["step"])


# =====================================================================================
# plots (matplotlib's object API on an Agg canvas: no pyplot, no global state)
# =====================================================================================

def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> str:
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
    n_bars = len(bars) + len(init_bars)
    w = 0.8 / n_bars
    for j, (label, key, color) in enumerate(bars):
        vals = [100 * L["predictors"][key] for L in layers]
        ax1.bar(x + (j - (n_bars - 1) / 2) * w, vals, w, label=label, color=color)
    for j, (label, key, color) in enumerate(init_bars, start=len(bars)):
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
    """Agreement with the final routing against the training step, per layer."""
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    steps = np.asarray(early["steps"], dtype=float)
    for j, L in enumerate(early["layers"]):
        color = f"C{j}"
        ax.plot(steps, [100 * v for v in L["occurrences"]], "-o", color=color, ms=3,
                label=f"block {L['layer']}: token occurrences")
        ax.plot(steps, [100 * v for v in L["ids"]], "--", color=color,
                label=f"block {L['layer']}: token ids")
    ax.axhline(100 * early["chance"], color="k", ls=":", lw=1, label="chance 1/E")
    ax.set_xlabel(f"training step (final snapshot: {early['final_step']})")
    ax.set_ylabel("majority expert same as at the final step (%)")
    ax.set_ylim(0, 102)
    ax.set_title("Early routing learning: how soon each token's expert is fixed")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


_STYLE = {"train_cf": ("tab:red", "-"), "eval_cf": ("tab:blue", "-"),
          "probability": ("tab:green", "-"), "larger_cf": ("tab:purple", "-"),
          "dropless": ("k", ":"), "compare_train_cf": ("tab:red", "--"),
          "compare_eval_cf": ("tab:blue", "--")}


def plot_drop_vs_position(drops: Mapping[str, Any], path: str | Path) -> str:
    """One panel per data set, one line per routing setting: dropped share of expert
    assignments (all MoE layers) against the position in the routing group."""
    datasets = [d for d in drops["datasets"] if not d.get("skipped")]
    fig = _figure(5.0 * max(len(datasets), 1) + 0.5, 5.2)
    axes = fig.subplots(1, max(len(datasets), 1), squeeze=False)[0]
    top = 1.0
    for ax, ds in zip(axes, datasets):
        for c in drops["curves"]:
            if c["dataset"] != ds["name"]:
                continue
            color, ls = _STYLE.get(c["setting"], (None, "-"))
            mid = [(a + b - 1) / 2 for a, b in zip(c["bin_start"], c["bin_end"])]
            rate = [100 * v for v in c["drop_rate"]]
            top = max(top, max((v for v in rate if v == v), default=0.0))
            ax.plot(mid, rate, ls, color=color, marker=".", label=c["label"])
        ax.set_title(f"{ds['title']}\n({ds['n_tokens']:,} tokens)", fontsize=10)
        ax.set_xlabel(f"position in routing group (0..{drops['n_positions'] - 1})")
        ax.set_ylabel("dropped expert assignments (%)")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylim(-0.02 * top, top * 1.08)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, loc="outside lower center",
               ncol=min(len(labels), 4))
    fig.suptitle("Drop-towards-the-end: where in a group tokens lose their experts "
                 "(all MoE layers)")
    return _save(fig, path)


# =====================================================================================
# the whole analysis of one model
# =====================================================================================

def token_windows(tokens: Array, seq_len: int, n_windows: int) -> Array:
    """Up to ``n_windows`` non-overlapping windows [n, T+1] of a 1-D token array, spread
    evenly over it (tinymoe.data.eval_batches): inputs and the next-token target of each."""
    from tinymoe.data import eval_batches  # noqa: PLC0415

    batch = next(eval_batches(tokens, batch_size=max(n_windows, 1), seq_len=seq_len,
                              max_batches=1))
    return np.concatenate([batch.x, batch.y[:, -1:]], axis=1)             # [n, T+1]


def _cf_label(cf: float | None) -> str:
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
        label = f"{prio}, {_cf_label(cfg.capacity_factor)} (train)"
    elif setting in ("eval_cf", "compare_eval_cf"):
        ov = {"eval_capacity_factor": cfg.eval_capacity_factor}
        label = f"{prio}, {_cf_label(cfg.eval_capacity_factor)} (eval)"
    elif setting == "probability":
        ov = {"eval_capacity_factor": cfg.capacity_factor, "slot_priority": "probability"}
        label = f"cure: probability priority, {_cf_label(cfg.capacity_factor)}"
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


# =====================================================================================
# terminal report (built only from the JSON-ready report, so every printed number is in
# analysis.json)
# =====================================================================================

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
               f"E={E}, top-1 expert, eval {_cf_label(spec['capacity_factor'])}, "
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


# =====================================================================================
# command line: python -m tinymoe analyze CKPT
# =====================================================================================

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m tinymoe analyze``."""
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="checkpoint file, or a run folder holding checkpoint.npz")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="text file or folder of domains (default: the data the checkpoint "
                             "was trained on, else the built-in corpus); held-out parts are used")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write the PNGs and analysis.json "
                             "(default: <checkpoint folder>/analysis)")
    parser.add_argument("--max-tokens", type=int, default=65536, metavar="N",
                        help="held-out tokens per domain for the specialization measures "
                             "(default 65536)")
    parser.add_argument("--drop-tokens", type=int, default=16384, metavar="N",
                        help="tokens per data set for each drop-vs-position run "
                             "(default 16384)")
    parser.add_argument("--init-tokens", type=int, default=16384, metavar="N",
                        help="tokens per domain routed by the untrained control "
                             "(default 16384)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help="sequences per forward pass (default 16)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="T",
                        help="tokens per sequence (default: the model's max_seq_len)")
    parser.add_argument("--min-count", type=int, default=16, metavar="M",
                        help="ids seen fewer times are left out of the std measure and of the "
                             "'most specific' tokens (paper: 128; default 16)")
    parser.add_argument("--top-tokens", type=int, default=8, metavar="K",
                        help="top tokens kept per expert (default 8)")
    parser.add_argument("--bins", type=int, default=16, metavar="N",
                        help="position bins of the drop curves (default 16)")
    parser.add_argument("--larger-cf", type=float, default=None, metavar="CF",
                        help="capacity factor of the 'larger cf' cure (default: 2x the larger "
                             "of the train and eval factors)")
    parser.add_argument("--compare", metavar="CKPT2", default=None,
                        help="a second checkpoint (e.g. trained with the shifted data mixed in) "
                             "drawn on the drop figure")
    parser.add_argument("--snapshots", metavar="DIR", default=None,
                        help="routing snapshots folder (default: <checkpoint folder>/snapshots)")
    parser.add_argument("--exclude", metavar="DOMAIN", action="append", default=None,
                        help="treat this domain as left out of training (default: read from "
                             "the checkpoint's train config); repeatable")
    parser.add_argument("--no-init-control", dest="init_control", action="store_false",
                        help="skip the untrained model of the same config routed as a control")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads for BLAS and tinymoe's row-parallel kernels (default: "
                             "every core). 1 is often faster on a busy machine")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the multi-turn sequences and shuffled baselines")


def _train_info(train_config: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """(domains excluded from training, data path or None) from a checkpoint's train config."""
    excluded: Any = None
    for key in ("exclude", "exclude_domains", "excluded_domains", "exclude_domain"):
        if train_config.get(key):
            excluded = train_config[key]
            break
    if isinstance(excluded, str):
        excluded = [e for e in re.split(r"[,\s]+", excluded) if e]
    data = None
    for key in ("data", "data_path"):
        if isinstance(train_config.get(key), str) and train_config[key] not in ("", "builtin"):
            data = train_config[key]
            break
    return list(excluded or []), data


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("max_tokens", "drop_tokens", "init_tokens", "batch_size", "min_count",
                 "top_tokens", "bins"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')}={v} must be >= 1")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be >= 1")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len={args.seq_len} must be >= 1")
    if args.larger_cf is not None and args.larger_cf <= 0:
        raise ValueError(f"--larger-cf={args.larger_cf} must be > 0")


def run(args: argparse.Namespace) -> int:
    """``python -m tinymoe analyze``: print the tables, write PNGs and analysis.json."""
    import sys  # noqa: PLC0415

    from tinymoe.checkpoint import CheckpointError  # noqa: PLC0415

    try:
        return _run(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "threads", None) is not None:
        B.set_num_threads(args.threads)
    return _run_analysis(args)


def _run_analysis(args: argparse.Namespace) -> int:
    from tinymoe.checkpoint import (  # noqa: PLC0415
        load_checkpoint, load_model, resolve_checkpoint_path)
    from tinymoe.data import builtin_corpus, load_corpus  # noqa: PLC0415

    start = time.perf_counter()
    _check_positive(args)

    def log(msg: str) -> None:
        print(f"[analyze {time.perf_counter() - start:5.1f}s] {msg}", flush=True)

    ckpt_path = resolve_checkpoint_path(args.checkpoint)
    model, tokenizer, cfg = load_model(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    excluded, data_path = _train_info(ckpt.train_config or {})
    if args.exclude is not None:
        excluded = list(args.exclude)
    if args.data:
        corpus = load_corpus(args.data)
    elif data_path and Path(data_path).exists():
        corpus = load_corpus(data_path)
    else:
        corpus = builtin_corpus()
    excluded = [e for e in excluded if e in corpus.domains] if args.exclude is None else excluded
    log(f"loaded {ckpt_path} (step {ckpt.step}); data {corpus.source}: "
        f"{', '.join(corpus.domains)}" + (f"; left out of training: {', '.join(excluded)}"
                                          if excluded else ""))

    compare_model = None
    compare_name = "compare"
    if args.compare:
        cpath = resolve_checkpoint_path(args.compare)
        compare_model, ctok, ccfg = load_model(cpath)
        if ctok.to_dict() != tokenizer.to_dict():
            raise ValueError(f"--compare {cpath}: uses a different tokenizer than {ckpt_path}")
        T = args.seq_len or cfg.max_seq_len
        if ccfg.max_seq_len < T:
            raise ValueError(f"--compare {cpath}: max_seq_len {ccfg.max_seq_len} < {T}")
        compare_name = "compare " + (cpath.parent.name if cpath.name == "checkpoint.npz"
                                     else cpath.stem)

    init_model = None
    if getattr(args, "init_control", True):
        from tinymoe.nn.model import OpenMoE  # noqa: PLC0415

        init_model = OpenMoE(cfg.replace(), seed=args.seed + 1)
        init_model.eval()

    snap_dir = Path(args.snapshots) if args.snapshots else ckpt_path.parent / "snapshots"
    snapshots: list[dict[str, Any]] = []
    note = ""
    if snap_dir.is_dir():
        snapshots = load_snapshots(snap_dir)
        if not snapshots:
            note = f"no step_N.npz files in {snap_dir}"
        elif snapshots[-1]["step"] != ckpt.step:
            note = (f"the last snapshot (step {snapshots[-1]['step']}) is the reference; the "
                    f"checkpoint is at step {ckpt.step}")
    else:
        note = (f"no snapshot folder {snap_dir} (train with --snapshot-every N, or pass "
                "--snapshots DIR)")

    report = analyze(model, tokenizer, corpus, excluded=excluded, compare_model=compare_model,
                     compare_name=compare_name, snapshots=snapshots, snapshot_note=note,
                     max_tokens=args.max_tokens, drop_tokens=args.drop_tokens,
                     batch_size=args.batch_size, seq_len=args.seq_len,
                     min_count=args.min_count, n_top=args.top_tokens, n_bins=args.bins,
                     large_cf=args.larger_cf, seed=args.seed, init_model=init_model,
                     init_tokens=args.init_tokens, log=log)
    report = {"checkpoint": str(ckpt_path), "step": ckpt.step, **report}

    out_dir = Path(args.out) if args.out else ckpt_path.parent / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"specialization": plot_specialization(report["specialization"],
                                                     out_dir / "specialization.png"),
               "domain_share": plot_domain_share(report["specialization"],
                                                 out_dir / "domain_share.png")}
    if report["early_routing"].get("available"):
        figures["early_routing"] = plot_early_routing(report["early_routing"],
                                                      out_dir / "early_routing.png")
    figures["drop_vs_position"] = plot_drop_vs_position(report["drops"],
                                                        out_dir / "drop_vs_position.png")
    report["figures"] = figures
    report["wall_seconds"] = round(time.perf_counter() - start, 2)
    report["json"] = str(out_dir / "analysis.json")
    report = _json_ready(report)
    text = json.dumps(report, indent=1, allow_nan=False)
    from tinymoe.checkpoint import atomic_write_bytes  # noqa: PLC0415

    atomic_write_bytes(out_dir / "analysis.json", lambda f: f.write(text.encode("utf-8")))
    print()
    print(format_report(report))
    print(f"numbers: {report['json']}")
    return 0


def _json_ready(obj: Any) -> Any:
    """Plain Python containers and numbers only (NumPy scalars/arrays converted)."""
    if isinstance(obj, Mapping):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # NaN (an empty bin, a measure without data) -> null: strict JSON
    return obj
