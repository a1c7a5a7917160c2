# %% [markdown]
# # Lesson 4 — Attention with RoPE and a causal mask; the KV cache
#
# **What you will learn**
# - scaled dot-product attention with several heads, and the **causal mask** that makes a
#   language model unable to look at the future (checked by perturbing future tokens);
# - **rotary position embeddings (RoPE)**: rotate pairs of query/key coordinates by an angle
#   proportional to the position, so that the score $q_m\cdot k_n$ depends only on $n - m$;
# - the **KV cache**: why generating token by token needs only the new token's query, and how
#   much time and memory that costs.

# %%
import time

import numpy as np

from _lesson import FAST, plt, show

import tinymoe
from tinymoe import backend as B
from tinymoe import functional as F
from tinymoe.nn import Attention

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Attention, one head
#
# For queries $Q \in \mathbb R^{T\times d_h}$, keys $K \in \mathbb R^{S\times d_h}$ and values
# $V \in \mathbb R^{S\times d_h}$ (Vaswani et al. 2017, eq. 1):
#
# $$\mathrm{Attn}(Q,K,V) = \mathrm{softmax}\Big(\frac{QK^\top}{\sqrt{d_h}} + M\Big) V,\qquad
# M_{ij} = \begin{cases}0 & j \le i\\ -\infty & j > i\end{cases}$$
#
# Row $i$ of the softmax is a probability distribution over the positions $j \le i$: position
# $i$ outputs a weighted average of the values it may see. With $H$ heads, the model width $d$
# is cut into $H$ slices of $d_h = d/H$ and each head attends on its own.
#
# `F.causal_attention(q, k, v)` is one fused operation (scores, mask, softmax, weighted sum and
# a hand-written backward). To *look* at the attention pattern we also compute the weights
# step by step and check that both agree.

# %%
T, dh = 8, 16
q = tinymoe.tensor(rng.normal(size=(1, 1, T, dh)).astype(np.float32))   # [B, H, T, dh]
k = tinymoe.tensor(rng.normal(size=(1, 1, T, dh)).astype(np.float32))   # [B, H, T, dh]
v = tinymoe.tensor(rng.normal(size=(1, 1, T, dh)).astype(np.float32))   # [B, H, T, dh]

fused = F.causal_attention(q, k, v)                                     # [1, 1, T, dh]
scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / dh ** 0.5)              # [1, 1, T, dh] @ [1, 1, dh, T] -> [1, 1, T, T]
mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)         # [T, T]: -inf above the diagonal
P = F.softmax(scores + mask, axis=-1)                                   # [1, 1, T, T]
by_hand = P @ v                                                         # [1, 1, T, dh]
Pn = P.numpy()[0, 0]
print("attention weights (row i: what position i looks at):\n", np.round(Pn, 2))
assert np.allclose(Pn.sum(1), 1, atol=1e-6), "each row of the attention weights must sum to 1"
assert np.all(Pn[np.triu_indices(T, 1)] == 0), "the causal mask must give weight 0 to future positions"
assert np.allclose(fused.numpy(), by_hand.numpy(), atol=1e-5), "F.causal_attention disagrees with softmax(QK^T/sqrt(dh) + M) V"

# %% [markdown]
# ## 2. The `Attention` layer, and a causality test
#
# `tinymoe.nn.Attention` projects $x$ to $q, k, v$ (`[B, T, d] -> [B, H, T, d_h]`), rotates $q$
# and $k$ with RoPE, attends causally and projects back with $W_o$. If the mask works, changing
# the tokens after position $t$ cannot change any output at positions $\le t$.

# %%
d_model, heads, max_len = 64, 4, 512
attn = Attention(d_model, heads, max_seq_len=max_len, rng=B.default_rng(0), init_std=0.1)
print(attn)
x = rng.normal(size=(1, 16, d_model)).astype(np.float32)                # [B, T, d]
t = 9
x_changed = x.copy()
x_changed[:, t + 1:] = rng.normal(size=x_changed[:, t + 1:].shape)       # new future tokens
with tinymoe.no_grad():
    y1 = attn(tinymoe.tensor(x)).numpy()                                 # [1, 16, d]
    y2 = attn(tinymoe.tensor(x_changed)).numpy()
past = np.abs(y1[:, :t + 1] - y2[:, :t + 1]).max()
future = np.abs(y1[:, t + 1:] - y2[:, t + 1:]).max()
print(f"max change at positions <= {t}: {past:.1e};  after {t}: {future:.2f}")
assert past == 0.0, f"outputs at positions <= {t} changed by {past:.1e} when only later tokens changed: the mask leaks"
assert future > 0, "changing the future tokens should change their own outputs"

# %% [markdown]
# ## 3. Rotary position embeddings
#
# Attention itself is blind to order: permuting the keys permutes nothing in the weighted sum.
# RoPE (Su et al. 2021) injects position by **rotating** each pair of coordinates
# $(x_i, x_{i+d_h/2})$ of $q$ and $k$ at position $p$ by the angle $p\,\theta_i$, with
# $\theta_i = 10000^{-2i/d_h}$ (fast-turning pairs first, slow ones last):
#
# $$\begin{pmatrix} y_i \\ y_{i+d_h/2}\end{pmatrix} =
# \begin{pmatrix}\cos p\theta_i & -\sin p\theta_i\\ \sin p\theta_i & \cos p\theta_i\end{pmatrix}
# \begin{pmatrix} x_i \\ x_{i+d_h/2}\end{pmatrix}.$$
#
# Rotations compose, and $R_m^\top R_n = R_{n-m}$, so
# $\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle$: **the score depends only on the
# distance $n - m$**. We check it: put the same $q$ at every position and the same $k$ at every
# position; the score matrix $S_{mn}$ must be constant along each diagonal.

# %%
L_rope = 64
cos, sin = F.rope_tables(L_rope, dh, dtype=np.float64)                   # [L, dh] each
q1 = rng.normal(size=dh)
k1 = rng.normal(size=dh)
Qr = F.rope(tinymoe.tensor(np.tile(q1, (L_rope, 1))), cos, sin).numpy()  # [L, dh]: q rotated to positions 0..L-1
Kr = F.rope(tinymoe.tensor(np.tile(k1, (L_rope, 1))), cos, sin).numpy()  # [L, dh]
S = Qr @ Kr.T                                                            # [L, L]: S[m, n] = <R_m q, R_n k>
diag_spread = max(np.ptp(np.diagonal(S, off)) for off in range(-L_rope + 1, L_rope))
print(f"largest spread along a diagonal of S: {diag_spread:.1e} (0 = depends only on n - m)")
assert diag_spread < 1e-10, "RoPE scores must depend only on the offset n - m"
assert np.allclose(np.linalg.norm(Qr, axis=1), np.linalg.norm(q1)), "a rotation must not change the vector's length"

# %% [markdown]
# ### Picture: RoPE's relative scores, and a causal attention pattern

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
im = axes[0].imshow(S, cmap="RdBu_r")
axes[0].set_xlabel("key position n")
axes[0].set_ylabel("query position m")
axes[0].set_title("RoPE: score <R_m q, R_n k> (constant on diagonals)")
fig.colorbar(im, ax=axes[0], fraction=0.046)

offsets = np.arange(0, L_rope)
axes[1].plot(offsets, [S[0, o] for o in offsets], label="query at position 0")
axes[1].plot(offsets[: L_rope - 20], [S[20, 20 + o] for o in offsets[: L_rope - 20]], "--", label="query at position 20")
axes[1].set_xlabel("distance n - m")
axes[1].set_ylabel("score")
axes[1].set_title("score vs distance n - m (curves coincide)")
axes[1].legend(fontsize=8)

im2 = axes[2].imshow(Pn, cmap="viridis", vmin=0, vmax=1)
axes[2].set_xlabel("key position j")
axes[2].set_ylabel("query position i")
axes[2].set_title("causal attention weights (zero above the diagonal)")
fig.colorbar(im2, ax=axes[2], fraction=0.046, label="weight")
fig.suptitle("Lesson 4: rotary position embeddings and the causal mask", y=1.03)
show(fig, "04_rope_attention.png")

# %% [markdown]
# ## 4. Generating with a KV cache
#
# A language model generates one token at a time. At step $t$ only the **new** position needs a
# query, but it attends to the keys and values of all earlier positions. Those do not change
# (causality!), so we keep them in a **KV cache** `[B, H, max_len, d_h]` and append one row per
# step. Without a cache, step $t$ recomputes the projections of all $t$ positions and a
# $t\times t$ score matrix. RoPE keys are cached *after* rotation, and the new query is rotated
# to its absolute position `offset = cache.length`.
#
# The cache is for inference only (use it under `tinymoe.no_grad()`); the outputs must equal the
# matching rows of one full forward pass.

# %%
T_gen = 24
xs = rng.normal(size=(1, T_gen, d_model)).astype(np.float32)             # [1, T, d]
with tinymoe.no_grad():
    full = attn(tinymoe.tensor(xs)).numpy()                              # [1, T, d] all at once
    cache = attn.new_cache(batch=1, max_len=T_gen)
    steps = [attn(tinymoe.tensor(xs[:, i:i + 1]), cache=cache).numpy()   # [1, 1, d] per step
             for i in range(T_gen)]
stepwise = np.concatenate(steps, axis=1)                                 # [1, T, d]
print(cache, f"; max |stepwise - full| = {np.abs(stepwise - full).max():.1e}")
assert np.allclose(stepwise, full, atol=1e-5), (
    "token-by-token outputs with the KV cache must equal the full forward: check the RoPE offset")

# %% [markdown]
# Time per generated token, with and without the cache (a wider layer so that the arithmetic,
# not Python, dominates). Without the cache the cost of a step grows with the prefix length;
# with it, it stays almost flat (the attention over the cache grows linearly, but the
# projections are done once).

# %%
big = Attention(256, 8, max_seq_len=1024, rng=B.default_rng(1))
T_time = 128 if FAST else 512
xb = rng.normal(size=(1, T_time + 1, 256)).astype(np.float32)
positions = np.linspace(8, T_time, 6 if FAST else 12).astype(int)
t_nocache, t_cache = [], []


def best_of(fn, repeats=5):
    """The fastest of a few runs: the least disturbed by other programs on the machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


with tinymoe.no_grad():
    for p in positions:
        t_nocache.append(best_of(lambda: big(tinymoe.tensor(xb[:, : p + 1]))))   # recompute the prefix
        caches = [big.new_cache(1, T_time + 1) for _ in range(5)]
        for c in caches:
            big(tinymoe.tensor(xb[:, :p]), cache=c)                             # prefill p positions (not timed)
        it = iter(caches)
        t_cache.append(best_of(lambda: big(tinymoe.tensor(xb[:, p:p + 1]), cache=next(it))))  # one new position
print(f"at position {positions[-1]}: {t_nocache[-1] * 1e3:.2f} ms without cache, "
      f"{t_cache[-1] * 1e3:.2f} ms with cache")

L_cfg, H_cfg, dh_cfg, T_cfg = 12, 12, 64, 2048                          # OpenMoE-Base
kv_bytes = 2 * L_cfg * H_cfg * dh_cfg * T_cfg * 4
print(f"KV cache of OpenMoE-Base for one 2048-token sequence in float32: "
      f"2 x {L_cfg} layers x {H_cfg} heads x {dh_cfg} x {T_cfg} x 4 bytes = {kv_bytes / 2 ** 20:.0f} MiB")

fig, ax = plt.subplots(figsize=(7, 4.3))
ax.plot(positions, np.array(t_nocache) * 1e3, "o-", label="no cache: forward over the whole prefix")
ax.plot(positions, np.array(t_cache) * 1e3, "s-", label="KV cache: forward over the new token only")
ax.set_xlabel("position of the generated token (prefix length)")
ax.set_ylabel("time per step, ms (best of 5 runs)")
ax.set_title("Lesson 4: one attention layer (d=256, 8 heads), time per generated token")
ax.legend(fontsize=8)
show(fig, "04_kv_cache_time.png")
assert t_cache[-1] < t_nocache[-1], "with a long prefix the cached step should be faster"

# %% [markdown]
# ## 5. Against PyTorch (optional)

# %%
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the comparison")
if torch is not None:
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(q.numpy()), torch.tensor(k.numpy()), torch.tensor(v.numpy()), is_causal=True)
    diff = np.abs(ref.numpy() - fused.numpy()).max()
    print(f"torch scaled_dot_product_attention vs F.causal_attention: max diff {diff:.1e}")
    assert diff < 1e-5

# %% [markdown]
# ## Exercises
#
# 1. **Without the mask.** In section 1, compute `F.causal_attention(q, k, v, causal=False)` and
#    compare it with `fused`. Which output rows change, and why is the last row the same?
#    *Hint:* the last query is allowed to see every key anyway.
# 2. **Wavelengths.** The pair $i$ turns by $\theta_i$ per position: its wavelength is
#    $2\pi/\theta_i$ positions. Print them for $d_h = 64$ and base $10^4$. Which pairs can tell
#    position 5 from 6, and which position 1000 from 2000? *Hint:* `F.rope_tables` gives cos/sin.
# 3. **Cache memory.** OpenMoE-8B has 24 layers and 24 heads of 128. How much memory does the KV
#    cache of one 2048-token sequence take in float32? At batch 32? *Hint:* $2LHd_hT$ numbers.
