"""Differentiable operations: each a ``Function`` with a hand-written backward.

Every public function here takes Tensors (or plain arrays / Python numbers, which get no
gradient) and returns Tensors. Elementwise ops broadcast like NumPy; their backward sums
the incoming gradient back to each input's shape (``unbroadcast``).

Hot paths are fused into single Functions rather than chains of small ops: the
softmax-cross-entropy here; RMSNorm, SwiGLU, attention and the router live further down.
"""
from __future__ import annotations

import builtins
from typing import Any, Sequence

from tinymoe import backend as B
from tinymoe.autograd import Context, Function, Tensor

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.shape) if hasattr(a, "shape") else ()


def _xp(*arrays: Any) -> Any:
    for a in arrays:
        if hasattr(a, "shape"):
            return B.array_module(a)
    return B.xp


def unbroadcast(g: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``g`` over the axes that broadcasting added or stretched, back to ``shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and g.shape[i + lead] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _norm_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


# --------------------------------------------------------------------------------------
# elementwise binary ops (broadcasting)
# --------------------------------------------------------------------------------------

class Add(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.shapes = (_shape(a), _shape(b))
        return a + b

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        sa, sb = ctx.shapes
        return (unbroadcast(g, sa) if ctx.needs_input_grad[0] else None,
                unbroadcast(g, sb) if ctx.needs_input_grad[1] else None)


class Sub(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.shapes = (_shape(a), _shape(b))
        return a - b

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        sa, sb = ctx.shapes
        return (unbroadcast(g, sa) if ctx.needs_input_grad[0] else None,
                unbroadcast(-g, sb) if ctx.needs_input_grad[1] else None)


class Mul(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)
        ctx.shapes = (_shape(a), _shape(b))
        return a * b

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        a, b = ctx.saved
        sa, sb = ctx.shapes
        return (unbroadcast(g * b, sa) if ctx.needs_input_grad[0] else None,
                unbroadcast(g * a, sb) if ctx.needs_input_grad[1] else None)


class Div(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        out = a / b
        ctx.save_for_backward(b, out)
        ctx.shapes = (_shape(a), _shape(b))
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        b, out = ctx.saved
        sa, sb = ctx.shapes
        ga = g / b
        return (unbroadcast(ga, sa) if ctx.needs_input_grad[0] else None,
                unbroadcast(-ga * out, sb) if ctx.needs_input_grad[1] else None)   # d(a/b)/db = -a/b^2


class Maximum(Function):
    """max(a, b) elementwise; at ties the gradient is split evenly (as torch does)."""

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        xp = _xp(a, b)
        out = xp.maximum(a, b)
        ctx.save_for_backward(a, b)
        ctx.shapes = (_shape(a), _shape(b))
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        a, b = ctx.saved
        sa, sb = ctx.shapes
        wa = (a > b) + 0.5 * (a == b)                           # weight of a in the max
        wa = wa.astype(g.dtype, copy=False)
        return (unbroadcast(g * wa, sa) if ctx.needs_input_grad[0] else None,
                unbroadcast(g * (1 - wa), sb) if ctx.needs_input_grad[1] else None)


class Where(Function):
    """cond ? a : b, with cond a boolean array (no gradient)."""

    @staticmethod
    def forward(ctx: Context, cond: Any, a: Any, b: Any) -> Any:
        xp = _xp(cond, a, b)
        ctx.save_for_backward(cond)
        ctx.shapes = (_shape(a), _shape(b))
        return xp.where(cond, a, b)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        (cond,) = ctx.saved
        sa, sb = ctx.shapes
        zero = g.dtype.type(0)
        return (None,
                unbroadcast(_xp(g).where(cond, g, zero), sa) if ctx.needs_input_grad[1] else None,
                unbroadcast(_xp(g).where(cond, zero, g), sb) if ctx.needs_input_grad[2] else None)


def add(a: Any, b: Any) -> Tensor: return Add.apply(a, b)
def sub(a: Any, b: Any) -> Tensor: return Sub.apply(a, b)
def mul(a: Any, b: Any) -> Tensor: return Mul.apply(a, b)
def div(a: Any, b: Any) -> Tensor: return Div.apply(a, b)
def maximum(a: Any, b: Any) -> Tensor: return Maximum.apply(a, b)


def where(cond: Any, a: Any, b: Any) -> Tensor:
    if isinstance(cond, Tensor):
        cond = cond.data
    return Where.apply(cond, a, b)


# --------------------------------------------------------------------------------------
# elementwise unary ops
# --------------------------------------------------------------------------------------

class Neg(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        return -a

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return -g


class Pow(Function):
    """a ** p for a constant exponent p."""

    @staticmethod
    def forward(ctx: Context, a: Any, p: float) -> Any:
        ctx.save_for_backward(a)
        ctx.p = p
        return a ** p

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        (a,) = ctx.saved
        return g * (ctx.p * a ** (ctx.p - 1)), None


class Exp(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = _xp(a).exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g * ctx.saved[0]


class Log(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return _xp(a).log(a)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g / ctx.saved[0]


class Sqrt(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = _xp(a).sqrt(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g / (2 * ctx.saved[0])


class Rsqrt(Function):
    """1 / sqrt(a); d/da = -1/2 a^(-3/2) = -out^3 / 2."""

    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = 1 / _xp(a).sqrt(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        out = ctx.saved[0]
        return g * (-0.5 * out * out * out)


class Tanh(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = _xp(a).tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        out = ctx.saved[0]
        return g * (1 - out * out)


def _sigmoid(xp: Any, a: Any) -> Any:
    """Logistic 1 / (1 + exp(-a)), four passes in place on one fresh output buffer.

    For a < -88 (float32) exp(-a) overflows to inf and the result is 1/inf = 0, the
    correctly rounded value, so the overflow warning is silenced; no sign branch needed.
    (The branchy exp(-|a|) / where form made five full-size temporaries: ~15x slower.)"""
    s = xp.negative(a)                                          # -a, a fresh buffer
    with B.np.errstate(over="ignore"):
        xp.exp(s, out=s)
    s += 1
    xp.divide(1.0, s, out=s)                                    # in [0, 1] (NumPy: faster than reciprocal)
    return s


def _rows(a: Any) -> Any:
    """``a`` [..., n] as a 2-D [rows, n] array (a view when ``a`` is contiguous)."""
    return a.reshape(-1, a.shape[-1])


def _rowdot(xp: Any, a: Any, b: Any) -> Any:
    """sum(a * b, axis=-1) without an [..., n] temporary: ``vecdot`` (NumPy >= 2), else einsum."""
    vecdot = getattr(xp, "vecdot", None)
    if vecdot is not None:
        return vecdot(a, b)
    return xp.einsum("...i,...i->...", a, b)


def _block(row_size: int, target: int = 1 << 16) -> int:
    """Rows per cache block: about ``target`` elements (256 KB of float32) per array."""
    return builtins.max(1, target // builtins.max(1, row_size))


def _parallel(kernel: Any, a: Any, row_size: int, uses_blas: bool = False, block: int = 1 << 16) -> None:
    """``kernel(lo, hi)`` over the rows of ``a`` (``row_size`` elements each) in blocks of
    about ``block`` elements (cache-sized), spread over threads when every thread gets at
    least ~64k elements (below that, handing work to a thread costs more than it saves)."""
    B.parallel_rows(kernel, a, block_rows=_block(row_size, block), min_rows=_block(row_size, 1 << 16),
                    uses_blas=uses_blas)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = _sigmoid(_xp(a), a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        s = ctx.saved[0]
        return g * s * (1 - s)


class Silu(Function):
    """silu(a) = a * sigmoid(a); d/da = s + a s (1 - s) = s (1 + a (1 - s))."""

    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        s = _sigmoid(_xp(a), a)
        ctx.save_for_backward(a, s)
        return a * s

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        a, s = ctx.saved
        return g * s * (1 + a * (1 - s))


class Relu(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a > 0)
        return _xp(a).maximum(a, 0)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g * ctx.saved[0]


def neg(a: Any) -> Tensor: return Neg.apply(a)
def pow(a: Any, p: float) -> Tensor:  # noqa: A001  (mirrors torch.pow)
    if isinstance(p, Tensor):
        raise TypeError("pow: the exponent must be a Python number (tensor exponents are not supported)")
    return Pow.apply(a, p)
def exp(a: Any) -> Tensor: return Exp.apply(a)
def log(a: Any) -> Tensor: return Log.apply(a)
def sqrt(a: Any) -> Tensor: return Sqrt.apply(a)
def rsqrt(a: Any) -> Tensor: return Rsqrt.apply(a)
def tanh(a: Any) -> Tensor: return Tanh.apply(a)
def sigmoid(a: Any) -> Tensor: return Sigmoid.apply(a)
def silu(a: Any) -> Tensor: return Silu.apply(a)
def relu(a: Any) -> Tensor: return Relu.apply(a)


# --------------------------------------------------------------------------------------
# matmul
# --------------------------------------------------------------------------------------

class MatMul(Function):
    """a @ b with NumPy semantics: 2-D, batched, broadcast batch dims, 1-D operands.

    Backward: dA = dC @ B^T, dB = A^T @ dC, summed over broadcast batch dims. When b is a
    2-D weight and a is [..., n], the batch dims are folded into rows so dB is one GEMM.
    """

    name = "matmul"

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError("matmul needs at least 1-D operands")
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)
        ctx.shapes = (a.shape, b.shape)
        if b.ndim == 2 and a.ndim > 2:
            # [..., n] @ [n, p]: fold the batch dims into rows and run ONE GEMM. NumPy's
            # stacked matmul calls BLAS once per leading index instead (with 2 BLAS threads
            # on a busy machine that was up to 10x slower than the single folded call).
            return (a.reshape(-1, a.shape[-1]) @ b).reshape(a.shape[:-1] + (b.shape[-1],))
        return a @ b

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        a, b = ctx.saved
        sa, sb = ctx.shapes
        xp = _xp(g)
        if len(sa) == 1 and len(sb) == 1:                       # dot product -> scalar
            return (g * b if ctx.needs_input_grad[0] else None,
                    g * a if ctx.needs_input_grad[1] else None)
        # promote 1-D operands to matrices, as matmul itself does
        if len(sa) == 1:
            g = g[..., None, :]                                 # [..., m=1, p]
        if len(sb) == 1:
            g = g[..., None]                                    # [..., m, p=1]
        ga = gb = None
        if ctx.needs_input_grad[0]:
            b2 = b[:, None] if b.ndim == 1 else b               # [..., n, p]
            if b2.ndim == 2 and g.ndim > 2:                     # one folded GEMM, as in forward
                ga = (g.reshape(-1, g.shape[-1]) @ b2.T).reshape(g.shape[:-1] + (b2.shape[0],))
            else:
                ga = g @ xp.swapaxes(b2, -1, -2)                # [..., m, p] @ [..., p, n] -> [..., m, n]
            ga = unbroadcast(ga, sa if len(sa) > 1 else (1,) + sa)
            if ga.shape != sa:
                ga = ga.reshape(sa)
        if ctx.needs_input_grad[1]:
            a2 = a[None, :] if a.ndim == 1 else a               # [..., m, n]
            if len(sb) == 2 and a2.ndim > 2:                    # weight: fold batch dims into rows
                gb = a2.reshape(-1, a2.shape[-1]).T @ g.reshape(-1, g.shape[-1])  # [n, M] @ [M, p] -> [n, p]
            else:
                gb = xp.swapaxes(a2, -1, -2) @ g                # [..., n, m] @ [..., m, p] -> [..., n, p]
                gb = unbroadcast(gb, sb if len(sb) > 1 else sb + (1,))
            if gb.shape != sb:
                gb = gb.reshape(sb)                             # (a reshape to the same shape would be a view)
        return ga, gb


def matmul(a: Any, b: Any) -> Tensor:
    return MatMul.apply(a, b)


# --------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------

def _expand_back(g: Any, shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool) -> Any:
    """Re-insert reduced axes (as size 1) so ``g`` broadcasts against the input."""
    if not keepdims:
        g = g.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return g


class Sum(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axes(axis, a.ndim), keepdims
        return _xp(a).asarray(a.sum(axis=axis, keepdims=keepdims))

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        g = _expand_back(g, ctx.shape, ctx.axes, ctx.keepdims)
        return _xp(g).broadcast_to(g, ctx.shape)


class Mean(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axes(axis, a.ndim), keepdims
        return _xp(a).asarray(a.mean(axis=axis, keepdims=keepdims))

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        count = 1
        for ax in ctx.axes:
            count *= ctx.shape[ax]
        g = _expand_back(g, ctx.shape, ctx.axes, ctx.keepdims) / count
        return _xp(g).broadcast_to(g, ctx.shape)


class Max(Function):
    """max over axes; at ties the gradient is split evenly among the maxima (torch.amax)."""

    @staticmethod
    def forward(ctx: Context, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        xp = _xp(a)
        axes = _norm_axes(axis, a.ndim)
        out = a.max(axis=axes, keepdims=True)
        mask = a == out
        ctx.save_for_backward(mask / mask.sum(axis=axes, keepdims=True).astype(a.dtype))
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, axes, keepdims
        return xp.asarray(out if keepdims else out.squeeze(axis=axes))

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return _expand_back(g, ctx.shape, ctx.axes, ctx.keepdims) * ctx.saved[0]


def sum(a: Any, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a: Any, axis: Any = None, keepdims: bool = False) -> Tensor:
    return Mean.apply(a, axis=axis, keepdims=keepdims)


def max(a: Any, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Max.apply(a, axis=axis, keepdims=keepdims)


# --------------------------------------------------------------------------------------
# shape ops
# --------------------------------------------------------------------------------------

class Reshape(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, shape: tuple) -> Any:
        ctx.shape = a.shape
        return a.reshape(shape)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g.reshape(ctx.shape)


class Transpose(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, axes: Any = None) -> Any:
        axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(ax % a.ndim for ax in axes)
        if sorted(axes) != list(range(a.ndim)):
            raise ValueError(f"axes {axes} are not a permutation of {a.ndim} dims")
        ctx.inverse = tuple(B.np.argsort(axes).tolist())     # the permutation that undoes axes
        return a.transpose(axes)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g.transpose(ctx.inverse)


class BroadcastTo(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, shape: tuple) -> Any:
        ctx.shape = a.shape
        return _xp(a).broadcast_to(a, shape)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return unbroadcast(g, ctx.shape)


class Concatenate(Function):
    @staticmethod
    def forward(ctx: Context, *arrays: Any, axis: int = 0) -> Any:
        out = _xp(*arrays).concatenate(arrays, axis=axis)
        ctx.axis = axis % out.ndim
        ctx.sizes = [a.shape[ctx.axis] for a in arrays]
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        xp = _xp(g)
        cuts = B.np.cumsum(ctx.sizes)[:-1].tolist()
        return tuple(part if need else None
                     for part, need in zip(xp.split(g, cuts, axis=ctx.axis), ctx.needs_input_grad))


class Stack(Function):
    @staticmethod
    def forward(ctx: Context, *arrays: Any, axis: int = 0) -> Any:
        out = _xp(*arrays).stack(arrays, axis=axis)
        ctx.axis = axis % out.ndim
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        xp = _xp(g)
        return tuple(xp.take(g, i, axis=ctx.axis) if need else None
                     for i, need in enumerate(ctx.needs_input_grad))


class Split(Function):
    """Several outputs: the pieces of ``a`` along ``axis`` (NumPy's indices_or_sections)."""

    @staticmethod
    def forward(ctx: Context, a: Any, indices_or_sections: Any, axis: int = 0) -> tuple:
        ctx.axis = axis % a.ndim
        return tuple(_xp(a).split(a, indices_or_sections, axis=axis))

    @staticmethod
    def backward(ctx: Context, *grads: Any) -> tuple:
        return _xp(*grads).concatenate(grads, axis=ctx.axis), None


def reshape(a: Any, shape: Sequence[int]) -> Tensor:
    return Reshape.apply(a, tuple(shape))


def transpose(a: Any, axes: Sequence[int] | None = None) -> Tensor:
    return Transpose.apply(a, None if axes is None else tuple(axes))


def permute(a: Any, axes: Sequence[int]) -> Tensor:
    return Transpose.apply(a, tuple(axes))


def broadcast_to(a: Any, shape: Sequence[int]) -> Tensor:
    return BroadcastTo.apply(a, tuple(shape))


def concatenate(tensors: Sequence[Any], axis: int = 0) -> Tensor:
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors: Sequence[Any], axis: int = 0) -> Tensor:
    return Stack.apply(*tensors, axis=axis)


def split(a: Any, indices_or_sections: Any, axis: int = 0) -> tuple[Tensor, ...]:
    out = Split.apply(a, indices_or_sections, axis=axis)
    return out if isinstance(out, tuple) else (out,)


# --------------------------------------------------------------------------------------
# indexing: slicing, gathers and their scatter-add backward
# --------------------------------------------------------------------------------------

def _is_advanced(idx: Any) -> bool:
    """True when ``idx`` holds an integer array (fancy indexing that may repeat positions)."""
    parts = idx if isinstance(idx, tuple) else (idx,)
    for p in parts:
        if isinstance(p, Tensor):
            p = p.data
        if isinstance(p, (list,)) or (hasattr(p, "dtype") and getattr(p, "ndim", 0) > 0 and p.dtype.kind in "iu"):
            return True
    return False


class GetItem(Function):
    """``a[idx]``: basic slicing, boolean masks, or integer-array (fancy) indexing.

    Backward of basic slicing writes the gradient into a zero array of ``a``'s shape. With
    integer arrays the same position may be picked many times, so the backward is a
    scatter-add over flat positions (``bincount``; no ``np.add.at``).
    """

    @staticmethod
    def forward(ctx: Context, a: Any, idx: Any) -> Any:
        ctx.shape, ctx.idx, ctx.dtype = a.shape, idx, a.dtype
        return a[idx]

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        xp = _xp(g)
        size = 1
        for n in ctx.shape:
            size *= n
        if _is_advanced(ctx.idx):
            flat = xp.arange(size).reshape(ctx.shape)[ctx.idx]  # flat position of every picked element
            ga = B.scatter_add_flat(size, flat, g).reshape(ctx.shape)
        else:
            ga = xp.zeros(ctx.shape, dtype=ctx.dtype)
            ga[ctx.idx] = g
        return ga, None


def getitem(a: Any, idx: Any) -> Tensor:
    if isinstance(idx, Tensor):
        idx = idx.data
    elif isinstance(idx, tuple):
        idx = tuple(i.data if isinstance(i, Tensor) else i for i in idx)
    return GetItem.apply(a, idx)


class TakeAlongAxis(Function):
    """``take_along_axis(a, index, axis)``; backward scatter-adds into flat positions."""

    @staticmethod
    def forward(ctx: Context, a: Any, index: Any, axis: int) -> Any:
        xp = _xp(a)
        axis = axis % a.ndim
        ctx.shape, ctx.index, ctx.axis = a.shape, index, axis
        return xp.take_along_axis(a, index, axis=axis)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        xp = _xp(g)
        shape, axis = ctx.shape, ctx.axis
        size = 1
        for n in shape:
            size *= n
        positions = xp.arange(size).reshape(shape)
        flat = xp.take_along_axis(positions, xp.broadcast_to(ctx.index, g.shape), axis=axis)
        return B.scatter_add_flat(size, flat, g).reshape(shape), None, None


def take_along_axis(a: Any, index: Any, axis: int) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data
    if index.dtype.kind not in "iu":
        raise TypeError(f"take_along_axis: index must be integer, got {index.dtype}")
    return TakeAlongAxis.apply(a, index, axis)


class Embedding(Function):
    """Row lookup ``weight[ids]``: [V, d] and ids [...] -> [..., d].

    Backward is a scatter-add of rows (sorted indices + ``add.reduceat``), so a token that
    appears many times gets the sum of its gradients.
    """

    @staticmethod
    def forward(ctx: Context, weight: Any, ids: Any) -> Any:
        V = weight.shape[0]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
            bad = int(ids.max()) if int(ids.max()) >= V else int(ids.min())
            raise IndexError(f"token id {bad} out of range for an embedding of {V} rows")
        ctx.save_for_backward(ids)
        ctx.V = V
        return weight[ids]                                      # [V, d], [...] -> [..., d]

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        (ids,) = ctx.saved
        d = g.shape[-1]
        gw = B.scatter_add_rows(ctx.V, ids.reshape(-1), g.reshape(-1, d))  # [N], [N, d] -> [V, d]
        return gw, None


def embedding(weight: Any, ids: Any) -> Tensor:
    if isinstance(ids, Tensor):
        ids = ids.data
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got {ids.dtype}")
    return Embedding.apply(weight, ids)


# --------------------------------------------------------------------------------------
# softmax family and the fused cross-entropy
# --------------------------------------------------------------------------------------

def _log_softmax_array(x: Any, axis: int) -> Any:
    xp = _xp(x)
    m = x.max(axis=axis, keepdims=True)
    shifted = x - m
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


class Softmax(Function):
    """y = exp(x - max) / sum exp(x - max); dx = y * (g - sum(g * y))."""

    @staticmethod
    def forward(ctx: Context, x: Any, axis: int = -1) -> Any:
        xp = _xp(x)
        y = xp.exp(x - x.max(axis=axis, keepdims=True))
        y /= y.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (y,) = ctx.saved
        return y * (g - (g * y).sum(axis=ctx.axis, keepdims=True))


class LogSoftmax(Function):
    """y = x - logsumexp(x); dx = g - softmax(x) * sum(g)."""

    @staticmethod
    def forward(ctx: Context, x: Any, axis: int = -1) -> Any:
        y = _log_softmax_array(x, axis)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (y,) = ctx.saved
        return g - _xp(g).exp(y) * g.sum(axis=ctx.axis, keepdims=True)


def softmax(x: Any, axis: int = -1) -> Tensor:
    return Softmax.apply(x, axis=axis)


def log_softmax(x: Any, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(x, axis=axis)


class CrossEntropy(Function):
    """Fused softmax + negative log-likelihood over the last axis of ``logits``.

    loss_n = logsumexp(z_n) - z_n[t_n] for every counted token (t_n != ignore_index);
    reduction "mean" divides by the number of counted tokens, "sum" does not, "none"
    returns the per-token losses (0 at ignored positions).
    Backward: dz_n = (softmax(z_n) - onehot(t_n)) * weight_n, computed in the single
    probability buffer that forward kept (no [N, V] temporaries beyond it).
    """

    @staticmethod
    def forward(ctx: Context, logits: Any, targets: Any, ignore_index: int = -100, reduction: str = "mean") -> Any:
        xp = _xp(logits)
        V = logits.shape[-1]
        z = logits.reshape(-1, V)                               # [..., V] -> [N, V]
        t = targets.reshape(-1)                                 # [...] -> [N]
        if z.shape[0] != t.shape[0]:
            raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree")
        valid = t != ignore_index                               # [N]
        if t.size and bool(((t < 0) | (t >= V))[valid].any()):
            raise IndexError(f"a target id is outside [0, {V}) (ignore_index={ignore_index})")
        t_safe = xp.where(valid, t, 0)                          # [N]
        probs = xp.empty(z.shape, dtype=z.dtype)                # [N, V] (the one big buffer)
        lse = xp.empty(z.shape[0], dtype=z.dtype)               # [N] logsumexp per row

        def kernel(lo: int, hi: int) -> None:                   # a block of rows, cache-sized
            zb = z[lo:hi]
            m = zb.max(axis=1, keepdims=True)                   # [n, 1]
            pb = xp.subtract(zb, m, out=probs[lo:hi])           # [n, V]
            xp.exp(pb, out=pb)
            sumexp = pb.sum(axis=1, keepdims=True)              # [n, 1]
            lse[lo:hi] = (m + xp.log(sumexp))[:, 0]
            pb *= 1 / sumexp                                    # softmax, in place

        _parallel(kernel, z, V)
        picked = z[xp.arange(z.shape[0]), t_safe]               # [N]
        losses = xp.where(valid, lse - picked, 0).astype(logits.dtype, copy=False)  # [N]
        count = int(valid.sum())
        ctx.save_for_backward(probs, t_safe, valid)
        ctx.count, ctx.reduction, ctx.shape = count, reduction, logits.shape
        if reduction == "mean":
            return xp.asarray(losses.sum() / builtins.max(count, 1), dtype=logits.dtype)
        if reduction == "sum":
            return xp.asarray(losses.sum(), dtype=logits.dtype)
        if reduction == "none":
            return losses.reshape(targets.shape)
        raise ValueError(f"unknown reduction {reduction!r}: use 'mean', 'sum' or 'none'")

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        probs, t, valid = ctx.saved
        xp = _xp(probs)
        grad = probs if not getattr(ctx, "retain_graph", False) else probs.copy()   # reuse the buffer
        grad[xp.arange(grad.shape[0]), t] -= 1                  # softmax - onehot
        if ctx.reduction == "none":
            w = (g.reshape(-1) * valid).astype(grad.dtype, copy=False)            # [N]
        else:
            scale = g / builtins.max(ctx.count, 1) if ctx.reduction == "mean" else g
            w = (valid * scale).astype(grad.dtype, copy=False)                    # [N]

        def kernel(lo: int, hi: int) -> None:
            grad[lo:hi] *= w[lo:hi, None]                       # [n, V] * [n, 1]

        _parallel(kernel, grad, grad.shape[1])
        return grad.reshape(ctx.shape), None


def cross_entropy(logits: Any, targets: Any, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Cross-entropy from logits [..., V] and integer targets [...] (see ``CrossEntropy``)."""
    if isinstance(targets, Tensor):
        targets = targets.data
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer ids, got {targets.dtype}")
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index, reduction=reduction)


# ---- fused hot paths: RMSNorm, SwiGLU, RoPE, attention ----
# Each op below is one Function with a hand-written backward, so the graph holds one node
# (and a minimal set of saved arrays) per call instead of a chain of small ops. All work in
# the dtype of their inputs (float32 by default, float64 for checks); no upcasts.

class RMSNorm(Function):
    """RMSNorm / T5LayerNorm (Zhang & Sennrich 2019): scale only, no mean, no bias.

        r = 1 / sqrt(mean(x^2) + eps)          over the last axis, one r per row
        y = x * r * w

    Backward, with xhat = x * r and gh = g * w:
        dw = sum over rows of g * xhat
        dx = r * (gh - xhat * mean(gh * xhat))
    Saves x, w and r ([..., 1]); xhat is recomputed in backward.
    """

    @staticmethod
    def forward(ctx: Context, x: Any, weight: Any, eps: float = 1e-6) -> Any:
        xp = _xp(x)
        d = x.shape[-1]
        if tuple(weight.shape) != (d,):
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({d},)")
        x2 = _rows(x)                                                 # [..., d] -> [M, d]
        y = xp.empty(x2.shape, dtype=x.dtype)                         # [M, d]
        r = xp.empty((x2.shape[0], 1), dtype=x.dtype)                 # [M, 1]

        def kernel(lo: int, hi: int) -> None:                         # a block of rows
            xb = x2[lo:hi]
            r[lo:hi, 0] = 1 / xp.sqrt(_rowdot(xp, xb, xb) * (1.0 / d) + eps)      # [n] = 1/rms
            yb = xp.multiply(xb, r[lo:hi], out=y[lo:hi])              # xhat = x r
            yb *= weight                                              # [n, d] * [d]

        _parallel(kernel, x2, d)
        y = y.reshape(x.shape)
        r = r.reshape(x.shape[:-1] + (1,))                            # [..., 1]
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        x, w, r = ctx.saved
        xp = _xp(g)
        d = x.shape[-1]
        need_x, need_w = ctx.needs_input_grad[:2]
        x2, r2, g2 = _rows(x), r.reshape(-1, 1), _rows(g)             # [M, d], [M, 1], [M, d]
        gx = xp.empty(x2.shape, dtype=g.dtype) if need_x else None    # [M, d]
        gxhat = xp.empty(x2.shape, dtype=g.dtype) if need_w else None  # g * xhat, summed into dw below

        def kernel(lo: int, hi: int) -> None:
            gb, rb = g2[lo:hi], r2[lo:hi]
            xhat = x2[lo:hi] * rb                                     # [n, d]
            if need_w:
                xp.multiply(gb, xhat, out=gxhat[lo:hi])
            if need_x:
                gh = xp.multiply(gb, w, out=gx[lo:hi])                # g w
                dot = _rowdot(xp, gh, xhat)[:, None] * (1.0 / d)      # mean(gh xhat): [n, 1]
                xhat *= dot
                gh -= xhat
                gh *= rb                                              # dx = r (gh - xhat mean(gh xhat))

        _parallel(kernel, x2, d)
        gw = gxhat.sum(axis=0) if need_w else None                    # [M, d] -> [d]
        gx = gx.reshape(x.shape) if need_x else None
        return gx, gw, None


class SwiGLU(Function):
    """SwiGLU gate (Shazeer 2020, "GLU Variants Improve Transformer"): silu(a) * u.

        y = a * s * u,  s = sigmoid(a)
        du = g * a * s
        da = g * u * s * (1 + a * (1 - s))        (d silu / da)
    Saves a and u only; the sigmoid is recomputed in backward (one exp) to save a buffer.
    Rows are processed in cache-sized blocks spread over threads (``B.parallel_rows``).
    """

    @staticmethod
    def forward(ctx: Context, gate: Any, up: Any) -> Any:
        if tuple(gate.shape) != tuple(up.shape):
            raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
        xp = _xp(gate)
        a, u = _rows(gate), _rows(up)                                 # [..., f] -> [M, f]
        y = xp.empty(a.shape, dtype=a.dtype)                          # [M, f]

        def kernel(lo: int, hi: int) -> None:
            ab = a[lo:hi]
            yb = xp.negative(ab, out=y[lo:hi])                        # -a
            with B.np.errstate(over="ignore"):                       # exp(-a) = inf -> silu = -0
                xp.exp(yb, out=yb)
            yb += 1
            xp.divide(ab, yb, out=yb)                                 # silu(a) = a / (1 + exp(-a))
            yb *= u[lo:hi]                                            # silu(a) u

        _parallel(kernel, a, a.shape[1])
        ctx.save_for_backward(gate, up)
        return y.reshape(gate.shape)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        gate, up = ctx.saved
        xp = _xp(g)
        need_a, need_u = ctx.needs_input_grad[:2]
        a, u, g2 = _rows(gate), _rows(up), _rows(g)                   # [M, f] each
        ga = xp.empty(a.shape, dtype=a.dtype) if need_a else None     # [M, f]
        gu = xp.empty(a.shape, dtype=a.dtype) if need_u else None     # [M, f]

        def kernel(lo: int, hi: int) -> None:
            ab, gb = a[lo:hi], g2[lo:hi]
            s = _sigmoid(xp, ab)                                      # [rows, f], a block temporary
            if need_u:
                gub = xp.multiply(gb, ab, out=gu[lo:hi])              # g a
                gub *= s                                              # du = g a s
            if need_a:
                gab = xp.subtract(1, s, out=ga[lo:hi])                # 1 - s
                gab *= ab
                gab += 1
                gab *= s                                              # d silu(a) / da
                gab *= u[lo:hi]
                gab *= gb                                             # da

        _parallel(kernel, a, a.shape[1])
        return (ga.reshape(gate.shape) if need_a else None,
                gu.reshape(up.shape) if need_u else None)


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0, dtype: Any = B.DEFAULT_DTYPE) -> tuple[Any, Any]:
    """cos and sin tables [seq_len, head_dim] of rotary position embeddings (Su et al. 2021).

    theta_{p,i} = p * base^(-2i / head_dim) for position p and pair i < head_dim / 2; the
    tables repeat the half-width angles twice ([theta, theta], the rotate-half layout of
    GPT-NeoX / LLaMA / OpenMoE). Computed on the host in float64, then cast to ``dtype``
    and moved to the current device.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"rope: head_dim={head_dim} is odd; RoPE needs an even head dimension")
    np = B.np
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)    # [dh/2]
    angles = np.outer(np.arange(seq_len, dtype=np.float64), inv_freq)              # [L, dh/2]
    angles = np.concatenate([angles, angles], axis=1)                              # [L, dh]
    return B.to_device(np.cos(angles), dtype), B.to_device(np.sin(angles), dtype)


def _rotate(xp: Any, x: Any, y: Any, cos: Any, sin: Any, sign: float) -> None:
    """y = x cos + sign * rotate_half(x) sin, i.e. per pair of halves (x1, x2):
    y1 = x1 cos - sign x2 sin,  y2 = x2 cos + sign x1 sin (cos/sin [T, dh], the two halves
    of each table equal). Written block by block of the leading axis, in place into y."""
    h = x.shape[-1] // 2
    c, s = cos[:, :h], sin[:, :h] * sign                             # [T, dh/2]

    def kernel(lo: int, hi: int) -> None:
        xb, yb = x[lo:hi], y[lo:hi]                                   # [n, ..., T, dh]
        x1, x2, y1, y2 = xb[..., :h], xb[..., h:], yb[..., :h], yb[..., h:]
        xp.multiply(x1, c, out=y1)
        y1 -= x2 * s                                                  # y1 = x1 cos - x2 sin
        xp.multiply(x2, c, out=y2)
        y2 += x1 * s                                                  # y2 = x2 cos + x1 sin

    if x.ndim == 2:                                                   # [T, dh]: rows are positions
        kernel(0, x.shape[0])
    else:
        _parallel(kernel, x, builtins.max(1, x[0].size))


class RoPE(Function):
    """Rotary position embedding, rotate-half form: y = x * cos + rotate_half(x) * sin,
    rotate_half([x1, x2]) = [-x2, x1] (x1, x2 the two halves of the last axis).

    Per pair (x1_i, x2_i) this is a rotation by theta: y1 = x1 cos - x2 sin,
    y2 = x2 cos + x1 sin. The map is linear in x, so its backward is its transpose,
    dx = g * cos - rotate_half(g * sin): the rotation by -theta. Only the tables are saved.
    """

    name = "rope"

    @staticmethod
    def forward(ctx: Context, x: Any, cos: Any, sin: Any) -> Any:
        xp = _xp(x)
        T, dh = x.shape[-2], x.shape[-1]
        if dh % 2 != 0:
            raise ValueError(f"rope: head_dim={dh} is odd; RoPE needs an even head dimension")
        if tuple(cos.shape) != (T, dh) or tuple(sin.shape) != (T, dh):
            raise ValueError(f"rope: tables {tuple(cos.shape)}, {tuple(sin.shape)} do not match "
                             f"(T, head_dim) = ({T}, {dh})")
        if cos.dtype != x.dtype or sin.dtype != x.dtype:
            raise TypeError(f"rope: table dtype {cos.dtype} != input dtype {x.dtype} (no silent casts)")
        y = xp.empty(x.shape, dtype=x.dtype)                          # [..., T, dh], contiguous
        _rotate(xp, x, y, cos, sin, sign=1.0)
        ctx.save_for_backward(cos, sin)
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        cos, sin = ctx.saved
        xp = _xp(g)
        gx = xp.empty(g.shape, dtype=g.dtype)                         # [..., T, dh]
        _rotate(xp, g, gx, cos, sin, sign=-1.0)                       # rotation by -theta
        return gx, None, None


def _causal_bias(xp: Any, T: int, S: int, dtype: Any) -> Any:
    """[T, S] additive mask: 0 where key j <= i + (S - T), -inf above (future keys)."""
    i = xp.arange(T)[:, None]                                         # [T, 1]
    j = xp.arange(S)[None, :]                                         # [1, S]
    return xp.where(j > i + (S - T), -xp.inf, 0.0).astype(dtype)      # [T, S]


class CausalAttention(Function):
    """Scaled dot-product attention with a causal mask, fused (Vaswani et al. 2017, eq. 1).

        S_ij = scale * q_i . k_j,  masked to -inf where j > i + (S - T)
        P = softmax(S) over keys,  out = P v

    The offset S - T lets T new queries attend to a KV cache of S >= T keys: query i sits at
    absolute position i + (S - T). Backward (with dO the incoming gradient):
        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),
        dQ = scale * dS K,   dK = scale * dS^T Q,
    where rowsum(dP * P) = rowsum(dO * out) (cheaper: [T, dh] instead of [T, S]).
    Batched matmuls over all leading axes (batch, heads), in cache-sized blocks of
    (batch, head) rows spread over threads (BLAS held to one thread inside). Saves q, k, v
    (alive anyway as graph inputs), P [..., T, S] and out.
    The scale is explicit (default 1/sqrt(dh)); OpenMoE folds it into the q initialisation
    instead, which is the same function with scale=1 and wq scaled by 1/sqrt(dh).
    """

    @staticmethod
    def forward(ctx: Context, q: Any, k: Any, v: Any, scale: float | None = None, causal: bool = True) -> Any:
        xp = _xp(q)
        if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
            raise ValueError("causal_attention: q, k, v must have the same rank >= 2 ([..., T, dh])")
        T, dh = q.shape[-2], q.shape[-1]
        S = k.shape[-2]
        if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != dh or v.shape[:-1] != k.shape[:-1]:
            raise ValueError(f"causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                             "do not fit [..., T, dh], [..., S, dh], [..., S, dv]")
        if causal and S < T:
            raise ValueError(f"causal_attention: fewer keys (S={S}) than queries (T={T}) under a causal mask")
        scale = 1.0 / float(dh) ** 0.5 if scale is None else float(scale)
        lead = q.shape[:-2]
        q3, k3, v3 = (a.reshape((-1,) + a.shape[-2:]) for a in (q, k, v))   # [..., T, dh] -> [BH, T, dh]
        p = xp.empty((q3.shape[0], T, S), dtype=q.dtype)              # P [BH, T, S]
        out = xp.empty((q3.shape[0], T, v.shape[-1]), dtype=q.dtype)  # [BH, T, dv]
        bias = _causal_bias(xp, T, S, q.dtype) if causal else None    # [T, S]

        def kernel(lo: int, hi: int) -> None:                         # a block of (batch, head) rows
            pb = xp.matmul(q3[lo:hi] * scale, xp.swapaxes(k3[lo:hi], -1, -2), out=p[lo:hi])  # [n, T, S]
            if bias is not None:
                pb += bias                                            # [n, T, S] + [T, S]
            pb -= pb.max(axis=-1, keepdims=True)                      # stable softmax, in place
            xp.exp(pb, out=pb)
            pb *= 1 / pb.sum(axis=-1, keepdims=True)                  # P
            xp.matmul(pb, v3[lo:hi], out=out[lo:hi])                  # [n, T, S] @ [n, S, dv] -> [n, T, dv]

        _parallel(kernel, q3, T * S, uses_blas=True, block=1 << 18)   # ~1 MB of P per block
        ctx.scale = scale
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q3, k3, v3, p, out)
            ctx.shapes = (q.shape, k.shape, v.shape)
        return out.reshape(lead + out.shape[1:])

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        q, k, v, p, out = ctx.saved                                   # [BH, ...] views / buffers
        xp = _xp(g)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        g3 = g.reshape(out.shape)                                     # [..., T, dv] -> [BH, T, dv]
        gq = xp.empty(q.shape, dtype=g.dtype) if need_q else None     # [BH, T, dh]
        gk = xp.empty(k.shape, dtype=g.dtype) if need_k else None     # [BH, S, dh]
        gv = xp.empty(v.shape, dtype=g.dtype) if need_v else None     # [BH, S, dv]

        def kernel(lo: int, hi: int) -> None:
            pb, gb = p[lo:hi], g3[lo:hi]
            if need_v:
                xp.matmul(xp.swapaxes(pb, -1, -2), gb, out=gv[lo:hi])  # [n, S, T] @ [n, T, dv] -> [n, S, dv]
            if need_q or need_k:
                ds = gb @ xp.swapaxes(v[lo:hi], -1, -2)               # dP: [n, T, dv] @ [n, dv, S] -> [n, T, S]
                ds -= _rowdot(xp, gb, out[lo:hi])[..., None]          # - rowsum(dP * P): [n, T, 1]
                ds *= pb                                              # dS [n, T, S]
                if need_q:
                    gqb = xp.matmul(ds, k[lo:hi], out=gq[lo:hi])      # [n, T, S] @ [n, S, dh] -> [n, T, dh]
                    gqb *= ctx.scale
                if need_k:
                    gkb = xp.matmul(xp.swapaxes(ds, -1, -2), q[lo:hi], out=gk[lo:hi])  # [n, S, dh]
                    gkb *= ctx.scale

        _parallel(kernel, p, p.shape[1] * p.shape[2], uses_blas=True, block=1 << 18)
        q_shape, k_shape, v_shape = ctx.shapes
        return (gq.reshape(q_shape) if need_q else None, gk.reshape(k_shape) if need_k else None,
                gv.reshape(v_shape) if need_v else None)


def rms_norm(x: Any, weight: Any, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last axis: x [..., d], weight [d] -> [..., d] (see ``RMSNorm``)."""
    return RMSNorm.apply(x, weight, eps=float(eps))


def swiglu(gate: Any, up: Any) -> Tensor:
    """silu(gate) * up, fused: gate [..., f], up [..., f] -> [..., f] (see ``SwiGLU``)."""
    return SwiGLU.apply(gate, up)


def rope(x: Any, cos: Any, sin: Any) -> Tensor:
    """Rotate x [..., T, dh] by the angles whose cos / sin tables [T, dh] are given
    (rows = positions of x's T axis; see ``rope_tables`` and ``RoPE``). No grad to the tables."""
    cos = cos.data if isinstance(cos, Tensor) else cos
    sin = sin.data if isinstance(sin, Tensor) else sin
    return RoPE.apply(x, cos, sin)


def causal_attention(q: Any, k: Any, v: Any, scale: float | None = None, causal: bool = True) -> Tensor:
    """softmax(scale * q k^T + causal mask) v: q [..., T, dh], k [..., S, dh], v [..., S, dv]
    -> [..., T, dv]; query i attends to keys j <= i + (S - T). scale defaults to 1/sqrt(dh).
    ``causal=False`` drops the mask (every query sees every key)."""
    return CausalAttention.apply(q, k, v, scale=scale, causal=causal)
