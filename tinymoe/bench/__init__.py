"""``python -m tinymoe bench``: throughput, model FLOPs utilisation and memory, side by side
with the same model written in PyTorch.

Modules: ``cli`` (flags, the run), ``measure`` (FLOPs, roof, timers, memory, threads,
``--ops``), ``tinymoe_side`` and ``torch_side`` (the two models, one method per phase;
``torch_side`` is imported only for ``--compare-torch``), ``report`` (the printed table),
``parallel_side`` (``--parallel data|expert`` under ``mpiexec -n P``: a training step on P
MPI ranks split into compute, all-to-all and all-reduce, with the bytes moved against
their formulas; see its docstring).

The torch side (``--compare-torch``) is what a careful PyTorch user writes for the same
model on the same weights: ``scaled_dot_product_attention``, ``rms_norm``, fused QKV and
gate|up projections, routing vectorised over all groups, experts on the kept rows only
with one GEMM per expert, ``foreach`` optimizers and clipping, its own KV cache. It makes
the same routing decisions (top-k, capacity, drops, slot priority) and gives the same loss
as tinymoe (checked in tests/test_bench.py); see ``torch_side``'s docstring.

What is measured (each timed ``--steps`` times after ``--warmup`` untimed runs; medians):

- **GEMM roof**: the backend's float32 matrix-multiply rate, the best of several large
  square matmuls (n = 2048 on the CPU, 8192 on a GPU): 2 n^3 FLOPs each, measured before
  and after the phases.
- **forward**: one forward with loss under ``no_grad`` (training-mode routing).
- **fwd+bwd**: forward with the graph, then ``loss.backward()``.
- **train step**: zero grads, forward, backward, global-norm clip to 1.0 and one optimizer
  step (AdamW or Adafactor): what one iteration of ``python -m tinymoe train`` costs.
- **generate**: greedy decoding with the KV cache, batch 1: a ``--gen-prompt``-token
  prompt (prefill), then ``--gen-new`` tokens one at a time. Reported as new tokens per
  second of the decode loop (prefill timed separately).

Model FLOPs (the convention of Kaplan et al. 2020 / PaLM appendix B, counted from the
config's shapes, no causal halving):

    N_active = per token, the weights of every matmul a token goes through
             = L_attn * 4 d d_attn                                   (wq, wk, wv, wo)
             + n_dense * 3 d f                                       (SwiGLU: gate, up, down)
             + n_moe * (d E + k * 3 d f_e + [shared] 3 d f)         (router, top-k experts)
             + d V                                                   (LM head; the embedding
                                                                      lookup costs no FLOPs)
    forward  = 2 N_active + 4 L T d_attn          per token (scores q k^T and P v: 2 T d_attn
                                                  multiply-adds each per layer)
    train    = 6 N_active + 12 L T d_attn         (backward = 2x forward)

with T the sequence length and d_attn = n_heads * head_dim. MFU = achieved model FLOP/s /
GEMM roof, with k experts per token (the usual "active parameters" count). Capacity drops
assignments, though (OpenMoE's cf 1.25 keeps at most 1.25 G of the k G assignments of a
group, at initialisation far fewer), and a dropped assignment is never computed, by
tinymoe or by the torch side; so the report adds the MFU with the expert term counted at the
share of assignments kept on the benchmark batch (measured by one forward before timing).

Memory: ``peak`` is the process's peak resident set during the phase (Linux: VmHWM, reset
before each phase through /proc/self/clear_refs; elsewhere ``ru_maxrss``, the peak since
start), ``+peak`` the same minus the resident set just before the phase (what the phase
itself allocates: activations, gradients, optimizer temporaries). On CuPy the memory pool's
high-water mark is added. For absolute numbers of one side alone, run ``--side tinymoe`` or
``--side torch`` in a fresh process (scripts/openmoe_base_step.py does this for
openmoe-base).

``--ops``: the autograd's Python overhead per op on tiny tensors, and a matmul's
forward + backward against the three bare NumPy/CuPy GEMMs of the same shapes.

``--by-function``: after the phases, ``--steps`` more training steps of the tinymoe side
with a timer on every autograd Function's forward and backward (``measure.FunctionTimes``):
calls and milliseconds per step for each, and the time outside them (engine, optimizer,
routing glue).

Timings of the two sides are interleaved repeat by repeat, so a change of machine load
affects both; the load average is printed before and after. Each timed repeat follows
``--settle`` (default 1) untimed runs of the same side: in one process the two sides share
the cores, and torch's OpenMP workers keep spinning for milliseconds after its last op
(libgomp's default wait policy), so a side timed right after the other one pays for that
and for caches the other side filled. On ``toy`` with 2 threads, strict alternation
(``--settle 0``) timed tinymoe's step at 28 ms and one untimed run before each repeat at
19-23 ms, while torch's own time moved from 18-21 to 17-23 ms (README, "Benchmarks").
"""
from __future__ import annotations

from tinymoe.bench.cli import add_arguments, run
from tinymoe.bench.measure import gemm_roof, model_flops, op_overhead

__all__ = ["add_arguments", "run", "model_flops", "gemm_roof", "op_overhead"]
