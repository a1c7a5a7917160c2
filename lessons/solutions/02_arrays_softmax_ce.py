# %% [markdown]
# # Solutions to lesson 2 — broadcasting, matmul backward, softmax and cross-entropy
#
# Each exercise of `lessons/02_arrays_softmax_ce.py`, worked and checked.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import plt, show

import tinymoe
from tinymoe import functional as F

rng = np.random.default_rng(0)

# %% [markdown]
# ## Exercise 1 — the outer product
#
# $y_{ij} = u_i w_j$: $u$ is stretched along the columns and $w$ along the rows, so
# $\bar u_i = \sum_j \bar y_{ij} w_j$, i.e. $\bar u = \bar Y w^\top$ (`[n, m] @ [m, 1] -> [n, 1]`),
# and $\bar w = u^\top \bar Y$ (`[1, n] @ [n, m] -> [1, m]`).

# %%
n, m = 5, 3
u = tinymoe.tensor(rng.normal(size=(n, 1)), requires_grad=True)        # [n, 1] float64
w = tinymoe.tensor(rng.normal(size=(1, m)), requires_grad=True)        # [1, m]
G = rng.normal(size=(n, m))                                            # dL/dy, [n, m]
(u * w).backward(G)                                                    # [n, 1] * [1, m] -> [n, m]
print("u.grad", u.grad.ravel(), "\nG @ w^T", (G @ w.data.T).ravel())
assert np.allclose(u.grad, G @ w.data.T, rtol=1e-12), "u.grad should be dY @ w^T"
assert np.allclose(w.grad, u.data.T @ G, rtol=1e-12), "w.grad should be u^T @ dY"

# %% [markdown]
# ## Exercise 2 — label smoothing
#
# $q = (1-\epsilon)\,\mathrm{onehot}(t) + \epsilon/V$ sums to 1, so
# $\partial/\partial z_j \big(-\sum_i q_i \log p_i\big) = -q_j + p_j \sum_i q_i = p_j - q_j$.
# Built from `F.log_softmax` times a constant array, averaged over N rows: gradient $(p-q)/N$.

# %%
N, V, eps = 6, 10, 0.1
z = tinymoe.tensor(rng.normal(size=(N, V)) * 2, requires_grad=True)    # [N, V] float64
t = rng.integers(0, V, size=N)                                         # [N]
q = np.full((N, V), eps / V)
q[np.arange(N), t] += 1 - eps                                          # [N, V], rows sum to 1
loss = -(F.log_softmax(z, axis=-1) * q).sum() / N                      # []
loss.backward()
p = F.softmax(tinymoe.tensor(z.data), axis=-1).numpy()
print(f"smoothed loss {loss.item():.6f}; max |grad - (p - q)/N| = {np.abs(z.grad - (p - q) / N).max():.1e}")
assert np.allclose(z.grad, (p - q) / N, atol=1e-14), "the label-smoothing gradient should be (p - q) / N"
plain = F.cross_entropy(tinymoe.tensor(z.data), t).item()
q0 = np.eye(V)[t]                                                      # eps = 0: q is the one-hot target
same = -(F.log_softmax(tinymoe.tensor(z.data), axis=-1) * q0).sum().item() / N
assert abs(same - plain) < 1e-12, "with eps = 0 the same construction is the ordinary cross-entropy"

# %% [markdown]
# ## Exercise 3 — temperature
#
# $\mathrm{softmax}(z/T)$: as $T \to 0$ the largest logit's share $\to 1$ (the argmax, a
# one-hot vector); as $T \to \infty$ every $z_i/T \to 0$ and the result tends to the uniform
# $1/V$. $T = 1$ is the softmax itself.

# %%
zt = np.array([1.0, 2.5, 0.3, 2.0, -1.0])
Ts = (0.1, 1.0, 10.0)
fig, ax = plt.subplots(figsize=(7, 4))
for j, T in enumerate(Ts):
    ax.bar(np.arange(zt.size) + (j - 1) * 0.27, F.softmax(tinymoe.tensor(zt / T)).numpy(), 0.27, label=f"T = {T:g}")
ax.axhline(1 / zt.size, color="k", ls=":", lw=1, label="uniform 1/V")
ax.set_xlabel("index i")
ax.set_ylabel("softmax(z / T)_i")
ax.set_title("Solution 2.3: low T -> argmax, high T -> uniform")
ax.legend()
show(fig, "s02_temperature.png")
cold = F.softmax(tinymoe.tensor(zt / 0.01)).numpy()
hot = F.softmax(tinymoe.tensor(zt / 1e4)).numpy()
print("T = 0.01:", np.round(cold, 4), " T = 1e4:", np.round(hot, 4))
assert np.allclose(cold, np.eye(zt.size)[np.argmax(zt)], atol=1e-6), "T -> 0 should give the one-hot argmax"
assert np.allclose(hot, 1 / zt.size, atol=1e-3), "T -> infinity should give the uniform distribution"
