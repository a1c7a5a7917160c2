"""Fused hot-path ops (rms_norm, swiglu, gated_triple, rope, causal_attention) and the layers
built on them (Linear, Embedding, RMSNorm, RotaryEmbedding, Attention + KVCache, FeedForward
in both forms) against the
torch twins of tests/oracle/torch_layers.py: forward and every input and parameter gradient
in float64 (rel <= 1e-9 ops, 1e-8 layers) and float32 (tests/oracle/compare.py f32_tol: from the
reduction length and the number of chained ops); finite differences for
causal_attention and rms_norm; KV-cache decoding equal to the full forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tinymoe
from tinymoe import backend as B
from tinymoe import functional as F
from tinymoe import nn
from tinymoe.nn import layers as L
from tinymoe.config import get_preset, parameter_shapes
from tests.oracle import torch_layers as TL
from tests.oracle.compare import assert_close, check_against_torch, default_tol

DTYPES = [np.float64, np.float32]
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}


def rnd(*shape, seed=0, mean=0.3, std=1.0):
    """Non-symmetric, non-zero test data."""
    return np.random.default_rng(seed).normal(mean, std, size=shape)


# ---- fused ops vs torch ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 8), (1, 1, 4)])
def test_rms_norm_op(backend, dtype, shape):
    x, w = rnd(*shape, seed=1), rnd(shape[-1], seed=2, mean=0.3, std=0.5)
    check_against_torch(lambda a, b: F.rms_norm(a, b, 1e-6), lambda a, b: TL.rms_norm(a, b, 1e-6),
                        [x, w], dtype=dtype, name="rms_norm")


def test_rms_norm_tiny_rows_use_eps():
    """A zero row gives zeros (not NaN): eps keeps the rsqrt finite."""
    x = tinymoe.Tensor(np.zeros((2, 4)), requires_grad=True)
    w = tinymoe.Tensor(np.ones(4), requires_grad=True)
    y = F.rms_norm(x, w, 1e-6)
    y.backward(np.ones((2, 4)))
    assert np.all(y.numpy() == 0) and np.all(np.isfinite(x.grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 6)])
def test_swiglu_op(backend, dtype, shape):
    gate = rnd(*shape, seed=3, std=2.0)
    gate.flat[0], gate.flat[1] = 40.0, -40.0                   # saturated sigmoid on both sides
    up = rnd(*shape, seed=4)
    check_against_torch(F.swiglu, TL.swiglu, [gate, up], dtype=dtype, name="swiglu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 6)])
def test_gated_triple_op(backend, dtype, shape):
    """OpenMoE's a * silu(b) * v, u = [a | b]: forward and both input gradients vs torch."""
    u = rnd(*shape[:-1], 2 * shape[-1], seed=3, std=2.0)
    f = shape[-1]
    u[..., f], u[..., f + 1] = 40.0, -40.0                      # saturated sigmoid in the b half
    v = rnd(*shape, seed=4)
    check_against_torch(L.gated_triple, TL.gated_triple, [u, v], dtype=dtype, name="gated_triple")


def test_gated_triple_activation_on_the_second_half():
    """flaxformer's 'swiglu' activation is A * swish(B): the second half gets the activation."""
    a, b, v = np.array([[2.0]]), np.array([[-3.0]]), np.array([[0.5]])
    y = L.gated_triple(tinymoe.Tensor(np.concatenate([a, b], -1)), tinymoe.Tensor(v)).numpy()
    np.testing.assert_allclose(y, 2.0 * (-3.0 / (1 + np.exp(3.0))) * 0.5, rtol=1e-15)
    with pytest.raises(ValueError, match="twice as wide"):
        L.gated_triple(tinymoe.Tensor(np.ones((2, 5))), tinymoe.Tensor(np.ones((2, 3))))


def test_swiglu_no_overflow_warning():
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # underflow to 0 is fine
        g = tinymoe.Tensor(np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0]), requires_grad=True)
        u = tinymoe.Tensor(np.full(5, 0.7), requires_grad=True)
        F.swiglu(g, u).sum().backward()
    assert np.all(np.isfinite(g.grad)) and np.all(np.isfinite(u.grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 5])
def test_rope_op(backend, dtype, offset):
    Bsz, H, T, dh = 2, 3, 4, 8
    cos, sin = F.rope_tables(16, dh, 10000.0, dtype)
    tcos, tsin = TL.rope_tables(16, dh, 10000.0, TORCH_DTYPE[dtype])
    tol = default_tol(dtype, 16)        # the twin's float32 angle p * f rounds ~ p u, p < 16
    assert_close("rope cos table", cos, tcos, tol)
    assert_close("rope sin table", sin, tsin, tol)
    sl = slice(offset, offset + T)
    check_against_torch(lambda x: F.rope(x, cos[sl], sin[sl]), lambda x: TL.rope(x, tcos[sl], tsin[sl]),
                        [rnd(Bsz, H, T, dh, seed=5)], dtype=dtype, name=f"rope offset {offset}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 3])
def test_qkv_rope_op(backend, dtype, offset):
    """The fused input side of attention (one GEMM, heads, RoPE on q and k) against torch's
    three products, head split and rotate-half RoPE: forward and the gradients of x, Wq,
    Wk, Wv; and against its NumPy reference."""
    Bsz, T, H, dh = 2, 5, 3, 4
    d = 7
    cos, sin = F.rope_tables(16, dh, 10000.0, dtype)
    tcos, tsin = TL.rope_tables(16, dh, 10000.0, TORCH_DTYPE[dtype])
    sl = slice(offset, offset + T)

    def theirs(x, wq, wk, wv):
        heads = lambda t: t.reshape(Bsz, T, H, dh).transpose(1, 2)   # noqa: E731
        q, k, v = heads(x @ wq), heads(x @ wk), heads(x @ wv)
        return torch.stack([TL.rope(q, tcos[sl], tsin[sl]), TL.rope(k, tcos[sl], tsin[sl]), v])

    inputs = [rnd(Bsz, T, d, seed=1), rnd(d, H * dh, seed=2), rnd(d, H * dh, seed=3),
              rnd(d, H * dh, seed=4)]
    check_against_torch(lambda x, wq, wk, wv: F.stack(F.qkv_rope(x, wq, wk, wv, cos[sl], sin[sl], H)),
                        theirs, inputs, dtype=dtype, name=f"qkv_rope offset {offset}", depth=2)
    if dtype == np.float64:
        ref = F.qkv_rope_reference(*inputs, B.to_numpy(cos[sl]), B.to_numpy(sin[sl]), H)
        ours = F.qkv_rope(*[tinymoe.Tensor(B.to_device(a)) for a in inputs], cos[sl], sin[sl], H)
        for name, a, b in zip("qkv", ours, ref):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-13, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_few_rows_path_matches_the_main_path(monkeypatch, dtype):
    """A decoding step (one row, no gradient) takes QKVRoPE._few_rows; it gives the values
    of the main path (forced by _FEW_ROWS = 0) and of the reference."""
    from tinymoe import functional_fused
    H, dh, d = 3, 4, 7
    cos, sin = F.rope_tables(16, dh, 10000.0, dtype)
    x, wq, wk, wv = rnd(1, 1, d, seed=1), rnd(d, H * dh, seed=2), rnd(d, H * dh, seed=3), rnd(d, H * dh, seed=4)
    args = [tinymoe.Tensor(B.to_device(a.astype(dtype))) for a in (x, wq, wk, wv)]
    calls = []
    real = functional_fused.QKVRoPE._few_rows
    monkeypatch.setattr(functional_fused.QKVRoPE, "_few_rows",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    with tinymoe.no_grad():
        few = [t.numpy() for t in F.qkv_rope(*args, cos[5:6], sin[5:6], H)]
        monkeypatch.setattr(functional_fused, "_FEW_ROWS", 0)
        main = [t.numpy() for t in F.qkv_rope(*args, cos[5:6], sin[5:6], H)]
    assert calls == [1]
    ref = F.qkv_rope_reference(x, wq, wk, wv, B.to_numpy(cos[5:6]).astype(np.float64),
                               B.to_numpy(sin[5:6]).astype(np.float64), H)
    # each output is a 7-term dot product of O(1) values, then at most one rotation (two
    # products and a sum): under ~10 eps * 7 * max|x w| ~ 1e-5 * eps/1e-7 (4e-6 in float32)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for name, a, b, r in zip("qkv", few, main, ref):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_allclose(a, r, rtol=tol, atol=tol, err_msg=name)


def test_qkv_rope_unused_outputs_get_no_gradient():
    """Only v used: dWq = dWk = 0 and dx = dv Wv^T (the zeros the autograd passes for the
    unused outputs flow through the rotation as zeros)."""
    x, wq, wk, wv = (tinymoe.Tensor(rnd(*s, seed=i), requires_grad=True)
                     for i, s in enumerate([(2, 3, 4), (4, 4), (4, 4), (4, 4)]))
    cos, sin = F.rope_tables(3, 2, 10000.0, np.float64)
    _, _, v = F.qkv_rope(x, wq, wk, wv, cos, sin, 2)
    v.sum().backward()
    assert not wq.grad.any() and not wk.grad.any()
    np.testing.assert_allclose(x.grad, np.ones((2, 3, 4)) @ wv.data.T, rtol=1e-13)


def test_rope_is_a_rotation():
    """Position 0 is the identity; every (x1_i, x2_i) pair keeps its length; a dot product of
    a rotated q and k depends only on the position difference."""
    dh = 6
    cos, sin = F.rope_tables(12, dh, 10000.0, np.float64)
    x = rnd(1, 1, 12, dh, seed=6)
    y = F.rope(x, cos, sin).numpy()
    np.testing.assert_allclose(y[..., 0, :], x[..., 0, :], rtol=0, atol=1e-15)
    pair_norm = lambda a: a[..., :3] ** 2 + a[..., 3:] ** 2   # noqa: E731
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-12)
    q, k = rnd(dh, seed=7), rnd(dh, seed=8)
    at = lambda v, p: F.rope(v[None, :], cos[p:p + 1], sin[p:p + 1]).numpy()[0]   # noqa: E731
    np.testing.assert_allclose(at(q, 7) @ at(k, 4), at(q, 3) @ at(k, 0), rtol=1e-12)


def test_rope_errors():
    cos, sin = F.rope_tables(8, 4, dtype=np.float64)
    with pytest.raises(ValueError, match="do not match"):
        F.rope(tinymoe.Tensor(np.ones((2, 5, 4))), cos[:4], sin[:4])
    with pytest.raises(TypeError, match="rope: dtype mismatch float32 vs float64"):
        F.rope(tinymoe.Tensor(np.ones((2, 4, 4), np.float32)), cos[:4], sin[:4])
    with pytest.raises(ValueError, match="odd"):
        F.rope_tables(8, 5)


ATTN_SHAPES = [  # (B, H, T, S, dh)
    (2, 3, 5, 5, 4),      # T == S (training)
    (2, 2, 3, 7, 4),      # S > T: 3 new queries over a cache of 4 + 3 keys
    (1, 2, 1, 6, 8),      # T == 1: one decoding step
    (1, 1, 1, 1, 2),      # a single position
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Bsz,H,T,S,dh", ATTN_SHAPES)
def test_causal_attention_op(backend, dtype, Bsz, H, T, S, dh):
    q, k, v = rnd(Bsz, H, T, dh, seed=10), rnd(Bsz, H, S, dh, seed=11), rnd(Bsz, H, S, dh, seed=12, mean=-0.2)
    check_against_torch(F.causal_attention, TL.causal_attention, [q, k, v], dtype=dtype,
                        name=f"attention T={T} S={S}", depth=3)   # scores, softmax, weighted sum


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,max_pass", [(1.0, False), (8.0, True)])
def test_causal_attention_subtracts_the_row_max_only_when_scores_can_be_large(monkeypatch, dtype, size, max_pass):
    """Scores bounded by Cauchy-Schwarz under the exp limit skip the max pass (checked
    against torch forward and backward); q, k 8x larger (a bound past float32's limit of
    about 80 here; 24x in float64, whose limit is about 700) take it, and the output stays
    finite and equal to torch's (the forward only: a saturated softmax's gradients are
    differences of nearly equal dot products, beyond the oracle's relative tolerance on
    both paths alike)."""
    from tinymoe import functional_fused
    monkeypatch.setattr(functional_fused, "_BOUND_MIN_SCORES", 0)   # these 6 x 6 scores too
    calls = []
    real = functional_fused._rowmax
    monkeypatch.setattr(functional_fused, "_rowmax", lambda xp, a: calls.append(1) or real(xp, a))
    q, k, v = rnd(2, 2, 6, 4, seed=20) * size, rnd(2, 2, 6, 4, seed=21) * size, rnd(2, 2, 6, 4, seed=22)
    if dtype == np.float64 and max_pass:
        q, k = q * 3, k * 3
    if not max_pass:
        check_against_torch(F.causal_attention, TL.causal_attention, [q, k, v], dtype=dtype,
                            name="attention, no max pass", depth=3)
    else:
        ours = F.causal_attention(*[tinymoe.Tensor(a.astype(dtype)) for a in (q, k, v)]).numpy()
        theirs = TL.causal_attention(*[torch.tensor(a.astype(dtype)) for a in (q, k, v)])
        assert np.isfinite(ours).all()
        assert_close("attention with the max pass", ours, theirs, default_tol(dtype, 6 * 4, 3))
    assert bool(calls) == max_pass


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_attention_without_the_max_pass_at_its_limit(monkeypatch, dtype):
    """Every score just under the limit (q = k = one vector, so Cauchy-Schwarz is tight):
    no max pass, and still a finite softmax equal to torch's (uniform over the keys each
    query sees). The limit, worked out: float32 over 6 keys min(ln max, -ln tiny) - ln 6 - 2
    = 87.34 - 1.79 - 2 = 83.55."""
    from tinymoe import functional_fused
    monkeypatch.setattr(functional_fused, "_BOUND_MIN_SCORES", 0)   # these 6 x 6 scores too
    limit = functional_fused._exp_limit(np, dtype, 6)
    if dtype == np.float32:
        assert abs(limit - 83.55) < 0.01
    calls = []
    real = functional_fused._rowmax
    monkeypatch.setattr(functional_fused, "_rowmax", lambda xp, a: calls.append(1) or real(xp, a))
    dh = 4
    c = np.sqrt((limit - 0.5) / (dh * 0.5))                   # scale 1/sqrt(4) = 0.5: score = c^2 dh / 2
    q = np.full((1, 1, 6, dh), c)
    v = rnd(1, 1, 6, dh, seed=23)
    ours = F.causal_attention(*[tinymoe.Tensor(a.astype(dtype)) for a in (q, q, v)]).numpy()
    assert not calls and np.isfinite(ours).all()
    uniform = np.cumsum(v, axis=2) / np.arange(1, 7)[:, None]  # query i: the mean of v_0..v_i
    # equal scores give p = 1/(i+1) to ~3 eps, and out sums at most 6 terms p v: error under
    # ~10 eps max|v| (6e-7 in float32, 2e-15 in float64), well inside these tolerances
    np.testing.assert_allclose(ours, uniform, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_attention_scale_and_mask_flag(causal):
    q, k, v = rnd(2, 2, 4, 6, seed=13), rnd(2, 2, 4, 6, seed=14), rnd(2, 2, 4, 6, seed=15)
    check_against_torch(lambda a, b, c: F.causal_attention(a, b, c, scale=0.7, causal=causal),
                        lambda a, b, c: TL.causal_attention(a, b, c, scale=0.7, causal=causal),
                        [q, k, v], name=f"attention scale 0.7 causal={causal}")


def test_causal_attention_matches_torch_sdpa():
    """An independent oracle for T == S: torch's own scaled_dot_product_attention."""
    q, k, v = (rnd(2, 3, 6, 4, seed=s) for s in (16, 17, 18))
    ours = F.causal_attention(q, k, v).numpy()
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(q), torch.tensor(k), torch.tensor(v), is_causal=True)
    assert_close("attention vs sdpa", ours, ref, 1e-9)


def test_causal_attention_ignores_the_future():
    """Changing key/value j changes no output row i with j > i + (S - T)."""
    T, S = 4, 6
    q, k, v = rnd(1, 1, T, 4, seed=19), rnd(1, 1, S, 4, seed=20), rnd(1, 1, S, 4, seed=21)
    base = F.causal_attention(q, k, v).numpy()
    k2, v2 = k.copy(), v.copy()
    k2[..., -1, :] += 5.0
    v2[..., -1, :] -= 3.0                                      # key 5 is visible to query 3 only
    out = F.causal_attention(q, k2, v2).numpy()
    np.testing.assert_array_equal(out[..., :3, :], base[..., :3, :])
    assert np.abs(out[..., 3, :] - base[..., 3, :]).max() > 1e-3


def test_causal_attention_errors():
    x = tinymoe.Tensor(np.ones((1, 1, 4, 2)))
    with pytest.raises(ValueError, match="fewer keys"):
        F.causal_attention(x, x[:, :, :2], x[:, :, :2])
    with pytest.raises(ValueError, match="do not fit"):
        F.causal_attention(x, tinymoe.Tensor(np.ones((1, 2, 4, 2))), x)


# ---- finite differences (float64) ------------------------------------------------------------

def _finite_difference_check(fn, arrays, seed=0, eps=1e-6, rtol=1e-7):
    """Analytic gradients of L = sum(fn(*x) * R) against central differences, every coordinate."""
    R = np.random.default_rng(seed).normal(size=fn(*arrays).shape)
    leaves = [tinymoe.Tensor(a.copy(), requires_grad=True) for a in arrays]
    fn(*leaves).backward(R)
    loss = lambda: float((fn(*arrays).numpy() * R).sum())   # noqa: E731
    for i, a in enumerate(arrays):
        num = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            up = loss()
            a[idx] = old - eps
            down = loss()
            a[idx] = old
            num[idx] = (up - down) / (2 * eps)
        assert_close(f"finite differences, input {i}", leaves[i].grad, num, rtol, atol=1e-9)


def test_causal_attention_finite_differences():
    q, k, v = rnd(1, 2, 3, 4, seed=22), rnd(1, 2, 5, 4, seed=23), rnd(1, 2, 5, 4, seed=24)
    _finite_difference_check(lambda a, b, c: F.causal_attention(a, b, c), [q, k, v])


def test_rms_norm_finite_differences():
    x, w = rnd(3, 5, seed=25), rnd(5, seed=26, std=0.5)
    _finite_difference_check(lambda a, b: F.rms_norm(a, b, 1e-6), [x, w])


# ---- second oracle: the plain NumPy references beside the kernels ----------------------------
# Each kernel's forward against its ``*_reference`` (tinymoe/functional_fused.py), computed
# in float64 on the same inputs. Tolerances come from the computation, not from a run:
# with eps the machine epsilon of the kernel's dtype (2 u), a sum of n terms carries a
# relative error of at most ~n u (Higham, Accuracy and Stability, eq. 3.4), and each further
# elementwise op one u; eps instead of u leaves room for the reference's own float64 error.
# Shapes are large enough that the kernels cut their rows into several blocks.

EPS = {np.float64: float(np.finfo(np.float64).eps), np.float32: float(np.finfo(np.float32).eps)}


def _kernel_and_reference(kernel, reference, arrays, dtype):
    """(kernel forward on ``arrays`` cast to dtype, reference on the same values in float64)."""
    cast = [np.asarray(a, dtype=dtype) for a in arrays]
    ours = kernel(*[tinymoe.Tensor(B.to_device(a)) for a in cast]).numpy()
    return ours, reference(*[a.astype(np.float64) for a in cast])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(backend, dtype):
    """y = x w / rms: mean over d squares (n = d terms, all >= 0: well conditioned), then
    sqrt, divide, multiply: |dy| <= (d + 8) eps |y|."""
    d = 512
    x, w = rnd(300, d, seed=40), rnd(d, seed=41, std=0.5)
    ours, ref = _kernel_and_reference(lambda a, b: F.rms_norm(a, b, 1e-6),
                                      lambda a, b: F.rms_norm_reference(a, b, 1e-6), [x, w], dtype)
    np.testing.assert_allclose(ours, ref, rtol=(d + 8) * EPS[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(backend, dtype):
    """Elementwise: exp, add, divide, two multiplies, a few eps each (silu's condition
    number |a s'(a) / s(a)| stays below 1.3 on the range used): |dy| <= 8 eps |y|."""
    gate, up = rnd(200, 700, seed=42, std=3.0), rnd(200, 700, seed=43)
    ours, ref = _kernel_and_reference(F.swiglu, F.swiglu_reference, [gate, up], dtype)
    np.testing.assert_allclose(ours, ref, rtol=8 * EPS[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_triple_matches_reference(backend, dtype):
    """Elementwise: exp, add, divide and three multiplies, a few eps each (silu's condition
    number stays below 1.3 on the range used, the products are condition 1): |dy| <= 10 eps |y|."""
    u, v = rnd(200, 1400, seed=44, std=3.0), rnd(200, 700, seed=45)
    ours, ref = _kernel_and_reference(L.gated_triple, L.gated_triple_reference, [u, v], dtype)
    np.testing.assert_allclose(ours, ref, rtol=10 * EPS[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_reference(backend, dtype):
    """y1 = x1 cos - x2 sin: two products and a difference, which may cancel, so the bound is
    absolute: |dy| <= 4 eps (|x1 cos| + |x2 sin|) <= 8 eps max|x| (the tables are the same
    rounded values on both sides)."""
    Bsz, H, T, dh = 4, 8, 128, 64
    cos, sin = (B.to_numpy(t) for t in F.rope_tables(T, dh, 10000.0, dtype))
    x = rnd(Bsz, H, T, dh, seed=44)
    ours, ref = _kernel_and_reference(lambda a: F.rope(a, cos, sin),
                                      lambda a: F.rope_reference(a, cos.astype(np.float64), sin.astype(np.float64)),
                                      [x], dtype)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=8 * EPS[dtype] * np.abs(x).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,S", [(96, 96), (5, 101)])
def test_causal_attention_matches_reference(backend, dtype, T, S):
    """A score is a dot product of dh terms: |ds| <= dh eps max_ij sum_c |q_ic k_jc| scale.
    Softmax turns a score error ds into a relative error <= 2 ds of each p (plus ~S eps
    for its sum), and out = sum_j p_j v_j adds S eps more: |dout| <= (2 |ds| + (S + 8) eps)
    max|v|."""
    Bsz, H, dh = 2, 4, 32
    q, k, v = rnd(Bsz, H, T, dh, seed=45), rnd(Bsz, H, S, dh, seed=46), rnd(Bsz, H, S, dh, seed=47, mean=-0.2)
    ours, ref = _kernel_and_reference(F.causal_attention, F.causal_attention_reference, [q, k, v], dtype)
    ds = dh * EPS[dtype] * (np.abs(q) @ np.swapaxes(np.abs(k), -1, -2)).max() / np.sqrt(dh)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=(2 * ds + (S + 8) * EPS[dtype]) * np.abs(v).max())


# ---- layers vs torch twins --------------------------------------------------------------------

def _load_random(ours, theirs, seed, std=0.5, mean=0.3, scale_by_fan_in=False):
    """Draw non-trivial weights (N(mean, std), optionally / sqrt(fan_in)), load them into both."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, p in ours.named_parameters():
        a = rng.normal(mean, std, size=p.shape)
        if scale_by_fan_in and len(p.shape) == 2:
            a /= np.sqrt(p.shape[0])
        state[name] = a
    ours.load_state_dict(state)
    tdtype = next(theirs.parameters()).dtype
    theirs.load_state_dict({k: torch.tensor(v, dtype=tdtype) for k, v in state.items()})


def _compare_module(ours, theirs, x, dtype, name, tol=None, depth=1):
    """Forward, input grad (float inputs) and every parameter grad, under one upstream grad.

    Tolerance: 1e-8 in float64; in float32 ``default_tol`` with n = the longest reduction
    (a weight gradient sums over the B*T rows, a matmul over a weight dimension) and
    ``depth`` chained matmul-like stages of the module. A small absolute tolerance covers
    gradients that are exactly zero in torch and rounding noise here (T == 1: softmax over
    one key, so dq = dk = 0 up to ~1e-17 in float64; in float32 a cancellation of O(1)
    terms, so the relative tolerance times 1)."""
    rows = x.size // x.shape[-1] if x.dtype.kind == "f" else x.size
    n = max([rows] + [max(p.shape) for _, p in ours.named_parameters()])
    if tol is None:
        tol = 1e-8 if dtype == np.float64 else default_tol(dtype, n, depth)
    atol = 1e-13 if dtype == np.float64 else tol
    is_float = x.dtype.kind == "f"
    xo = tinymoe.Tensor(B.to_device(x), requires_grad=True) if is_float else B.to_device(x)
    xt = torch.tensor(x, requires_grad=is_float)
    yo, yt = ours(xo), theirs(xt)
    assert yo.dtype == dtype, f"{name}: output dtype {yo.dtype} != {np.dtype(dtype)}"
    assert_close(f"{name} forward", yo, yt, tol)
    R = np.random.default_rng(99).normal(size=yt.shape).astype(dtype)
    yo.backward(B.to_device(R))
    yt.backward(torch.tensor(R))
    if is_float:
        assert_close(f"{name} input grad", xo.grad, xt.grad, tol, atol)
    tgrads = {k: p.grad for k, p in theirs.named_parameters()}
    for pname, p in ours.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert p.grad.dtype == dtype
        assert_close(f"{name} grad {pname}", p.grad, tgrads[pname], tol, atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(backend, dtype, bias):
    ours = nn.Linear(6, 5, rng=B.default_rng(0), bias=bias, dtype=dtype)
    assert ours.weight.shape == (6, 5)
    assert [n for n, _ in ours.named_parameters()] == (["weight", "bias"] if bias else ["weight"])
    theirs = TL.TorchLinear(6, 5, bias=bias, dtype=TORCH_DTYPE[dtype])
    _load_random(ours, theirs, seed=30)
    _compare_module(ours, theirs, rnd(2, 3, 6, seed=31).astype(dtype), dtype, "linear")


def test_linear_init_and_errors():
    a = nn.Linear(64, 32, rng=B.default_rng(1), init_std=0.02)
    b = nn.Linear(64, 32, rng=B.default_rng(1), init_std=0.02, dtype=np.float64)
    w = a.weight.numpy()
    assert w.dtype == np.float32 and abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    np.testing.assert_array_equal(w, b.weight.numpy().astype(np.float32))   # same draws, rounded
    assert not np.array_equal(w, nn.Linear(64, 32, rng=B.default_rng(2)).weight.numpy())
    with pytest.raises(ValueError, match="input last dim 5 != in_features 64"):
        a(tinymoe.Tensor(np.ones((2, 5), np.float32)))
    with pytest.raises(TypeError, match="rng must be a NumPy Generator"):
        nn.Linear(2, 2, rng=0)
    with pytest.raises(ValueError, match="out_features=0"):
        nn.Linear(2, 0, rng=B.default_rng(0))


class _TorchEmbedding(torch.nn.Module):
    def __init__(self, V, d, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(V, d, dtype=dtype))

    def forward(self, ids):
        return torch.nn.functional.embedding(ids, self.weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(backend, dtype):
    ours = nn.Embedding(11, 6, rng=B.default_rng(0), dtype=dtype)
    theirs = _TorchEmbedding(11, 6, TORCH_DTYPE[dtype])
    _load_random(ours, theirs, seed=32)
    ids = np.array([[3, 0, 3, 10], [7, 3, 1, 1]])              # repeats: grads must add up
    _compare_module(ours, theirs, ids, dtype, "embedding")


def test_embedding_accepts_lists_and_rejects_bad_ids():
    emb = nn.Embedding(5, 3, rng=B.default_rng(0))
    np.testing.assert_array_equal(emb([[4, 0]]).numpy(), emb.weight.numpy()[[[4, 0]]])
    with pytest.raises(IndexError, match="token id 5 out of range"):
        emb(np.array([[1, 5]]))
    with pytest.raises(TypeError, match="ids must be integers"):
        emb(np.array([[1.0]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_layer(backend, dtype):
    ours = nn.RMSNorm(8, eps=1e-6, dtype=dtype)
    np.testing.assert_array_equal(ours.weight.numpy(), np.ones(8))
    theirs = TL.TorchRMSNorm(8, eps=1e-6, dtype=TORCH_DTYPE[dtype])
    _load_random(ours, theirs, seed=33)
    _compare_module(ours, theirs, rnd(2, 5, 8, seed=34).astype(dtype), dtype, "rmsnorm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_feed_forward(backend, dtype):
    ours = nn.FeedForward(8, 12, rng=B.default_rng(0), dtype=dtype)
    theirs = TL.TorchFeedForward(8, 12, dtype=TORCH_DTYPE[dtype])
    _load_random(ours, theirs, seed=35, scale_by_fan_in=True)
    _compare_module(ours, theirs, rnd(2, 5, 8, seed=36).astype(dtype), dtype, "ffn", depth=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_feed_forward_openmoe(backend, dtype):
    ours = nn.FeedForward(8, 12, rng=B.default_rng(0), kind="openmoe", dtype=dtype)
    assert [n for n, _ in ours.named_parameters()] == ["wi_0.weight", "wi_1.weight", "wo.weight"]
    assert ours.wi_0.weight.shape == (8, 24) and ours.wi_1.weight.shape == (8, 12)
    theirs = TL.TorchOpenMoEFeedForward(8, 12, dtype=TORCH_DTYPE[dtype])
    _load_random(ours, theirs, seed=37, scale_by_fan_in=True)
    _compare_module(ours, theirs, rnd(2, 5, 8, seed=38).astype(dtype), dtype, "openmoe ffn", depth=3)
    with pytest.raises(ValueError, match="ffn kind 'geglu' is not one of swiglu, openmoe"):
        nn.FeedForward(8, 12, rng=B.default_rng(0), kind="geglu")


def test_truncated_normal_and_fan_in_init():
    """OpenMoE's init (docs/openmoe-facts.md §9): variance scaling 0.1 over fan-in; for the
    dense FFN a normal truncated at 2 std whose std *after* truncation is sqrt(0.1/fan_in)."""
    from tinymoe.nn.layers import TRUNCATED_NORMAL_STD, truncated_normal_parameter
    # the std of N(0, 1) restricted to [-2, 2], by numerical integration of z^2 phi(z)
    z = np.linspace(-2, 2, 400_001)
    dens = np.exp(-z * z / 2)
    assert abs(TRUNCATED_NORMAL_STD - np.sqrt(np.trapezoid(z * z * dens, z) / np.trapezoid(dens, z))) < 1e-9
    w = truncated_normal_parameter(B.default_rng(3), (400, 500), 0.05, np.float64).numpy()
    assert np.abs(w).max() <= 2 * 0.05 / TRUNCATED_NORMAL_STD
    assert abs(w.std() / 0.05 - 1) < 0.01                       # 2e5 draws: sampling error ~0.2%
    ffn = nn.FeedForward(256, 512, rng=B.default_rng(4), kind="openmoe", fan_in_scale=0.1)
    for name, fan_in in (("wi_0", 256), ("wi_1", 256), ("wo", 512)):
        a = getattr(ffn, name).weight.numpy()
        assert abs(a.std() / np.sqrt(0.1 / fan_in) - 1) < 0.02, name
        assert np.abs(a).max() <= 2 * np.sqrt(0.1 / fan_in) / TRUNCATED_NORMAL_STD * (1 + 1e-6)
    attn = nn.Attention(256, 4, d_head=32, max_seq_len=8, rng=B.default_rng(5), fan_in_scale=0.1)
    for name, fan_in in (("wq", 256), ("wk", 256), ("wv", 256), ("wo", 128)):
        a = getattr(attn, name).weight.numpy()
        assert abs(a.std() / np.sqrt(0.1 / fan_in) - 1) < 0.02, name


ATTN_CONFIGS = [  # (d_model, n_heads, d_head, B, T)
    (12, 3, None, 2, 6),
    (8, 2, 6, 1, 5),       # d_head given: inner width 12 != d_model
    (8, 2, None, 2, 1),    # T == 1
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,H,dh,Bsz,T", ATTN_CONFIGS)
def test_attention(backend, dtype, d, H, dh, Bsz, T):
    ours = nn.Attention(d, H, d_head=dh, max_seq_len=16, rng=B.default_rng(0), dtype=dtype)
    theirs = TL.TorchAttention(d, H, ours.d_head, 16, dtype=TORCH_DTYPE[dtype])
    _load_random(ours, theirs, seed=37, mean=0.1, scale_by_fan_in=True)
    _compare_module(ours, theirs, rnd(Bsz, T, d, seed=38).astype(dtype), dtype, "attention",
                    depth=5)   # q/k/v projections, scores, softmax, weighted sum, output projection


def test_attention_custom_scale_and_base():
    ours = nn.Attention(8, 2, max_seq_len=8, rope_base=500.0, scale=1.0, rng=B.default_rng(0), dtype=np.float64)
    theirs = TL.TorchAttention(8, 2, 4, 8, base=500.0, scale=1.0)
    _load_random(ours, theirs, seed=39, mean=0.1, scale_by_fan_in=True)
    _compare_module(ours, theirs, rnd(2, 4, 8, seed=40), np.float64, "attention scale=1 base=500")


def test_attention_errors():
    rng = B.default_rng(0)
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=3"):
        nn.Attention(10, 3, max_seq_len=8, rng=rng)
    with pytest.raises(ValueError, match="head_dim=3 is odd"):
        nn.Attention(6, 2, max_seq_len=8, rng=rng)
    attn = nn.Attention(8, 2, max_seq_len=4, rng=rng)
    with pytest.raises(ValueError, match="outside max_seq_len=4"):
        attn(tinymoe.Tensor(np.ones((1, 5, 8), np.float32)))
    with pytest.raises(ValueError, match="not \\[B, T, d_model=8\\]"):
        attn(tinymoe.Tensor(np.ones((1, 3, 6), np.float32)))


# ---- KV cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_decoding_equals_full_forward(backend, dtype):
    d, H, Bsz, T = 12, 3, 2, 7
    # float32: the two orders differ by rounding; longest reduction d = 12, 5 stages
    tol = 1e-12 if dtype == np.float64 else default_tol(dtype, d, depth=5)
    attn = nn.Attention(d, H, max_seq_len=16, rng=B.default_rng(0), dtype=dtype)
    _load_random(attn, TL.TorchAttention(d, H, 4, 16), seed=41, mean=0.1, scale_by_fan_in=True)
    x = rnd(Bsz, T, d, seed=42).astype(dtype)
    with tinymoe.no_grad():
        full = attn(tinymoe.Tensor(B.to_device(x))).numpy()
        cache = attn.new_cache(Bsz)
        steps = [attn(tinymoe.Tensor(B.to_device(x[:, t:t + 1])), cache).numpy() for t in range(T)]
        assert cache.length == T
        cache.reset()                                          # a prefill of 3, then 1, then 3
        chunks = [attn(tinymoe.Tensor(B.to_device(x[:, a:b])), cache).numpy() for a, b in ((0, 3), (3, 4), (4, 7))]
    assert_close("kv cache, one token at a time", np.concatenate(steps, axis=1), full, tol)
    assert_close("kv cache, chunks 3+1+3", np.concatenate(chunks, axis=1), full, tol)


def test_kv_cache_errors():
    attn = nn.Attention(8, 2, max_seq_len=16, rng=B.default_rng(0))
    x = tinymoe.Tensor(np.ones((1, 3, 8), np.float32))
    cache = attn.new_cache(1, max_len=4)
    with pytest.raises(RuntimeError, match="no_grad"):
        attn(x, cache)
    with tinymoe.no_grad():
        attn(x, cache)
        with pytest.raises(ValueError, match="KVCache full: 3 cached \\+ 3 new positions > max_len=4"):
            attn(x, cache)
        with pytest.raises(ValueError, match="batch 2 != KV cache batch 1"):
            attn(tinymoe.Tensor(np.ones((2, 1, 8), np.float32)), cache)
    assert "length=3/4" in repr(cache)


# ---- names match the config ----------------------------------------------------------------

class _DenseBlockParams(nn.Module):
    """Just the parameter-holding layers of a dense block, named as the model names them."""

    def __init__(self, cfg, rng):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = nn.Attention(cfg.d_model, cfg.n_heads, d_head=cfg.d_head, max_seq_len=cfg.max_seq_len,
                                 rope_base=cfg.rope_base, rng=rng, init_std=cfg.init_std)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = nn.FeedForward(cfg.d_model, cfg.d_ff, rng=rng, init_std=cfg.init_std,
                                  kind=cfg.ffn_kind)


@pytest.mark.parametrize("overrides", [{}, {"d_head": 8}, {"ffn_kind": "openmoe"}])
def test_parameter_names_match_config(overrides):
    cfg = get_preset("toy", **overrides)
    expected = {k[len("blocks.0."):]: v for k, v in parameter_shapes(cfg).items() if k.startswith("blocks.0.")}
    block = _DenseBlockParams(cfg, B.default_rng(0))
    assert not cfg.is_moe_block(0)
    assert {n: tuple(p.shape) for n, p in block.named_parameters()} == expected
    assert [n for n, _ in block.named_parameters()] == list(expected)


def test_qkv_rope_pair_order_puts_rotate_half_pairs_side_by_side():
    """Within each head, column j of the reordered weight is followed by column j + dh/2,
    so the GEMM writes (x1_j, x2_j) as one complex number (written out for 2 heads of 4)."""
    from tinymoe.functional_fused import QKVRoPE, _pair_order
    assert list(_pair_order(2, 4)) == [0, 2, 1, 3, 4, 6, 5, 7]
    wq, wk, wv = rnd(3, 8, seed=1), rnd(3, 8, seed=2), rnd(3, 8, seed=3)
    order = _pair_order(2, 4)
    np.testing.assert_array_equal(QKVRoPE._weight(np, wq, wk, wv, 2),
                                  np.concatenate([wq[:, order], wk[:, order], wv], axis=1))
