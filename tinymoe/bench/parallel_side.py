"""``mpiexec -n P python -m tinymoe bench --parallel data|expert``: one training step on P
MPI ranks, timed and split into compute, all-to-all and all-reduce, with the bytes moved.

The step is the trainer's own (:func:`tinymoe.train.train_step` with a
:class:`tinymoe.parallel.Parallel`): every rank takes its b rows of a global batch of
P * b random sequences, forward, backward (the expert exchanges and their mirrors),
gradient all-reduce, clipping, optimizer update.

Time split, per rank, of the median step (steps sorted by wall time; the lower middle one):

    step      wall time of the whole update (all ranks start it together, after a barrier)
    all-to-all  time inside the four expert exchanges of every MoE layer (dispatch,
              combine; forward and backward) and the filled-row mask sent with the
              dispatch, host staging included
    all-reduce  time inside the gradient all-reduces and the small ones (global-batch
              statistics, the clipping norm of sharded experts)
    compute   step - all-to-all - all-reduce (everything outside MPI)

A collective also waits for the slowest rank to arrive, so the MPI columns hold transfer
time plus load imbalance. tokens/s = P b T / the slowest rank's median step.

Bytes (exact counts from the buffers handed to MPI, one rank, one step):

    all-to-all per MoE layer and exchange  = n k d bytes padding,  padding = E C / (k G)

(:func:`tinymoe.parallel.exchange_bytes_per_step`: n = b T tokens of the rank, G tokens per
routing group, C the capacity; padding < 1 when capacity drops assignments, E/k when
dropless), four exchanges per layer, plus the filled-row mask of the dispatch (one byte
per buffer row, E n_groups C per layer, forward only); all-reduce of the gradients = W * bytes, W the
replicated parameters (expert mode: all but the experts; data mode: all of them). The
report compares the counted bytes with these formulas.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from tinymoe import backend as B
from tinymoe.bench.tinymoe_side import bench_train_config
from tinymoe.config import ModelConfig, count_parameters
from tinymoe.data import Batch
from tinymoe.nn.model import OpenMoE
from tinymoe.parallel import Parallel, exchange_bytes_per_step
from tinymoe.optim import configure_optimizers
from tinymoe.train import train_step

np = B.np

__all__ = ["ALLTOALL_KINDS", "ALLREDUCE_KINDS", "bench_parallel", "split_step", "expected_bytes"]

ALLTOALL_KINDS = ("dispatch", "combine", "dispatch_backward", "combine_backward")
MASK_KIND = "dispatch_mask"
ALLREDUCE_KINDS = ("allreduce", "scalars")


def expected_bytes(cfg: ModelConfig, mode: str, micro_batch: int, seq: int) -> dict[str, Any]:
    """The formulas of the module docstring for one rank and one step: all-to-all bytes per
    MoE layer and exchange (0 in data mode) and gradient all-reduce bytes."""
    item = np.dtype(cfg.dtype).itemsize
    counts = count_parameters(cfg)
    replicated = counts["total"] - (counts["experts"] if mode == "expert" else 0)
    out: dict[str, Any] = {"allreduce": replicated * item, "replicated_params": replicated}
    if mode == "expert" and cfg.moe_layers:
        v = exchange_bytes_per_step(cfg, micro_batch * seq, seq)
        out.update(alltoall_per_layer=v["per_exchange"], padding=v["padding"],
                   mask_per_layer=v["per_exchange"] / (cfg.d_model * item),
                   capacity=v["capacity"], group=v["group"], moe_layers=v["moe_layers"])
    else:
        out.update(alltoall_per_layer=0.0, mask_per_layer=0.0, padding=None, capacity=None, group=None,
                   moe_layers=len(cfg.moe_layers))
    return out


def split_step(step_s: float, seconds: dict[str, float]) -> dict[str, float]:
    """One step's wall time split into compute, all-to-all and all-reduce (see the module
    docstring); ``seconds`` are :attr:`tinymoe.parallel.Comm.seconds` of that step."""
    a2a = sum(seconds.get(k, 0.0) for k in (*ALLTOALL_KINDS, MASK_KIND))
    ar = sum(seconds.get(k, 0.0) for k in ALLREDUCE_KINDS)
    return {"step_s": step_s, "compute_s": step_s - a2a - ar, "alltoall_s": a2a, "allreduce_s": ar,
            "scalars_s": seconds.get("scalars", 0.0)}


def bench_parallel(par: Parallel, args: argparse.Namespace, cfg: ModelConfig, micro_batch: int,
                   seq: int) -> dict[str, Any] | None:
    """Time ``args.warmup`` + ``args.steps`` training steps on every rank; returns the report
    part on rank 0 (None on the others). Every rank must call it (collectives)."""
    comm = par.comm
    p, r = par.size, par.rank
    train_cfg = bench_train_config(args.optimizer).replace(batch_size=micro_batch, seq_len=seq)
    par.check(cfg, train_cfg)
    model = OpenMoE(cfg, seed=args.seed)
    par.prepare_model(model)                                          # expert mode: E/P experts here
    model.train()
    optimizer = configure_optimizers(model, train_cfg)
    ids = B.default_rng(args.seed + 1).integers(0, cfg.vocab_size, size=(p * micro_batch, seq + 1))
    rows = ids[r * micro_batch:(r + 1) * micro_batch]                 # [P b, T + 1] -> [b, T + 1]
    batch = Batch(x=rows[:, :-1], y=rows[:, 1:], domain=np.zeros(micro_batch, dtype=np.int64))
    route_rng = B.default_rng(args.seed + 2)

    def one_step() -> tuple[float, dict[str, float], dict[str, int]]:
        par.barrier()                                                 # all ranks start together
        comm.reset_counts()
        B.synchronize()
        t0 = time.perf_counter()
        st = train_step(model, optimizer, [batch], lr=train_cfg.lr, grad_clip=train_cfg.grad_clip,
                        rng=route_rng, parallel=par)
        B.synchronize()
        t = time.perf_counter() - t0
        if st.bad is not None:
            raise ValueError(f"bench step: {st.bad}")
        return t, dict(comm.seconds), dict(comm.bytes)

    for _ in range(args.warmup):
        one_step()
    runs = [one_step() for _ in range(args.steps)]
    counted = runs[0][2]
    if any(run[2] != counted for run in runs):                     # the exchange is static
        raise RuntimeError(f"rank {r}: the bytes moved changed from step to step")
    median = sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]
    mine = {"rank": r, **split_step(median[0], median[1]),
            "all_step_s": [run[0] for run in runs], "bytes": counted}
    per_rank = comm.allgather_obj(mine)
    if not par.is_root:
        return None

    want = expected_bytes(cfg, par.mode, micro_batch, seq)
    n_moe = want["moe_layers"]
    a2a_layer = {k: counted.get(k, 0) / n_moe if n_moe else 0.0 for k in ALLTOALL_KINDS}
    slowest = max(x["step_s"] for x in per_rank)
    tokens = p * micro_batch * seq
    return {"mode": par.mode, "ranks": p, "micro_batch": micro_batch, "global_batch": p * micro_batch,
            "seq": seq, "tokens_per_step": tokens, "tokens_per_s": tokens / slowest,
            "per_rank": per_rank, "alltoall_bytes_per_layer": a2a_layer,
            "mask_bytes_per_layer": counted.get(MASK_KIND, 0) / n_moe if n_moe else 0.0,
            "allreduce_bytes": counted.get("allreduce", 0), "scalars_bytes": counted.get("scalars", 0),
            "expected": want,
            "alltoall_matches_formula": all(v == want["alltoall_per_layer"] for v in a2a_layer.values()),
            "allreduce_matches_formula": counted.get("allreduce", 0) == want["allreduce"]}
