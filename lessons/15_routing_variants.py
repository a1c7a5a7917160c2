# %% [markdown]
# # Lesson 15 — Beyond OpenMoE: routing variants
#
# **What you will learn**
# - that OpenMoE's router (top-k token choice, capacity, position priority, the Switch aux
#   loss) is one point in a design space, and how four other points differ:
#   **expert choice** (Zhou et al. 2022), **noisy top-k gating** (Shazeer et al. 2017),
#   **bias balancing without an aux loss** (DeepSeek-V3, with softmax or its sigmoid
#   scores) and **fine-grained + shared
#   experts** (DeepSeekMoE); Switch (top-1) is the fifth, with no new code;
# - each is one `ModelConfig` field in tinymoe (`python -m tinymoe train --help` lists
#   them), built into the same router and MoE layer, with a hand-written backward checked
#   against a PyTorch twin written from its paper (`tests/test_variants.py`);
# - why expert choice **leaks the future** in a decoder, and how to measure the leak — and
#   that top-2 token choice is not perfectly causal either;
# - how to compare the variants on one budget with `python -m tinymoe compare-routers`, and
#   how to read its report. The lab's numbers here come from a small, short run: they show
#   what the measures do, not which router is best.

# %%
import numpy as np

from _lesson import FAST, OUT, plt, show

import tinymoe
from tinymoe import backend as B
from tinymoe.config import count_parameters, get_preset
from tinymoe.nn.model import OpenMoE
from tinymoe.nn.moe import MoE
from tinymoe.nn.routers import update_biases
from tinymoe.routing_variants import fine_grained, route_expert_choice, routing_changed
from tinymoe.variants import VARIANTS, compare_routers, format_markdown, variant_config

base = get_preset("toy")
for name, (what, _) in VARIANTS.items():
    cfg = variant_config(name, base)
    c = count_parameters(cfg)
    print(f"{name:14s} E={cfg.n_experts:2d} k={cfg.top_k} expert width {cfg.expert_ff:3d} "
          f"params {c['total']:,} active {c['active']:,}  | {what}")

# %% [markdown]
# ## 1. Expert choice: the experts pick
#
# Token choice: every token picks its top-$k$ experts, and an expert may be over-subscribed
# (then capacity drops tokens). Expert choice turns the table around. In a group of $G$ tokens
# with probabilities $S = \mathrm{softmax}(X W_r)$ (shape $[G, E]$), **each expert takes the
# $C$ tokens with the largest $S_{:,e}$**, gating weight $S_{n,e}$. Every expert gets exactly
# $C$ tokens (perfect balance, no aux loss needed), but a token may get several experts — or
# none. With $C = kG/E$ the experts do the same work as dropless top-$k$. Below, 32 tokens
# with random logits, at that capacity and at half of it.

# %%
rng = np.random.default_rng(0)
G, E, k = 32, 4, 2
logits = rng.normal(0, 1.0, size=(G, E))
for cf in (1.0, 0.5):                                        # C = k G / E, then half of it
    r = route_expert_choice(logits, top_k=k, capacity_factor=cf, capacity_mode="k_scaled", min_capacity=1)
    per_token = r.kept.sum(axis=1)                           # experts that took each token
    print(f"cf {cf}: C = {r.capacity} tokens per expert; load per expert {r.load_after.tolist()}; "
          f"tokens with 0, 1, 2, ... experts: {np.bincount(per_token, minlength=E + 1).tolist()}; "
          f"tokens with no expert: {r.dropped_fraction:.1%}")
    assert (r.load_after == r.capacity).all(), "every expert takes exactly C tokens"
    assert per_token.sum() == E * r.capacity

# %% [markdown]
# ## 2. The leak
#
# Which $C$ tokens an expert takes depends on the **whole group** — including the tokens that
# come *after* token $t$ in a decoder. So the routing of token $t$ (and therefore its output)
# can change when later tokens change: the model's prediction for $t+1$ peeks at the future
# through the router. At generation time there is no future (one new token at a time), so
# the routing the model saw in training cannot be reproduced.
#
# `routing_changed(model, ids, cut)` measures it: replace the tokens from `cut` on with random
# ones, and count the tokens before `cut` whose set of experts changed (every MoE layer).
# Same untrained weights, three routers:

# %%
ids = np.random.default_rng(1).integers(0, base.vocab_size, size=(8, 64))
leaks = {}
for name in ("expert_choice", "openmoe", "switch"):
    cfg = variant_config(name, base.replace(max_seq_len=64))
    leaks[name] = routing_changed(OpenMoE(cfg, seed=0), ids, cut=32)["changed"]
    print(f"{name:14s} share of early tokens re-routed by changing later tokens: {leaks[name]:.3f}")
assert leaks["switch"] == 0.0, "top-1 with position priority is causal"
assert leaks["expert_choice"] > leaks["openmoe"] > leaks["switch"]

# %% [markdown]
# Top-1 with position priority (Switch) is causal: a token's slot depends only on the tokens
# before it. OpenMoE's top-2 is not quite: all first choices of a group are served before any
# second choice, so a token's **second** choice can be dropped by a *later* token's first
# choice. The numbers above show how often that happened here, and that expert choice,
# where the later tokens compete for every expert, re-routed more of the early tokens.
#
# ## 3. Noisy top-k gating
#
# Shazeer et al. add trainable Gaussian noise to the logits in training:
# $H = x W_r + \varepsilon \cdot \mathrm{softplus}(x W_\text{noise})$, $\varepsilon \sim N(0,1)$.
# With $W_\text{noise} = 0$ (their init) the noise has std $\ln 2 \approx 0.69$, far above the
# spread of a fresh router's logits, so early routing is close to random — exploration. The
# noise comes from the run's routing RNG (seeded, saved in checkpoints), and is off in eval.
# Their balance loss can replace the Switch one (`aux_loss_kind="shazeer"`): the squared
# coefficients of variation of each expert's summed gates and of its smooth "load", the
# normal-CDF probability of being in the top-$k$ under the noise.

# %%
cfg = base.replace(router_noise=True, renormalize=True)
moe = MoE(cfg, rng=B.default_rng(0))
x = tinymoe.Tensor(np.random.default_rng(2).normal(size=(2, 16, cfg.d_model)).astype(np.float32))
a = moe(x, rng=np.random.default_rng(10))[3].expert_index
b = moe(x, rng=np.random.default_rng(11))[3].expert_index
with moe.evaluating():
    c1, c2 = moe(x)[3].expert_index, moe(x)[3].expert_index
print(f"training, two noise draws: {np.mean(a != b):.1%} of choices differ; eval: {np.mean(c1 != c2):.1%}")
assert np.mean(a != b) > 0 and np.mean(c1 != c2) == 0

# %% [markdown]
# ## 4. Bias balancing without an aux loss
#
# DeepSeek-V3 drops the aux loss (whose gradient competes with the language-model loss) and
# balances with a per-expert bias $b$: the top-$k$ is chosen on $p + b$, the gating weights
# stay $p$, and after every optimizer step $b_i \leftarrow b_i + \gamma\,\mathrm{sign}(\bar{\ell} - \ell_i)$
# (overloaded experts get a lower bias; $\ell$ is the load summed over the step's
# micro-batches: the forwards only count, `update_biases` moves the bias). DeepSeek-V3's
# scores are sigmoids, $s = \sigma(z)$, chosen on $s + b$ and normalised over the chosen
# $k$ (`router_score="sigmoid"`, the lab's `sigmoid_bias`); below, softmax probabilities. Below: a router whose weights prefer expert 0 for
# almost every token (a layer of width 8, so that the tokens' probabilities differ: a bias
# can only split tokens whose preferences differ), a fixed batch, **no weight update at
# all** — only the bias moves.

# %%
cfg = base.replace(d_model=8, n_heads=2, n_experts=4, top_k=1, router_bias_rate=0.01, aux_loss_coef=0.0,
                   capacity_factor=0.0)
moe = MoE(cfg, rng=B.default_rng(0))
w = np.random.default_rng(1).normal(0.0, 0.3, size=(cfg.d_model, 4))
w[:, 0] += 0.6
moe.router.weight.data[...] = w
x = tinymoe.Tensor(np.abs(np.random.default_rng(3).normal(size=(4, 16, cfg.d_model))).astype(np.float32))
ratio = []
for _ in range(150):
    load = B.to_numpy(moe(x)[3].load_before)
    update_biases(moe)          # what the trainer does after each optimizer step
    ratio.append(load.max() / load.mean())
print(f"max/mean load: first forward {ratio[0]:.2f}, last {ratio[-1]:.2f}; bias now {B.to_numpy(moe.router.bias.data).round(3)}")
assert ratio[-1] < ratio[0]

# %% [markdown]
# ## 5. Fine-grained and shared experts
#
# DeepSeekMoE cuts each expert into $m$ narrower ones ($mE$ experts of width $f/m$, top-$mk$):
# the same parameters and compute per token, but many more combinations of experts. Some
# experts are kept **shared** (always on); OpenMoE's shared FFN is the case "one shared
# expert of width $d_{ff}$". $s$ shared experts of width $w$ are one SwiGLU of width $s w$.

# %%
fg = fine_grained(base, 2, shared_experts=2)
c0, c1 = count_parameters(base), count_parameters(fg)
print(f"base: E={base.n_experts} k={base.top_k} width {base.expert_ff}, shared {base.shared_ff}; "
      f"fine-grained: E={fg.n_experts} k={fg.top_k} width {fg.expert_ff}, shared {fg.shared_ff}")
print(f"expert params {c0['experts']:,} vs {c1['experts']:,}; active expert params {c0['experts_active']:,} vs "
      f"{c1['experts_active']:,}; router params {c0['routers']:,} vs {c1['routers']:,}")
assert c0["experts_active"] == c1["experts_active"]

# %% [markdown]
# ## 6. The lab: every variant on one budget
#
# `compare_routers` (the function behind `python -m tinymoe compare-routers`) trains each
# variant with the same data, seed, steps and schedule, then measures held-out loss per
# domain, tokens/s, load balance over training, drops by position at the train and eval
# capacity factor (expert choice: tokens with no expert) and the leak. Here: the `toy`
# preset, and a short run (in fast mode only a few steps: the numbers then say almost
# nothing about the routers themselves).

# %%
from tinymoe.train import TrainConfig  # noqa: E402

steps = 6 if FAST else 150
tc = TrainConfig(steps=steps, batch_size=4 if FAST else 8, seq_len=32 if FAST else 64, warmup=1 if FAST else 15,
                 eval_every=0, eval_batches=2 if FAST else 8, save_every=0, log_every=1,
                 snapshot_every=2 if FAST else 15, max_chars=6000 if FAST else None,
                 out_dir=str(OUT / "15_lab"))
report = compare_routers(list(VARIANTS), base=base, train_cfg=tc, out=OUT / "15_lab", progress=False)
print(format_markdown(report))
rows = report["variants"]
assert rows["expert_choice"]["load"]["max_over_mean"] == [1.0] * len(rows["expert_choice"]["load"]["step"])
assert rows["switch"]["leak"]["changed"] == 0.0

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
for name, r in rows.items():
    d = r["drops_eval_cf"]
    mid = [(s + e - 1) / 2 for s, e in zip(d["bin_start"], d["bin_end"])]
    ax1.plot(mid, d["drop_rate"], marker="o", label=name)
    ax2.plot(r["load"]["step"], r["load"]["max_over_mean"], marker=".", label=name)
ax1.set_xlabel("position in routing group"), ax1.set_ylabel("dropped share (EC: no expert)")
ax1.set_title("drops by position, eval capacity factor")
ax2.set_xlabel("step"), ax2.set_ylabel("max load / mean load"), ax2.set_title("load balance over training")
ax1.legend(fontsize=8)
show(fig, "15_variants.png")

# %% [markdown]
# Reading the table and the figure: expert choice's load ratio is 1.0 at every snapshot and
# its "drops" are tokens that no expert took; Switch's leak is 0 (the asserts above check
# both). Everything else — which variant has the lowest held-out loss, the most even load,
# the fewest late drops — is what the printed numbers of *this* run say, and with a short
# run on a toy model differences in the third decimal of the loss are noise. Rerun with more
# steps (`python -m tinymoe compare-routers --config mini --steps 600`) before drawing
# conclusions.
#
# ## Exercises
#
# 1. **Causal token choice.** Measure the leak of OpenMoE's router with
#    `slot_priority="probability"` and with `top_k=1`. Which settings make token choice
#    causal? (Hint: `routing_changed` on `OpenMoE(get_preset("toy", ...))`, as in section 2.)
# 2. **The bias rate.** In section 4, set `router_bias_rate` to 0.001 and to 0.1. How many
#    forwards until the load ratio falls below 1.5, and how much does it oscillate afterwards?
#    (Hint: a fixed rate times a sign cannot settle exactly.)
# 3. **Bias against the aux loss.** Run the lab with `--routers openmoe,bias_balanced
#    --steps 600` and compare the load balance curves: does the bias reach the balance the aux
#    loss reaches, and at what cost in held-out loss?
