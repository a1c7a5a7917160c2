"""Building blocks of the OpenMoE decoder: Linear, Embedding, RMSNorm, RotaryEmbedding,
Attention (with a KV cache for generation) and the FeedForward (SwiGLU, or OpenMoE's gated
triple product).

Conventions
- Linear weights are stored [in, out], so a layer computes ``x @ W`` (no transpose).
- No biases (OpenMoE); ``Linear(bias=True)`` exists for lessons.
- Weights start as N(0, init_std^2) draws from a host NumPy Generator you pass in
  (``rng=B.default_rng(seed)``): there is no global seed. They are drawn in float64 and
  cast to ``dtype`` (float32 by default), so a float64 model starts from the same numbers.
  With ``fan_in_scale=s`` (OpenMoE's init, docs/openmoe-facts.md §9) a weight with fan-in n
  gets std sqrt(s / n) instead (JAX's ``variance_scaling(s, "fan_in", ...)``).
- The heavy maths lives in fused ops of ``tinymoe.functional`` (rms_norm, swiglu, rope,
  causal_attention); these classes own parameters and wire the ops together.
"""
from __future__ import annotations

import math
from typing import Any

from tinymoe import backend as B
from tinymoe import functional as F
from tinymoe.autograd import Context, Function, Tensor, is_grad_enabled
from tinymoe.config import FFN_KINDS
from tinymoe.nn.module import Module, Parameter

__all__ = ["Linear", "Embedding", "RMSNorm", "RotaryEmbedding", "KVCache", "Attention", "FeedForward",
           "normal_parameter", "truncated_normal_parameter", "fan_in_std", "GatedTriple",
           "gated_triple", "gated_triple_reference"]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _float_dtype(dtype: Any) -> Any:
    d = B.np.dtype(dtype)
    if d.kind != "f":
        raise TypeError(f"layer dtype must be a float type, got {d}")
    return d


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, B.np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def normal_parameter(rng: Any, shape: tuple[int, ...], std: float, dtype: Any) -> Parameter:
    """A Parameter of N(0, std^2) draws from the host Generator ``rng``, on the current device.

    The one initialiser of every weight in tinymoe (layers, router, experts): the draws are
    float64 on the host (the same numbers on any device and in any dtype), then cast to
    ``dtype``. ``rng`` must be an explicit ``numpy.random.Generator``: nothing is seeded
    behind the caller's back."""
    if not isinstance(rng, B.np.random.Generator):
        raise TypeError(f"rng must be a NumPy Generator (tinymoe.backend.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    if std < 0:
        raise ValueError(f"init_std={std} must be >= 0")
    host = rng.normal(0.0, std, size=shape)                     # float64 on the host
    return Parameter(B.to_device(host, dtype))


# Standard deviation of a standard normal truncated to [-2, 2]:
# sqrt(1 - 2 * 2 * phi(2) / (Phi(2) - Phi(-2))) (JAX's variance_scaling divides by it).
TRUNCATED_NORMAL_STD = math.sqrt(1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2.0 * math.pi)
                                 / math.erf(2.0 / math.sqrt(2.0)))


def truncated_normal_parameter(rng: Any, shape: tuple[int, ...], std: float, dtype: Any) -> Parameter:
    """A Parameter of normal draws truncated to 2 standard deviations, with standard
    deviation ``std`` after truncation (as JAX's ``variance_scaling(..., "truncated_normal")``:
    z ~ N(0, 1) restricted to [-2, 2], times std / TRUNCATED_NORMAL_STD). Draws outside
    [-2, 2] are redrawn (float64 on the host, then cast to ``dtype``)."""
    if not isinstance(rng, B.np.random.Generator):
        raise TypeError(f"rng must be a NumPy Generator (tinymoe.backend.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    if std < 0:
        raise ValueError(f"std={std} must be >= 0")
    z = rng.standard_normal(size=shape)                         # float64 on the host
    bad = B.np.abs(z) > 2.0
    while bad.any():                                            # about 4.6% of draws, redrawn
        z[bad] = rng.standard_normal(size=int(bad.sum()))
        bad = B.np.abs(z) > 2.0
    return Parameter(B.to_device(z * (std / TRUNCATED_NORMAL_STD), dtype))


def fan_in_std(fan_in_scale: float, fan_in: int) -> float:
    """sqrt(scale / fan_in): the std of JAX's ``variance_scaling(scale, "fan_in", ...)``."""
    return math.sqrt(fan_in_scale / fan_in)


def _last_dim(x: Any) -> int:
    shape = x.shape if hasattr(x, "shape") else B.np.shape(x)
    if len(shape) == 0:
        raise ValueError("expected an input with at least one axis, got a scalar")
    return shape[-1]


# --------------------------------------------------------------------------------------
# Linear, Embedding, RMSNorm
# --------------------------------------------------------------------------------------

class Linear(Module):
    """y = x W (+ b): x [..., in] -> [..., out], W stored [in, out].

    Parameters: ``weight`` [in, out] ~ N(0, init_std^2) (``truncated``: the normal truncated
    at 2 std, see :func:`truncated_normal_parameter`); ``bias`` [out] (zeros) when
    ``bias=True``. Gradients come from the matmul's backward: dW = x^T dy, dx = dy W^T.
    """

    def __init__(self, in_features: int, out_features: int, *, rng: Any, bias: bool = False,
                 init_std: float = 0.02, truncated: bool = False, dtype: Any = B.DEFAULT_DTYPE):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        dtype = _float_dtype(dtype)
        draw = truncated_normal_parameter if truncated else normal_parameter
        self.weight = draw(rng, (self.in_features, self.out_features), init_std, dtype)
        self.bias = Parameter(B.to_device(B.np.zeros(self.out_features), dtype)) if bias else None

    def forward(self, x: Any) -> Tensor:
        if _last_dim(x) != self.in_features:
            raise ValueError(f"Linear: input last dim {_last_dim(x)} != in_features {self.in_features}")
        y = F.matmul(x, self.weight)                            # [..., in] @ [in, out] -> [..., out]
        if self.bias is not None:
            y = y + self.bias                                   # [..., out] + [out]
        return y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Token embedding: ids [...] (ints in [0, V)) -> weight[ids] [..., d].

    Parameter ``weight`` [V, d] ~ N(0, init_std^2). Backward scatter-adds the incoming rows
    into dW (a repeated id gets the sum). An id outside [0, V) raises IndexError naming it.
    """

    def __init__(self, num_embeddings: int, dim: int, *, rng: Any, init_std: float = 0.02,
                 dtype: Any = B.DEFAULT_DTYPE):
        super().__init__()
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings)
        self.dim = _positive_int("dim", dim)
        self.weight = normal_parameter(rng, (self.num_embeddings, self.dim), init_std, _float_dtype(dtype))

    def forward(self, ids: Any) -> Tensor:
        if not isinstance(ids, Tensor):
            ids = B.to_device(ids)                              # host ints / lists -> device ints
        return F.embedding(self.weight, ids)                    # [V, d], [B, T] -> [B, T, d]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}"


class RMSNorm(Module):
    """RMSNorm / T5LayerNorm: y = x / sqrt(mean(x^2) + eps) * w over the last axis.

    Scale only (no mean subtraction, no bias), eps 1e-6 as in OpenMoE. Parameter ``weight``
    [dim], initialised to ones. ``rng`` is accepted for a uniform layer signature and unused.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, rng: Any = None, dtype: Any = B.DEFAULT_DTYPE):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        if not eps > 0:
            raise ValueError(f"eps={eps} must be > 0")
        self.eps = float(eps)
        self.weight = Parameter(B.to_device(B.np.ones(self.dim), _float_dtype(dtype)))

    def forward(self, x: Any) -> Tensor:
        return F.rms_norm(x, self.weight, self.eps)             # [..., d] -> [..., d]

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


# --------------------------------------------------------------------------------------
# rotary embedding, KV cache, attention
# --------------------------------------------------------------------------------------

class RotaryEmbedding(Module):
    """Rotary position embedding (Su et al. 2021, RoFormer), rotate-half layout, no parameters.

    Holds ``cos`` and ``sin`` tables [max_seq_len, head_dim] (plain arrays, not
    parameters: they are not trained nor saved) with angles theta_{p,i} = p * base^(-2i/dh).
    ``rope(x, offset)`` rotates x [..., T, dh] as if its T rows sat at absolute positions
    offset, ..., offset + T - 1 (the offset is the KV-cache length during generation).
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0, *,
                 dtype: Any = B.DEFAULT_DTYPE):
        super().__init__()
        self.head_dim = _positive_int("head_dim", head_dim)
        self.max_seq_len = _positive_int("max_seq_len", max_seq_len)
        if not base > 0:
            raise ValueError(f"rope base={base} must be > 0")
        self.base = float(base)
        dtype = _float_dtype(dtype)
        self.cos, self.sin = F.rope_tables(self.max_seq_len, self.head_dim, self.base, dtype)  # [L, dh] each

    def tables(self, offset: int, T: int) -> tuple[Any, Any]:
        """cos, sin [T, dh] for the absolute positions offset .. offset + T - 1."""
        if offset < 0 or offset + T > self.max_seq_len:
            raise ValueError(f"RoPE positions {offset}..{offset + T - 1} are outside max_seq_len={self.max_seq_len}")
        return self.cos[offset:offset + T], self.sin[offset:offset + T]

    def forward(self, x: Any, offset: int = 0) -> Tensor:
        return F.rope(x, *self.tables(offset, x.shape[-2]))                          # [..., T, dh]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, base={self.base:g}"


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer (generation).

    Preallocated arrays ``k`` and ``v`` [B, H, max_len, dh]; ``length`` positions are
    filled. Keys are stored after RoPE, so cached keys never need rotating again. Used under
    ``no_grad`` only: cached arrays carry no graph.
    """

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype: Any = B.DEFAULT_DTYPE):
        shape = (_positive_int("batch", batch), _positive_int("n_heads", n_heads),
                 _positive_int("max_len", max_len), _positive_int("head_dim", head_dim))
        xp = B.xp
        self.k = xp.zeros(shape, dtype=_float_dtype(dtype))     # [B, H, max_len, dh]
        self.v = xp.zeros(shape, dtype=_float_dtype(dtype))     # [B, H, max_len, dh]
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        """Forget every cached position (the arrays are reused)."""
        self.length = 0

    def append(self, k: Any, v: Any) -> tuple[Any, Any]:
        """Store this step's k, v [B, H, T, dh]; return views of all cached k, v [B, H, length, dh]."""
        expected = self.k.shape[:2] + self.k.shape[3:]
        if tuple(k.shape[:2]) + tuple(k.shape[3:]) != expected or tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"KVCache: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit a cache of "
                             f"[B, H, *, dh] = {expected}")
        L, T = self.length, k.shape[2]
        if L + T > self.max_len:
            raise ValueError(f"KVCache full: {L} cached + {T} new positions > max_len={self.max_len}")
        self.k[:, :, L:L + T] = k                               # [B, H, T, dh] -> slots L..L+T-1
        self.v[:, :, L:L + T] = v
        self.length = L + T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def __repr__(self) -> str:
        B_, H, L, dh = self.k.shape
        return f"KVCache(batch={B_}, heads={H}, length={self.length}/{L}, head_dim={dh}, dtype={self.k.dtype})"


class Attention(Module):
    """Multi-head causal self-attention with RoPE (Vaswani et al. 2017; Su et al. 2021).

        q, k, v = x Wq, x Wk, x Wv              [B, T, d] -> [B, T, H*dh] -> [B, H, T, dh]
        q, k    = RoPE(q), RoPE(k)              at absolute positions offset .. offset+T-1
        o       = softmax(scale * q k^T + causal mask) v                    [B, H, T, dh]
        y       = concat_heads(o) Wo             [B, T, H*dh] -> [B, T, d]

    Head h uses columns h*dh .. (h+1)*dh - 1 of Wq, Wk, Wv. Parameters ``wq.weight``,
    ``wk.weight``, ``wv.weight`` [d, H*dh] and ``wo.weight`` [H*dh, d]; no biases.
    ``scale`` defaults to 1/sqrt(dh) (explicit; OpenMoE folds it into the Wq init instead,
    i.e. scale=1.0 with a rescaled Wq). Init: N(0, init_std^2), or with ``fan_in_scale=s``
    (OpenMoE, docs/openmoe-facts.md §9) std sqrt(s / d) for Wq, Wk, Wv and sqrt(s / (H dh))
    for Wo; Wq is not divided by sqrt(dh) since the logits are scaled here (the same
    logits at init as OpenMoE's unscaled logits with a Wq drawn / sqrt(dh)).

    With a ``KVCache`` (generation, under ``no_grad``), this step's k, v are appended and
    the T new queries attend over all cached positions: the result equals the matching rows
    of a full forward over the whole sequence.
    """

    def __init__(self, d_model: int, n_heads: int, *, max_seq_len: int, d_head: int | None = None,
                 rope_base: float = 10000.0, scale: float | None = None, rng: Any,
                 init_std: float = 0.02, fan_in_scale: float | None = None,
                 dtype: Any = B.DEFAULT_DTYPE):
        super().__init__()
        self.d_model = _positive_int("d_model", d_model)
        self.n_heads = _positive_int("n_heads", n_heads)
        if d_head is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads} (or set d_head)")
            d_head = self.d_model // self.n_heads
        self.d_head = _positive_int("d_head", d_head)
        if self.d_head % 2 != 0:
            raise ValueError(f"head_dim={self.d_head} is odd; RoPE needs an even head dimension")
        self.max_seq_len = _positive_int("max_seq_len", max_seq_len)
        self.scale = 1.0 / self.d_head ** 0.5 if scale is None else float(scale)
        self.dtype = _float_dtype(dtype)
        inner = self.n_heads * self.d_head
        std_in = std_out = init_std
        if fan_in_scale is not None:
            std_in, std_out = fan_in_std(fan_in_scale, self.d_model), fan_in_std(fan_in_scale, inner)
        self.wq = Linear(self.d_model, inner, rng=rng, init_std=std_in, dtype=self.dtype)
        self.wk = Linear(self.d_model, inner, rng=rng, init_std=std_in, dtype=self.dtype)
        self.wv = Linear(self.d_model, inner, rng=rng, init_std=std_in, dtype=self.dtype)
        self.wo = Linear(inner, self.d_model, rng=rng, init_std=std_out, dtype=self.dtype)
        self.rope = RotaryEmbedding(self.d_head, self.max_seq_len, rope_base, dtype=self.dtype)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KVCache for this layer (max_len defaults to max_seq_len)."""
        max_len = self.max_seq_len if max_len is None else max_len
        return KVCache(batch, self.n_heads, max_len, self.d_head, self.dtype)

    def forward(self, x: Any, cache: KVCache | None = None) -> Tensor:
        if len(x.shape) != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Attention: input shape {tuple(x.shape)} is not [B, T, d_model={self.d_model}]")
        batch, T, _ = x.shape
        offset = 0
        if cache is not None:
            if is_grad_enabled():
                raise RuntimeError("Attention: a KV cache is for generation only; call it under tinymoe.no_grad()")
            if cache.k.shape[0] != batch:
                raise ValueError(f"Attention: batch {batch} != KV cache batch {cache.k.shape[0]}")
            offset = cache.length
        # q, k, v = split_heads(x Wq), split_heads(x Wk), split_heads(x Wv), q and k rotated
        # by the positions offset..offset+T-1: one fused node (F.qkv_rope; its reference
        # F.qkv_rope_reference is those three lines written out)
        cos, sin = self.rope.tables(offset, T)                  # [T, dh] each
        q, k, v = F.qkv_rope(x, self.wq.weight, self.wk.weight, self.wv.weight, cos, sin,
                             self.n_heads)                      # [B, T, d] -> 3 x [B, H, T, dh]
        if cache is not None:
            k_all, v_all = cache.append(k.data, v.data)         # [B, H, offset+T, dh] each
            k, v = Tensor(k_all), Tensor(v_all)
        o = F.causal_attention(q, k, v, scale=self.scale)       # [B, H, T, dh]; query i sees keys <= offset+i
        o = o.transpose(0, 2, 1, 3).reshape(batch, T, self.n_heads * self.d_head)  # [B, T, H*dh]
        return self.wo(o)                                       # [B, T, H*dh] -> [B, T, d]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, heads={self.n_heads}x{self.d_head}, scale={self.scale:.4g}"


# --------------------------------------------------------------------------------------
# feed-forward
# --------------------------------------------------------------------------------------

class GatedTriple(Function):
    """OpenMoE's FFN gate (flaxformer ``MlpBlock`` with activations ("swiglu", "linear"),
    docs/openmoe-facts.md §4): u = x W0 [..., 2f] is split into halves a | b, v = x W1:

        y  = a * silu(b) * v,    silu(b) = b s,  s = sigmoid(b)           [..., f]
        da = g * silu(b) * v
        db = g * a * v * s (1 + b (1 - s))                                (d silu / db)
        dv = g * a * silu(b)
    du = [da | db]. The first half is linear, the second gets the activation (flaxformer
    ``dense.py:173-185``: ``A * swish(B)``). Saves u and v; the sigmoid is recomputed.
    """

    @staticmethod
    def forward(ctx: Context, u: Any, v: Any) -> Any:
        f = v.shape[-1]
        if tuple(u.shape) != tuple(v.shape[:-1]) + (2 * f,):
            raise ValueError(f"gated_triple: u {tuple(u.shape)} must be v {tuple(v.shape)} "
                             "with a last dim twice as wide")
        xp = B.array_module(u)
        a, b = u[..., :f], u[..., f:]                           # [..., f] views
        y = xp.negative(b)                                      # -b, a fresh buffer
        with B.np.errstate(over="ignore"):                      # exp(-b) = inf -> silu = -0
            xp.exp(y, out=y)
        y += 1
        xp.divide(b, y, out=y)                                  # silu(b) = b / (1 + exp(-b))
        y *= a
        y *= v                                                  # a silu(b) v
        ctx.save_for_backward(u, v)
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        u, v = ctx.saved
        xp = B.array_module(g)
        f = v.shape[-1]
        a, b = u[..., :f], u[..., f:]                           # [..., f] views
        with B.np.errstate(over="ignore"):
            s = 1.0 / (1.0 + xp.exp(-b))                        # sigmoid(b)
        silu_b = b * s
        gu = gv = None
        if ctx.needs_input_grad[0]:
            gu = xp.empty(u.shape, dtype=u.dtype)               # [..., 2f]
            xp.multiply(g * v, silu_b, out=gu[..., :f])         # da
            gu[..., f:] = g * a * v * s * (1 + b * (1 - s))     # db
        if ctx.needs_input_grad[1]:
            gv = g * a * silu_b                                 # dv
        return gu, gv


def gated_triple(u: Any, v: Any) -> Tensor:
    """a * silu(b) * v for u = [a | b] [..., 2f] and v [..., f] -> [..., f] (see ``GatedTriple``)."""
    return GatedTriple.apply(u, v)


def gated_triple_reference(u: Any, v: Any) -> Any:
    """Reference for :class:`GatedTriple` in plain NumPy: ``a * b * sigmoid(b) * v``."""
    f = v.shape[-1]
    a, b = u[..., :f], u[..., f:]
    return a * b / (1.0 + B.np.exp(-b)) * v


class FeedForward(Module):
    """The position-wise FFN, x [..., d] -> [..., f] -> [..., d], no biases, in one of two forms:

    ``kind="swiglu"`` (Shazeer 2020): y = (silu(x W_gate) * (x W_up)) W_down; parameters
        ``w_gate.weight``, ``w_up.weight`` [d, f] and ``w_down.weight`` [f, d]: 3 d f weights.
    ``kind="openmoe"`` (OpenMoE's original code, docs/openmoe-facts.md §4):
        y = Wo [(x A) * silu(x B) * (x W1)] with [A | B] = W0; parameters ``wi_0.weight``
        [d, 2f], ``wi_1.weight`` [d, f], ``wo.weight`` [f, d]: 4 d f weights. (The paper
        calls it SwiGLU; it is a gated triple product.)

    Init: N(0, init_std^2), or with ``fan_in_scale=s`` (OpenMoE's dense and shared FFNs)
    a normal truncated at 2 std with std sqrt(s / fan_in).
    """

    def __init__(self, d_model: int, d_ff: int, *, rng: Any, init_std: float = 0.02,
                 kind: str = "swiglu", fan_in_scale: float | None = None,
                 dtype: Any = B.DEFAULT_DTYPE):
        super().__init__()
        self.d_model = _positive_int("d_model", d_model)
        self.d_ff = _positive_int("d_ff", d_ff)
        if kind not in FFN_KINDS:
            raise ValueError(f"ffn kind {kind!r} is not one of {', '.join(FFN_KINDS)}")
        self.kind = kind
        d, f = self.d_model, self.d_ff
        trunc = fan_in_scale is not None

        def linear(n_in: int, n_out: int) -> Linear:
            std = fan_in_std(fan_in_scale, n_in) if trunc else init_std
            return Linear(n_in, n_out, rng=rng, init_std=std, truncated=trunc, dtype=dtype)

        if kind == "swiglu":
            self.w_gate, self.w_up, self.w_down = linear(d, f), linear(d, f), linear(f, d)
        else:
            self.wi_0, self.wi_1, self.wo = linear(d, 2 * f), linear(d, f), linear(f, d)

    def forward(self, x: Any) -> Tensor:
        if self.kind == "swiglu":
            h = F.swiglu(self.w_gate(x), self.w_up(x))          # [..., d] -> [..., f]
            return self.w_down(h)                               # [..., f] -> [..., d]
        h = gated_triple(self.wi_0(x), self.wi_1(x))            # [..., 2f], [..., f] -> [..., f]
        return self.wo(h)                                       # [..., f] -> [..., d]

    def extra_repr(self) -> str:
        kind = "" if self.kind == "swiglu" else f", kind={self.kind}"
        return f"d_model={self.d_model}, d_ff={self.d_ff}{kind}"
