"""Token-choice top-k routing on plain arrays: probabilities, top-k, capacity, slots, losses.

No autograd here: every function takes and returns arrays of the input's array module
(NumPy or CuPy), so a lesson can show the routing maths on its own. The differentiable
router layer calls :func:`route` in its forward pass and uses the returned pieces
(``probs``, ``f``, ``lse`` ...) in its backward pass.

Notation: N tokens (the batch ``[B, T]`` flattened in order), E experts, k experts per
token, tokens cut into ``n_groups`` groups of G contiguous tokens. Inside one group:

1. ``p = softmax(z)`` over all E experts (Switch Transformer eq. 1, numerically stable).
   (``score="sigmoid"``, DeepSeek-V3: ``s = sigmoid(z)``, top-k on s, ``p = s / sum s``;
   see :func:`route`.)
2. The top-k experts of each token by ``p``; ties go to the lower expert index.
   ``expert_index[n, j]`` is the rank-j choice of token n (rank 0 = best).
3. Combine weight of a choice = its raw probability ``p[n, e]`` (OpenMoE), or, with
   ``renormalize=True``, ``p[n, e] / sum_j p[n, e_j]`` (Mixtral). Computed before dropping.
4. Capacity C per expert per group (:func:`capacity`, defined in :mod:`tinymoe.config`
   with the vocabulary ``CAPACITY_MODES`` / ``SLOT_PRIORITIES``):
   ``"openmoe"``:  ``C = max(round(cf * G / E), min_capacity)``  (flaxformer; no factor k;
   Python ``round`` = round half to even, the same as flaxformer's ``int(round(...))``
   on a Python float, e.g. 2.5 -> 2, 3.5 -> 4);
   ``"k_scaled"``: ``C = max(ceil(k * cf * G / E), min_capacity)``  (DeepSpeed / Tutel).
   ``cf = 0`` or ``None`` means dropless: ``C = G`` (an expert gets at most one
   assignment per token, so at most G per group). C is not capped at G otherwise.
5. Slots. The k*G assignments of a group are put in a priority order; the slot of an
   assignment is the number of earlier assignments in that order to the same expert
   (``cumsum(one_hot(expert)) - 1``, flaxformer TokensChooseMaskedRouter). An assignment
   with ``slot >= C`` is dropped (combine weight 0, slot -1). The order always puts every
   rank-0 choice before every rank-1 choice, and so on; within a rank the tokens go
   ``"position"``:    in token order (OpenMoE; drops pile up at the end of a group);
   ``"probability"``: by the router probability of that choice, highest first, ties by
   position (batch-prioritised routing, V-MoE; note V-MoE ranks tokens by their top-1
   probability for every rank, here each rank uses its own choice's probability);
   ``"random"``:      in a random order, one independent permutation per (group, rank):
   ``argsort(rng.random((n_groups, k, G)), axis=-1)`` with the caller's NumPy Generator.
6. Losses per group, averaged over groups:
   load balance ``L_aux = E * sum_i f_i * P_i`` (Switch Transformer eq. 4-6 in the top-k
   form), ``f_i`` = fraction of the group's tokens with expert i among their top-k (before
   capacity, so ``sum_i f_i = k``), ``P_i`` = mean of ``p_i`` over the group's tokens;
   perfect balance gives ``L_aux = E * E * (k/E) * (1/E) = k``.
   Router z-loss ``L_z = mean_n logsumexp(z_n)^2`` (ST-MoE eq. 5).

Dispatch layout: expert e owns a buffer of ``n_groups * C`` rows; a kept assignment of
token n in group g with slot s goes to row ``g * C + s`` of expert e, i.e. to row
``e * n_groups * C + g * C + s`` of the flattened ``[E * n_groups * C, d]`` buffer
(:func:`dispatch_indices`).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tinymoe import backend as B
from tinymoe.config import CAPACITY_MODES, ROUTER_SCORES, SLOT_PRIORITIES, capacity

__all__ = [
    "RoutingResult", "route", "softmax", "sigmoid", "sigmoid_scores", "logsumexp", "softmax_and_logsumexp", "top_k",
    "capacity", "priority_order", "assign_slots", "expert_fraction", "group_mean_prob", "load_balance_loss",
    "z_loss", "dispatch_indices", "packed_indices",
    "SLOT_PRIORITIES", "CAPACITY_MODES",
]

Array = Any  # a NumPy or CuPy array


# ----------------------------------------------------------------------------- pieces

def softmax_and_logsumexp(logits: Array) -> tuple[Array, Array]:
    """Softmax over the last axis and the log-partition, sharing one ``exp``:

    ``m = max_e z_e``, ``s = sum_e exp(z_e - m)``, ``p = exp(z - m) / s``,
    ``logsumexp(z) = m + log s``. Stable for large logits; keeps the input dtype.
    """
    xp = B.array_module(logits)
    m = logits.max(axis=-1, keepdims=True)  # [N, 1]
    p = logits - m  # [N, E]
    xp.exp(p, out=p)
    total = p.sum(axis=-1, keepdims=True)  # [N, 1]
    p /= total
    return p, (m + xp.log(total))[..., 0]  # [N, E], [N]


def sigmoid(logits: Array) -> Array:
    """``s = 1 / (1 + exp(-z))`` elementwise, in the input dtype, without overflow:
    ``exp(-|z|)`` is at most 1, and ``s = 1 / (1 + e)`` for z >= 0, ``e / (1 + e)`` below."""
    xp = B.array_module(logits)
    e = xp.exp(-xp.abs(logits))  # [N, E] in (0, 1]
    return xp.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(logits.dtype, copy=False)


def sigmoid_scores(logits: Array) -> tuple[Array, Array, Array]:
    """DeepSeek-V3's scores (eq. 15) and what the losses use: ``s = sigmoid(z)`` [N, E],
    the normalised scores ``s' = s / sum_e s`` [N, E] (eq. 19; they sum to 1 like softmax
    probabilities) and ``logsumexp(z)`` [N] (for the z-loss, which stays on the logits)."""
    s = sigmoid(logits)  # [N, E]
    return s, s / s.sum(axis=1, keepdims=True), logsumexp(logits)  # [N, E], [N, E], [N]


def softmax(logits: Array) -> Array:
    """``p = exp(z - max z) / sum exp(z - max z)`` over the last axis, in the input dtype."""
    return softmax_and_logsumexp(logits)[0]


def logsumexp(logits: Array) -> Array:
    """``log sum_e exp(z_e)`` over the last axis, computed stably: ``m + log sum exp(z - m)``."""
    return softmax_and_logsumexp(logits)[1]


def top_k(probs: Array, k: int) -> tuple[Array, Array]:
    """The k largest entries of each row, best first, ties to the lower index.

    Returns ``(index [N, k] int64, value [N, k])``. Implemented as k passes of ``argmax``
    (which returns the first maximum), masking each winner out; for E <= 64 and small k
    this is several times faster than sorting every row.
    """
    xp = B.array_module(probs)
    n, n_experts = probs.shape
    if not 1 <= k <= n_experts:
        raise ValueError(f"top_k={k} must be between 1 and n_experts={n_experts}")
    rows = xp.arange(n)  # [N]
    masked = probs.copy()  # [N, E]
    index = xp.empty((n, k), dtype=xp.int64)  # [N, k]
    for j in range(k):  # a loop over ranks, not tokens
        best = masked.argmax(axis=1)  # [N]
        index[:, j] = best
        masked[rows, best] = -xp.inf
    value = probs[rows[:, None], index]  # [N, k]
    return index, value


_select_top_k = top_k  # ``route`` has an argument named ``top_k``; keep a handle on the function


def priority_order(probs_of_choice: Array, priority: str = "position", rng: Any = None) -> Array:
    """Token order within each (group, rank): ``order[g, j, i]`` = position (0..G-1) of the
    i-th token served at rank j in group g. Shape ``[n_groups, k, G]``, int64.

    ``probs_of_choice`` is ``[n_groups, G, k]``, the router probability of each choice
    (only ``"probability"`` reads its values; the others use its shape and device).
    ``"random"`` needs ``rng``, a host ``numpy.random.Generator``.
    """
    if priority not in SLOT_PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}: use one of {SLOT_PRIORITIES}")
    xp = B.array_module(probs_of_choice)
    n_groups, g, k = probs_of_choice.shape
    if priority == "position":
        order = xp.broadcast_to(xp.arange(g, dtype=xp.int64), (n_groups, k, g))  # [ng, k, G]
        return xp.ascontiguousarray(order)
    if priority == "probability":
        score = -probs_of_choice.transpose(0, 2, 1)  # [ng, G, k] -> [ng, k, G]
        return xp.argsort(score, axis=-1, kind="stable").astype(xp.int64)  # [ng, k, G]
    if rng is None:
        raise ValueError("priority='random' needs rng (a numpy Generator, e.g. backend.default_rng(seed))")
    host = B.np.argsort(rng.random((n_groups, k, g)), axis=-1, kind="stable")  # [ng, k, G]
    return xp.asarray(host, dtype=xp.int64)


def _running_count(seq_expert: Array, n_experts: int) -> tuple[Array, Array]:
    """For a sequence per group, ``count[g, i]`` = number of earlier entries equal to
    ``seq_expert[g, i]`` (i.e. ``cumsum(one_hot) - 1`` picked at the entry's expert), plus
    the per-(group, expert) totals ``[n_groups, E]``.

    Sort-based counting: one stable sort of the keys ``g * E + e`` lines up each
    (group, expert) run in sequence order, so the count is the position within the run.
    O(M log M) instead of the O(M * E) one-hot cumsum (about 25x faster at E=64, M=2e5).
    """
    xp = B.array_module(seq_expert)
    n_groups, length = seq_expert.shape
    key = (xp.arange(n_groups, dtype=xp.int64)[:, None] * n_experts + seq_expert).ravel()  # [M]
    perm = xp.argsort(key, kind="stable")  # [M]
    totals = B.count_values(key, n_groups * n_experts)  # [ng * E], no host sync
    run_start = xp.cumsum(totals) - totals  # [ng * E]
    count = xp.empty(key.shape, dtype=xp.int64)  # [M]
    count[perm] = xp.arange(key.size, dtype=xp.int64) - run_start[key[perm]]
    return count.reshape(n_groups, length), totals.reshape(n_groups, n_experts)


def assign_slots(expert_index: Array, probs_of_choice: Array | None, capacity: int,
                 priority: str = "position", rng: Any = None, *, order: Array | None = None,
                 n_experts: int | None = None) -> tuple[Array, Array]:
    """Slot of every assignment inside its expert's group buffer, and whether it is kept.

    ``expert_index`` and ``probs_of_choice`` are ``[n_groups, G, k]``. The k*G assignments of a group are taken in
    the priority order (all rank 0 first, see :func:`priority_order`; or the explicit
    ``order [n_groups, k, G]``); the slot is the number of earlier assignments to the same
    expert; kept iff ``slot < capacity``. Returns ``(slot [n_groups, G, k] int64 with -1
    where dropped, kept [n_groups, G, k] bool)``.
    """
    xp = B.array_module(expert_index)
    n_groups, g, k = expert_index.shape
    if n_experts is None:
        n_experts = int(expert_index.max()) + 1 if expert_index.size else 1
    if order is None:
        if probs_of_choice is None:
            if priority == "probability":
                raise ValueError("priority='probability' needs probs_of_choice")
            probs_of_choice = xp.zeros((n_groups, g, k), dtype=xp.float32)  # shape only
        order = priority_order(probs_of_choice, priority, rng)
    gi = xp.arange(n_groups)[:, None, None]  # [ng, 1, 1]
    ji = xp.arange(k)[None, :, None]  # [1, k, 1]
    # Expert of the i-th assignment in priority order, ranks one after the other.
    seq_expert = expert_index[gi, order, ji]  # [ng, k, G]
    seq_slot, _ = _running_count(seq_expert.reshape(n_groups, k * g), n_experts)  # [ng, k*G]
    slot = xp.empty((n_groups, g, k), dtype=xp.int64)  # [ng, G, k]
    slot[gi, order, ji] = seq_slot.reshape(n_groups, k, g)  # back to token order
    kept = slot < capacity  # [ng, G, k]
    return xp.where(kept, slot, -1), kept  # (no boolean-mask write: a host sync on CuPy)


def assign_slots_reference(expert_index: Array, capacity: int, n_experts: int,
                           order: Array | None = None) -> tuple[Array, Array]:
    """Reference for :func:`assign_slots` in plain NumPy (host arrays): the one-hot cumsum
    of flaxformer's TokensChooseMaskedRouter, O(k G E) per group.

    ``expert_index [n_groups, G, k]``; ``order [n_groups, k, G]`` (None: token order, i.e.
    priority "position"). The queue of a group is k-major (every rank-0 choice, then every
    rank-1 choice ...); an assignment's slot is ``cumsum(one_hot(queue)) - 1`` at its expert.
    Returns ``(slot [n_groups, G, k] with -1 where dropped, kept [n_groups, G, k])``.
    """
    np = B.np
    n_groups, g, k = expert_index.shape
    order = np.broadcast_to(np.arange(g), (n_groups, k, g)) if order is None else order  # [ng, k, G]
    gi, ji = np.arange(n_groups)[:, None, None], np.arange(k)[None, :, None]
    queue = expert_index[gi, order, ji].reshape(n_groups, k * g)                   # [ng, k*G]
    one_hot = np.eye(n_experts, dtype=np.int64)[queue]                              # [ng, k*G, E]
    queue_slot = ((np.cumsum(one_hot, axis=1) - 1) * one_hot).sum(axis=2)          # [ng, k*G]
    slot = np.empty((n_groups, g, k), dtype=np.int64)
    slot[gi, order, ji] = queue_slot.reshape(n_groups, k, g)                        # back to token order
    kept = slot < capacity
    return np.where(kept, slot, -1), kept


def expert_fraction(expert_index: Array, n_experts: int, n_groups: int,
                    dtype: Any = None) -> Array:
    """``f[g, i]`` = fraction of group g's tokens that have expert i among their top-k
    (before capacity; rows sum to k). ``expert_index`` is ``[N, k]``; returns ``[n_groups, E]``."""
    xp = B.array_module(expert_index)
    n, k = expert_index.shape
    g = n // n_groups
    group_of = xp.arange(n, dtype=xp.int64) // g  # [N]
    key = (group_of[:, None] * n_experts + expert_index).ravel()  # [N * k]
    counts = B.count_values(key, n_groups * n_experts).reshape(n_groups, n_experts)
    return (counts / g).astype(dtype if dtype is not None else xp.float32)  # [ng, E]


def group_mean_prob(probs: Array, n_groups: int) -> Array:
    """``P[g, i]`` = mean of ``probs[n, i]`` over the tokens n of group g: [N, E] -> [ng, E]."""
    return probs.reshape(n_groups, -1, probs.shape[-1]).mean(axis=1)  # [ng, G, E] -> [ng, E]


def load_balance_loss(probs: Array, expert_index: Array, n_experts: int, n_groups: int, *,
                      f: Array | None = None, mean_prob: Array | None = None) -> float:
    """``mean_g E * sum_i f[g, i] * P[g, i]`` with ``P[g, i]`` the mean of ``probs[:, i]``
    over group g (Switch Transformer eq. 4-6, top-k form; equals k at perfect balance).
    ``f`` (:func:`expert_fraction`) and ``mean_prob`` (:func:`group_mean_prob`) may be
    passed when the caller has them already."""
    if f is None:
        f = expert_fraction(expert_index, n_experts, n_groups, dtype=probs.dtype)  # [ng, E]
    if mean_prob is None:
        mean_prob = group_mean_prob(probs, n_groups)  # [ng, E]
    return float((n_experts * (f * mean_prob).sum(axis=1)).mean())


def z_loss(logits: Array, *, lse: Array | None = None) -> float:
    """Router z-loss ``mean_n logsumexp(z_n)^2`` (ST-MoE eq. 5); ``lse`` [N] may be passed
    when the caller has ``logsumexp(logits)`` already."""
    if lse is None:
        lse = logsumexp(logits)  # [N]
    return float((lse ** 2).mean())


# ----------------------------------------------------------------------------- route

@dataclass
class RoutingResult:
    """Everything one routing call decides and measures. Arrays live on the input's device.

    Per assignment ``[N, k]``: ``expert_index`` (int64, rank order), ``topk_prob`` (raw
    probability of the choice), ``combine_weight`` (raw or renormalised probability, 0
    where dropped), ``kept`` (bool), ``slot`` (int64, -1 where dropped).
    Per token: ``probs [N, E]``, ``lse [N]`` (logsumexp of the logits, for the z-loss).
    Per group: ``f [n_groups, E]`` (top-k fractions before capacity), ``mean_prob
    [n_groups, E]``. Per expert: ``load_before``/``load_after [E]`` (int64, assignments
    before/after capacity, summed over groups). Python numbers: ``capacity``,
    ``n_groups``, ``group_size``, ``n_experts``, ``top_k``, ``renormalize``, ``score``
    ("softmax", or "sigmoid": then ``probs`` are the normalised sigmoid scores),
    ``aux_kind`` ("switch": ``aux_loss`` is the Switch loss; "shazeer": Shazeer et al.'s
    CV(Importance)^2 + CV(Load)^2, see :mod:`tinymoe.routing_variants`). 0-d arrays
    of the input's device (``float(...)`` reads one; on a GPU that is a host sync, so the
    trainer reads them once per step): ``dropped_fraction`` (dropped / (N*k), float64),
    ``confidence`` (mean top-1 probability), ``aux_loss``, ``z_loss``.
    """

    expert_index: Array
    topk_prob: Array
    combine_weight: Array
    kept: Array
    slot: Array
    probs: Array
    lse: Array
    f: Array
    mean_prob: Array
    load_before: Array
    load_after: Array
    capacity: int
    n_groups: int
    group_size: int
    n_experts: int
    top_k: int
    renormalize: bool
    dropped_fraction: Array
    confidence: Array
    aux_loss: Array
    z_loss: Array
    score: str = "softmax"
    aux_kind: str = "switch"

    @property
    def rows_per_expert(self) -> int:
        """Rows of each expert's dispatch buffer: ``n_groups * capacity``."""
        return self.n_groups * self.capacity


def _group_size(n: int, group_size: int | None) -> int:
    """The effective group size: ``None`` or ``>= N`` -> one group of N tokens."""
    if group_size is None or group_size >= n:
        return n
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    if n % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of tokens N={n}")
    return int(group_size)


def route(logits: Array, top_k: int, capacity_factor: float | None = 1.25,
          group_size: int | None = None, min_capacity: int = 4, capacity_mode: str = "openmoe",
          priority: str = "position", renormalize: bool = False, rng: Any = None,
          selection_bias: Array | None = None, score: str = "softmax") -> RoutingResult:
    """Route N tokens to k of E experts each, with per-group expert capacity.

    ``logits`` is ``[N, E]`` (tokens in order, groups are contiguous runs of
    ``group_size``); see the module docstring for the maths. ``rng`` (a host NumPy
    Generator) is used only by ``priority="random"``. ``selection_bias`` [E] (DeepSeek-V3
    bias balancing, :mod:`tinymoe.routing_variants`): the top-k is taken on ``p + b``
    while ``topk_prob`` and the combine weights stay the unbiased ``p`` of the choice.

    ``score="sigmoid"`` (DeepSeek-V3, Liu et al. 2024, section 2.1.2, eq. 13-16):
    ``s = sigmoid(z)`` per expert; the top-k is taken on ``s`` (``s + b`` with a bias); the
    gate weights are the chosen ``s`` normalised to sum 1 over the k (eq. 13: needs
    ``renormalize=True``). ``probs`` holds ``s' = s / sum_e s`` (eq. 19), so ``topk_prob``,
    the confidence, priority ``"probability"`` and the load-balance loss read normalised
    scores; the gate weights ``s_j / sum_l s_l`` equal ``s'_j / sum_l s'_l``. ``lse`` is
    still ``logsumexp(z)`` (the z-loss keeps the logits small).
    """
    xp = B.array_module(logits)
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"logits must be 2-D [N, E], got shape {getattr(logits, 'shape', None)}")
    if logits.dtype.kind != "f":
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    n, n_experts = logits.shape
    if n < 1 or n_experts < 1:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
    if priority not in SLOT_PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}: use one of {SLOT_PRIORITIES}")
    g = _group_size(n, group_size)
    n_groups = n // g
    cap = capacity(g, n_experts, top_k, capacity_factor, min_capacity, capacity_mode)

    if score not in ROUTER_SCORES:
        raise ValueError(f"unknown score {score!r}: use one of {ROUTER_SCORES}")
    if score == "sigmoid":
        if not renormalize:
            raise ValueError("score='sigmoid' needs renormalize=True (DeepSeek-V3 eq. 13)")
        chooser, probs, lse = sigmoid_scores(logits)  # s [N, E], s' [N, E], [N]
    else:
        probs, lse = softmax_and_logsumexp(logits)  # [N, E], [N]
        chooser = probs  # [N, E]
    if selection_bias is None and score == "softmax":
        expert_index, topk_prob = _select_top_k(probs, top_k)  # [N, k], [N, k]
    else:  # choose on p + b (s + b), weigh with the unbiased p (s')
        if selection_bias is not None:
            chooser = chooser + selection_bias  # [N, E] + [E]
        expert_index, _ = _select_top_k(chooser, top_k)  # [N, k]
        topk_prob = probs[xp.arange(n)[:, None], expert_index]  # [N, k]
    if renormalize:
        weight = topk_prob / topk_prob.sum(axis=1, keepdims=True)  # [N, k]
    else:
        weight = topk_prob  # [N, k]

    slot, kept = assign_slots(expert_index.reshape(n_groups, g, top_k),
                              topk_prob.reshape(n_groups, g, top_k), cap, priority, rng,
                              n_experts=n_experts)  # [ng, G, k] each
    slot = slot.reshape(n, top_k)  # [N, k]
    kept = kept.reshape(n, top_k)  # [N, k]
    combine_weight = xp.where(kept, weight, xp.zeros((), dtype=weight.dtype))  # [N, k]

    f = expert_fraction(expert_index, n_experts, n_groups, dtype=probs.dtype)  # [ng, E]
    mean_prob = group_mean_prob(probs, n_groups)  # [N, E] -> [ng, E]
    # The statistics stay on the device as 0-d arrays (no host sync here): see RoutingResult.
    aux = (n_experts * (f * mean_prob).sum(axis=1)).mean()  # [] (load_balance_loss)
    load_before = B.count_values(expert_index, n_experts)  # [E]
    load_after = B.count_values(xp.where(kept, expert_index, n_experts), n_experts + 1)[:n_experts]  # [E]
    n_kept = kept.sum()  # []
    return RoutingResult(
        expert_index=expert_index, topk_prob=topk_prob, combine_weight=combine_weight,
        kept=kept, slot=slot, probs=probs, lse=lse, f=f, mean_prob=mean_prob,
        load_before=load_before, load_after=load_after,
        capacity=cap, n_groups=n_groups, group_size=g, n_experts=n_experts, top_k=top_k,
        renormalize=bool(renormalize),
        dropped_fraction=(n * top_k - n_kept) / (n * top_k),
        confidence=topk_prob[:, 0].mean(),
        aux_loss=aux, z_loss=(lse ** 2).mean(),  # z_loss(logits, lse=lse)
        score=score,
    )


def dispatch_indices(result: RoutingResult) -> tuple[Array, Array, Array]:
    """Where each kept assignment goes in the flattened dispatch buffer.

    Returns ``(flat_pos, token, rank)``, each ``[M]`` int64 over the M kept assignments
    (in token order, then rank order), with
    ``flat_pos = e * (n_groups * C) + group(token) * C + slot``. Use it as
    ``buf.reshape(E * n_groups * C, d)[flat_pos] = x[token]`` to dispatch and
    ``y[token] += combine_weight[token, rank, None] * out_flat[flat_pos]`` to combine.
    """
    xp = B.array_module(result.kept)
    token, rank = xp.nonzero(result.kept)  # [M], [M]
    token = token.astype(xp.int64)
    rank = rank.astype(xp.int64)
    expert = result.expert_index[token, rank]  # [M]
    column = (token // result.group_size) * result.capacity + result.slot[token, rank]  # [M]
    flat_pos = expert * result.rows_per_expert + column  # [M]
    return flat_pos, token, rank


def packed_indices(result: RoutingResult, n_kept: int) -> tuple[Array, Array]:
    """The kept assignments in dispatch-buffer order (expert-major, then group, then slot),
    as ``(token [M], rank [M])`` int64: what :func:`dispatch_indices` gives, stably sorted
    by ``flat_pos``. ``n_kept`` = M, the sum of ``result.load_after`` as a host int.

    Built without ``nonzero`` (whose output size CuPy reads on the host, a sync): every
    assignment gets its flat buffer row, a dropped one the row ``E * n_groups * C`` past
    the end; a stable argsort puts the M kept ones first, in row order."""
    xp = B.array_module(result.kept)
    n, k = result.kept.shape
    token = xp.arange(n, dtype=xp.int64)[:, None]  # [N, 1]
    column = (token // result.group_size) * result.capacity + result.slot  # [N, k]
    end = result.n_experts * result.rows_per_expert
    flat = xp.where(result.kept, result.expert_index * result.rows_per_expert + column, end)  # [N, k]
    order = xp.argsort(flat.ravel(), kind="stable")[:n_kept]  # [M]
    return order // k, order % k
