"""Routing variants beyond OpenMoE, on plain arrays: expert choice, bias balancing, noise,
fine-grained experts. The differentiable side is :mod:`tinymoe.nn.routers`.

Each variant is one :class:`tinymoe.config.ModelConfig` field (``python -m tinymoe train
--help`` lists them); the default values give OpenMoE's token-choice router unchanged.

1. **Expert choice** (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
   eq. 1-2), ``router_type="expert_choice"``. Inside a group of G tokens,
   ``S = softmax(X W_r)`` [G, E] (over experts, as in token choice); each expert e takes
   the C tokens with the largest ``S[:, e]`` (``I = TopK(S^T, C)``), gating weight
   ``S[n, e]`` for a taken token. A token may get several experts or none; every expert
   gets exactly C tokens, so no load-balance loss is needed (``L_aux`` is 0 here).
   C = :func:`tinymoe.config.capacity` of the config (``capacity_mode="k_scaled"``,
   ``cf = 1`` gives ``C = k G / E``: the compute of dropless top-k), at most G.
   Ties: a lower token position first.

   **The leak.** In a decoder the choice looks at the whole group, so whether token t gets
   an expert depends on the tokens *after* t (an expert may prefer a later token and
   drop t). Training therefore sees the future through the router, and generation (one
   new token at a time, a group of one) routes differently from training.
   :func:`routing_changed` measures it on a model; the lab reports it.

   Representation: the result is a :class:`tinymoe.routing.RoutingResult` with k = E
   "choices" per token: ``expert_index[n]`` = all E experts ordered by the token's own
   probability (rank 0 = its favourite), ``kept[n, j]`` = expert ``expert_index[n, j]``
   took token n, ``slot`` = the token's rank in that expert's top-C. Everything
   downstream (dispatch, combine, the router backward) works unchanged.
   ``dropped_fraction`` = share of tokens that got **no** expert.

2. **Bias balancing without aux loss** (DeepSeek-V3, Liu et al. 2024, section 2.1.2),
   ``router_bias_rate=gamma > 0``: a per-expert bias b is added to the scores for the
   top-k *selection only* (``tinymoe.routing.route(selection_bias=b)``); the combine
   weights use the unbiased probabilities. After every optimizer step
   ``b_i <- b_i + gamma * sign(mean_j load_j - load_i)`` (:func:`bias_update`; load =
   assignments before capacity, summed over the step's batch, all its micro-batches
   with ``grad_accum > 1``; :func:`tinymoe.nn.routers.update_biases`): an overloaded
   expert's bias goes down. DeepSeek-V3 scores with a sigmoid: with
   ``router_score="sigmoid"`` (item 6) the choice is on ``s + b``; with the default
   softmax scores on ``p + b``. The bias is stored as a router "parameter" that never gets a gradient (the optimizer skips it), so it is in every
   checkpoint and resume stays exact.

3. **Noisy top-k gating** (Shazeer et al. 2017, eq. 3-5), ``router_noise=True``: in
   training ``H = x W_r + eps * softplus(x W_noise)``, ``eps ~ N(0, 1)`` drawn from the
   run's routing RNG (:func:`draw_noise`), W_noise trainable (init 0 as in the paper);
   routing and losses then use H. Shazeer's ``softmax(KeepTopK(H, k))`` equals the top-k
   probabilities renormalised, i.e. ``renormalize=True``. Eval: no noise.
   The aux loss is the Switch one, or with ``aux_loss_kind="shazeer"`` their smooth
   balance losses (Appendix A, eq. 6-11), per routing group and averaged over groups:
   ``L_aux = CV(Importance)^2 + CV(Load)^2`` (both weighted by ``aux_loss_coef``):
   :func:`importance` (the gates summed per expert), :func:`shazeer_load` (the normal CDF
   of how far each clean logit is from ``kth_excluding(H, k, i)``, in units of the noise
   scale), :func:`cv_squared`. In eval the noise is 0 and H = z in the same formulas.

4. **Fine-grained and shared experts** (DeepSeekMoE, Dai et al. 2024, section 3):
   :func:`fine_grained` splits each expert into m of 1/m the width and routes to m k of
   the m E experts (same parameters and compute), and makes the shared FFN ``s``
   always-on experts of the small width (``d_ff_shared = s * width / m``: a sum of s
   SwiGLUs on the same input is one SwiGLU with the hidden units side by side). OpenMoE's
   shared FFN is the case "one shared expert of width d_ff". The shared part keeps
   OpenMoE's placement (after the MoE, its own norm), not DeepSeekMoE's parallel one.

5. **Switch** (Fedus et al. 2021): top-1, ``capacity_mode="k_scaled"``; a preset of the
   lab (:mod:`tinymoe.variants`), no new code.

6. **Sigmoid scores** (DeepSeek-V3, section 2.1.2, eq. 13-16), ``router_score="sigmoid"``
   with ``renormalize=True``: ``s = sigmoid(z)`` per expert, top-k on ``s`` (+ b), gate
   weights ``s_j / sum_l s_l`` over the k chosen. :func:`tinymoe.routing.route` does it
   (``score="sigmoid"``); ``probs`` are ``s / sum_e s``, so the Switch aux loss becomes k
   times DeepSeek-V3's sequence-wise balance loss (eq. 17-20) when groups are sequences;
   the z-loss stays on the logits (docs/router.md §13).
"""
from __future__ import annotations

import math
from typing import Any

from tinymoe import backend as B
from tinymoe.config import ModelConfig, capacity
from tinymoe.routing import RoutingResult, _group_size, softmax_and_logsumexp

__all__ = ["route_expert_choice", "bias_update", "draw_noise", "fine_grained", "fine_grained_flags",
           "routing_changed", "normal_cdf", "normal_pdf", "cv_squared", "cv_squared_grad",
           "importance", "kth_excluding_index", "shazeer_load"]

Array = Any


def route_expert_choice(logits: Array, top_k: int, capacity_factor: float | None = 1.0,
                        group_size: int | None = None, min_capacity: int = 4,
                        capacity_mode: str = "k_scaled") -> RoutingResult:
    """Expert-choice routing of ``logits [N, E]`` (see the module docstring, item 1).

    ``top_k`` only enters the capacity (``capacity_mode="k_scaled"``); C is capped at G.
    """
    xp = B.array_module(logits)
    n, n_experts = logits.shape
    g = _group_size(n, group_size)
    n_groups = n // g
    cap = min(capacity(g, n_experts, top_k, capacity_factor, min_capacity, capacity_mode), g)

    probs, lse = softmax_and_logsumexp(logits)                                  # [N, E], [N]
    scores = probs.reshape(n_groups, g, n_experts).transpose(0, 2, 1)           # [ng, E, G]
    chosen = xp.argsort(-scores, axis=-1, kind="stable")[..., :cap]             # [ng, E, C] positions
    gi = xp.arange(n_groups)[:, None, None]                                     # [ng, 1, 1]
    ei = xp.arange(n_experts)[None, :, None]                                    # [1, E, 1]
    slot_ge = xp.full((n_groups, n_experts, g), -1, dtype=xp.int64)             # [ng, E, G]
    slot_ge[gi, ei, chosen] = xp.arange(cap, dtype=xp.int64)                    # rank in the expert's pick
    slot_ne = slot_ge.transpose(0, 2, 1).reshape(n, n_experts)                  # [N, E] by expert id

    rows = xp.arange(n)[:, None]                                                # [N, 1]
    expert_index = xp.argsort(-probs, axis=1, kind="stable").astype(xp.int64)   # [N, E] favourite first
    topk_prob = probs[rows, expert_index]                                       # [N, E]
    slot = slot_ne[rows, expert_index]                                          # [N, E]
    kept = slot >= 0                                                            # [N, E]
    combine_weight = xp.where(kept, topk_prob, xp.zeros((), dtype=probs.dtype))  # [N, E]
    load = xp.bincount(expert_index[kept], minlength=n_experts).astype(xp.int64)  # [E] = ng * C each
    no_expert = float((~kept.any(axis=1)).mean())
    return RoutingResult(
        expert_index=expert_index, topk_prob=topk_prob, combine_weight=combine_weight,
        kept=kept, slot=slot, probs=probs, lse=lse,
        f=xp.zeros((n_groups, n_experts), dtype=probs.dtype),   # no aux loss: zero gradient
        mean_prob=probs.reshape(n_groups, g, n_experts).mean(axis=1),
        load_before=load, load_after=load.copy(), capacity=cap, n_groups=n_groups,
        group_size=g, n_experts=n_experts, top_k=n_experts, renormalize=False,
        dropped_fraction=no_expert, confidence=float(topk_prob[:, 0].mean()),
        aux_loss=0.0, z_loss=float((lse ** 2).mean()))


def bias_update(bias: Array, load: Array, rate: float) -> Array:
    """DeepSeek-V3's update, in place: ``b_i += rate * sign(mean(load) - load_i)``.

    ``bias`` [E] float, ``load`` [E] assignments per expert (before capacity). An expert
    above the mean load gets a lower bias (chosen less), one below a higher bias; an
    expert exactly at the mean keeps its bias. Returns ``bias``.
    """
    xp = B.array_module(bias)
    load = xp.asarray(load).astype(bias.dtype)                                   # [E]
    bias += rate * xp.sign(load.mean() - load)                                  # [E]
    return bias


def normal_cdf(x: Array) -> Array:
    """``Phi(x)``, the standard normal CDF, elementwise (:func:`tinymoe.backend.normal_cdf`)."""
    return B.normal_cdf(x)


def normal_pdf(x: Array) -> Array:
    """``phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`` elementwise (the derivative of :func:`normal_cdf`)."""
    xp = B.array_module(x)
    return xp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def cv_squared(v: Array) -> Array:
    """Squared coefficient of variation over the last axis: ``Var(v) / mean(v)^2`` with the
    population variance ``mean((v - mean v)^2)`` (Shazeer et al. 2017, eq. 7 and 11).
    ``v`` [..., E] -> [...]."""
    m = v.mean(axis=-1)                                                         # [...]
    var = ((v - m[..., None]) ** 2).mean(axis=-1)                               # [...]
    return var / (m * m)


def cv_squared_grad(v: Array) -> Array:
    """``d CV(v)^2 / d v_i = 2 / (E m^2) * ((v_i - m) - Var / m)`` over the last axis
    (m = mean, Var = population variance, E = length): [..., E] -> [..., E]."""
    n = v.shape[-1]
    m = v.mean(axis=-1, keepdims=True)                                          # [..., 1]
    var = ((v - m) ** 2).mean(axis=-1, keepdims=True)                           # [..., 1]
    return (2.0 / (n * m * m)) * ((v - m) - var / m)                            # [..., E]


def importance(gates: Array, expert_index: Array, n_experts: int, n_groups: int) -> Array:
    """Shazeer et al. 2017 eq. 6 per routing group: ``Importance_g[i] = sum_{x in g} G(x)_i``,
    G(x) the gate values of the k chosen experts (before capacity drops; 0 elsewhere).
    ``gates`` [N, k], ``expert_index`` [N, k] -> [n_groups, E]."""
    xp = B.array_module(gates)
    n = gates.shape[0]
    dense = xp.zeros((n, n_experts), dtype=gates.dtype)                         # [N, E]
    dense[xp.arange(n)[:, None], expert_index] = gates                          # k distinct experts a row
    return dense.reshape(n_groups, n // n_groups, n_experts).sum(axis=1)        # [ng, E]


def kth_excluding_index(h: Array, expert_index: Array) -> tuple[Array, Array]:
    """Where ``kth_excluding(H(x), k, i)`` (Shazeer et al. 2017, eq. 9) sits in each row of
    ``h`` [N, E], given the top-k ``expert_index`` [N, k] chosen on h. For a chosen i, the
    k-th highest of the others is the best unchosen entry (the (k+1)-th overall); for an
    unchosen i, the k-th highest overall, i.e. the worst chosen entry. Needs k < E.
    Returns ``(index [N, E] int64, chosen [N, E] bool)``."""
    xp = B.array_module(h)
    n, n_experts = h.shape
    rows = xp.arange(n)                                                         # [N]
    chosen = xp.zeros((n, n_experts), dtype=bool)                               # [N, E]
    chosen[rows[:, None], expert_index] = True
    best_out = xp.where(chosen, -xp.inf, h).argmax(axis=1)                      # [N] (k+1)-th highest
    worst_in = xp.where(chosen, h, xp.inf).argmin(axis=1)                       # [N] k-th highest
    index = xp.where(chosen, best_out[:, None], worst_in[:, None]).astype(xp.int64)  # [N, E]
    return index, chosen


def shazeer_load(z: Array, spread: Array, h: Array, expert_index: Array, n_groups: int
                 ) -> tuple[Array, Array, Array]:
    """Shazeer et al. 2017 eq. 8-10 per routing group:

        P(x, i) = Phi((z_i - kth_excluding(H(x), k, i)) / softplus(u_i))     (eq. 9)
        Load_g[i] = sum_{x in g} P(x, i)                                      (eq. 10)

    the probability that expert i is in x's top-k when only the noise on i is redrawn.
    ``z`` [N, E] clean logits x W_g, ``spread`` [N, E] = softplus(x W_noise), ``h`` [N, E]
    the noisy logits the top-k ``expert_index`` [N, k] was chosen on. Returns ``(load
    [n_groups, E], a [N, E] the normal argument, index [N, E] of the threshold in h)``."""
    xp = B.array_module(z)
    n, n_experts = z.shape
    index, _ = kth_excluding_index(h, expert_index)                             # [N, E]
    threshold = h[xp.arange(n)[:, None], index]                                 # [N, E]
    a = (z - threshold) / spread                                                # [N, E]
    p = normal_cdf(a)                                                           # [N, E]
    return p.reshape(n_groups, n // n_groups, n_experts).sum(axis=1), a, index  # [ng, E]


def draw_noise(rng: Any, shape: tuple[int, int], dtype: Any) -> Array:
    """Standard normal noise ``eps`` [N, E] for noisy gating, from the host NumPy Generator
    ``rng`` (the trainer's routing RNG, seeded and saved in checkpoints), on the device."""
    if rng is None:
        raise ValueError("router_noise=True needs rng (a numpy Generator) in training mode")
    return B.to_device(rng.standard_normal(shape).astype(B.np.dtype(dtype)))


def fine_grained(cfg: ModelConfig, split: int, shared_experts: int = 1) -> ModelConfig:
    """DeepSeekMoE's fine-grained experts: each of the E experts cut into ``split`` experts
    of width ``expert_ff / split``; the layer routes every token to ``split * top_k`` of
    ``split * E``, so parameters and per-token expert compute are unchanged. The shared
    FFN becomes ``shared_experts`` always-on experts of the small width (0: no shared FFN).

    One-line ValueError when ``split`` does not divide the expert width, is < 1, or the
    top-k after splitting would exceed the expert count after splitting.
    """
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"fine-grained split={split!r} must be an integer >= 1")
    if isinstance(shared_experts, bool) or not isinstance(shared_experts, int) or shared_experts < 0:
        raise ValueError(f"shared_experts={shared_experts!r} must be an integer >= 0")
    width = cfg.expert_ff
    if width % split != 0:
        raise ValueError(f"fine-grained split={split} does not divide the expert FFN width {width}")
    if cfg.top_k * split > cfg.n_experts * split:
        raise ValueError(f"fine-grained: top_k {cfg.top_k}*{split} > n_experts {cfg.n_experts}*{split}")
    small = width // split
    return cfg.replace(n_experts=cfg.n_experts * split, top_k=cfg.top_k * split, d_ff_expert=small,
                       shared_ffn=shared_experts > 0,
                       d_ff_shared=shared_experts * small if shared_experts > 0 else None)


def fine_grained_flags(cfg: ModelConfig, split: int | None, shared_experts: int | None) -> ModelConfig:
    """What ``python -m tinymoe train --fine-grained M --shared-experts S`` does to the
    chosen preset (after its field overrides): :func:`fine_grained` with ``split = M``
    (None: 1, no split) and ``shared_experts = S``; with S None the shared FFN is left as
    the preset has it (for a preset whose expert width equals d_ff that is S = M, the lab's
    default). Both None: ``cfg`` unchanged.

    The result holds only concrete shapes (``n_experts``, ``top_k``, ``d_ff_expert``,
    ``shared_ffn``, ``d_ff_shared``): a checkpoint and every analysis read the split layer
    as it is, with no knowledge of M. One-line ValueError for a bad M or S.
    """
    if split is None and shared_experts is None:
        return cfg
    out = fine_grained(cfg, 1 if split is None else split,
                       shared_experts=0 if shared_experts is None else shared_experts)
    if shared_experts is None:                                   # keep the preset's shared FFN
        out = out.replace(shared_ffn=cfg.shared_ffn, d_ff_shared=cfg.d_ff_shared)
    return out


def routing_changed(model: Any, ids: Array, cut: int, seed: int = 0) -> dict[str, float]:
    """The expert-choice leak, measured: how often a token's routing changes when only
    LATER tokens change.

    ``ids`` [B, T] int. Positions ``cut..T-1`` are replaced by random token ids (a fixed
    ``seed``); the model runs (eval mode, no gradients) on both batches, and for every MoE
    layer the set of experts that process each token at positions ``0..cut-1`` is
    compared. Returns ``changed`` (share of (token, layer) pairs at positions < cut whose
    expert set differs) and ``no_expert_changed`` (share whose "got no expert" status
    flips). Only a causal router gives exactly 0: top-1 token choice with ``position``
    priority. Top-k token choice with k > 1 is not causal either: every first choice of a
    group is served before any second choice (docs/router.md §6, §13).
    """
    from tinymoe.autograd import no_grad  # noqa: PLC0415

    np = B.np
    ids = np.asarray(ids, dtype=np.int64)
    bsz, seq = ids.shape
    if not 0 < cut < seq:
        raise ValueError(f"cut={cut} must lie in 1..{seq - 1}")
    other = ids.copy()
    rng = np.random.default_rng(seed)
    other[:, cut:] = rng.integers(0, model.cfg.vocab_size, size=(bsz, seq - cut))
    with model.evaluating(), no_grad():
        a = model(ids).routing
        b = model(other).routing
    changed = flips = total = 0
    for sa, sb in zip(a, b):
        n_exp = sa.n_experts
        sets = []
        for s in (sa, sb):
            ei, kept = B.to_numpy(s.expert_index), B.to_numpy(s.kept)                # [N, k]
            m = np.zeros((ei.shape[0], n_exp), dtype=bool)                            # [N, E]
            m[np.nonzero(kept)[0], ei[kept]] = True
            sets.append(m.reshape(bsz, seq, n_exp)[:, :cut])                          # [B, cut, E]
        changed += int((sets[0] != sets[1]).any(axis=2).sum())
        flips += int((sets[0].any(axis=2) != sets[1].any(axis=2)).sum())
        total += bsz * cut
    return {"changed": changed / max(total, 1), "no_expert_changed": flips / max(total, 1),
            "tokens": total}
