# %% [markdown]
# # Solutions to lesson 13 — speed
#
# Each exercise of `lessons/13_speed.py`, worked and checked. Timings are measurements of
# whatever machine runs this, under its current load: the answers are computed from them and
# the checks test only what must hold on any machine.

# %%
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST, OUT, ROOT

import tinymoe
from tinymoe.config import get_preset
from tinymoe.data import BatchSampler, builtin_corpus, encode_corpus
from tinymoe.nn.model import OpenMoE
from tinymoe.optim import AdamW
from tinymoe.tokenizer import ByteTokenizer


def bench(*args):
    """Run ``python -m tinymoe bench ...`` and return its JSON report."""
    out = OUT / "s13_bench.json"
    cmd = [sys.executable, "-m", "tinymoe", "bench", *args, "--json", str(out)]
    print("$ python", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(out.read_text())


# the training-step phase only (the one the lesson measures); fast mode: one small timed step, a small roof
quick = (["--steps", "1", "--phases", "step", "--roof-size", "256", "--batch", "4", "--seq", "32"] if FAST
         else ["--steps", "3", "--phases", "step"])

# %% [markdown]
# ## Exercise 1 — against PyTorch
#
# `bench --compare-torch` times tinymoe and its PyTorch eager twin (same weights) in one run,
# one phase after the other, so both see the same machine load. (Fast mode: `toy`, one timed
# step; the exercise's `small` otherwise.)

# %%
try:
    import torch  # noqa: F401
    has_torch = True
except ImportError:
    has_torch = False
    print("PyTorch is not installed: the comparison needs it (pip install torch); timing tinymoe alone")
config = "toy" if FAST else "small"
rep = bench("--config", config, *quick, *(["--compare-torch"] if has_torch else []))
ours = rep["results"]["tinymoe"]["step"]
print(f"tinymoe {config} training step: {ours['tokens_per_s']:,.0f} tok/s, MFU {ours['mfu']:.1%} (k experts), "
      f"{ours['mfu_kept']:.1%} (kept assignments)")
if has_torch:
    theirs = rep["results"]["torch"]["step"]
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    print(f"torch   {config} training step: {theirs['tokens_per_s']:,.0f} tok/s, MFU {theirs['mfu']:.1%}; "
          f"tinymoe is {ratio:.2f}x torch's speed in this run")
    assert theirs["tokens_per_s"] > 0
assert ours["tokens_per_s"] > 0 and 0 < ours["mfu_kept"] <= ours["mfu"]

# %% [markdown]
# ## Exercise 2 — threads
#
# The same benchmark with one thread and with two. Every matmul and every row-parallel kernel
# ends by waiting for its slowest thread. On an idle machine two threads share the work; on a
# machine whose cores are busy with other programs, the second thread often waits for a core,
# and the whole step waits for it: one thread can then be faster. The load average printed
# below says which case this run was.

# %%
config2 = "toy" if FAST else "mini"
tps = {}
for n in (1, 2):
    r = bench("--config", config2, "--threads", str(n), *quick)
    tps[n] = r["results"]["tinymoe"]["step"]["tokens_per_s"]
    load = r.get("load_before")
    print(f"{n} thread(s): {tps[n]:,.0f} tok/s (load average before: {load[0] if load else 'unknown'}, "
          f"{os.cpu_count()} cores)")
faster = 1 if tps[1] > tps[2] else 2
print(f"in this run {faster} thread(s) was faster, by {max(tps.values()) / min(tps.values()):.2f}x")
assert all(v > 0 for v in tps.values())

# %% [markdown]
# ## Exercise 3 — float64
#
# A float64 step moves twice the bytes and runs float64 GEMMs, which do half the
# multiply-adds per vector instruction: expect it roughly 2x slower or worse. It is still
# the right choice for gradient checks: a central difference needs the loss to more digits
# than float32 has (lesson 1). Both, measured on the model:

# %%
corpus = builtin_corpus(max_chars=50_000)
train_tok, _ = encode_corpus(corpus, ByteTokenizer())
cfg_name = "toy" if FAST else "mini"
Bsz, T = (8, 64) if FAST else (16, 128)


def step_time(dtype, n=2 if FAST else 5):
    model = OpenMoE(get_preset(cfg_name, dtype=dtype), seed=0)
    opt = AdamW(model.parameters(), lr=1e-3)
    sampler = BatchSampler(train_tok, Bsz, T, seed=0)
    times = []
    for i in range(n + 1):                                     # the first is a warm-up
        b = sampler.next()
        t0 = time.perf_counter()
        out = model(b.x, targets=b.y)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


t32, t64 = step_time("float32"), step_time("float64")
print(f"{cfg_name} [{Bsz} x {T}] training step: float32 {t32 * 1e3:.0f} ms, float64 {t64 * 1e3:.0f} ms "
      f"({t64 / t32:.2f}x)")

sampler = BatchSampler(train_tok, 2, 32, seed=1)
b = sampler.next()
errs, entry = {}, None
for dtype in ("float64", "float32"):
    model = OpenMoE(get_preset(cfg_name, dtype=dtype), seed=0)
    out = model(b.x, targets=b.y)
    out.loss.backward()
    w = model.blocks[0].attn.wq.weight                          # an attention weight matrix
    if entry is None:                                           # its largest gradient entry (same in both dtypes)
        entry = np.unravel_index(np.argmax(np.abs(w.grad)), w.grad.shape)
    analytic = float(w.grad[entry])
    h = 1e-5 if dtype == "float64" else 1e-2                    # near eps^(1/3) of each dtype
    vals = []
    with tinymoe.no_grad():
        for sign in (1, -1):
            w.data[entry] += sign * h
            vals.append(model(b.x, targets=b.y).loss.item())
            w.data[entry] -= sign * h
    errs[dtype] = abs((vals[0] - vals[1]) / (2 * h) - analytic) / abs(analytic)
    # rounding error of the difference quotient: about eps * |L| / h, relative to the gradient
    rounding = float(np.finfo(dtype).eps) * abs(out.loss.item()) / (h * abs(analytic))
    print(f"{dtype}: dL/dWq{tuple(int(i) for i in entry)} backprop {analytic:+.6e}, central difference "
          f"(h = {h:g}) relative error {errs[dtype]:.1e} (rounding scale eps*|L|/(h*|g|) = {rounding:.1e})")
    if dtype == "float64":
        assert errs[dtype] < max(100 * rounding, 1e-6), "a float64 central difference should match backprop"
assert errs["float32"] > 100 * errs["float64"], "float32 differences should be far less accurate"
