# %% [markdown]
# # Solutions to lesson 8 — the OpenMoE model and its parameter counts
#
# Each exercise of `lessons/08_openmoe_model.py`, worked and checked. Everything here is
# counted from shapes (`config.count_parameters`, `config.parameter_shapes`): nothing large
# is allocated.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing

from _lesson import FAST  # noqa: F401  (the plumbing: import path, output folder)

from tinymoe.config import count_parameters, get_preset, parameter_shapes

# %% [markdown]
# ## Exercise 1 — the untied head
#
# Untying adds the output matrix $W_{out} \in \mathbb R^{d\times V}$, $V d = 256{,}384\times768 =
# 196.9$M parameters, to the total **and** to the active count (every token uses the whole
# head). So the untied model is $649.9 + 196.9 = 846.8$M total, $352.7 + 196.9 = 549.6$M
# active: none of the three conventions of the lesson's table. The original code's count with
# an untied head is the code convention (blocks, FFN width 2048, $4df$ per FFN) plus input
# embedding plus head plus routers and norms: 799.7M total, 535.4M active. So the paper's
# "650M" is the count of the paper's dimensions with **one** (tied) embedding, although the
# released model has an untied head; neither untied count is 650M.

# %%
tied = count_parameters(get_preset("openmoe-base"))
untied = count_parameters(get_preset("openmoe-base", tie_embeddings=False))
V, d = 256_384, 768
print(f"tied   : {tied['total'] / 1e6:.1f}M total, {tied['active'] / 1e6:.1f}M active")
print(f"untied : {untied['total'] / 1e6:.1f}M total, {untied['active'] / 1e6:.1f}M active "
      f"(lm_head {untied['lm_head'] / 1e6:.1f}M = V x d)")
assert untied["lm_head"] == V * d
assert untied["total"] == tied["total"] + V * d and untied["active"] == tied["active"] + V * d

L, f_code = 12, 2048
attn, ffn = L * 4 * d * d, 4 * d * f_code
code_total = attn + (9 + 3 * 17) * ffn                                  # lesson 8's code convention, blocks only
code_active = attn + (9 + 3 * 3) * ffn
extras = tied["routers"] + tied["norms"]                                # the same routers and norms in both layouts
code_untied_total = code_total + 2 * V * d + extras
code_untied_active = code_active + 2 * V * d + extras
print(f"code convention + embedding + untied head + routers + norms: {code_untied_total / 1e6:.1f}M total, "
      f"{code_untied_active / 1e6:.1f}M active")
conventions = {"code, blocks only": 405.8, "code + one embedding": 602.7, "paper dims, tied": 649.9}
assert all(abs(untied["total"] / 1e6 - v) > 50 for v in conventions.values()), "the untied count matches none"
assert abs(code_untied_total / 1e6 - 799.7) < 0.1 and abs(code_untied_active / 1e6 - 535.4) < 0.1

# %% [markdown]
# ## Exercise 2 — more experts, same active size; fine-grained experts
#
# Doubling $E$ with $k$ fixed doubles the expert parameters (total grows by one copy of them)
# and leaves the active count unchanged (a token still runs $k$ experts of the same width);
# only the router grows a little, $d$ more weights per new expert per MoE layer.
#
# Halving the expert width and doubling $k$ as well (16 experts of half width, top-4: the
# "fine-grained" experts of DeepSeekMoE) gives back the original expert total,
# $2E\cdot 3d\,(f/2) = E\cdot 3df$, and the original active expert count ($2k$ half-width
# experts cost what $k$ full ones do). Only the router is larger. What it buys is choice: a
# token picks 4 of 16 experts ($\binom{16}{4} = 1820$ combinations) instead of 2 of 8 (28).

# %%
mini = get_preset("mini")
base_c = count_parameters(mini)
e16 = count_parameters(get_preset("mini", n_experts=16))
fine = count_parameters(get_preset("mini", n_experts=16, top_k=4, d_ff_expert=mini.expert_ff // 2))
for name, c in (("mini (E=8, k=2)", base_c), ("E=16, k=2", e16), ("E=16, k=4, half width", fine)):
    print(f"{name:>22}: total {c['total']:,}, active {c['active']:,}, experts {c['experts']:,}, routers {c['routers']:,}")
n_moe = len(mini.moe_layers)
assert e16["experts"] == 2 * base_c["experts"]
assert e16["active"] - base_c["active"] == e16["routers"] - base_c["routers"] == n_moe * mini.d_model * 8
assert fine["experts"] == base_c["experts"] and fine["experts_active"] == base_c["experts_active"]
assert fine["total"] == base_c["total"] + n_moe * mini.d_model * 8, "fine-grained: same experts, a bigger router"

# %% [markdown]
# ## Exercise 3 — where the router sits
#
# Block 3 (the first MoE block of OpenMoE-Base) has `blocks.3.moe.router.weight` of shape
# $[d, E] = [768, 16]$: 12,288 parameters; three MoE blocks give 36,864, about 0.006 % of
# the 649.9M.

# %%
shapes = parameter_shapes(get_preset("openmoe-base"))
for name, shape in shapes.items():
    if name.startswith("blocks.3."):
        print(f"  {name:<36} {shape}")
routers = {n: s for n, s in shapes.items() if "router" in n}
n_router = sum(s[0] * s[1] for s in routers.values())
print(f"routers: {list(routers)} -> {n_router:,} parameters = {n_router / tied['total']:.4%} of the total")
assert shapes["blocks.3.moe.router.weight"] == (768, 16) and n_router == 3 * 768 * 16 == tied["routers"]
