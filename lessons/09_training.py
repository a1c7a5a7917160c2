# %% [markdown]
# # Lesson 9 — Training a small MoE on a laptop
#
# **What you will learn**
# - the training loop, one update at a time (`train_step`): batch, forward, loss, backward, clip,
#   optimizer step, learning-rate schedule;
# - AdamW and Adafactor (what OpenMoE used), and why Adafactor needs so little memory;
# - how to train with `tinymoe.train.train` (the function behind `python -m tinymoe train`)
#   and how to **read its progress bar**: loss, cross-entropy, aux loss, dropped fraction,
#   busiest expert, tokens per second;
# - how to judge the result: held-out nats per byte against the unigram entropy, samples of
#   generated text, and an exact resume after stopping.
#
# The model trained here (`mini`: 2.3M parameters, 8 experts top-2 on blocks 1 and 3) is the
# one lessons 10-12 analyse; it is saved in the lesson output folder and reused there.
# (Normal mode: 300 updates, a few minutes on 2 CPU cores. `TINYMOE_FAST=1`: a toy run.)

# %%
import json
import math
from pathlib import Path

import numpy as np

from _lesson import FAST, OUT, plt, shared_run_configs, show, timer

import tinymoe
from tinymoe import backend as B
from tinymoe.checkpoint import load_model
from tinymoe.config import get_preset, memory_bytes
from tinymoe.data import BatchSampler, builtin_corpus, encode_corpus, unigram_entropy
from tinymoe.generate import generate
from tinymoe.nn.model import OpenMoE
from tinymoe.optim import configure_optimizers, inverse_sqrt, warmup_cosine
from tinymoe.tokenizer import ByteTokenizer
from tinymoe.train import TrainConfig, train, train_step

# %% [markdown]
# ## 1. The data
#
# The built-in corpus needs no download: English prose (Python's own help texts), code (the
# standard library) and arithmetic lines, each with a held-out split. Bytes are the tokens
# (vocabulary 258 = 256 bytes + BOS + EOS). The **unigram entropy** $H = -\sum_v p_v \ln p_v$
# of each domain is the loss of the best model that ignores context: a trained model must
# beat it.

# %%
corpus = builtin_corpus(max_chars=200_000 if FAST else None)
tok = ByteTokenizer()
train_tok, val_tok = encode_corpus(corpus, tok)                       # domain -> 1-D int64 array
for name in corpus.names:
    print(f"{name:>6}: {train_tok[name].size:>9,} train bytes, {val_tok[name].size:>7,} held-out, "
          f"unigram entropy {unigram_entropy(val_tok[name]):.3f} nats")
print(repr(corpus.domains["arith"].train[:60]))

# %% [markdown]
# ## 2. The loop, by hand
#
# One *update* (OpenMoE's loss, lesson 8):
#
# $$L = \mathrm{CE} + 0.01\,L_{aux} + 10^{-4}\,L_z,\qquad g = \nabla L,\qquad
# g \leftarrow g\cdot\min\Big(1, \frac{1}{\lVert g\rVert_2}\Big),\qquad \theta \leftarrow \mathrm{opt}(\theta, g, \eta_t).$$
#
# Weight decay is applied to matrices only (not to norm scales): `param_groups_for_decay`.
#
# `tinymoe.train.train_step` is that update, the same function the trainer calls; in
# llm.c's order it does
#
# ```python
# optimizer.zero_grad()                       # forget old gradients
# set_lr(optimizer, lr)                       # this step's rate from the schedule
# for batch in batches:                       # grad_accum micro-batches (here: one)
#     out = model(batch.x, targets=batch.y)   # forward: logits [B, T, V] + the three losses
#     out.loss.backward()                     # backward: gradients add up in every .grad
# scale_grads_(params, 1 / n)                 # mean over micro-batches (when n > 1)
# clip_grad_norm_(params, 1.0)                # global-norm clipping
# optimizer.step(); optimizer.zero_grad()     # the update, in place
# ```
#
# and returns the loss, its parts, the gradient norm and the routing stats (dropped
# fraction, busiest expert's share). A NaN/inf loss or gradient norm skips the update
# (`stats.bad` says why).
#
# `configure_optimizers(model, cfg)` builds the optimizer exactly as `python -m tinymoe train`
# does, from a `TrainConfig` (here AdamW, lr 3e-3, betas (0.9, 0.95), weight decay 0.1).

# %%
cfg = get_preset("toy" if FAST else "mini")
model = OpenMoE(cfg, seed=0)
opt = configure_optimizers(model, TrainConfig(optimizer="adamw", lr=3e-3, weight_decay=0.1,
                                              adam_beta1=0.9, adam_beta2=0.95))
sampler = BatchSampler(train_tok, batch_size=8, seq_len=64, seed=0)   # random windows, any domain
n_steps = 6 if FAST else 20
losses = []
with timer(f"{n_steps} updates by hand"):
    for step in range(n_steps):
        lr = warmup_cosine(step, base_lr=3e-3, warmup_steps=5, total_steps=n_steps)
        stats = train_step(model, opt, [sampler.next()], lr=lr, grad_clip=1.0)  # x, y: [8, 64]
        assert stats.bad is None, stats.bad
        losses.append(stats.ce)
        print(f"step {step + 1:2d}: ce {stats.ce:.3f}  aux {stats.aux:.3f}  "
              f"|g| {stats.grad_norm:.2f}  dropped {stats.dropped:.0%}")
assert abs(losses[0] - math.log(cfg.vocab_size)) < 0.5, "the first loss should be close to ln V (a random model)"
assert min(losses[-3:]) < losses[0] - 0.3, (
    f"the loss did not go down ({losses[0]:.3f} -> {losses[-1]:.3f}): is opt.step() or backward() missing?")

# %% [markdown]
# ## 3. Optimizers and schedules
#
# **AdamW** (Loshchilov & Hutter 2019) keeps two moments per parameter:
# $m \leftarrow \beta_1 m + (1-\beta_1) g$, $v \leftarrow \beta_2 v + (1-\beta_2) g^2$, and
# updates $\theta \leftarrow \theta(1-\eta\lambda) - \eta\,\hat m/(\sqrt{\hat v}+\epsilon)$:
# **2 extra numbers per parameter**.
#
# **Adafactor** (Shazeer & Stern 2018), which OpenMoE used, has no momentum and stores the
# second moment of an $r\times c$ matrix *factored* as a row vector $R$ and a column vector $C$:
# $\hat V = R\,C^\top / \textstyle\sum R$ — $r + c$ numbers instead of $rc$. The update
# $U = g/\sqrt{\hat V}$ is clipped to RMS 1 and scaled by the parameter's RMS.
#
# OpenMoE's schedule is the inverse square root, $\eta_t = 1/\sqrt{\max(t, 10^4)}$: constant
# for $10^4$ steps, then slowly decaying. Short laptop runs do better with warmup + cosine.

# %%
for name in ("mini", "openmoe-base"):
    mb = memory_bytes(get_preset(name))
    print(f"{name:>12}: weights {mb['weights'] / 2 ** 20:9.1f} MiB | AdamW state {mb['adamw'] / 2 ** 20:9.1f} MiB"
          f" | Adafactor state {mb['adafactor'] / 2 ** 20:7.2f} MiB")

t = np.unique(np.logspace(0, np.log10(50_000), 400).astype(int))
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(t, [warmup_cosine(int(s), 3e-3, 60, 1200, 3e-4) for s in t], label="warmup 60 + cosine over 1200 (tinymoe default)")
ax.plot(t, [inverse_sqrt(int(s), 10_000) for s in t], label="inverse sqrt 1/sqrt(max(t, 1e4)) (OpenMoE, Adafactor): flat 1e-2 until step 1e4, no ramp")
ax.plot(t, [inverse_sqrt(int(s), 100, scale=3e-3 * 10) for s in t], "--", label="inverse sqrt 0.03/sqrt(max(t, 100)): flat 3e-3 until step 100")
ax.set_yscale("log")
ax.set_xscale("log")
ax.set_xlabel("update step (log scale)")
ax.set_ylabel("learning rate (log scale)")
ax.set_title("Lesson 9: learning-rate schedules")
ax.legend(fontsize=8)
show(fig, "09_schedules.png")

# %% [markdown]
# ## 4. Training with `tinymoe.train`
#
# `train(model_config, train_config)` does all of the above plus held-out evaluation, a
# JSON-lines log, routing snapshots (lesson 11), checkpoints, Ctrl-C handling and exact resume.
# From a terminal the same run is
# `python -m tinymoe train --steps 300 --out runs/lesson09` (add `--help` for every flag).
#
# **Reading the progress bar** (updated every `log_every` steps):
#
# | field | meaning | what to expect |
# |---|---|---|
# | `loss` | CE + 0.01 aux + 1e-4 z | a little above `ce` |
# | `ce` | next-byte cross-entropy, nats | starts at $\ln 258 = 5.55$, falls below the unigram entropy (~3) within ~100 steps |
# | `aux` | load-balance loss | $\ge k = 2$; near 2 = balanced, towards $E = 8$ = collapse |
# | `drop` | share of expert assignments over capacity | $\ge 1 - \mathrm{cf}/k = 37.5\%$ with OpenMoE's formula (lesson 6) |
# | `busiest` | busiest expert's share of kept assignments | $1/E = 12.5\%$ at balance |
# | `tok/s` | training throughput | depends on your CPU |

# %%
model_cfg, train_cfg = shared_run_configs()
print(model_cfg.describe())
print({k: v for k, v in train_cfg.to_dict().items() if k in ("steps", "batch_size", "seq_len", "lr", "warmup", "snapshot_every", "out_dir")})
with timer("training"):
    result = train(model_cfg, train_cfg.replace(overwrite=True), progress=True)
print(result.message)
print(f"{result.tokens_per_s:,.0f} tokens/s; held-out nats per byte:",
      {k: round(v["nats_per_byte"], 3) for k, v in result.eval.items()})

# %% [markdown]
# ### The curves, from the run's `log.jsonl`

# %%
events = [json.loads(line) for line in (Path(train_cfg.out_dir) / "log.jsonl").read_text().splitlines()]
start = next(e for e in events if e["event"] == "start")
tr = [e for e in events if e["event"] == "train"]
ev = [e for e in events if e["event"] == "eval"]
entropy = {k: v["val_unigram_entropy"] for k, v in start["domains"].items()}

fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
axes[0].plot([e["step"] for e in tr], [e["ce"] for e in tr], "k-", lw=1, label="train CE (mixed domains)")
for j, name in enumerate(entropy):
    axes[0].plot([e["step"] for e in ev], [e["eval"][name]["nats_per_byte"] for e in ev], "o-", color=f"C{j}",
                 label=f"held-out {name}")
    axes[0].axhline(entropy[name], color=f"C{j}", ls=":", lw=1, label=f"unigram entropy {name}")
axes[0].axhline(math.log(model_cfg.vocab_size), color="0.5", ls="--", lw=1, label="ln V (random model)")
axes[0].set_xlabel("update step")
axes[0].set_ylabel("nats per byte")
axes[0].set_title("loss: below the unigram entropy = the model uses context")
axes[0].legend(fontsize=7, ncol=2)
axes[1].plot([e["step"] for e in tr], [100 * e["dropped"] for e in tr], label="dropped assignments (%)")
axes[1].plot([e["step"] for e in tr], [100 * e["busiest"] for e in tr], label="busiest expert's share (%)")
axes[1].plot([e["step"] for e in tr], [50 * e["aux"] for e in tr], label="aux loss x 50 (100 = balanced)")
axes[1].axhline(100 * (1 - (model_cfg.capacity_factor or 0) / model_cfg.top_k), color="C0", ls=":", lw=1,
                label="1 - cf/k: drops at perfect balance")
axes[1].axhline(100 / model_cfg.n_experts, color="C1", ls=":", lw=1, label="1/E: share at perfect balance")
axes[1].set_xlabel("update step")
axes[1].set_ylabel("percent")
axes[1].set_title("routing during training (the progress bar's fields)")
axes[1].legend(fontsize=7)
fig.suptitle(f"Lesson 9: training {'toy (fast mode)' if FAST else 'mini'} for {train_cfg.steps} updates")
show(fig, "09_training.png")

final = result.eval["mean"]["nats_per_byte"]
bar = np.mean(list(entropy.values())) if not FAST else math.log(model_cfg.vocab_size)
print(f"mean held-out {final:.3f} nats/byte vs {'mean unigram entropy' if not FAST else 'ln V'} {bar:.3f}")
assert final < bar, (f"held-out loss {final:.3f} is not below {bar:.3f}: the run did not learn "
                     "(learning rate, steps, or a broken backward?)")

# %% [markdown]
# ## 5. Samples
#
# `load_model` restores the model (eval mode) and tokenizer from the checkpoint; `generate`
# samples with a KV cache (lesson 4). After a few hundred updates the model has learned the
# surface of each domain: Python keywords and indentation, arithmetic lines, English-like
# words — not meaning.

# %%
trained, tokenizer, _ = load_model(result.checkpoint)
for prompt in ("def ", "The ", "17+25="):
    g = generate(trained, tokenizer, prompt, max_new_tokens=60 if not FAST else 20, temperature=0.8, top_k=40, seed=0)
    print(f"--- prompt {prompt!r}\n{prompt}{g.text}")

# %% [markdown]
# ## 6. Stopping and resuming is exact
#
# A checkpoint holds weights, optimizer state, the data position and RNG states. Training
# 6 updates straight and training 3, stopping (`stop_at`, as Ctrl-C would), then resuming for
# 3 more must give **bit-identical** weights. (Toy model, tiny data, a few seconds.)

# %%
tiny = TrainConfig(steps=6, batch_size=4, seq_len=32, max_chars=20_000, warmup=2, eval_every=0,
                   eval_batches=1, snapshot_every=0, save_every=0, log_every=1)
a = train(get_preset("toy"), tiny.replace(out_dir=str(OUT / "resume_a"), overwrite=True), progress=False)
b1 = train(get_preset("toy"), tiny.replace(out_dir=str(OUT / "resume_b"), overwrite=True, stop_at=3), progress=False)
print("first session:", b1.status, "-", b1.message)
b2 = train(None, tiny.replace(out_dir=str(OUT / "resume_b"), resume=b1.checkpoint), progress=False)
wa, _, _ = load_model(a.checkpoint)
wb, _, _ = load_model(b2.checkpoint)
diff = max(float(np.abs(wa.state_dict()[k] - wb.state_dict()[k]).max()) for k in wa.state_dict())
print(f"6 straight vs 3 + resume + 3: max weight difference {diff}")
assert diff == 0.0, f"resume is not exact: weights differ by up to {diff}"

# %% [markdown]
# ## Exercises
#
# 1. **Adafactor, OpenMoE style.** Train with `optimizer="adafactor", schedule="inverse_sqrt",
#    lr=0.01, warmup=100` and compare the held-out loss after 300 updates with AdamW. (With
#    `inverse_sqrt`, `warmup` is the length of the flat phase at the peak rate, not a ramp.)
#    *Hint:* `train_cfg.replace(...)` and a new `out_dir`.
# 2. **Top-1 or dropless.** Train `get_preset("mini", top_k=1)` and
#    `get_preset("mini", capacity_factor=None)`. What happens to `drop` and `busiest` in the
#    progress bar, and to the loss? *Hint:* lesson 6's $1 - \mathrm{cf}/k$.
# 3. **The full default run.** From a terminal, `python -m tinymoe train` (1200 updates) and
#    `python -m tinymoe generate runs/mini --prompt "def "`. How much better are the samples?
