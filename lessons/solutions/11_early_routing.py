# %% [markdown]
# # Solutions to lesson 11 — early routing learning
#
# Each exercise of `lessons/11_early_routing.py`, worked and checked, on lesson 9's shared
# run (`mini`, 300 updates; in fast mode `toy`, 30 updates on a small cut of the corpus). The
# extra runs change one setting each and keep the seed, so they see the same batches. Fast
# mode takes a snapshot every update up to update 10 and freezes the router after update 10
# (normal mode: every 5 up to 100, frozen after 100); its toy runs are far too short for
# the routing to settle, so there the answers show how to measure, and the printed numbers
# say what happened.

# %%
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST, OUT, shared_run, shared_run_configs

from tinymoe import analysis as A
from tinymoe import backend as B
from tinymoe.data import BatchSampler, builtin_corpus, encode_corpus
from tinymoe.evaluate import evaluate
from tinymoe.nn.model import OpenMoE
from tinymoe.optim import clip_grad_norm_, configure_optimizers, set_lr
from tinymoe.session import lr_at
from tinymoe.tokenizer import ByteTokenizer
from tinymoe.train import train

model_cfg, train_cfg = shared_run_configs()
shared_dir = Path(shared_run(progress=False)).parent
E = model_cfg.n_experts
shared_snaps = A.load_snapshots(shared_dir / "snapshots")


def churn(snaps, layer):
    """Share of probe tokens whose top-1 expert changed between consecutive snapshots."""
    return [float((a["experts"][layer][:, 0] != b["experts"][layer][:, 0]).mean())
            for a, b in zip(snaps[:-1], snaps[1:])]


def side_run(name, **changes):
    """Lesson 9's run with some training settings changed (same seed: same batches)."""
    res = train(model_cfg, train_cfg.replace(out_dir=str(OUT / name), overwrite=True, save_every=0, **changes),
                progress=False)
    assert res.status in ("done", "stopped"), res.message
    return OUT / name

# %% [markdown]
# ## Exercise 1 — denser snapshots
#
# The same run with a snapshot every 5 updates (fast mode: every update), stopped at update
# 100 (fast: 10). `stop_at` keeps the schedule of the full run, so up to that step this is
# lesson 9's run exactly: taking snapshots does not change the training, and the snapshots
# both runs took must agree (checked). Churn is measured per interval, so the step printed
# is the end of the first interval under 10 %.

# %%
every, stop = (1, 10) if FAST else (5, 100)
dense_dir = side_run("s11_dense", snapshot_every=every, stop_at=stop)
dense = A.load_snapshots(dense_dir / "snapshots")
steps = [s["step"] for s in dense]
layers = sorted(dense[0]["experts"])
print(f"{len(dense)} snapshots at steps {steps}")
for layer in layers:
    c = churn(dense, layer)
    under = [i for i, v in enumerate(c) if v < 0.10]
    print(f"block {layer}: churn per interval " + " ".join(f"{v:.0%}" for v in c))
    if under:
        i = under[0]
        stays = all(v < 0.10 for v in c[i:])
        settled = next((j for j in range(len(c)) if all(v < 0.10 for v in c[j:])), None)
        print(f"block {layer}: churn first below 10% in the interval ending at step {steps[i + 1]}"
              + ("" if stays else f", but it rises above 10% again later (max afterwards {max(c[i:]):.0%}); "
                 + (f"it stays below 10% from the interval ending at step {steps[settled + 1]} on"
                    if settled is not None else f"it does not stay below 10% within the first {stop} updates")))
    else:
        print(f"block {layer}: churn never falls below 10% in the first {stop} updates of this run")
shared_at = {s["step"]: s for s in shared_snaps}
common = [s for s in dense if s["step"] in shared_at]
for s in common:
    for layer in layers:
        assert np.array_equal(s["experts"][layer], shared_at[s["step"]]["experts"][layer]), (
            f"step {s['step']}: the dense run's routing differs from lesson 9's run at the same step")
print(f"the dense run routes the probe exactly as lesson 9's run at the shared steps {[s['step'] for s in common]}")
assert steps == list(range(0, stop + 1, every)) and len(common) >= 2

# %% [markdown]
# ## Exercise 2 — learning rate
#
# The run with half and with twice the peak learning rate (`min_lr` stays 3e-4). For each
# run, the per-token agreement of the probe's routing with *its own* final routing, with its
# 95 % interval, half-way through the run; and the mean churn over the second half of the
# run. "Settles earlier" means: higher agreement half-way, less churn late. The verdict
# compares intervals; overlapping intervals are reported as "cannot tell".

# %%
lr_dirs = {"half": side_run("s11_lr_half", lr=train_cfg.lr / 2), "lesson 9": shared_dir,
           "double": side_run("s11_lr_double", lr=train_cfg.lr * 2)}
settle = {}
for name, folder in lr_dirs.items():
    snaps = A.load_snapshots(folder / "snapshots")
    rep = A.early_routing_report(snaps, E, n_boot=200, n_splits=5)
    mid = len(rep["steps"]) // 2
    ivs = [L["tokens_interval"][mid] for L in rep["layers"]]
    late = float(np.mean([np.mean(churn(snaps, layer)[mid:]) for layer in sorted(snaps[0]["experts"])]))
    events = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    ce = [e["ce"] for e in events if e["event"] == "train"][-1]
    settle[name] = {"mid": ivs, "late_churn": late, "ce": ce, "step": rep["steps"][mid]}
    print(f"lr {name:>8}: agreement with its final routing at step {rep['steps'][mid]}: "
          + ", ".join(f"{v['estimate']:.1%} [{v['low']:.1%}, {v['high']:.1%}]" for v in ivs)
          + f"; mean churn over the second half {late:.0%}; last train CE {ce:.3f}")


def compare(a, b):
    """'earlier' if run a's half-way agreement interval lies above b's in every layer, etc."""
    if all(x["low"] > y["high"] for x, y in zip(settle[a]["mid"], settle[b]["mid"])):
        return "earlier (its half-way interval lies above)"
    if all(x["high"] < y["low"] for x, y in zip(settle[a]["mid"], settle[b]["mid"])):
        return "later (its half-way interval lies below)"
    return "cannot tell (the intervals overlap)"


for name in ("half", "double"):
    print(f"{name} learning rate vs lesson 9's: does the routing settle earlier? {compare(name, 'lesson 9')}; "
          f"late churn {settle[name]['late_churn']:.0%} vs {settle['lesson 9']['late_churn']:.0%}")

# %% [markdown]
# What to expect and why: a larger rate moves the router and the embeddings further per
# update, so the routing changes faster early on; but the cosine schedule shrinks every run's
# updates towards its end, so all three runs quiet down late, and a larger rate can also
# keep the routing moving longer. The lines above say which happened here. Routing that
# settles earlier says nothing by itself about the model's quality: read the last train CE
# printed next to it (which rate learns most differs between a 30-update toy run and a
# 300-update `mini` run). The checks are on the measurements:

# %%
for name, s in settle.items():
    assert all(0.0 <= v["low"] <= v["estimate"] <= v["high"] <= 1.0 for v in s["mid"]), name
    assert 0.0 <= s["late_churn"] <= 1.0
assert len({s["step"] for s in settle.values()}) == 1, "the three runs should be compared at the same step"

# %% [markdown]
# ## Exercise 3 — a frozen router
#
# Lesson 9's update written out (as in lesson 9's hand-written loop: zero_grad, forward,
# backward, clip, step) on the shared run's settings, twice from the same initial weights
# and batches: once as is, once with the routers' gradients set to `None` before
# `opt.step()` from update 100 on (fast: 10). The optimizer skips a parameter without a
# gradient (no Adam update, no weight decay), so the router stays exactly as it was.

# %%
corpus = builtin_corpus(max_chars=train_cfg.max_chars)
train_tok, val_tok = encode_corpus(corpus, ByteTokenizer())
freeze_at = 10 if FAST else 100


def run_loop(freeze_after):
    model = OpenMoE(model_cfg, seed=train_cfg.seed)
    opt = configure_optimizers(model, train_cfg)
    sampler = BatchSampler(train_tok, train_cfg.batch_size, train_cfg.seq_len, seed=train_cfg.seed)
    params = list(model.parameters())
    routers = [p for n, p in model.named_parameters() if n.endswith("moe.router.weight")]
    frozen_copy, ces = None, []
    for step in range(train_cfg.steps):
        opt.zero_grad()
        set_lr(opt, lr_at(step, train_cfg))
        batch = sampler.next()
        out = model(batch.x, targets=batch.y)                    # [B, T] -> losses
        out.loss.backward()
        clip_grad_norm_(params, train_cfg.grad_clip)
        if freeze_after is not None and step >= freeze_after:
            if frozen_copy is None:
                frozen_copy = [B.to_numpy(p.data).copy() for p in routers]
            for p in routers:
                p.grad = None                                    # no update for the router
        opt.step()
        ces.append(float(out.ce.item()))
    ev = evaluate(model, val_tok, batch_size=8, seq_len=train_cfg.seq_len, max_batches=train_cfg.eval_batches)
    return {"model": model, "routers": [B.to_numpy(p.data) for p in routers], "frozen_copy": frozen_copy,
            "train_ce": float(np.mean(ces[-5:])), "held_out": ev["mean"]["nats_per_byte"], "ces": ces}


free = run_loop(None)
frozen = run_loop(freeze_at)
cost = frozen["held_out"] - free["held_out"]
print(f"router trained throughout:      held-out {free['held_out']:.4f} nats/byte, "
      f"train CE (last 5) {free['train_ce']:.4f}")
print(f"router frozen after update {freeze_at:3d}: held-out {frozen['held_out']:.4f} nats/byte, "
      f"train CE (last 5) {frozen['train_ce']:.4f}")
print(f"freezing the router {'costs' if cost > 0 else 'saves'} {abs(cost):.4f} nats/byte of held-out loss in this run "
      f"({abs(cost) / free['held_out']:.2%} of it)")
gain = float(np.mean(free["ces"][freeze_at - 5:freeze_at]) - free["train_ce"])
print(f"for scale: the unfrozen run's train CE fell by {gain:.3f} nats/token after update {freeze_at} "
      f"(mean of the 5 updates before it to the last 5)")
# the hand-written loop is lesson 9's run: its CE, averaged per logging interval, is what the trainer logged
logged = [e for e in map(json.loads, (shared_dir / "log.jsonl").read_text().splitlines()) if e["event"] == "train"]
every_log = train_cfg.log_every
for e in logged:
    mine = float(np.mean(free["ces"][e["step"] - every_log:e["step"]]))
    assert abs(mine - e["ce"]) < 1e-4 * e["ce"], (e["step"], mine, e["ce"])
print(f"the unfrozen loop reproduces lesson 9's logged train CE at steps {[e['step'] for e in logged]}")
assert all(np.array_equal(a, b) for a, b in zip(frozen["routers"], frozen["frozen_copy"])), "the router moved"
assert all(not np.array_equal(a, b) for a, b in zip(free["routers"], frozen["routers"])), \
    "the unfrozen router should have kept changing"

# %% [markdown]
# One pair of runs with one seed: a small difference can change sign with another seed.
# The paper's idea holds if the cost is small compared with the loss the run still gains
# after the freeze (both printed above). A frozen router also cannot adapt to data that arrives late, which is
# the reason to try it only after the data mix is final. The check on the run:

# %%
assert np.isfinite(cost) and free["held_out"] < np.log(model_cfg.vocab_size), "the runs should learn something"
