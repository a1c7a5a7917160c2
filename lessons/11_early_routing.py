# %% [markdown]
# # Lesson 11 — Early routing learning: snapshots over training
#
# **What you will learn**
# - the OpenMoE paper's second routing finding: the token-to-expert assignment is learned
#   **early** in training and then hardly changes, while the loss keeps improving;
# - how to see it yourself: the trainer saves *routing snapshots* (the routing of a fixed
#   probe batch of held-out text) every few steps; we compare each snapshot with the final one;
# - why this matters: data that arrives late (instruction tuning, a new domain) meets a
#   routing that is already fixed — one reason for lesson 12's drops.
#
# The snapshots come from lesson 9's run (every 20 updates; reused from the lesson output
# folder, or trained now).

# %%
import json
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap

from _lesson import FAST, plt, shared_run, show

from tinymoe import analysis as A
from tinymoe.checkpoint import load_checkpoint

ckpt = shared_run()
run_dir = Path(ckpt).parent
cfg = load_checkpoint(ckpt).model_config
E = cfg.n_experts
snaps = A.load_snapshots(run_dir / "snapshots")
print(f"{len(snaps)} snapshots at steps {[s['step'] for s in snaps]}")
print(f"probe batch: {snaps[0]['token_ids'].size} tokens; MoE layers {sorted(snaps[0]['experts'])}")

# %% [markdown]
# ## 1. Agreement with the final routing
#
# For a snapshot at step $t$ and the final snapshot at step $T$, on the same probe tokens:
#
# - **token ids**: the share of byte values whose *majority* top-1 expert at step $t$ is the
#   same as at step $T$ (each id counts once);
# - **occurrences**: the same, each id weighted by how often it occurs (frequent bytes count more);
# - **tokens**: the share of individual probe tokens whose top-1 expert is the same.
#
# Unrelated routings agree on about $1/E$ of them. The paper (OpenMoE-8B, checkpoints from 200B
# to 1T tokens) found the routing of tokens "almost totally overlapped".

# %%
early = A.early_routing(snaps, E)
steps = np.array(early["steps"])
for L in early["layers"]:
    print(f"block {L['layer']}:")
    for s, ids, occ, tkn in zip(steps, L["ids"], L["occurrences"], L["tokens"]):
        print(f"   step {s:4d}: ids {ids:6.1%}  occurrences {occ:6.1%}  tokens {tkn:6.1%}")

for L in early["layers"]:
    assert abs(L["tokens"][-1] - 1.0) < 1e-12, "the final snapshot must agree with itself"
    assert all(0.0 <= v <= 1.0 for v in L["occurrences"]), "agreements are shares: between 0 and 1"
    if FAST:
        print("fast mode: 30 toy updates are too few for the routing to settle; the trend check below "
              "runs in normal mode")
        continue
    mid = len(steps) // 2
    assert L["occurrences"][mid] > L["occurrences"][0], (
        f"block {L['layer']}: routing half-way through should agree with the final routing more than "
        f"the routing at step 0 does ({L['occurrences'][mid]:.1%} vs {L['occurrences'][0]:.1%})")

# %% [markdown]
# ## 2. How much routing changes between snapshots
#
# The *churn* between consecutive snapshots is the share of probe tokens whose top-1 expert
# changed. If routing is learned early, churn is high at first and then small.

# %%
layers = sorted(snaps[0]["experts"])
churn = {layer: [float((s0["experts"][layer][:, 0] != s1["experts"][layer][:, 0]).mean())
                 for s0, s1 in zip(snaps[:-1], snaps[1:])]
         for layer in layers}
for layer in layers:
    print(f"block {layer}: churn per interval " + " ".join(f"{c:.0%}" for c in churn[layer]))

# training loss from the run's log, to set the routing against the learning
events = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
train_ev = [e for e in events if e["event"] == "train"]

# %% [markdown]
# ### Picture: routing settles while the loss is still falling

# %%
fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [1.2, 1, 1.2]},
                         layout="constrained")
ax = axes[0]
for j, L in enumerate(early["layers"]):
    ax.plot(steps, [100 * v for v in L["occurrences"]], "o-", color=f"C{j}", ms=3, label=f"block {L['layer']}: occurrences")
    ax.plot(steps, [100 * v for v in L["tokens"]], "--", color=f"C{j}", label=f"block {L['layer']}: individual tokens")
ax.axhline(100 / E, color="k", ls=":", lw=1, label="chance 1/E")
ax.set_xlabel("training step")
ax.set_ylabel("same top-1 expert as at the final step (%)")
ax.set_ylim(0, 103)
ax2 = ax.twinx()
ax2.plot([e["step"] for e in train_ev], [e["ce"] for e in train_ev], color="0.6", lw=1)
ax2.set_ylabel("train cross-entropy (grey)", color="0.4")
ax.set_title("agreement with the final routing")
ax.legend(fontsize=7, loc="lower right")

mids = (steps[:-1] + steps[1:]) / 2
for j, layer in enumerate(layers):
    axes[1].plot(mids, [100 * c for c in churn[layer]], "o-", color=f"C{j}", ms=3, label=f"block {layer}")
axes[1].set_xlabel("training step (middle of the interval)")
axes[1].set_ylabel("probe tokens that changed expert (%)")
axes[1].set_title("churn between consecutive snapshots")
axes[1].legend(fontsize=8)

n_show = 96
last = layers[-1]
grid = np.stack([s["experts"][last][:n_show, 0] for s in snaps])          # [snapshots, tokens]
colors = ListedColormap(plt.get_cmap("tab10" if E <= 10 else "tab20").colors[:E])   # one colour per expert
im = axes[2].imshow(grid, aspect="auto", cmap=colors, vmin=-0.5, vmax=E - 0.5, interpolation="nearest")
axes[2].set_yticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
axes[2].set_xlabel(f"probe token (first {n_show} of the probe batch)")
axes[2].set_ylabel("snapshot step")
axes[2].set_title(f"block {last}: top-1 expert of each probe token (colour = expert)")
cbar = fig.colorbar(im, ax=axes[2], ticks=range(E))
cbar.set_label("expert")
fig.suptitle("Lesson 11: early routing learning")
show(fig, "11_early_routing.png")

# %% [markdown]
# ## 3. When was the routing "decided"?
#
# A compact summary: the first snapshot from which the occurrence-weighted agreement stays
# above 80 %, as a fraction of the run.

# %%
for L in early["layers"]:
    occ = np.array(L["occurrences"])
    above = occ >= 0.8
    first = next((i for i in range(len(occ)) if above[i:].all()), len(occ) - 1)
    print(f"block {L['layer']}: agreement stays >= 80% from step {steps[first]} "
          f"({steps[first] / steps[-1]:.0%} of the run)")

# %% [markdown]
# ## What to take away
#
# - Routing changes fastest at the start: almost every probe token switches expert between the
#   first snapshots (the router and the embeddings are moving fast, and for a while most tokens
#   crowd onto a few experts), then the churn falls steadily and the assignment freezes.
# - How "early" depends on the length of the run. In this 300-update run the agreement with the
#   final routing climbs through the whole run (the cosine schedule also shrinks the updates
#   towards the end). In a 1,200-update run of the same model (the default
#   `python -m tinymoe train`, snapshots every 50 updates) we measured an occurrence-weighted
#   agreement of about 50 % at a quarter of the run, 60-80 % at half and 75-85 % at three
#   quarters (blocks 3 and 1), with churn falling from over 90 % to under 15 % per 50 updates.
#   The paper saw "almost totally overlapped" routing between checkpoints of 200B and 1T tokens —
#   a run thousands of times longer. The direction is the same; our runs show the beginning of it.
# - Why it happens: the router is a linear map of the token's hidden state, and in the first MoE
#   layers that state is mostly the token's embedding (lesson 10). Once embeddings and router
#   settle into a token-to-expert table, gradients mostly refine the experts, not the table.
# - The paper's suggestion follows: whatever the model should route well later (instruction-style
#   data, other languages, code) should be in the data **early**, while the routing is still
#   being learned; or the router could be frozen after a warm-up.
#
# ## Exercises
#
# 1. **Denser snapshots.** Train lesson 9's run with `snapshot_every=5` for the first 100 steps
#    (`stop_at=100`). At which step does the churn fall below 10 %?
#    *Hint:* `TrainConfig.replace(snapshot_every=5, stop_at=100, out_dir=...)`.
# 2. **Learning rate.** Halve and double `lr`. Does the routing settle earlier or later?
# 3. **A frozen router.** After step 100, stop updating `blocks.*.moe.router.weight` (set its
#    `.grad = None` before `opt.step()` in lesson 9's hand-written loop). How much does the
#    loss suffer? *Hint:* the paper lists this as a cure to try.
