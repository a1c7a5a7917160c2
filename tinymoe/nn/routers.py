"""The differentiable side of the routing variants (:mod:`tinymoe.routing_variants`).

:func:`route_variant` is what :class:`tinymoe.nn.moe.MoE` calls when a variant field of
the config is set; it returns the same ``(weight, L_aux, L_z, RoutingResult)`` as
:func:`tinymoe.nn.moe.route_differentiable`, and the combine weights and losses go
through the same :class:`tinymoe.nn.moe.RouterFunction` backward (which only needs the
decisions and ``p``; the decisions of every variant are held fixed in the backward):

- expert choice: the decisions come from
  :func:`tinymoe.routing_variants.route_expert_choice`; ``w[n, j] = kept * p[n, e_j]``
  is the raw-weight case of RouterFunction; ``f = 0`` makes ``L_aux`` and its gradient 0.
- bias balancing: ``route(..., selection_bias=b)``; the weights are the unbiased ``p``
  of the choice, so the backward is exactly token choice's. b gets no gradient; it moves
  once per optimizer step (:func:`update_biases`) from the load summed over the step.
- noisy gating: :class:`NoisyLogits` makes ``H = z + eps * softplus(z_noise)`` with a
  hand-written backward; everything after it sees H as its logits.
- Shazeer's balance loss (``aux_loss_kind="shazeer"``): RouterFunction gives the
  importance half (a gradient on the gates), :class:`ShazeerLoad` the load half (through
  the clean logits and the noise scale).
- sigmoid scores (DeepSeek-V3): ``route(..., score="sigmoid")``; RouterFunction's
  backward chains through ``s' = s / sum s`` and ``s = sigmoid(z)`` (its docstring).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tinymoe import backend as B
from tinymoe import routing, routing_variants
from tinymoe.autograd import Context, Function, Tensor, is_grad_enabled
from tinymoe.config import ModelConfig

__all__ = ["NoisyLogits", "noisy_logits", "ShazeerLoad", "shazeer_load_loss", "route_variant",
           "uses_variant", "update_biases", "clear_bias_loads"]


class NoisyLogits(Function):
    """Noisy top-k gating's logits (Shazeer et al. 2017, eq. 4):

        H = z + eps * softplus(u),     z = x W_r, u = x W_noise, eps ~ N(0, 1) fixed

    Backward: dH/dz = 1; dH/du = eps * sigmoid(u) (softplus' = sigmoid), elementwise.
    softplus(u) = max(u, 0) + log1p(exp(-|u|)) (stable for large |u|).
    """

    @staticmethod
    def forward(ctx: Context, z: Any, u: Any, eps: Any) -> Any:
        xp = B.array_module(z)
        softplus = xp.maximum(u, 0) + xp.log1p(xp.exp(-xp.abs(u)))            # [N, E]
        ctx.save_for_backward(u, eps)
        return z + eps * softplus                                             # [N, E]

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        u, eps = ctx.saved
        xp = B.array_module(g)
        sig = 0.5 * (1.0 + xp.tanh(0.5 * u))                                  # sigmoid(u), stable
        return g, g * eps * sig, None


class ShazeerLoad(Function):
    """The "load" half of Shazeer et al. 2017's balance loss (Appendix A, eq. 8-11), per
    routing group, averaged over the n_groups groups:

        P(x, i) = Phi(a_{x,i}),  a = (z_i - T_i) / sp_i,  T_i = kth_excluding(H, k, i)
        Load_g[i] = sum_{x in g} P(x, i),    L_load = mean_g CV(Load_g)^2

    with z = x W_g, sp = softplus(u), u = x W_noise, H = z + eps * sp the noisy logits the
    top-k was chosen on (eps fixed; 0 in eval). T_i is the entry H[t_i] of another expert
    t_i (held fixed, like every top-k decision), so it is differentiable through z and u.

    Backward, with c = dL/dLoad (``cv_squared_grad`` / n_groups, the same for every token
    of a group) and q = c * phi(a) = dL/da:
      dL/dz_i += q_i / sp_i;   dL/dsp_i += -q_i a_i / sp_i;   dL/dT_i = -q_i / sp_i,
    and T_i = z_{t_i} + eps_{t_i} sp_{t_i}: dL/dz_{t} += sum_{i: t_i = t} dL/dT_i,
    dL/dsp_t += eps_t * (the same sum); finally dL/du = dL/dsp * sigmoid(u).
    """

    @staticmethod
    def forward(ctx: Context, z: Any, u: Any, eps: Any, h: Any, expert_index: Any,
                n_groups: int) -> Any:
        xp = B.array_module(z)
        sp = xp.maximum(u, 0) + xp.log1p(xp.exp(-xp.abs(u)))                 # [N, E] softplus(u)
        load, a, index = routing_variants.shazeer_load(z, sp, h, expert_index, n_groups)  # [ng, E]
        ctx.save_for_backward(u, sp, a, index, load)
        ctx.eps, ctx.n_groups = eps, n_groups
        return xp.asarray(routing_variants.cv_squared(load).mean(), dtype=z.dtype)  # []

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        u, sp, a, index, load = ctx.saved
        xp = B.array_module(u)
        n, n_experts = u.shape
        dt = u.dtype
        c = (g.astype(dt) / ctx.n_groups) * routing_variants.cv_squared_grad(load)  # [ng, E]
        q = xp.repeat(c, n // ctx.n_groups, axis=0) * routing_variants.normal_pdf(a)  # [N, E] dL/da
        dz = q / sp                                                           # [N, E]
        dsp = -q * a / sp                                                     # [N, E]
        flat = (xp.arange(n, dtype=xp.int64)[:, None] * n_experts + index).ravel()   # [N E]
        dh = B.scatter_add_flat(n * n_experts, flat, (-dz).ravel()).reshape(n, n_experts)  # [N, E] dL/dH
        dz = dz + dh
        if ctx.eps is not None:
            dsp = dsp + dh * ctx.eps                                          # dH/dsp = eps
        du = dsp * (0.5 * (1.0 + xp.tanh(0.5 * u)))                           # softplus' = sigmoid
        return dz, du, None, None, None, None


def shazeer_load_loss(z: Tensor, u: Tensor, eps: Any, h: Any, expert_index: Any,
                      n_groups: int) -> Tensor:
    """``mean_g CV(Load_g)^2`` (see :class:`ShazeerLoad`): z, u [N, E] Tensors (clean
    logits, noise pre-activation), ``eps`` [N, E] the fixed noise (None: none), ``h`` [N, E]
    the logits the top-k ``expert_index`` [N, k] was chosen on."""
    return ShazeerLoad.apply(z, u, eps, h, expert_index, n_groups)


def noisy_logits(z: Tensor, u: Tensor, eps: Any) -> Tensor:
    """``z + eps * softplus(u)`` for z, u [N, E] Tensors and a fixed noise array eps [N, E]."""
    return NoisyLogits.apply(z, u, eps)


def update_biases(model: Any) -> int:
    """DeepSeek-V3's bias update, once per optimizer step (Liu et al. 2024, section 2.1.2:
    "at the end of each step"): every bias-balanced router of ``model`` (any Module) moves
    its bias by ``rate * sign(mean load - load)`` from the load summed over the training
    forwards since the last call (all micro-batches of a step with gradient accumulation),
    then forgets that load. Returns the number of routers whose bias moved.

    Not collective: under MPI (``tinymoe.parallel``) the load would be this rank's only,
    which is why ``--parallel`` refuses bias balancing."""
    return sum(bool(m.update_bias()) for m in model.modules() if hasattr(m, "update_bias"))


def clear_bias_loads(model: Any) -> None:
    """Forget the load every bias-balanced router of ``model`` has summed since the last
    :func:`update_biases` (the trainer calls it at the start of each step, so a skipped or
    interrupted step leaves nothing behind)."""
    for m in model.modules():
        if hasattr(m, "clear_load"):
            m.clear_load()


def uses_variant(cfg: ModelConfig) -> bool:
    """True when a routing-variant field of ``cfg`` is set (else the MoE runs OpenMoE's path)."""
    return (cfg.router_type != "token_choice" or cfg.router_noise or cfg.router_bias_rate > 0
            or cfg.router_score != "softmax")


def route_variant(router: Any, tokens: Tensor, logits: Tensor, cfg: ModelConfig, *,
                  training: bool, capacity_factor: float | None, group_size: int, rng: Any
                  ) -> tuple[Tensor, Tensor, Tensor, routing.RoutingResult]:
    """Route ``logits [N, E]`` of ``tokens [N, d]`` with the variant ``cfg`` selects.

    ``router`` is the layer's :class:`tinymoe.nn.moe.Router` (``noise_weight`` and
    ``bias`` live there). In training mode with autograd on, bias balancing adds this
    forward's load to ``router.bias_load``; the bias itself moves once per optimizer step,
    in :func:`update_biases` (the trainer calls it after the update).
    """
    from tinymoe.nn.moe import RouterFunction  # noqa: PLC0415 (moe imports this module)

    clean, eps = logits, None                                             # [N, E]
    shazeer = cfg.aux_loss_kind == "shazeer"
    u = tokens @ router.noise_weight if cfg.router_noise and (training or shazeer) else None  # [N, E]
    if cfg.router_noise and training:
        eps = routing_variants.draw_noise(rng, tuple(logits.shape), logits.dtype)  # [N, E]
        logits = noisy_logits(clean, u, eps)                              # [N, E]
    if cfg.router_type == "expert_choice":
        result = routing_variants.route_expert_choice(
            logits.data, cfg.top_k, capacity_factor, group_size, cfg.min_capacity,
            cfg.capacity_mode)
    else:
        bias = router.bias.data if cfg.router_bias_rate > 0 else None              # [E]
        result = routing.route(logits.data, cfg.top_k, capacity_factor, group_size,
                               cfg.min_capacity, cfg.capacity_mode, cfg.slot_priority,
                               cfg.renormalize, rng, selection_bias=bias,
                               score=cfg.router_score)
        if bias is not None and training and is_grad_enabled():
            router.add_load(result.load_before)                           # [E], applied per step
    if shazeer:                                                           # RouterFunction: importance half
        result = dataclasses.replace(result, aux_kind="shazeer")
    weight, aux, z = RouterFunction.apply(logits, result)
    if shazeer:                                                           # + the load half
        aux = aux + shazeer_load_loss(clean, u, eps, logits.data, result.expert_index, result.n_groups)
        result = dataclasses.replace(result, aux_loss=aux.data)
    return weight, aux, z, result
