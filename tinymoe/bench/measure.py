"""What ``bench`` measures with, independent of either side: model FLOPs, the GEMM roof,
timers, peak-memory probes, thread setup and machine facts, and the op-level mode.

Model FLOPs follow Kaplan et al. 2020 / PaLM appendix B (see :func:`model_flops`); the
roof is the best of several n x n float32 matmuls of the current backend; memory is the
process's peak resident set during a phase (Linux VmHWM, reset through
/proc/self/clear_refs), plus the CuPy pool's high-water mark on a GPU.
"""
from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

from tinymoe import backend as B
from tinymoe.autograd import tensor
from tinymoe.config import ModelConfig

__all__ = ["model_flops", "gemm_roof", "median_time", "PeakMemory", "load_average", "set_threads",
           "machine_info", "op_overhead", "FunctionTimes", "function_times"]


def model_flops(cfg: ModelConfig, seq: int, kept_fraction: float = 1.0) -> dict[str, float]:
    """Model FLOPs per token of ``cfg`` at sequence length ``seq`` (see the docstring of ``tinymoe.bench``).

    ``kept_fraction``: the share of the k expert assignments per token that capacity keeps
    (1.0 counts all k; ``bench`` measures it on its batch, since dropped assignments are
    never computed)."""
    d, da, f, V = cfg.d_model, cfg.attn_dim, cfg.d_ff, cfg.vocab_size
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.n_layers - n_moe
    attn = cfg.n_layers * 4 * d * da
    m = 4 if cfg.ffn_kind == "openmoe" else 3                   # weights per hidden unit: 4 d f or 3 d f
    dense = n_dense * m * d * f
    moe = n_moe * (d * cfg.n_experts + kept_fraction * cfg.top_k * m * d * cfg.expert_ff
                   + (m * d * cfg.shared_ff if cfg.shared_ffn else 0))
    head = d * V
    n_active = attn + dense + moe + head
    attn_scores = cfg.n_layers * seq * da                       # multiply-adds per token / 2
    return {"n_active_matmul_params": float(n_active), "kept_fraction": float(kept_fraction),
            "forward_per_token": 2.0 * n_active + 4.0 * attn_scores,
            "train_per_token": 6.0 * n_active + 12.0 * attn_scores,
            "decode_per_token": 2.0 * n_active}


def median_time(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, list[float]]:
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
    _, times = median_time(lambda: xp.matmul(a, b, out=out), repeats, 2)
    return {"n": n, "flops_per_s": 2.0 * n ** 3 / min(times), "seconds": times}


def load_average() -> list[float] | None:
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


class PeakMemory:
    """Peak resident memory during a block: resets Linux's VmHWM, reads it afterwards."""

    def __init__(self) -> None:
        self.peak = self.before = self.pool = 0
        self.reset_ok = False

    def __enter__(self) -> "PeakMemory":
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


def set_threads(n: int | None) -> dict[str, Any]:
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


def machine_info(threads: dict[str, Any]) -> dict[str, Any]:
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                      "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT") if k in os.environ}
    return {"device": B.get_device(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "blas": threads.get("blas"), "threads": threads.get("threads"),
            "python": platform.python_version(), "numpy": B.np.__version__, "env": env,
            "kernel_threads": threads.get("kernel_threads", B.get_num_threads()),
            "malloc_keeps_freed": B.keep_freed_memory()}


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

    t_fwd, _ = median_time(chain, repeats, 1)
    t_bwd, _ = median_time(chain_bwd, repeats, 1)
    t_bare, _ = median_time(bare, repeats, 1)
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

    t_mm, _ = median_time(mm, repeats, 1)
    t_mm_bare, _ = median_time(mm_bare, repeats, 1)
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

        out["torch"] = {"us_per_op_forward": 1e6 * median_time(tchain, repeats, 1)[0] / n_ops,
                        "us_per_op_fwd_bwd": 1e6 * median_time(tchain_bwd, repeats, 1)[0] / n_ops,
                        "matmul_seconds": median_time(tmm, repeats, 1)[0]}
    return out


class FunctionTimes:
    """While active, the wall time spent in each autograd Function's ``forward`` and
    ``backward`` (``bench --by-function``). Entering wraps those two static methods of every
    Function subclass with a timer; leaving puts the originals back. Forward methods work on
    arrays and call no other Function, so no time is counted twice."""

    def __enter__(self) -> "FunctionTimes":
        from tinymoe.autograd import Function  # noqa: PLC0415

        self.seconds: dict[tuple[str, str], float] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self._saved: list[tuple[type, str, Any]] = []
        todo, seen = list(Function.__subclasses__()), set()
        while todo:
            cls = todo.pop()
            if cls in seen:
                continue
            seen.add(cls)
            todo.extend(cls.__subclasses__())
            for kind in ("forward", "backward"):
                method = cls.__dict__.get(kind)
                if isinstance(method, staticmethod):
                    self._saved.append((cls, kind, method))
                    setattr(cls, kind, staticmethod(self._timed((cls.__name__, kind), method.__func__)))
        return self

    def _timed(self, key: tuple[str, str], fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                B.synchronize()
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1
        return timed

    def __exit__(self, *exc: Any) -> None:
        for cls, kind, method in self._saved:
            setattr(cls, kind, method)


def function_times(run: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """``run()`` (one training step) ``repeats`` times under :class:`FunctionTimes`, after
    one untimed run: per Function, calls and milliseconds per run in forward and backward,
    the run's own time, and what is left outside the Functions (the autograd engine, the
    optimizer, routing glue, Python)."""
    run()
    with FunctionTimes() as ft:
        B.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()
        B.synchronize()
        total = (time.perf_counter() - t0) / repeats
    rows: dict[str, dict[str, float]] = {}
    for (name, kind), sec in ft.seconds.items():
        row = rows.setdefault(name, {"calls": 0, "forward_ms": 0.0, "backward_ms": 0.0})
        row[f"{kind}_ms"] = 1e3 * sec / repeats
        if kind == "forward":
            row["calls"] = ft.calls[(name, kind)] / repeats
    inside = sum(r["forward_ms"] + r["backward_ms"] for r in rows.values())
    return {"repeats": repeats, "step_ms": 1e3 * total, "outside_ms": 1e3 * total - inside,
            "functions": dict(sorted(rows.items(), key=lambda kv: -(kv[1]["forward_ms"] + kv[1]["backward_ms"])))}
