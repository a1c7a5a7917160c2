# %% [markdown]
# # Solutions to lesson 6 — capacity and dropping
#
# Each exercise of `lessons/06_capacity.py`, worked and checked.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST, plt, show

from tinymoe import routing


def balanced_logits(G, E):
    """Lesson 6's perfectly balanced router: token n picks n mod E first, n+1 mod E second."""
    z = np.full((G, E), -10.0, dtype=np.float32)             # [G, E]
    n = np.arange(G)
    z[n, n % E] = 2.0
    z[n, (n + 1) % E] = 1.0
    return z

# %% [markdown]
# ## Exercise 1 — OpenMoE-8B and 34B ($E = 32$, $G = 4096$)
#
# $C = \mathrm{round}(\mathrm{cf}\cdot 4096/32) = \mathrm{round}(128\,\mathrm{cf})$: 160 slots in
# training (cf 1.25), 256 in evaluation (cf 2.0). At perfect balance each expert gets
# $kG/E = 256$ assignments, so training drops $1 - 160/256 = 1 - \mathrm{cf}/k = 37.5\%$ and
# evaluation drops nothing: the same fraction as Base, since $1 - \mathrm{cf}/k$ has no $E$ or $G$.

# %%
G, E, k = 4096, 32, 2
for cf, expect_C in ((1.25, 160), (2.0, 256)):
    r = routing.route(balanced_logits(G, E), top_k=k, capacity_factor=cf)
    print(f"cf {cf}: C = {r.capacity}, dropped at perfect balance {r.dropped_fraction:.4f} "
          f"(1 - cf/k = {max(0.0, 1 - cf / k):.4f})")
    assert r.capacity == expect_C == routing.capacity(G, E, k, cf)
    assert abs(r.dropped_fraction - max(0.0, 1 - cf / k)) < 1e-12

# %% [markdown]
# ## Exercise 2 — dropless at balance
#
# Nothing drops when every expert's $kG/E$ assignments fit: $\mathrm{cf}\cdot G/E \ge kG/E$, i.e.
# $\mathrm{cf} \ge k = 2$. That is exactly OpenMoE's evaluation factor 2.0: evaluation is
# dropless **only** at perfect balance; any imbalance drops again.

# %%
G, E = 512, 8
drops = {cf: routing.route(balanced_logits(G, E), 2, cf).dropped_fraction for cf in (1.9, 1.99, 2.0, 2.5)}
print("dropped at perfect balance:", {cf: round(d, 4) for cf, d in drops.items()})
assert drops[2.0] == 0 and drops[2.5] == 0 and drops[1.99] > 0, "cf >= k is the dropless threshold at balance"

# %% [markdown]
# ## Exercise 3 — other priorities
#
# The lesson's random router ($G = 512$, $E = 8$, top-2, cf 1.25), with the three slot
# priorities. Position priority drops the end of each group; probability priority drops the
# least confident assignments wherever they are; random priority spreads the drops evenly over
# the positions. The two cures move the drops off the end of the group (lesson 12).

# %%
Gd, Ed, n_groups = 512, 8, (8 if FAST else 64)
rng = np.random.default_rng(0)
x = rng.normal(size=(n_groups * Gd, 32))
z = (x @ (rng.normal(size=(32, Ed)) * 0.3)).astype(np.float32)          # [N, E]
by_pos, halves, prob_gap = {}, {}, {}
for prio in routing.SLOT_PRIORITIES:
    r = routing.route(z, 2, 1.25, group_size=Gd, priority=prio, rng=np.random.default_rng(0))
    dropped = ~r.kept.reshape(n_groups, Gd, 2)                           # [groups, G, k]
    by_pos[prio] = dropped.mean(axis=(0, 2))                             # [G]
    halves[prio] = (by_pos[prio][: Gd // 2].mean(), by_pos[prio][Gd // 2:].mean())
    p2 = r.topk_prob[:, 1]                                               # second choices' probability
    prob_gap[prio] = float(p2[r.kept[:, 1]].mean() - p2[~r.kept[:, 1]].mean())
    print(f"{prio:>11}: dropped {r.dropped_fraction:.3f}; first half {halves[prio][0]:.3f}, second half "
          f"{halves[prio][1]:.3f}; kept minus dropped 2nd-choice probability {prob_gap[prio]:+.3f}")

fig, ax = plt.subplots(figsize=(7, 4))
window = 16
for prio, ys in by_pos.items():
    ax.plot(np.convolve(ys, np.ones(window) / window, mode="valid"), label=prio)
ax.set_xlabel("token position in the group")
ax.set_ylabel(f"dropped fraction (moving mean over {window})")
ax.set_title("Solution 6.3: where the drops go, by slot priority")
ax.legend()
show(fig, "s06_priorities.png")

assert halves["position"][1] > halves["position"][0] + 0.1, "position priority drops the end of the group"
for prio in ("probability", "random"):
    assert abs(halves[prio][1] - halves[prio][0]) < 0.05, f"{prio} priority should not favour either half"
assert prob_gap["probability"] > prob_gap["random"] + 0.05, \
    "probability priority should drop the least confident second choices"
