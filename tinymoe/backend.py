"""The one module that imports the array library.

Everything else in tinymoe reaches NumPy (host arrays) through ``backend.np`` and the
current *device* array module through ``backend.xp``. ``xp`` is NumPy by default and
CuPy after ``set_device("cuda")`` (or ``TINYMOE_DEVICE=cuda`` in the environment).
The CPU path never imports CuPy.

Always read ``backend.xp`` at call time (``from tinymoe import backend as B; B.xp``),
never ``from tinymoe.backend import xp``: the latter freezes the device at import.
``register_device_module`` lets a stand-in play the GPU (the tests' strict CuPy twin).
"""
from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable

# OpenBLAS (NumPy's BLAS) keeps its idle threads spinning for 2^28 cycles (~0.1 s) after
# every matmul. That holds a core which the row-parallel kernels below need right after a
# matmul, and which other processes need on a busy machine; 2^16 cycles (~25 us) keeps
# back-to-back matmuls just as fast (measured: the `small` training step went from 3.25 s
# to 2.67 s on 2 cores). OpenBLAS reads the variable once, when it loads: this takes effect
# only when tinymoe is imported before NumPy, and a value set by the user wins.
if "numpy" not in sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "16"

import numpy as np  # noqa: E402  (host arrays: data loading, checkpoints, analysis)

__all__ = [
    "np", "xp", "set_device", "get_device", "array_module", "to_numpy", "to_device",
    "is_device_array", "register_device_module",
    "default_rng", "cuda_available", "DeviceError", "DEFAULT_DTYPE",
    "synchronize", "device_pool_bytes", "free_device_pool",
    "set_num_threads", "get_num_threads", "parallel_rows", "keep_freed_memory",
    "scatter_add_rows", "scatter_add_flat", "count_values", "normal_cdf",
]

DEFAULT_DTYPE = np.float32

xp: ModuleType = np
_device: str = "cpu"
# A module that stands in for CuPy as the "cuda" device, and its array type (see
# register_device_module); None: the real CuPy.
_stand_in: tuple[ModuleType, type] | None = None


class DeviceError(RuntimeError):
    """Raised when a device is asked for that this machine cannot give."""


def _import_cupy() -> ModuleType:
    """Import CuPy and check that it sees a GPU; one clear error otherwise."""
    try:
        import cupy  # noqa: PLC0415  (imported only on request)
    except Exception as e:  # ImportError, or a broken CUDA install
        raise DeviceError(
            f"device 'cuda' asked for but CuPy cannot be imported ({type(e).__name__}: {e}); "
            "install it with `pip install cupy-cuda12x` on a machine with an NVIDIA GPU"
        ) from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise DeviceError(f"device 'cuda' asked for but CuPy sees no GPU ({e})") from None
    if n < 1:
        raise DeviceError("device 'cuda' asked for but CuPy sees no GPU")
    return cupy


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU (never raises)."""
    try:
        _import_cupy()
        return True
    except DeviceError:
        return False


def register_device_module(module: ModuleType | None, array_type: type | None = None) -> None:
    """Let ``module`` (whose arrays are of ``array_type``) stand in for CuPy as the
    ``"cuda"`` device; ``None`` goes back to the real CuPy.

    For tests without a GPU: the suite registers a strict NumPy-backed module with CuPy's
    names and rules (tests/strict_xp.py), so that the device path (placement, host
    syncs, the deterministic scatter-adds) runs on every CI run. While one is registered,
    ``set_device("cuda")`` selects it, and ``array_module``, ``to_numpy`` and
    ``is_device_array`` treat its arrays as device arrays."""
    global _stand_in
    if module is None:
        _stand_in = None
        return
    if array_type is None:
        raise ValueError("register_device_module: give the module's array type too")
    _stand_in = (module, array_type)


def set_device(name: str) -> None:
    """Choose where new arrays live: ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy)."""
    global xp, _device
    name = str(name).lower()
    if name in ("cpu", "numpy"):
        xp, _device = np, "cpu"
    elif name in ("cuda", "gpu", "cupy"):
        xp, _device = (_stand_in[0] if _stand_in is not None else _import_cupy()), "cuda"
    else:
        raise DeviceError(f"unknown device {name!r}: use 'cpu' or 'cuda'")


def get_device() -> str:
    """The current device name, ``"cpu"`` or ``"cuda"``."""
    return _device


def device_arrays_possible() -> bool:
    """Whether any device array can exist in this process: CuPy imported, or the test
    suite's stand-in registered (Function.apply skips its device checks otherwise)."""
    return _stand_in is not None or "cupy" in sys.modules


def is_device_array(a: Any) -> bool:
    """True for an array of the device (CuPy, or the registered stand-in); never imports CuPy."""
    if type(a) is np.ndarray:                                       # the common case, first
        return False
    if _stand_in is not None and isinstance(a, _stand_in[1]):
        return True
    return type(a).__module__.startswith("cupy")


def array_module(a: Any) -> ModuleType:
    """NumPy for host arrays, CuPy for device arrays (without importing CuPy on the CPU)."""
    if type(a) is np.ndarray:                                       # the common case, first
        return np
    if _stand_in is not None and isinstance(a, _stand_in[1]):
        return _stand_in[0]
    if type(a).__module__.startswith("cupy"):
        import cupy  # noqa: PLC0415  (a cupy array exists, so cupy is already imported)
        return cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """A host NumPy copy (or view) of ``a``; accepts NumPy, CuPy, scalars, lists.
    For a device array this is a device -> host transfer (a host sync)."""
    if is_device_array(a):
        return a.get()
    return np.asarray(a)


def to_device(a: Any, dtype: Any = None) -> Any:
    """``a`` as an array of the current device (no copy when already there)."""
    if xp is np:
        return np.asarray(to_numpy(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def default_rng(seed: int | None = None) -> np.random.Generator:
    """A per-run host random generator. Pass it around; there is no global seed."""
    return np.random.default_rng(seed)


def synchronize() -> None:
    """Wait until the device has finished all queued work (a no-op on the CPU).

    GPU kernels run asynchronously: time a CuPy computation only after this call."""
    if xp is not np:
        xp.cuda.Device().synchronize()


def device_pool_bytes() -> int:
    """Bytes held by CuPy's default memory pool (0 on the CPU). The pool keeps freed
    blocks for reuse, so after ``free_device_pool()`` this is the high-water mark of
    device memory in use since then."""
    if xp is np:
        return 0
    return int(xp.get_default_memory_pool().total_bytes())


def free_device_pool() -> None:
    """Return the CuPy pool's unused blocks to the device (a no-op on the CPU)."""
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()


_env = os.environ.get("TINYMOE_DEVICE")
if _env:
    set_device(_env)


# --- scatter-add without np.add.at -------------------------------------------------------
# The backward of a gather is a scatter-add, where repeated indices must add up.
# np.add.at does this but is slow; these two cover the hot paths. On the device neither
# cupyx.scatter_add nor a weighted bincount is used: both add with atomics, so a row with
# three or more summands would sum in an order that changes from run to run (and an
# exact resume would not be exact). _segment_sum_device sums in a fixed order instead.

def scatter_add_rows(n_rows: int, index: Any, values: Any) -> Any:
    """``out[index[m]] += values[m]`` for rows: index [M] ints, values [M, ...] -> [n_rows, ...].

    NumPy: a stable sort of the indices numbers the occurrences of each index (0 for its
    first row, 1 for its second, ...). Rows of one occurrence number have distinct
    indices, so level j is one plain ``out[index] += rows`` (level 0 a write); each output
    row is the left-to-right sum of its rows in their order in ``index``. A routing
    scatter has at most k occurrences per token, so k levels. When an index repeats more
    than ``_MAX_LEVELS`` times, each run of equal indices is summed with ``add.reduceat``
    instead (which adds a run of three or more in an order of its own, so the last bit can
    differ; it is 9x slower on the k = 2 scatter of ``mini``: 1.17 ms against 0.13 ms).
    Device: :func:`_segment_sum_device` (deterministic).
    """
    mod = array_module(values)
    if mod is not np:
        return _segment_sum_device(mod, n_rows, index, values)
    out = mod.zeros((n_rows,) + tuple(values.shape[1:]), dtype=values.dtype)
    m = index.size
    if m == 0:
        return out
    if m <= 16:                                                 # a decoding step: k rows or so
        for i in range(m):                                      # the same left-to-right sums
            out[index[i]] += values[i]
        return out
    order = np.argsort(index, kind="stable")                    # [M]
    sorted_index = index[order]                                 # [M]
    starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])  # [U] run starts
    run_len = np.diff(np.r_[starts, m])                         # [U]
    if run_len.max() > _MAX_LEVELS:
        out[sorted_index[starts]] = np.add.reduceat(values[order], starts, axis=0)
        return out
    occurrence = np.arange(m) - np.repeat(starts, run_len)      # [M] (sorted order): 0, 1, .. per run
    for j in range(int(run_len.max())):
        rows = order[occurrence == j]                           # the j-th row of every index that has one
        if j == 0:
            out[index[rows]] = values[rows]                     # distinct indices: a plain write
        else:
            out[index[rows]] += values[rows]                    # distinct indices: a plain add
    return out


_MAX_LEVELS = 8     # scatter_add_rows: occurrence levels before it falls back to add.reduceat


def scatter_add_flat(size: int, flat_index: Any, values: Any) -> Any:
    """``out[flat_index[m]] += values[m]`` on a flat array of ``size`` (any repeats).

    NumPy: ``bincount`` with weights (a single C pass; sums in float64, then cast back).
    Device: :func:`_segment_sum_device` (deterministic).
    """
    mod = array_module(values)
    if mod is not np:
        return _segment_sum_device(mod, size, flat_index.ravel(), values.ravel())
    out = mod.bincount(flat_index.ravel(), weights=values.ravel(), minlength=size)
    return out.astype(values.dtype, copy=False)


def normal_cdf(x: Any) -> Any:
    """The standard normal CDF ``Phi(x) = erfc(-x / sqrt 2) / 2`` elementwise, in the input
    dtype, on the input's device.

    NumPy has no erfc: the host path applies ``math.erfc`` per element (double precision).
    CuPy: ``cupyx.scipy.special.ndtr``. Another device module (the test suite's CuPy
    stand-in, which has no ``cupyx``) goes through the host (a host sync)."""
    mod = array_module(x)
    if mod is np:
        erfc = np.vectorize(math.erfc, otypes=[np.float64])
        return (0.5 * erfc(-np.asarray(x, dtype=np.float64) / math.sqrt(2.0))).astype(x.dtype)
    if mod.__name__ == "cupy":
        from cupyx.scipy.special import ndtr  # noqa: PLC0415  (a CuPy array exists)
        return ndtr(x)
    return mod.asarray(normal_cdf(to_numpy(x)), dtype=x.dtype)


def count_values(values: Any, n: int) -> Any:
    """``counts[v]`` = how many entries of the integer array ``values`` equal v, for v in
    [0, n) (every entry must lie there) -> [n] int64.

    NumPy: ``bincount``. Device: ``cupy.bincount`` reads min and max on the host (two
    syncs per call), so the values are sorted and each count is the distance between
    the ``searchsorted`` edges of v and v + 1: no sync, no atomics."""
    mod = array_module(values)
    flat = values.ravel()
    if mod is np:
        return np.bincount(flat, minlength=n).astype(np.int64, copy=False)
    edges = mod.searchsorted(mod.sort(flat), mod.arange(n + 1, dtype=flat.dtype))   # [n + 1]
    return (edges[1:] - edges[:-1]).astype(mod.int64)


def _segment_sum_device(mod: ModuleType, n_rows: int, index: Any, values: Any) -> Any:
    """Deterministic scatter-add on the device, with no host sync and no atomic adds.

    Sort the M indices (stable), so the rows of each output row r form one run of the
    sorted rows. A segmented inclusive scan (Hillis & Steele's doubling, restricted to
    runs) then leaves the sum of its run in the last row of each run: for s = 1, 2, 4, ...
    < M, ``v[i] += v[i - s]`` wherever rows i - s and i belong to the same run (read
    before written: every pass is a plain elementwise op). After ceil(log2 M) passes
    ``v[i]`` = sum of its run up to i. The last row of each run writes ``out[r]``; every
    other row writes into a spare row ``n_rows`` that is dropped, so each output row is
    written once. Sort, the elementwise passes and the writes have a fixed order on any
    GPU: the result is the same on every run (unlike ``cupyx.scatter_add`` or a weighted
    ``bincount``, which add with atomics, or a float ``cumsum``, whose CUB scan does not
    promise a fixed order). The sums are pairwise trees: error at most about
    ceil(log2 M) * eps * sum |values| of a run, in the values' dtype.
    """
    out_shape = (n_rows,) + tuple(values.shape[1:])
    m = index.shape[0]
    if m == 0:
        return mod.zeros(out_shape, dtype=values.dtype)
    order = mod.argsort(index, kind="stable")                   # [M]
    key = index[order]                                          # [M] sorted
    v = values[order]                                           # [M, ...] (a fresh gather)
    lead = (1,) * (v.ndim - 1)                                  # broadcast a [M] mask over rows
    s = 1
    while s < m:                                                # ceil(log2 M) passes
        same = (key[s:] == key[:-s]).reshape((m - s,) + lead)   # rows i - s and i in one run
        v[s:] += mod.where(same, v[:-s], 0)                     # the right side is read first
        s *= 2
    last = mod.concatenate([key[1:] != key[:-1], mod.ones(1, dtype=mod.bool_)])  # [M] run ends
    out = mod.zeros((n_rows + 1,) + out_shape[1:], dtype=values.dtype)  # row n_rows: spare
    out[mod.where(last, key, n_rows)] = v
    return out[:n_rows]


# --- threads: BLAS and row-parallel kernels ----------------------------------------------
# BLAS spreads one matmul over the cores, but NumPy's elementwise ufuncs run on one core.
# They do release the GIL while they loop, so the fused kernels of functional.py (SwiGLU,
# attention's softmax, RMSNorm, RoPE, cross-entropy) split their rows across a small pool
# of Python threads: PyTorch's intra-op threads, by hand. ``set_num_threads`` sets both
# levels, like ``torch.set_num_threads``. The process-wide setting is the only state here.

def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))                 # the cores we may run on
    except AttributeError:                                          # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _default_threads() -> int:
    """What BLAS will use: OPENBLAS_NUM_THREADS or OMP_NUM_THREADS when set, else every core."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return _cpu_count()


_num_threads: int = _default_threads()
_pool: ThreadPoolExecutor | None = None
_POOL_PREFIX = "tinymoe-kernel"
_blas: Any = None                                                   # threadpoolctl controller


def _blas_controller() -> Any:
    """threadpoolctl's view of the BLAS libraries NumPy loaded (None without threadpoolctl)."""
    global _blas
    if _blas is None:
        try:
            import threadpoolctl  # noqa: PLC0415  (optional; in requirements.txt)
        except ImportError:
            _blas = False
        else:
            _blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    return _blas or None


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for BLAS (through threadpoolctl) and for the row-parallel kernels.

    The default follows ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` when set, else every
    core this process may run on. ``n = 1`` makes every op run on the calling thread (a
    machine busy with other work wants that)."""
    global _num_threads, _pool
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n={n} must be >= 1")
    controller = _blas_controller()
    if controller is not None:
        controller.limit(limits=n)
    if _pool is not None and n != _num_threads:
        _pool.shutdown(wait=True)
        _pool = None
    _num_threads = n


def get_num_threads() -> int:
    """Threads the row-parallel kernels use (see :func:`set_num_threads`)."""
    return _num_threads


def parallel_rows(fn: Callable[[int, int], None], a: Any, *, block_rows: int | None = None,
                  min_rows: int = 1, uses_blas: bool = False) -> None:
    """Call ``fn(lo, hi)`` on row ranges that cover ``[0, a.shape[0])``, on several threads
    (``a`` an array, or a row count for work on host arrays).

    The rows are cut into ``get_num_threads()`` contiguous ranges of at least ``min_rows``
    rows (small inputs stay on one thread); the calling thread takes the first range,
    pool threads the others. Inside a range ``fn`` is called on blocks of ``block_rows``
    rows, so that a chain of passes over one block stays in the CPU cache. ``fn`` must
    write only its own rows. ``uses_blas``: ``fn`` calls matmul; BLAS is held to one thread
    meanwhile, so that the two levels of threading do not fight over the cores. On CuPy
    (one GPU kernel per op already) ``fn(0, n)`` runs once."""
    global _pool
    n = a if isinstance(a, int) else int(a.shape[0])
    if n == 0:
        return
    if not isinstance(a, int) and array_module(a) is not np:
        fn(0, n)
        return
    workers = max(1, min(_num_threads, n // max(1, min_rows)))
    if workers > 1 and threading.current_thread().name.startswith(_POOL_PREFIX):
        workers = 1                                                 # nested call: never wait on the pool
    controller = _blas_controller() if uses_blas and workers > 1 else None
    if uses_blas and controller is None:
        workers = 1                                                 # cannot hold BLAS to 1 thread
    step = n if block_rows is None else max(1, int(block_rows))
    if workers == 1:                                                # (most calls of a small model)
        _in_blocks(fn, 0, n, step)
        return

    def run(lo: int, hi: int) -> None:
        _in_blocks(fn, lo, hi, step)

    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_num_threads - 1, thread_name_prefix=_POOL_PREFIX)
    bounds = [n * i // workers for i in range(workers + 1)]
    if controller is not None:
        with controller.limit(limits=1):
            _run_ranges(run, bounds)
    else:
        _run_ranges(run, bounds)


def _in_blocks(fn: Callable[[int, int], None], lo: int, hi: int, step: int) -> None:
    """fn over [lo, hi) in blocks of ``step`` rows, on this thread."""
    for s in range(lo, hi, step):
        fn(s, min(s + step, hi))


def _run_ranges(run: Callable[[int, int], None], bounds: list[int]) -> None:
    """run(bounds[i], bounds[i+1]) for every i: the first here, the rest on the pool."""
    futures = [_pool.submit(run, bounds[i], bounds[i + 1]) for i in range(1, len(bounds) - 1)]
    try:
        run(bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()                                              # re-raises a worker's error


# --- the allocator -----------------------------------------------------------------------

def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed large blocks for reuse (Linux only; returns whether
    it applied).

    By default glibc serves every block over 32 MB (less before its threshold adapts)
    with a fresh ``mmap`` and hands it back to the OS on ``free``, and it trims the heap
    whenever its free top passes a few MB. A training step frees most of its memory at the
    end, so the next step page-faults all of it in again: about 15% of a step of the
    ``small`` config. With the mmap threshold at 256 MB and the trim threshold at 2 GB
    (``mallopt`` takes a C int) those blocks come from the heap and are reused; the resident size then stays near the
    peak of a step instead of falling between steps. The command-line entry points call
    this once; it changes the process's allocator, not NumPy."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # noqa: PLC0415
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                                                 # musl or no glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3                    # from <malloc.h>
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(m_mmap_threshold, 256 << 20) == 1
    ok = mallopt(m_trim_threshold, (2 << 30) - 1) == 1 and ok     # the largest C int
    return ok
