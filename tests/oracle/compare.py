"""Compare tinymoe against a torch oracle: values and every gradient, with readable failures.

``check_against_torch(fn_ours, fn_torch, inputs, ...)`` runs the same computation twice:
once on tinymoe Tensors, once on torch tensors made from the same arrays, then compares the
forward output and the gradient of every floating input. A failure message shows the first
values of both sides and the max abs / rel difference.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

import tinymoe
from tinymoe import backend as B

TOLERANCES = {np.float64: 1e-9, np.float32: 1e-4}


def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if isinstance(a, tinymoe.Tensor):
        return a.numpy()
    return B.to_numpy(a)


def rel_err(ours: Any, theirs: Any) -> tuple[float, float]:
    """(max abs diff, max abs diff / max |theirs|) -- relative to the tensor's scale."""
    a, b = _np(ours).astype(np.float64), _np(theirs).astype(np.float64)
    if a.size == 0:
        return 0.0, 0.0
    diff = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    return diff, diff / scale if scale > 0 else diff


def assert_close(name: str, ours: Any, theirs: Any, rtol: float, atol: float = 0.0) -> None:
    """Fail with the first values and the max abs/rel difference when ours != theirs.

    Passes when max|ours - theirs| <= atol + rtol * max|theirs| (a scale-aware check).
    """
    a, b = _np(ours), _np(theirs)
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {a.shape} (tinymoe) != {b.shape} (torch)")
    if not (np.all(np.isfinite(a)) == np.all(np.isfinite(b))):
        raise AssertionError(f"{name}: non-finite values differ")
    diff, rel = rel_err(a, b)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    if diff > atol + rtol * scale:
        raise AssertionError(
            f"{name}: max abs diff {diff:.3e}, max rel diff {rel:.3e} (rtol {rtol:g})\n"
            f"  tinymoe first values: {a.ravel()[:6]}\n"
            f"  torch   first values: {b.ravel()[:6]}")


def check_against_torch(ours: Callable[..., Any], theirs: Callable[..., Any], inputs: Sequence[Any],
                        dtype: Any = np.float64, rtol: float | None = None, name: str = "op",
                        grad_out: Any = None, seed: int = 0) -> None:
    """Run ``ours(*tinymoe_tensors)`` and ``theirs(*torch_tensors)`` on the same inputs.

    Floating inputs become leaf tensors requiring grad (integer/bool inputs are passed as
    plain arrays to both). The output is reduced with a fixed random weighting
    (``sum(out * w)``) so every output element gets a distinct gradient, then the forward
    value and each input gradient are compared.
    """
    rtol = TOLERANCES[np.dtype(dtype).type] if rtol is None else rtol
    arrays = [np.asarray(x, dtype=dtype) if np.asarray(x).dtype.kind == "f" else np.asarray(x) for x in inputs]
    t_ours = [tinymoe.Tensor(B.to_device(a), requires_grad=True) if a.dtype.kind == "f" else B.to_device(a)
              for a in arrays]
    t_theirs = [torch.tensor(a, requires_grad=True) if a.dtype.kind == "f" else torch.tensor(a) for a in arrays]
    out_ours = ours(*t_ours)
    out_theirs = theirs(*t_theirs)
    assert_close(f"{name} forward", out_ours, out_theirs, rtol)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=out_theirs.shape).astype(dtype) if grad_out is None else np.asarray(grad_out, dtype)
    (out_ours * tinymoe.Tensor(B.to_device(w))).sum().backward()
    (out_theirs * torch.tensor(w)).sum().backward()
    for i, (a, b) in enumerate(zip(t_ours, t_theirs)):
        if isinstance(a, tinymoe.Tensor):
            if b.grad is None:
                assert a.grad is None or not np.any(B.to_numpy(a.grad)), f"{name}: input {i} got a grad torch did not give"
                continue
            assert a.grad is not None, f"{name}: input {i} got no gradient"
            assert_close(f"{name} grad of input {i}", a.grad, b.grad, rtol)
