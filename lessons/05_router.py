# %% [markdown]
# # Lesson 5 — The router: softmax, top-k, combine weights; one token's journey through an MoE layer
#
# **What you will learn**
# - what the router computes: logits $z = xW_r$, probabilities $p = \mathrm{softmax}(z)$, the
#   top-$k$ experts, and the combine weights (OpenMoE: the raw probabilities; Mixtral:
#   renormalised to sum 1);
# - how tokens are *dispatched* to experts and *combined* back, without a Python loop over
#   tokens;
# - the output of an MoE layer for one token, reconstructed by hand from its $k$ experts, and
#   the whole layer written in 15 lines of NumPy;
# - how the router learns although top-$k$ is not differentiable, and how to check its
#   gradient by finite differences with the routing decisions held fixed.
#
# This lesson is dropless (every assignment is served). Capacity and dropping are lesson 6.

# %%
import numpy as np

from _lesson import FAST, plt, show

import tinymoe
from tinymoe import backend as B
from tinymoe import routing
from tinymoe.config import get_preset
from tinymoe.nn.moe import MoE

# %% [markdown]
# ## 1. The maths
#
# For a token $x \in \mathbb R^d$, $E$ experts $\mathrm{FFN}_1 \dots \mathrm{FFN}_E$ (each a
# SwiGLU, lesson 3) and a router matrix $W_r \in \mathbb R^{d\times E}$:
#
# $$z = x W_r, \qquad p = \mathrm{softmax}(z), \qquad
# \mathcal T = \text{top-}k \text{ indices of } p \text{ (ties to the lower index)},$$
#
# $$y = \sum_{e \in \mathcal T} w_e\, \mathrm{FFN}_e(x), \qquad
# w_e = p_e \;\;\text{(OpenMoE)} \quad\text{or}\quad w_e = \frac{p_e}{\sum_{e'\in\mathcal T} p_{e'}} \;\;\text{(Mixtral, } \texttt{renormalize=True}\text{)}.$$
#
# Only $k$ of the $E$ experts run for a token: the layer holds $E$ experts' parameters but
# spends the compute of $k$. OpenMoE uses $E = 16$ (Base) or 32, $k = 2$.
#
# ## 2. A small MoE layer
#
# We take the `toy` preset and shrink it: $d = 16$, $E = 4$, $k = 2$, dropless
# (`capacity_factor=None`). The router starts as $N(0, 0.02^2)$, so every token's $p$ is
# almost uniform; to see clear preferences we set the router weights to larger values, as if
# training had already shaped them.

# %%
cfg = get_preset("toy", d_model=16, n_experts=4, top_k=2, d_ff=32, capacity_factor=None,
                 init_std=0.25)                                # larger expert weights: readable numbers
rng = B.default_rng(0)
moe = MoE(cfg, rng=rng)
print(moe)
for name, p in moe.named_parameters():
    print(f"  {name:<18} {tuple(p.shape)}")

moe.router.weight.data[...] = rng.normal(0.0, 0.6, size=moe.router.weight.shape)   # [d, E]

T = 12
x = tinymoe.tensor(rng.normal(size=(1, T, cfg.d_model)).astype(np.float32), requires_grad=True)  # [B=1, T, d]

# %% [markdown]
# ## 3. Router logits, probabilities, top-k
#
# `tinymoe.routing` has the routing maths on plain arrays, so we can look at each piece.
# (The `MoE` layer calls exactly these functions inside its forward.)

# %%
tokens = x.data.reshape(T, cfg.d_model)                       # [1, T, d] -> [N=T, d]
z = tokens @ moe.router.weight.data                           # [N, d] @ [d, E] -> [N, E]
p = routing.softmax(z)                                        # [N, E]
idx, top_p = routing.top_k(p, cfg.top_k)                      # [N, k] expert ids (best first), [N, k] probs
np.set_printoptions(precision=3, suppress=True)
print("p (rows: tokens, columns: experts):\n", p)
print("top-2 experts per token:\n", idx.T)
assert np.allclose(p.sum(1), 1, atol=1e-6), "every row of p must sum to 1"
assert np.all(top_p[:, 0] >= top_p[:, 1]), "top_k must return the best choice first"

ties = np.array([[0.3, 0.3, 0.2, 0.2]], dtype=np.float32)
tie_idx, _ = routing.top_k(ties, 2)
print("ties [0.3, 0.3, 0.2, 0.2] -> experts", tie_idx[0], "(the lower index wins a tie)")
assert list(tie_idx[0]) == [0, 1], "ties must go to the lower expert index"

# %% [markdown]
# ## 4. The whole layer: `MoE.forward`
#
# `MoE.forward(x)` returns the output `y [B, T, d]`, the two router losses (lesson 7) and a
# statistics object with every routing decision: `expert_index`, `combine_weight`, `kept`,
# `slot`, `probs`, `load_before`, `load_after`, `dropped_fraction`, `confidence`, ...
#
# Inside, three steps run as whole-array operations:
# 1. **dispatch**: each kept assignment owns a row (its *slot*) of its expert's buffer
#    `buf [E, C, d]`; an index gather copies the token there;
# 2. **experts**: every expert runs its SwiGLU on its rows,
#    `swiglu(buf @ W_gate, buf @ W_up) @ W_down`, `[E, C, d] -> [E, C, d]`;
# 3. **combine**: a scatter-add sends `w * expert_out[row]` back to each token.
#
# (`MoE.forward` drops the empty slots before step 2: it packs the filled rows expert by
# expert and runs one matmul per expert on exactly those rows, a "grouped GEMM". The
# answer is the same; only the zero rows are no longer computed.)

# %%
y, aux, zl, stats = moe(x)                                    # [1, T, d], [], [], MoEStats
print(f"y {y.shape}; capacity C = {stats.capacity} rows per expert (dropless: C = tokens per group)")
print("load per expert (assignments):", B.to_numpy(stats.load_before))
print(f"dropped fraction {stats.dropped_fraction:.2f}, mean top-1 probability (confidence) {stats.confidence:.3f}")
assert np.array_equal(B.to_numpy(stats.expert_index), idx), "MoE chose other experts than routing.top_k"
assert stats.dropped_fraction == 0.0, "dropless routing must keep every assignment"

# %% [markdown]
# ## 5. One token's journey
#
# Follow token $n = 1$: its logits, its two experts, its slots in their buffers, and the
# weighted sum of the two expert outputs. We run each expert on this single token with the
# layer's own `experts` module (a buffer holding the token once per expert) and rebuild
# $y_n = \sum_{e\in\mathcal T} w_e \mathrm{FFN}_e(x_n)$.

# %%
n = 1
e1, e2 = (int(e) for e in stats.expert_index[n])
w1, w2 = (float(w) for w in stats.combine_weight[n])
s1, s2 = (int(s) for s in stats.slot[n])
print(f"token {n}: logits {z[n]}")
print(f"          probs  {p[n]}")
print(f"  1st choice: expert {e1}, p = {w1:.3f}, slot {s1} of expert {e1}'s buffer")
print(f"  2nd choice: expert {e2}, p = {w2:.3f}, slot {s2} of expert {e2}'s buffer")
print(f"  combine weights sum to {w1 + w2:.3f} (< 1: OpenMoE keeps the raw probabilities)")
print(f"  (slot {s2} at expert {e2}: every first choice, in token order, is served before any second choice,")
print("   so later tokens' first choices took the earlier slots; lesson 6 is about this order)")

with tinymoe.no_grad():
    one = np.repeat(tokens[n][None, None, :], cfg.n_experts, axis=0)    # [E, 1, d]: token n for every expert
    every_expert = moe.experts(tinymoe.tensor(one)).numpy()[:, 0]       # [E, d]: FFN_e(x_n) for all e
rebuilt = w1 * every_expert[e1] + w2 * every_expert[e2]                 # [d]
from_layer = y.numpy()[0, n]                                            # [d]
print("y_n from the layer :", from_layer[:6], "...")
print("y_n rebuilt by hand:", rebuilt[:6], "...")
err = np.abs(rebuilt - from_layer).max() / np.abs(from_layer).max()
assert err < 1e-5, (f"y_n differs from w1*FFN_{e1}(x) + w2*FFN_{e2}(x) by {err:.2e} (relative): "
                    "the combine step must add each kept expert output times its weight")
assert np.allclose(stats.combine_weight[n], p[n, [e1, e2]]), "OpenMoE combine weights are the raw softmax probabilities"

# %% [markdown]
# ## 5b. Build the MoE layer yourself
#
# The whole dropless layer in plain NumPy: route, then for every expert gather the tokens
# that chose it, run its SwiGLU, weight the outputs by the combine weights and add them back.
# A loop over the $E$ experts, never over tokens. It must give tinymoe's output.

# %%
def moe_numpy(x, w_router, w_gate, w_up, w_down, k):
    """Dropless top-k MoE, OpenMoE weights: x [N, d] -> y [N, d]."""
    z = x @ w_router                                         # [N, d] @ [d, E] -> [N, E]
    p = np.exp(z - z.max(axis=1, keepdims=True))             # [N, E], stable softmax
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]       # [N, k]: best first, ties to the lower index
    y = np.zeros_like(x)                                     # [N, d]
    for e in range(w_router.shape[1]):
        tok = np.flatnonzero((top == e).any(axis=1))         # [n_e] tokens that chose expert e
        h = x[tok] @ w_gate[e]                               # [n_e, d] @ [d, f] -> [n_e, f]
        h = h / (1 + np.exp(-h)) * (x[tok] @ w_up[e])        # SwiGLU: silu(x W_gate) * (x W_up)
        y[tok] += p[tok, e, None] * (h @ w_down[e])          # weight by p_e, add back [n_e, d]
    return y


mine = moe_numpy(tokens, moe.router.weight.data, moe.experts.w_gate.data, moe.experts.w_up.data,
                 moe.experts.w_down.data, cfg.top_k)                     # [N, d]
gap = np.abs(mine - y.numpy()[0]).max() / np.abs(y.numpy()).max()
print(f"NumPy layer vs tinymoe's MoE: max relative difference {gap:.1e}")
assert gap < 1e-5, (f"your NumPy MoE differs from tinymoe's by {gap:.1e} (relative): check the top-k "
                    "(ties to the lower index), the SwiGLU and the weight p_e of each expert")

# %% [markdown]
# ### Picture: the routing table and token 1's choice

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
im = ax1.imshow(p.T, aspect="auto", cmap="Blues", vmin=0, vmax=1)
for t in range(T):
    for rank in range(cfg.top_k):
        ax1.text(t, stats.expert_index[t, rank], str(rank + 1), ha="center", va="center",
                 color="w" if p[t, stats.expert_index[t, rank]] > 0.5 else "k", fontsize=9, fontweight="bold")
ax1.add_patch(plt.Rectangle((n - 0.5, -0.5), 1, cfg.n_experts, fill=False, ec="r", lw=2, label=f"token {n}"))
ax1.set_xlabel("token position n")
ax1.set_ylabel("expert e")
ax1.set_yticks(range(cfg.n_experts))
ax1.set_title("router probabilities p[n, e]; 1 / 2 = first / second choice")
ax1.legend(loc="upper right", fontsize=8)
fig.colorbar(im, ax=ax1, label="p")

experts = np.arange(cfg.n_experts)
colors = ["C1" if e in (e1, e2) else "C0" for e in experts]
ax2.bar(experts - 0.2, p[n], width=0.4, color=colors)
renorm = np.zeros(cfg.n_experts)
renorm[[e1, e2]] = np.array([w1, w2]) / (w1 + w2)
ax2.bar(experts + 0.2, renorm, width=0.4, color="C2", alpha=0.7, label="renormalised weight (Mixtral)")
ax2.set_xticks(experts)
ax2.set_xlabel("expert e")
ax2.set_ylabel("weight")
ax2.set_title(f"token {n}: y = {w1:.2f} FFN_{e1}(x) + {w2:.2f} FFN_{e2}(x)")
ax2.legend(handles=[plt.Rectangle((0, 0), 1, 1, fc="C1", label="p of a chosen expert (= OpenMoE weight)"),
                    plt.Rectangle((0, 0), 1, 1, fc="C0", label="p of an expert not chosen"),
                    plt.Rectangle((0, 0), 1, 1, fc="C2", alpha=0.7, label="renormalised weight (Mixtral)")],
           fontsize=8)
fig.suptitle("Lesson 5: top-2 routing of 12 tokens over 4 experts")
show(fig, "05_router.png")

# %% [markdown]
# ## 6. How does the router learn?
#
# The choice of $\mathcal T$ is an argmax: it has no gradient. But the chosen experts' outputs
# are multiplied by $w_e = p_e$, and $p$ is a smooth function of $W_r$. So the loss reaches
# the router through the combine weights:
#
# $$\frac{\partial L}{\partial w_e} = \Big\langle \frac{\partial L}{\partial y},\, \mathrm{FFN}_e(x)\Big\rangle,
# \qquad \frac{\partial L}{\partial z} = p \odot \Big(\frac{\partial L}{\partial p} - \Big\langle \frac{\partial L}{\partial p}, p\Big\rangle\Big).$$
#
# If an expert's output helps (its inner product with $-\partial L/\partial y$ is positive),
# its probability goes up, and next time it is more likely to be chosen. (With raw weights the
# two chosen experts can also "win" probability from the $E-k$ experts that were not chosen;
# with renormalised weights only the split between the chosen ones is learned.)

# %%
target = rng.normal(size=y.shape).astype(np.float32)                   # a made-up regression target
moe.zero_grad()
y, aux, zl, stats = moe(x)
loss = ((y - target) ** 2).mean()
loss.backward()
router_grad = moe.router.weight.grad                                   # [d, E]
print(f"|dL/dW_router| = {np.abs(router_grad).sum():.4f} (nonzero: the router is learning)")
assert np.abs(router_grad).sum() > 0, "no gradient reached the router: the combine weights must depend on p"

# %% [markdown]
# Nonzero is not the same as right. A finite-difference check, in float64, of the whole
# router gradient: the loss now includes the two router losses of lesson 7 (with large
# weights, so that their gradients count), and every entry of $W_r$ is nudged by $\pm h$.
# Top-$k$ is piecewise constant, so for a small $h$ the routing decisions do not change; we
# check that they did not (otherwise the difference quotient would measure a jump, not a
# slope). Held fixed like this, the loss is a smooth function of $W_r$ and backprop must
# match the difference quotient.

# %%
moe64 = MoE(cfg.replace(dtype="float64"), rng=B.default_rng(0))
moe64.load_state_dict(moe.state_dict())                                # same weights, float64
x64 = tinymoe.tensor(x.data.astype(np.float64))                         # [1, T, d]
target64 = target.astype(np.float64)                                    # [1, T, d]
c_aux, c_z = 0.5, 0.1                                                   # large weights: test those terms too


def router_loss(layer):
    out, aux64, z64, st = layer(x64)                                    # [1, T, d], [], [], stats
    return ((out - target64) ** 2).mean() + c_aux * aux64 + c_z * z64, st


moe64.zero_grad()
loss64, st64 = router_loss(moe64)
loss64.backward()
grad64 = moe64.router.weight.grad.copy()                                # [d, E] backprop
W0 = moe64.router.weight.data.copy()
h = 1e-6
fd = np.zeros_like(W0)                                                  # [d, E] finite differences
with tinymoe.no_grad():
    for i in range(W0.shape[0]):
        for e in range(W0.shape[1]):
            vals = []
            for sign in (1, -1):
                moe64.router.weight.data[...] = W0
                moe64.router.weight.data[i, e] += sign * h
                val, st_h = router_loss(moe64)
                assert np.array_equal(st_h.expert_index, st64.expert_index), "a nudge of h changed the routing"
                vals.append(val.item())
            fd[i, e] = (vals[0] - vals[1]) / (2 * h)
moe64.router.weight.data[...] = W0
fd_err = np.abs(grad64 - fd).max() / np.abs(fd).max()
print(f"router gradient: backprop vs central differences (float64, h = {h:g}), "
      f"max error relative to the largest entry: {fd_err:.1e}")
assert fd_err < 1e-6, (
    f"the router gradient disagrees with finite differences (relative error {fd_err:.1e}): the backward "
    "of the combine weights, the aux loss, the z-loss or the softmax (dz = p * (dp - <dp, p>)) is wrong")

# %% [markdown]
# ## 7. Against PyTorch (optional)
#
# The same layer in a few lines of PyTorch, with the same weights, must give the same output.

# %%
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the comparison")
if torch is not None:
    xt = torch.tensor(tokens)
    pt = torch.softmax(xt @ torch.tensor(moe.router.weight.data), dim=-1)
    wt, it = torch.topk(pt, cfg.top_k, dim=-1)
    wg, wu, wd = (torch.tensor(a) for a in (moe.experts.w_gate.data, moe.experts.w_up.data, moe.experts.w_down.data))
    yt = torch.zeros_like(xt)
    for rank in range(cfg.top_k):
        for e in range(cfg.n_experts):
            sel = it[:, rank] == e
            h = torch.nn.functional.silu(xt[sel] @ wg[e]) * (xt[sel] @ wu[e])
            yt[sel] += wt[sel, rank, None] * (h @ wd[e])
    diff = np.abs(yt.numpy() - y.numpy()[0]).max()
    print(f"max |torch - tinymoe| = {diff:.1e}")
    assert diff < 1e-5, f"tinymoe's MoE output differs from a plain torch loop by {diff:.1e}"
    # the router gradient too: torch differentiates through softmax and the top-k values
    wr = torch.tensor(moe.router.weight.data, requires_grad=True)
    pt = torch.softmax(xt @ wr, dim=-1)
    wt = torch.gather(pt, 1, it)                                        # the same choices, differentiable
    yt = torch.zeros_like(xt)
    for rank in range(cfg.top_k):
        for e in range(cfg.n_experts):
            sel = it[:, rank] == e
            h_t = torch.nn.functional.silu(xt[sel] @ wg[e]) * (xt[sel] @ wu[e])
            yt[sel] += wt[sel, rank, None] * (h_t @ wd[e])
    ((yt - torch.tensor(target[0])) ** 2).mean().backward()
    gdiff = np.abs(wr.grad.numpy() - router_grad).max() / np.abs(router_grad).max()
    print(f"router gradient: max |torch - tinymoe| / max |grad| = {gdiff:.1e}")
    assert gdiff < 1e-4, f"tinymoe's router gradient differs from torch's by {gdiff:.1e} (relative)"

# %% [markdown]
# ## Exercises
#
# 1. **Mixtral weights.** Build the layer with `renormalize=True` and check that token 1's
#    output is the OpenMoE output divided by $p_{e_1} + p_{e_2}$.
#    *Hint:* `get_preset("toy", ..., renormalize=True)`; reuse the same weights with
#    `moe2.load_state_dict(moe.state_dict())`.
# 2. **Switch routing ($k = 1$).** Set `top_k=1`. What fraction of the expert parameters does
#    one token touch now? How does the gradient reach the router when the output is
#    $p_{e}\,\mathrm{FFN}_e(x)$ and $p_e$ is close to 1? *Hint:* look at $\partial p_e / \partial z$
#    when $p_e \to 1$.
# 3. **Router temperature.** Multiply the router weights by 10, then by 0.1, and also try the
#    initialisation scale (std 0.02). Watch `stats.confidence` and the size of
#    `moe.router.weight.grad`. Which router learns slowly: the near-uniform one or the
#    saturated (confident) one? *Hint:* $\partial p_e/\partial z_e = p_e(1-p_e)$ (lesson 2's
#    softmax plot): it vanishes as $p_e \to 1$, while near uniform it is about
#    $\frac1E(1-\frac1E)$, not small.
