# %% [markdown]
# # Lesson 8 — The OpenMoE block and model; counting parameters up to the 650M reference
#
# **What you will learn**
# - how an OpenMoE decoder is assembled: embedding, blocks (dense, or MoE + shared FFN on
#   every 4th block in OpenMoE-Base), final RMSNorm, tied LM head;
# - what one forward returns: logits, cross-entropy, the router losses and the routing
#   statistics of every MoE layer; how the training loss combines them;
# - why a token that all its experts dropped is not lost (residual stream + shared FFN);
# - how to count parameters: **total vs active per token**, and the conventions that make the
#   same model "650M", "406M" or "142M" — reproduced from shapes without allocating anything.

# %%
import math

import numpy as np

from _lesson import FAST, plt, show

import tinymoe
from tinymoe import backend as B
from tinymoe.config import count_parameters, get_preset, memory_bytes, parameter_shapes
from tinymoe.params_table import format_params_table
from tinymoe.nn.model import OpenMoE
from tinymoe.tokenizer import ByteTokenizer

# %% [markdown]
# ## 1. The architecture
#
# $$h_0 = E[\text{ids}],\qquad h_{\ell} = \mathrm{Block}_\ell(h_{\ell-1}),\qquad
# \text{logits} = \mathrm{RMSNorm}(h_L)\,E^\top \quad(\text{tied head}).$$
#
# Pre-norm blocks with residual connections (OpenMoE / flaxformer order):
#
# - dense block: $x \mathrel{+}= \mathrm{Attn}(N_1(x))$; $x \mathrel{+}= \mathrm{FFN}(N_2(x))$
# - MoE block: $x \mathrel{+}= \mathrm{Attn}(N_1(x))$; $x \mathrel{+}= \mathrm{MoE}(N_2(x))$;
#   $x \mathrel{+}= \mathrm{FFN}_{shared}(N_3(x))$ — the shared FFN runs *after* the MoE with
#   its own norm (the released code; the paper's eq. 4 writes the two in parallel).
#
# Block $i$ (0-indexed) is an MoE block when $(i+1) \bmod \texttt{moe\_every} = 0$: blocks 3, 7, 11
# in OpenMoE-Base (`moe_every=4`). The `toy` preset has 2 blocks, the second one MoE.

# %%
cfg = get_preset("toy")
print(cfg.describe())
model = OpenMoE(cfg, seed=0)
print(model)

# %% [markdown]
# ## 2. One forward pass
#
# Next-token prediction on a byte string: inputs are bytes $0..T-1$, targets bytes $1..T$.
# `ModelOutput` carries `logits [B, T, V]`, `ce`, `aux_loss` and `z_loss` (means over the MoE
# layers), the total `loss`, and `routing`: one statistics object per MoE layer. The loss is
#
# $$L = \mathrm{CE} + c_{aux}\,\overline{L_{aux}} + c_z\,\overline{L_z},\qquad c_{aux} = 0.01,\ c_z = 10^{-4}.$$

# %%
tok = ByteTokenizer()
text = "def add(a, b):\n    return a + b\n# the quick brown fox"          # 53 bytes <= max_seq_len 64
ids = tok.encode(text)[None, :]                                   # [B=1, T+1]
x, y = ids[:, :-1], ids[:, 1:]                                    # [1, T] inputs and next-token targets
out = model(x, y)
print(f"logits {out.logits.shape}; ce {out.ce.item():.4f} (ln V = {math.log(cfg.vocab_size):.4f} at random init)")
print(f"aux {out.aux_loss.item():.4f}, z {out.z_loss.item():.4f}, loss {out.loss.item():.6f}")
for st in out.routing:
    print(f"  MoE layer {st.layer}: capacity {st.capacity}, dropped {st.dropped_fraction:.1%}, "
          f"load {B.to_numpy(st.load_before).tolist()} -> {B.to_numpy(st.load_after).tolist()}")
expected = out.ce.item() + cfg.aux_loss_coef * out.aux_loss.item() + cfg.z_loss_coef * out.z_loss.item()
assert abs(out.loss.item() - expected) < 1e-5, (
    f"loss {out.loss.item():.6f} should be ce + {cfg.aux_loss_coef} aux + {cfg.z_loss_coef} z = {expected:.6f}")
assert abs(out.ce.item() - math.log(cfg.vocab_size)) < 0.3, "a freshly initialised model should predict almost uniformly"

out.loss.backward()
n_with_grad = sum(p.grad is not None for p in model.parameters())
print(f"{n_with_grad} of {len(list(model.parameters()))} parameter tensors received a gradient")
assert n_with_grad == len(list(model.parameters())), "every parameter (router included) should get a gradient"

# %% [markdown]
# Note the drops: at cf 1.25 with $G = T$ tokens and $E = 4$, there are
# $E\cdot\max(\mathrm{round}(1.25\,T/4), 4)$ slots for $2T$ assignments (lesson 6).
#
# ## 3. A dropped token still flows
#
# Take the MoE block alone and give it so little capacity that many tokens lose **both** their
# experts. Their MoE output is 0, yet the block output still differs from its input: attention
# and the shared FFN still act on them, and the residual keeps them.

# %%
small_cf = cfg.replace(capacity_factor=0.25, min_capacity=1)
m2 = OpenMoE(small_cf, seed=0)
block = m2.blocks[1]                                              # the MoE block
h = m2.tok_emb(x)                                                 # [1, T, d]
with tinymoe.no_grad():
    h_attn = h + block.attn(block.attn_norm(h))                   # [1, T, d] after attention
    y_moe, _, _, st = block.moe(block.ffn_norm(h_attn))           # [1, T, d]
    h_block, _, _, _ = block(h)                                   # the whole block
lost = np.flatnonzero(~st.kept.any(axis=1))                       # tokens with no expert at all
print(f"capacity {st.capacity}: {lost.size} of {x.shape[1]} tokens lost both experts")
assert lost.size > 0, "expected tokens with both choices dropped at cf 0.25"
assert np.all(y_moe.numpy()[0, lost] == 0), "the MoE output of a fully dropped token must be exactly 0"
with tinymoe.no_grad():
    rebuilt = h_attn + block.shared_ffn(block.shared_norm(h_attn))  # what such a token should get
gap = np.abs(h_block.numpy()[0, lost] - rebuilt.numpy()[0, lost]).max()
print(f"fully dropped tokens: block output = x + attention + shared FFN (max diff {gap:.1e})")
assert gap < 1e-5, "a fully dropped token should get attention + shared FFN through the residual"

# %% [markdown]
# ## 4. Counting parameters
#
# `config.parameter_shapes(cfg)` lists every parameter's name and shape **without allocating**,
# and `count_parameters` groups them. The model's `state_dict` uses the same names, so we can
# check the counts against real models.
#
# *Active* parameters per token: everything except the experts a token does not use, i.e.
# $\text{active} = \text{total} - \frac{E-k}{E}\,\text{experts}$.

# %%
for name in ("toy", "mini"):
    c = get_preset(name)
    m = OpenMoE(c, seed=0)
    counted = count_parameters(c)
    print(f"{name:>5}: model.num_parameters() = {m.num_parameters():,}, count_parameters = {counted['total']:,}, "
          f"active {counted['active']:,}")
    assert m.num_parameters() == counted["total"], f"{name}: counting from shapes disagrees with the built model"
    assert {k: tuple(v.shape) for k, v in m.named_parameters()} == parameter_shapes(c), "names/shapes disagree"
    skip = counted["experts"] * (c.n_experts - c.top_k) // c.n_experts
    assert counted["active"] == counted["total"] - skip, "active = total minus the experts a token does not use"

# %% [markdown]
# ### OpenMoE-Base: where "650M" comes from
#
# The paper calls OpenMoE-Base "650M". tinymoe's `openmoe-base` preset uses the paper's
# dimensions (Table 11: 12 layers, $d = 768$, 12 heads, FFN 3072, 16 experts top-2 on blocks
# 3, 7, 11, a shared FFN in each MoE block, vocabulary 256,384) with **one** (tied) embedding.

# %%
base = get_preset("openmoe-base")
print(format_params_table(base, "openmoe-base"))
cb = count_parameters(base)
assert abs(cb["total"] / 1e6 - 649.9) < 0.1, f"openmoe-base should count 649.9M parameters, got {cb['total'] / 1e6:.1f}M"

# %% [markdown]
# The original *code* used FFN width 2048 and a different SwiGLU layout: $W_0: d\to 2f$ (gate and
# up stacked), $W_1: d \to f$, $W_o: f\to d$, i.e. $4df$ weights per FFN. Counting only the blocks
# (attention $4d^2$ per layer + 9 dense FFNs + 3 MoE layers $\times$ (1 shared + 16 experts)):

# %%
d, L, f_code = 768, 12, 2048
attn = L * 4 * d * d
ffn = 4 * d * f_code
n_ffn_total = 9 + 3 * (1 + 16)                                   # 60 FFNs in all
n_ffn_active = 9 + 3 * (1 + 2)                                   # 18 per token
code_total, code_active = attn + n_ffn_total * ffn, attn + n_ffn_active * ffn
emb = 256_384 * d
print(f"code convention, blocks only: {code_total / 1e6:.1f}M total, {code_active / 1e6:.1f}M active")
print(f"  + one embedding:            {(code_total + emb) / 1e6:.1f}M total, {(code_active + emb) / 1e6:.1f}M active")
print(f"paper dims, tied embedding:   {cb['total'] / 1e6:.1f}M total, {cb['active'] / 1e6:.1f}M active")
assert abs(code_total / 1e6 - 405.8) < 0.1 and abs(code_active / 1e6 - 141.6) < 0.1, "code-convention count is off"

# %% [markdown]
# ### Picture: what the parameters are, total vs active, across the family

# %%
presets = ["openmoe-base", "openmoe-8b", "openmoe-34b"]
parts = ["embedding", "attention", "dense_ffn", "shared_ffn", "experts"]
colors = {"embedding": "C0", "attention": "C1", "dense_ffn": "C2", "shared_ffn": "C4", "experts": "C3"}
fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
for j, p in enumerate(presets):
    c = count_parameters(get_preset(p))
    for which, offset in (("total", -0.2), ("active", 0.2)):
        bottom = 0.0
        for part in parts:
            value = c[part] if not (which == "active" and part == "experts") else c["experts_active"]
            axes[0].bar(j + offset, value / c["total"] * 100, 0.38, bottom=bottom, color=colors[part],
                        label=part if (j == 0 and which == "total") else None, hatch="//" if which == "active" else None,
                        edgecolor="w")
            bottom += value / c["total"] * 100
        axes[0].text(j + offset, bottom + 1, f"{which}\n{c[which] / 1e9:.2f}B", ha="center", fontsize=7)
axes[0].set_xticks(range(len(presets)))
axes[0].set_xticklabels(presets)
axes[0].set_ylabel("% of the total parameters")
axes[0].set_ylim(0, 150)
axes[0].set_title("parameters by component: total (plain) vs active per token (hatched)")
axes[0].legend(fontsize=8, loc="upper center", ncol=3)
axes[0].set_yticks(range(0, 101, 20))

names = ["toy", "mini", "small"] + presets
tot = [count_parameters(get_preset(nm))["total"] for nm in names]
act = [count_parameters(get_preset(nm))["active"] for nm in names]
xs = np.arange(len(names))
axes[1].bar(xs - 0.2, tot, 0.4, label="total")
axes[1].bar(xs + 0.2, act, 0.4, label="active per token")
axes[1].set_yscale("log")
axes[1].set_xticks(xs)
axes[1].set_xticklabels(names, rotation=20)
axes[1].set_ylabel("parameters (log scale)")
axes[1].set_title("tinymoe presets: from 0.2M to 35B")
axes[1].legend()
fig.suptitle("Lesson 8: counting parameters from shapes (nothing allocated)")
show(fig, "08_params.png")

# %% [markdown]
# ### Memory
#
# Training needs weights, gradients and optimizer state (activations come on top):
# AdamW keeps two moments per parameter; Adafactor keeps factored second moments (a row and a
# column vector per matrix), which is how OpenMoE trained large models.

# %%
for p in ("mini", "openmoe-base"):
    mb = memory_bytes(get_preset(p))
    gib = lambda n: n / 2 ** 30                                   # noqa: E731
    print(f"{p:>12}: weights {gib(mb['weights']):.3f} GiB, + grads + AdamW = "
          f"{gib(mb['weights'] + mb['grads'] + mb['adamw']):.3f} GiB, + grads + Adafactor = "
          f"{gib(mb['weights'] + mb['grads'] + mb['adafactor']):.3f} GiB")

# %% [markdown]
# ## Exercises
#
# 1. **Untied head.** The original OpenMoE has an untied output head. Count
#    `get_preset("openmoe-base", tie_embeddings=False)`: total and active. It matches **none**
#    of the three conventions above: show that it is the tied count plus one $V\times d$
#    matrix, and compute what the code convention gives with an untied head (input embedding +
#    head + routers + norms). Which count is the paper's "650M" then? *Hint:* one more
#    $V \times d$ matrix; `python -m tinymoe params --config openmoe-base --tie-embeddings false`
#    prints the same table.
# 2. **More experts, same active size.** Double `n_experts` of `mini` with `top_k` fixed. How do
#    total and active change? What about halving `d_ff_expert` and doubling `top_k` (fine-grained
#    experts)? *Hint:* `count_parameters(get_preset("mini", n_experts=16))`.
# 3. **Where does the router sit?** Print `parameter_shapes(base)` for block 3. How many router
#    parameters does OpenMoE-Base have, and what fraction of the total is that?
