"""Every differentiable op of tinymoe.functional against torch: forward and input gradients,
in float64 (rel <= 1e-9) and float32 (tests/oracle/compare.py f32_tol), on broadcasting, size-1 and batch
shapes, plus finite-difference checks for matmul, softmax and cross-entropy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tinymoe
from tinymoe import backend as B
from tinymoe import functional as F
from tests.oracle.compare import assert_close, check_against_torch

DTYPES = [np.float64, np.float32]


def rnd(*shape, seed=0, lo=None):
    """Non-symmetric, non-zero test data (mean 0.3, so sign errors in backward show)."""
    a = np.random.default_rng(seed + 7 * len(shape)).normal(0.3, 1.0, size=shape)
    if lo is not None:
        a = np.abs(a) + lo
    return a


# ---- elementwise binary ops with broadcasting -------------------------------------------
BINARY = [
    ("add", lambda a, b: a + b, lambda a, b: a + b),
    ("sub", lambda a, b: a - b, lambda a, b: a - b),
    ("mul", lambda a, b: a * b, lambda a, b: a * b),
    ("div", lambda a, b: a / b, lambda a, b: a / b),
    ("maximum", F.maximum, torch.maximum),
]
BCAST_SHAPES = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1,), (5, 2)), ((2, 3, 1, 5), (3, 4, 1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,ours,theirs", BINARY, ids=[b[0] for b in BINARY])
@pytest.mark.parametrize("sa,sb", BCAST_SHAPES)
def test_binary_ops(backend, name, ours, theirs, sa, sb, dtype):
    a, b = rnd(*sa, seed=1), rnd(*sb, seed=2)
    if name == "div":
        b = np.abs(b) + 0.5
    check_against_torch(ours, theirs, [a, b], dtype=dtype, name=name)


def test_scalar_operands_keep_dtype():
    x = tinymoe.Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    for y in (x + 1.5, 2.0 * x, x / 3, 1 - x, x ** 2):
        assert y.dtype == np.float32
    (2.0 - x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, np.full(3, -3.0, np.float32))


def test_maximum_ties_split_like_torch():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 5.0, 0.0])
    check_against_torch(F.maximum, torch.maximum, [a, b], name="maximum ties")


@pytest.mark.parametrize("dtype", DTYPES)
def test_where(backend, dtype):
    cond = rnd(3, 4, seed=3) > 0.3
    check_against_torch(lambda a, b, c=cond: F.where(B.to_device(c), a, b),
                        lambda a, b, c=cond: torch.where(torch.tensor(c), a, b),
                        [rnd(3, 4, seed=1), rnd(4, seed=2)], dtype=dtype, name="where")


# ---- unary ops ---------------------------------------------------------------------------
UNARY = [
    ("neg", lambda a: -a, lambda a: -a, None),
    ("pow3", lambda a: a ** 3, lambda a: a ** 3, None),
    ("pow_half", lambda a: F.pow(a, 0.5), lambda a: a ** 0.5, 0.1),
    ("exp", F.exp, torch.exp, None),
    ("log", F.log, torch.log, 0.1),
    ("sqrt", F.sqrt, torch.sqrt, 0.1),
    ("rsqrt", F.rsqrt, torch.rsqrt, 0.1),
    ("tanh", F.tanh, torch.tanh, None),
    ("sigmoid", F.sigmoid, torch.sigmoid, None),
    ("silu", F.silu, torch.nn.functional.silu, None),
    ("relu", F.relu, torch.relu, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,ours,theirs,lo", UNARY, ids=[u[0] for u in UNARY])
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (1, 1)])
def test_unary_ops(backend, name, ours, theirs, lo, shape, dtype):
    check_against_torch(ours, theirs, [rnd(*shape, seed=4, lo=lo)], dtype=dtype, name=name)


def test_sigmoid_is_stable_for_large_inputs():
    x = tinymoe.Tensor(np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0]), requires_grad=True)
    y = F.sigmoid(x)
    assert np.all(np.isfinite(y.numpy()))
    y.sum().backward()
    assert np.all(np.isfinite(x.grad))


# ---- matmul ------------------------------------------------------------------------------
MATMUL_SHAPES = [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                 ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)), ((1, 4), (4, 1)), ((6, 3, 4), (1, 4, 2))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES)
def test_matmul(backend, sa, sb, dtype):
    check_against_torch(F.matmul, torch.matmul, [rnd(*sa, seed=5), rnd(*sb, seed=6)], dtype=dtype, name="matmul")


# ---- reductions --------------------------------------------------------------------------
RED_CASES = [(None, False), (0, False), (-1, True), ((0, 2), False), ((1,), True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis,keepdims", RED_CASES)
def test_sum_mean_max(backend, axis, keepdims, dtype):
    x = rnd(2, 3, 4, seed=8)
    tdim = axis if axis is not None else tuple(range(3))
    check_against_torch(lambda a: F.sum(a, axis, keepdims), lambda a: torch.sum(a, dim=tdim, keepdim=keepdims),
                        [x], dtype=dtype, name="sum")
    check_against_torch(lambda a: F.mean(a, axis, keepdims), lambda a: torch.mean(a, dim=tdim, keepdim=keepdims),
                        [x], dtype=dtype, name="mean")
    check_against_torch(lambda a: F.max(a, axis, keepdims), lambda a: torch.amax(a, dim=tdim, keepdim=keepdims),
                        [x], dtype=dtype, name="max")


def test_max_ties_like_torch_amax():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    check_against_torch(lambda a: F.max(a, 1), lambda a: torch.amax(a, dim=1), [x], name="max ties")


# ---- shape ops ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_shape_ops(backend, dtype):
    x = rnd(2, 3, 4, seed=9)
    cases = [
        ("reshape", lambda a: F.reshape(a, (6, 4)), lambda a: a.reshape(6, 4)),
        ("reshape-1", lambda a: a.reshape(4, -1), lambda a: a.reshape(4, -1)),
        ("transpose", lambda a: a.T, lambda a: a.permute(2, 1, 0)),
        ("permute", lambda a: F.permute(a, (1, 2, 0)), lambda a: a.permute(1, 2, 0)),
        ("broadcast_to", lambda a: F.broadcast_to(a[:, :1], (5, 2, 3, 4)), lambda a: a[:, :1].expand(5, 2, 3, 4)),
        ("slice", lambda a: a[1:, ::2, -1], lambda a: a[1:, ::2, -1]),
        ("slice_none", lambda a: a[None, 0, :, 1:3], lambda a: a[None, 0, :, 1:3]),
    ]
    for name, ours, theirs in cases:
        check_against_torch(ours, theirs, [x], dtype=dtype, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concatenate_stack_split(backend, axis, dtype):
    a, b, c = rnd(2, 3, 4, seed=1), rnd(2, 3, 4, seed=2), rnd(2, 3, 4, seed=3)
    check_against_torch(lambda *t: F.concatenate(t, axis), lambda *t: torch.cat(t, axis), [a, b, c],
                        dtype=dtype, name="concatenate")
    check_against_torch(lambda *t: F.stack(t, axis), lambda *t: torch.stack(t, axis), [a, b, c],
                        dtype=dtype, name="stack")
    n = a.shape[axis]
    check_against_torch(lambda t: F.concatenate([p * (i + 1) for i, p in enumerate(F.split(t, [1], axis))], axis),
                        lambda t: torch.cat([p * (i + 1) for i, p in enumerate(torch.split(t, [1, n - 1], axis))], axis),
                        [a], dtype=dtype, name="split")


def test_split_with_unused_piece():
    x = tinymoe.Tensor(rnd(4, 3), requires_grad=True)
    first, _second = F.split(x, 2, axis=0)
    (first * 2).sum().backward()
    expected = np.zeros((4, 3))
    expected[:2] = 2
    np.testing.assert_array_equal(x.grad, expected)


# ---- gathers: fancy indexing, take_along_axis, embedding (repeated indices) ------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_fancy_index_repeated(backend, dtype):
    x = rnd(5, 4, seed=11)
    idx = np.array([0, 3, 3, 1, 0, 0])
    check_against_torch(lambda a: a[B.to_device(idx)], lambda a: a[torch.tensor(idx)], [x], dtype=dtype, name="rows")
    rows, cols = np.array([[0, 4], [4, 4]]), np.array([[1, 1], [3, 1]])
    check_against_torch(lambda a: a[B.to_device(rows), B.to_device(cols)],
                        lambda a: a[torch.tensor(rows), torch.tensor(cols)], [x], dtype=dtype, name="pairs")
    check_against_torch(lambda a: a[:, B.to_device(idx[:3])], lambda a: a[:, torch.tensor(idx[:3])], [x],
                        dtype=dtype, name="cols")


@pytest.mark.parametrize("dtype", DTYPES)
def test_boolean_mask(backend, dtype):
    x = rnd(4, 3, seed=12)
    mask = x > 0.3
    check_against_torch(lambda a: a[B.to_device(mask)], lambda a: a[torch.tensor(mask)], [x], dtype=dtype, name="mask")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_take_along_axis(backend, axis, dtype):
    x = rnd(4, 5, seed=13)
    shape = list(x.shape)
    shape[axis] = 7                                       # more picks than entries: repeats
    idx = np.random.default_rng(0).integers(0, x.shape[axis], size=shape)
    check_against_torch(lambda a: F.take_along_axis(a, B.to_device(idx), axis),
                        lambda a: torch.take_along_dim(a, torch.tensor(idx), dim=axis), [x],
                        dtype=dtype, name="take_along_axis")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_repeated_ids(backend, dtype):
    w = rnd(10, 6, seed=14)
    ids = np.array([[1, 3, 3, 9], [3, 0, 1, 1]])
    check_against_torch(lambda W: F.embedding(W, B.to_device(ids)),
                        lambda W: torch.nn.functional.embedding(torch.tensor(ids), W), [w],
                        dtype=dtype, name="embedding")


def test_embedding_out_of_range_is_one_line():
    w = tinymoe.Tensor(np.zeros((4, 2), np.float32), requires_grad=True)
    with pytest.raises(IndexError, match="token id 7 out of range for an embedding of 4 rows") as e:
        F.embedding(w, np.array([1, 7]))
    assert "\n" not in str(e.value)


def test_scatter_add_rows_matches_add_at():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 7, size=50)
    vals = rng.normal(size=(50, 3))
    ref = np.zeros((9, 3))
    np.add.at(ref, idx, vals)
    np.testing.assert_allclose(B.scatter_add_rows(9, idx, vals), ref, rtol=1e-12)
    np.testing.assert_allclose(B.scatter_add_flat(9, idx, vals[:, 0]), ref[:, 0], rtol=1e-12)


@pytest.mark.parametrize("repeats", [0, 2, 3, 8, 9, 20])
def test_scatter_add_rows_sums_each_row_left_to_right(repeats):
    """Rows 0..5 get 0..5 summands (row 6 gets ``repeats``), interleaved out of order: every
    output row equals the sum of its rows taken in their order in ``index``, accumulated one
    by one in float32 (15 rows with no repeats: the row loop for small inputs; up to 8
    repeats, the occurrence levels; beyond that the reduceat fallback, checked against
    np.add.at)."""
    rng = np.random.default_rng(1)
    idx = np.concatenate([np.repeat(np.arange(6), np.arange(6)), np.full(repeats, 6)])
    idx = idx[rng.permutation(idx.size)]
    vals = rng.normal(size=(idx.size, 4)).astype(np.float32)
    out = B.scatter_add_rows(8, idx, vals)
    assert out.dtype == np.float32 and out.shape == (8, 4)
    ref = np.zeros((8, 4), np.float32)
    np.add.at(ref, idx, vals)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert not out[0].any() and not out[7].any()             # rows with no summand stay 0
    if repeats <= 8:
        for r in range(7):
            acc = np.zeros(4, np.float32)
            for m in np.flatnonzero(idx == r):
                acc = acc + vals[m]
            np.testing.assert_array_equal(out[r], acc)


def test_cross_entropy_without_gradient_keeps_no_probability_buffer(monkeypatch):
    """Under no_grad the loss is the same (here to the last bit: the same logsumexp per row)
    and forward allocates nothing of the logits' [N, V] size (the blocks' temporaries are
    2^16 elements)."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(600, 300)).astype(np.float32)
    t = rng.integers(0, 300, size=600)
    with_grad = F.cross_entropy(tinymoe.Tensor(z, requires_grad=True), t).numpy()
    sizes = []
    real_empty = np.empty

    def spy(shape, *a, **k):
        out = real_empty(shape, *a, **k)
        sizes.append(out.size)
        return out

    monkeypatch.setattr(np, "empty", spy)
    with tinymoe.no_grad():
        without = F.cross_entropy(tinymoe.Tensor(z, requires_grad=True), t).numpy()
    assert without == with_grad
    assert max(sizes) < z.size, sizes


# ---- softmax family and cross-entropy -----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_log_softmax(backend, axis, dtype):
    x = rnd(3, 5, seed=15) * 4
    check_against_torch(lambda a: F.softmax(a, axis), lambda a: torch.softmax(a, axis), [x], dtype=dtype, name="softmax")
    check_against_torch(lambda a: F.log_softmax(a, axis), lambda a: torch.log_softmax(a, axis), [x],
                        dtype=dtype, name="log_softmax")


def test_softmax_is_stable():
    x = tinymoe.Tensor(np.array([[1000.0, 0.0, -1000.0]]), requires_grad=True)
    y = F.log_softmax(x)
    assert np.all(np.isfinite(y.numpy()))
    np.testing.assert_allclose(F.softmax(x).numpy(), [[1.0, 0.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(backend, reduction, dtype):
    logits = rnd(2, 5, 7, seed=16) * 3
    targets = np.array([[1, 6, 6, 0, 2], [3, -100, 6, 1, -100]])
    check_against_torch(
        lambda z: F.cross_entropy(z, B.to_device(targets), ignore_index=-100, reduction=reduction),
        lambda z: torch.nn.functional.cross_entropy(z.reshape(-1, 7), torch.tensor(targets).reshape(-1),
                                                    ignore_index=-100, reduction=reduction).reshape(
            () if reduction != "none" else targets.shape),
        [logits], dtype=dtype, name=f"cross_entropy {reduction}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_reference(backend, dtype):
    """Second oracle: the fused kernel against ``cross_entropy_reference`` (plain NumPy,
    float64) on the same inputs, with rows cut into many blocks. Derived bound: logsumexp
    sums V positive terms (relative error <= (V + 4) u, an absolute error of the log), the
    picked logit is exact, and the mean over N tokens adds N u relative:
    |d loss| <= eps (V + 8 + (N + 2) |loss|), eps = 2 u of the kernel's dtype."""
    N, V = 600, 4096
    logits = rnd(N, V, seed=17) * 3
    targets = np.random.default_rng(18).integers(0, V, size=N)
    targets[::7] = -100                                        # ignored positions
    z = logits.astype(dtype)
    ours = float(F.cross_entropy(tinymoe.Tensor(B.to_device(z)), B.to_device(targets)).item())
    ref = float(F.cross_entropy_reference(z.astype(np.float64), targets))
    eps = float(np.finfo(dtype).eps)
    assert abs(ours - ref) <= eps * (V + 8 + (N + 2) * abs(ref)), (ours, ref)


def test_cross_entropy_bad_targets():
    z = tinymoe.Tensor(np.zeros((2, 3), np.float32), requires_grad=True)
    with pytest.raises(IndexError, match="target id is outside"):
        F.cross_entropy(z, np.array([0, 3]))
    with pytest.raises(TypeError, match="targets must be integer"):
        F.cross_entropy(z, np.array([0.0, 1.0]))


# ---- finite differences (float64, independent of torch) ---------------------------------
def finite_difference(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of scalar f at x."""
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f(x)
        flat[i] = old - eps
        down = f(x)
        flat[i] = old
        g.reshape(-1)[i] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("name", ["matmul", "softmax", "cross_entropy"])
def test_finite_differences(name):
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.2, 1, (3, 4)), rng.normal(-0.1, 1, (4, 5))
    w = rng.normal(size=(3, 5))
    targets = np.array([4, 0, 2])
    fns = {
        "matmul": lambda x: F.matmul(x, tinymoe.Tensor(b)) * tinymoe.Tensor(w),
        "softmax": lambda x: F.softmax(F.matmul(x, tinymoe.Tensor(b))) * tinymoe.Tensor(w),
        "cross_entropy": lambda x: F.cross_entropy(F.matmul(x, tinymoe.Tensor(b)), targets),
    }
    fn = fns[name]
    x = tinymoe.Tensor(a.copy(), requires_grad=True)
    fn(x).sum().backward()
    numeric = finite_difference(lambda arr: float(fn(tinymoe.Tensor(arr)).sum().item()), a.copy())
    assert_close(f"{name} vs finite differences", x.grad, numeric, rtol=1e-7)
