"""Torch twin of the tinymoe router spec (docs/router.md), written from the spec.

Plain, loop-friendly torch in the style of flaxformer's TokensChooseMaskedRouter: one
group at a time, slots by ``cumsum(one_hot) - 1`` over the priority-ordered assignments.
Used only as a test oracle; it does not import tinymoe.
"""
from __future__ import annotations

import math

import torch


def twin_capacity(group_size: int, n_experts: int, k: int, cf: float | None,
                  min_capacity: int, mode: str) -> int:
    """openmoe: max(round(cf*G/E), min) with Python round (half to even);
    k_scaled: max(ceil(k*cf*G/E), min); cf 0/None: dropless, C = G."""
    if not cf:
        return group_size
    if mode == "openmoe":
        return max(int(round(cf * group_size / n_experts)), min_capacity)
    if mode == "k_scaled":
        return max(math.ceil(k * cf * group_size / n_experts), min_capacity)
    raise ValueError(mode)


def twin_route(logits: torch.Tensor, k: int, cf: float | None = 1.25,
               group_size: int | None = None, min_capacity: int = 4, mode: str = "openmoe",
               priority: str = "position", renormalize: bool = False,
               order: torch.Tensor | None = None) -> dict:
    """Route ``logits [N, E]``. For ``priority="random"`` pass ``order [n_groups, k, G]``
    (token positions in serving order for each group and rank)."""
    n, n_experts = logits.shape
    g = n if group_size is None or group_size >= n else group_size
    assert n % g == 0
    n_groups = n // g
    cap = twin_capacity(g, n_experts, k, cf, min_capacity, mode)

    probs = torch.softmax(logits, dim=-1)
    sorted_p, sorted_i = torch.sort(probs, dim=-1, descending=True, stable=True)
    expert_index = sorted_i[:, :k]
    topk_prob = sorted_p[:, :k]
    weight = topk_prob / topk_prob.sum(-1, keepdim=True) if renormalize else topk_prob

    slot = torch.full((n, k), -1, dtype=torch.int64)
    kept = torch.zeros((n, k), dtype=torch.bool)
    aux_per_group = []
    for gi in range(n_groups):
        lo = gi * g
        ei = expert_index[lo:lo + g]          # [G, k]
        pc = topk_prob[lo:lo + g]             # [G, k]
        seq_tok, seq_rank = [], []
        for j in range(k):
            if priority == "position":
                tok = torch.arange(g)
            elif priority == "probability":
                tok = torch.sort(-pc[:, j], stable=True).indices
            elif priority == "random":
                tok = order[gi, j].to(torch.int64)
            else:
                raise ValueError(priority)
            seq_tok.append(tok)
            seq_rank.append(torch.full((g,), j, dtype=torch.int64))
        seq_tok = torch.cat(seq_tok)
        seq_rank = torch.cat(seq_rank)
        seq_e = ei[seq_tok, seq_rank]                                       # [k*G]
        one_hot = torch.nn.functional.one_hot(seq_e, n_experts)            # [k*G, E]
        position_in_expert = (torch.cumsum(one_hot, dim=0) - 1) * one_hot  # [k*G, E]
        s = position_in_expert.sum(-1)                                      # [k*G]
        keep = s < cap
        slot[lo + seq_tok[keep], seq_rank[keep]] = s[keep]
        kept[lo + seq_tok, seq_rank] = keep

        # load balance, per group
        f = torch.zeros(n_experts, dtype=probs.dtype)
        for e in range(n_experts):
            f[e] = (ei == e).any(dim=1).to(probs.dtype).mean()
        big_p = probs[lo:lo + g].mean(0)
        aux_per_group.append(n_experts * (f * big_p).sum())

    combine = torch.where(kept, weight, torch.zeros_like(weight))
    lse = torch.logsumexp(logits, dim=-1)
    load_before = torch.bincount(expert_index.reshape(-1), minlength=n_experts)
    load_after = torch.bincount(expert_index[kept], minlength=n_experts)
    return dict(
        expert_index=expert_index, topk_prob=topk_prob, combine_weight=combine, kept=kept,
        slot=slot, probs=probs, capacity=cap, n_groups=n_groups,
        aux_loss=torch.stack(aux_per_group).mean().item(), z_loss=(lse ** 2).mean().item(),
        load_before=load_before, load_after=load_after,
        dropped_fraction=1.0 - kept.sum().item() / (n * k),
        confidence=topk_prob[:, 0].mean().item(),
    )
