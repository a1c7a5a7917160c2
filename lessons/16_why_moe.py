# %% [markdown]
# # Lesson 16 — Why MoE: more parameters than compute
#
# **What you will learn**
# - what an MoE buys: it **holds** every expert's weights but a token **uses** only $k$ of
#   the $E$ experts, so it has more parameters (total) than it spends compute on (active);
# - how training compute is counted: about $6 N_\text{active}$ FLOPs per token for the weight
#   matmuls (forward 2, backward 4) plus the attention scores; an MoE counts $k$ experts
#   per token; checked by hand against `tinymoe.study.plan.flops_per_update`;
# - the two fair comparisons: a **dense twin with the same active parameters** (the same
#   compute per token: does holding more parameters help?) and a **dense twin with the same
#   total parameters** (the same memory, every weight used for every token: the upper
#   reference the MoE is trying to approach at a fraction of its compute);
# - how to compare training runs honestly: the same data, seeds, recipe and number of
#   updates, at least two seeds per model, and a difference is called a difference only
#   when it is larger than the spread of the seeds;
# - the "why MoE" picture: held-out loss against cumulative training FLOPs.
#
# Everything below is computed on this run's numbers; the sentences that depend on the
# outcome are chosen by the code from those numbers. (Normal mode: 2 seeds x 3 models x 400
# updates, 2-3 minutes on one core. `TINYMOE_FAST=1`: 6 updates each, which only
# exercises the code: its losses mean nothing.)

# %%
import json
import math

import numpy as np

from _lesson import FAST, OUT, plt, show

from tinymoe.analysis import verdict
from tinymoe.config import get_preset
from tinymoe.jsonio import json_ready
from tinymoe.study.cli import run_summary
from tinymoe.study.measures import seed_summary
from tinymoe.study.plan import RunSpec, dense_twin, flops_per_update, param_counts
from tinymoe.train import TrainConfig, train

# The one place the MoE's shape is set: an MoE in every block, no shared FFN, so that the
# experts carry all of the FFN weights (the dense twins below are derived from it).
MOE = get_preset("toy").replace(n_experts=8, moe_every=1, shared_ffn=False)

SEEDS = (0, 1)
STEPS = 6 if FAST else 400
RUNS = OUT / ("16_why_moe_fast" if FAST else "16_why_moe")
RECIPE = TrainConfig(                            # the same for every model and seed
    steps=STEPS, batch_size=2 if FAST else 16, seq_len=32 if FAST else 64,
    max_chars=6000 if FAST else None, lr=3e-3, warmup=1 if FAST else 40,
    eval_every=2 if FAST else 50, eval_batches=1 if FAST else 4,
    save_every=0, snapshot_every=0, log_every=1 if FAST else 10, overwrite=True)
print(MOE.describe())

# %% [markdown]
# ## 1. Three models
#
# `dense_twin(moe, match)` keeps the MoE's width, depth, heads, vocabulary and sequence
# length, puts a dense SwiGLU FFN in every block and picks its width $d_{ff}$ so that the
# parameter count ("active" or "total") is as close to the MoE's as a whole $d_{ff}$ allows
# (a dense block holds $3 d\, d_{ff}$ FFN weights, so the count misses by at most
# $3 d L / 2$). `param_counts` gives the counts the table prints (lesson 8 explains them).

# %%
MODELS = {"moe": MOE, "dense_active": dense_twin(MOE, "active"), "dense_total": dense_twin(MOE, "total")}
LABELS = {"moe": f"MoE ({MOE.n_experts} experts, top-{MOE.top_k})", "dense_active": "dense, equal active",
          "dense_total": "dense, equal total"}
T = RECIPE.seq_len
tokens_per_update = RECIPE.batch_size * T * RECIPE.grad_accum
counts = {name: param_counts(cfg) for name, cfg in MODELS.items()}
flops_tok = {name: flops_per_update(cfg, RECIPE) / tokens_per_update for name, cfg in MODELS.items()}
print(f"{'model':<22} {'FFN width':>9} {'total params':>13} {'active params':>14} {'train FLOPs/token':>18}")
for name, c in counts.items():
    width = f"{c['d_ff_expert']} x{MOE.n_experts}" if c["moe_layers"] else str(c["d_ff"])
    print(f"{LABELS[name]:<22} {width:>9} {c['total']:>13,} {c['active']:>14,} {flops_tok[name]:>18,.0f}")

# %% [markdown]
# ## 2. Counting by hand
#
# **Parameters.** Token embedding $V d$ (tied with the LM head, counted once; an untied head
# adds $d V$); per block two
# RMSNorm scales ($2d$), attention $4 d\, d_a$ ($W_q, W_k, W_v, W_o$, $d_a$ = heads x head
# size), and the FFN: dense $3 d\, d_{ff}$, or a router $d E$ and $E$ experts of
# $3 d f$ each, of which a token uses $k$; a final norm $d$.
#
# **Training FLOPs per token** (Kaplan et al. 2020, §2.1; PaLM, appendix B). A weight matrix
# of $n$ parameters costs $2n$ FLOPs per token forward (a multiply and an add per weight) and
# $4n$ backward (the gradient of the input and of the weight, lesson 2's 1:2), so $6 N$ for
# the $N$ matmul weights a token passes through: attention, the FFN (for the MoE, the router
# and **$k$ experts**), and the LM head $d V$ (the embedding lookup is free; norms are
# negligible). Attention adds the scores and the weighted sum, $2 \cdot T d_a$ multiply-adds
# per token and layer: $12 L\, T d_a$ with the backward. The MoE's count assumes all $k$
# assignments are computed; with capacity drops (lesson 6) it computes fewer (section 4).
#
# Build it yourself, then check against the library:

# %%
def by_hand(cfg, T):
    """(total params, active params, training FLOPs per token) from the shapes."""
    assert cfg.ffn_kind == "swiglu" and not cfg.router_noise and not cfg.router_bias_rate, \
        "this hand count covers SwiGLU FFNs and routers without noise or bias"
    d, V, A, L = cfg.d_model, cfg.vocab_size, cfg.attn_dim, cfg.n_layers
    total = active = V * d + d + (0 if cfg.tie_embeddings else d * V)   # embedding, final norm, untied head
    matmul = d * V + L * 4 * d * A                            # weights a token multiplies: head + attention
    for i in range(L):
        total += 2 * d + 4 * d * A
        active += 2 * d + 4 * d * A
        if cfg.is_moe_block(i):
            E, k, f = cfg.n_experts, cfg.top_k, cfg.expert_ff
            total += d * E + E * 3 * d * f
            active += d * E + k * 3 * d * f                   # a token uses k of the E experts
            matmul += d * E + k * 3 * d * f
            if cfg.shared_ffn:
                total += d + 3 * d * cfg.shared_ff
                active += d + 3 * d * cfg.shared_ff
                matmul += 3 * d * cfg.shared_ff
        else:
            total += 3 * d * cfg.d_ff
            active += 3 * d * cfg.d_ff
            matmul += 3 * d * cfg.d_ff
    return total, active, 6 * matmul + 12 * L * T * A


for name, cfg in MODELS.items():
    total, active, fl = by_hand(cfg, T)
    print(f"{LABELS[name]:<22} by hand: total {total:,}, active {active:,}, FLOPs/token {fl:,}")
    assert (total, active) == (counts[name]["total"], counts[name]["active"]), (
        f"{name}: parameter count by hand ({total:,} / {active:,}) differs from param_counts "
        f"({counts[name]['total']:,} / {counts[name]['active']:,}): does the active count use k of the E experts?")
    assert abs(fl - flops_tok[name]) <= 1e-9 * fl, (
        f"{name}: training FLOPs per token by hand {fl:,} vs flops_per_update / tokens {flops_tok[name]:,.0f}: "
        "6 N_active (k experts for the MoE) + 12 L T d_attn")

# %% [markdown]
# The twins hit their targets within half a "row" of $d_{ff}$, and the equal-total twin uses
# every one of its weights for every token:

# %%
row = 3 * MOE.d_model * MOE.n_layers                          # parameters per unit of d_ff
for name, match in (("dense_active", "active"), ("dense_total", "total")):
    miss = counts[name][match] - counts["moe"][match]
    print(f"{LABELS[name]}: {match} params {counts[name][match]:,} vs the MoE's {counts['moe'][match]:,} "
          f"(off by {miss:+,}; at most {row // 2:,} allowed)")
    assert abs(miss) <= row / 2, f"{name} misses the MoE's {match} count by {miss:,} > {row / 2:,.0f}"
    assert counts[name]["moe_layers"] == 0 and counts[name]["total"] == counts[name]["active"]
ratio_total = flops_tok["dense_total"] / flops_tok["moe"]
ratio_active = flops_tok["dense_active"] / flops_tok["moe"]
print(f"compute per token relative to the MoE: equal active {ratio_active:.3f}x, equal total {ratio_total:.2f}x "
      f"(the FFN alone: E/k = {MOE.n_experts / MOE.top_k:g}x; attention, router and LM head are the same for all)")
print(f"parameters relative to the MoE: equal active {counts['dense_active']['total'] / counts['moe']['total']:.2f}x, "
      f"equal total {counts['dense_total']['total'] / counts['moe']['total']:.2f}x")
assert abs(ratio_active - 1) < 0.05 and ratio_total > 1.5, (ratio_active, ratio_total)

# %% [markdown]
# So the equal-active twin spends the same compute per token as the MoE with the printed
# fraction of its parameters, and the equal-total twin holds the MoE's parameters but spends
# the printed multiple of its compute.
#
# **Why the equal-total twin is the upper reference.** Put the $E$ experts' hidden units
# side by side: $E$ SwiGLU experts of width $f$ are one SwiGLU FFN of width $E f$ whose hidden
# units come in $E$ blocks, and that is the equal-total twin's FFN (the twin is a few units
# wider: it spends the routers' $d E$ weights per layer on FFN width).
# The MoE evaluates $k$ of the $E$ blocks for each token and scales each by its gate; the
# dense twin evaluates every block for every token: the same parameters and $E/k$ times the
# FFN compute. So one expects the dense twin to be at least as good per update, and the
# question is how close the MoE gets to it with $k/E$ of the FFN compute. If routing cost
# nothing and a token's $k$ blocks were all it needed, the MoE would reach the equal-total
# twin's loss at the equal-active twin's compute: that is the hope the runs below test.
#
# ## 3. Training the six runs
#
# The same recipe for all: the built-in corpus, AdamW with warmup and cosine decay, the same
# number of updates, and held-out evaluations along the way (`eval_every`; the same held-out
# windows for every model). The seed sets both the initial weights and the order of the
# batches, so for a given seed all three models see the same batches in the same order; the
# second seed changes both. `tinymoe.train.train` writes each run to its folder;
# `tinymoe.study.cli.run_summary` reads the final held-out loss per domain and the curve
# from its `log.jsonl` (as `python -m tinymoe findings` does).

# %%
specs, summary = [], {}
for name, cfg in MODELS.items():
    for seed in SEEDS:
        spec = RunSpec(name=f"{name}-seed{seed}", kind=name, seed=seed, model=cfg,
                       train=RECIPE.replace(seed=seed, out_dir=str(RUNS / f"{name}-seed{seed}")))
        result = train(spec.model, spec.train, progress=not FAST)
        assert result.status == "done", f"{spec.name}: {result.message}"
        s = run_summary(spec, {"status": result.status})
        log = [json.loads(line) for line in (spec.folder / "log.jsonl").read_text().splitlines()]
        dropped = [e["dropped"] for e in log if e["event"] == "train"]
        s["dropped_in_training"] = float(np.mean(dropped)) if dropped else 0.0
        s["unigram_entropy"] = next(e for e in log if e["event"] == "start")["domains"]
        summary[spec.name] = s
        specs.append(spec)
        print(f"{spec.name:<20} held-out mean {s['final_mean']:.3f} nats/byte")
domains = [d for d in summary[specs[0].name]["final"]]

# %% [markdown]
# ## 4. The table, and what it says
#
# Per model: the final held-out loss (nats per byte) per domain and the mean over domains,
# as the mean of the seeds with their [min, max] range. **The rule** (the one
# `python -m tinymoe findings` uses): model A is lower than model B *by more than the seed
# spread* when every seed of A is below every seed of B, i.e. the two ranges do not overlap
# (`tinymoe.analysis.verdict(a, b, "less")` on `seed_summary` ranges). With overlapping ranges
# the two are not separable at this scale, whatever their means.

# %%
def final(name, domain):
    """The seeds' final held-out loss of one model on one domain ('mean' = mean of domains)."""
    runs = [summary[f"{name}-seed{s}"] for s in SEEDS]
    return seed_summary([r["final_mean"] if domain == "mean" else r["final"][domain] for r in runs])


table = {name: {dom: final(name, dom) for dom in domains + ["mean"]} for name in MODELS}
dropped = {name: np.mean([summary[f"{name}-seed{s}"]["dropped_in_training"] for s in SEEDS]) for name in MODELS}
print(f"{'model':<22} {'total':>9} {'active':>9} {'FLOPs/tok':>10} {'dropped':>8} | "
      + " | ".join(f"{d:^21}" for d in domains + ["mean"]))
for name in MODELS:
    c = counts[name]
    cells = [f"{v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]" for v in table[name].values()]
    print(f"{LABELS[name]:<22} {c['total']:>9,} {c['active']:>9,} {flops_tok[name]:>10.3g} {dropped[name]:>8.1%} | "
          + " | ".join(cells))
print("(held-out nats/byte: mean of the seeds [min, max]; 'dropped': share of expert assignments over capacity "
      "in training, mean over updates)")


def compare(a, b, dom="mean"):
    """'lower' / 'higher' when a's seed range lies entirely below / above b's, else 'not separable'."""
    if verdict(table[a][dom], table[b][dom], "less"):
        return "lower"
    if verdict(table[a][dom], table[b][dom], "greater"):
        return "higher"
    return "not separable"


for twin in ("dense_active", "dense_total"):
    print(f"MoE against the {LABELS[twin]} twin, per domain: "
          + ", ".join(f"{d} {compare('moe', twin, d)}" for d in domains + ["mean"]))
vs_active, vs_total = compare("moe", "dense_active"), compare("moe", "dense_total")
gap = {n: table[n]["mean"]["mean"] - table["moe"]["mean"]["mean"] for n in ("dense_active", "dense_total")}
spread = max(table[n]["mean"]["range"] for n in MODELS)
print(f"mean over domains: MoE {table['moe']['mean']['mean']:.3f}; equal-active minus MoE {gap['dense_active']:+.3f}, "
      f"equal-total minus MoE {gap['dense_total']:+.3f}; largest seed range {spread:.3f} nats/byte")
if vs_active == "lower":
    print("-> the MoE is lower than the dense-equal-active twin by more than the seed spread: at the same compute "
          "per token, holding more parameters paid off here.")
elif vs_active == "higher":
    print("-> the MoE is HIGHER than the dense-equal-active twin by more than the seed spread: at this scale and "
          "budget its extra parameters did not pay for themselves. (Why is not measured here; one candidate is "
          "the 'dropped' column, which exercise 2 removes.)")
else:
    print("-> the MoE and the dense-equal-active twin are not separable at this scale: their seed ranges overlap.")
if vs_total == "higher":
    print("-> the dense-equal-total twin is lower than the MoE by more than the seed spread: the MoE does not reach "
          f"the upper reference (which spends {ratio_total:.2f}x the MoE's compute per token).")
elif vs_total == "lower":
    print("-> the MoE is even lower than the dense-equal-total twin by more than the seed spread.")
else:
    print("-> the MoE and the dense-equal-total twin are not separable at this scale: their seed ranges overlap.")
if vs_active == "lower" and vs_total == "higher":       # the MoE lies between its twins
    share = gap["dense_active"] / (gap["dense_active"] - gap["dense_total"])
    print(f"   the MoE closes {share:.0%} of the way from the equal-active to the equal-total twin "
          f"(point estimates; 0% = equal-active, 100% = equal-total)")

# %% [markdown]
# Self-checks: every run learned something (its held-out loss is below the loss of a
# model that ignores context: the unigram entropy of each domain, or $\ln V$ in fast mode),
# the curve ends at the printed final loss, and the dense models drop nothing.

# %%
for name, s in summary.items():
    bar = {d: s["unigram_entropy"][d]["val_unigram_entropy"] for d in domains} if not FAST \
        else {d: math.log(MODELS[s["kind"]].vocab_size) for d in domains}
    for d in domains:
        assert s["final"][d] < bar[d], (f"{name}: held-out {d} {s['final'][d]:.3f} nats/byte is not below "
                                        f"{bar[d]:.3f}: the run did not learn")
    assert s["curve"]["step"][-1] == STEPS and abs(s["curve"]["nats_per_byte"][-1] - s["final_mean"]) < 1e-12, (
        f"{name}: the curve should end at step {STEPS} with the final loss {s['final_mean']:.4f}")
    assert s["curve"]["flops"][-1] == STEPS * flops_per_update(MODELS[s["kind"]], RECIPE), (
        f"{name}: the curve's last point should be {STEPS} updates x FLOPs per update")
assert dropped["dense_active"] == dropped["dense_total"] == 0.0, "a dense model has nothing to drop"
for twin, said in (("dense_active", vs_active), ("dense_total", vs_total)):   # the rule, from the raw seed values
    moe_v = [summary[f"moe-seed{s}"]["final_mean"] for s in SEEDS]
    twin_v = [summary[f"{twin}-seed{s}"]["final_mean"] for s in SEEDS]
    rule = "lower" if max(moe_v) < min(twin_v) else "higher" if min(moe_v) > max(twin_v) else "not separable"
    assert said == rule, (f"MoE vs {twin}: the text said {said!r} but the seed values {moe_v} vs {twin_v} "
                          f"say {rule!r}: the seed ranges (seed_summary) or the verdict rule are wrong")
(RUNS / "summary.json").write_text(json.dumps(json_ready({
    "fast": FAST, "moe": MOE.to_dict(), "recipe": RECIPE.to_dict(), "seeds": list(SEEDS), "runs": summary,
    "flops_per_token": flops_tok, "counts": counts}), indent=1))
print(f"summary for the solutions: {RUNS / 'summary.json'}")

# %% [markdown]
# ## 5. The picture: held-out loss against training compute
#
# Each model's line is the mean of its seeds, the band their range. Along the x axis the
# models move at different speeds: the equal-total twin spends the printed multiple of the
# MoE's FLOPs on every update, so its points lie further right. A model is more
# compute-efficient where its line lies *below* another's at the same x. The right panel is
# the final loss per domain.

# %%
colors = {"moe": "tab:blue", "dense_active": "tab:orange", "dense_total": "tab:green"}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.3, 1]})
for name in MODELS:
    curves = [summary[f"{name}-seed{s}"]["curve"] for s in SEEDS]
    x = np.asarray(curves[0]["flops"])                                   # the same steps for every seed
    y = np.asarray([c["nats_per_byte"] for c in curves])                 # [seeds, points]
    ax1.plot(x, y.mean(axis=0), "o-", ms=3, color=colors[name], label=f"{LABELS[name]} ({len(SEEDS)} seeds)")
    ax1.fill_between(x, y.min(axis=0), y.max(axis=0), color=colors[name], alpha=0.2)
ax1.set_xscale("log")
ax1.set_xlabel("cumulative training FLOPs (6 N_active + attention, per token x tokens)")
ax1.set_ylabel("held-out loss, nats/byte (mean of domains)")
ax1.set_title("loss against compute")
ax1.legend(fontsize=8)
xs = np.arange(len(domains) + 1)
for j, name in enumerate(MODELS):
    v = [table[name][d] for d in domains + ["mean"]]
    mean = np.array([t["mean"] for t in v])
    err = np.array([[t["mean"] - t["min"] for t in v], [t["max"] - t["mean"] for t in v]])
    ax2.bar(xs + (j - 1) * 0.27, mean, 0.27, yerr=err, capsize=3, color=colors[name], label=LABELS[name])
ax2.set_xticks(xs, domains + ["mean"])
lo = min(table[n][d]["min"] for n in MODELS for d in domains + ["mean"])
hi = max(table[n][d]["max"] for n in MODELS for d in domains + ["mean"])
ax2.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.1 * (hi - lo) + 0.05)
ax2.set_ylabel("final held-out loss, nats/byte (bar: seed range)")
ax2.set_title(f"after {STEPS} updates")
fig.suptitle(f"Lesson 16: an MoE against its dense twins{' (fast mode: meaningless numbers)' if FAST else ''}")
show(fig, "16_why_moe.png")

# %% [markdown]
# ## What to take away
#
# - An MoE's parameter count and its compute are two numbers: total parameters grow with
#   $E$, compute per token with $k$. The FLOPs count $6 N_\text{active}$ + attention makes
#   that precise, and the dense twins pin down the comparison: equal active = same compute,
#   equal total = same parameters.
# - Whether the extra parameters pay off is an empirical question that depends on the scale,
#   the budget and the routing. Section 4 printed this run's answer, decided by the seed
#   spread; the findings study (`python -m tinymoe findings`, docs/findings.md) asks the
#   same question with three seeds and the routing analysis on top.
# - The FLOPs are the *counted* compute, $k$ experts per token. OpenMoE's capacity
#   (lesson 6) drops assignments in training (the "dropped" column), so the MoE computed
#   less than it is charged for; exercise 2 removes the drops.
#
# ## Exercises
#
# 1. **Where the FLOPs go.** For this MoE and for `get_preset("openmoe-base")`, compute the
#    ratio of training FLOPs per token of the equal-total twin to the MoE, and compare it with
#    $E/k$. Why is it smaller? *Hint:* `flops_per_update(cfg, TrainConfig(batch_size=1,
#    seq_len=T))` is the per-token count times T; attention and the LM head are shared.
# 2. **Without drops.** Retrain the MoE with `capacity_factor=None, eval_capacity_factor=None`
#    (dropless in training and evaluation) with the same recipe and seeds. Does it move relative to the equal-active twin? Use the same seed-spread
#    rule. *Hint:* the FLOPs per token do not change; what the MoE really computes does.
# 3. **More experts, same compute.** Retrain with `n_experts=16` (twice the total
#    parameters, the same $k$). What happens to the FLOPs per token and to the loss? *Hint:*
#    only the router grows with $E$ in the compute count.
