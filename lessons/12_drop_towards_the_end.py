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
# - what **random** routing would drop at the same shape: with OpenMoE's capacity formula (no
#   factor $k$) and first-choices-first slots, even perfectly balanced random routing drops more
#   at the end of a group. The finding is only the part *beyond* that baseline;
# - the cures, evaluated on the same weights: a larger capacity factor, the $k$-scaled capacity
#   formula, **probability** slot priority (batch-prioritised routing), and dropless routing —
#   and what each costs in loss, position by position.

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
for cf in (cfg.capacity_factor, cfg.eval_capacity_factor):
    e = A.expected_drop_summary(T, E, k, cfg.capacity(T, training=cf == cfg.capacity_factor))
    print(f"random balanced routing at cf {cf:g}: {e['all']['first_quarter']:.1%} of assignments dropped in the "
          f"first quarter of a group, {e['all']['last_quarter']:.1%} in the last (first choices "
          f"{e['rank0']['overall']:.1%}, second {e['rank1']['overall'] if k > 1 else 0:.1%} overall)")

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
# **The baseline.** Let every token pick $k$ distinct experts uniformly at random. The rank-$r$
# choice ($r = 0$ first) of the token at position $p$ of a group of $G$ waits behind the
# $\mathrm{Bin}(p, (r+1)/E)$ earlier tokens that chose its expert at rank $\le r$ and the
# $\mathrm{Bin}(G-1-p, r/E)$ later tokens that chose it at a rank $< r$; it is dropped iff that
# count reaches the capacity $C$ (`analysis.expected_drop_by_position`). This rises towards the
# end of the group with no learned routing at all: load fluctuation plus the slot order.
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
# ## 3. Drops by position, under each routing setting, against random routing
#
# `analysis.collect_routing(model, windows, ..., **overrides)` routes the text with routing
# settings changed for this run only (the weights are the same). The model runs in eval mode,
# so the capacity factor used is `eval_capacity_factor`. `analysis.drop_statistics` gives the
# dropped share of assignments (all MoE layers; first and second choices separately) with 95%
# bootstrap intervals over routing groups; `analysis.random_drop_baseline` gives the same for
# balanced random routing at the same $E$, $k$, group size, capacity and slot priority.
# The **gap** is the last-quarter minus the first-quarter drop rate. The verdict
# (`analysis.verdict`): the model's gap interval lies entirely above random routing's.
#
# One more setting: **paper-like groups**. OpenMoE routed groups of 4096 tokens holding several
# sequences; here `group_size = 16 * T` puts a whole batch of 16 sequences in one group.

# %%
settings = {
    "OpenMoE: position, cf 1.25 (train)": dict(eval_capacity_factor=1.25),
    "OpenMoE: position, cf 2.0 (eval)": dict(eval_capacity_factor=2.0),
    f"cf 2.0, groups of {16 * T} tokens": dict(eval_capacity_factor=2.0, group_size=16 * T),
    "cure: k-scaled capacity, cf 1.25": dict(eval_capacity_factor=1.25, capacity_mode="k_scaled"),
    "cure: probability priority, cf 1.25": dict(eval_capacity_factor=1.25, slot_priority="probability"),
    "cure: dropless": dict(eval_capacity_factor=0.0),
}
n_bins = 8 if FAST else 16
results, traces = {}, {}
for dname, (w, dom) in datasets.items():
    for sname, ov in settings.items():
        tr = A.collect_routing(model, w, dom, batch_size=16, domain_names=corpus.names, **ov)
        traces[(dname, sname)] = tr
        kept = tr.all_kept()                                                   # [N, layers * k]
        r = {"curve": A.drop_by_position(kept, tr.group_pos, tr.group_len, n_bins),
             "stats": A.drop_statistics(kept, tr.group_pos, tr.group_len, k, n_boot=500),
             "group_len": tr.group_len, "ce": tr.ce}
        if ov["eval_capacity_factor"]:
            r["random"] = A.random_drop_baseline(
                r["stats"]["n_units"], len(tr.layers), tr.group_len, E, k, ov["eval_capacity_factor"],
                cfg.min_capacity, ov.get("capacity_mode", cfg.capacity_mode),
                ov.get("slot_priority", cfg.slot_priority), n_boot=500)
            r["beyond_random"] = A.verdict(r["stats"]["all"]["gap"], r["random"]["all"]["gap"])
        results[(dname, sname)] = r


def ci(v):
    return f"{v['estimate']:6.1%} [{v['low']:.1%}, {v['high']:.1%}]"


print(f"{'data':<16} {'setting':<38} {'dropped':>8} {'1st q.':>7} {'last q.':>8} {'1st ch.':>8} {'2nd ch.':>8} "
      f"{'gap [95% CI]':>22} {'random gap [95% CI]':>22} {'beyond random':>14} {'CE':>6}")
for (dname, sname), r in results.items():
    a = r["stats"]["all"]
    rnd = r.get("random")
    print(f"{dname:<16} {sname:<38} {a['overall']['estimate']:8.1%} {a['first_quarter']['estimate']:7.1%} "
          f"{a['last_quarter']['estimate']:8.1%} {r['stats']['rank0']['overall']['estimate']:8.1%} "
          f"{r['stats']['rank1']['overall']['estimate'] if k > 1 else 0:8.1%} {ci(a['gap']):>22} "
          f"{ci(rnd['all']['gap']) if rnd else '-':>22} "
          f"{ {True: 'yes', False: 'no', None: '-'}[r.get('beyond_random')]:>14} {r['ce']:6.3f}")

# %% [markdown]
# Self-checks: dropless must drop nothing; evaluation's cf 2.0 must drop less than training's
# 1.25 (same routing, more slots); with position priority the last quarter loses more than the
# first — as random routing does too, which is why the verdict column compares with it; and
# probability priority must narrow the gap between the end and the start of the group.

# %%
for dname in datasets:
    pos = results[(dname, "OpenMoE: position, cf 1.25 (train)")]["stats"]["all"]
    prob = results[(dname, "cure: probability priority, cf 1.25")]["stats"]["all"]
    ev = results[(dname, "OpenMoE: position, cf 2.0 (eval)")]["stats"]["all"]
    assert pos["last_quarter"]["estimate"] > pos["first_quarter"]["estimate"], (
        f"{dname}: with position priority the end of the group should lose more")
    assert results[(dname, "cure: dropless")]["stats"]["all"]["overall"]["estimate"] == 0.0, \
        "dropless routing dropped something"
    assert ev["overall"]["estimate"] < pos["overall"]["estimate"], "cf 2.0 should drop less than cf 1.25"
    assert prob["gap"]["estimate"] < pos["gap"]["estimate"], (
        f"{dname}: probability priority should spread drops over the group "
        f"(gap {prob['gap']['estimate']:.1%} vs {pos['gap']['estimate']:.1%} with position priority)")

# %% [markdown]
# ## 4. Multi-turn against in-distribution text, and what the drops cost
#
# Two effect sizes, each with a 95% interval, and sentences computed from them:
#
# - `analysis.drop_difference`: multi-turn minus in-distribution drop rate at the eval cf;
# - `analysis.ce_cost_by_position`: per-token cross-entropy with drops minus dropless, on the
#   same tokens, per quarter of the group (a paired comparison: positive = the drops cost loss).

# %%
ev_name = "OpenMoE: position, cf 2.0 (eval)"
a, b = (traces[(d, ev_name)] for d in ("multi-turn", "in-distribution"))
diff = A.drop_difference(*({"kept": t.all_kept(), "group_pos": t.group_pos, "group_len": t.group_len}
                           for t in (a, b)), key="overall", n_boot=500)
print(f"multi-turn minus in-distribution, dropped at eval cf: {ci(diff)}")
if diff["low"] > 0:
    print("-> multi-turn text loses more assignments than in-distribution text.")
elif diff["high"] < 0:
    print("-> multi-turn text loses FEWER assignments than in-distribution text.")
else:
    print("-> no difference between multi-turn and in-distribution text at this sample size.")

free = {d: traces[(d, "cure: dropless")] for d in datasets}
costs = {}
for dname in datasets:
    for sname in ("OpenMoE: position, cf 1.25 (train)", ev_name):
        t = traces[(dname, sname)]
        c = A.ce_cost_by_position(t.token_ce, free[dname].token_ce, t.group_pos, t.group_len, 4, n_boot=500)
        costs[(dname, sname)] = c
        o = c["overall"]
        print(f"{dname:<16} {sname:<36} CE with drops - dropless: all {o['estimate']:+.4f} "
              f"[{o['low']:+.4f}, {o['high']:+.4f}] nats/token;  by quarter: "
              + "  ".join(f"{v['estimate']:+.4f}" for v in c["bins"]))
        if o["low"] > 0:
            print(f"   -> here dropless evaluation lowers the loss: the model, trained with drops, still gains "
                  f"from giving every token both experts ({o['estimate']:+.3f} nats/token).")
        elif o["high"] < 0:
            print("   -> here dropless evaluation RAISES the loss (the model was trained with drops: the extra "
                  "expert outputs it now receives can hurt).")
        else:
            print("   -> here dropless evaluation makes no measurable difference to the loss.")
        # the per-token CE (computed from the logits) averages to the model's own CE
        assert abs(t.token_ce.mean() - t.ce) < 1e-4 * max(1.0, t.ce), (t.token_ce.mean(), t.ce)
        assert abs(o["estimate"] - (t.token_ce - free[dname].token_ce).mean()) < 1e-12

# %% [markdown]
# ### Picture: where in the group tokens lose their experts

# %%
styles = {"OpenMoE: position, cf 1.25 (train)": ("C3", "-"), "OpenMoE: position, cf 2.0 (eval)": ("C0", "-"),
          "cure: k-scaled capacity, cf 1.25": ("C4", "--"), "cure: probability priority, cf 1.25": ("C2", "--"),
          "cure: dropless": ("k", ":")}
fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 1, 0.9]})
styles[f"cf 2.0, groups of {16 * T} tokens"] = ("C9", "-")
for ax, dname in zip(axes[:2], datasets):
    for sname in settings:
        r = results[(dname, sname)]
        c = r["curve"]
        mid = [(a + b) / 2 / r["group_len"] for a, b in zip(c["bin_start"], c["bin_end"])]
        color, ls = styles[sname]
        ax.plot(mid, [100 * v for v in c["drop_rate"]], ls, color=color, marker=".", label=sname)
    for cf_name, color in (("OpenMoE: position, cf 1.25 (train)", "C3"), ("OpenMoE: position, cf 2.0 (eval)", "C0")):
        exp = results[(dname, cf_name)]["random"]["expected"]["curve"]      # [G]
        ax.plot((np.arange(T) + 0.5) / T, [100 * v for v in exp], ":", color=color, lw=1.2,
                label=f"random routing, expected ({cf_name.split(': ')[1]})")
    ax.set_xlabel("position in the routing group (fraction of the group)")
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
axes[2].set_ylabel("held-out cross-entropy (nats/token)")
axes[2].set_title("held-out loss under each setting")
axes[2].legend(fontsize=7)
fig.suptitle("Lesson 12: drop-towards-the-end (all MoE layers) and the cures, on the same weights")
show(fig, "12_drops.png")

# %% [markdown]
# ## 5. The same rule at the study's scale
#
# `python -m tinymoe findings --config lab` measured drops on a model whose experts carry
# every FFN (the `lab` preset: k-scaled capacity over 2048-token groups of 16 sequences, so
# the formula itself no longer drops a token's second choice), in-distribution, multi-turn
# and on a domain left out of training; the record is `docs/study/lab.json`. Its
# drop-towards-the-end rows (last minus first quarter of the group, against random routing at
# the same shape and capacity):

# %%
import json

from _lesson import ROOT

study = json.loads((ROOT / "docs" / "study" / "lab.json").read_text())
rows = [r for r in study["findings"] if r["finding"].endswith("drop-towards-the-end")]
for r in rows:
    e, b = r["effect"], r["baseline"]
    print(f"  {r['measure']}: {100 * e['estimate']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"
          f" vs random {100 * b['estimate']:.1f}% -> {'PASS' if r['verdict'] else 'not above'}")
passed = [r["measure"].replace(": last - first quarter drop rate", "") for r in rows if r["verdict"]]
print("at the study's scale the gap exceeds random routing's in: "
      + ("; ".join(passed) if passed else "none of the rows"))
assert rows, "the study record lost its drop rows"

# %% [markdown]
# ## What to take away
#
# - Position priority turns capacity overflow into a **position effect**: the first tokens of a
#   group are served, the last ones are not. But with OpenMoE's capacity formula (no factor $k$)
#   and first-choices-first slots, balanced *random* routing already does this at a 128-token
#   group: compare every curve with its dotted random-routing expectation, and read the
#   "beyond random" column: only that part says something about the learned router.
# - Group size matters: load fluctuations in a group of $G$ tokens shrink like $1/\sqrt{G}$, so
#   paper-like groups of many sequences drop less at the same cf, and less at the end.
# - The cures act on different causes: more capacity (larger cf, or the $k$-scaled formula that
#   OpenMoE's formula lacks) reduces how much is dropped; probability priority changes *who* is
#   dropped (the least confident assignments, wherever they are); dropless removes drops at the
#   cost of unbounded expert buffers. Whether dropless evaluation helps this model's loss is in
#   section 4, computed from the interval, quarter by quarter.
# - The paper's strongest case is data unlike the training mix (MT-Bench, a held-out domain):
#   exercise 2 measures it against the in-distribution drops with the same tools.
#
# ## Exercises
#
# 1. **Bigger groups.** The table has groups of 16 sequences. Try `group_size=4 * T` and
#    `group_size=64 * T` (with `batch_size=64`). How do the gap and its random baseline change?
#    *Hint:* `analysis.expected_drop_summary(G, E, k, C)` gives the baseline without simulation.
# 2. **A domain never seen.** Train lesson 9's run with `exclude_domains=("code",)` and measure
#    the drops on code. Compare with the paper's MT-Bench numbers.
# 3. **Random priority.** Why can this lesson not simply pass `slot_priority="random"`?
#    *Hint:* the random order needs a generator (`rng=`) in the forward; see `OpenMoE.forward`.
