# %% [markdown]
# # Solutions to lesson 14 — experts on many machines
#
# Each exercise of `lessons/14_experts_on_many_machines.py`, worked and checked. Exercise 1
# is the volume formula, checked against the routing code; exercise 2 simulates the
# variable-count exchange in NumPy (no MPI needed) and prices it with the lesson's cost
# model; exercise 3 runs 2 MPI ranks (`mpiexec -n 2`, skipped with a message when mpiexec
# is missing) and counts every byte the data-parallel step hands to MPI.

# %%
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST, OUT

from tinymoe import routing
from tinymoe.config import count_parameters, get_preset
from tinymoe.parallel import exchange_bytes_per_step, project_step

BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
print("mpiexec:", MPIEXEC or "not found (pip install mpi4py mpich): exercise 3's MPI runs are skipped")

# %% [markdown]
# ## Exercise 1 — dropless volume
#
# Dropless routing gives every expert room for every token of its group: $C = G$. The buffer
# then has $E\,G$ rows for $k\,G$ assignments, so the padding $E C / (k G)$ is $E / k$: every
# token is sent to all $E$ experts' slots, only $k$ of which hold it. For the toy model
# ($E = 4$, $k = 2$) that is 2, twice the rows the assignments need; for OpenMoE-34B
# ($E = 32$, $k = 2$) 16. (Its preset routes groups of several sequences: $G$ is printed.)

# %%
b, T = (2, 32) if FAST else (4, 64)
for name in ("toy", "openmoe-34b"):
    cfg = get_preset(name).replace(dtype="float64")
    dropless = exchange_bytes_per_step(cfg.replace(capacity_factor=None), tokens_per_rank=b * T, seq_len=T)
    capped = exchange_bytes_per_step(cfg.replace(capacity_factor=1.25), tokens_per_rank=b * T, seq_len=T)
    print(f"{name:>11}: E={cfg.n_experts} k={cfg.top_k} G={dropless['group']}: dropless C={dropless['capacity']}, padding "
          f"{dropless['padding']:g} (E/k = {cfg.n_experts / cfg.top_k:g}), {dropless['per_step']:,.0f} bytes per "
          f"step; cf 1.25: C={capped['capacity']}, padding {capped['padding']:.3f}, {capped['per_step']:,.0f} bytes")
    assert dropless["capacity"] == dropless["group"] and dropless["padding"] == cfg.n_experts / cfg.top_k
    assert dropless["per_step"] == 4 * dropless["moe_layers"] * b * T * cfg.n_experts * cfg.d_model * 8

# the routing code gives the same buffer: E * G rows per group when capacity_factor is None
logits = np.random.default_rng(0).normal(size=(T, 4))               # [G, E] one group, toy E
res = routing.route(logits, top_k=2, capacity_factor=None)
print(f"routing.route(..., capacity_factor=None): {res.rows_per_expert} rows per expert for a group of {T}, "
      f"{int(res.kept.sum())} of {4 * res.rows_per_expert} rows filled")
assert res.rows_per_expert == T and int(res.kept.sum()) == 2 * T

# %% [markdown]
# ## Exercise 2 — Alltoallv
#
# With variable counts the receiver cannot know in advance how many rows come. So, before
# the data, every rank sends every other rank **one count per expert that rank owns**: an
# `Alltoall` of $E/P$ integers per rank pair ($E$ integers per rank in all). Then one
# `Alltoallv` carries only the filled rows, and the receiver unpacks them by those counts.
# The combine exchange (and both backward ones) reuse the same counts in reverse: one extra
# exchange per MoE layer and step, but a latency-bound one: in the lesson's cost model each
# exchange costs $(P-1)\,\ell$ of latency whatever its size. Below, 2 simulated ranks route
# one group each, dropless, and we check that packing by counts delivers exactly the rows a
# static exchange would, and count both volumes.

# %%
E, k, G, P, d = 4, 2, 16, 2, 8
rng = np.random.default_rng(0)
bufs, counts, packed = [], [], []
for r in range(P):
    res = routing.route(rng.normal(size=(G, E)), top_k=k, capacity_factor=None)
    flat_pos, token, _ = routing.dispatch_indices(res)                  # [M] kept slots
    x = rng.normal(size=(G, d))                                         # [G, d] this rank's tokens
    buf = np.zeros((E * res.rows_per_expert, d))
    buf[flat_pos] = x[token]
    bufs.append(buf.reshape(E, res.rows_per_expert, d))                 # [E, C, d] static buffer
    filled = np.zeros(E * res.rows_per_expert, dtype=bool)
    filled[flat_pos] = True
    filled = filled.reshape(E, res.rows_per_expert)                     # [E, C]
    counts.append(filled.sum(axis=1))                                   # [E] rows per expert
    packed.append([bufs[r][e][filled[e]] for e in range(E)])            # E x [count_e, d]
owner = np.arange(E) // (E // P)
for q in range(P):                                                      # what rank q receives
    for e in np.flatnonzero(owner == q):
        for r in range(P):
            static_rows = bufs[r][e][np.any(bufs[r][e] != 0, axis=1)]   # filled rows of the static chunk
            assert counts[r][e] == len(packed[r][e]) and np.array_equal(packed[r][e], static_rows)
static_bytes = P * E * G * d * 8                                        # every rank's whole buffer
v_bytes = sum(int(c.sum()) for c in counts) * d * 8
count_bytes = P * E * 8                                                 # the extra Alltoall of int64 counts
print(f"static Alltoall: {static_bytes:,} bytes; Alltoallv: {v_bytes:,} bytes of rows + {count_bytes} bytes of "
      f"counts (rows sent: {sum(int(c.sum()) for c in counts)} = P k G = {P * k * G})")
assert v_bytes * E == static_bytes * k, "dropless: the filled rows are k/E of the static buffer"

big = get_preset("openmoe-34b")
tok, lat, bw = 8 * 2048, 5e-6, 25e9
for machines in (2, 8, 32):
    v = exchange_bytes_per_step(big.replace(capacity_factor=None), tok, 2048, itemsize=2)
    saved = 4 * v["moe_layers"] * (machines - 1) / machines * v["per_exchange"] * (1 - big.top_k / big.n_experts) / bw
    extra = v["moe_layers"] * (machines - 1) * lat
    print(f"openmoe-34b, {machines:>2} machines, dropless: Alltoallv saves {saved * 1e3:7.1f} ms of transfer per "
          f"step, the count exchange adds {extra * 1e6:5.0f} us of latency")
    assert extra < saved

# %% [markdown]
# At 34B scale the count exchange costs tens of microseconds to about a millisecond and saves a large share of the dropless
# transfer (the factor $1 - k/E$): variable counts are worth it there. The real costs are
# elsewhere: the count message must arrive before the data exchange can start (a
# synchronisation point every layer), and receive buffers change size every step.
#
# ## Exercise 3 — data parallel
#
# `mpiexec -n 2 python -m tinymoe train --parallel data` against one process with the same
# global batch, then a 2-rank worker that runs one `train_step` in each mode and counts the
# calls and bytes of every kind of collective (`Comm` counts bytes per kind; the worker also
# counts calls). In data mode every rank holds every weight, so the gradient all-reduce
# carries all $W$ parameters; in expert mode only the replicated ones. The lesson's cost
# model says a ring all-reduce moves $2 (P-1)/P \cdot W \cdot$ bytes per rank.

# %%
steps = 2 if FAST else 10
common = ["--config", "toy", "--dtype", "float64", "--capacity-factor", "1.0", "--seq-len", str(T),
          "--steps", str(steps), "--max-chars", "20000", "--eval-every", "0", "--eval-batches", "1",
          "--snapshot-every", "0", "--log-every", "1", "--quiet", "--overwrite"]


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if e["event"] == "train"]


worker = OUT / "s14_count_collectives.py"
worker.write_text(textwrap.dedent(f"""
    import json, numpy as np
    from tinymoe.config import get_preset
    from tinymoe.data import Batch
    from tinymoe.nn.model import OpenMoE
    from tinymoe.optim import AdamW
    from tinymoe.parallel import Comm, Parallel
    from tinymoe.train import train_step

    class CountingComm(Comm):
        calls = {{}}
        def _count(self, kind, total, remote, t0):
            self.calls[kind] = self.calls.get(kind, 0) + 1
            super()._count(kind, total, remote, t0)

    comm = CountingComm()
    cfg = get_preset("toy").replace(dtype="float64", capacity_factor=1.0)
    x = np.random.default_rng(1).integers(0, cfg.vocab_size, size=({P} * {b}, {T} + 1))
    rows = slice(comm.rank * {b}, (comm.rank + 1) * {b})
    report = {{}}
    for mode in ("data", "expert"):
        par = Parallel(mode, comm)
        model = OpenMoE(cfg, seed=0)
        par.prepare_model(model)
        opt = AdamW(model.parameters(), lr=1e-3)
        comm.reset_counts(); comm.calls.clear()
        train_step(model, opt, [Batch(x[rows, :-1], x[rows, 1:], None)], lr=1e-3, parallel=par)
        report[mode] = {{"bytes": dict(comm.bytes), "calls": dict(comm.calls),
                        "n_params": len(list(model.parameters()))}}
    if comm.rank == 0:
        print(json.dumps(report))
"""))
if MPIEXEC:
    env = dict(os.environ)          # the ranks find tinymoe as this process does (installed or on PYTHONPATH)
    one = subprocess.run([sys.executable, "-m", "tinymoe", "train", *common, "--batch-size", str(P * b),
                          "--out", str(OUT / "s14_one")], env=env, capture_output=True, text=True, timeout=240)
    two = subprocess.run([MPIEXEC, "-n", str(P), sys.executable, "-m", "tinymoe", "train", *common,
                          "--batch-size", str(b), "--parallel", "data", "--out", str(OUT / "s14_data")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    l1, l2 = losses(OUT / "s14_one"), losses(OUT / "s14_data")
    print("1 process, batch 4:       " + " ".join(f"{v:.6f}" for v in l1))
    print("2 ranks --parallel data:  " + " ".join(f"{v:.6f}" for v in l2))
    np.testing.assert_allclose(l1, l2, rtol=1e-10)

    proc = subprocess.run([MPIEXEC, "-n", str(P), sys.executable, str(worker)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counted = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = get_preset("toy").replace(dtype="float64", capacity_factor=1.0)
    cnt = count_parameters(cfg)
    for mode, rep in counted.items():
        print(f"--parallel {mode}: " + "; ".join(f"{kd}: {rep['calls'][kd]} call(s), {rep['bytes'][kd]:,} bytes"
                                                for kd in rep["bytes"]))
    data_ar = counted["data"]["bytes"]["allreduce"]
    proj = project_step(cfg, P, b * T, T, flops_per_s=1e12, bandwidth=1e9, latency=0.0, mode="data", grad_itemsize=8)
    print(f"data mode: the gradient all-reduce hands MPI {data_ar:,} bytes = {cnt['total']:,} parameters x 8 bytes, "
          f"in {counted['data']['calls']['allreduce']} calls (one per parameter tensor); a ring moves "
          f"2(P-1)/P of it per rank = {proj['allreduce_bytes']:,.0f} bytes on 2 ranks")
    assert data_ar == cnt["total"] * 8
    assert counted["data"]["calls"]["allreduce"] == counted["data"]["n_params"]
    assert set(counted["data"]["bytes"]) == {"allreduce", "scalars"}, "data mode runs no all-to-all"
    assert counted["expert"]["bytes"]["allreduce"] == (cnt["total"] - cnt["experts"]) * 8
    assert proj["allreduce_bytes"] == 2 * (P - 1) / P * cnt["total"] * 8
    assert counted["data"]["calls"]["scalars"] == 1 and counted["expert"]["calls"]["scalars"] == 2

# %% [markdown]
# The counts answer the question: in data mode one step runs one small `Allreduce` of the
# step's statistics ("scalars": loss, aux, drops and loads, summed over ranks) and one
# `Allreduce` per parameter tensor for the gradients, no all-to-all; the gradient bytes are
# all $W$ parameters (printed above, float64 here). On 2 ranks a ring all-reduce sends
# $2(P-1)/P = 1$ times the buffer, so the cost model's figure equals the bytes handed to MPI;
# on more ranks it approaches twice that. Expert mode runs the four all-to-alls of the
# lesson plus the one-byte-per-row mask exchange, a second small all-reduce (the clipping
# norm of the expert shards), and all-reduces only the replicated weights.

# %%
assert project_step(get_preset("toy"), 8, b * T, T, flops_per_s=1e12, bandwidth=1e9, latency=0.0,
                    mode="data")["allreduce_bytes"] == 2 * 7 / 8 * count_parameters(get_preset("toy"))["total"] * 4
