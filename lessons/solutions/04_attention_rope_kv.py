# %% [markdown]
# # Solutions to lesson 4 — attention, RoPE, the KV cache
#
# Each exercise of `lessons/04_attention_rope_kv.py`, worked and checked.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST

import tinymoe
from tinymoe import functional as F
from tinymoe.nn.layers import KVCache

rng = np.random.default_rng(0)

# %% [markdown]
# ## Exercise 1 — without the mask
#
# The same q, k, v as the lesson's section 1. Without the mask, query $i$ also averages over
# the keys $j > i$, so every row changes **except the last**: the last query may see every key
# anyway, the mask takes nothing from it.

# %%
T, dh = 8, 16
q = tinymoe.tensor(rng.normal(size=(1, 1, T, dh)).astype(np.float32))   # [B, H, T, dh]
k = tinymoe.tensor(rng.normal(size=(1, 1, T, dh)).astype(np.float32))
v = tinymoe.tensor(rng.normal(size=(1, 1, T, dh)).astype(np.float32))
causal = F.causal_attention(q, k, v).numpy()[0, 0]                       # [T, dh]
full = F.causal_attention(q, k, v, causal=False).numpy()[0, 0]           # [T, dh]
row_change = np.abs(causal - full).max(axis=1)                           # [T]
print("max change per output row:", np.round(row_change, 4))
assert np.all(row_change[:-1] > 1e-3), "every row but the last should change without the mask"
assert row_change[-1] < 1e-6, "the last row sees every key with or without the mask"

# %% [markdown]
# ## Exercise 2 — wavelengths
#
# Pair $i$ turns by $\theta_i = 10^{4\cdot(-2i/d_h)}$ per position; its wavelength is $2\pi/\theta_i$.
# - Positions 5 and 6 differ by one step: pair $i$ moves by the chord $2|\sin(\theta_i/2)|$ on
#   the unit circle. Only the fast pairs move noticeably (we call $> 0.1$ noticeable).
# - Positions 1000 and 2000: a pair tells them apart **unambiguously** only if it has not
#   wrapped around, i.e. its wavelength exceeds 2000; the fast pairs differ too, but they have
#   turned hundreds of times, so the same angle recurs every wavelength.

# %%
dh64 = 64
cos, sin = F.rope_tables(2001, dh64, dtype=np.float64)                  # [L, dh] each
theta = np.arctan2(sin[1, : dh64 // 2], cos[1, : dh64 // 2])            # [dh/2]: angle per position, from the tables
theta_formula = 10_000.0 ** (-np.arange(0, dh64, 2) / dh64)
assert np.allclose(theta, theta_formula), "the tables' per-position angle should be base^(-2i/dh)"
wavelength = 2 * np.pi / theta_formula
print("wavelengths (positions):", np.round(wavelength[[0, 1, 2, 8, 16, 24, 31]], 1), "... (pairs 0, 1, 2, 8, 16, 24, 31)")
near = np.flatnonzero(2 * np.abs(np.sin(theta_formula / 2)) > 0.1)
far = np.flatnonzero(wavelength > 2000)
print(f"5 vs 6: pairs {near.min()}..{near.max()} ({near.size} pairs) move by more than 0.1")
print(f"1000 vs 2000 without wrap-around: pairs {far.min()}..{far.max()} ({far.size} pairs, wavelength > 2000)")
a5, a6 = np.arctan2(sin[5], cos[5]), np.arctan2(sin[6], cos[6])
assert np.all(near == np.arange(near.size)) and np.all(far == np.arange(dh64 // 2 - far.size, dh64 // 2)), \
    "the fast pairs come first and the slow ones last"
assert np.abs(np.angle(np.exp(1j * (a6 - a5)))[: dh64 // 2][far]).max() < 0.01, \
    "the slow pairs barely move between positions 5 and 6"

# %% [markdown]
# ## Exercise 3 — cache memory of OpenMoE-8B
#
# $2\,L\,H\,d_h\,T$ numbers (keys and values, every layer, head, position) $\times$ 4 bytes.
# We check the formula against the bytes of tinymoe's own `KVCache` arrays for one layer.

# %%
L8, H8, dh8, T8 = 24, 24, 128, 2048
per_seq = 2 * L8 * H8 * dh8 * T8 * 4
one_layer = KVCache(1, H8, T8 // 8 if FAST else T8, dh8, "float32")     # [1, H, T, dh] for k and v
layer_bytes = (one_layer.k.nbytes + one_layer.v.nbytes) * (8 if FAST else 1)
print(f"one sequence of {T8}: {per_seq / 2 ** 30:.3f} GiB; batch 32: {32 * per_seq / 2 ** 30:.1f} GiB "
      f"(tinymoe's KVCache: {layer_bytes:,} bytes per layer x {L8} layers)")
assert layer_bytes * L8 == per_seq, "the formula should match the cache's own arrays"
assert per_seq == 1.125 * 2 ** 30, "OpenMoE-8B: 1.125 GiB per 2048-token sequence in float32"
