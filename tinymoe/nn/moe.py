"""The differentiable Mixture-of-Experts layer: router, dispatch, experts, combine.

One MoE forward on tokens x [N, d] (the batch [B, T] flattened in order):

1. Router logits ``z = x W_r`` [N, E] (no bias, init N(0, 0.02)).
2. The routing decisions (top-k experts, capacity, slots, kept mask, statistics) are taken
   on the plain logits array by :func:`tinymoe.routing.route`; they are not differentiable.
   :class:`RouterFunction` turns them into three differentiable outputs of z: the combine
   weights [N, k], the load-balance loss and the router z-loss (hand-written backward).
3. Conceptually each kept assignment has a row of a dispatch buffer [E, n_groups * C, d]
   (expert e, group g, slot s; :class:`Dispatch` builds exactly that buffer, empty slots
   zero). Computing on the empty slots is wasted work (at initialisation half the slots or
   more are empty), so the layer sorts the kept assignments by their buffer row and keeps
   only those: :class:`GatherRows` takes their tokens into packed rows [M, d], expert 0's
   rows first, then expert 1's, and so on.
4. :class:`Experts` runs every expert's SwiGLU on its own rows as grouped matmuls
   (:class:`GroupedMatmul`, one GEMM per expert on ``load[e]`` rows):
   ``swiglu(x_e W_gate[e], x_e W_up[e]) W_down[e]`` -> [M, d]. (Given the full buffer
   [E, R, d] instead, it runs one batched matmul over it, empty slots included.)
5. :class:`Combine` adds ``weight * expert_out[row]`` back to each token (a scatter-add
   of rows). A dropped assignment has no row: it contributes exactly 0 and gets 0 gradient;
   a token whose every assignment was dropped gets y = 0 (it still flows through the
   residual and the shared FFN of the block).

Routing variants (expert choice, noisy gating, bias balancing, sigmoid scores, Shazeer's
balance loss: docs/router.md §13) take step 2 through
:func:`tinymoe.nn.routers.route_variant` when a variant field of the config is set; steps
3-5 are the same for all of them.

Losses (per group, averaged over groups):
  load balance  L_aux = E * sum_i f_i P_i  (Switch Transformer, Fedus et al. 2021, eq. 4-6,
                in the top-k form: f_i counts tokens with expert i among their top-k, before
                capacity; equals k at perfect balance);
  router z-loss L_z = mean_n logsumexp(z_n)^2  (ST-MoE, Zoph et al. 2022, eq. 5).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tinymoe import backend as B
from tinymoe import functional as F
from tinymoe import routing, routing_variants
from tinymoe.autograd import Context, Function, Tensor
from tinymoe.config import ModelConfig
from tinymoe.config import FFN_KINDS
from tinymoe.nn import routers
from tinymoe.nn.layers import fan_in_std, gated_triple, normal_parameter
from tinymoe.nn.module import Module, Parameter

__all__ = ["Router", "Experts", "MoE", "MoEStats", "RouterFunction", "Dispatch", "Combine", "GatherRows",
           "GroupedMatmul", "route_differentiable", "route_layer", "dispatch", "combine", "gather_rows",
           "grouped_matmul"]


# --------------------------------------------------------------------------------------
# the routing Function: logits -> combine weights, aux loss, z-loss
# --------------------------------------------------------------------------------------

class RouterFunction(Function):
    """Differentiable part of routing, given the decisions ``result`` already taken.

    Forward: ``logits [N, E]`` and a :class:`tinymoe.routing.RoutingResult` computed from
    the same logits -> (combine weights [N, k], L_aux (0-d), L_z (0-d)).

    Backward, with p = softmax(z) and the decisions held fixed:

    (a) combine weights. Raw: w_{n,j} = kept_{n,j} p_{n,e_j}, so dL/dp_{n,e_j} += g_{n,j}
        kept_{n,j}. Renormalised (w_j = p_{e_j} / S, S = sum_j p_{e_j}, then zeroed where
        dropped): with g' = g * kept, dL/dp_{n,e_l} += (g'_l - sum_j g'_j w_j) / S.
    (b) load balance (Switch eq. 4-6): L_aux = (1/n_groups) sum_g E sum_i f_{g,i} P_{g,i},
        P_{g,i} = (1/G) sum_{n in g} p_{n,i}, f held constant (it comes from an argmax), so
        dL_aux/dp_{n,i} = E f_{g(n),i} / (G n_groups).
    (c) the softmax: dL/dz_n = p_n * (dL/dp_n - <dL/dp_n, p_n>).
    (d) z-loss (ST-MoE eq. 5): L_z = (1/N) sum_n lse(z_n)^2, d lse/dz = softmax(z), so
        dL_z/dz_n = 2 lse(z_n) softmax(z_n) / N (added directly on z).

    Sigmoid scores (``result.score == "sigmoid"``, DeepSeek-V3 eq. 13-15): ``p`` is then
    s' = s / S with s = sigmoid(z), S = sum_e s_e, and (a)-(b) give dL/ds'. Step (c)
    becomes the chain through s' and s: dL/ds_e = (dL/ds'_e - <dL/ds', s'>) / S and
    ds_e/dz_e = s_e (1 - s_e), so with s_e / S = s'_e

        dL/dz_n = s'_n * (dL/ds'_n - <dL/ds'_n, s'_n>) * (1 - s_n),

    the softmax form of (c) times (1 - s). (The gate weights s_j / sum_l s_l of the k
    chosen equal s'_j / sum_l s'_l, the renormalised case of (a).) The z-loss (d) is the
    same function of z, with softmax(z) = exp(z - lse) recomputed from the logits.

    Shazeer's importance loss (``result.aux_kind == "shazeer"``, Shazeer et al. 2017 eq.
    6-7) replaces (b): the aux output is L_imp = (1/n_groups) sum_g CV(I_g)^2, I_g[i] =
    sum_{n in g} G_{n,i} with G the gates of the chosen experts before drops (raw or
    renormalised p, as the combine weights). With m = mean_i I_i and V the population
    variance, dCV^2/dI_i = 2 / (E m^2) ((I_i - m) - V / m), and dI_{g(n), e_j} / dG_{n,j}
    = 1, so (b) becomes a gradient on the pre-drop gates, added to g' of (a) before the
    renormalisation chain. (The Load half of their loss depends on the clean logits and
    the noise scale, not on p: :class:`tinymoe.nn.routers.ShazeerLoad`.)
    """

    @staticmethod
    def forward(ctx: Context, logits: Any, result: routing.RoutingResult) -> tuple:
        xp = B.array_module(logits)
        dt = logits.dtype
        ctx.result = result
        ctx.logits = logits if result.score == "sigmoid" else None       # [N, E], for (c) and (d)
        weight = result.combine_weight.astype(dt, copy=True)              # [N, k]
        if result.aux_kind == "shazeer":                                  # importance half (eq. 6-7)
            ctx.importance = routing_variants.importance(
                _gates(result), result.expert_index, result.n_experts, result.n_groups)  # [ng, E]
            aux = xp.asarray(routing_variants.cv_squared(ctx.importance).mean(), dtype=dt)  # []
        else:
            aux = xp.asarray(result.aux_loss, dtype=dt)                   # []
        z = xp.asarray(result.z_loss, dtype=dt)                           # []
        return weight, aux, z

    @staticmethod
    def backward(ctx: Context, g_weight: Any, g_aux: Any, g_z: Any) -> tuple:
        r: routing.RoutingResult = ctx.result
        xp = B.array_module(r.probs)
        p = r.probs                                                       # [N, E]
        n, n_experts = p.shape
        dt = p.dtype
        rows = xp.arange(n)[:, None]                                      # [N, 1]
        # (a) combine weights, only through kept assignments
        gw = g_weight * r.kept                                            # [N, k]
        if r.aux_kind == "shazeer":
            # (b') importance: dL/dG_{n,j} = dCV^2/dI at (g(n), e_j), on every chosen gate
            d_imp = (g_aux.astype(dt) / r.n_groups) * routing_variants.cv_squared_grad(ctx.importance)  # [ng, E]
            gw = gw + xp.repeat(d_imp, r.group_size, axis=0)[rows, r.expert_index]  # [N, k]
            dp = xp.zeros_like(p)                                         # [N, E]
        else:
            # (b) load balance: every token of group g gets E f_g / (G n_groups)
            coef = g_aux.astype(dt) * (n_experts / (r.group_size * r.n_groups))
            dp = xp.repeat(coef * r.f.astype(dt), r.group_size, axis=0)  # [n_groups, E] -> [N, E]
        if r.renormalize:
            total = r.topk_prob.sum(axis=1, keepdims=True)               # [N, 1]
            w = r.topk_prob / total                                       # [N, k]
            gw = (gw - (gw * w).sum(axis=1, keepdims=True)) / total      # [N, k]
        dp[rows, r.expert_index] += gw.astype(dt, copy=False)             # k distinct experts per row
        # (c) softmax backward (sigmoid scores: times 1 - s)
        dz = p * (dp - (dp * p).sum(axis=1, keepdims=True))               # [N, E]
        if ctx.logits is None:
            softmax_z = p                                                 # [N, E]
        else:
            dz *= routing.sigmoid(-ctx.logits)                            # [N, E] 1 - s, no cancellation
            softmax_z = xp.exp(ctx.logits - r.lse[:, None])               # [N, E]
        # (d) z-loss
        dz += (g_z.astype(dt) * (2.0 / n)) * r.lse[:, None] * softmax_z   # [N, E]
        return dz, None


def _gates(r: routing.RoutingResult) -> Any:
    """The gate values of the k chosen experts before capacity drops [N, k]: the raw
    probabilities, or renormalised over the k (the combine weights before zeroing)."""
    if r.renormalize:
        return r.topk_prob / r.topk_prob.sum(axis=1, keepdims=True)     # [N, k]
    return r.topk_prob                                                    # [N, k]


def route_differentiable(logits: Tensor, top_k: int, capacity_factor: float | None = 1.25,
                         group_size: int | None = None, min_capacity: int = 4,
                         capacity_mode: str = "openmoe", priority: str = "position",
                         renormalize: bool = False, rng: Any = None
                         ) -> tuple[Tensor, Tensor, Tensor, routing.RoutingResult]:
    """Route ``logits [N, E]``: returns (combine weights [N, k], L_aux, L_z, RoutingResult).

    The decisions come from :func:`tinymoe.routing.route` on ``logits.data``; the three
    Tensors are differentiable functions of the logits (see :class:`RouterFunction`).
    """
    result = routing.route(logits.data, top_k, capacity_factor, group_size, min_capacity,
                           capacity_mode, priority, renormalize, rng)
    weight, aux, z = RouterFunction.apply(logits, result)
    return weight, aux, z, result


# --------------------------------------------------------------------------------------
# dispatch and combine
# --------------------------------------------------------------------------------------

class Dispatch(Function):
    """``buf[flat_pos[m]] = x[token[m]]`` into a zero buffer, reshaped to [E, R, d].

    x [N, d]; flat_pos, token [M] (M kept assignments, flat_pos distinct) -> [E, R, d] with
    R = n_groups * C rows per expert. Backward: the rows of the buffer's gradient go back
    to their tokens, summed over a token's k assignments (``scatter_add_rows``).
    """

    @staticmethod
    def forward(ctx: Context, x: Any, flat_pos: Any, token: Any, n_experts: int, rows_per_expert: int) -> Any:
        xp = B.array_module(x)
        n, d = x.shape
        buf = xp.zeros((n_experts * rows_per_expert, d), dtype=x.dtype)  # [E * R, d]
        buf[flat_pos] = x[token]                                          # [M, d] gathered rows
        ctx.save_for_backward(flat_pos, token)
        ctx.n_tokens = n
        return buf.reshape(n_experts, rows_per_expert, d)                 # [E, R, d]

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        flat_pos, token = ctx.saved
        d = g.shape[-1]
        g_rows = g.reshape(-1, d)[flat_pos]                               # [E, R, d] -> [M, d]
        return B.scatter_add_rows(ctx.n_tokens, token, g_rows), None, None, None, None


class Combine(Function):
    """``y[token[m]] += weight[token[m], rank[m]] * out[flat_pos[m]]`` for the M kept
    assignments: expert_out [E, R, d] (or packed rows [M, d]), weight [N, k] -> y [N, d].

    Backward: d expert_out[flat_pos[m]] = w_m * g_y[token[m]] (rows that hold no kept
    assignment get 0); d weight[token[m], rank[m]] = <g_y[token[m]], out[flat_pos[m]]>
    (dropped assignments get 0).
    """

    @staticmethod
    def forward(ctx: Context, expert_out: Any, weight: Any, flat_pos: Any, token: Any, rank: Any,
                n_tokens: int) -> Any:
        d = expert_out.shape[-1]
        rows = expert_out.reshape(-1, d)[flat_pos]                        # [E, R, d] -> [M, d]
        w = weight[token, rank]                                           # [M]
        ctx.save_for_backward(expert_out if ctx.needs_input_grad[1] else None, w, flat_pos, token, rank)
        ctx.shapes = (expert_out.shape, weight.shape)
        rows *= w[:, None]                                                # (a fresh gather: safe in place)
        return B.scatter_add_rows(n_tokens, token, rows)                  # [M, d] -> [N, d]

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        expert_out, w, flat_pos, token, rank = ctx.saved
        out_shape, weight_shape = ctx.shapes
        xp = B.array_module(g)
        d = g.shape[-1]
        g_rows = g[token]                                                 # [N, d] -> [M, d]
        g_out = g_weight = None
        if ctx.needs_input_grad[0]:
            n_rows = 1
            for n_ in out_shape[:-1]:
                n_rows *= n_
            g_out = xp.zeros((n_rows, d), dtype=g.dtype)                  # [E * R, d] (or [M, d] packed)
            g_out[flat_pos] = g_rows * w[:, None]
            g_out = g_out.reshape(out_shape)                              # [E, R, d]
        if ctx.needs_input_grad[1]:
            rows = expert_out.reshape(-1, d)[flat_pos]                    # [M, d]
            g_weight = xp.zeros(weight_shape, dtype=g.dtype)              # [N, k]
            g_weight[token, rank] = (g_rows * rows).sum(axis=1)
        return g_out, g_weight, None, None, None, None


class GatherRows(Function):
    """``x[token]``: x [N, d], token [M] (a token may appear up to k times) -> [M, d], the
    packed dispatch. Backward: the rows of g go back to their tokens, summed over repeats
    (``scatter_add_rows``)."""

    @staticmethod
    def forward(ctx: Context, x: Any, token: Any) -> Any:
        ctx.save_for_backward(token)
        ctx.n_tokens = x.shape[0]
        return x[token]                                                   # [N, d] -> [M, d]

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        (token,) = ctx.saved
        return B.scatter_add_rows(ctx.n_tokens, token, g), None           # [M, d] -> [N, d]


class GroupedMatmul(Function):
    """A grouped GEMM (as in MegaBlocks / Tutel): rows sorted by expert, one matmul each.

        y[o_e : o_e + n_e] = x[o_e : o_e + n_e] @ W[e]      o_e = n_0 + ... + n_{e-1}

    x [M, a], W [E, a, b], sizes n_e (host ints, sum M) -> y [M, b]. Backward per expert:
    dx_e = dy_e W[e]^T and dW[e] = x_e^T dy_e (zero for an expert without rows). Only the
    M kept rows are computed, never the empty capacity slots.
    """

    @staticmethod
    def forward(ctx: Context, x: Any, w: Any, sizes: tuple[int, ...]) -> Any:
        xp = B.array_module(x)
        if len(sizes) != w.shape[0] or sum(sizes) != x.shape[0]:
            raise ValueError(f"grouped_matmul: sizes {list(sizes)} do not split {x.shape[0]} rows "
                             f"over {w.shape[0]} experts")
        y = xp.empty((x.shape[0], w.shape[2]), dtype=x.dtype)             # [M, b]
        lo = 0
        for e, n in enumerate(sizes):
            if n:
                xp.matmul(x[lo:lo + n], w[e], out=y[lo:lo + n])           # [n_e, a] @ [a, b] -> [n_e, b]
            lo += n
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        ctx.sizes, ctx.w_shape = sizes, w.shape
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        x, w = ctx.saved
        xp = B.array_module(g)
        need_x, need_w = ctx.needs_input_grad[:2]
        gx = xp.empty((g.shape[0], ctx.w_shape[1]), dtype=g.dtype) if need_x else None   # [M, a]
        gw = xp.empty(ctx.w_shape, dtype=g.dtype) if need_w else None                     # [E, a, b]
        lo = 0
        for e, n in enumerate(ctx.sizes):
            ge = g[lo:lo + n]                                             # [n_e, b]
            if need_x and n:
                xp.matmul(ge, w[e].T, out=gx[lo:lo + n])                  # [n_e, b] @ [b, a] -> [n_e, a]
            if need_w:
                if n:
                    xp.matmul(x[lo:lo + n].T, ge, out=gw[e])              # [a, n_e] @ [n_e, b] -> [a, b]
                else:
                    gw[e] = 0
            lo += n
        return gx, gw, None


def gather_rows(x: Tensor, token: Any) -> Tensor:
    """The rows ``x[token]`` -> [M, d] (see :class:`GatherRows`)."""
    return GatherRows.apply(x, token)


def grouped_matmul(x: Tensor, w: Tensor, sizes: Any) -> Tensor:
    """Per-expert matmuls on rows sorted by expert: x [M, a], w [E, a, b], sizes [E] -> [M, b]."""
    return GroupedMatmul.apply(x, w, sizes=tuple(int(n) for n in B.to_numpy(sizes)))


def dispatch(x: Tensor, flat_pos: Any, token: Any, n_experts: int, rows_per_expert: int) -> Tensor:
    """Gather token rows of ``x [N, d]`` into the dispatch buffer [E, R, d] (see :class:`Dispatch`)."""
    return Dispatch.apply(x, flat_pos, token, n_experts, rows_per_expert)


def combine(expert_out: Tensor, weight: Tensor, flat_pos: Any, token: Any, rank: Any, n_tokens: int) -> Tensor:
    """Weighted scatter of expert outputs back to tokens -> [N, d] (see :class:`Combine`)."""
    return Combine.apply(expert_out, weight, flat_pos, token, rank, n_tokens)


# --------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------

class Router(Module):
    """Router: logits ``z = x W_r``, weight [d, E], no bias, init N(0, 0.02) (OpenMoE).

    Routing variants (:mod:`tinymoe.nn.routers`): ``noise=True`` adds ``noise_weight``
    [d, E] (noisy gating's W_noise, init 0 as in Shazeer et al. 2017); ``bias_rate > 0``
    adds ``bias`` [E] (DeepSeek-V3's balancing bias, init 0; it gets no gradient, it is
    moved by a sign rule, and is a Parameter only so that it is saved in checkpoints).

    Bias balancing moves the bias once per optimizer step: every training forward (with
    autograd on) adds its expert load to ``bias_load`` [E] (:meth:`add_load`), and
    :meth:`update_bias` (called by the trainer after the update,
    :func:`tinymoe.nn.routers.update_biases`) applies the sign rule to the summed load and
    clears it. ``bias_load`` is transient (never saved): it is empty between steps.
    """

    def __init__(self, d_model: int, n_experts: int, *, rng: Any, std: float = 0.02,
                 dtype: Any = "float32", noise: bool = False, bias_rate: float = 0.0):
        super().__init__()
        self.d_model, self.n_experts = d_model, n_experts
        self.weight = normal_parameter(rng, (d_model, n_experts), std, B.np.dtype(dtype))
        if noise:
            self.noise_weight = Parameter(B.to_device(B.np.zeros((d_model, n_experts)), B.np.dtype(dtype)))
        self.bias_rate = float(bias_rate)
        self.bias_load: Any = None                                        # [E] int64, this step's load
        if bias_rate > 0:
            self.bias = Parameter(B.to_device(B.np.zeros(n_experts), B.np.dtype(dtype)))

    def add_load(self, load: Any) -> None:
        """Add one training forward's expert load ``load [E]`` (assignments before
        capacity) to this step's sum."""
        self.bias_load = load.copy() if self.bias_load is None else self.bias_load + load  # [E]

    def update_bias(self) -> bool:
        """DeepSeek-V3's end-of-step update on the load summed over the step's forwards:
        ``b_i += rate * sign(mean_j L_j - L_i)`` (:func:`tinymoe.routing_variants.bias_update`),
        then forget the load. Returns whether the bias moved (False: no load was added)."""
        if self.bias_load is None or self.bias_rate <= 0:
            self.bias_load = None
            return False
        routing_variants.bias_update(self.bias.data, self.bias_load, self.bias_rate)
        self.bias_load = None
        return True

    def clear_load(self) -> None:
        """Forget the load added since the last update (a skipped or interrupted step)."""
        self.bias_load = None

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight                                            # [N, d] -> [N, E]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_experts={self.n_experts}"


class Experts(Module):
    """E experts stacked, no biases, in the FFN form ``kind`` (see :class:`FeedForward`):

    "swiglu"  w_gate, w_up [E, d, f], w_down [E, f, d];
              expert e: swiglu(x W_gate[e], x W_up[e]) W_down[e]
    "openmoe" wi_0 [E, d, 2f], wi_1 [E, d, f], wo [E, f, d];
              expert e: gated_triple(x wi_0[e], x wi_1[e]) wo[e] (OpenMoE's original code)

    ``forward(x [M, d], load [E])``: packed rows sorted by expert, ``load[e]`` of them for
    expert e -> [M, d], grouped matmuls (:class:`GroupedMatmul`) on the rows that exist.
    ``forward(buf [E, R, d])``: the full dispatch buffer -> [E, R, d], one batched matmul
    per weight over all experts, empty slots included (the picture of lesson 5).
    Init N(0, std^2), or with ``fan_in_scale=s`` (OpenMoE) N(0, s / fan_in) per weight.
    """

    def __init__(self, n_experts: int, d_model: int, d_ff: int, *, rng: Any, std: float = 0.02,
                 kind: str = "swiglu", fan_in_scale: float | None = None, dtype: Any = "float32"):
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"ffn kind {kind!r} is not one of {', '.join(FFN_KINDS)}")
        dt = B.np.dtype(dtype)
        self.n_experts, self.d_model, self.d_ff, self.kind = n_experts, d_model, d_ff, kind
        E, d, f = n_experts, d_model, d_ff

        def weight(shape: tuple[int, int, int]) -> Any:
            s = std if fan_in_scale is None else fan_in_std(fan_in_scale, shape[1])
            return normal_parameter(rng, shape, s, dt)

        if kind == "swiglu":
            self.w_gate, self.w_up, self.w_down = weight((E, d, f)), weight((E, d, f)), weight((E, f, d))
        else:
            self.wi_0, self.wi_1, self.wo = weight((E, d, 2 * f)), weight((E, d, f)), weight((E, f, d))

    def forward(self, x: Tensor, load: Any = None) -> Tensor:
        if x.ndim == 2:                                                   # packed rows [M, d]
            if load is None:
                raise ValueError("Experts: packed rows [M, d] need load [E] (rows per expert)")
            sizes = tuple(int(n) for n in B.to_numpy(load))
            if self.kind == "swiglu":
                gate = grouped_matmul(x, self.w_gate, sizes)              # [M, d] -> [M, f]
                up = grouped_matmul(x, self.w_up, sizes)                  # [M, d] -> [M, f]
                return grouped_matmul(F.swiglu(gate, up), self.w_down, sizes)  # [M, f] -> [M, d]
            u = grouped_matmul(x, self.wi_0, sizes)                       # [M, d] -> [M, 2f]
            v = grouped_matmul(x, self.wi_1, sizes)                       # [M, d] -> [M, f]
            return grouped_matmul(gated_triple(u, v), self.wo, sizes)     # [M, f] -> [M, d]
        if self.kind == "swiglu":
            h = F.swiglu(x @ self.w_gate, x @ self.w_up)                  # [E, R, d] -> [E, R, f]
            return h @ self.w_down                                        # [E, R, f] -> [E, R, d]
        h = gated_triple(x @ self.wi_0, x @ self.wi_1)                    # [E, R, d] -> [E, R, f]
        return h @ self.wo                                                # [E, R, f] -> [E, R, d]

    def extra_repr(self) -> str:
        kind = "" if self.kind == "swiglu" else f", kind={self.kind}"
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_ff={self.d_ff}{kind}"


@dataclass
class MoEStats(routing.RoutingResult):
    """The routing statistics of one MoE forward: every :class:`tinymoe.routing.RoutingResult`
    field (expert_index [N, k], slot, kept, combine_weight, probs [N, E], load_before/after
    [E], capacity, n_groups, group_size, dropped_fraction, confidence, aux_loss, z_loss ...)
    as arrays on the compute device, plus ``layer`` (the block index, None outside a model)
    and ``batch_shape`` (B, T) so that [N, ...] arrays can be reshaped to [B, T, ...]."""

    layer: int | None = None
    batch_shape: tuple[int, int] | None = None

    @classmethod
    def from_result(cls, result: routing.RoutingResult, layer: int | None,
                    batch_shape: tuple[int, int] | None) -> "MoEStats":
        values = {f.name: getattr(result, f.name) for f in fields(routing.RoutingResult)}
        return cls(**values, layer=layer, batch_shape=batch_shape)


def route_layer(router: Router, cfg: ModelConfig, training: bool, x: Tensor, rng: Any = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Any]:
    """The routing half of an MoE layer, shared by :class:`MoE` and the expert-parallel
    layer (``tinymoe.parallel``): x [B, T, d] -> (tokens [N, d], combine weights [N, k],
    L_aux, L_z, RoutingResult), with the train or eval capacity factor, the routing group
    (the sequence unless ``group_size``) and, when the config asks for one, a routing
    variant (``tinymoe.routing_variants``)."""
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"MoE expects x of shape [B, T, {cfg.d_model}], got {tuple(x.shape)}")
    bsz, seq, d = x.shape
    tokens = x.reshape(bsz * seq, d)                                      # [B, T, d] -> [N, d]
    logits = router(tokens)                                               # [N, d] -> [N, E]
    cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
    group = seq if cfg.group_size is None else cfg.group_size
    if routers.uses_variant(cfg):                                         # tinymoe.routing_variants
        weight, aux, z, result = routers.route_variant(
            router, tokens, logits, cfg, training=training, capacity_factor=cf,
            group_size=group, rng=rng)                                    # [N, k], [], []
    else:
        weight, aux, z, result = route_differentiable(
            logits, cfg.top_k, cf, group, cfg.min_capacity, cfg.capacity_mode,
            cfg.slot_priority, cfg.renormalize, rng)                      # [N, k], [], []
    return tokens, weight, aux, z, result


class MoE(Module):
    """Token-choice top-k MoE of FFN experts (``cfg.ffn_kind``) with expert capacity (OpenMoE).

    Parameters: ``router.weight`` [d, E], ``experts.w_gate`` / ``experts.w_up`` [E, d, f],
    ``experts.w_down`` [E, f, d] (``ffn_kind="openmoe"``: ``experts.wi_0`` [E, d, 2f],
    ``experts.wi_1`` [E, d, f], ``experts.wo`` [E, f, d]). The capacity factor is ``cfg.capacity_factor`` in
    training mode and ``cfg.eval_capacity_factor`` in eval mode; a group is
    ``cfg.group_size`` tokens, or one sequence (G = T) when it is None. With
    ``cfg.init == "openmoe"`` the experts are drawn N(0, 0.1 / fan_in) (the router stays
    N(0, 0.02^2)).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int | None = None, *, rng: Any):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.router = Router(cfg.d_model, cfg.n_experts, std=0.02, dtype=cfg.dtype, rng=rng,
                             noise=cfg.router_noise, bias_rate=cfg.router_bias_rate)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.expert_ff, std=cfg.init_std,
                               kind=cfg.ffn_kind, fan_in_scale=cfg.init_fan_in_scale, dtype=cfg.dtype,
                               rng=rng)

    def forward(self, x: Tensor, rng: Any = None) -> tuple[Tensor, Tensor, Tensor, MoEStats]:
        """x [B, T, d] -> (y [B, T, d], L_aux, L_z, stats). ``rng`` (a host NumPy Generator)
        is required by slot priority "random" and by ``router_noise`` in training mode, and
        ignored otherwise."""
        tokens, weight, aux, z, result = route_layer(self.router, self.cfg, self.training, x, rng)
        bsz, seq, d = x.shape
        n = bsz * seq
        # The layer's one host sync: the rows per expert size the grouped matmuls.
        sizes = tuple(int(v) for v in B.to_numpy(result.load_after))      # [E] host ints
        token, rank = routing.packed_indices(result, sum(sizes))          # [M] each, by buffer row
        xp = B.array_module(token)
        buf = gather_rows(tokens, token)                                  # [N, d] -> [M, d], kept rows only
        out = self.experts(buf, load=sizes)                               # [M, d]
        y = combine(out, weight, xp.arange(len(token)), token, rank, n)   # [N, d]
        stats = MoEStats.from_result(result, self.layer_idx, (bsz, seq))
        return y.reshape(bsz, seq, d), aux, z, stats

    def extra_repr(self) -> str:
        c = self.cfg
        return f"n_experts={c.n_experts}, top_k={c.top_k}, d_ff={c.expert_ff}"
