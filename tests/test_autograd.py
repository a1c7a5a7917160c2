"""The autograd engine itself: graph shapes, accumulation, freeing, no_grad, dtype policy
and the errors a user meets."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import tinymoe
from tinymoe import backend as B
from tinymoe import functional as F
from tinymoe.autograd import Context, Function, Tensor, no_grad
from tests.oracle.compare import assert_close


def test_diamond_graph_matches_torch():
    a0 = np.array([0.5, -1.2, 2.0])
    a = Tensor(a0.copy(), requires_grad=True)
    b = F.exp(a)
    c, d = b * 2.0, F.tanh(b)            # two paths from b ...
    e = (c * d + c).sum()                # ... meeting again here
    e.backward()
    ta = torch.tensor(a0, requires_grad=True)
    tb = torch.exp(ta)
    tc, td = tb * 2.0, torch.tanh(tb)
    (tc * td + tc).sum().backward()
    assert_close("diamond", a.grad, ta.grad, 1e-12)


def test_tensor_used_three_times():
    x = Tensor(np.array([1.5, -0.5]), requires_grad=True)
    y = (x * x * x).sum()                # d/dx x^3 = 3 x^2, x used three times
    y.backward()
    np.testing.assert_allclose(x.grad, 3 * np.array([1.5, -0.5]) ** 2, rtol=1e-12)
    z = x + x + x                        # the same tensor three times in one expression
    z.sum().backward()
    np.testing.assert_allclose(x.grad, 3 * np.array([1.5, -0.5]) ** 2 + 3, rtol=1e-12)


def test_ten_thousand_deep_chain():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001 + 0.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 10_000], rtol=1e-9)


def test_leaf_grads_accumulate_across_backward_calls():
    x = Tensor(np.array([2.0, 3.0]), requires_grad=True)
    (x * 4).sum().backward()
    (x * 4).sum().backward()
    np.testing.assert_array_equal(x.grad, [8.0, 8.0])
    x.zero_grad()
    assert x.grad is None


def test_shared_gradient_arrays_are_not_aliased():
    """z = x + y hands the same incoming gradient to x and y; clipping one must not touch the other."""
    x = Tensor(np.ones(3), requires_grad=True)
    y = Tensor(np.ones(3), requires_grad=True)
    (x + y).sum().backward()
    x.grad *= 0.5
    np.testing.assert_array_equal(y.grad, np.ones(3))


def test_no_grad_builds_no_graph():
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    with no_grad():
        y = x * 2
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()
    assert tinymoe.autograd.is_grad_enabled()


def test_graph_is_freed_after_backward():
    class Save(Function):
        @staticmethod
        def forward(ctx: Context, a):
            buf = a * 2
            ctx.save_for_backward(buf)
            return buf.copy()

        @staticmethod
        def backward(ctx: Context, g):
            return g * 2

    x = Tensor(np.ones(4), requires_grad=True)
    y = Save.apply(x)
    # plain ndarrays cannot be weak-referenced; the ctx holding them can (see the next test
    # for the buffer itself, through an ndarray subclass)
    ctx_ref = weakref.ref(y._node.ctx)
    y.sum().backward()
    gc.collect()
    assert ctx_ref() is None, "the ctx (and its saved buffers) must be released after backward"
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()


class _WeakArray(np.ndarray):
    """An ndarray subclass that can be weak-referenced (plain ndarrays cannot)."""


def test_saved_buffer_is_dead_after_backward():
    holder = {}

    class Keep(Function):
        @staticmethod
        def forward(ctx: Context, a):
            buf = (a * 3).view(_WeakArray)
            holder["ref"] = weakref.ref(buf)
            ctx.save_for_backward(buf)
            return a * 3

        @staticmethod
        def backward(ctx: Context, g):
            (buf,) = ctx.saved
            return g * 3 + 0 * buf

    x = Tensor(np.ones(5), requires_grad=True)
    out = Keep.apply(x).sum()
    assert holder["ref"]() is not None
    out.backward()
    gc.collect()
    assert holder["ref"]() is None, "saved buffer still alive after backward"
    np.testing.assert_array_equal(x.grad, np.full(5, 3.0))


def test_retain_graph_allows_second_backward():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = F.cross_entropy((x * x).reshape(1, 2), np.array([1]))
    y.backward(retain_graph=True)
    g1 = x.grad.copy()
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * g1, rtol=1e-12)


def test_dtype_policy():
    assert tinymoe.tensor([1.0, 2.0]).dtype == np.float32
    assert tinymoe.tensor(np.zeros(2)).dtype == np.float64            # explicit float64 is kept
    a = tinymoe.tensor(np.zeros(2, np.float32), requires_grad=True)
    b = tinymoe.tensor(np.zeros(2, np.float64), requires_grad=True)
    with pytest.raises(TypeError, match="add: dtype mismatch float32 vs float64") as e:
        a + b
    assert "\n" not in str(e.value)


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="only floating tensors can require grad, got dtype int64"):
        Tensor(np.array([1, 2], dtype=np.int64), requires_grad=True)


def test_shape_mismatch_names_op_and_shapes():
    a = Tensor(np.zeros((2, 3), np.float32), requires_grad=True)
    b = Tensor(np.zeros((4,), np.float32))
    with pytest.raises(ValueError, match=r"add: inputs of shapes \(2, 3\), \(4,\)") as e:
        a + b
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"matmul: inputs of shapes \(2, 3\), \(2, 3\)"):
        a @ Tensor(np.zeros((2, 3), np.float32))


def test_device_mix_is_refused():
    """Without a GPU we fake a 'cupy' array type to check the device guard's message."""
    class FakeCupy(np.ndarray):
        pass
    FakeCupy.__module__ = "cupy._core.core"
    a = Tensor(np.zeros(2, np.float32))
    b = Tensor(np.zeros(2, np.float32))
    b.data = np.zeros(2, np.float32).view(FakeCupy)
    with pytest.raises(ValueError, match=r"add: tensors on different devices \(cpu and cuda\)"):
        a + b


def test_backward_needs_grad_for_nonscalar():
    x = Tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(RuntimeError, match="grad must be given for a non-scalar"):
        (x * 2).backward()
    (x * 2).backward(np.ones((2, 2)))
    np.testing.assert_array_equal(x.grad, np.full((2, 2), 2.0))


def test_multi_output_unused_output_gets_zero_grad():
    x = Tensor(np.arange(6.0).reshape(3, 2), requires_grad=True)
    a, b, c = F.split(x, 3, axis=0)
    (b * 5).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0, 0], [5, 5], [0, 0]])


def test_retain_grad_on_intermediate():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = x * 3
    h.retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * np.array([3.0, 6.0]))


def test_set_device_cuda_without_gpu_is_one_clear_error():
    if B.cuda_available():
        pytest.skip("a GPU is present here")
    with pytest.raises(B.DeviceError, match="device 'cuda' asked for but") as e:
        B.set_device("cuda")
    assert "\n" not in str(e.value)
    assert B.get_device() == "cpu"
    with pytest.raises(B.DeviceError, match="unknown device 'tpu'"):
        B.set_device("tpu")


def test_numpy_scalars_do_not_upcast_and_raw_arrays_are_checked():
    x = tinymoe.tensor(np.ones(2, np.float32), requires_grad=True)
    assert (x * np.float64(2.0)).dtype == np.float32        # weak scalar, like a Python float
    assert (np.float64(2.0) * x).dtype == np.float32
    with pytest.raises(TypeError, match="add: dtype mismatch float32 vs float64"):
        x + np.ones(2, np.float64)                           # a float64 array would upcast: refused
