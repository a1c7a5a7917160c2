"""Torch twins of the routing variants, written from their papers (not from tinymoe).

- :func:`twin_expert_choice`: Zhou et al. 2022, eq. 1-2: S = softmax(X W_r) per group,
  each expert takes ``torch.topk(S[:, e], C)`` tokens, y_n = sum over experts that took n
  of S[n, e] * FFN_e(x_n).
- :func:`twin_token_choice`: top-k token choice from given logits, written plainly
  (position priority: every first choice in token order, then every second choice ...),
  with an optional selection bias (DeepSeek-V3: choose on p + b, weigh with p) and the
  Switch aux loss and ST-MoE z-loss as torch expressions.
- :func:`twin_noisy_logits`: Shazeer et al. 2017, eq. 4: H = x W_g + N(0,1) * softplus(x W_noise).
- :func:`twin_bias_update`: DeepSeek-V3 section 2.1.2: "decrease the bias term by gamma if
  its corresponding expert is overloaded and increase it by gamma if underloaded".

It does not import tinymoe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF


def _ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return (TF.silu(x @ w_gate) * (x @ w_up)) @ w_down


def twin_expert_choice(tokens: torch.Tensor, logits: torch.Tensor, w_gate: torch.Tensor,
                       w_up: torch.Tensor, w_down: torch.Tensor, capacity: int, group: int) -> dict:
    """tokens [N, d], logits [N, E] -> y [N, d], z-loss, and chosen [N, E] (expert e took n)."""
    n, n_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)                          # over experts (paper eq. 1)
    y = torch.zeros_like(tokens)
    chosen = torch.zeros((n, n_experts), dtype=torch.bool)
    for lo in range(0, n, group):
        s = probs[lo:lo + group]                                   # [G, E]
        for e in range(n_experts):
            gate, idx = torch.topk(s[:, e], capacity)              # the expert's top-C tokens
            tok = lo + idx
            chosen[tok, e] = True
            y = y.index_add(0, tok, gate[:, None] * _ffn(tokens[tok], w_gate[e], w_up[e], w_down[e]))
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return dict(y=y, z=z, chosen=chosen)


def twin_token_choice(tokens: torch.Tensor, logits: torch.Tensor, w_gate: torch.Tensor,
                      w_up: torch.Tensor, w_down: torch.Tensor, k: int, capacity: int, group: int,
                      renormalize: bool = False, bias: torch.Tensor | None = None) -> dict:
    """Top-k token choice, position priority, from ``logits`` [N, E]; ``bias`` [E] is added
    to the probabilities for the choice only."""
    n, n_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)                          # [N, E]
    score = probs if bias is None else probs + bias
    _, index = torch.topk(score.detach(), k, dim=-1)               # [N, k], no gradient through the choice
    p_choice = probs.gather(1, index)                              # [N, k], unbiased
    weight = p_choice / p_choice.sum(-1, keepdim=True) if renormalize else p_choice
    kept = torch.zeros((n, k), dtype=torch.bool)
    aux_terms = []
    for lo in range(0, n, group):
        used = [0] * n_experts
        for j in range(k):                                         # all rank-j choices, token order
            for t in range(lo, lo + group):
                e = int(index[t, j])
                if used[e] < capacity:
                    kept[t, j] = True
                    used[e] += 1
        f = torch.zeros(n_experts, dtype=probs.dtype)
        for e in range(n_experts):
            f[e] = (index[lo:lo + group] == e).any(dim=1).to(probs.dtype).mean()
        aux_terms.append(n_experts * (f * probs[lo:lo + group].mean(0)).sum())
    y = torch.zeros_like(tokens)
    for t in range(n):
        for j in range(k):
            if kept[t, j]:
                e = int(index[t, j])
                y = y.index_add(0, torch.tensor([t]), weight[t, j] * _ffn(tokens[t:t + 1], w_gate[e], w_up[e], w_down[e]))
    load = torch.bincount(index.reshape(-1), minlength=n_experts)
    return dict(y=y, aux=torch.stack(aux_terms).mean(), z=(torch.logsumexp(logits, dim=-1) ** 2).mean(),
                index=index, kept=kept, load=load)


def twin_noisy_logits(tokens: torch.Tensor, w_router: torch.Tensor, w_noise: torch.Tensor,
                      eps: torch.Tensor) -> torch.Tensor:
    """H(x) = x W_g + StandardNormal() * Softplus(x W_noise) (Shazeer et al. 2017, eq. 4)."""
    return tokens @ w_router + eps * TF.softplus(tokens @ w_noise)


def twin_bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """One DeepSeek-V3 bias update, expert by expert."""
    out = bias.clone()
    mean = load.double().mean()
    for e in range(bias.numel()):
        if load[e] > mean:        # overloaded
            out[e] -= gamma
        elif load[e] < mean:      # underloaded
            out[e] += gamma
    return out
