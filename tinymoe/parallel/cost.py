"""The cost model of MPI training: bytes exact, times projected (see docs/parallel.md).

:func:`alltoall_bytes` (one Alltoall of one MoE layer), :func:`exchange_bytes_per_step`
(the expert-parallel exchange volume of a training step) and :func:`project_step` (the
projected step time and memory on P machines).
"""
from __future__ import annotations

from typing import Any

from tinymoe import backend as B
from tinymoe import routing

np = B.np


def alltoall_bytes(n_groups: int, capacity: int, n_experts: int, d_model: int, itemsize: int) -> int:
    """Bytes one rank hands to one Alltoall of one MoE layer: the whole dispatch buffer
    ``E * n_groups * C * d * itemsize`` (a fraction (P-1)/P of it leaves the rank)."""
    return n_experts * n_groups * capacity * d_model * itemsize


def exchange_bytes_per_step(cfg: Any, tokens_per_rank: int, seq_len: int, itemsize: int | None = None,
                            training: bool = True) -> dict[str, float]:
    """Bytes one rank hands to the expert-parallel ``Alltoall``s in one training step.

    Per MoE layer and exchange the rank sends its whole dispatch buffer [E, n_groups*C, d]:

        bytes = tokens * k * d * itemsize * padding,   padding = E * C / (k * G)

    (G tokens per group, C slots per expert per group: ``routing.capacity``); padding < 1
    means the buffer holds fewer slots than assignments (OpenMoE's capacity drops some),
    > 1 empty slots travel too (dropless: padding = E/k). Four exchanges per layer:
    dispatch and combine, forward and backward. Returns ``per_exchange``, ``per_step``
    (all MoE layers, 4 exchanges), ``padding``, ``remote_fraction`` is (P-1)/P of it and
    is left to the caller (it depends on P).
    """
    g = seq_len if cfg.group_size is None else min(cfg.group_size, tokens_per_rank)
    cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
    c = routing.capacity(g, cfg.n_experts, cfg.top_k, cf, cfg.min_capacity, cfg.capacity_mode)
    item = np.dtype(cfg.dtype).itemsize if itemsize is None else itemsize
    padding = cfg.n_experts * c / (cfg.top_k * g)
    per_exchange = tokens_per_rank * cfg.top_k * cfg.d_model * item * padding
    n_moe = len(cfg.moe_layers)
    return {"per_exchange": per_exchange, "per_step": 4 * n_moe * per_exchange,
            "padding": padding, "capacity": c, "group": g, "moe_layers": n_moe}


def project_step(cfg: Any, machines: int, tokens_per_machine: int, seq_len: int, *,
                 flops_per_s: float, bandwidth: float, latency: float, mode: str = "expert",
                 itemsize: int = 2, grad_itemsize: int = 4) -> dict[str, float]:
    """Projected seconds of one training step on ``machines`` ranks (one per machine),
    as the sum of compute and communication (no overlap: an upper bound on time).

    compute   = 6 * N_active * tokens / flops_per_s   (forward + backward matmuls)
    alltoall  = 4 * L_moe * [(P-1)/P * V_exchange / bandwidth + (P-1) * latency]
                (expert mode; V_exchange from :func:`exchange_bytes_per_step`)
    allreduce = 2 (P-1)/P * W * grad_itemsize / bandwidth + 2 (P-1) * latency  (ring)
                W = the replicated parameters (expert mode: all but the experts;
                data mode: all of them)
    memory    = bytes of weights + grads + AdamW state (m, v) per rank, float32
    """
    from tinymoe.config import count_parameters  # noqa: PLC0415
    p = machines
    counts = count_parameters(cfg)
    compute = 6 * counts["active"] * tokens_per_machine / flops_per_s
    if mode == "expert" and p > 1:
        v = exchange_bytes_per_step(cfg, tokens_per_machine, seq_len, itemsize)
        n_msgs = 4 * v["moe_layers"]
        a2a = n_msgs * ((p - 1) / p * v["per_exchange"] / bandwidth + (p - 1) * latency)
        a2a_bytes = (p - 1) / p * v["per_step"]
        replicated = counts["total"] - counts["experts"]
        held = replicated + counts["experts"] / p
    else:
        a2a = a2a_bytes = 0.0
        replicated = counts["total"]
        held = counts["total"]
    ar = (2 * (p - 1) / p * replicated * grad_itemsize / bandwidth + 2 * (p - 1) * latency) if p > 1 else 0.0
    return {"compute_s": compute, "alltoall_s": a2a, "allreduce_s": ar,
            "step_s": compute + a2a + ar, "alltoall_bytes": a2a_bytes,
            "allreduce_bytes": 2 * (p - 1) / p * replicated * grad_itemsize if p > 1 else 0.0,
            "params_per_rank": held, "memory_bytes_per_rank": held * 4 * 4,
            "tokens_per_s": p * tokens_per_machine / (compute + a2a + ar)}
