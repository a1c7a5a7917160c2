"""Torch twin of the MoE layer (docs/router.md, docs/architecture.md §6), written from the spec.

Routing decisions come from the routing twin (``torch_routing.twin_route``: softmax,
top-k with ties to the lower index, capacity, slot priority). The layer itself is written
the plain way: every expert runs its SwiGLU on the tokens that were assigned to it and
kept, and the weighted outputs are added back to those tokens; no dispatch buffer, no
slots. Losses are written as differentiable torch expressions:

    L_aux = mean_g E * sum_i f_{g,i} P_{g,i}   (f: top-k fractions, constant; P: mean probs)
    L_z   = mean_n logsumexp(z_n)^2

It does not import tinymoe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

try:
    from oracle.torch_routing import twin_route
except ImportError:  # tests/ imported as a package
    from tests.oracle.torch_routing import twin_route


def swiglu_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN with weights stored [in, out]: (silu(x W_gate) * (x W_up)) W_down."""
    return (TF.silu(x @ w_gate) * (x @ w_up)) @ w_down


def openmoe_ffn(x: torch.Tensor, wi_0: torch.Tensor, wi_1: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """OpenMoE's FFN (flaxformer MlpBlock, activations ("swiglu", "linear"); weights [in, out]):
    Wo [(x A) * silu(x B) * (x W1)] with [A | B] = wi_0 [d, 2f], W1 = wi_1 [d, f]."""
    a, b = (x @ wi_0).chunk(2, dim=-1)
    return (a * TF.silu(b) * (x @ wi_1)) @ wo


def twin_moe(x: torch.Tensor, w_router: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
             w_down: torch.Tensor, k: int, cf: float | None, group_size: int | None = None,
             min_capacity: int = 4, mode: str = "openmoe", priority: str = "position",
             renormalize: bool = False, order: torch.Tensor | None = None,
             ffn=swiglu_ffn) -> dict:
    """x [B, T, d]; w_router [d, E]; w_gate/w_up [E, d, f]; w_down [E, f, d].
    ``ffn``: each expert's form, ``ffn(x, w_gate[e], w_up[e], w_down[e])`` (``openmoe_ffn``
    with the wi_0, wi_1, wo weights for OpenMoE's).

    ``group_size`` None means one sequence per group (G = T). Returns a dict with y
    [B, T, d], aux, z (0-d tensors) and the routing decisions (kept, expert_index, ...).
    """
    bsz, seq, d = x.shape
    n_experts = w_router.shape[1]
    tokens = x.reshape(bsz * seq, d)
    logits = tokens @ w_router                                   # [N, E]
    g = seq if group_size is None else group_size
    r = twin_route(logits, k, cf, g, min_capacity, mode, priority, renormalize, order=order)
    g_eff = bsz * seq // r["n_groups"]

    # load balance: f from the top-k choices (no gradient), P = mean probability per group
    probs = torch.softmax(logits, dim=-1)                         # [N, E]
    chosen = torch.zeros_like(probs, dtype=torch.bool)
    chosen.scatter_(1, r["expert_index"], True)
    f = chosen.to(probs.dtype).reshape(r["n_groups"], g_eff, n_experts).mean(1)       # [ng, E]
    big_p = probs.reshape(r["n_groups"], g_eff, n_experts).mean(1)                     # [ng, E]
    aux = (n_experts * (f * big_p).sum(1)).mean()
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()

    weight = r["combine_weight"]                                  # [N, k], differentiable, 0 where dropped
    y = torch.zeros_like(tokens)
    for e in range(n_experts):
        tok, rank = torch.nonzero((r["expert_index"] == e) & r["kept"], as_tuple=True)
        if tok.numel() == 0:
            continue
        out = ffn(tokens[tok], w_gate[e], w_up[e], w_down[e])                         # [m, d]
        y = y.index_add(0, tok, weight[tok, rank][:, None] * out)
    return dict(y=y.reshape(bsz, seq, d), aux=aux, z=z, **{key: r[key] for key in (
        "kept", "expert_index", "slot", "capacity", "n_groups", "load_before", "load_after",
        "dropped_fraction")})
