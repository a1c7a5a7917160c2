"""The one module that imports the array library.

Everything else in tinymoe reaches NumPy (host arrays) through ``backend.np`` and the
current *device* array module through ``backend.xp``. ``xp`` is NumPy by default and
CuPy after ``set_device("cuda")`` (or ``TINYMOE_DEVICE=cuda`` in the environment).
The CPU path never imports CuPy.

Always read ``backend.xp`` at call time (``from tinymoe import backend as B; B.xp``),
never ``from tinymoe.backend import xp``: the latter freezes the device at import.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np  # host arrays: data loading, checkpoints, analysis

__all__ = [
    "np", "xp", "set_device", "get_device", "array_module", "to_numpy", "to_device",
    "default_rng", "cuda_available", "DeviceError", "DEFAULT_DTYPE",
    "synchronize", "device_pool_bytes", "free_device_pool",
]

DEFAULT_DTYPE = np.float32

xp: ModuleType = np
_device: str = "cpu"


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


def set_device(name: str) -> None:
    """Choose where new arrays live: ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy)."""
    global xp, _device
    name = str(name).lower()
    if name in ("cpu", "numpy"):
        xp, _device = np, "cpu"
    elif name in ("cuda", "gpu", "cupy"):
        xp, _device = _import_cupy(), "cuda"
    else:
        raise DeviceError(f"unknown device {name!r}: use 'cpu' or 'cuda'")


def get_device() -> str:
    """The current device name, ``"cpu"`` or ``"cuda"``."""
    return _device


def array_module(a: Any) -> ModuleType:
    """NumPy for host arrays, CuPy for device arrays (without importing CuPy on the CPU)."""
    if type(a).__module__.startswith("cupy"):
        import cupy  # noqa: PLC0415  (a cupy array exists, so cupy is already imported)
        return cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """A host NumPy copy (or view) of ``a``; accepts NumPy, CuPy, scalars, lists."""
    if type(a).__module__.startswith("cupy"):
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
# np.add.at does this but is slow; these two cover the hot paths.

def scatter_add_rows(n_rows: int, index: Any, values: Any) -> Any:
    """``out[index[m]] += values[m]`` for rows: index [M] ints, values [M, ...] -> [n_rows, ...].

    NumPy: sort the indices, sum each run of equal indices with ``add.reduceat``, write the
    sums once per unique row. CuPy: ``cupyx.scatter_add`` (atomic adds on the GPU).
    """
    mod = array_module(values)
    out = mod.zeros((n_rows,) + tuple(values.shape[1:]), dtype=values.dtype)
    if index.size == 0:
        return out
    if mod is not np:
        import cupyx  # noqa: PLC0415
        cupyx.scatter_add(out, index, values)
        return out
    order = np.argsort(index, kind="stable")                    # [M]
    sorted_index = index[order]                                 # [M]
    starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])  # [U]
    out[sorted_index[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def scatter_add_flat(size: int, flat_index: Any, values: Any) -> Any:
    """``out[flat_index[m]] += values[m]`` on a flat array of ``size`` (any repeats).

    Uses ``bincount`` with weights (a single C pass; sums in float64, then cast back).
    """
    mod = array_module(values)
    out = mod.bincount(flat_index.ravel(), weights=values.ravel(), minlength=size)
    return out.astype(values.dtype, copy=False)
