# %% [markdown]
# # Lesson 13 — Speed: where the time goes, MFU, and the same code on a GPU
#
# **What you will learn**
# - how many floating-point operations a training step needs ($\approx 6\,N_{active}$ per
#   token plus attention) and how to turn a measured step time into **model FLOPs
#   utilisation** (MFU) against your machine's own matrix-multiply rate;
# - how to **profile** a training step with `cProfile` and attribute the time to tinymoe's
#   operations (forward and backward of each `Function`), the routing and the optimizer;
# - why tiny models are limited by Python overhead and larger ones by matrix multiplies;
# - why NumPy's elementwise work needs help to use more than one core, and how tinymoe's
#   fused kernels spread their rows over threads;
# - how to run the very same code on a GPU with CuPy (`tinymoe.set_device("cuda")`).

# %%
import cProfile
import pstats
import statistics
import time

import numpy as np

from _lesson import FAST, plt, show

import tinymoe
from tinymoe import bench
from tinymoe.autograd import Function
from tinymoe.config import get_preset
from tinymoe.data import BatchSampler, builtin_corpus, encode_corpus
from tinymoe.nn.model import OpenMoE
from tinymoe.optim import clip_grad_norm_, configure_optimizers
from tinymoe.tokenizer import ByteTokenizer
from tinymoe.train import TrainConfig

# %% [markdown]
# ## 1. Counting the work
#
# Every weight a token passes through costs one multiply-add (2 FLOPs) in the forward pass and
# two more multiply-adds in the backward pass (lesson 2: $\bar A = \bar Y B^\top$ and
# $\bar B = A^\top \bar Y$). With $N_{active}$ the matmul weights a token uses (attention
# projections, dense FFNs, the router, $k$ experts and the shared FFN of MoE blocks, the LM
# head; the embedding lookup is free):
#
# $$\text{FLOPs per token} \approx 6\,N_{active} + 12\,L\,T\,d_{attn}\quad(\text{training}),\qquad
# \mathrm{MFU} = \frac{\text{tokens/s}\times\text{FLOPs per token}}{\text{peak matmul FLOP/s}} .$$
#
# The second term is the attention scores $QK^\top$ and $PV$, which grow with the sequence
# length $T$. `tinymoe.bench.model_flops` counts both from the config.

# %%
cfg_name = "toy" if FAST else "mini"
cfg = get_preset(cfg_name)
Bsz, T = (8, 64) if FAST else (16, 128)
fl = bench.model_flops(cfg, T)
print(f"{cfg_name}: N_active (matmul weights per token) = {fl['n_active_matmul_params']:,.0f}")
print(f"  training FLOPs per token {fl['train_per_token'] / 1e6:.1f} M "
      f"(6 N_active = {6 * fl['n_active_matmul_params'] / 1e6:.1f} M + attention)")
base = bench.model_flops(get_preset("openmoe-base"), 2048)
print(f"openmoe-base at T=2048: {base['train_per_token'] / 1e9:.2f} GFLOPs per training token")

# %% [markdown]
# ## 2. The roof: this machine's matrix-multiply rate
#
# `bench.gemm_roof` times large float32 square matmuls of the current backend. No model can
# run its matmuls faster, so it is the honest denominator for MFU.

# %%
roof = bench.gemm_roof(n=512 if FAST else 1536, repeats=2 if FAST else 5)
print(f"float32 GEMM rate (n={roof['n']}): {roof['flops_per_s'] / 1e9:.1f} GFLOP/s")

# %% [markdown]
# ## 3. Time a training step
#
# One step = zero grads, forward, backward, clip, AdamW update (what `tinymoe.train` does per
# update). We time a few steps after a warm-up and take the median.

# %%
corpus = builtin_corpus(max_chars=200_000)
train_tok, _ = encode_corpus(corpus, ByteTokenizer())


def make_step(cfg, batch, seq, seed=0):
    model = OpenMoE(cfg, seed=seed)
    opt = configure_optimizers(model, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.1,
                                                  adam_beta1=0.9, adam_beta2=0.999))
    sampler = BatchSampler(train_tok, batch, seq, seed=seed)
    params = list(model.parameters())

    def step():
        b = sampler.next()
        out = model(b.x, targets=b.y)                       # [batch, seq] -> logits + loss
        out.loss.backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        step.kept.append(np.mean([1 - st.dropped_fraction for st in out.routing]))   # share of k assignments computed
        return out.loss.item()
    step.kept = []
    return step


def time_steps(step, n, warmup=1):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


step = make_step(cfg, Bsz, T)
t_step = time_steps(step, 2 if FAST else 6)
tok_s = Bsz * T / t_step
mfu = tok_s * fl["train_per_token"] / roof["flops_per_s"]
kept = float(np.mean(step.kept))
fl_kept = bench.model_flops(cfg, T, kept_fraction=kept)
mfu_kept = tok_s * fl_kept["train_per_token"] / roof["flops_per_s"]
print(f"{cfg_name} [{Bsz} x {T}]: {t_step * 1e3:.0f} ms per step, {tok_s:,.0f} tokens/s")
print(f"  MFU counting k = {cfg.top_k} experts per token: {mfu:.1%}")
print(f"  MFU counting the kept assignments only ({kept:.1%} of them; dropped ones are never computed): {mfu_kept:.1%}")
assert 0 < mfu_kept <= mfu, f"MFU {mfu:.2f} / {mfu_kept:.2f}: counting fewer FLOPs cannot give a higher MFU"
if mfu > 1.0:   # a timing, not a bug: no assertion on it (the suite runs on busy machines)
    print("  (above 100%: the roof was measured while other work slowed the machine; "
          "both timings are needed for the ratio to mean anything: rerun on an idle machine)")

# %% [markdown]
# ## 4. Where the time goes: a profile
#
# `cProfile` records every Python function call. Each tinymoe operation is a `Function` whose
# static `forward` and `backward` run on plain arrays, so summing the profile's cumulative time
# of each class's `forward` and `backward` attributes the step to operations (a NumPy matmul
# inside `forward` is counted there). What is left is Python overhead: building the graph,
# walking it, routing decisions, the optimizer.

# %%
def all_functions(cls=Function):
    for sub in cls.__subclasses__():
        yield sub
        yield from all_functions(sub)


code_to_op = {}
for fn_cls in all_functions():
    for phase in ("forward", "backward"):
        f = fn_cls.__dict__.get(phase)
        f = getattr(f, "__func__", f)
        if f is not None and hasattr(f, "__code__"):
            c = f.__code__
            code_to_op[(c.co_filename, c.co_firstlineno, c.co_name)] = (fn_cls.__name__, phase)

n_prof = 1 if FAST else 4
prof = cProfile.Profile()
t0 = time.perf_counter()
prof.enable()
for _ in range(n_prof):
    step()
prof.disable()
wall = (time.perf_counter() - t0) / n_prof
stats = pstats.Stats(prof)
per_op = {}
for key, (cc, nc, tt, ct, callers) in stats.stats.items():
    if key in code_to_op:
        name, phase = code_to_op[key]
        per_op.setdefault(name, {"forward": 0.0, "backward": 0.0})[phase] += ct / n_prof
named = {"routing decisions (routing.route)": ("routing.py", "route"),
         "optimizer (AdamW.step)": ("optim.py", "step"),
         "gradient clipping": ("optim.py", "clip_grad_norm_")}
other = {}
for label, (file_end, func) in named.items():
    other[label] = sum(v[3] for k, v in stats.stats.items() if k[0].endswith(file_end) and k[2] == func) / n_prof
in_ops = sum(v["forward"] + v["backward"] for v in per_op.values())
print(f"profiled step: {wall * 1e3:.0f} ms (the profiler itself adds overhead); "
      f"inside op forward/backward: {in_ops * 1e3:.0f} ms ({in_ops / wall:.0%})")
for label, t in other.items():
    print(f"  {label}: {t * 1e3:.1f} ms")
top = sorted(per_op.items(), key=lambda kv: -(kv[1]["forward"] + kv[1]["backward"]))[:14]
for name, v in top:
    print(f"  {name:<20} forward {v['forward'] * 1e3:7.1f} ms   backward {v['backward'] * 1e3:7.1f} ms")
assert 0.2 < in_ops / wall <= 1.05, (
    f"the ops account for {in_ops / wall:.0%} of the step: the profile attribution is broken")

# %% [markdown]
# The two MFUs differ in what counts as useful work. Counting $k$ experts per token is the
# usual convention (it is what a dropless layer computes); but with capacity, dropped
# assignments are never computed (lesson 6), so the FLOPs really done are fewer and the
# second number is the machine's real utilisation. `bench.model_flops(cfg, T, kept_fraction)`
# counts either.
#
# ## 5. Size matters: overhead-bound vs compute-bound
#
# Each op costs a few microseconds of Python (checking inputs, recording the graph) on top of
# its arithmetic. `bench.op_overhead` measures it on tiny tensors. A toy model runs a few
# hundred ops per step on small arrays, so overhead dominates; in a bigger model the same number
# of ops carries more arithmetic, so MFU should rise with size, until other costs (the memory
# traffic of the elementwise ops, a machine busy with other work) take over. The measurement
# below says what this machine does.

# %%
ov = bench.op_overhead(repeats=2 if FAST else 3, n_ops=200 if FAST else 2000)
print(f"Python overhead per op: {ov['us_per_op_forward']:.1f} us forward, {ov['us_per_op_fwd_bwd']:.1f} us "
      f"forward+backward (a bare NumPy add: {ov['us_per_op_bare_array']:.1f} us)")
print(f"matmul {ov['matmul']['shape']} forward+backward: {ov['matmul']['ratio']:.2f}x the three bare GEMMs")

sizes = [("toy", 8, 64), ("mini", 4, 64)] if FAST else [("toy", 16, 64), ("mini", 16, 128), ("small", 8, 256)]
scaling = []
for name, b, t in sizes:
    c = get_preset(name)
    if name == "small":
        c = c.replace(vocab_size=258)                     # byte vocabulary for this test
    s = make_step(c, b, t)
    sec = time_steps(s, 1 if FAST else (2 if name == "small" else 4))
    f = bench.model_flops(c, t)["train_per_token"]
    f_kept = bench.model_flops(c, t, kept_fraction=float(np.mean(s.kept)))["train_per_token"]
    scaling.append((name, f, b * t / sec, b * t / sec * f / roof["flops_per_s"],
                    b * t / sec * f_kept / roof["flops_per_s"]))
    print(f"{name:>6} [{b} x {t}]: {b * t / sec:8,.0f} tokens/s, MFU {scaling[-1][3]:.1%} (k experts), "
          f"{scaling[-1][4]:.1%} (kept assignments, {np.mean(s.kept):.0%} kept)")
mfus = [s_[3] for s_ in scaling]
if all(a < b_ for a, b_ in zip(mfus, mfus[1:])):
    trend = "MFU rises with model size"
elif all(a > b_ for a, b_ in zip(mfus, mfus[1:])):
    trend = "MFU falls with model size"
else:
    trend = "MFU is not monotone in model size"
print(f"on this machine, in this run: {trend} (" + " -> ".join(f"{s_[0]} {s_[3]:.1%}" for s_ in scaling) + ")")

# %% [markdown]
# ### Picture: the profile, and MFU against model size

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1.4, 1]})
names = [n for n, _ in top][::-1]
fw = [per_op[n]["forward"] * 1e3 for n in names]
bw = [per_op[n]["backward"] * 1e3 for n in names]
ax1.barh(names, fw, label="forward")
ax1.barh(names, bw, left=fw, label="backward")
ax1.barh(list(other), [t * 1e3 for t in other.values()], color="0.6", label="outside ops")
ax1.set_xlabel("milliseconds per training step (under cProfile)")
ax1.set_title(f"{cfg_name} [{Bsz} x {T}]: time per operation")
ax1.legend(fontsize=8)

xs = [s[1] for s in scaling]
ax2.plot(xs, [100 * s[3] for s in scaling], "o-", label="counting k experts per token")
ax2.plot(xs, [100 * s[4] for s in scaling], "s--", label="counting kept assignments only")
ax2.legend(fontsize=8, loc="lower right")
for name, f, tps, m, _ in scaling:
    ax2.annotate(f"{name}\n{tps:,.0f} tok/s", (f, 100 * m), textcoords="offset points", xytext=(5, 5), fontsize=8)
ax2.set_xscale("log")
ax2.set_xlim(min(xs) / 1.6, max(xs) * 2.5)
ax2.set_xlabel("training FLOPs per token (log scale)")
ax2.set_ylabel("MFU (% of this machine's GEMM rate)")
ax2.set_title(f"{trend} (this run)")
ax2.set_ylim(0, max(100 * s[3] for s in scaling) * 1.4)
fig.suptitle("Lesson 13: where the time of a training step goes")
show(fig, "13_speed.png")

# %% [markdown]
# ## 6. Two kinds of threads
#
# BLAS spreads each matmul over every core. NumPy's elementwise ufuncs (`exp`, `*`, `+` ...)
# run on one core, though they release Python's GIL while they loop. So tinymoe's fused
# kernels (SwiGLU, attention, RMSNorm, RoPE, cross-entropy, the AdamW update) cut their rows
# into one range per thread (attention and AdamW into cache-sized blocks) and hand them to a
# small pool of Python threads (`tinymoe.backend.parallel_rows`). `tinymoe.backend.set_num_threads(n)` sets both kinds,
# like `torch.set_num_threads`. The cell times the SwiGLU gate, forward and backward, on
# one thread and on two, and checks that the answer does not change.

# %%
from tinymoe import backend as B
from tinymoe import functional as F

rows = 512 if FAST else 4096
rng = np.random.default_rng(0)
gate_np = rng.standard_normal((rows, 1024)).astype(np.float32)
up_np = rng.standard_normal((rows, 1024)).astype(np.float32)


def swiglu_fwd_bwd() -> tuple:
    gate = tinymoe.tensor(gate_np, requires_grad=True)
    up = tinymoe.tensor(up_np, requires_grad=True)
    y = F.swiglu(gate, up)                                   # [rows, 1024]
    y.sum().backward()
    return y.numpy(), gate.grad, up.grad


before = B.get_num_threads()
results, timings = {}, {}
for n in (1, 2):
    B.set_num_threads(n)
    results[n] = swiglu_fwd_bwd()
    ts = []
    for _ in range(3 if FAST else 7):
        t0 = time.perf_counter()
        swiglu_fwd_bwd()
        ts.append(time.perf_counter() - t0)
    timings[n] = statistics.median(ts)
    print(f"{n} thread(s): SwiGLU forward+backward on [{rows}, 1024] in {1e3 * timings[n]:.2f} ms")
B.set_num_threads(before)
for n in results:                                            # self-check: same bits on any thread count
    assert all(np.array_equal(a, b) for a, b in zip(results[1], results[n])), f"{n} threads changed the result"
print("results identical on every thread count")

# %% [markdown]
# ## 7. The same code on a GPU
#
# tinymoe reads its array module at call time (`backend.xp`): NumPy on the CPU, CuPy after
# `tinymoe.set_device("cuda")`. Nothing else changes. The cell below runs only when CuPy sees a
# GPU (`tinymoe.cuda_available()`); otherwise it says so.

# %%
if tinymoe.cuda_available():
    tinymoe.set_device("cuda")
    try:
        groof = bench.gemm_roof(repeats=3)
        print(f"GPU float32 GEMM rate: {groof['flops_per_s'] / 1e12:.1f} TFLOP/s")
        for name, b, t in (("mini", 16, 128), ("small", 16, 256)):
            c = get_preset(name).replace(vocab_size=258)
            s = make_step(c, b, t)
            sec = time_steps(s, 5)                          # loss.item() waits for the GPU each step
            f = bench.model_flops(c, t)["train_per_token"]
            print(f"GPU {name} [{b} x {t}]: {b * t / sec:,.0f} tokens/s, MFU {b * t / sec * f / groof['flops_per_s']:.1%}")
    finally:
        tinymoe.set_device("cpu")
else:
    print("no GPU visible to CuPy: skipping (install cupy-cuda12x on a machine with an NVIDIA GPU)")

# %% [markdown]
# ## Exercises
#
# 1. **Against PyTorch.** Run `python -m tinymoe bench --config small --compare-torch` and
#    compare tokens/s and MFU with the PyTorch eager twin of the same model.
#    *Hint:* both sides are timed in the same run, interleaved, so machine load affects both.
# 2. **Threads.** Run `python -m tinymoe bench --config mini --threads 1`, then `--threads 2`.
#    On a machine busy with other work one thread can even be faster: why? *Hint:* a thread
#    that waits for a busy core holds up the others at the end of every matmul and kernel.
# 3. **float64.** Build the model with `dtype="float64"`. How much slower is a step, and why is
#    float64 still the right choice for gradient checks (lesson 1)?
