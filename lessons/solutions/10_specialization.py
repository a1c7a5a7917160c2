# %% [markdown]
# # Solutions to lesson 10 — context-independent specialization
#
# Each exercise of `lessons/10_specialization.py`, worked and checked, on lesson 9's shared
# model (`mini`; in fast mode `toy`, which has a single MoE layer). The answers are computed
# from the measurements.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST, OUT, shared_run, shared_run_configs

from tinymoe import analysis as A
from tinymoe.checkpoint import load_model
from tinymoe.data import builtin_corpus
from tinymoe.train import train


def routing_trace(model, tok, cfg, per_domain):
    """Lesson 10's measurement: non-overlapping held-out windows of every domain, routed."""
    T = cfg.max_seq_len
    corpus = builtin_corpus(max_chars=20_000 if FAST else None)
    windows, domains = [], []
    for d, name in enumerate(corpus.names):
        toks = np.asarray(tok.encode(corpus.domains[name].val[: (per_domain + 2) * (T + 1) * 4]), dtype=np.int64)
        w = A.token_windows(toks, T, per_domain)                        # [n, T+1]
        windows.append(w)
        domains.append(np.full(w.shape[0], d))
    return A.collect_routing(model, np.concatenate(windows), np.concatenate(domains), batch_size=16,
                             domain_names=corpus.names)


def id_measures(trace, E, m):
    """Per MoE layer: token-id predictor accuracy, its skill, and the paper's std (and shuffled)."""
    out = {}
    for j, layer in enumerate(trace.layers):
        p = A.specialization_predictors(trace.token_ids, trace.position, trace.expert_index[j], E,
                                        trace.window % 2 == 0)
        top1 = trace.expert_index[j][:, 0]
        out[layer] = {"token_id": p["token_id"], "position": p["position"],
                      "std": A.routing_std(trace.token_ids, top1, E, m),
                      "std_shuffled": A.shuffled_routing_std(trace.token_ids, top1, E, m)}
    return out


per_domain = 16 if FAST else 96
m = 8 if FAST else 16
model, tok, cfg = load_model(shared_run(progress=False))
E = cfg.n_experts
trace = routing_trace(model, tok, cfg, per_domain)
byte_meas = id_measures(trace, E, m)

# %% [markdown]
# ## Exercise 1 — deeper layers
#
# `mini` has MoE layers in blocks 1 and 3. More attention layers before the router mix more
# context into its input, so the deeper layer may be less id-driven; the measurement decides.

# %%
for layer, r in byte_meas.items():
    print(f"block {layer}: token id predicts {r['token_id']:.1%}, position {r['position']:.1%}; "
          f"paper's std {r['std']['mean_std']:.3f} (shuffled {r['std_shuffled']['mean_std']:.3f})")
layers = list(byte_meas)
if len(layers) >= 2:
    first, last = byte_meas[layers[0]], byte_meas[layers[-1]]
    less = last["token_id"] < first["token_id"]
    print(f"the deeper MoE layer (block {layers[-1]}) is {'less' if less else 'not less'} id-driven than block "
          f"{layers[0]} by the id predictor ({last['token_id']:.1%} vs {first['token_id']:.1%})")
else:
    print(f"this model has one MoE layer (block {layers[0]}): nothing to compare in fast mode; "
          "the normal-mode run (mini) has two")
assert all(0 <= r["token_id"] <= 1 and r["token_id"] > r["position"] for r in byte_meas.values())

# %% [markdown]
# ## Exercise 2 — top-$k$ vs top-1
#
# With both choices, $d_e$ counts each of a key's $k$ choices, normalised, so a key that
# always goes to the same $k$ experts has $d_e = 1/k$ on them: the maximum std is
# $\sqrt{1/(kE) - 1/E^2}$ instead of $\sqrt{E-1}/E$ (`A.max_routing_std(E, k)`), smaller for
# $k > 1$. Compare the measures relative to their maxima.

# %%
for j, layer in enumerate(trace.layers):
    s1 = A.routing_std(trace.token_ids, trace.expert_index[j][:, 0], E, m)
    s2 = A.routing_std(trace.token_ids, trace.expert_index[j], E, m)
    print(f"block {layer}: top-1 std {s1['mean_std']:.3f} of max {s1['max_std']:.3f} ({s1['relative']:.0%}); "
          f"top-{cfg.top_k} std {s2['mean_std']:.3f} of max {s2['max_std']:.3f} ({s2['relative']:.0%})")
    assert s1["mean_std"] <= s1["max_std"] + 1e-12 and s2["mean_std"] <= s2["max_std"] + 1e-12
    assert abs(s2["max_std"] - A.max_routing_std(E, cfg.top_k)) < 1e-12
print(f"max std: top-1 {A.max_routing_std(E, 1):.3f}, top-2 {A.max_routing_std(E, 2):.3f} (E = {E})")
assert A.max_routing_std(E, 2) < A.max_routing_std(E, 1)

# %% [markdown]
# ## Exercise 3 — BPE tokens
#
# Lesson 9's run again with `tokenizer="bpe"` (trained on the corpus to the model's vocabulary
# size; 1024 in normal mode, 512 in fast mode, where the corpus cut is small), then the same
# measurements. Token ids are not comparable one to one (a BPE token is often a whole word),
# so compare the **relative** std (mean std / its maximum) against its shuffled baseline,
# and the id predictor's accuracy.

# %%
model_cfg, train_cfg = shared_run_configs()
vocab = 512 if FAST else 1024
bpe_run = train(model_cfg.replace(vocab_size=vocab),
                train_cfg.replace(tokenizer="bpe", out_dir=str(OUT / "s10_bpe"), overwrite=True,
                                  snapshot_every=0, save_every=0), progress=False)
assert bpe_run.status == "done", bpe_run.message
bmodel, btok, bcfg = load_model(bpe_run.checkpoint)
btrace = routing_trace(bmodel, btok, bcfg, per_domain)
bpe_meas = id_measures(btrace, E, m)
for name, meas in (("bytes", byte_meas), (f"BPE {vocab}", bpe_meas)):
    for layer, r in meas.items():
        print(f"{name:>9}, block {layer}: id predictor {r['token_id']:.1%}; relative std {r['std']['relative']:.2f} "
              f"(shuffled {r['std_shuffled']['relative']:.2f}, {r['std']['n_keys']} ids seen >= {m} times)")
layer = trace.layers[-1]
gap_bytes = byte_meas[layer]["std"]["relative"] - byte_meas[layer]["std_shuffled"]["relative"]
gap_bpe = bpe_meas[layer]["std"]["relative"] - bpe_meas[layer]["std_shuffled"]["relative"]
by_std = "more" if gap_bpe > gap_bytes else "less"
by_pred = "more" if bpe_meas[layer]["token_id"] > byte_meas[layer]["token_id"] else "less"
print(f"block {layer}: relative std above its shuffled baseline by {gap_bytes:.2f} (bytes) and {gap_bpe:.2f} (BPE)")
print(f"BPE tokens look {by_std} specialised by the std measure and {by_pred} by the id predictor"
      + ("" if by_std == by_pred else ": the two measures disagree in this run (BPE ids are rarer, so the "
         "shuffled baseline of the std is higher)"))
assert np.isfinite(gap_bpe) and bpe_meas[layer]["std"]["n_keys"] > 0, "the BPE trace should give ids to measure"
