"""Differentiable operations: each a ``Function`` with a hand-written backward.

Every public function here takes Tensors (or plain arrays / Python numbers, which get no
gradient) and returns Tensors. Elementwise ops broadcast like NumPy; their backward sums
the incoming gradient back to each input's shape (``unbroadcast``).

This module holds the basic ops (elementwise, matmul, reductions, shapes, indexing,
softmax) and the fused softmax-cross-entropy, with its plain NumPy reference
``cross_entropy_reference`` beside it. The other fused hot paths (RMSNorm, SwiGLU, RoPE,
causal attention), with their references and the thread-split helpers, live in
``tinymoe/functional_fused.py`` and are re-exported here (``F.rms_norm`` ...). The
router's Functions (combine weights, aux and z losses, dispatch, combine, grouped
matmul) live with the MoE layer in ``tinymoe/nn/moe.py``.
"""
from __future__ import annotations

from typing import Any, Sequence

from tinymoe import backend as B
from tinymoe.autograd import Context, Function, Tensor
from tinymoe.functional_fused import (  # noqa: F401  (re-exported: tinymoe.functional keeps every name)
    CausalAttention, QKVRoPE, RMSNorm, RoPE, SwiGLU, _block, _parallel, _rowdot, _rowmax, _rows, _rowsum, _sigmoid,
    causal_attention, causal_attention_reference, qkv_rope, qkv_rope_reference, rms_norm,
    rms_norm_reference, rope, rope_reference, rope_tables, swiglu, swiglu_reference)

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

    Backward is a scatter-add of rows (``backend.scatter_add_rows``: the rows sorted by id,
    each id's rows summed), so a token that appears many times gets the sum of its gradients.
    """

    @staticmethod
    def forward(ctx: Context, weight: Any, ids: Any) -> Any:
        V = weight.shape[0]
        # The range check runs on host ids only: on the device it would be two host syncs,
        # and the model checks its ids on the host before moving them (OpenMoE._check_ids).
        if B.array_module(ids) is B.np and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
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
    probability buffer that forward kept (no [N, V] temporaries beyond it). Without a
    gradient (evaluation) forward keeps no [N, V] buffer at all: only logsumexp, in blocks.
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
        # Host targets only (on the device a host sync; the model checks its targets on the
        # host before moving them, OpenMoE._check_targets).
        if xp is B.np and t.size and bool(((t < 0) | (t >= V))[valid].any()):
            raise IndexError(f"a target id is outside [0, {V}) (ignore_index={ignore_index})")
        t_safe = xp.where(valid, t, 0)                          # [N]
        keep = ctx.needs_input_grad[0]                          # backward needs the softmax
        probs = xp.empty(z.shape, dtype=z.dtype) if keep else None  # [N, V] (the one big buffer)
        lse = xp.empty(z.shape[0], dtype=z.dtype)               # [N] logsumexp per row

        def kernel(lo: int, hi: int) -> None:                   # a range of rows
            zb = z[lo:hi]
            m = _rowmax(xp, zb)                                 # [n, 1]
            pb = xp.subtract(zb, m, out=probs[lo:hi] if keep else None)  # [n, V]
            xp.exp(pb, out=pb)
            sumexp = _rowsum(xp, pb)                            # [n, 1]
            lse[lo:hi] = (m + xp.log(sumexp))[:, 0]
            if keep:
                pb *= 1 / sumexp                                # softmax, in place

        # without a gradient only lse is kept: blocks of 2^16 elements, no [N, V] buffer
        _parallel(kernel, z, V, block=None if keep else 1 << 16)
        picked = z[xp.arange(z.shape[0]), t_safe]               # [N]
        losses = xp.where(valid, lse - picked, 0).astype(logits.dtype, copy=False)  # [N]
        count = valid.sum()                                     # [] (stays on the device)
        if keep:
            ctx.save_for_backward(probs, t_safe, valid)
        ctx.count, ctx.reduction, ctx.shape = count, reduction, logits.shape
        if reduction == "mean":
            return xp.asarray(losses.sum() / xp.maximum(count, 1), dtype=logits.dtype)
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
            scale = g / _xp(g).maximum(ctx.count, 1) if ctx.reduction == "mean" else g
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


def cross_entropy_reference(logits: Any, targets: Any, ignore_index: int = -100) -> Any:
    """Reference for :class:`CrossEntropy` (reduction "mean"), plain NumPy on host arrays:
    the mean over counted tokens of ``logsumexp(z_n) - z_n[t_n]``."""
    z, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)      # [N, V], [N]
    z, t = z[t != ignore_index], t[t != ignore_index]                     # counted tokens only
    m = z.max(axis=1)                                                     # [n]
    lse = m + B.np.log(B.np.exp(z - m[:, None]).sum(axis=1))              # [n]
    return (lse - z[B.np.arange(len(t)), t]).mean()
