# %% [markdown]
# # Lesson 2 — Broadcasting, reductions, the matmul backward; stable softmax and cross-entropy
#
# **What you will learn**
# - why the gradient of a broadcast operand is a **sum** over the broadcast axes;
# - the backward of `sum`, `mean` and `max`;
# - the matmul backward $\bar A = \bar Y B^\top$, $\bar B = A^\top \bar Y$, from index notation,
#   and why a training step costs about three forward passes;
# - why softmax subtracts the maximum, and why cross-entropy is computed from logits with
#   `logsumexp` (its gradient is simply $\mathrm{softmax}(z) - \mathrm{onehot}(t)$);
# - the loss of a model that knows nothing: $\ln V$.

# %%
import math
import time

import numpy as np

from _lesson import FAST, plt, show

import tinymoe
from tinymoe import functional as F

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Broadcasting and its backward
#
# `x + b` with `x` of shape `[B, d]` and `b` of shape `[d]` adds the same `b` to every row:
# NumPy *stretches* `b` to `[B, d]` without copying. Each entry $b_j$ is therefore **used $B$
# times**, and (lesson 1) the gradients of all uses add up:
#
# $$y_{ij} = x_{ij} + b_j \quad\Longrightarrow\quad \bar b_j = \sum_i \bar y_{ij}.$$
#
# In general the gradient is summed over every axis that broadcasting added (leading axes) or
# stretched (axes of size 1). tinymoe does this in `functional.unbroadcast`.

# %%
Bsz, d = 4, 3
x = tinymoe.tensor(rng.normal(size=(Bsz, d)).astype(np.float32), requires_grad=True)   # [B, d]
b = tinymoe.tensor(np.array([0.1, -0.2, 0.3], dtype=np.float32), requires_grad=True)  # [d]
s = tinymoe.tensor(rng.normal(size=(Bsz, 1)).astype(np.float32), requires_grad=True)  # [B, 1]
y = (x + b) * s                                   # [B, d] + [d] -> [B, d]; * [B, 1] -> [B, d]
g = rng.normal(size=(Bsz, d)).astype(np.float32)  # an upstream gradient dL/dy, [B, d]
y.backward(g)

print("shapes: x", x.shape, " b", b.shape, " s", s.shape, " y", y.shape)
print("b.grad", b.grad, " expected sum_i g_ij s_i =", (g * s.data).sum(0))
print("s.grad", s.grad.ravel(), " expected sum_j g_ij (x+b)_ij =", (g * (x.data + b.data)).sum(1))
assert b.grad.shape == b.shape, f"b.grad has shape {b.grad.shape}, expected {b.shape}: the broadcast axis was not summed"
assert np.allclose(b.grad, (g * s.data).sum(0), rtol=1e-5), "b.grad is not the sum over the broadcast (batch) axis"
assert np.allclose(s.grad, (g * (x.data + b.data)).sum(1, keepdims=True), rtol=1e-5), \
    "s.grad is not the sum over the stretched axis of size 1"

# %% [markdown]
# ## 2. Reductions
#
# | forward | backward |
# |---|---|
# | $y = \sum_i x_i$ | $\bar x_i = \bar y$ (broadcast back) |
# | $y = \frac1n\sum_i x_i$ | $\bar x_i = \bar y / n$ |
# | $y = \max_i x_i$ | $\bar x_i = \bar y\,[x_i = y]$ (split evenly at ties) |

# %%
v = tinymoe.tensor([[1.0, 5.0, 2.0], [3.0, 3.0, 0.0]], requires_grad=True)   # [2, 3]
F.max(v, axis=1).sum().backward()                                            # [2, 3] -> [2] -> []
print("grad of sum(max over rows):\n", v.grad)
assert np.allclose(v.grad, [[0, 1, 0], [0.5, 0.5, 0]]), \
    "max backward should send the gradient to the arg-max (split evenly between the two 3.0s)"

v.grad = None
F.mean(v, axis=0).sum().backward()                                            # [2, 3] -> [3] -> []
assert np.allclose(v.grad, 0.5), f"mean over 2 rows should give gradient 1/2 everywhere, got {v.grad}"

# %% [markdown]
# ## 3. The matmul backward
#
# $Y = AB$ with $A \in \mathbb R^{n\times k}$, $B \in \mathbb R^{k\times m}$:
# $Y_{ij} = \sum_p A_{ip} B_{pj}$. Then
#
# $$\bar A_{ip} = \sum_j \bar Y_{ij} B_{pj} \;\Rightarrow\; \bar A = \bar Y B^\top
# \quad [n,m]\,[m,k] \to [n,k], \qquad
# \bar B_{pj} = \sum_i A_{ip}\bar Y_{ij} \;\Rightarrow\; \bar B = A^\top \bar Y
# \quad [k,n]\,[n,m] \to [k,m].$$
#
# A trick to remember it: each gradient has the shape of its operand, and there is only one way
# to multiply $\bar Y$ with the *other* operand to get that shape.
#
# **Cost.** The forward is $2nkm$ floating-point operations; the backward is two matmuls of
# the same size, $4nkm$. So forward + backward $\approx 3\times$ forward: the "6 N" in the
# usual estimate of $6 \times \text{params} \times \text{tokens}$ training FLOPs (lesson 13).

# %%
n, k, m = 5, 4, 3
A = tinymoe.tensor(rng.normal(size=(n, k)), requires_grad=True)   # [n, k] float64
Bm = tinymoe.tensor(rng.normal(size=(k, m)), requires_grad=True)  # [k, m] float64
G = rng.normal(size=(n, m))                                       # dL/dY, [n, m]
(A @ Bm).backward(G)
print("A.grad shape", A.grad.shape, " B.grad shape", Bm.grad.shape)
assert np.allclose(A.grad, G @ Bm.data.T, rtol=1e-12), "A.grad should be dY @ B^T"
assert np.allclose(Bm.grad, A.data.T @ G, rtol=1e-12), "B.grad should be A^T @ dY"

# Batched: A [b, n, k] @ W [k, m]; W is shared by the batch, so its gradient sums over b.
Ab = tinymoe.tensor(rng.normal(size=(2, n, k)), requires_grad=True)   # [2, n, k]
W = tinymoe.tensor(rng.normal(size=(k, m)), requires_grad=True)       # [k, m]
Gb = rng.normal(size=(2, n, m))
(Ab @ W).backward(Gb)                                                 # [2, n, k] @ [k, m] -> [2, n, m]
expected_W = sum(Ab.data[i].T @ Gb[i] for i in range(2))
assert np.allclose(W.grad, expected_W, rtol=1e-12), "a weight shared over a batch gets the sum of per-sample grads"

# %% [markdown]
# Timing one big matmul forward and backward (float32) shows the 1 : 2 ratio.

# %%
size = 256 if FAST else 768
A32 = tinymoe.tensor(rng.normal(size=(size, size)).astype(np.float32), requires_grad=True)
B32 = tinymoe.tensor(rng.normal(size=(size, size)).astype(np.float32), requires_grad=True)
ones = np.ones((size, size), dtype=np.float32)
t_fwd, t_bwd = [], []
for _ in range(5):
    t0 = time.perf_counter()
    Y = A32 @ B32
    t1 = time.perf_counter()
    Y.backward(ones)
    t2 = time.perf_counter()
    t_fwd.append(t1 - t0)
    t_bwd.append(t2 - t1)
fwd, bwd = np.median(t_fwd), np.median(t_bwd)
print(f"[{size}x{size}] @ [{size}x{size}]: forward {fwd * 1e3:.2f} ms "
      f"({2 * size ** 3 / fwd / 1e9:.1f} GFLOP/s), backward {bwd * 1e3:.2f} ms, ratio {bwd / fwd:.1f}")

# %% [markdown]
# ## 4. Softmax, the stable way
#
# $$\mathrm{softmax}(z)_i = \frac{e^{z_i}}{\sum_j e^{z_j}} = \frac{e^{z_i - c}}{\sum_j e^{z_j - c}}
# \quad\text{for any } c.$$
#
# In float32, $e^{z}$ overflows to `inf` for $z > 88.7$ and `inf / inf = nan`. Choosing
# $c = \max_j z_j$ makes every exponent $\le 0$: no overflow, and the largest term is exactly 1,
# so the sum never underflows to 0 either. Its backward is
# $\bar z = y \odot (\bar y - \langle \bar y, y\rangle)$.

# %%
def naive_softmax(z):          # for comparison only: what NOT to do
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


scales = np.linspace(1, 100, 100 if not FAST else 25)
naive_p, stable_p = [], []
with np.errstate(over="ignore", invalid="ignore"):
    for sc in scales:
        z = np.array([0.0, 0.5, 1.0], dtype=np.float32) * float(sc)   # [3] float32 logits growing with the scale
        naive_p.append(naive_softmax(z)[-1])
        stable_p.append(F.softmax(tinymoe.tensor(z)).numpy()[-1])
naive_p, stable_p = np.array(naive_p), np.array(stable_p)
first_nan = scales[np.isnan(naive_p)][0]
print(f"naive softmax becomes nan from scale {first_nan:.0f} (largest logit {first_nan:.0f}); "
      f"stable softmax never: {np.isfinite(stable_p).all()}")
assert np.isfinite(stable_p).all(), "F.softmax produced a nan or inf: is the max subtracted?"

z = tinymoe.tensor(np.array([1000.0, 1001.0, 1002.0], dtype=np.float32))
p = F.softmax(z)
print("softmax([1000, 1001, 1002]) =", p.numpy(), "= softmax([0, 1, 2]) =", F.softmax(tinymoe.tensor([0.0, 1.0, 2.0])).numpy())
assert np.allclose(p.numpy(), F.softmax(tinymoe.tensor([0.0, 1.0, 2.0])).numpy(), rtol=1e-6), "softmax is shift invariant"

# %% [markdown]
# ## 5. Cross-entropy from logits
#
# For logits $z \in \mathbb R^V$ and target $t$, with $p = \mathrm{softmax}(z)$:
#
# $$\ell = -\log p_t = \underbrace{\log\sum_j e^{z_j}}_{\mathrm{logsumexp}(z)} - z_t,
# \qquad \frac{\partial \ell}{\partial z_j} = p_j - [j = t].$$
#
# Computing $\log p_t$ as `log(softmax(z))` fails when $p_t$ underflows to 0 (`-inf`);
# `logsumexp` with the max subtracted never does. tinymoe's `F.cross_entropy` fuses the two
# steps; with reduction `"mean"` over $N$ tokens the gradient is $(p - \mathrm{onehot}(t))/N$.
# Positions with target `ignore_index` (-100) count neither in the loss nor in $N$.

# %%
N, V = 6, 10
logits = tinymoe.tensor(rng.normal(size=(N, V)).astype(np.float32) * 2, requires_grad=True)   # [N, V]
targets = np.array([3, 0, 9, 9, 2, -100])                                                      # [N]
loss = F.cross_entropy(logits, targets)                                                        # []
loss.backward()

probs = F.softmax(tinymoe.tensor(logits.data)).numpy()                                         # [N, V]
valid = targets != -100
onehot = np.zeros((N, V), dtype=np.float32)
onehot[np.arange(N)[valid], targets[valid]] = 1.0
expected = (probs - onehot) * valid[:, None] / valid.sum()
lse = np.log(np.exp(logits.data - logits.data.max(1, keepdims=True)).sum(1)) + logits.data.max(1)
by_hand = np.mean([lse[i] - logits.data[i, targets[i]] for i in range(N) if valid[i]])
print(f"cross-entropy {loss.item():.6f} (by hand {by_hand:.6f}) over {valid.sum()} counted tokens")
assert abs(loss.item() - by_hand) < 1e-5, "loss is not mean(logsumexp(z) - z_t) over counted tokens"
assert np.allclose(logits.grad, expected, atol=1e-6), (
    "dL/dz should be (softmax - onehot) / N_counted, and 0 on the ignored row; "
    f"max diff {np.abs(logits.grad - expected).max():.2e}")

# log(softmax) underflows; log_softmax does not
big = tinymoe.tensor(np.array([0.0, 200.0], dtype=np.float32))
with np.errstate(divide="ignore"):                 # log(0) is exactly the failure we want to show
    naive_log = F.log(F.softmax(big)).numpy()[0]
print("log(softmax([0, 200]))[0] =", naive_log, "  F.log_softmax:", F.log_softmax(big).numpy()[0])
assert np.isfinite(F.log_softmax(big).numpy()).all(), "log_softmax must stay finite"

# %% [markdown]
# ### The loss of a model that knows nothing
#
# If all logits are equal, $p_j = 1/V$ and $\ell = \ln V$. For tinymoe's byte vocabulary
# ($V = 258$: 256 bytes + BOS + EOS) that is $\ln 258 = 5.55$ nats: the first number you will
# see in the progress bar of lesson 9. A model that only learns byte frequencies reaches the
# *unigram entropy* (about 3 nats on the built-in corpus); anything below uses context.

# %%
V_bytes = 258
uniform = F.cross_entropy(tinymoe.tensor(np.zeros((4, V_bytes), dtype=np.float32)), np.array([0, 1, 2, 3]))
print(f"uniform prediction over {V_bytes} tokens: {uniform.item():.4f} nats = ln {V_bytes} = {math.log(V_bytes):.4f}")
assert abs(uniform.item() - math.log(V_bytes)) < 1e-5, "equal logits must give loss ln V"

# %% [markdown]
# ### Picture: stability, and what the gradient of cross-entropy looks like

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.3))
ax1.plot(scales, np.where(np.isnan(naive_p), np.nan, naive_p), "o", ms=3, label="naive exp(z) / sum exp(z)")
ax1.plot(scales, stable_p, "-", label="stable (subtract max): F.softmax")
nan_at = scales[np.isnan(naive_p)]
ax1.plot(nan_at, np.full(nan_at.shape, 0.55), "rx", ms=5, label="naive result is nan (exp overflowed)")
ax1.axvline(first_nan, color="r", ls=":", label=f"exp(z) = inf for z > 88.7 (here z_max = {first_nan:.0f})")
ax1.set_xlabel("logit scale s   (logits = [0, 0.5 s, s], float32)")
ax1.set_ylabel("probability of the largest logit")
ax1.set_title("softmax in float32: naive overflows, stable does not")
ax1.legend(fontsize=8, loc="center right")

row = 0
xs = np.arange(V)
ax2.bar(xs - 0.2, probs[row], width=0.4, label="softmax p")
ax2.bar(xs + 0.2, probs[row] - onehot[row], width=0.4, label="p - onehot(t)  (= N x dL/dz)")
ax2.axhline(0, color="k", lw=0.8)
ax2.set_xticks(xs)
ax2.set_xlabel(f"vocabulary index (target t = {targets[row]})")
ax2.set_ylabel("value")
ax2.set_title("cross-entropy gradient: push the target up, the rest down")
ax2.legend(fontsize=8)
fig.suptitle("Lesson 2: stable softmax and the cross-entropy gradient")
show(fig, "02_softmax_ce.png")

# %% [markdown]
# ## 6. Against PyTorch (optional)

# %%
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the comparison")
if torch is not None:
    zt = torch.tensor(logits.data, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(targets), ignore_index=-100)
    lt.backward()
    print(f"torch CE {lt.item():.6f} vs tinymoe {loss.item():.6f}; "
          f"max |grad diff| {np.abs(zt.grad.numpy() - logits.grad).max():.1e}")
    assert abs(lt.item() - loss.item()) < 1e-5 and np.allclose(zt.grad.numpy(), logits.grad, atol=1e-6)

# %% [markdown]
# ## Exercises
#
# 1. **Outer product.** For `u` of shape `[n, 1]` and `w` of shape `[1, m]`, `y = u * w` is
#    `[n, m]`. Write $\bar u$ and $\bar w$ as matmuls and check them with tinymoe.
#    *Hint:* $\bar u = \bar Y w^\top$ — a sum over the stretched axis.
# 2. **Label smoothing.** With $q = (1-\epsilon)\,\mathrm{onehot}(t) + \epsilon/V$, the loss
#    $-\sum_j q_j \log p_j$ has gradient $p - q$. Build it from `F.log_softmax` and check the
#    gradient. *Hint:* multiply `F.log_softmax(z)` by a constant array `q` and sum.
# 3. **Temperature.** Plot `F.softmax(z / T)` for $T \in \{0.1, 1, 10\}$. Which limit gives
#    `argmax`, which the uniform distribution? (Lesson 5 uses this to reason about router
#    confidence.)
