"""Fused kernels: RMSNorm, SwiGLU, RoPE, the QKV projection with RoPE and causal attention,
each one ``Function`` with a hand-written backward, and a plain NumPy reference right
beside it.

A kernel here trades readability for speed: one graph node and a minimal set of saved
arrays per call instead of a chain of small ops, in-place arithmetic on fresh buffers, and
rows spread over threads (``_parallel``, the thread-split helpers below). Every kernel
works in the dtype of its inputs (float32 by default, float64 for checks), with no upcasts.

Beside each kernel sits its ``*_reference``: the same maths in three to five lines of plain
NumPy (no blocks, no threads, no in-place tricks; any float dtype, float64 for checking),
as llm.c keeps a ``_cpu`` reference beside each fast kernel. The tests compare every
kernel's forward with its reference as a second oracle, besides PyTorch. The references
take and return host NumPy arrays.

``tinymoe.functional`` re-exports everything public here, so ``F.rms_norm`` and
``functional.rms_norm`` are the same function.
"""
from __future__ import annotations

import math
from typing import Any

from tinymoe import backend as B
from tinymoe.autograd import Context, Function, Tensor

__all__ = [
    "RMSNorm", "SwiGLU", "RoPE", "QKVRoPE", "CausalAttention", "rms_norm", "swiglu", "rope",
    "rope_tables", "qkv_rope", "causal_attention", "rms_norm_reference", "swiglu_reference",
    "rope_reference", "qkv_rope_reference", "causal_attention_reference",
]

np = B.np  # host NumPy, for the references


# --------------------------------------------------------------------------------------
# helpers: the in-place sigmoid and the thread split (functional.py uses them too)
# --------------------------------------------------------------------------------------

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


def _rowmax(xp: Any, a: Any) -> Any:
    """max over the last axis, keepdims: [..., n] -> [..., 1]. NumPy's ``fmax`` reduction
    (NaN-ignoring, so no NaN test per element) runs 1.5x faster than ``max`` on rows of 128;
    a row with a NaN still ends NaN in a softmax, through its exp. (CuPy: ``max``.)"""
    if xp is np:
        return np.fmax.reduce(a, axis=-1, keepdims=True)
    return a.max(axis=-1, keepdims=True)


def _rowsum(xp: Any, a: Any) -> Any:
    """sum over the last axis, keepdims, as a dot product with a ones vector: [..., n] -> [..., 1].
    ``vecdot`` is 2.5-3x faster than NumPy's ``sum`` over rows of 128-258 elements (no BLAS
    call, so it is safe inside a kernel that already runs on several threads)."""
    return _rowdot(xp, a, xp.ones(a.shape[-1], dtype=a.dtype))[..., None]   # [..., n] . [n] -> [..., 1]


def _block(row_size: int, target: int) -> int:
    """Rows in a block of about ``target`` elements (at least one row)."""
    return max(1, target // max(1, row_size))


_MIN_PER_THREAD = 1 << 18        # elements each thread must get before an elementwise kernel splits
_MIN_PER_THREAD_BLAS = 1 << 16   # the same for a kernel whose blocks run matmuls (attention)


def _parallel(kernel: Any, a: Any, row_size: int, uses_blas: bool = False, block: int | None = None) -> None:
    """``kernel(lo, hi)`` over the rows of ``a`` (``row_size`` elements each), spread over
    threads when every thread gets at least ``_MIN_PER_THREAD`` elements (below that,
    handing work to a thread costs more than it saves), ``_MIN_PER_THREAD_BLAS`` for a
    kernel with matmuls (more work per element). Each thread takes its rows as one range,
    or in blocks of about ``block`` elements when given (attention: its P buffer).

    Measured on the 2-core machine, training step, interleaved in one process: a 2^17
    threshold for the elementwise kernels against 2^16 took ``toy`` at 2 threads from 24.3
    to 23.0 ms and left ``mini`` as it was; with one range per thread, 2^18 against 2^17
    took ``mini`` from 144.2 to 141.7 ms (135.7 to 132.6 in the other order: its RMSNorm on
    [2048, 128] was slower split) and left ``toy`` as it was; one range per thread instead of cache-sized
    blocks of 2^16 elements (fewer NumPy calls, each longer) took ``mini`` from 158.9 to
    150.0 ms at 2 threads (191.6 to 184.4 in a second run, 216.4 to 205.6 at 1 thread) and
    ``small`` from 2,634 to 2,567 ms."""
    least = _MIN_PER_THREAD_BLAS if uses_blas else _MIN_PER_THREAD
    B.parallel_rows(kernel, a, block_rows=None if block is None else _block(row_size, block),
                    min_rows=_block(row_size, least), uses_blas=uses_blas)


# --------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------

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
        xp = B.array_module(x)
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
        xp = B.array_module(g)
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


def rms_norm(x: Any, weight: Any, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last axis: x [..., d], weight [d] -> [..., d] (see ``RMSNorm``)."""
    return RMSNorm.apply(x, weight, eps=float(eps))


def rms_norm_reference(x: Any, w: Any, eps: float = 1e-6) -> Any:
    """Reference for :class:`RMSNorm`: ``y = x / sqrt(mean(x^2) + eps) * w`` over the last axis."""
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)      # [..., 1]
    return x / rms * w                                                # [..., d]


# --------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------

class SwiGLU(Function):
    """SwiGLU gate (Shazeer 2020, "GLU Variants Improve Transformer"): silu(a) * u.

        y = a * s * u,  s = sigmoid(a)
        du = g * a * s
        da = g * u * s * (1 + a * (1 - s))        (d silu / da)
    Saves a and u only; the sigmoid is recomputed in backward (one exp) to save a buffer.
    Rows are spread over threads (``_parallel``).
    """

    @staticmethod
    def forward(ctx: Context, gate: Any, up: Any) -> Any:
        if tuple(gate.shape) != tuple(up.shape):
            raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
        xp = B.array_module(gate)
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
        xp = B.array_module(g)
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


def swiglu(gate: Any, up: Any) -> Tensor:
    """silu(gate) * up, fused: gate [..., f], up [..., f] -> [..., f] (see ``SwiGLU``)."""
    return SwiGLU.apply(gate, up)


def swiglu_reference(gate: Any, up: Any) -> Any:
    """Reference for :class:`SwiGLU`: ``silu(gate) * up = gate * sigmoid(gate) * up``."""
    sigmoid = 1.0 / (1.0 + np.exp(-gate))
    return gate * sigmoid * up


# --------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------

def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0, dtype: Any = B.DEFAULT_DTYPE) -> tuple[Any, Any]:
    """cos and sin tables [seq_len, head_dim] of rotary position embeddings (Su et al. 2021).

    theta_{p,i} = p * base^(-2i / head_dim) for position p and pair i < head_dim / 2; the
    tables repeat the half-width angles twice ([theta, theta], the rotate-half layout of
    GPT-NeoX / LLaMA / OpenMoE). Computed on the host in float64, then cast to ``dtype``
    and moved to the current device.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"rope: head_dim={head_dim} is odd; RoPE needs an even head dimension")
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)    # [dh/2]
    angles = np.outer(np.arange(seq_len, dtype=np.float64), inv_freq)              # [L, dh/2]
    angles = np.concatenate([angles, angles], axis=1)                              # [L, dh]
    return B.to_device(np.cos(angles), dtype), B.to_device(np.sin(angles), dtype)


def _rotate(xp: Any, x: Any, y: Any, cos: Any, sin: Any, sign: float) -> None:
    """y = x cos + sign * rotate_half(x) sin, i.e. per pair of halves (x1, x2):
    y1 = x1 cos - sign x2 sin,  y2 = x2 cos + sign x1 sin (cos/sin [T, dh], the two halves
    of each table equal). Written block by block of the leading axis, in place into y.

    Computed as y = x cos, t = x [sign s | -sign s], then y1 += t2, y2 += t1: two passes over
    whole rows and two over half rows, instead of six over half rows (half-row slices make
    NumPy loop in runs of dh/2 elements; measured 1.7x faster on [16, 4, 128, 32], and the
    same bits: every element is the same two products and one sum)."""
    h = x.shape[-1] // 2
    s = sin[:, :h] * sign                                             # [T, dh/2]
    s_pm = xp.concatenate([s, -s], axis=1)                            # [T, dh]: [sign sin | -sign sin]

    def kernel(lo: int, hi: int) -> None:
        xb, yb = x[lo:hi], y[lo:hi]                                   # [n, ..., T, dh]
        t = xb * s_pm                                                 # [x1 sign sin | -x2 sign sin]
        xp.multiply(xb, cos, out=yb)                                  # y = x cos
        yb[..., :h] += t[..., h:]                                     # y1 = x1 cos - sign x2 sin
        yb[..., h:] += t[..., :h]                                     # y2 = x2 cos + sign x1 sin

    if x.ndim == 2:                                                   # [T, dh]: rows are positions
        kernel(0, x.shape[0])
    else:
        _parallel(kernel, x, max(1, x[0].size))


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
        xp = B.array_module(x)
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
        xp = B.array_module(g)
        gx = xp.empty(g.shape, dtype=g.dtype)                         # [..., T, dh]
        _rotate(xp, g, gx, cos, sin, sign=-1.0)                       # rotation by -theta
        return gx, None, None


def rope(x: Any, cos: Any, sin: Any) -> Tensor:
    """Rotate x [..., T, dh] by the angles whose cos / sin tables [T, dh] are given
    (rows = positions of x's T axis; see ``rope_tables`` and ``RoPE``). No grad to the tables."""
    cos = cos.data if isinstance(cos, Tensor) else cos
    sin = sin.data if isinstance(sin, Tensor) else sin
    return RoPE.apply(x, cos, sin)


def rope_reference(x: Any, cos: Any, sin: Any) -> Any:
    """Reference for :class:`RoPE`: ``x cos + rotate_half(x) sin``, ``rotate_half([x1, x2]) = [-x2, x1]``;
    x [..., T, dh], cos and sin [T, dh] (from :func:`rope_tables`)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [..., T, dh]
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------
# causal attention
# --------------------------------------------------------------------------------------

def _pair_order(n_heads: int, dh: int) -> Any:
    """Column order that puts each rotate-half pair side by side: within every head,
    [0, h, 1, h+1, ..., h-1, dh-1] (h = dh / 2). A GEMM on weights whose columns are taken
    in this order writes the pair (x1_j, x2_j) as one complex number x1_j + i x2_j."""
    h = dh // 2
    j = np.arange(h)
    head = np.stack([j, j + h], axis=1).reshape(-1)                  # [dh]: 0, h, 1, h+1, ...
    return (np.arange(n_heads)[:, None] * dh + head[None, :]).reshape(-1)   # [H dh]


def _rotations(xp: Any, cos: Any, sin: Any, n: int) -> Any:
    """e^{i theta} = cos + i sin per position and pair, [T, dh/2] complex, repeated ``n``
    times along the last axis -> [T, n dh/2] (one copy per head of q and of k)."""
    h = cos.shape[-1] // 2
    ctype = xp.complex64 if cos.dtype == xp.float32 else xp.complex128
    e = (cos[:, :h] + 1j * sin[:, :h]).astype(ctype)                 # exact: the same cos, sin values
    return xp.tile(e, (1, n))                                         # [T, n h]


_FEW_ROWS = 8   # QKVRoPE: at most this many rows (batch x new tokens) without a gradient take _few_rows


class QKVRoPE(Function):
    """The input side of attention in one node: projections, heads, RoPE.

        [q | k | v] = x [Wq | Wk | Wv]       [N, d] @ [d, 3D] -> [N, 3D]   (N = B T, D = H dh)
        q, k, v     = heads of each           [N, D] -> [B, H, T, dh]
        q, k        = RoPE(q), RoPE(k)        (Su et al. 2021, eq. 34; rows at the tables' positions)

    RoPE rotates each pair (x1_j, x2_j) = (x_j, x_{j+dh/2}) of a head by the angle theta_j of
    the position: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin. That is the complex product
    (x1 + i x2) e^{i theta} (eq. 12 of the paper; LLaMA's reference code computes it so). The
    columns of Wq and Wk are taken in :func:`_pair_order`, so the GEMM writes every pair side
    by side and one complex multiply in place rotates all of q and k; the heads copy then
    puts the halves back in rotate-half order. (Rotating the halves in place instead is six
    or four strided passes of dh/2-element runs: 1.04 ms against 0.41 ms for q, k, v of
    ``mini``, [16, 4, 128, 32] each, one thread.) A decoding step (at most ``_FEW_ROWS`` rows,
    no gradient) skips the reorder, which costs more than it saves on so few rows
    (:meth:`_few_rows`).

    RoPE is a rotation, so its transpose is the rotation by -theta (the conjugate); backward:
        G = [RoPE^-1(dq) | RoPE^-1(dk) | dv]   gathered in the GEMM's [N, 3D] layout
        dx = G W^T,   dW = x^T G              (W the column-reordered [Wq | Wk | Wv],
                                               dW's columns put back in the original order)
    Saves only graph inputs (x, the three weights) and the tables: the reordered weight
    [d, 3D] is rebuilt in backward rather than kept (for openmoe-base that is 85 MB less at
    the peak).
    """

    name = "qkv_rope"

    @staticmethod
    def _weight(xp: Any, wq: Any, wk: Any, wv: Any, n_heads: int) -> Any:
        """[Wq[:, order] | Wk[:, order] | Wv] [d, 3D], order = :func:`_pair_order`: per head,
        the halves [x1 | x2] interleaved. Written one half at a time into strided views (an
        index gather ``wq[:, order]`` took 3-7x longer: 3.0 ms against 0.5 ms at d = 768)."""
        d, D = wq.shape
        h = D // n_heads // 2
        w = xp.empty((d, 3 * D), dtype=wq.dtype)                     # [d, 3D]
        for i, wi in enumerate((wq, wk)):
            dst = w[:, i * D:(i + 1) * D].reshape(d, n_heads, h, 2)   # view: [d, H, h, (x1, x2)]
            src = wi.reshape(d, n_heads, 2, h)                        # [d, H, (x1, x2), h]
            for s in range(2):
                dst[..., s] = src[:, :, s]
        w[:, 2 * D:] = wv
        return w

    @staticmethod
    def _few_rows(xp: Any, x: Any, wq: Any, wk: Any, wv: Any, cos: Any, sin: Any, n_heads: int) -> tuple:
        """The forward for a handful of rows and no gradient (a decoding step): reordering the
        [d, 2D] weights would cost more than it saves on q and k of a few rows, so the GEMM
        runs on the weights as they are and q, k are rotated in rotate-half form (:func:`_rotate`).
        The same values (tested against the main path)."""
        batch, T, d = x.shape
        D = wq.shape[1]
        y = (x.reshape(-1, d) @ xp.concatenate([wq, wk, wv], axis=1)).reshape(batch, T, 3, n_heads, D // n_heads)
        outs = []
        for i in range(3):
            src = y[:, :, i].transpose(0, 2, 1, 3)                    # [B, H, T, dh] view
            dst = xp.empty(src.shape, dtype=x.dtype)
            if i < 2:
                _rotate(xp, src, dst, cos, sin, sign=1.0)
            else:
                dst[...] = src
            outs.append(dst)
        return tuple(outs)

    @staticmethod
    def forward(ctx: Context, x: Any, wq: Any, wk: Any, wv: Any, cos: Any, sin: Any,
                n_heads: int = 1) -> Any:
        xp = B.array_module(x)
        if x.ndim != 3 or wq.ndim != 2 or wq.shape != wk.shape or wq.shape != wv.shape:
            raise ValueError("qkv_rope: x must be [B, T, d] and Wq, Wk, Wv equal [d, H*dh]")
        batch, T, d = x.shape
        D = wq.shape[1]
        if wq.shape[0] != d or D % n_heads != 0 or (D // n_heads) % 2 != 0:
            raise ValueError(f"qkv_rope: weights {tuple(wq.shape)} do not fit d={d} and {n_heads} heads "
                             "of an even head dimension")
        dh, H = D // n_heads, n_heads
        h = dh // 2
        if tuple(cos.shape) != (T, dh) or tuple(sin.shape) != (T, dh):
            raise ValueError(f"qkv_rope: tables {tuple(cos.shape)} do not match (T, head_dim) = ({T}, {dh})")
        if batch * T <= _FEW_ROWS and not any(ctx.needs_input_grad):
            return QKVRoPE._few_rows(xp, x, wq, wk, wv, cos, sin, H)  # decoding: one token at a time
        w = QKVRoPE._weight(xp, wq, wk, wv, H)                        # [d, 3D], q and k pairs adjacent
        y = (x.reshape(-1, d) @ w).reshape(batch, T, 3 * D)           # [N, 3D] -> [B, T, 3D]
        rot = _rotations(xp, cos, sin, 2 * H)                         # [T, 2 H h] complex: q's heads, k's
        qk = y.view(rot.dtype)[:, :, :D]                              # [B, T, 3D/2] complex -> q, k part
        pairs = y.reshape(batch, T, 3, H, h, 2)                       # [B, T, 3, H, h, (x1, x2)]
        heads = y.reshape(batch, T, 3, H, dh)
        q, k, v = (xp.empty((batch, H, T, dh), dtype=x.dtype) for _ in range(3))  # contiguous

        def kernel(lo: int, hi: int) -> None:                         # a block of sequences
            xp.multiply(qk[lo:hi], rot, out=qk[lo:hi])                # (x1 + i x2) e^{i theta}: q, k rotated
            for i, dst in enumerate((q, k)):                          # heads copy, halves back apart
                halves = dst[lo:hi].reshape(hi - lo, H, T, 2, h)      # [n, H, T, (x1, x2), h] view
                for s in range(2):                                    # (one half at a time: 1.1-3x faster)
                    halves[:, :, :, s] = pairs[lo:hi, :, i, :, :, s].transpose(0, 2, 1, 3)
            v[lo:hi] = heads[lo:hi, :, 2].transpose(0, 2, 1, 3)       # v: the heads copy only

        _parallel(kernel, y, T * 3 * D)
        del y, w                                                      # the outputs hold copies
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, wq, wk, wv, cos, sin)            # graph inputs: no new memory
        ctx.n_heads = n_heads
        return q, k, v

    @staticmethod
    def backward(ctx: Context, gq: Any, gk: Any, gv: Any) -> tuple:
        x, wq, wk, wv, cos, sin = ctx.saved
        xp = B.array_module(x)
        batch, T, d = x.shape
        H = ctx.n_heads
        D = wq.shape[1]
        dh = D // H
        h = dh // 2
        g = xp.empty((batch, T, 3 * D), dtype=x.dtype)                # G in the GEMM's layout
        pairs = g.reshape(batch, T, 3, H, h, 2)
        heads = g.reshape(batch, T, 3, H, dh)
        back = xp.conj(_rotations(xp, cos, sin, 2 * H))               # e^{-i theta} [T, 2 H h]
        gqk = g.view(back.dtype)[:, :, :D]                            # complex view of the q, k part

        def kernel(lo: int, hi: int) -> None:
            for i, gi in enumerate((gq, gk)):                         # halves side by side again
                halves = gi[lo:hi].reshape(hi - lo, H, T, 2, h)       # [n, H, T, (x1, x2), h]
                for s in range(2):
                    pairs[lo:hi, :, i, :, :, s] = halves[:, :, :, s].transpose(0, 2, 1, 3)
            heads[lo:hi, :, 2] = gv[lo:hi].transpose(0, 2, 1, 3)
            xp.multiply(gqk[lo:hi], back, out=gqk[lo:hi])             # RoPE^T = rotation by -theta

        _parallel(kernel, g, T * 3 * D)
        g2 = g.reshape(-1, 3 * D)                                     # [N, 3D]
        need_x = ctx.needs_input_grad[0]
        w = QKVRoPE._weight(xp, wq, wk, wv, H)                        # a temporary, not kept from forward
        gx = (g2 @ w.T).reshape(x.shape) if need_x else None          # [N, 3D] @ [3D, d] -> [B, T, d]
        del w
        gws: list[Any] = [None, None, None]
        if any(ctx.needs_input_grad[1:4]):
            gw = x.reshape(-1, d).T @ g2                              # [d, N] @ [N, 3D] -> [d, 3D]
            for i in range(3):
                if ctx.needs_input_grad[1 + i]:
                    cols = gw[:, i * D:(i + 1) * D]                   # [d, D], pairs adjacent for q and k
                    if i == 2:
                        gws[i] = xp.ascontiguousarray(cols)
                        continue
                    gws[i] = xp.empty((d, D), dtype=gw.dtype)         # back to the weights' own order
                    dst = gws[i].reshape(d, H, 2, h)
                    for s in range(2):
                        dst[:, :, s] = cols.reshape(d, H, h, 2)[..., s]
        return (gx, *gws, None, None)


def qkv_rope(x: Any, wq: Any, wk: Any, wv: Any, cos: Any, sin: Any, n_heads: int) -> tuple:
    """q, k, v [B, H, T, dh] from x [B, T, d] and Wq, Wk, Wv [d, H*dh], q and k rotated by
    the tables cos, sin [T, dh] (see ``QKVRoPE``); no grad to the tables."""
    cos = cos.data if isinstance(cos, Tensor) else cos
    sin = sin.data if isinstance(sin, Tensor) else sin
    return QKVRoPE.apply(x, wq, wk, wv, cos, sin, n_heads=n_heads)


def qkv_rope_reference(x: Any, wq: Any, wk: Any, wv: Any, cos: Any, sin: Any, n_heads: int) -> tuple:
    """Reference for :class:`QKVRoPE`: three products, heads split, RoPE on q and k."""
    batch, T, _ = x.shape

    def heads(t: Any) -> Any:                                         # [B, T, D] -> [B, H, T, dh]
        return t.reshape(batch, T, n_heads, -1).transpose(0, 2, 1, 3)

    q, k, v = heads(x @ wq), heads(x @ wk), heads(x @ wv)
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin), v


def _causal_bias(xp: Any, T: int, S: int, dtype: Any) -> Any:
    """[T, S] additive mask: 0 where key j <= i + (S - T), -inf above (future keys)."""
    i = xp.arange(T)[:, None]                                         # [T, 1]
    j = xp.arange(S)[None, :]                                         # [1, S]
    return xp.where(j > i + (S - T), -xp.inf, 0.0).astype(dtype)      # [T, S]


_BOUND_MIN_SCORES = 4096   # scores per (batch, head) below which the max pass is cheaper than the bound


def _exp_limit(xp: Any, dtype: Any, n: int) -> float | None:
    """The largest |score| for which a softmax over ``n`` entries may skip subtracting the
    row max: exp(s) and the sum of n of them stay finite, and every exp(s) for s >= -limit
    stays a normal number (ln of the largest float, less ln n and a margin of 2). None on
    a GPU, where the test would cost a host sync."""
    if xp is not np:
        return None
    info = np.finfo(dtype)
    return float(min(np.log(info.max), -np.log(info.tiny)) - np.log(n) - 2.0)


def _score_bound(xp: Any, q: Any, k: Any, scale: float) -> float:
    """max over the block of |scale q_i . k_j| <= |scale| max_i |q_i| max_j |k_j|
    (Cauchy-Schwarz): q [n, T, dh], k [n, S, dh] -> a host float."""
    qn = _rowdot(xp, q, q).max(axis=1)                                # [n] max_i |q_i|^2
    kn = _rowdot(xp, k, k).max(axis=1)                                # [n] max_j |k_j|^2
    return abs(scale) * float(np.sqrt((qn * kn).max()))


class CausalAttention(Function):
    """Scaled dot-product attention with a causal mask, fused (Vaswani et al. 2017, eq. 1).

        S_ij = scale * q_i . k_j,  masked to -inf where j > i + (S - T)
        P = softmax(S) over keys,  out = P v

    The offset S - T lets T new queries attend to a KV cache of S >= T keys: query i sits at
    absolute position i + (S - T). Backward (with dO the incoming gradient):
        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),
        dQ = scale * dS K,   dK = scale * dS^T Q,
    where rowsum(dP * P) = rowsum(dO * out) (cheaper: [T, dh] instead of [T, S]).

    The softmax subtracts each row's max before the exp only when it must: softmax is the
    same for any shift, and by Cauchy-Schwarz every score of a block is at most
    B = |scale| max_i |q_i| max_j |k_j|; when B is below :func:`_exp_limit` (about 80 in
    float32 for S up to a few thousand) no exp(s) or row sum can overflow and no unmasked
    exp(s) can fall below the normal range, so the max pass (the slowest pass of the
    softmax: 206 us of a ``toy`` layer's [64, 64, 64] scores) is skipped. Larger scores take
    the usual max-subtracted path, and so do small score matrices (under
    ``_BOUND_MIN_SCORES`` per head, a decoding step: the bound costs more than the max).

    Batched matmuls over all leading axes (batch, heads), in cache-sized blocks of
    (batch, head) rows spread over threads (BLAS held to one thread inside). Saves q, k, v
    (alive anyway as graph inputs), P [..., T, S] and out.
    The scale is explicit (default 1/sqrt(dh)); OpenMoE folds it into the q initialisation
    instead, which is the same function with scale=1 and wq scaled by 1/sqrt(dh).
    """

    @staticmethod
    def forward(ctx: Context, q: Any, k: Any, v: Any, scale: float | None = None, causal: bool = True) -> Any:
        xp = B.array_module(q)
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
        bias = _causal_bias(xp, T, S, q.dtype) if causal and T > 1 else None  # [T, S] (one query sees all S)

        limit = _exp_limit(xp, q.dtype, S) if T * S >= _BOUND_MIN_SCORES else None

        def kernel(lo: int, hi: int) -> None:                         # a block of (batch, head) rows
            qb, kb = q3[lo:hi], k3[lo:hi]
            pb = xp.matmul(qb * scale, xp.swapaxes(kb, -1, -2), out=p[lo:hi])  # [n, T, S]
            if bias is not None:
                pb += bias                                            # [n, T, S] + [T, S]
            if limit is None or _score_bound(xp, qb, kb, scale) > limit:
                pb -= _rowmax(xp, pb)                                 # stable softmax, in place
            xp.exp(pb, out=pb)
            pb *= 1 / _rowsum(xp, pb)                                 # P
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
        xp = B.array_module(g)
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


def causal_attention(q: Any, k: Any, v: Any, scale: float | None = None, causal: bool = True) -> Tensor:
    """softmax(scale * q k^T + causal mask) v: q [..., T, dh], k [..., S, dh], v [..., S, dv]
    -> [..., T, dv]; query i attends to keys j <= i + (S - T). scale defaults to 1/sqrt(dh).
    ``causal=False`` drops the mask (every query sees every key)."""
    return CausalAttention.apply(q, k, v, scale=scale, causal=causal)


def causal_attention_reference(q: Any, k: Any, v: Any, scale: float | None = None, causal: bool = True) -> Any:
    """Reference for :class:`CausalAttention`: ``softmax(scale q k^T + mask) v``, query i
    sees keys j <= i + (S - T); q [..., T, dh], k [..., S, dh], v [..., S, dv]."""
    T, S, dh = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) * (1 / math.sqrt(dh) if scale is None else scale)  # [..., T, S]
    if causal:
        scores = np.where(np.tri(T, S, S - T, dtype=bool), scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))          # [..., T, S]
    return p / p.sum(axis=-1, keepdims=True) @ v                      # [..., T, dv]
