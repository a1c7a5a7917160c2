# %% [markdown]
# # Lesson 11 — Early routing learning: snapshots over training
#
# **What you will learn**
# - the OpenMoE paper's second routing finding: the token-to-expert assignment is learned
#   **early** in training and then hardly changes, while the loss keeps improving;
# - how to see it yourself: the trainer saves *routing snapshots* (the routing of a fixed
#   probe batch of held-out text) every few steps; we compare each snapshot with the final one;
# - how to judge it honestly: agreement with the final routing, per token and per id, with
#   bootstrap intervals and against the **ceiling** the measure can reach on this probe;
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
# ## 1. Agreement with the final routing, against its ceiling
#
# For a snapshot at step $t$ and the final snapshot at step $T$, on the same probe tokens:
#
# - **per token**: the share of probe tokens whose top-1 expert at step $t$ is the same as at
#   step $T$. Routing a fixed input is deterministic, so the final routing agrees with itself
#   on 100% of the tokens: the **ceiling** of this measure is exactly 1. The interval comes
#   from resampling the probe sequences (bootstrap, 95%).
# - **majority per id** (each id once) and **occurrence-weighted** (each id weighted by how often
#   it occurs): whether an id's *most frequent* expert is the same. A majority estimated from a
#   few occurrences is noisy, so even the final routing does not agree with itself on another
#   sample of text. We measure every snapshot on **split halves** of the probe (majority at step
#   $t$ on one half, final majority on the other half, many random splits) and the **ceiling**
#   the same way (final against final). A ceiling under 95% means the probe is too small for
#   these two measures to separate early from late routing.
#
# Unrelated routings agree on about $1/E$. The paper (OpenMoE-8B, checkpoints from 200B to 1T
# tokens) found the routing of tokens "almost totally overlapped".

# %%
events = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
loss_curve = [(e["step"], e["ce"]) for e in events if e["event"] == "train"]
early = A.early_routing_report(snaps, E, loss_curve=loss_curve, n_boot=500, n_splits=30)
steps = np.array(early["steps"])
probe = early["probe"]
print(f"probe: {probe['n_tokens']} tokens in {probe['n_sequences']} sequences, {probe['n_ids']} distinct ids")
for L in early["layers"]:
    c = L["ceiling"]
    print(f"block {L['layer']}: ceiling (final vs itself on split halves): occurrence-weighted "
          f"{c['occurrences']['estimate']:.1%}, per id {c['ids']['estimate']:.1%}"
          + ("" if L["probe_ok"] else "  <- below 95%: the probe is too small for the majority measures"))
    for i, s in enumerate(steps):
        t = L["tokens_interval"][i]
        print(f"   step {s:4d} (train CE at the nearest logged step {early['loss'][i]:.3f}): per token {t['estimate']:6.1%} "
              f"[{t['low']:.1%}, {t['high']:.1%}]   occurrence-weighted "
              f"{L['split_half']['occurrences'][i]['estimate']:6.1%}   per id "
              f"{L['split_half']['ids'][i]['estimate']:6.1%}  (split halves)")

for L in early["layers"]:
    assert L["tokens_interval"][-1]["estimate"] == 1.0, "the final snapshot must agree with itself"
    assert all(0.0 <= v["estimate"] <= 1.0 for v in L["tokens_interval"]), "agreements are shares"
    assert L["split_half"]["occurrences"][-1]["estimate"] == L["ceiling"]["occurrences"]["estimate"]
    if FAST:
        print("fast mode: 30 toy updates are too few for the routing to settle; the trend check below "
              "runs in normal mode")
        continue
    mid = len(steps) // 2
    assert L["tokens_interval"][mid]["estimate"] > L["tokens_interval"][0]["estimate"], (
        f"block {L['layer']}: routing half-way through should agree with the final routing more than "
        f"the routing at step 0 does")

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

train_ev = [e for e in events if e["event"] == "train"]

# %% [markdown]
# ### Picture: routing settles while the loss is still falling

# %%
fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [1.2, 1, 1.2]},
                         layout="constrained")
ax = axes[0]
for j, L in enumerate(early["layers"]):
    iv = L["tokens_interval"]
    ax.fill_between(steps, [100 * v["low"] for v in iv], [100 * v["high"] for v in iv], color=f"C{j}", alpha=0.2, lw=0)
    ax.plot(steps, [100 * v["estimate"] for v in iv], "o-", color=f"C{j}", ms=3,
            label=f"block {L['layer']}: per token (ceiling 100%)")
    ax.plot(steps, [100 * v["estimate"] for v in L["split_half"]["occurrences"]], "--", color=f"C{j}",
            label=f"block {L['layer']}: occurrence-weighted majority (split halves)")
    ax.axhline(100 * L["ceiling"]["occurrences"]["estimate"], color=f"C{j}", ls=":", lw=1,
               label=f"block {L['layer']}: its ceiling")
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
# ## 3. Was the routing fixed early? A verdict with an interval
#
# The rule (`analysis.early_routing_verdict`, the same as `python -m tinymoe analyze`): take the
# first snapshot at or after 25% of training. If the 95% interval of its per-token agreement
# with the final routing lies at or above 90% of the ceiling (the ceiling is 100%) in every
# layer, the routing was fixed early; if the interval lies below 90% in some layer, it was not;
# otherwise the data cannot tell. We also print, for each layer, the first snapshot from which
# the interval's low end stays at or above 90% — computed from the table above.

# %%
verdict = A.early_routing_verdict(early)
print(verdict["rule"])
if "step" in verdict:
    for L, iv in zip(early["layers"], verdict["agreement_tokens"]):
        print(f"block {L['layer']}: per-token agreement at step {verdict['step']} "
              f"({verdict['fraction']:.0%} of training): {iv['estimate']:.1%} [{iv['low']:.1%}, {iv['high']:.1%}]")
print("verdict:", {True: "routing fixed early (reproduced)", False: "routing NOT fixed early in this run",
                   None: "undecided (the interval straddles the threshold, or no snapshot to judge)"}[verdict["reproduced"]])
for L in early["layers"]:
    low = np.array([v["low"] for v in L["tokens_interval"]])
    above = low >= A.EARLY_THRESHOLD
    first = next((i for i in range(len(low)) if above[i:].all()), None)
    if first is None or first == len(low) - 1:
        print(f"block {L['layer']}: the per-token agreement reaches 90% (low end of its interval) only at "
              f"the final snapshot itself: the routing kept changing until the end of this run")
    else:
        print(f"block {L['layer']}: per-token agreement >= 90% (low end) from step {steps[first]} "
              f"({steps[first] / steps[-1]:.0%} of the run) on")
if verdict["reproduced"] is True:
    assert all(iv["low"] >= A.EARLY_THRESHOLD for iv in verdict["agreement_tokens"])
elif verdict["reproduced"] is False:
    assert any(iv["high"] < A.EARLY_THRESHOLD for iv in verdict["agreement_tokens"])

# %% [markdown]
# ## 4. The same verdict at the study's scale
#
# `python -m tinymoe findings --config lab` applied this rule to a model whose experts carry
# every FFN (the `lab` preset, 1,500 updates, snapshots every 1/8 of training); the
# repository keeps the record in `docs/study/lab.json`. Its early-routing rows, per MoE
# block: per-token agreement with the final routing at the first snapshot at or after 25% of
# training, against 90% of the ceiling, and against the first snapshot (is it above where
# training started?):

# %%
from _lesson import ROOT

study = json.loads((ROOT / "docs" / "study" / "lab.json").read_text())
rows = [r for r in study["findings"] if r["finding"] == "early routing learning"]
verdicts = [r["verdict"] for r in rows if r["baseline_name"].startswith("ceiling")]
for r in rows:
    e, b = r["effect"], r["baseline"]
    if r["baseline_name"].startswith("ceiling"):
        v = {True: "reproduced", False: "did not reproduce", None: "undecided"}[r["verdict"]]
    else:
        v = "PASS" if r["verdict"] else "not above"
    print(f"  {r['measure']}: {100 * e['estimate']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"
          f" vs {r['baseline_name']} {100 * b['estimate']:.1f}% -> {v}")
n_yes, n_no = verdicts.count(True), verdicts.count(False)
print(f"at the study's scale: early routing reproduced in {n_yes} of {len(verdicts)} MoE blocks, "
      f"did not in {n_no}, undecided in {len(verdicts) - n_yes - n_no}")
assert verdicts, "the study record lost its early-routing rows"

# %% [markdown]
# ## What to take away
#
# - Routing changes fastest at the start: between the first snapshots most probe tokens switch
#   expert; then the churn falls and the routing drifts more slowly. Read the table above for how
#   far it has settled by a quarter of the run: the verdict is computed from it, not assumed.
# - Judge agreement against its **ceiling**. A majority-per-id measure on a small probe (the
#   trainer's probe is 4 windows per domain) cannot reach 100% even for the final routing against
#   itself; per-token agreement has an exact ceiling of 100%. Neighbouring late snapshots can
#   differ by several points: take snapshots densely (at least every 5% of training) and read the
#   intervals, not single values.
# - How "early" depends on the length of the run. The paper compared checkpoints of 200B and 1T
#   tokens — a run thousands of times longer than ours; short runs show at most the beginning of
#   the effect, and the cosine schedule also shrinks the updates towards the end.
# - Why routing can settle: the router is a linear map of the token's hidden state, and in the
#   first MoE layers that state is mostly the token's embedding (lesson 10: even an untrained
#   router predicts the expert from the token id). Once embeddings and router settle into a
#   token-to-expert table, gradients mostly refine the experts, not the table.
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
