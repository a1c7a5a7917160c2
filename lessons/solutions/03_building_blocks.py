# %% [markdown]
# # Solutions to lesson 3 — Linear, RMSNorm, SwiGLU
#
# Each exercise of `lessons/03_building_blocks.py`, worked and checked.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST

import tinymoe
from tinymoe import backend as B
from tinymoe import functional as F
from tinymoe.nn import Linear

rng = np.random.default_rng(0)

# %% [markdown]
# ## Exercise 1 — unit-variance initialisation
#
# $\mathrm{Var}(y_j) = d\,\sigma^2$ for unit-variance inputs, so $\sigma = 1/\sqrt d$
# (LeCun / fan-in scaling). The sample variance of $n$ outputs scatters by about
# $\sqrt{2/n}$ around 1, and the random weights add their own scatter: a 10 % tolerance.

# %%
n_rows = 2048 if FAST else 8192
for d in (64, 1024):
    lin = Linear(d, d, rng=B.default_rng(d), init_std=1 / np.sqrt(d))      # weight [d, d]
    y = lin(tinymoe.tensor(rng.normal(size=(n_rows, d)).astype(np.float32))).numpy()   # [n, d]
    var = float(y.var())
    print(f"d = {d:4d}, sigma = 1/sqrt(d) = {1 / np.sqrt(d):.4f}: output variance {var:.3f}")
    assert abs(var - 1) < 0.1, f"d = {d}: sigma = 1/sqrt(d) should give unit output variance, got {var:.3f}"

# %% [markdown]
# ## Exercise 2 — LayerNorm from tinymoe ops
#
# $\mathrm{LN}(x) = (x-\mu)/\sqrt{\sigma^2+\epsilon}$ (no scale, no bias). It is invariant to
# scaling ($x \to cx$, up to $\epsilon$) **and** to shifting ($x \to x + c\mathbf 1$), so the
# input gradient is orthogonal to both $x$ and $\mathbf 1$ (differentiate $f(cx) = f(x)$ and
# $f(x + c\mathbf 1) = f(x)$ at $c = 1$ resp. $c = 0$). RMSNorm only has the first invariance.

# %%
def layer_norm(x, eps=1e-12):
    mu = F.mean(x, axis=-1, keepdims=True)                   # [N, 1]
    xc = x - mu                                              # [N, d]
    var = F.mean(xc * xc, axis=-1, keepdims=True)            # [N, 1]
    return xc * F.rsqrt(var + eps)                           # [N, d]


x = tinymoe.tensor(rng.normal(size=(4, 8)) * 3 + 1, requires_grad=True)     # [4, 8] float64
y = layer_norm(x)
g = rng.normal(size=y.shape)
y.backward(g)
scaled = layer_norm(tinymoe.tensor(x.data * 7.0)).numpy()
shifted = layer_norm(tinymoe.tensor(x.data + 5.0)).numpy()
cos_x = (x.grad * x.data).sum(1) / (np.linalg.norm(x.grad, axis=1) * np.linalg.norm(x.data, axis=1))
cos_1 = x.grad.sum(1) / (np.linalg.norm(x.grad, axis=1) * np.sqrt(x.shape[1]))
print(f"scale invariant: max diff {np.abs(scaled - y.numpy()).max():.1e}; shift invariant: "
      f"{np.abs(shifted - y.numpy()).max():.1e}")
print("cosine(grad, x):", np.round(cos_x, 12), "\ncosine(grad, 1):", np.round(cos_1, 12))
assert np.allclose(scaled, y.numpy(), atol=1e-10) and np.allclose(shifted, y.numpy(), atol=1e-10)
assert np.all(np.abs(cos_x) < 1e-10) and np.all(np.abs(cos_1) < 1e-10), "LN's gradient is orthogonal to x and to 1"

# %% [markdown]
# ## Exercise 3 — GEGLU
#
# $\mathrm{gelu}(a) \approx \frac a2\big(1 + \tanh(\sqrt{2/\pi}(a + 0.044715a^3))\big)$ built from
# `F.tanh`, in the FFN $(\mathrm{gelu}(xW_g)\odot xW_u)W_d$; checked entry by entry against
# central differences in float64.

# %%
def gelu_tanh(a):
    return a * 0.5 * (1.0 + F.tanh((a + a * a * a * 0.044715) * np.sqrt(2 / np.pi)))


d, f = 6, 10
Wg, Wu, Wd = (rng.normal(size=s) * 0.5 for s in ((d, f), (d, f), (f, d)))
xg = tinymoe.tensor(rng.normal(size=(5, d)))                                 # [5, d] float64


def geglu_loss(Wg_arr, grad=False):
    Wt = tinymoe.tensor(Wg_arr, requires_grad=grad)
    out = (gelu_tanh(xg @ Wt) * (xg @ tinymoe.tensor(Wu))) @ tinymoe.tensor(Wd)   # [5, d]
    return (out * out).sum(), Wt


loss, Wt = geglu_loss(Wg, grad=True)
loss.backward()
fd = np.zeros_like(Wg)
for i in range(d):
    for j in range(f):
        Wp, Wm = Wg.copy(), Wg.copy()
        Wp[i, j] += 1e-6
        Wm[i, j] -= 1e-6
        with tinymoe.no_grad():
            fd[i, j] = (geglu_loss(Wp)[0].item() - geglu_loss(Wm)[0].item()) / 2e-6
worst = np.abs(Wt.grad - fd).max() / np.abs(fd).max()
print(f"GEGLU dL/dW_gate: worst error relative to the largest entry {worst:.1e}")
assert worst < 1e-7, f"GEGLU gradient check failed ({worst:.1e})"
