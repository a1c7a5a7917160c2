# %% [markdown]
# # Lesson 14 — Experts on many machines: expert parallelism with MPI
#
# **What you will learn**
# - how **expert parallelism** splits the E experts of every MoE layer over P processes
#   (E/P each) while everything else is replicated, and why the training stays exactly the
#   same as on one process;
# - the **all-to-all** exchange: who sends which rows of the dispatch buffer to whom, and
#   how the backward pass mirrors it;
# - why a **fixed expert capacity** makes the exchange static (every rank knows every
#   message size in advance: one plain `Alltoall`, no size negotiation);
# - the **volume formula** (tokens x k x d x bytes x padding, dispatch and combine, forward
#   and backward), checked against the bytes tinymoe's MPI code counts;
# - a real run on 2 ranks (`mpiexec -n 2 python -m tinymoe train --parallel expert`) that
#   reproduces the one-process run, and what changes at OpenMoE-34B scale.

# %%
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from _lesson import FAST, OUT, plt, show

from tinymoe import routing
from tinymoe.config import count_parameters, get_preset
from tinymoe.parallel import exchange_bytes_per_step, project_step

BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
print("mpiexec:", MPIEXEC or "not found (pip install mpi4py mpich): the MPI cells will be skipped")

# %% [markdown]
# ## 1. Who holds what
#
# One MoE layer has a router $W_r$ [d, E] and E experts (SwiGLU weights [E, d, f]). With P
# ranks, rank r keeps experts $rE/P, \dots, (r+1)E/P - 1$; every other weight (attention,
# norms, embedding, router, shared FFN) is a full copy on every rank. The sampler draws the
# same global batch of $P b$ sequences as one process would, and rank r takes rows
# $rb, \dots, rb + b - 1$.
#
# A rank routes its own tokens exactly as one process does (groups never straddle ranks),
# fills the dispatch buffer [E, R, d] with $R = n_{groups} C$ rows per expert, and must now
# send expert e's R rows to e's owner. That is an **all-to-all**: rank r cuts its buffer
# into P chunks [E/P, R, d] and sends chunk q to rank q; it receives one chunk from every
# rank and stacks them into [E/P, P R, d], whose filled rows its experts process (a mask of
# one byte per row, sent the same way, says which are filled). A second all-to-all
# sends the outputs back along the reverse path, and `combine` adds them to the tokens.
#
# Below: the dispatch buffers of 2 ranks (toy sizes, real routing of random logits).
# A coloured cell is a filled slot, its colour is the destination rank; a grey cell is an
# empty slot that is sent anyway (the buffer has a fixed size).

# %%
E, k, G, P = 4, 2, 16, 2
rng = np.random.default_rng(0)
fill = []
for r in range(P):
    logits = rng.normal(size=(G, E)).astype(np.float64)              # one group per rank
    res = routing.route(logits, top_k=k, capacity_factor=2.0, min_capacity=1)
    flat_pos, token, _ = routing.dispatch_indices(res)              # [M] slots that hold a token
    occ = np.zeros(E * res.rows_per_expert, dtype=bool)
    occ[flat_pos] = True
    fill.append(occ.reshape(E, res.rows_per_expert))                  # [E, R]
C = res.capacity
owner = np.arange(E) // (E // P)                                      # expert -> rank
print(f"E={E} experts, k={k}, G={G} tokens per group, capacity C={C} slots per expert")
print(f"every rank sends a buffer of E*C = {E * C} rows for {G * k} assignments, "
      f"filled: {[int(f.sum()) for f in fill]}")
assert all(f.shape == (E, C) for f in fill), "the buffer shape is fixed: [E, n_groups * C]"

fig, axes = plt.subplots(1, P, figsize=(8, 2.8))
colors = np.array([[0.2, 0.45, 0.8], [0.9, 0.5, 0.1]])
for r, ax in enumerate(axes):
    img = np.full((E, C, 3), 0.85)
    for e in range(E):
        img[e, fill[r][e]] = colors[owner[e]]
    ax.imshow(img, aspect="auto")
    ax.set_title(f"rank {r}'s dispatch buffer [E, C]\ncolour = destination rank, grey = empty slot")
    ax.set_yticks(range(E), [f"expert {e} -> rank {owner[e]}" for e in range(E)])
    ax.set_xlabel("slot (C per group)")
fig.tight_layout()
show(fig, "14_alltoall.png")

# %% [markdown]
# ## 2. Why fixed capacity makes the exchange static
#
# How many rows does rank r send to rank q? With capacity, exactly $E/P \cdot R$ rows of d
# numbers, **whatever the router decided**: the empty slots travel as zeros. So every
# message size is known before the step starts and one `MPI_Alltoall` with equal chunks
# does it; the received buffer has a fixed shape too.
#
# Without capacity (dropless, $C = G$ here) the *filled* rows per (rank, expert) vary from
# step to step. Either you send the full $C = G$ buffer (tinymoe does this: correct, but the
# buffer is $E/k$ times the assignments), or you first exchange the counts and then send
# only the filled rows with `MPI_Alltoallv` (variable counts): less volume, one more
# latency-bound exchange, and buffers whose size changes every step.
#
# ## 3. The volume formula
#
# Per MoE layer and per exchange a rank hands its whole buffer to MPI:
#
# $$V = \underbrace{n\,k}_{\text{assignments}}\; d \;\cdot\; \text{bytes} \;\cdot\;
#   \underbrace{\frac{E\,C}{k\,G}}_{\text{padding}},$$
#
# with n the rank's tokens. There are four exchanges per layer and step: dispatch and
# combine in the forward pass, and their mirrors in the backward pass (the gradient of an
# all-to-all is the all-to-all the other way round). A fraction $(P-1)/P$ of V leaves the
# machine; the rest is the rank's own chunk. OpenMoE's capacity $C = \mathrm{round}(c_f G/E)$
# has no k in it, so its padding $c_f / k$ is below 1: the buffer has fewer slots than
# assignments (lesson 6's drops).
#
# Let us count what tinymoe's MPI code actually sends, on 2 ranks, for one training step of
# the toy model, and compare with the formula.

# %%
cfg = get_preset("toy").replace(dtype="float64", capacity_factor=1.0)
b, T = (2, 32) if FAST else (4, 64)
vol = exchange_bytes_per_step(cfg, tokens_per_rank=b * T, seq_len=T)
print(f"toy: {vol['moe_layers']} MoE layer(s), C={vol['capacity']} per group of {vol['group']}, "
      f"padding {vol['padding']:.3f}")
print(f"formula: {vol['per_exchange']:,.0f} bytes per exchange, {vol['per_step']:,.0f} per step")

worker = OUT / "14_count_bytes.py"
worker.write_text(textwrap.dedent(f"""
    import json, numpy as np
    from tinymoe.config import get_preset
    from tinymoe.nn.model import OpenMoE
    from tinymoe.parallel import Comm, Parallel
    comm = Comm()
    par = Parallel("expert", comm)
    cfg = get_preset("toy").replace(dtype="float64", capacity_factor=1.0)
    model = OpenMoE(cfg, seed=0)
    par.prepare_model(model)
    x = np.random.default_rng(1).integers(0, cfg.vocab_size, size=({P} * {b}, {T} + 1))
    rows = slice(comm.rank * {b}, (comm.rank + 1) * {b})
    out = model(x[rows, :-1], targets=x[rows, 1:])
    out.loss.backward()
    if comm.rank == 0:
        print(json.dumps({{"bytes": comm.bytes, "remote": comm.remote_bytes}}))
"""))
counted = None
if MPIEXEC:
    env = dict(os.environ)          # the ranks find tinymoe as this process does (installed or on PYTHONPATH)
    proc = subprocess.run([MPIEXEC, "-n", str(P), sys.executable, str(worker)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counted = json.loads(proc.stdout.strip().splitlines()[-1])
    kinds = ["dispatch", "combine", "dispatch_backward", "combine_backward"]
    for kd in kinds:
        print(f"  {kd:>18}: counted {counted['bytes'][kd]:>9,} bytes "
              f"({counted['remote'][kd]:,} left the rank)")
    total = sum(counted["bytes"][kd] for kd in kinds)
    assert total == vol["per_step"], f"counted {total} bytes, the formula says {vol['per_step']}"
    assert all(counted["remote"][kd] * P == counted["bytes"][kd] * (P - 1) for kd in kinds)
    print(f"counted total {total:,} == formula {vol['per_step']:,.0f}")

# %% [markdown]
# ## 4. A run on 2 ranks is the run on one process
#
# `--batch-size` is the per-rank micro-batch b. Two ranks with b = 2 must train exactly as
# one process with batch 4: same data, same routing groups, same losses. The loss of one
# process is a mean over the global batch; each rank's loss is the mean over its rows, so
# the replicated gradients are summed over ranks and divided by P, and each expert's
# gradient (already summed over every rank's tokens by the backward all-to-all) is divided
# by P. (float64 here so that the comparison can be tight.)

# %%
steps = 3 if FAST else 10
common = ["--config", "toy", "--dtype", "float64", "--capacity-factor", "1.0", "--seq-len", str(T),
          "--steps", str(steps), "--max-chars", "20000", "--eval-every", "0", "--eval-batches", "1",
          "--snapshot-every", "0", "--log-every", "1", "--quiet", "--overwrite"]


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if e["event"] == "train"]


runs = {}
if MPIEXEC:
    env = dict(os.environ)          # the ranks find tinymoe as this process does (installed or on PYTHONPATH)
    one = subprocess.run([sys.executable, "-m", "tinymoe", "train", *common, "--batch-size", str(P * b),
                          "--out", str(OUT / "14_one")], env=env, capture_output=True, text=True, timeout=240)
    two = subprocess.run([MPIEXEC, "-n", str(P), sys.executable, "-m", "tinymoe", "train", *common,
                          "--batch-size", str(b), "--parallel", "expert", "--out", str(OUT / "14_two")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    runs = {"1 process, batch 4": losses(OUT / "14_one"), "2 ranks, batch 2 each": losses(OUT / "14_two")}
    for name, ls in runs.items():
        print(f"{name:>22}: " + " ".join(f"{v:.6f}" for v in ls))
    np.testing.assert_allclose(*runs.values(), rtol=1e-10)
    print("same losses to 1e-10 (the checkpoint on disk is one ordinary file, experts gathered)")

# %% [markdown]
# ## 5. What changes at 34B
#
# OpenMoE-34B has E = 32 experts (k = 2) in 8 MoE layers, d = 3072 and 29 billion expert
# weights out of 34.6 billion. On one machine the weights, gradients and AdamW state
# (16 bytes per parameter in float32) do not fit; with expert parallelism every machine
# keeps 1/P of the experts. The price is the all-to-all: per token, per MoE layer, four
# exchanges of $k d$ numbers times the padding. The cost model below (docs/parallel.md)
# adds compute ($6 N_{active}$ FLOPs per token), the all-to-all and the ring all-reduce of
# the replicated gradients, for 8 x 2048 tokens per machine per step on a 300 TFLOP/s
# accelerator and a 25 GB/s network (assumed figures, not measured).

# %%
big = get_preset("openmoe-34b")
machines = [1, 2, 4, 8, 16, 32]
proj = [project_step(big, m, 8 * 2048, 2048, flops_per_s=300e12, bandwidth=25e9, latency=5e-6)
        for m in machines]
c34 = count_parameters(big)
print(f"openmoe-34b: {c34['total'] / 1e9:.1f} B parameters, {c34['experts'] / 1e9:.1f} B in experts")
for m, p_ in zip(machines, proj):
    print(f"  {m:>2} machines: {p_['memory_bytes_per_rank'] / 1e9:6.0f} GB of weights+grads+AdamW per machine, "
          f"all-to-all {p_['alltoall_bytes'] / 1e9:5.2f} GB/step, step {p_['step_s']:.2f} s "
          f"(compute {p_['compute_s']:.2f}, all-to-all {p_['alltoall_s']:.2f}, all-reduce {p_['allreduce_s']:.2f})")
assert proj[-1]["memory_bytes_per_rank"] < proj[0]["memory_bytes_per_rank"] / 4, "sharding must save memory"

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
if counted is not None:
    kinds = ["dispatch", "combine", "dispatch_backward", "combine_backward"]
    ax1.bar(np.arange(4) - 0.2, [counted["bytes"][kd] for kd in kinds], 0.4, label="counted by the MPI code")
    ax1.bar(np.arange(4) + 0.2, [vol["per_exchange"] * vol["moe_layers"]] * 4, 0.4, label="formula")
    ax1.set_xticks(range(4), ["dispatch", "combine", "dispatch\nbackward", "combine\nbackward"])
    ax1.legend(fontsize=8)
ax1.set_ylabel("bytes per step (one rank)")
ax1.set_title("toy on 2 ranks: all-to-all volume")
bottom = np.zeros(len(machines))
for key, label in (("compute_s", "compute"), ("alltoall_s", "all-to-all"), ("allreduce_s", "all-reduce")):
    vals = np.array([p_[key] for p_ in proj])
    ax2.bar([str(m) for m in machines], vals, bottom=bottom, label=label)
    bottom += vals
ax2.set_xlabel("machines (one rank each)")
ax2.set_ylabel("projected seconds per step")
ax2.set_title("openmoe-34b, 16k tokens per machine (model)")
ax2.legend(fontsize=8)
fig.tight_layout()
show(fig, "14_volume.png")

# %% [markdown]
# The per-machine step time barely grows with the number of machines (each machine sends
# the same $(P-1)/P$ of its buffer), so tokens per second grow almost linearly, **if** the
# network keeps up: at 25 GB/s the all-reduce of the 5.6 B replicated parameters costs more
# than the all-to-all. Real systems overlap communication with compute, shard the
# replicated weights too (ZeRO), and keep the all-to-all inside a fast node when they can.
#
# ## Exercises
#
# 1. **Dropless volume.** Set `capacity_factor=None` in `exchange_bytes_per_step` for the toy
#    model. What is the padding, and why is it E/k? *Hint:* C = G slots for each of E experts,
#    k G assignments.
# 2. **Alltoallv.** Sketch the exchange with variable counts: which extra message tells the
#    receiver how many rows to expect, and what does it cost in latency?
#    *Hint:* one `Alltoall` of E/P integers per rank pair before the data.
# 3. **Data parallel.** Run the 2-rank training with `--parallel data` instead. Which
#    collectives run, and how many bytes does the all-reduce move per step for the toy model?
#    *Hint:* `project_step(..., mode="data")`.
