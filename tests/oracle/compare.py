"""Compare tinymoe against a torch oracle: values and every gradient, with readable failures.

``check_against_torch(fn_ours, fn_torch, inputs, ...)`` runs the same computation twice:
once on tinymoe Tensors, once on torch tensors made from the same arrays, then compares the
forward output and the gradient of every floating input. A failure message shows the first
values of both sides and the max abs / rel difference.

float32 tolerances come from the computation, not from one machine's rounding: see
:func:`f32_tol`. Every float32 comparison in the suite takes its tolerance from it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

import tinymoe
from tinymoe import backend as B

F64_TOL = 1e-9  # float64 ops: eps64 = 2.2e-16, far below; any real bug is orders above

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23 = 1.19e-7; unit roundoff u = EPS32 / 2
LAMBDA = 5.0  # probabilistic-bound constant, see f32_tol


def f32_tol(n: int, depth: int = 1, worst_case: bool = False) -> float:
    """Relative tolerance (to the reference tensor's max |value|) for a float32 result
    compared with the same result computed another way (torch, another BLAS kernel, another
    thread split): both differ from the exact value only by rounding.

    One reduction of n terms (a dot product, a row sum; every GEMM and every broadcast
    gradient is made of them) rounds n times, each time by at most u |partial sum|:

    - the rounding errors behave as independent zero-mean variables, so the error is
      below ``LAMBDA sqrt(n) u`` times the size of the terms except with a probability
      that falls like ``exp(-LAMBDA^2 / 2)`` (Higham & Mary, "A new approach to
      probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019);
    - the deterministic worst case is ``gamma_n ~ n u`` (Higham, "Accuracy and Stability
      of Numerical Algorithms", 2nd ed. 2002, section 3.1). It also absorbs the
      cancellation of a sum of random signs (sum |terms| / |sum| ~ sqrt(n)), so it is the
      bound to use where errors pass through many stages and small gradients come from
      large cancelling terms (a whole network's backward pass).

    Errors of ``depth`` chained stages add to first order (each stage is O(1)-conditioned:
    normalised layers, softmax), and the two sides round independently (x2):

        f32_tol(n, depth) = 2 * depth * (LAMBDA sqrt(n)  or  n) * u
                          = depth * (LAMBDA sqrt(n)  or  n) * EPS32.

    ``n`` is the longest reduction of the computation (an op: at most its largest
    operand's size). Scale: n = 64 gives 4.8e-6; the 4-block test model (n = V = 258,
    depth 20, worst case) gives 6.1e-4. A wrong gradient (a factor 1.01 anywhere) is a
    relative error of 1e-2 and fails every one of these bounds.
    """
    if n < 1 or depth < 1:
        raise ValueError(f"f32_tol: n={n} and depth={depth} must be >= 1")
    growth = n if worst_case else LAMBDA * math.sqrt(n)
    return depth * growth * EPS32


def default_tol(dtype: Any, n: int, depth: int = 1) -> float:
    """F64_TOL for float64, :func:`f32_tol` (probabilistic form) for float32."""
    if np.dtype(dtype) == np.float64:
        return F64_TOL
    if np.dtype(dtype) == np.float32:
        return f32_tol(n, depth)
    raise TypeError(f"no tolerance rule for dtype {np.dtype(dtype)}")


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
                        grad_out: Any = None, seed: int = 0, depth: int = 1) -> None:
    """Run ``ours(*tinymoe_tensors)`` and ``theirs(*torch_tensors)`` on the same inputs.

    Floating inputs become leaf tensors requiring grad (integer/bool inputs are passed as
    plain arrays to both). The output is reduced with a fixed random weighting
    (``sum(out * w)``) so every output element gets a distinct gradient, then the forward
    value and each input gradient are compared.

    Default tolerance: :func:`default_tol` with n = the largest operand's size (no single
    reduction of one op is longer) and ``depth`` the number of chained reductions (1 for
    one op; e.g. 3 for attention: scores, softmax, weighted sum).
    """
    arrays = [np.asarray(x, dtype=dtype) if np.asarray(x).dtype.kind == "f" else np.asarray(x) for x in inputs]
    t_ours = [tinymoe.Tensor(B.to_device(a), requires_grad=True) if a.dtype.kind == "f" else B.to_device(a)
              for a in arrays]
    t_theirs = [torch.tensor(a, requires_grad=True) if a.dtype.kind == "f" else torch.tensor(a) for a in arrays]
    out_ours = ours(*t_ours)
    out_theirs = theirs(*t_theirs)
    if rtol is None:
        n = max([a.size for a in arrays] + [int(np.prod(out_theirs.shape))])
        rtol = default_tol(dtype, max(n, 1), depth)
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
