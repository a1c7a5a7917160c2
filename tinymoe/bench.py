"""``python -m tinymoe bench``: throughput, model FLOPs utilisation and memory, side by side
with the PyTorch eager twin of the same model (tests/oracle/torch_model.py).

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
tinymoe or by the twin; so the report adds the MFU with the expert term counted at the
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

Timings of the two sides are interleaved repeat by repeat, so a change of machine load
affects both; the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tinymoe import backend as B
from tinymoe.autograd import no_grad, tensor
from tinymoe.config import ModelConfig, get_preset, preset_names
from tinymoe.nn.model import OpenMoE
from tinymoe.optim import Adafactor, AdamW, clip_grad_norm_, param_groups_for_decay

__all__ = ["add_arguments", "run", "model_flops", "gemm_roof", "op_overhead"]

OPTIMIZERS = ("adamw", "adafactor")


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m tinymoe bench``."""
    p.description = ("Throughput (tokens/s), model FLOPs utilisation against the backend's GEMM "
                     "rate, and peak memory of forward, forward+backward, a training step and "
                     "KV-cache generation; optionally side by side with the PyTorch twin.")
    p.add_argument("--config", default="small", help=f"preset: {', '.join(preset_names())} (default: small)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default: 16, 1 for openmoe-*)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the model's max_seq_len, "
                   "512 for openmoe-*)")
    p.add_argument("--steps", type=int, default=5, help="timed repeats per phase (median reported; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each phase (default 1)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--compare-torch", action="store_true", help="also run the PyTorch eager twin")
    p.add_argument("--side", choices=("both", "tinymoe", "torch"), default="both",
                   help="run only one side (for absolute memory in a fresh process); 'torch' implies "
                        "--compare-torch")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for BLAS, tinymoe's row-parallel kernels and torch (default: every "
                        "core); needs threadpoolctl to set NumPy's BLAS")
    p.add_argument("--phases", default="forward,fwd_bwd,step,generate",
                   help="comma list of forward, fwd_bwd, step, generate (default: all)")
    p.add_argument("--gen-prompt", type=int, default=None,
                   help="prompt tokens for generation (default 64, at most half of max_seq_len)")
    p.add_argument("--gen-new", type=int, default=None,
                   help="new tokens for generation (default 64, at most what max_seq_len leaves)")
    p.add_argument("--roof-size", type=int, default=None,
                   help="n of the n x n GEMMs that measure the roof (default 2048 CPU, 8192 GPU)")
    p.add_argument("--ops", action="store_true", help="op-level mode: per-op overhead and matmul vs bare GEMMs")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write every number to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); prints a table."""
    if args.device is not None:
        B.set_device(args.device)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")
    if args.side == "torch":
        args.compare_torch = True
    threads = _set_threads(args.threads)
    report: dict[str, Any] = {"machine": _machine_info(threads), "load_before": _load()}
    torch_mod = _import_torch(threads) if args.compare_torch else None

    roof = gemm_roof(args.roof_size, repeats=max(7, args.steps))
    report["gemm_roof"] = roof
    if torch_mod is not None:
        report["torch_gemm_roof"] = _torch_gemm_roof(torch_mod, roof["n"], max(7, args.steps))

    if args.ops:
        report["ops"] = op_overhead(args.steps, torch_mod)
        ok = True
    else:
        ok = _bench_model(args, report, roof, torch_mod)
        # the roof again after the phases, keeping the better: one slow spell of the machine
        # during the first measurement would otherwise inflate every MFU
        again = gemm_roof(args.roof_size, repeats=max(7, args.steps))
        if again["flops_per_s"] > roof["flops_per_s"]:
            again["seconds"] = roof["seconds"] + again["seconds"]
            report["gemm_roof"] = again
            for phases in report.get("results", {}).values():
                for r in phases.values():
                    if "flops_per_s" in r:
                        r["mfu"] = r["flops_per_s"] / again["flops_per_s"]
                        r["mfu_kept"] = r["flops_per_s_kept"] / again["flops_per_s"]
        else:
            roof["seconds"] = roof["seconds"] + again["seconds"]
    report["load_after"] = _load()
    print(_format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=_json_default))
        print(f"wrote {args.json}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- FLOPs

def model_flops(cfg: ModelConfig, seq: int, kept_fraction: float = 1.0) -> dict[str, float]:
    """Model FLOPs per token of ``cfg`` at sequence length ``seq`` (see the module docstring).

    ``kept_fraction``: the share of the k expert assignments per token that capacity keeps
    (1.0 counts all k; ``bench`` measures it on its batch, since dropped assignments are
    never computed)."""
    d, da, f, V = cfg.d_model, cfg.attn_dim, cfg.d_ff, cfg.vocab_size
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.n_layers - n_moe
    attn = cfg.n_layers * 4 * d * da
    dense = n_dense * 3 * d * f
    moe = n_moe * (d * cfg.n_experts + kept_fraction * cfg.top_k * 3 * d * cfg.expert_ff
                   + (3 * d * f if cfg.shared_ffn else 0))
    head = d * V
    n_active = attn + dense + moe + head
    attn_scores = cfg.n_layers * seq * da                       # multiply-adds per token / 2
    return {"n_active_matmul_params": float(n_active), "kept_fraction": float(kept_fraction),
            "forward_per_token": 2.0 * n_active + 4.0 * attn_scores,
            "train_per_token": 6.0 * n_active + 12.0 * attn_scores,
            "decode_per_token": 2.0 * n_active}


# ----------------------------------------------------------------------------- helpers

def _median_time(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        B.synchronize()
        t0 = time.perf_counter()
        fn()
        B.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def gemm_roof(n: int | None = None, repeats: int = 7) -> dict[str, Any]:
    """float32 GEMM rate of the current backend: the best of ``repeats`` n x n matmuls.

    The best, not the median: a roof is what the machine can reach, and on a shared or
    virtual machine a slow repeat (another job, a clock still ramping up) would lower the
    roof and push the model's MFU above 100%."""
    xp = B.xp
    n = n or (8192 if B.get_device() == "cuda" else 2048)
    rng = B.default_rng(0)
    a = B.to_device(rng.standard_normal((n, n), dtype=B.np.float32))
    b = B.to_device(rng.standard_normal((n, n), dtype=B.np.float32))
    out = xp.empty((n, n), dtype=xp.float32)
    _, times = _median_time(lambda: xp.matmul(a, b, out=out), repeats, 2)
    return {"n": n, "flops_per_s": 2.0 * n ** 3 / min(times), "seconds": times}


def _torch_gemm_roof(torch: Any, n: int, repeats: int) -> dict[str, Any]:
    a = torch.randn(n, n)                                     # on torch's default device
    b = torch.randn(n, n)

    def gemm() -> None:
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()                          # CUDA kernels are asynchronous

    _, times = _median_time(gemm, repeats, 2)
    return {"n": n, "flops_per_s": 2.0 * n ** 3 / min(times), "seconds": times}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc), else 0."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _PeakMemory:
    """Peak resident memory during a block: resets Linux's VmHWM, reads it afterwards."""

    def __init__(self) -> None:
        self.peak = self.before = self.pool = 0
        self.reset_ok = False

    def __enter__(self) -> "_PeakMemory":
        gc.collect()
        B.free_device_pool()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")                                  # resets the peak RSS to the current RSS
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.before = _rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        peak = 0
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
        except OSError:
            pass
        if not peak:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        self.peak = peak
        self.pool = B.device_pool_bytes()

    def as_dict(self) -> dict[str, Any]:
        return {"peak_rss": self.peak, "rss_before": self.before, "phase_peak_increase": self.peak - self.before,
                "peak_is_per_phase": self.reset_ok, "device_pool_peak": self.pool}


def _set_threads(n: int | None) -> dict[str, Any]:
    """Use ``n`` threads for BLAS and the row-parallel kernels (``B.set_num_threads``), and
    say which BLAS runs."""
    info: dict[str, Any] = {"requested": n}
    if n is not None:
        B.set_num_threads(n)
    try:
        import threadpoolctl  # noqa: PLC0415  (optional)
    except ImportError:
        info["blas"] = "unknown (pip install threadpoolctl to see and set BLAS threads)"
        info["threads"] = B.get_num_threads()
        return info
    blas = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    if blas:
        b = blas[0]
        info["blas"] = f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture', '?')} kernel)"
        info["threads"] = int(b.get("num_threads", 0))
    else:
        info["blas"] = "none found"
        info["threads"] = B.get_num_threads()
    info["kernel_threads"] = B.get_num_threads()
    return info


def _machine_info(threads: dict[str, Any]) -> dict[str, Any]:
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                      "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT") if k in os.environ}
    return {"device": B.get_device(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "blas": threads.get("blas"), "threads": threads.get("threads"),
            "python": platform.python_version(), "numpy": B.np.__version__, "env": env,
            "kernel_threads": threads.get("kernel_threads", B.get_num_threads()),
            "malloc_keeps_freed": B.keep_freed_memory()}


def _import_torch(threads: dict[str, Any]) -> Any:
    """torch, with the same thread count as NumPy (imported only for --compare-torch)."""
    try:
        import torch  # noqa: PLC0415  (optional: the twin only)
    except ImportError:
        raise ValueError("--compare-torch needs PyTorch (pip install torch)") from None
    n = threads.get("threads")
    if n:
        torch.set_num_threads(int(n))
    if B.get_device() == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--compare-torch with --device cuda needs a CUDA build of PyTorch")
        torch.set_default_device("cuda")                       # the twin's factory calls land on the GPU
    threads["torch_threads"] = torch.get_num_threads()
    return torch


def _import_twin() -> tuple[Any, Any, Any]:
    """The torch twin modules from the repository's tests/oracle (torch_model, torch_moe)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests" / "oracle" / "torch_model.py").exists():
        raise ValueError(f"--compare-torch needs the torch twin in {root / 'tests' / 'oracle'} "
                         "(run from a source checkout)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests.oracle import torch_model, torch_moe  # noqa: PLC0415  (torch, lazily)
    return torch_model, torch_moe, None


def _check_float32(model: OpenMoE, dtype: str) -> list[str]:
    """Names of parameters (or grads) whose dtype is not the model's: float64 creep."""
    bad = []
    for name, p in model.named_parameters():
        if str(p.data.dtype) != dtype:
            bad.append(f"{name} data {p.data.dtype}")
        if p.grad is not None and str(p.grad.dtype) != dtype:
            bad.append(f"{name} grad {p.grad.dtype}")
    return bad


# ----------------------------------------------------------------------------- tinymoe side

class _Tinymoe:
    """tinymoe model, optimizer and a fixed batch; one method per measured phase."""

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, optimizer: str, seed: int):
        self.cfg = cfg
        self.model = OpenMoE(cfg, seed=seed)
        self.params = list(self.model.parameters())
        if optimizer == "adamw":
            self.opt = AdamW(param_groups_for_decay(self.model.named_parameters(), 0.1), lr=1e-4)
        else:   # OpenMoE's Adafactor setting (as tinymoe.train builds it)
            self.opt = Adafactor(self.params, lr=1e-2, decay_rate=0.8, beta1=None, clip_threshold=1.0,
                                 scale_parameter=True, relative_step=False)
        rng = B.default_rng(seed + 1)
        ids = rng.integers(0, cfg.vocab_size, size=(batch, seq + 1))
        self.x, self.y = ids[:, :-1], ids[:, 1:]
        self.route_rng = B.default_rng(seed + 2)

    def sync(self) -> None:
        B.synchronize()

    def kept_fraction(self) -> float:
        """Share of the k expert assignments per token that capacity keeps on this batch
        (mean over MoE layers; 1.0 for a dense model). The twin drops the same ones."""
        with no_grad():
            routing = self.model(self.x, rng=B.default_rng(0)).routing
        if not routing:
            return 1.0
        k = self.cfg.top_k
        return sum(float(B.to_numpy(s.load_after).sum()) / (s.kept.shape[0] * k) for s in routing) / len(routing)

    def forward(self) -> float:
        with no_grad():
            return float(self.model(self.x, targets=self.y, rng=self.route_rng).loss.item())

    def fwd_bwd(self) -> float:
        self.model.zero_grad()
        out = self.model(self.x, targets=self.y, rng=self.route_rng)
        out.loss.backward()
        return float(out.loss.item())

    def step(self) -> float:
        self.opt.zero_grad()
        out = self.model(self.x, targets=self.y, rng=self.route_rng)
        loss = float(out.loss.item())
        out.loss.backward()
        del out
        clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss

    def generate(self, prompt: Any, n_new: int) -> tuple[float, float, list[int]]:
        """Greedy KV-cache decoding; returns (prefill seconds, decode seconds, new ids)."""
        model = self.model
        model.eval()
        try:
            with no_grad():
                cache = model.new_cache(1, prompt.shape[1] + n_new)
                B.synchronize()
                t0 = time.perf_counter()
                logits = model(prompt, cache=cache).logits.data[0, -1]           # [V]
                nxt = int(logits.argmax())
                t1 = time.perf_counter()
                ids = [nxt]
                for _ in range(n_new - 1):
                    logits = model(B.np.asarray([[nxt]]), cache=cache).logits.data[0, -1]
                    nxt = int(logits.argmax())
                    ids.append(nxt)
                B.synchronize()
                t2 = time.perf_counter()
        finally:
            model.train()
        return t1 - t0, t2 - t1, ids


# ----------------------------------------------------------------------------- torch side

class _Torch:
    """The PyTorch eager twin (tests/oracle/torch_model.py) on the same weights and batch."""

    def __init__(self, torch: Any, cfg: ModelConfig, state: dict[str, Any], x: Any, y: Any, optimizer: str):
        self.torch = torch
        self.tm, self.tmoe, _ = _import_twin()
        self.cfg = cfg
        dt = getattr(torch, cfg.dtype)
        self.p = {k: torch.tensor(v, dtype=dt, requires_grad=True) for k, v in state.items()}
        self.params = list(self.p.values())
        if optimizer == "adamw":
            decay = [t for t in self.params if t.ndim >= 2]
            no_decay = [t for t in self.params if t.ndim < 2]
            self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                          {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
        else:   # torch's own Adafactor (factored second moments, decay t^-0.8, update clip 1.0)
            self.opt = torch.optim.Adafactor(self.params, lr=1e-2, beta2_decay=-0.8, d=1.0, weight_decay=0.0)
        self.x = torch.tensor(B.np.asarray(x))                # on torch's default device
        self.y = torch.tensor(B.np.asarray(y))

    def sync(self) -> None:
        """Wait for queued CUDA work (no-op on the CPU)."""
        if self.torch.cuda.is_available() and B.get_device() == "cuda":
            self.torch.cuda.synchronize()

    def _loss(self) -> Any:
        return self.tm.twin_model(self.cfg, self.p, self.x, self.y)["loss"]

    def forward(self) -> float:
        with self.torch.no_grad():
            return float(self._loss().item())

    def fwd_bwd(self) -> float:
        for t in self.params:
            t.grad = None
        loss = self._loss()
        loss.backward()
        return float(loss.item())

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss()
        value = float(loss.item())
        loss.backward()
        del loss
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return value

    def generate(self, prompt: Any, n_new: int) -> tuple[float, float, list[int]]:
        """Greedy decoding with a KV cache written here in plain torch from the twin's pieces."""
        torch = self.torch
        cfg = self.cfg.replace(capacity_factor=self.cfg.eval_capacity_factor)   # eval routing
        dh = cfg.head_dim
        max_len = prompt.shape[1] + n_new
        caches = [(torch.zeros(1, cfg.n_heads, max_len, dh), torch.zeros(1, cfg.n_heads, max_len, dh))
                  for _ in range(cfg.n_layers)]
        with torch.no_grad():
            t0 = time.perf_counter()
            logits = _torch_cached_forward(self.tm, self.tmoe, cfg, self.p, torch.tensor(prompt), caches, 0)
            nxt = int(logits[0, -1].argmax())
            t1 = time.perf_counter()
            ids = [nxt]
            pos = prompt.shape[1]
            for _ in range(n_new - 1):
                logits = _torch_cached_forward(self.tm, self.tmoe, cfg, self.p, torch.tensor([[nxt]]), caches, pos)
                pos += 1
                nxt = int(logits[0, -1].argmax())
                ids.append(nxt)
            self.sync()
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, ids


def _torch_cached_forward(tm: Any, tmoe: Any, cfg: ModelConfig, p: dict, ids: Any, caches: list, start: int) -> Any:
    """The twin decoder over new tokens ``ids`` [1, T] at positions start.., with per-layer
    (k, v) caches [1, H, max_len, dh] (plain eager torch; the same maths as twin_model)."""
    import torch  # noqa: PLC0415
    bsz, seq = ids.shape
    dh, H, eps = cfg.head_dim, cfg.n_heads, cfg.norm_eps
    pos = torch.arange(start, start + seq)
    h = p["tok_emb.weight"][ids]                                                  # [B, T, d]
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        x = tm.rms_norm(h, p[f"{b}.attn_norm.weight"], eps)

        def heads(t: Any) -> Any:
            return t.reshape(bsz, seq, H, dh).transpose(1, 2)                     # [B, H, T, dh]

        q = tm.rope(heads(x @ p[f"{b}.attn.wq.weight"]), pos, cfg.rope_base)
        k = tm.rope(heads(x @ p[f"{b}.attn.wk.weight"]), pos, cfg.rope_base)
        v = heads(x @ p[f"{b}.attn.wv.weight"])
        ck, cv = caches[i]
        ck[:, :, start:start + seq] = k
        cv[:, :, start:start + seq] = v
        S = start + seq
        scores = q @ ck[:, :, :S].transpose(-1, -2) / math.sqrt(dh)              # [B, H, T, S]
        allowed = torch.ones(seq, S, dtype=torch.bool).tril(diagonal=S - seq)
        scores = scores.masked_fill(~allowed, float("-inf"))
        o = torch.softmax(scores, -1) @ cv[:, :, :S]                              # [B, H, T, dh]
        h = h + o.transpose(1, 2).reshape(bsz, seq, H * dh) @ p[f"{b}.attn.wo.weight"]
        x = tm.rms_norm(h, p[f"{b}.ffn_norm.weight"], eps)
        if cfg.is_moe_block(i):
            r = tmoe.twin_moe(x, p[f"{b}.moe.router.weight"], p[f"{b}.moe.experts.w_gate"],
                              p[f"{b}.moe.experts.w_up"], p[f"{b}.moe.experts.w_down"], cfg.top_k,
                              cfg.capacity_factor, cfg.group_size, cfg.min_capacity, cfg.capacity_mode,
                              cfg.slot_priority, cfg.renormalize)
            h = h + r["y"]
            if cfg.shared_ffn:
                s = tm.rms_norm(h, p[f"{b}.shared_norm.weight"], eps)
                h = h + tmoe.swiglu_ffn(s, p[f"{b}.shared_ffn.w_gate.weight"], p[f"{b}.shared_ffn.w_up.weight"],
                                        p[f"{b}.shared_ffn.w_down.weight"])
        else:
            h = h + tmoe.swiglu_ffn(x, p[f"{b}.ffn.w_gate.weight"], p[f"{b}.ffn.w_up.weight"],
                                    p[f"{b}.ffn.w_down.weight"])
    h = tm.rms_norm(h, p["norm_f.weight"], eps)
    head = p["tok_emb.weight"].T if cfg.tie_embeddings else p["lm_head.weight"]
    return h @ head                                                               # [B, T, V]


# ----------------------------------------------------------------------------- model bench

def _bench_model(args: argparse.Namespace, report: dict[str, Any], roof: dict[str, Any], torch: Any) -> bool:
    big = args.config.startswith("openmoe")
    cfg = get_preset(args.config)
    batch = args.batch if args.batch is not None else (1 if big else 16)
    seq = args.seq if args.seq is not None else (512 if big else cfg.max_seq_len)
    if batch < 1 or not 1 <= seq <= cfg.max_seq_len:
        raise ValueError(f"--batch={batch} must be >= 1 and --seq={seq} between 1 and max_seq_len={cfg.max_seq_len}")
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = sorted(set(phases) - {"forward", "fwd_bwd", "step", "generate"})
    if unknown:
        raise ValueError(f"unknown --phases {unknown}: use forward, fwd_bwd, step, generate")
    gen_prompt = args.gen_prompt if args.gen_prompt is not None else min(64, cfg.max_seq_len // 2)
    gen_new = args.gen_new if args.gen_new is not None else min(64, cfg.max_seq_len - gen_prompt)
    if "generate" in phases and (gen_prompt < 1 or gen_new < 1 or gen_prompt + gen_new > cfg.max_seq_len):
        raise ValueError(f"--gen-prompt={gen_prompt} + --gen-new={gen_new} must be >= 1 each and fit "
                         f"max_seq_len={cfg.max_seq_len}")
    tokens = batch * seq
    tm = _Tinymoe(cfg, batch, seq, args.optimizer, args.seed)
    flops = model_flops(cfg, seq)
    kept = model_flops(cfg, seq, tm.kept_fraction())
    flops["kept_fraction"] = kept["kept_fraction"]
    flops["train_per_token_kept"] = kept["train_per_token"]
    flops["forward_per_token_kept"] = kept["forward_per_token"]
    report.update(config=args.config, describe=cfg.describe(), batch=batch, seq=seq, optimizer=args.optimizer,
                  steps=args.steps, warmup=args.warmup, flops=flops, side=args.side)
    th = None
    if torch is not None:
        th = _Torch(torch, cfg, tm.model.state_dict(), tm.x, tm.y, args.optimizer)
    if args.side == "torch":
        x, y = tm.x, tm.y
        del tm
        gc.collect()
        tm = None
    elif args.side == "tinymoe":
        th = None

    sides = {"tinymoe": tm, "torch": th}
    results: dict[str, dict[str, Any]] = {"tinymoe": {}, "torch": {}}
    ok = True
    per_token = {"forward": flops["forward_per_token"], "fwd_bwd": flops["train_per_token"],
                 "step": flops["train_per_token"]}
    for phase in [ph for ph in phases if ph != "generate"]:
        # memory: one untimed run of each side under a fresh peak (this is also the warm-up)
        for name, side in sides.items():
            if side is None:
                continue
            with _PeakMemory() as mem:
                getattr(side, phase)()
            results[name][phase] = {"memory": mem.as_dict()}
        # time: repeats interleaved side by side
        times: dict[str, list[float]] = {n: [] for n, s in sides.items() if s is not None}
        for _ in range(max(args.warmup - 1, 0)):
            for name in times:
                getattr(sides[name], phase)()
        for _ in range(args.steps):
            for name in times:
                sides[name].sync()
                t0 = time.perf_counter()
                getattr(sides[name], phase)()
                sides[name].sync()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            med = statistics.median(ts)
            r = results[name][phase]
            r.update(seconds=med, all_seconds=ts, tokens_per_s=tokens / med,
                     flops_per_s=per_token[phase] * tokens / med,
                     flops_per_s_kept=per_token[phase] * (kept["train_per_token"] / flops["train_per_token"])
                     * tokens / med)
            r["mfu"] = r["flops_per_s"] / roof["flops_per_s"]
            r["mfu_kept"] = r["flops_per_s_kept"] / roof["flops_per_s"]
        if phase in ("fwd_bwd", "step") and tm is not None:
            bad = _check_float32(tm.model, cfg.dtype)
            results["tinymoe"][phase]["dtype_check"] = bad or "ok"
            if bad:
                ok = False
                print(f"error: not {cfg.dtype}: {', '.join(bad[:5])}", file=sys.stderr)

    if "generate" in phases:
        prompt = B.default_rng(args.seed + 3).integers(0, cfg.vocab_size, size=(1, gen_prompt))
        n_new = gen_new
        gen: dict[str, list] = {n: [] for n, s in sides.items() if s is not None}
        ids_of: dict[str, list[int]] = {}
        for name in gen:                                       # warm-up, and memory
            with _PeakMemory() as mem:
                ids_of[name] = sides[name].generate(prompt, n_new)[2]
            results[name]["generate"] = {"memory": mem.as_dict()}
        for _ in range(args.steps):
            for name in gen:
                gen[name].append(sides[name].generate(prompt, n_new)[:2])
        for name, runs in gen.items():
            pre = statistics.median(r[0] for r in runs)
            dec = statistics.median(r[1] for r in runs)
            results[name]["generate"].update(
                prompt=gen_prompt, new_tokens=n_new, prefill_seconds=pre, decode_seconds=dec,
                tokens_per_s=(n_new - 1) / dec if n_new > 1 else float("nan"),
                prefill_tokens_per_s=gen_prompt / pre)
        if len(ids_of) == 2:
            same = sum(a == b for a, b in zip(ids_of["tinymoe"], ids_of["torch"]))
            results["tinymoe"]["generate"]["greedy_tokens_equal_to_torch"] = f"{same}/{n_new}"

    report["results"] = {k: v for k, v in results.items() if v}
    if th is not None and tm is not None:
        report["ratio_tinymoe_over_torch"] = {
            ph: results["tinymoe"][ph]["tokens_per_s"] / results["torch"][ph]["tokens_per_s"]
            for ph in results["tinymoe"] if ph in results["torch"]}
    return ok


# ----------------------------------------------------------------------------- ops mode

def op_overhead(repeats: int = 5, torch: Any = None, n_ops: int = 2000,
                mm_shape: tuple[int, int, int] = (512, 256, 1024)) -> dict[str, Any]:
    """(a) Python overhead per op: a chain of ``n_ops`` additions on [4, 4] tensors, with the
    graph recorded, then forward + backward; (b) a matmul [m, k] @ [k, n], forward +
    backward, against the three bare GEMMs it needs (a @ w, g @ w^T, a^T @ g)."""
    xp = B.xp
    rng = B.default_rng(0)
    small = B.to_device(rng.standard_normal((4, 4), dtype=B.np.float32))
    x = tensor(small, requires_grad=True)

    def chain() -> Any:
        y = x
        for _ in range(n_ops):
            y = y + x
        return y

    def chain_bwd() -> None:
        x.grad = None
        chain().sum().backward()

    def bare() -> None:
        y = small
        for _ in range(n_ops):
            y = y + small

    t_fwd, _ = _median_time(chain, repeats, 1)
    t_bwd, _ = _median_time(chain_bwd, repeats, 1)
    t_bare, _ = _median_time(bare, repeats, 1)
    out: dict[str, Any] = {"n_ops": n_ops, "us_per_op_forward": 1e6 * t_fwd / n_ops,
                           "us_per_op_fwd_bwd": 1e6 * t_bwd / n_ops, "us_per_op_bare_array": 1e6 * t_bare / n_ops}

    m, k, n = mm_shape
    a_arr = B.to_device(rng.standard_normal((m, k), dtype=B.np.float32))
    w_arr = B.to_device(rng.standard_normal((k, n), dtype=B.np.float32))
    g_arr = B.to_device(rng.standard_normal((m, n), dtype=B.np.float32))
    a, w = tensor(a_arr, requires_grad=True), tensor(w_arr, requires_grad=True)

    def mm() -> None:
        a.grad = w.grad = None
        (a @ w).backward(g_arr)

    def mm_bare() -> None:
        _ = a_arr @ w_arr
        _ = g_arr @ w_arr.T
        _ = a_arr.T @ g_arr

    t_mm, _ = _median_time(mm, repeats, 1)
    t_mm_bare, _ = _median_time(mm_bare, repeats, 1)
    out["matmul"] = {"shape": [m, k, n], "seconds": t_mm, "bare_seconds": t_mm_bare, "ratio": t_mm / t_mm_bare,
                     "flops_per_s": 6.0 * m * k * n / t_mm}
    del xp
    if torch is not None:
        tx = torch.randn(4, 4, requires_grad=True)

        def tchain() -> Any:
            y = tx
            for _ in range(n_ops):
                y = y + tx
            return y

        def tchain_bwd() -> None:
            tx.grad = None
            tchain().sum().backward()

        ta, tw = torch.randn(m, k, requires_grad=True), torch.randn(k, n, requires_grad=True)
        tg = torch.randn(m, n)

        def tmm() -> None:
            ta.grad = tw.grad = None
            (ta @ tw).backward(tg)

        out["torch"] = {"us_per_op_forward": 1e6 * _median_time(tchain, repeats, 1)[0] / n_ops,
                        "us_per_op_fwd_bwd": 1e6 * _median_time(tchain_bwd, repeats, 1)[0] / n_ops,
                        "matmul_seconds": _median_time(tmm, repeats, 1)[0]}
    return out


# ----------------------------------------------------------------------------- report

def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _h(x: float, unit: str = "") -> str:
    for suffix, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.1f}{unit}"


def _format_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"tinymoe bench | device {m['device']} | {m['cores']} cores, {m['threads']} BLAS threads, "
             f"{m['kernel_threads']} kernel threads | BLAS {m['blas']}"
             + (f" | env {m['env']}" if m["env"] else "")
             + (" | malloc keeps freed blocks" if m.get("malloc_keeps_freed") else ""),
             f"load average before {r['load_before']}, after {r['load_after']}",
             f"GEMM roof (float32, {r['gemm_roof']['n']}^3, best of {len(r['gemm_roof']['seconds'])}): {_h(r['gemm_roof']['flops_per_s'], 'FLOP/s')}"
             + (f"   torch: {_h(r['torch_gemm_roof']['flops_per_s'], 'FLOP/s')}" if "torch_gemm_roof" in r else "")]
    if "ops" in r:
        o = r["ops"]
        mm = o["matmul"]
        lines += [f"op overhead ({o['n_ops']} adds on [4, 4]): {o['us_per_op_forward']:.2f} us/op forward with graph, "
                  f"{o['us_per_op_fwd_bwd']:.2f} us/op forward+backward, {o['us_per_op_bare_array']:.2f} us/op bare array",
                  f"matmul {mm['shape'][0]}x{mm['shape'][1]}x{mm['shape'][2]} forward+backward: "
                  f"{1e3 * mm['seconds']:.2f} ms vs {1e3 * mm['bare_seconds']:.2f} ms for the 3 bare GEMMs "
                  f"(ratio {mm['ratio']:.3f}), {_h(mm['flops_per_s'], 'FLOP/s')}"]
        if "torch" in o:
            t = o["torch"]
            lines.append(f"torch: {t['us_per_op_forward']:.2f} us/op forward, {t['us_per_op_fwd_bwd']:.2f} us/op "
                         f"forward+backward; matmul forward+backward {1e3 * t['matmul_seconds']:.2f} ms")
        return "\n".join(lines)
    f = r["flops"]
    lines += [f"config {r['config']}: {r['describe']}",
              f"batch [{r['batch']}, {r['seq']}], optimizer {r['optimizer']}, median of {r['steps']} "
              f"(warm-up {r['warmup']})",
              f"model FLOPs/token: forward {_h(f['forward_per_token'])}, train {_h(f['train_per_token'])} "
              f"(6 N + 12 L T d_attn, N = {_h(f['n_active_matmul_params'])} active matmul params, k experts per token)", ""]
    res = r["results"]
    names = [n for n in ("tinymoe", "torch") if n in res]
    head = f"{'phase':<11}" + "".join(f"| {n + ' tok/s':>14} {'MFU':>6} {'peak':>9} {'+peak':>9} " for n in names)
    if len(names) == 2:
        head += "| tinymoe/torch"
    lines += [head, "-" * len(head)]
    for ph in ("forward", "fwd_bwd", "step"):
        if ph not in res[names[0]]:
            continue
        row = f"{ph:<11}"
        for n in names:
            x = res[n][ph]
            mem = x["memory"]
            row += (f"| {x['tokens_per_s']:>14,.0f} {100 * x['mfu']:>5.1f}% {_h(mem['peak_rss'], 'B'):>9} "
                    f"{_h(mem['phase_peak_increase'], 'B'):>9} ")
        if len(names) == 2:
            row += f"| {r['ratio_tinymoe_over_torch'][ph]:.2f}x"
        lines.append(row)
    if "generate" in res[names[0]]:
        row = f"{'generate':<11}"
        for n in names:
            x = res[n]["generate"]
            row += f"| {x['tokens_per_s']:>14,.1f} {'':>6} {_h(x['memory']['peak_rss'], 'B'):>9} {'':>9} "
        if len(names) == 2:
            row += f"| {r['ratio_tinymoe_over_torch']['generate']:.2f}x"
        lines.append(row)
        g = res[names[0]]["generate"]
        extra = (f"; greedy tokens equal to torch's: {g['greedy_tokens_equal_to_torch']}"
                 if "greedy_tokens_equal_to_torch" in g else "")
        lines.append(f"generate: batch 1, {g['prompt']}-token prompt (prefill "
                     + ", ".join(f"{n} {1e3 * res[n]['generate']['prefill_seconds']:.1f} ms" for n in names)
                     + f"), then {g['new_tokens']} new tokens, decode tokens/s{extra}")
    timed = [ph for ph in ("forward", "fwd_bwd", "step") if ph in res[names[0]]]
    if timed and f.get("kept_fraction", 1.0) < 1.0:
        lines.append(f"MFU above counts k experts per token; capacity kept {100 * f['kept_fraction']:.0f}% of the "
                     "assignments on this batch, and counting only those: "
                     + "; ".join(f"{ph} " + " / ".join(f"{100 * res[n][ph]['mfu_kept']:.1f}%" for n in names)
                                 for ph in timed)
                     + (" (tinymoe / torch)" if len(names) == 2 else ""))
    for n in names:
        dc = res[n].get("step", res[n].get("fwd_bwd", {})).get("dtype_check")
        if dc is not None:
            lines.append(f"{n}: every parameter and grad float32: {'yes' if dc == 'ok' else dc}")
    lines.append("peak = process peak RSS during the phase; +peak = peak minus RSS before it"
                 + ("" if res[names[0]][next(iter(res[names[0]]))]["memory"]["peak_is_per_phase"]
                    else " (peak not resettable here: process-wide)"))
    return "\n".join(lines)
