# %% [markdown]
# # Solutions to lesson 7 — load balancing
#
# Each exercise of `lessons/07_load_balancing.py`, worked and checked. The experiment of the
# lesson (one MoE layer, E = 8, top-2, a mixture of 8 regression tasks) is rebuilt here with
# the shared component $\mu$ and the capacity factor as arguments. Fast mode trains for fewer
# steps; the answers are computed from whatever the runs show.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST, plt, show

import tinymoe
from tinymoe import backend as B
from tinymoe.config import get_preset
from tinymoe.nn.moe import MoE
from tinymoe.optim import AdamW

E, k, d, K = 8, 2, 32, 8
data_rng = np.random.default_rng(1)                          # the lesson's data, same seeds
mu_lesson = data_rng.normal(size=d) * 3.0
centers = data_rng.normal(size=(K, d))
A = data_rng.normal(size=(K, d, 32)) / np.sqrt(d)
Bt = data_rng.normal(size=(K, 32, d)) / np.sqrt(32)
STEPS = 400 if FAST else 800


def make_batch(r, mu, n_tok=256):
    kind = r.integers(0, K, size=n_tok)                                           # [N]
    x = mu + centers[kind] + 0.5 * r.normal(size=(n_tok, d))                      # [N, d]
    h = np.tanh(np.einsum("nd,ndh->nh", x, A[kind]))                              # [N, 32]
    y = np.einsum("nh,nhd->nd", h, Bt[kind])                                      # [N, d]
    return x[None].astype(np.float32), y[None].astype(np.float32)


def train(aux_coef, mu=mu_lesson, capacity_factor=None, steps=STEPS, seed=0, lr=3e-3):
    """Lesson 7's run: returns final experts used, L_aux, dropped fraction, task MSE (last 50 steps)."""
    cfg = get_preset("toy", d_model=d, n_experts=E, top_k=k, d_ff=16, capacity_factor=capacity_factor)
    moe = MoE(cfg, rng=B.default_rng(seed))
    opt = AdamW(moe.parameters(), lr=lr, weight_decay=0.0)
    r = np.random.default_rng(2)
    mse_hist, st = [], None
    for _ in range(steps):
        x, y = make_batch(r, mu)
        out, aux, zl, st = moe(tinymoe.tensor(x))
        mse = ((out - y) ** 2).mean()
        opt.zero_grad()
        (mse + aux * aux_coef).backward()
        opt.step()
        mse_hist.append(mse.item())
    load = B.to_numpy(st.load_before)
    return {"used": int((load / load.sum() > 0.02).sum()), "aux": st.aux_loss,
            "dropped": st.dropped_fraction, "mse": float(np.mean(mse_hist[-50:]))}

# %% [markdown]
# ## Exercise 1 — why does it collapse?
#
# The "no aux" run with the lesson's $\mu$ and with $\mu = 0$.

# %%
with_mu = train(0.0)
no_mu = train(0.0, mu=np.zeros(d))
for name, r in (("mu as in the lesson", with_mu), ("mu = 0", no_mu)):
    print(f"no aux, {name:>19}: {r['used']} experts used, L_aux {r['aux']:.2f}, task MSE {r['mse']:.4f}")
verdict = ("does not collapse" if no_mu["used"] > with_mu["used"] + 2 else "still collapses")
print(f"without the shared component the router {verdict}: {no_mu['used']} experts used vs {with_mu['used']}")
gaps = [np.linalg.norm(centers[i] - centers[j]) for i in range(K) for j in range(i + 1, K)]
print(f"|mu| = {np.linalg.norm(mu_lesson):.1f}; distance between two kinds' centres {min(gaps):.1f}..{max(gaps):.1f}")

# %% [markdown]
# With $\mu$, every token's logits share the term $\mu W_r$, and $|\mu|$ is larger than the
# distances between the kinds of input (printed above), so one gradient step on $W_r$ that favours an expert
# favours it for **all** tokens: the rich get richer. With $\mu = 0$ the logits are driven by
# the kind-specific parts, which point in different directions, so different tokens prefer
# different experts. The printed line above says what this run did; the check:

# %%
assert with_mu["used"] <= 3, "with the shared component the no-aux router should collapse"
assert no_mu["used"] > with_mu["used"], "without the shared component the router should use more experts"

# %% [markdown]
# ## Exercise 2 — how strong?
#
# The aux loss from the start with $c_{aux} \in \{10^{-3}, 10^{-2}, 10^{-1}, 1\}$.

# %%
coefs = (1e-3, 1e-2, 1e-1, 1.0)
sweep = {c: train(c) for c in coefs}
for c, r in sweep.items():
    print(f"c_aux {c:g}: {r['used']} experts used, L_aux {r['aux']:.3f}, task MSE {r['mse']:.4f}")
best = min(sweep, key=lambda c: sweep[c]["mse"])
print(f"lowest task MSE at c_aux = {best:g}")
fig, ax1 = plt.subplots(figsize=(7, 4))
ax1.semilogx(coefs, [sweep[c]["mse"] for c in coefs], "o-", label="task MSE (last 50 steps)")
ax1.set_xlabel("c_aux")
ax1.set_ylabel("task MSE")
ax2 = ax1.twinx()
ax2.semilogx(coefs, [sweep[c]["aux"] for c in coefs], "s--", color="C1", label="final L_aux")
ax2.set_ylabel("L_aux (k = 2 is perfect balance)")
ax1.set_title("Solution 7.2: balance against task loss")
fig.legend(loc="upper center", fontsize=8)
show(fig, "s07_aux_strength.png")

# %% [markdown]
# Balancing helps while the router is collapsed; once $L_{aux}$ is near its minimum $k$, a
# larger weight buys no more balance and only pulls the router away from the choices that fit
# the task. Where that starts is read off the sweep:

# %%
spread = min(c for c in coefs if sweep[c]["used"] >= E - 1)
print(f"smallest weight that spreads the load over >= {E - 1} experts: {spread:g}; lowest task MSE at {best:g}; "
      f"task MSE at c_aux = 1 is {sweep[1.0]['mse'] / sweep[best]['mse']:.2f}x the best")
assert all(sweep[c]["aux"] < 2.6 for c in coefs if c >= 1e-2), "c_aux >= 0.01 should keep the load balanced"
assert sweep[1.0]["aux"] <= sweep[1e-3]["aux"] + 1e-6, "a stronger aux loss should not balance worse"

# %% [markdown]
# ## Exercise 3 — capacity as a balancer
#
# No aux loss, capacity factor 1.25: is the router still collapsed, and what happens to the
# drops and the task loss?

# %%
cap = train(0.0, capacity_factor=1.25)
print(f"no aux, cf 1.25: {cap['used']} experts chosen, L_aux {cap['aux']:.2f}, dropped {cap['dropped']:.1%}, "
      f"task MSE {cap['mse']:.4f} (dropless: {with_mu['used']} experts, MSE {with_mu['mse']:.4f})")
answer = (f"the router still collapses onto {cap['used']} experts and {cap['dropped']:.0%} of the assignments "
          f"are dropped; the task MSE is {cap['mse'] / with_mu['mse']:.1f}x the dropless collapse's"
          if cap["used"] <= 3 else f"the drops keep {cap['used']} experts in use")
print(f"answer from this run: {answer}")

# %% [markdown]
# Capacity does not change *which* experts the router prefers, only how many assignments the
# preferred ones may keep (and $L_{aux}$ counts choices before capacity). A collapsed router
# with cf 1.25 keeps $C = 1.25\,G/E$ slots on each of its two experts out of $2G$ choices, so
# about $1 - 2\cdot1.25/(2E) = 84\%$ of the assignments are dropped, and those tokens get no
# expert at all.

# %%
if cap["used"] <= 2:
    assert cap["dropped"] > 0.8, "a collapse onto 2 experts at cf 1.25 should drop about 84 % of the assignments"
assert cap["dropped"] > 0.375, "a collapsed or unbalanced router drops more than at perfect balance (1 - cf/k)"
