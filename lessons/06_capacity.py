# %% [markdown]
# # Lesson 6 — Capacity and dropping: slots, the capacity factor, k-major position priority
#
# **What you will learn**
# - why an expert has a fixed number of *slots* $C$ (its capacity) per group of tokens, and
#   how OpenMoE computes it: $C = \max(\mathrm{round}(\mathrm{cf}\cdot G/E),\ 4)$, rounded to
#   the nearest integer with ties to even;
# - in which order assignments take slots: **all first choices in token order, then all
#   second choices** (k-major position priority), what a *dropped* assignment means, and the
#   slot rule `cumsum(one_hot) - 1` written by hand;
# - why the OpenMoE formula, which has no factor $k$, drops **37.5 % of assignments even when
#   the load is perfectly balanced** (top-2, cf 1.25), and that every one of them is a second
#   choice near the end of the group;
# - how drops depend on the capacity factor, on balance, and on the formula
#   (OpenMoE vs the $k$-scaled DeepSpeed/Tutel form).

# %%
import numpy as np

from _lesson import FAST, plt, show

import tinymoe
from tinymoe import backend as B
from tinymoe import routing
from tinymoe.config import get_preset
from tinymoe.nn.moe import MoE

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Why capacity
#
# Each expert gets a buffer of `C` rows per group (lesson 5). Fixed shapes are what
# accelerators (and OpenMoE's TPU/XLA code) want, and they bound each expert's work.
# Tokens are cut into **groups** of $G$ contiguous tokens (OpenMoE: 4096; tinymoe's default:
# one sequence); each expert has $C$ slots per group:
#
# | formula | $C$ | used by |
# |---|---|---|
# | `"openmoe"` | $\max(\mathrm{round}(\mathrm{cf}\cdot G/E),\ c_{\min})$ | flaxformer / OpenMoE (no $k$!) |
# | `"k_scaled"` | $\max(\lceil k\cdot\mathrm{cf}\cdot G/E\rceil,\ c_{\min})$ | DeepSpeed, Tutel |
#
# with cf = 1.25 in training and 2.0 in evaluation, $c_{\min} = 4$. `cf = None` (or 0) means
# dropless: $C = G$.

# %%
G, E, k = 4096, 16, 2                                          # OpenMoE-Base
for mode in routing.CAPACITY_MODES:
    for cf in (1.25, 2.0):
        C = routing.capacity(G, E, k, cf, mode=mode)
        print(f"{mode:>9}, cf {cf:4}: C = {C:4d} slots per expert; E*C = {E * C:5d} slots "
              f"for k*G = {k * G} assignments")
C_base = routing.capacity(G, E, k, 1.25)
assert C_base == 320, f"OpenMoE-Base capacity should be round(1.25*4096/16) = 320, got {C_base}"

# %% [markdown]
# For OpenMoE-Base $\mathrm{cf}\cdot G/E$ is a whole number, so the rounding never shows. It
# does for other sizes, e.g. $G = 52$, $E = 4$: $1.25\cdot 52/4 = 16.25$. Python's `round`
# (which flaxformer's `int(round(...))` uses) goes to the **nearest** integer, and a tie
# $x.5$ goes to the **even** neighbour: `round(2.5) = 2`, `round(3.5) = 4`. (Small cases use
# `min_capacity=1` so that the floor of 4 slots does not hide the rounding.)

# %%
import math

print(f"{'G':>4} {'E':>3} {'cf':>5} {'cf*G/E':>8} {'round':>6} {'ceil':>5} {'floor':>6}  routing.capacity")
for Gr, Er, cfr in ((52, 4, 1.25), (44, 8, 1.25), (20, 4, 0.5), (28, 4, 0.5)):
    exact = cfr * Gr / Er
    by_hand = round(exact)                                      # nearest, ties to even
    C_lib = routing.capacity(Gr, Er, 2, cfr, min_capacity=1)
    print(f"{Gr:>4} {Er:>3} {cfr:>5} {exact:>8} {by_hand:>6} {math.ceil(exact):>5} {math.floor(exact):>6}  {C_lib}")
    assert C_lib == by_hand, (f"capacity(G={Gr}, E={Er}, cf={cfr}) = {C_lib}, but round({exact}) = {by_hand}: "
                              "the OpenMoE formula rounds cf*G/E to the nearest integer (ties to even), "
                              "not up and not down")

# %% [markdown]
# Already visible: with the `openmoe` formula and cf 1.25 there are $E\cdot C = 5120$ slots
# for $kG = 8192$ assignments. At least $1 - 5120/8192 = 37.5\%$ of the assignments cannot be
# served, however well balanced the router is.
#
# ## 2. The order in which slots are taken
#
# The $kG$ assignments of a group are queued in a *priority order*; each takes the next free
# slot of its expert; once an expert's $C$ slots are full, later assignments to it are
# **dropped** (combine weight 0: the expert does not see the token). OpenMoE's order is
# *k-major by position*:
#
# $$(\text{token }0, 1^{\text{st}}),\ (\text{token }1, 1^{\text{st}}),\ \dots,\ (\text{token }G{-}1, 1^{\text{st}}),\ 
# (\text{token }0, 2^{\text{nd}}),\ \dots,\ (\text{token }G{-}1, 2^{\text{nd}}).$$
#
# In code (flaxformer) this is `slot = cumsum(one_hot(expert)) - 1` over that sequence.
# A small example: 12 tokens, 4 experts, top-2, cf 1.25, so $C = \max(\mathrm{round}(3.75), 4) = 4$.
# The router prefers expert 0 a little, so expert 0 overflows.

# %%
G_small, E_small = 12, 4
logits = rng.normal(size=(G_small, E_small)).astype(np.float32)       # [G, E]
logits[:, 0] += 1.0                                                   # a router that likes expert 0
res = routing.route(logits, top_k=2, capacity_factor=1.25)            # capacity applied
queue = routing.route(logits, top_k=2, capacity_factor=None)          # dropless: slot = place in the queue
C_small = res.capacity
print(f"C = {C_small}; load before capacity {res.load_before}, after {res.load_after}; "
      f"dropped {res.dropped_fraction:.1%}")
print("expert of each choice (rows: 1st, 2nd):\n", res.expert_index.T)
print("slot (-1 = dropped):\n", res.slot.T)

fig, ax = plt.subplots(figsize=(12, 3.8))
for n in range(G_small):
    for rank in range(2):
        e, s = int(queue.expert_index[n, rank]), int(queue.slot[n, rank])
        kept = bool(res.kept[n, rank])
        ax.add_patch(plt.Rectangle((s - 0.45, e - 0.4), 0.9, 0.8, fc="C0" if rank == 0 else "C1",
                                   alpha=1.0 if kept else 0.25, ec="r" if not kept else "k",
                                   lw=2 if not kept else 0.8, ls="--" if not kept else "-"))
        ax.text(s, e, f"t{n}\n{'1st' if rank == 0 else '2nd'}", ha="center", va="center", fontsize=7)
ax.axvline(C_small - 0.5, color="r", lw=2)
ax.text(C_small - 0.4, E_small - 0.45, f"capacity C = {C_small}: slots to the right are dropped",
        color="r", fontsize=9, va="center")
ax.set_xlim(-0.6, int(queue.slot.max()) + 0.6)
ax.set_ylim(-0.6, E_small - 0.2)
ax.set_xticks(range(int(queue.slot.max()) + 1))
ax.set_yticks(range(E_small))
ax.set_xlabel("slot in the expert's buffer (= place in its queue)")
ax.set_ylabel("expert")
ax.set_title("Lesson 6: k-major position priority — first choices (blue) in token order, then second choices (orange)")
ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, fc="C0", ec="k", label="1st choice, kept"),
                   plt.Rectangle((0, 0), 1, 1, fc="C1", ec="k", label="2nd choice, kept"),
                   plt.Rectangle((0, 0), 1, 1, fc="C1", alpha=0.25, ec="r", ls="--", label="dropped (pale, dashed red edge)")],
          loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
show(fig, "06_slots.png")

# %% [markdown]
# Self-checks on the rules: no expert holds more than $C$ assignments; a dropped assignment has
# combine weight 0; and at any expert, if some first choice was dropped, no second choice was
# kept there (all first choices come first).

# %%
def check_routing_rules(r):
    ng, Cap = r.n_groups, r.capacity
    assert np.all(r.load_after <= ng * Cap), f"an expert holds {r.load_after.max()} > {ng} x C={Cap} assignments"
    assert np.all(r.combine_weight[~r.kept] == 0), "a dropped assignment still has a nonzero combine weight"
    idx = r.expert_index.reshape(ng, r.group_size, -1)           # [groups, G, k]
    kept = r.kept.reshape(ng, r.group_size, -1)                  # [groups, G, k]
    for g in range(ng):                                          # the queue is per group
        for e in range(r.n_experts):
            first_dropped = np.any((idx[g, :, 0] == e) & ~kept[g, :, 0])
            second_kept = np.any((idx[g, :, 1] == e) & kept[g, :, 1])
            assert not (first_dropped and second_kept), (
                f"group {g}, expert {e}: a first choice was dropped but a second choice kept; "
                "the queue must be k-major (all first choices before any second choice)")


check_routing_rules(res)

# %% [markdown]
# ### The slots, by hand
#
# The whole rule is one line of NumPy: line the $kG$ assignments up in the k-major queue
# (rank 0 of every token, then rank 1 ...), one-hot their experts, and take the running count:
# `slot = cumsum(one_hot) - 1` at each assignment's own expert. Drop where `slot >= C`.

# %%
def slots_by_hand(expert_index, C, n_experts):
    """expert_index [G, k] of one group -> slot [G, k] (-1 = dropped), k-major position priority."""
    Gq, kq = expert_index.shape
    queue = expert_index.T.reshape(-1)                          # [k*G]: all 1st choices in token order, then 2nd
    one_hot = np.eye(n_experts, dtype=np.int64)[queue]          # [k*G, E]
    running = np.cumsum(one_hot, axis=0) - 1                    # [k*G, E]: earlier assignments to each expert
    slot = running[np.arange(kq * Gq), queue].reshape(kq, Gq).T  # [G, k], back to token order
    return np.where(slot < C, slot, -1)


mine = slots_by_hand(res.expert_index, res.capacity, E_small)
print("slots by hand:\n", mine.T)
assert np.array_equal(mine, res.slot), (
    "your cumsum(one_hot) - 1 slots differ from tinymoe's: the queue must be k-major "
    "(all first choices in token order before any second choice)")

# %% [markdown]
# ## 3. Perfect balance still drops 37.5 %
#
# Build a router whose choices are *perfectly balanced*: token $n$ picks expert $n \bmod E$
# first and $(n+1) \bmod E$ second. Each expert then gets $G/E$ first choices and $G/E$ second
# choices: $2G/E$ assignments for $C = 1.25\,G/E$ slots. All $G/E$ first choices fit; only
# $0.25\,G/E$ of the second choices do, and with position priority those are the second
# choices of the **earliest** tokens. In general, at perfect balance with the OpenMoE formula:
#
# $$\text{dropped fraction} = \max\Big(0,\ 1 - \frac{\mathrm{cf}}{k}\Big) = 1 - \frac{1.25}{2} = 37.5\%,$$
#
# while the $k$-scaled formula gives $\max(0, 1 - \mathrm{cf}) = 0$. Note also that the load
# balance loss (lesson 7) is at its minimum $k$ here: balance alone cannot fix this.

# %%
def balanced_logits(G, E):
    z = np.full((G, E), -10.0, dtype=np.float32)             # [G, E]
    n = np.arange(G)
    z[n, n % E] = 2.0                                         # first choice
    z[n, (n + 1) % E] = 1.0                                   # second choice
    return z


Gb = 4096 if not FAST else 512
bal = routing.route(balanced_logits(Gb, E), top_k=2, capacity_factor=1.25)
dropped_rank = 1 - bal.kept.mean(axis=0)                     # [k]
print(f"balanced, G={Gb}, E={E}: C = {bal.capacity}, load before {set(bal.load_before.tolist())}, "
      f"dropped {bal.dropped_fraction:.4f}")
print(f"  dropped among 1st choices {dropped_rank[0]:.3f}, among 2nd choices {dropped_rank[1]:.3f}")
print(f"  aux loss {bal.aux_loss:.3f} (its minimum, k = 2)")
first_drop = int(np.argmax(~bal.kept[:, 1]))
print(f"  second choices are kept for tokens 0..{first_drop - 1} and dropped from token {first_drop} on "
      f"({first_drop / Gb:.0%} of the group)")
expected = 1 - 1.25 / 2
assert abs(bal.dropped_fraction - expected) < 2 * E / (k * Gb), (
    f"at perfect balance the OpenMoE formula should drop 1 - cf/k = {expected:.3f}, got {bal.dropped_fraction:.3f}")
assert dropped_rank[0] == 0, "at perfect balance no first choice should be dropped"
assert np.all(~bal.kept[first_drop:, 1]), "second choices must drop from some position to the end of the group"
check_routing_rules(bal)

bal_k = routing.route(balanced_logits(Gb, E), top_k=2, capacity_factor=1.25, capacity_mode="k_scaled")
print(f"k_scaled formula: C = {bal_k.capacity}, dropped {bal_k.dropped_fraction:.4f}")
assert bal_k.dropped_fraction == 0, "the k-scaled formula must not drop anything at perfect balance with cf >= 1"

# %% [markdown]
# The same balanced router on groups where $\mathrm{cf}\cdot G/E$ is not whole. With position
# priority an expert keeps $\min(\text{load}, C)$ of its assignments, so the dropped fraction
# follows from $C$, and $C$ from the rounding: one slot more or less per expert is visible.

# %%
for Gr, Er in ((52, 4), (44, 8)):
    r = routing.route(balanced_logits(Gr, Er), top_k=2, capacity_factor=1.25, min_capacity=1)
    C_hand = round(1.25 * Gr / Er)                              # nearest integer, ties to even
    expect = 1 - np.minimum(r.load_before, C_hand).sum() / (2 * Gr)
    print(f"G={Gr}, E={Er}: cf*G/E = {1.25 * Gr / Er}, C = {r.capacity}, load {r.load_before.tolist()}, "
          f"dropped {r.dropped_fraction:.4f} (with C = round(...) = {C_hand}: {expect:.4f})")
    assert r.capacity == C_hand and abs(r.dropped_fraction - expect) < 1e-12, (
        f"G={Gr}, E={Er}: C = {r.capacity} drops {r.dropped_fraction:.4f}; with C = round({1.25 * Gr / Er}) = "
        f"{C_hand} it should drop {expect:.4f}")

# %% [markdown]
# ## 4. Drops against the capacity factor, and where in the group they happen
#
# Three routers on groups of $G = 512$ tokens, $E = 8$, top-2:
# - **balanced** (the construction above);
# - **random**: logits $x W$ with random $x$, $W$: every expert is equally likely *on average*,
#   but the counts fluctuate, as for a router at initialisation;
# - **skewed**: the random router plus a preference for two experts (an unbalanced, untrained
#   or badly balanced router).

# %%
Gd, Ed, n_groups = 512, 8, (8 if FAST else 64)


def random_logits(bias=0.0):
    x = rng.normal(size=(n_groups * Gd, 32))
    W = rng.normal(size=(32, Ed)) * 0.3
    z = x @ W                                                 # [N, E]
    z[:, :2] += bias                                          # skewed: experts 0 and 1 favoured
    return z.astype(np.float32)


routers = {"balanced": np.tile(balanced_logits(Gd, Ed), (n_groups, 1)),
           "random": random_logits(),
           "skewed": random_logits(bias=0.8)}
cfs = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0]
curves = {}
for rname, z in routers.items():
    for mode in routing.CAPACITY_MODES:
        curves[(rname, mode)] = [routing.route(z, 2, cf, group_size=Gd, capacity_mode=mode).dropped_fraction
                                 for cf in cfs]
print("dropped fraction at cf 1.25 (train) and 2.0 (eval), OpenMoE formula:")
for rname in routers:
    c = dict(zip(cfs, curves[(rname, "openmoe")]))
    print(f"  {rname:>8}: {c[1.25]:.3f} / {c[2.0]:.3f}")

by_pos = {}
for rname, z in routers.items():
    r = routing.route(z, 2, 1.25, group_size=Gd)
    check_routing_rules(r)
    dropped = ~r.kept.reshape(n_groups, Gd, 2)               # [groups, G, k]
    by_pos[rname] = dropped.mean(axis=(0, 2))                # [G]: dropped share of a position's 2 choices

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
for (rname, mode), ys in curves.items():
    ax1.plot(cfs, ys, "o-" if mode == "openmoe" else "s--", color={"balanced": "C0", "random": "C1", "skewed": "C3"}[rname],
             label=f"{rname}, {mode}")
ax1.plot(cfs, [max(0, 1 - cf / 2) for cf in cfs], "k:", lw=1, label="1 - cf/k (balanced, openmoe)")
for cf, txt in ((1.25, "train"), (2.0, "eval")):
    ax1.axvline(cf, color="0.7", lw=0.8)
    ax1.text(cf, 0.72, txt, rotation=90, color="0.4", ha="right", fontsize=8)
ax1.set_xlabel("capacity factor cf")
ax1.set_ylabel("dropped fraction of the k*G assignments")
ax1.set_title(f"drops vs capacity factor (G={Gd}, E={Ed}, top-2)")
ax1.legend(fontsize=7)

window = 16
for rname, ys in by_pos.items():
    smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
    ax2.plot(np.arange(smooth.size) + window // 2, smooth, label=rname,
             color={"balanced": "C0", "random": "C1", "skewed": "C3"}[rname])
ax2.set_xlabel("token position in the group")
ax2.set_ylabel(f"dropped fraction (moving mean over {window} positions)")
ax2.set_title("OpenMoE formula, cf 1.25, position priority: drops pile up at the end")
ax2.legend(fontsize=8)
fig.suptitle("Lesson 6: how much is dropped, and where")
show(fig, "06_drops.png")

first_half, second_half = by_pos["random"][: Gd // 2].mean(), by_pos["random"][Gd // 2:].mean()
print(f"random router: dropped {first_half:.3f} in the first half of the group, {second_half:.3f} in the second")
assert second_half > first_half, "with position priority, later tokens must be dropped more often"

# %% [markdown]
# ## 5. What happens to a dropped token in the layer
#
# Inside `MoE.forward` a dropped assignment simply has no row in the dispatch buffer: the
# expert never sees the token, and the token's output gets nothing from that expert. If both
# of its choices are dropped, the MoE output for that token is exactly **zero**; in the block
# the token still flows through the residual connection (and the shared FFN of an OpenMoE
# block, lesson 8), so it is not lost, just not processed by any expert.

# %%
cfg = get_preset("toy", d_model=16, n_experts=4, top_k=2, d_ff=32, capacity_factor=0.5, min_capacity=1)
moe = MoE(cfg, rng=B.default_rng(1))
moe.router.weight.data[...] = np.random.default_rng(2).normal(0, 0.5, size=moe.router.weight.shape)
x = tinymoe.tensor(rng.normal(size=(1, 32, cfg.d_model)).astype(np.float32))   # [1, T=32, d]
with tinymoe.no_grad():
    y, _, _, st = moe(x)                                                       # [1, 32, d]
both = np.flatnonzero(~st.kept.any(axis=1))
print(f"C = {st.capacity}, dropped {st.dropped_fraction:.0%}; tokens with both choices dropped: {both.tolist()}")
assert both.size > 0, "expected some fully dropped tokens at cf 0.5"
assert np.all(y.numpy()[0, both] == 0), "a token whose every assignment was dropped must get MoE output exactly 0"

# %% [markdown]
# ## Exercises
#
# 1. **OpenMoE-8B and 34B** use $E = 32$, $G = 4096$. Compute $C$ for training and evaluation
#    with `routing.capacity`, and the dropped fraction at perfect balance.
#    *Hint:* $1 - \mathrm{cf}/k$ does not depend on $E$ or $G$.
# 2. **Dropless at balance.** Which capacity factor makes the OpenMoE formula drop nothing at
#    perfect balance with top-2? Compare with the evaluation cf. *Hint:* solve
#    $\mathrm{cf}\cdot G/E \ge kG/E$.
# 3. **Other priorities.** Re-run the position plot with `priority="probability"` and with
#    `priority="random", rng=np.random.default_rng(0)` in `routing.route`. Where do the drops
#    go now? *Hint:* lesson 12 uses this as a cure for drop-towards-the-end.
