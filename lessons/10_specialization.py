# %% [markdown]
# # Lesson 10 — Context-independent specialization: routing by token id
#
# **What you will learn**
# - the OpenMoE paper's first routing finding: an expert is chosen mostly by **which token**
#   it is, hardly by its context, position or domain;
# - two ways to measure it on a trained model: a *majority-expert predictor* (how often does
#   "the usual expert of this token id" guess the actual top-1 expert?) and the paper's
#   *standard deviation across experts* of each id's routing distribution;
# - why an honest comparison needs baselines: chance $1/E$, position ids, shuffled routing,
#   and an **untrained** router (a random router already routes by token id in layer 1!);
# - which experts each domain uses, and which bytes each expert takes.
#
# The model is the one lesson 9 trained (reused from the lesson output folder, or trained now).

# %%
import numpy as np

from _lesson import FAST, plt, shared_run, show

import tinymoe
from tinymoe import analysis as A
from tinymoe.checkpoint import load_model
from tinymoe.data import builtin_corpus
from tinymoe.nn.model import OpenMoE

ckpt = shared_run()
model, tok, cfg = load_model(ckpt)
E = cfg.n_experts
print(cfg.describe())

# %% [markdown]
# ## 1. Route held-out text and record every decision
#
# `analysis.collect_routing` runs the model (eval mode, no gradients) on token windows and
# returns, for every token, its id, its position, its domain and, per MoE layer, its top-$k$
# experts. We take non-overlapping windows of each domain's held-out text.

# %%
T = cfg.max_seq_len
corpus = builtin_corpus(max_chars=20_000 if FAST else None)
per_domain = 16 if FAST else 96                                     # windows per domain
windows, domains = [], []
for d, name in enumerate(corpus.names):
    toks = np.asarray(tok.encode(corpus.domains[name].val[: (per_domain + 2) * (T + 1) * 4]), dtype=np.int64)
    w = A.token_windows(toks, T, per_domain)                        # [n, T+1]
    windows.append(w)
    domains.append(np.full(w.shape[0], d))
windows, domains = np.concatenate(windows), np.concatenate(domains)
trace = A.collect_routing(model, windows, domains, batch_size=16, domain_names=corpus.names)
print(f"routed {trace.n_tokens:,} tokens; MoE layers {trace.layers}; held-out CE {trace.ce:.3f}")

# an untrained model of the same shape, as a control
untrained = OpenMoE(cfg, seed=123).eval()
trace0 = A.collect_routing(untrained, windows, domains, batch_size=16, domain_names=corpus.names)

# %% [markdown]
# ## 2. Does the token id predict the expert?
#
# Split the windows in two halves. On the first half, find for every token id its most
# frequent top-1 expert; on the second half, count how often that guess is right. Do the
# same with the **position** in the sequence as the key. Chance is $1/E$; "majority class"
# always guesses the most used expert. A predictor that knows nothing scatters around chance
# by about $\sqrt{p(1-p)/n}$.

# %%
fit = trace.window % 2 == 0                                         # even windows: fit; odd: score
rows = []
for j, layer in enumerate(trace.layers):
    p = A.specialization_predictors(trace.token_ids, trace.position, trace.expert_index[j], E, fit)
    p0 = A.specialization_predictors(trace0.token_ids, trace0.position, trace0.expert_index[j], E, trace0.window % 2 == 0)
    rows.append((layer, p, p0))
    print(f"block {layer}: token id {p['token_id']:.1%} | position {p['position']:.1%} | "
          f"majority class {p['majority_class']:.1%} | chance {p['chance']:.1%} (sd {p['sampling_sd']:.1%}) | "
          f"untrained model, token id {p0['token_id']:.1%}")
for layer, p, p0 in rows:
    print(f"block {layer}: training changed the token-id predictability from {p0['token_id']:.1%} to {p['token_id']:.1%}")
    assert p["token_id"] > p["position"], (
        f"block {layer}: the token id should predict the expert better than the position "
        f"({p['token_id']:.1%} vs {p['position']:.1%})")
    assert p["token_id"] > p["chance"] + 5 * p["sampling_sd"], f"block {layer}: token-id routing no better than chance"

# %% [markdown]
# ## 3. The paper's measure
#
# For each key (token id, or position id) seen at least $m$ times, take the distribution
# $d_e = n(\text{key}, e) / n(\text{key})$ of its top-1 expert and its standard deviation across
# the $E$ experts,
#
# $$s = \sqrt{\tfrac1E \textstyle\sum_e (d_e - 1/E)^2},\qquad 0 \le s \le \frac{\sqrt{E-1}}{E},$$
#
# averaged over keys. $s = 0$: the key is spread evenly; maximal: always the same expert. The
# paper reports about 0.085 for token ids and 0.01 for positions (OpenMoE, 32 experts). Finite
# samples give $s > 0$ even without specialization, so we also compute it after shuffling the
# experts across tokens.

# %%
m = 8 if FAST else 16
std_rows = []
for j, layer in enumerate(trace.layers):
    top1 = trace.expert_index[j][:, 0]
    s_id = A.routing_std(trace.token_ids, top1, E, m)
    s_id_sh = A.shuffled_routing_std(trace.token_ids, top1, E, m)
    s_pos = A.routing_std(trace.position, top1, E, m)
    s_pos_sh = A.shuffled_routing_std(trace.position, top1, E, m)
    std_rows.append((layer, s_id, s_id_sh, s_pos, s_pos_sh))
    print(f"block {layer}: std token ids {s_id['mean_std']:.3f} (shuffled {s_id_sh['mean_std']:.3f}, "
          f"{s_id['n_keys']} ids) | positions {s_pos['mean_std']:.3f} (shuffled {s_pos_sh['mean_std']:.3f}) "
          f"| max {s_id['max_std']:.3f}")
    assert s_id["mean_std"] > s_id_sh["mean_std"], f"block {layer}: token-id std is not above its shuffled baseline"

# %% [markdown]
# ### Picture: predictors, the paper's measure, and the token-by-expert table

# %%
fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.3]})
x = np.arange(len(rows))
w = 0.2
axes[0].bar(x - 1.5 * w, [100 * p["token_id"] for _, p, _ in rows], w, label="token id (trained)")
axes[0].bar(x - 0.5 * w, [100 * p0["token_id"] for _, _, p0 in rows], w, label="token id (untrained model)", alpha=0.5)
axes[0].bar(x + 0.5 * w, [100 * p["position"] for _, p, _ in rows], w, label="position (trained)")
axes[0].bar(x + 1.5 * w, [100 * p["majority_class"] for _, p, _ in rows], w, label="majority class", color="0.6")
axes[0].axhline(100 / E, color="k", ls="--", lw=1, label="chance 1/E")
axes[0].set_xticks(x, [f"block {layer}" for layer, _, _ in rows])
axes[0].set_ylabel("top-1 expert guessed right (%)")
axes[0].set_ylim(0, 119)
axes[0].set_title("majority-expert predictor (fit on half, scored on the other)")
axes[0].legend(fontsize=7, ncol=2)

vals = [(r[1]["mean_std"], r[2]["mean_std"], r[3]["mean_std"], r[4]["mean_std"]) for r in std_rows]
labels = ["token ids", "token ids, shuffled", "positions", "positions, shuffled"]
for i, lab in enumerate(labels):
    axes[1].bar(x + (i - 1.5) * w, [v[i] for v in vals], w, label=lab, hatch="//" if "shuffled" in lab else None,
                color="C0" if "token" in lab else "C1", alpha=0.5 if "shuffled" in lab else 1.0, edgecolor="k", lw=0.3)
axes[1].axhline(std_rows[0][1]["max_std"], color="k", ls="--", lw=1, label="maximum (always one expert)")
axes[1].set_ylim(0, std_rows[0][1]["max_std"] * 1.5)
axes[1].set_xticks(x, [f"block {r[0]}" for r in std_rows])
axes[1].set_ylabel("mean std across experts of d_e")
axes[1].set_title(f"paper's measure (keys seen >= {m} times)")
axes[1].legend(fontsize=7, loc="upper right")

j_last = len(trace.layers) - 1
uniq, counts = A.key_expert_counts(trace.token_ids, trace.expert_index[j_last][:, 0], E)   # [U], [U, E]
top_ids = np.argsort(-counts.sum(1))[:24]
dist = counts[top_ids] / counts[top_ids].sum(1, keepdims=True)                            # [24, E]
im = axes[2].imshow(dist, aspect="auto", cmap="magma", vmin=0, vmax=1)
axes[2].set_yticks(range(len(top_ids)), [A.token_label(tok, int(uniq[i])) for i in top_ids], fontsize=7)
axes[2].set_xticks(range(E))
axes[2].set_xlabel("expert")
axes[2].set_ylabel("byte (the 24 most frequent)")
axes[2].set_title(f"block {trace.layers[j_last]}: where each byte goes (rows sum to 1)")
fig.colorbar(im, ax=axes[2], label="share of the byte's top-1 choices")
fig.suptitle("Lesson 10: context-independent specialization — the token id decides the expert")
show(fig, "10_specialization.png")

# %% [markdown]
# ## 4. Domains and the tokens of each expert
#
# The paper found domain-level routing close to uniform (experts are not "the code expert"
# or "the math expert"). With byte tokens, domains use different *bytes* (digits and `=` in
# arithmetic, indentation and brackets in code), so whatever domain preference appears here is
# largely the token-id specialization seen through each domain's byte mix.
#
# "Close to uniform" needs a yardstick: a finite sample of windows never gives exactly equal
# shares. The statistic is the largest gap between a domain's share of an expert and that
# expert's share over all domains, $\max_{d,e} |s_{d,e} - s_e|$. The baseline: shuffle the
# domain labels across the windows (so that every "domain" is a random mix of the three),
# recompute the statistic, repeat. If the real gap lies inside the shuffled range, the
# domains route alike as far as this sample can tell.

# %%
fig, axes = plt.subplots(1, len(trace.layers), figsize=(6.5 * len(trace.layers), 3.4), squeeze=False,
                         layout="constrained")
for ax, layer, ex in zip(axes[0], trace.layers, trace.expert_index):
    share = A.expert_share_by_domain(ex, trace.domain, E, len(corpus.names))     # [D, E]
    im = ax.imshow(100 * share, cmap="viridis", vmin=0, aspect="auto")
    for dd in range(share.shape[0]):
        for e in range(E):
            ax.text(e, dd, f"{100 * share[dd, e]:.0f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_yticks(range(len(corpus.names)), corpus.names)
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    ax.set_title(f"block {layer}: % of each domain's assignments\n(uniform = {100 / E:.1f} %)")
    fig.colorbar(im, ax=ax, label="%")
fig.suptitle("Lesson 10: which experts each domain uses")
show(fig, "10_domain_share.png")

def domain_gap(ex, token_domain):
    """max over (domain, expert) of |share of the domain's assignments - the expert's overall share|."""
    share = A.expert_share_by_domain(ex, token_domain, E, len(corpus.names))      # [D, E]
    overall = np.bincount(np.asarray(ex).ravel(), minlength=E) / np.asarray(ex).size  # [E]
    return float(np.abs(share - overall).max())


n_shuffles = 20 if FAST else 100
shuffle_rng = np.random.default_rng(0)
window_domain = domains                                                          # [n windows]
for layer, ex in zip(trace.layers, trace.expert_index):
    share = A.expert_share_by_domain(ex, trace.domain, E, len(corpus.names))
    real = domain_gap(ex, trace.domain)
    shuffled = np.array([domain_gap(ex, shuffle_rng.permutation(window_domain)[trace.window])
                         for _ in range(n_shuffles)])                          # [n_shuffles]
    above = int((shuffled >= real).sum())
    verdict = ("inside the shuffled range: no domain preference beyond what shuffled labels give"
               if real <= shuffled.max() else
               f"above all {n_shuffles} shuffles: the domains route differently (p < {1 / (n_shuffles + 1):.2f})")
    print(f"block {layer}: domain shares {100 * share.min():.0f}-{100 * share.max():.0f} % (uniform {100 / E:.1f} %); "
          f"largest gap to the expert's overall share {100 * real:.1f} points, shuffled labels "
          f"{100 * shuffled.min():.1f}-{100 * shuffled.max():.1f} points ({above} of {n_shuffles} shuffles >= real): {verdict}")

top = A.top_tokens_per_expert(trace.token_ids, trace.expert_index[j_last], E, n_top=6, min_count=m)
print(f"block {trace.layers[j_last]}: the most specific bytes of each expert, with P(expert | byte)")
for t in top:
    items = ", ".join(f"{A.token_label(tok, it['id'])!s} {it['p']:.0%}" for it in t["specific"][:6])
    print(f"  expert {t['expert']} ({t['n_tokens']:6d} tokens): {items}")

# %% [markdown]
# ## 5. The same measures at the study's scale
#
# Everything above is one `mini` run of lesson 9, whose experts sit beside a shared FFN in
# two of four blocks. `python -m tinymoe findings --config lab` ran the same measures on the
# `lab` preset, whose experts carry every FFN (MoE in all four blocks, no shared FFN), trained
# over 3 seeds next to dense twins; the repository keeps that run's record in
# `docs/study/lab.json` (the README's analysis section quotes it). Its specialization rows,
# each an effect with its 95% interval against a baseline with its own:

# %%
import json

from _lesson import ROOT

study = json.loads((ROOT / "docs" / "study" / "lab.json").read_text())
print(f"study: {study['command']} ({study['models']['moe']['describe']})")
spec_rows = [r for r in study["findings"] if r["finding"] == "context-independent specialization"]
adds_rows = [r for r in study["findings"] if r["finding"] == "what training adds to specialization"]


def pct(iv):
    return f"{100 * iv['estimate']:.1f}% [{100 * iv['low']:.1f}, {100 * iv['high']:.1f}]"


for r in spec_rows + adds_rows:
    print(f"  {r['measure']}: {pct(r['effect'])} vs {r['baseline_name']} {pct(r['baseline'])}"
          f" -> {'PASS' if r['verdict'] else 'not above'}")
spec_all = all(r["verdict"] for r in spec_rows)
adds_blocks = [r["measure"].split(":")[0] for r in adds_rows if r["verdict"]]
print("at the study's scale: the token id predicts the top-1 expert "
      + ("above both baselines in every MoE block" if spec_all else
         "above both baselines NOT in every block (see the rows)")
      + "; training adds id skill beyond the untrained router in "
      + (", ".join(adds_blocks) if adds_blocks else "no block") + f" of {len(adds_rows)}")
assert len(spec_rows) >= 2 and len(adds_rows) >= 1, "the study record lost its specialization rows"

# %% [markdown]
# ## What to take away
#
# - Routing is, to a large degree, a **lookup by token id**: the id predicts the top-1 expert
#   far above chance and far better than the position does, and the paper's std measure is
#   several times its shuffled baseline for ids but not for positions.
# - Much of this exists **before any training** (the pale bars): the router of a fresh model
#   sees mostly the token's embedding, so the byte alone decides. In our run (lesson 9, mini,
#   300 updates) training *lowers* the id-predictability a little (about 65 % -> 54 % in
#   normal mode) as context starts to matter — yet the id stays by far the strongest single
#   predictor. "Context-independent" is a starting point the router never fully leaves.
# - Section 5 repeats the measures on the `lab` study, where the experts carry every FFN:
#   its printed line says in which blocks the id predictor beats both baselines and in which
#   training adds id skill beyond the untrained router; read it rather than assume it.
# - This is what makes the next two findings possible: routing decided by token id can be
#   learned early and then barely changes (lesson 11), and it cannot adapt to a token's place
#   in the sequence, so crowded experts drop late tokens (lesson 12).
#
# ## Exercises
#
# 1. **Deeper layers.** Compare block 1 and block 3 above (mini). Is the deeper MoE layer
#    less id-driven? *Hint:* more attention layers mix in context before it.
# 2. **Top-k vs top-1.** `A.routing_std(trace.token_ids, trace.expert_index[j], E, m)` uses both
#    choices. How do the numbers change, and why is the maximum different?
#    *Hint:* `A.max_routing_std(E, 2)`.
# 3. **BPE.** Train lesson 9's run with `tokenizer="bpe"` and `vocab_size=1024`. Are whole-word
#    tokens more or less specialised than bytes? *Hint:* the paper blames part of the effect on
#    the tokenizer.
