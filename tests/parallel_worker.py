"""Run under ``mpiexec -n P``: P ranks (data or expert parallel) against one process.

Every rank also builds the one-process reference (the ordinary model on the whole
global batch, the ordinary ``clip_grad_norm_`` and AdamW) and checks, for several steps,
that the global loss, the aux and z losses, every gradient (the rank's expert shard
against the reference's slice) and the weights after the update agree to float64
tolerance. Prints ``OK <mode> P=<P> ...`` on rank 0; any mismatch aborts the job with one
line. Used by tests/test_parallel.py.

    mpiexec -n 2 python tests/parallel_worker.py expert
"""
from __future__ import annotations

import sys

import numpy as np

from tinymoe.config import ModelConfig
from tinymoe.nn.model import OpenMoE
from tinymoe.optim import AdamW, clip_grad_norm_, param_groups_for_decay
from tinymoe.parallel import Comm, ExpertParallelMoE, Parallel, is_expert_param


def close(a, b, what: str, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol):
        diff = np.max(np.abs(a - b)) if a.shape == b.shape else f"shapes {a.shape} vs {b.shape}"
        raise AssertionError(f"{what}: parallel != one process (max |diff| {diff})")


def main(mode: str, steps: int = 3, b: int = 2, seq: int = 16, capacity_factor: float | None = 1.0) -> None:
    comm = Comm()
    par = Parallel(mode, comm)
    p, r = comm.size, comm.rank
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, n_experts=4,
                      top_k=2, moe_every=1, max_seq_len=seq, capacity_factor=capacity_factor,
                      min_capacity=1, dtype="float64")
    ref, model = OpenMoE(cfg, seed=3), OpenMoE(cfg, seed=3)
    par.prepare_model(model)
    opt_ref = AdamW(param_groups_for_decay(ref.named_parameters(), 0.1), lr=1e-2)
    opt = AdamW(param_groups_for_decay(model.named_parameters(), 0.1), lr=1e-2)
    ref_params = dict(ref.named_parameters())
    per = cfg.n_experts // p
    data = np.random.default_rng(7)
    dropped = 0.0
    for step in range(steps):
        win = data.integers(0, cfg.vocab_size, size=(p * b, seq + 1))            # the global batch
        x, y = win[:, :-1], win[:, 1:]
        out_ref = ref(x, targets=y)
        out_ref.loss.backward()
        norm_ref = clip_grad_norm_(list(ref.parameters()), 0.5)

        rows = slice(r * b, (r + 1) * b)
        out = model(x[rows], targets=y[rows])
        out.loss.backward()
        if mode == "expert":   # experts run on the filled rows only: the kept assignments to them
            layers = [m for _, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]
            for layer, st in zip(layers, out.routing):
                load = comm.allreduce_sum(np.asarray(st.load_after, dtype=np.int64), kind="test")  # [E]
                if layer.rows_computed != int(load[layer.lo:layer.hi].sum()):
                    raise AssertionError(f"step {step}: layer {layer.layer_idx} computed "
                                         f"{layer.rows_computed} rows, its experts were given "
                                         f"{int(load[layer.lo:layer.hi].sum())} assignments")
        named = list(model.named_parameters())
        par.reduce_grads(named)
        norm = par.clip_grad_norm_(named, 0.5)
        for name, v in (("loss", out.loss), ("ce", out.ce), ("aux", out.aux_loss), ("z", out.z_loss)):
            glob = comm.allreduce_float(float(v.item())) / p
            close(glob, float(getattr(out_ref, "loss" if name == "loss" else
                                      {"ce": "ce", "aux": "aux_loss", "z": "z_loss"}[name]).item()),
                  f"step {step} {name}")
        close(norm, norm_ref, f"step {step} grad norm")
        for name, prm in named:
            want = ref_params[name].grad
            if mode == "expert" and is_expert_param(name):
                want = want[r * per:(r + 1) * per]
            close(prm.grad, want, f"step {step} grad of {name}")
        dropped += comm.allreduce_float(sum(s.dropped_fraction for s in out.routing) / len(out.routing)) / p
        opt_ref.step(); opt_ref.zero_grad()
        opt.step(); opt.zero_grad()
        for name, prm in named:
            want = ref_params[name].data
            if mode == "expert" and is_expert_param(name):
                want = want[r * per:(r + 1) * per]
            close(prm.data, want, f"step {step} weight {name}")
    if capacity_factor is not None and dropped <= 0:
        raise AssertionError("no assignment was dropped: the test would not cover capacity")
    if r == 0:
        print(f"OK {mode} P={p} steps={steps} dropped={dropped / steps:.3f} "
              f"alltoall_bytes={comm.bytes.get('dispatch', 0)}", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    cf = None if len(sys.argv) > 2 and sys.argv[2] == "dropless" else 1.0
    try:
        main(mode, capacity_factor=cf)
    except BaseException as e:  # noqa: BLE001 (one line, then end every rank: never a hang)
        from mpi4py import MPI
        sys.stderr.write(f"FAIL rank {MPI.COMM_WORLD.Get_rank()}: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
