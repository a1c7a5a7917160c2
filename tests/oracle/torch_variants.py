"""Torch twins of the routing variants, written from their papers (not from tinymoe).

- :func:`twin_expert_choice`: Zhou et al. 2022, eq. 1-2: S = softmax(X W_r) per group,
  each expert takes ``torch.topk(S[:, e], C)`` tokens, y_n = sum over experts that took n
  of S[n, e] * FFN_e(x_n).
- :func:`twin_token_choice`: top-k token choice from given logits, written plainly
  (position priority: every first choice in token order, then every second choice ...),
  with an optional selection bias (DeepSeek-V3: choose on p + b, weigh with p) and the
  Switch aux loss and ST-MoE z-loss as torch expressions.
- :func:`twin_sigmoid_token_choice`: DeepSeek-V3 (Liu et al. 2024) section 2.1.2, eq. 12-16
  (sigmoid affinities, top-k on s (+ b), gates normalised over the chosen) and its
  sequence-wise balance loss, eq. 17-20, taken per routing group.
- :func:`twin_noisy_logits`: Shazeer et al. 2017, eq. 4: H = x W_g + N(0,1) * softplus(x W_noise).
- :func:`twin_shazeer_losses`: Shazeer et al. 2017, Appendix A, eq. 6-11: Importance,
  Load with the normal CDF and kth_excluding, CV^2 of each (torch autograd on the formula).
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


def twin_sigmoid_token_choice(tokens: torch.Tensor, logits: torch.Tensor, w_gate: torch.Tensor,
                              w_up: torch.Tensor, w_down: torch.Tensor, k: int, capacity: int,
                              group: int, bias: torch.Tensor | None = None) -> dict:
    """DeepSeek-V3's routed experts from ``logits`` [N, E] = u_t^T e_i:

        s_{i,t} = Sigmoid(u_t^T e_i)                                   (eq. 15)
        g'_{i,t} = s_{i,t} if s_{i,t} + b_i in TopK({s_{j,t} + b_j}, K), else 0   (eq. 14, 16)
        g_{i,t} = g'_{i,t} / sum_j g'_{j,t}                             (eq. 13)
        h_t = sum_i g_{i,t} FFN_i(u_t)                                  (eq. 12, routed part)

    plus capacity C per expert per group, position priority (every first choice in token
    order, then every second ...): a dropped choice adds nothing; the gates are normalised
    over the K chosen before dropping. ``bal``: the sequence-wise balance loss with
    alpha = 1 (eq. 17-20), on each group of ``group`` tokens, averaged over groups:
    f_i = E / (K G) * #{t: i chosen by t}, s'_{i,t} = s_{i,t} / sum_j s_{j,t},
    P_i = mean_t s'_{i,t}, L = sum_i f_i P_i. ``z``: logsumexp(logits)^2 averaged."""
    n, n_experts = logits.shape
    s = torch.sigmoid(logits)                                      # [N, E]
    choose = s if bias is None else s + bias
    _, index = torch.topk(choose.detach(), k, dim=-1)              # [N, k]
    s_choice = s.gather(1, index)                                  # [N, k]
    gate = s_choice / s_choice.sum(-1, keepdim=True)               # eq. 13
    kept = torch.zeros((n, k), dtype=torch.bool)
    bal_terms = []
    s_norm = s / s.sum(-1, keepdim=True)                           # eq. 19
    for lo in range(0, n, group):
        used = [0] * n_experts
        for j in range(k):
            for t in range(lo, lo + group):
                e = int(index[t, j])
                if used[e] < capacity:
                    kept[t, j] = True
                    used[e] += 1
        f = torch.stack([(index[lo:lo + group] == e).any(dim=1).to(s.dtype).sum()
                         for e in range(n_experts)]) * n_experts / (k * group)   # eq. 18
        bal_terms.append((f * s_norm[lo:lo + group].mean(0)).sum())           # eq. 17, 20
    y = torch.zeros_like(tokens)
    for t in range(n):
        for j in range(k):
            if kept[t, j]:
                e = int(index[t, j])
                y = y.index_add(0, torch.tensor([t]), gate[t, j] * _ffn(tokens[t:t + 1], w_gate[e], w_up[e], w_down[e]))
    load = torch.bincount(index.reshape(-1), minlength=n_experts)
    return dict(y=y, bal=torch.stack(bal_terms).mean(), z=(torch.logsumexp(logits, dim=-1) ** 2).mean(),
                index=index, kept=kept, load=load)


def twin_noisy_logits(tokens: torch.Tensor, w_router: torch.Tensor, w_noise: torch.Tensor,
                      eps: torch.Tensor) -> torch.Tensor:
    """H(x) = x W_g + StandardNormal() * Softplus(x W_noise) (Shazeer et al. 2017, eq. 4)."""
    return tokens @ w_router + eps * TF.softplus(tokens @ w_noise)


def twin_shazeer_losses(tokens: torch.Tensor, w_g: torch.Tensor, w_noise: torch.Tensor,
                        eps: torch.Tensor | None, k: int, group: int, renormalize: bool) -> torch.Tensor:
    """L = CV(Importance)^2 + CV(Load)^2 per group of ``group`` tokens, averaged over groups.

        H(x)_i = (x W_g)_i + eps_i * Softplus((x W_noise)_i)          (eq. 4; eps = 0: no noise)
        G(x) = the gates of KeepTopK(H, k): softmax(H) at the top k, renormalised over them
               (Shazeer's softmax(KeepTopK(H, k))) or raw (``renormalize=False``)
        Importance(X) = sum_{x in X} G(x)                              (eq. 6)
        P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i))  (eq. 9)
        Load(X)_i = sum_{x in X} P(x, i)                               (eq. 10)
        CV(v)^2 = Var(v) / mean(v)^2  (population variance)            (eq. 7, 11)

    kth_excluding(v, k, i) is the k-th highest component of v, leaving out component i;
    written here literally, expert by expert."""
    n, n_experts = tokens.shape[0], w_g.shape[1]
    clean = tokens @ w_g
    spread = TF.softplus(tokens @ w_noise)
    h = clean if eps is None else clean + eps * spread
    probs = torch.softmax(h, dim=-1)
    _, index = torch.topk(h.detach(), k, dim=-1)
    p_choice = probs.gather(1, index)
    gate_k = p_choice / p_choice.sum(-1, keepdim=True) if renormalize else p_choice
    gates = torch.zeros((n, n_experts), dtype=h.dtype).scatter(1, index, gate_k)
    std_normal = torch.distributions.Normal(torch.zeros((), dtype=h.dtype), torch.ones((), dtype=h.dtype))
    cols = []
    for i in range(n_experts):
        others = torch.cat([h[:, :i], h[:, i + 1:]], dim=1)          # H(x) without component i
        kth = torch.topk(others, k, dim=-1).values[:, k - 1]          # its k-th highest
        cols.append(std_normal.cdf((clean[:, i] - kth) / spread[:, i]))
    prob = torch.stack(cols, dim=1)                                    # P(x, i) [N, E]

    def cv2(v: torch.Tensor) -> torch.Tensor:
        return v.var(unbiased=False) / v.mean() ** 2

    terms = [cv2(gates[lo:lo + group].sum(0)) + cv2(prob[lo:lo + group].sum(0))
             for lo in range(0, n, group)]
    return torch.stack(terms).mean()


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
