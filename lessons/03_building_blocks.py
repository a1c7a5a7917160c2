# %% [markdown]
# # Lesson 3 — Building blocks: Linear, Embedding, RMSNorm, SwiGLU
#
# **What you will learn**
# - `Linear` ($y = xW$, no bias, as in OpenMoE) and how its initialisation scale sets the size
#   of its outputs;
# - `Embedding` as a row lookup whose backward is a **scatter-add** (a repeated token id gets
#   the sum of its gradients);
# - `RMSNorm` (T5's LayerNorm): why it is scale invariant, and why its input gradient is
#   orthogonal to its input;
# - the SwiGLU feed-forward network used for every dense FFN and every expert in OpenMoE,
#   its parameter count $3\,d\,f$, and a float64 gradient check of the whole module.

# %%
import numpy as np

from _lesson import FAST, plt, show

import tinymoe
from tinymoe import backend as B
from tinymoe import functional as F
from tinymoe.nn import Embedding, FeedForward, Linear, RMSNorm

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Linear
#
# $y = xW$ with $W \in \mathbb R^{d_{in}\times d_{out}}$ stored `[in, out]` (so no transpose),
# initialised $W_{ij} \sim N(0, \sigma^2)$ from a NumPy `Generator` that you pass in (tinymoe has
# no global seed). For inputs with unit variance,
#
# $$\mathrm{Var}(y_j) = \sum_i \mathrm{Var}(x_i)\,\sigma^2 = d_{in}\,\sigma^2 ,$$
#
# so OpenMoE's $\sigma = 0.02$ with $d = 768$ gives outputs of standard deviation
# $0.02\sqrt{768} \approx 0.55$.

# %%
d_in, d_out = 768, 64
lin = Linear(d_in, d_out, rng=B.default_rng(0))                      # weight [768, 64], no bias
print(lin, "weight", lin.weight.shape, "parameters", lin.num_parameters())
x = tinymoe.tensor(rng.normal(size=(256, d_in)).astype(np.float32))  # [N, d_in]
y = lin(x)                                                           # [N, d_in] @ [d_in, d_out] -> [N, d_out]
print(f"output std {y.numpy().std():.3f}, predicted 0.02 * sqrt({d_in}) = {0.02 * np.sqrt(d_in):.3f}")
assert abs(y.numpy().std() / (0.02 * np.sqrt(d_in)) - 1) < 0.1, "output scale should follow sqrt(d_in) * sigma"

# %% [markdown]
# ## 2. Embedding
#
# A token id $t$ selects row $t$ of $E \in \mathbb R^{V\times d}$. This is the same as
# $\mathrm{onehot}(t)\,E$, so its backward is $\bar E = \mathrm{onehot}(t)^\top \bar Y$: each
# row of the upstream gradient is **added** into the row of its id. Token ids that occur several
# times in a batch (the letter `e`, a space) collect the sum. tinymoe does this scatter-add
# without `np.add.at`: a stable sort groups the rows of each id, and each group is summed
# (`backend.scatter_add_rows`: one plain indexed add per occurrence when no id repeats more
# than 8 times, as in the MoE combine; `add.reduceat` over the sorted rows otherwise).

# %%
V, d = 10, 4
emb = Embedding(V, d, rng=B.default_rng(1))                          # weight [V, d]
ids = np.array([[3, 1, 3, 7]])                                       # [B=1, T=4]; id 3 twice
out = emb(ids)                                                       # [1, 4, d]
g = rng.normal(size=out.shape).astype(np.float32)                    # dL/d out, [1, 4, d]
out.backward(g)
onehot = np.eye(V, dtype=np.float32)[ids[0]]                         # [T, V]
expected = onehot.T @ g[0]                                           # [V, T] @ [T, d] -> [V, d]
print("grad rows with a nonzero entry:", np.flatnonzero(np.abs(emb.weight.grad).sum(1)))
print("row 3 =", emb.weight.grad[3], "= g[0] + g[2] =", g[0, 0] + g[0, 2])
assert np.allclose(emb.weight.grad, expected, atol=1e-6), (
    "the embedding gradient must be onehot(ids)^T @ dY: a repeated id gets the SUM of its rows")

try:
    emb(np.array([[3, 12]]))
except (IndexError, ValueError) as e:
    print("id out of range ->", type(e).__name__, e)

# %% [markdown]
# ## 3. RMSNorm
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac1d\sum_i x_i^2 + \epsilon}} \odot w,\qquad \epsilon = 10^{-6},\ w \text{ initialised to } 1.$$
#
# Unlike LayerNorm there is no mean subtraction and no bias (Zhang & Sennrich 2019; T5,
# LLaMA and OpenMoE use it). Two consequences:
# - **scale invariance**: $\mathrm{RMSNorm}(c\,x) = \mathrm{RMSNorm}(x)$ for $c > 0$ (as long as
#   $\frac1d\sum x_i^2 \gg \epsilon$: the $\epsilon$ only matters for tiny rows);
# - so the output does not change along the direction of $x$, and the **input gradient is
#   orthogonal to $x$**: $\langle \bar x, x\rangle = 0$ (differentiate $f(cx) = f(x)$ in $c$ at $c=1$).
#
# In a pre-norm transformer every attention and FFN input passes through one, so the blocks
# see inputs of a fixed scale however large the residual stream grows.

# %%
norm = RMSNorm(8, dtype="float64")
xs = tinymoe.tensor(rng.normal(size=(5, 8)) * np.array([[0.01], [1], [10], [100], [1e4]]), requires_grad=True)  # [5, 8]
ys = norm(xs)                                                        # [5, 8]
rms_in = np.sqrt((xs.data ** 2).mean(1))
rms_out = np.sqrt((ys.numpy() ** 2).mean(1))
print("row RMS before:", np.round(rms_in, 3), "\nrow RMS after: ", np.round(rms_out, 6))
print("(the first row is tiny: mean(x^2) = 6e-5 is not much larger than eps = 1e-6, so its RMS stays below 1)")
assert np.allclose(rms_out, rms_in / np.sqrt(rms_in ** 2 + 1e-6), rtol=1e-9), \
    "RMSNorm with w = 1 must give rows of RMS  rms / sqrt(rms^2 + eps)"
assert np.allclose(norm(tinymoe.tensor(xs.data[1:] * 3.0)).numpy(), ys.numpy()[1:], atol=1e-9), \
    "RMSNorm must be scale invariant (for rows well above eps)"
g = rng.normal(size=ys.shape)
ys.backward(g)
dots = (xs.grad * xs.data).sum(1) / (np.linalg.norm(xs.grad, axis=1) * np.linalg.norm(xs.data, axis=1))
print("cosine(grad x, x) per row:", np.round(dots, 6))
print("(row 0 again feels eps; the others are orthogonal to rounding)")
assert np.all(np.abs(dots[1:]) < 1e-5), "the input gradient of RMSNorm (w = 1) must be orthogonal to the input"

# %% [markdown]
# ## 4. The SwiGLU feed-forward network
#
# $$\mathrm{FFN}(x) = \big(\mathrm{silu}(xW_{gate}) \odot xW_{up}\big) W_{down},\qquad
# \mathrm{silu}(a) = a\,\sigma(a),$$
#
# with $W_{gate}, W_{up} \in \mathbb R^{d\times f}$ and $W_{down} \in \mathbb R^{f\times d}$:
# $3df$ parameters, no biases (Shazeer 2020, "GLU Variants Improve Transformer"). The *gate*
# path decides, per hidden unit, how much of the *up* path passes. OpenMoE-Base uses
# $d = 768$, $f = 3072$ (the paper's table; the released code used 2048 with a different
# matrix layout, see lesson 8). Each expert of an MoE layer is one such FFN.
#
# `F.swiglu(gate, up)` is one fused operation with a hand-written backward:
# $\bar u = \bar y \odot \mathrm{silu}(a)$,
# $\bar a = \bar y \odot u \odot \sigma(a)\big(1 + a(1-\sigma(a))\big)$.

# %%
ffn = FeedForward(16, 48, rng=B.default_rng(2), init_std=0.2, dtype="float64")
print(ffn)
n_params = ffn.num_parameters()
print(f"parameters {n_params} = 3 * d * f = 3 * 16 * 48 = {3 * 16 * 48}")
assert n_params == 3 * 16 * 48, "a SwiGLU FFN has three d x f matrices"

xf = tinymoe.tensor(rng.normal(size=(2, 3, 16)), requires_grad=True)   # [B, T, d] float64
loss = (ffn(xf) ** 2).sum()                                            # [B, T, d] -> []
loss.backward()


def loss_at(W):
    old = ffn.w_gate.weight.data.copy()
    ffn.w_gate.weight.data[...] = W
    with tinymoe.no_grad():
        val = (ffn(tinymoe.tensor(xf.data)) ** 2).sum().item()
    ffn.w_gate.weight.data[...] = old
    return val


W0 = ffn.w_gate.weight.data.copy()
worst = 0.0
for (i, j) in [(0, 0), (3, 7), (15, 47), (8, 20)]:
    Wp, Wm = W0.copy(), W0.copy()
    Wp[i, j] += 1e-6
    Wm[i, j] -= 1e-6
    fd = (loss_at(Wp) - loss_at(Wm)) / 2e-6
    bp = ffn.w_gate.weight.grad[i, j]
    worst = max(worst, abs(fd - bp) / max(abs(fd), 1e-12))
    print(f"  dL/dW_gate[{i},{j}]: backprop {bp:+.8f}  finite diff {fd:+.8f}")
assert worst < 1e-6, f"SwiGLU FFN gradient check failed (worst rel err {worst:.1e})"

# %% [markdown]
# ### Picture: the gate nonlinearity, and what RMSNorm does to scales

# %%
a = tinymoe.tensor(np.linspace(-6, 6, 241), requires_grad=True)       # [241] float64
s = F.silu(a)
s.sum().backward()                                                     # d silu / da, elementwise
relu = np.maximum(a.data, 0)

raw = rng.normal(size=(2000, 64)) * rng.lognormal(0, 1.5, size=(2000, 1))   # rows of very different scales
normed = RMSNorm(64, dtype="float64")(tinymoe.tensor(raw)).numpy()
rms_before = np.sqrt((raw ** 2).mean(1))                                   # [2000]
rms_after = np.sqrt((normed ** 2).mean(1))                                 # [2000]
bins = np.logspace(-3, 2.5, 60)
filled_after = int(np.count_nonzero(np.histogram(rms_after, bins)[0]))    # bins the "after" rows land in
print(f"row RMS before: {rms_before.min():.2g} .. {rms_before.max():.3g} "
      f"({int(np.count_nonzero(np.histogram(rms_before, bins)[0]))} bins); "
      f"after: {rms_after.min():.6f} .. {rms_after.max():.6f} ({filled_after} bin(s) of width x{bins[1] / bins[0]:.2f})")
assert rms_after.max() - rms_after.min() < bins[1] / bins[0] - 1, "after RMSNorm every row should have RMS close to 1"

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.3))
ax1.plot(a.data, s.numpy(), label="silu(a) = a * sigmoid(a)")
ax1.plot(a.data, a.grad, label="d silu / da (from tinymoe autograd)")
ax1.plot(a.data, relu, "k:", label="relu(a), for comparison")
ax1.axhline(0, color="0.7", lw=0.6)
ax1.set_xlabel("a")
ax1.set_ylabel("value")
ax1.set_title("SiLU: smooth, slightly negative, minimum at a = -1.28")
ax1.legend(fontsize=8)
ax2.hist(rms_before, bins=bins, alpha=0.7, label="row RMS before RMSNorm")
ax2.hist(rms_after, bins=bins, alpha=0.7,
         label=f"row RMS after: {rms_after.min():.4f}..{rms_after.max():.4f},\n"
               f"all {rms_after.size} rows in {filled_after} bin(s) at 1")
ax2.set_xscale("log")
ax2.set_yscale("log")
ax2.set_xlabel("root mean square of a row (log scale)")
ax2.set_ylabel("number of rows (log scale)")
ax2.set_title("RMSNorm maps every row to RMS close to 1")
ax2.legend(fontsize=8)
fig.suptitle("Lesson 3: building blocks")
show(fig, "03_blocks.png")
assert abs(a.grad[120] - 0.5) < 1e-12, "silu'(0) must be 1/2"

# %% [markdown]
# ## 5. Against PyTorch (optional)

# %%
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the comparison")
if torch is not None:
    xt = torch.tensor(xf.data)
    Wg, Wu, Wd = (torch.tensor(m.weight.data) for m in (ffn.w_gate, ffn.w_up, ffn.w_down))
    yt = (torch.nn.functional.silu(xt @ Wg) * (xt @ Wu)) @ Wd
    diff = np.abs(yt.numpy() - ffn(tinymoe.tensor(xf.data)).numpy()).max()
    xn = torch.tensor(xs.data)
    rn = xn * torch.rsqrt((xn ** 2).mean(-1, keepdim=True) + 1e-6)
    diff_norm = np.abs(rn.numpy() - ys.numpy()).max()
    print(f"SwiGLU FFN max diff {diff:.1e}; RMSNorm max diff {diff_norm:.1e}")
    assert diff < 1e-12 and diff_norm < 1e-12

# %% [markdown]
# ## Exercises
#
# 1. **Unit-variance init.** Which $\sigma$ makes `Linear(d, d)` keep unit output variance?
#    Check for $d = 64$ and $d = 1024$. *Hint:* $d\sigma^2 = 1$.
# 2. **LayerNorm from tinymoe ops.** Write $\mathrm{LN}(x) = (x-\mu)/\sqrt{\sigma^2 + \epsilon}$
#    with `F.mean`, `F.rsqrt` and broadcasting; is it scale invariant? Is its gradient orthogonal
#    to $x$, to $\mathbf 1$, or both? *Hint:* LN is also invariant to adding a constant.
# 3. **GEGLU.** Replace `silu` by a tanh-approximated GELU built from `F.tanh` and check the
#    gradient by finite differences as above.
