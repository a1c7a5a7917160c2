# %% [markdown]
# # Lesson 12 — Drop-towards-the-end, and its cures
#
# **What you will learn**
# - the OpenMoE paper's third routing finding: with position priority, tokens **late in a
#   routing group** lose their experts far more often than early ones — and more so on data
#   unlike the pre-training mix (the paper: up to 15-33 % after position 1500 on MT-Bench,
#   ~50 % for the fine-tuned model, against about 2 % on pre-training data);
# - how to measure it on lesson 9's model: the dropped share of expert assignments against the
#   position in the group, at the training and evaluation capacity factors, on in-distribution
#   text and on "multi-turn" text stitched from alternating domains;
# - the cures, evaluated on the same weights: a larger capacity factor, the $k$-scaled capacity
#   formula, **probability** slot priority (batch-prioritised routing), and dropless routing —
#   and what each costs.

# %%
import numpy as np

from _lesson import FAST, plt, shared_run, show

from tinymoe import analysis as A
from tinymoe.checkpoint import load_model
from tinymoe.data import builtin_corpus, multi_turn_text

ckpt = shared_run()
model, tok, cfg = load_model(ckpt)
T, E, k = cfg.max_seq_len, cfg.n_experts, cfg.top_k
print(cfg.describe())
print(f"routing group = one sequence of G = {T} tokens; capacity at cf 1.25: "
      f"{cfg.capacity(T, training=True)} slots per expert, at cf 2.0: {cfg.capacity(T, training=False)}")

# %% [markdown]
# ## 1. Why the end?
#
# With OpenMoE's k-major position priority (lesson 6), slots are handed out in token order:
# every first choice from position 0 to $G-1$, then every second choice. When an expert is
# popular, its $C$ slots are gone before the queue reaches the late positions, so late tokens
# are the ones dropped. The *second* choices are dropped first (they queue after all first
# choices), and at cf 1.25 with top-2, at least $1 - 1.25/2 = 37.5\%$ of all assignments are
# dropped even with perfect balance.
#
# ## 2. Two data sets
#
# - **in-distribution**: held-out windows of each domain, as in training;
# - **multi-turn**: each sequence stitched from segments of 16-64 tokens of alternating
#   domains, like the turns of a chat — a shift in distribution *within* a sequence.

# %%
corpus = builtin_corpus(max_chars=20_000 if FAST else None)
n_win = 12 if FAST else 64
windows, domains = [], []
for d, name in enumerate(corpus.names):
    toks = np.asarray(tok.encode(corpus.domains[name].val[: (n_win + 2) * (T + 1) * 4]), dtype=np.int64)
    w = A.token_windows(toks, T, n_win)                               # [n, T+1]
    windows.append(w)
    domains.append(np.full(w.shape[0], d))
datasets = {"in-distribution": (np.concatenate(windows), np.concatenate(domains))}
mixed = multi_turn_text(corpus, tok, n_seqs=len(corpus.names) * n_win, seq_len=T + 1,
                        segment_len=(min(16, T // 4), min(64, T // 2)), split="val", seed=0)
datasets["multi-turn"] = (mixed.tokens, mixed.domain)
print({name: w.shape for name, (w, _) in datasets.items()})
print("a multi-turn sequence:", repr(tok.decode(mixed.tokens[0][:100])))

# %% [markdown]
# ## 3. Drops by position, under each routing setting
#
# `analysis.collect_routing(model, windows, ..., **overrides)` routes the text with routing
# settings changed for this run only (the weights are the same). The model runs in eval mode,
# so the capacity factor used is `eval_capacity_factor`. `analysis.drop_by_position` bins the
# positions in the group and counts the dropped share of assignments (all MoE layers).

# %%
settings = {
    "OpenMoE: position, cf 1.25 (train)": dict(eval_capacity_factor=1.25),
    "OpenMoE: position, cf 2.0 (eval)": dict(eval_capacity_factor=2.0),
    "cure: k-scaled capacity, cf 1.25": dict(eval_capacity_factor=1.25, capacity_mode="k_scaled"),
    "cure: probability priority, cf 1.25": dict(eval_capacity_factor=1.25, slot_priority="probability"),
    "cure: dropless": dict(eval_capacity_factor=0.0),
}
n_bins = 8 if FAST else 16
results = {}
for dname, (w, dom) in datasets.items():
    for sname, ov in settings.items():
        tr = A.collect_routing(model, w, dom, batch_size=16, domain_names=corpus.names, **ov)
        kept = tr.all_kept()                                                   # [N, layers * k]
        first = np.stack([kk[:, 0] for kk in tr.kept], axis=1)                # first choices only
        curve = A.drop_by_position(kept, tr.group_pos, tr.group_len, n_bins)
        results[(dname, sname)] = {
            "curve": curve, "quarters": A.drop_quarters(kept, tr.group_pos, tr.group_len),
            "first_choice": A.drop_quarters(first, tr.group_pos, tr.group_len), "ce": tr.ce}

print(f"{'data':<16} {'setting':<38} {'dropped':>8} {'1st quarter':>12} {'last quarter':>13} "
      f"{'1st-choice drops':>17} {'CE':>6}")
for (dname, sname), r in results.items():
    q, f = r["quarters"], r["first_choice"]
    print(f"{dname:<16} {sname:<38} {q['overall']:8.1%} {q['first_quarter']:12.1%} {q['last_quarter']:13.1%} "
          f"{f['overall']:17.1%} {r['ce']:6.3f}")

# %% [markdown]
# Self-checks: with OpenMoE's routing the last quarter of the group must lose more than the
# first; dropless must drop nothing; evaluation's cf 2.0 must drop less than training's 1.25;
# and probability priority must narrow the gap between the end and the start of the group.

# %%
for dname in datasets:
    pos = results[(dname, "OpenMoE: position, cf 1.25 (train)")]
    prob = results[(dname, "cure: probability priority, cf 1.25")]
    ev = results[(dname, "OpenMoE: position, cf 2.0 (eval)")]
    assert pos["quarters"]["last_quarter"] > pos["quarters"]["first_quarter"], (
        f"{dname}: with position priority the end of the group should lose more "
        f"({pos['quarters']['last_quarter']:.1%} vs {pos['quarters']['first_quarter']:.1%} at the start)")
    assert results[(dname, "cure: dropless")]["quarters"]["overall"] == 0.0, "dropless routing dropped something"
    assert ev["quarters"]["overall"] < pos["quarters"]["overall"], "cf 2.0 should drop less than cf 1.25"
    gap_pos = pos["quarters"]["last_quarter"] - pos["quarters"]["first_quarter"]
    gap_prob = prob["quarters"]["last_quarter"] - prob["quarters"]["first_quarter"]
    assert gap_prob < gap_pos, (f"{dname}: probability priority should spread drops over the group "
                                f"(end-start gap {gap_prob:.1%} vs {gap_pos:.1%} with position priority)")

# %% [markdown]
# ### Picture: where in the group tokens lose their experts

# %%
styles = {"OpenMoE: position, cf 1.25 (train)": ("C3", "-"), "OpenMoE: position, cf 2.0 (eval)": ("C0", "-"),
          "cure: k-scaled capacity, cf 1.25": ("C4", "--"), "cure: probability priority, cf 1.25": ("C2", "--"),
          "cure: dropless": ("k", ":")}
fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 1, 0.9]})
for ax, dname in zip(axes[:2], datasets):
    for sname in settings:
        c = results[(dname, sname)]["curve"]
        mid = [(a + b - 1) / 2 for a, b in zip(c["bin_start"], c["bin_end"])]
        color, ls = styles[sname]
        ax.plot(mid, [100 * v for v in c["drop_rate"]], ls, color=color, marker=".", label=sname)
    ax.set_xlabel(f"position in the routing group (0..{T - 1})")
    ax.set_ylabel("dropped expert assignments (%)")
    ax.set_title(f"{dname} held-out text")
    ax.set_ylim(-2, 102)
axes[0].legend(fontsize=7)

names = list(settings)
xs = np.arange(len(names))
for j, dname in enumerate(datasets):
    axes[2].bar(xs + (j - 0.5) * 0.38, [results[(dname, s)]["ce"] for s in names], 0.38, label=dname)
axes[2].set_xticks(xs, [s.replace("cure: ", "").replace("OpenMoE: ", "") for s in names], rotation=30,
                   ha="right", fontsize=7)
lo = min(r["ce"] for r in results.values())
axes[2].set_ylim(lo - 0.15, max(r["ce"] for r in results.values()) + 0.1)
axes[2].set_ylabel("held-out cross-entropy (nats/byte)")
axes[2].set_title("what the drops cost in loss")
axes[2].legend(fontsize=7)
fig.suptitle("Lesson 12: drop-towards-the-end (all MoE layers) and the cures, on the same weights")
show(fig, "12_drops.png")

# %% [markdown]
# ## What to take away
#
# - Position priority turns capacity overflow into a **position effect**: the first tokens of a
#   group are served, the last ones are not. In a long prompt (the paper's groups are 4096
#   tokens), the *end* — often the part that matters for the answer — is degraded most.
# - The cures act on different causes: more capacity (larger cf, or the $k$-scaled formula that
#   OpenMoE's formula lacks) reduces how much is dropped; probability priority changes *who* is
#   dropped (the least confident assignments, wherever they are); dropless removes drops at the
#   cost of unbounded expert buffers. The paper's other proposals act on training: more diverse
#   data early (lesson 11), code in the mix, a better tokenizer.
# - Our model was trained with drops; dropless evaluation can still lower the loss, because
#   every token then gets both its experts.
#
# ## Exercises
#
# 1. **Bigger groups.** OpenMoE routed groups of 4096 tokens. Add `group_size=16 * T` to the
#    overrides (a group = a whole batch of 16 sequences). Where do the drops go now?
#    *Hint:* positions in the group then run over 16 sequences.
# 2. **A domain never seen.** Train lesson 9's run with `exclude_domains=("code",)` and measure
#    the drops on code. Compare with the paper's MT-Bench numbers.
# 3. **Random priority.** Why can this lesson not simply pass `slot_priority="random"`?
#    *Hint:* the random order needs a generator (`rng=`) in the forward; see `OpenMoE.forward`.
