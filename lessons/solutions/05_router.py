# %% [markdown]
# # Solutions to lesson 5 — the router
#
# Each exercise of `lessons/05_router.py`, worked and checked. The layer is rebuilt exactly
# as in the lesson (same seeds), so the numbers match the lesson's.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST

import tinymoe
from tinymoe import backend as B
from tinymoe.config import get_preset
from tinymoe.nn.moe import MoE


def lesson_layer(**overrides):
    """Lesson 5's layer, input and target (same seeds); ``overrides`` go to the preset."""
    cfg = get_preset("toy", **{**dict(d_model=16, n_experts=4, top_k=2, d_ff=32, capacity_factor=None,
                                      init_std=0.25), **overrides})
    rng = B.default_rng(0)
    moe = MoE(cfg, rng=rng)
    moe.router.weight.data[...] = rng.normal(0.0, 0.6, size=moe.router.weight.shape)   # [d, E]
    x = tinymoe.tensor(rng.normal(size=(1, 12, cfg.d_model)).astype(np.float32))        # [1, T, d]
    target = rng.normal(size=(1, 12, cfg.d_model)).astype(np.float32)
    return cfg, moe, x, target


def router_grad(moe, x, target):
    """Size of dL/dW_router (sum of |entries|) for the lesson's regression loss, and the stats."""
    moe.zero_grad()
    y, _, _, st = moe(x)
    ((y - target) ** 2).mean().backward()
    return float(np.abs(moe.router.weight.grad).sum()), st

# %% [markdown]
# ## Exercise 1 — Mixtral weights
#
# With `renormalize=True` the combine weights of token $n$ are $p_{e_j}/(p_{e_1}+p_{e_2})$, the
# same experts and the same expert outputs, so
# $y^{\text{Mixtral}}_n = y^{\text{OpenMoE}}_n / (p_{e_1}+p_{e_2})$.

# %%
cfg, moe, x, target = lesson_layer()
cfg2 = cfg.replace(renormalize=True)
moe2 = MoE(cfg2, rng=B.default_rng(5))
moe2.load_state_dict(moe.state_dict())
with tinymoe.no_grad():
    y1, _, _, st1 = moe(x)
    y2, _, _, st2 = moe2(x)
n = 1
total = float(st1.combine_weight[n].sum())
print(f"token {n}: p_e1 + p_e2 = {total:.4f}; Mixtral weights {st2.combine_weight[n]} (sum {st2.combine_weight[n].sum():.4f})")
err = np.abs(y2.numpy()[0, n] - y1.numpy()[0, n] / total).max() / np.abs(y2.numpy()[0, n]).max()
print(f"|y_Mixtral - y_OpenMoE / (p_e1 + p_e2)| relative: {err:.1e}")
assert err < 1e-5, "the renormalised output should be the OpenMoE output divided by p_e1 + p_e2"

# %% [markdown]
# ## Exercise 2 — Switch routing, $k = 1$
#
# A token now runs 1 of the $E$ experts: $1/E$ of the expert parameters. The output is
# $p_e\,\mathrm{FFN}_e(x)$ and the router learns through $\partial p_e/\partial z_j =
# p_e([j=e] - p_j)$; in particular $\partial p_e/\partial z_e = p_e(1-p_e) \to 0$ as $p_e \to 1$:
# a token that is already sure of its expert hardly moves the router. Measured on the same
# layer with $k = 1$, at the lesson's router scale and 10 times larger:

# %%
cfg1, moe1, x1, target1 = lesson_layer(top_k=1)
print(f"k = 1: a token uses {cfg1.top_k} of {cfg1.n_experts} experts = {cfg1.top_k / cfg1.n_experts:.0%} of the expert parameters")
W0 = moe1.router.weight.data.copy()
sizes = {}
for scale in (1.0, 10.0):
    moe1.router.weight.data[...] = W0 * scale
    g, st = router_grad(moe1, x1, target1)
    slope = float((st.topk_prob[:, 0] * (1 - st.topk_prob[:, 0])).mean())
    sizes[scale] = g
    print(f"router x{scale:g}: confidence {st.confidence:.3f}, mean p_e(1 - p_e) {slope:.4f}, |dL/dW_router| {g:.4f}")
assert sizes[10.0] < sizes[1.0], "the more confident router should get the smaller gradient"

# %% [markdown]
# ## Exercise 3 — router temperature
#
# Scale the lesson's router weights by 10, 1 and 0.1, and draw them at the initialisation
# scale (std 0.02).

# %%
cfg, moe, x, target = lesson_layer()
W0 = moe.router.weight.data.copy()
rows = {}
for label, W in (("x10", W0 * 10), ("x1", W0), ("x0.1", W0 * 0.1),
                 ("init std 0.02", np.random.default_rng(7).normal(0, 0.02, W0.shape).astype(np.float32))):
    moe.router.weight.data[...] = W
    g, st = router_grad(moe, x, target)
    rows[label] = (st.confidence, g)
    print(f"router {label:>14}: confidence {st.confidence:.3f}, |dL/dW_router| = {g:.3f}")
slowest = min(rows, key=lambda r: rows[r][1])
print(f"smallest router gradient: {slowest} (confidence {rows[slowest][0]:.3f})")

# %% [markdown]
# The numbers answer it: the **saturated** router (x10, confidence near 1) gets by far the
# smallest gradient, while the near-uniform ones (x0.1, initialisation) get gradients as large
# as the lesson's router. Near uniform, $p_e(1-p_e) \approx \frac1E(1-\frac1E)$ is not small;
# saturated, $p_e(1-p_e) \to 0$ for the chosen expert and $p_j \to 0$ for the others, so the
# softmax passes almost nothing back. So the premise "near-uniform routers learn slowly" does
# not hold for the gradient; the saturated router is the slow one (asserted below).

# %%
assert slowest == "x10" and rows["x10"][0] > 0.95, "the saturated router should learn slowest"
assert min(rows["x0.1"][1], rows["init std 0.02"][1]) > 10 * rows["x10"][1], \
    "near-uniform routers should get far larger gradients than the saturated one"
