# %% [markdown]
# # Solutions to lesson 16 — why MoE
#
# Each exercise of `lessons/16_why_moe.py`, worked and checked. Exercise 1 only counts.
# Exercises 2 and 3 train the lesson's MoE with one change each, with the lesson's recipe and
# seeds, and compare with the lesson's runs: they are read from the `summary.json` the lesson
# writes into its run folder (when it is missing, this script runs the lesson first). The
# answers are printed from the numbers of these runs with the lesson's rule (a difference
# counts only when the seed ranges do not overlap). In fast mode every run is 6 updates:
# the comparisons then mean nothing.

# %%
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing

from _lesson import FAST, HERE, OUT

from tinymoe.analysis import verdict
from tinymoe.config import ModelConfig, get_preset
from tinymoe.study.measures import seed_summary
from tinymoe.study.plan import dense_twin, flops_per_update
from tinymoe.train import TrainConfig, train

RUNS = OUT / ("16_why_moe_fast" if FAST else "16_why_moe")


def lesson_summary():
    """The lesson's summary.json (its configs and every run's final losses); runs the lesson
    first when it is missing or was written in the other mode."""
    path = RUNS / "summary.json"
    if not path.exists() or json.loads(path.read_text())["fast"] != FAST:
        print("running lesson 16 first (its runs are the baseline here) ...")
        subprocess.run([sys.executable, str(HERE / "16_why_moe.py")], check=True, env=dict(os.environ),
                       stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


lesson = lesson_summary()
MOE = ModelConfig.from_dict(lesson["moe"])
RECIPE = TrainConfig.from_dict(lesson["recipe"])
SEEDS = lesson["seeds"]
T = RECIPE.seq_len


def seeds_of(kind):
    """seed_summary of the lesson's final held-out loss (mean of domains) for one model kind."""
    return seed_summary([lesson["runs"][f"{kind}-seed{s}"]["final_mean"] for s in SEEDS])


def compare(a, b):
    """'lower than' / 'higher than' when a's seed range lies entirely below / above b's, else
    'not separable from'."""
    if verdict(a, b, "less"):
        return "lower than"
    return "higher than" if verdict(a, b, "greater") else "not separable from"


def fmt(v):
    return f"{v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"


# %% [markdown]
# ## Exercise 1 — where the FLOPs go
#
# Per token, the MoE pays for the shared parts (attention weights and scores, the LM head, the
# routers, any dense or shared FFN) plus $k$ experts; the equal-total twin pays for the same
# shared parts (minus the routers) plus FFNs holding all $E$ experts' weights. Only the expert
# part is multiplied by $E/k$, so with $s$ = the experts' share of the MoE's FLOPs,
#
# $$\frac{F_\text{total twin}}{F_\text{MoE}} \approx (1 - s) + s \frac{E}{k} < \frac{E}{k}.$$

# %%
def per_token(cfg, T):
    return flops_per_update(cfg, TrainConfig(batch_size=1, seq_len=T)) / T


for name, cfg, seq in (("lesson 16 MoE", MOE, T), ("openmoe-base", get_preset("openmoe-base"), 2048)):
    moe_f, twin_f = per_token(cfg, seq), per_token(dense_twin(cfg, "total"), seq)
    experts = 6 * len(cfg.moe_layers) * cfg.top_k * 3 * cfg.d_model * cfg.expert_ff      # k experts, 6 FLOPs/weight
    s = experts / moe_f
    E_k = cfg.n_experts / cfg.top_k
    approx = (1 - s) + s * E_k
    print(f"{name:>14} (T = {seq}): MoE {moe_f:.4g} FLOPs/token, equal-total twin {twin_f:.4g}: ratio "
          f"{twin_f / moe_f:.2f} vs E/k = {E_k:g}; experts are {s:.0%} of the MoE's FLOPs -> "
          f"(1 - s) + s E/k = {approx:.2f}")
    assert 1 < twin_f / moe_f < E_k
    assert abs(twin_f / moe_f - approx) < 0.02 * approx, "the ratio should follow from the experts' share"

# %% [markdown]
# The ratio is smaller than $E/k$ because attention (weights and the $12 L T d_a$ score
# term), the LM head and, in OpenMoE-Base, the dense FFNs of the non-MoE blocks and the
# shared FFNs are the same for both models. In OpenMoE-Base only three of twelve blocks have
# experts, and at $T = 2048$ the attention scores are a large term, so the equal-total twin
# costs far less than $E/k = 8$ times the MoE per token (printed above).
#
# ## Exercise 2 — without drops
#
# The lesson's MoE with `capacity_factor=None` and `eval_capacity_factor=None` (dropless in
# training and evaluation), the lesson's recipe and seeds. Its FLOPs per token are the same
# number (the count already charges $k$ experts per token), but now every assignment is
# computed.

# %%
def train_variant(tag, cfg):
    """Train ``cfg`` with the lesson's recipe for each seed; seed_summary of the final mean loss."""
    finals = []
    for seed in SEEDS:
        r = train(cfg, RECIPE.replace(seed=seed, out_dir=str(RUNS / f"{tag}-seed{seed}")), progress=False)
        assert r.status == "done", r.message
        finals.append(r.eval["mean"]["nats_per_byte"])
        print(f"{tag}-seed{seed}: held-out mean {finals[-1]:.3f} nats/byte")
    return seed_summary(finals)


dropless_cfg = MOE.replace(capacity_factor=None, eval_capacity_factor=None)
assert per_token(dropless_cfg, T) == per_token(MOE, T)
dropless = train_variant("moe_dropless", dropless_cfg)
moe, active, total = seeds_of("moe"), seeds_of("dense_active"), seeds_of("dense_total")
print(f"final held-out loss (mean of domains, seeds' mean [min, max]): MoE {fmt(moe)}, dropless MoE "
      f"{fmt(dropless)}, dense equal active {fmt(active)}, dense equal total {fmt(total)}")
print(f"lesson's MoE: {compare(moe, active)} the equal-active twin; dropless MoE: "
      f"{compare(dropless, active)} the equal-active twin, {compare(dropless, moe)} the lesson's MoE")
print(f"the lesson's MoE dropped {sum(lesson['runs'][f'moe-seed{s}']['dropped_in_training'] for s in SEEDS) / len(SEEDS):.1%} "
      "of its expert assignments in training; the dropless one none")
if compare(dropless, moe) == "lower than":
    print("-> removing the drops lowered the MoE's loss by more than the seed spread: the capacity drops cost it.")
elif compare(dropless, moe) == "higher than":
    print("-> the dropless MoE is HIGHER than the lesson's MoE by more than the seed spread.")
else:
    print("-> with and without drops the MoE is not separable at this scale.")

# %% [markdown]
# ## Exercise 3 — more experts, same compute
#
# `n_experts=16` doubles the expert weights; a token still uses $k = 2$ experts, so the only
# change in the FLOPs count is the router, $d E$ weights per MoE layer: $6 L_\text{MoE}\, d\,
# (16 - 8)$ more FLOPs per token.

# %%
wide = MOE.replace(n_experts=2 * MOE.n_experts)
extra = per_token(wide, T) - per_token(MOE, T)
print(f"FLOPs per token: {per_token(MOE, T):,.0f} -> {per_token(wide, T):,.0f} (+{extra:,.0f} = "
      f"6 x {len(MOE.moe_layers)} layers x d {MOE.d_model} x {MOE.n_experts} more router columns)")
wider = train_variant(f"moe_{wide.n_experts}e", wide)
print(f"final held-out loss: {MOE.n_experts} experts {fmt(moe)}, {wide.n_experts} experts {fmt(wider)} -> "
      f"{wide.n_experts} experts are {compare(wider, moe)} {MOE.n_experts} "
      f"({compare(wider, active)} the equal-active twin)")
if compare(wider, moe) == "lower than":
    print("-> twice the parameters at the same compute lowered the loss by more than the seed spread.")
else:
    print("-> twice the parameters at the same compute did not lower the loss by more than the seed spread here "
          "(at balance each of 16 experts receives half as many tokens per update as each of 8).")
assert extra == 6 * len(MOE.moe_layers) * MOE.d_model * MOE.n_experts, extra
