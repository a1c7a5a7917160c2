"""Row-parallel kernels (backend.parallel_rows) and the fused ops that use them.

The fused ops only split their rows across threads when every thread gets enough elements
(functional_fused._MIN_PER_THREAD: 2^18 for an elementwise kernel, 2^16 for attention), so
the oracle tests of test_layers.py (small shapes) run on one thread. Here the shapes are
large enough to be split (each test checks that two threads did run the op): each op is
compared with its torch twin with two threads,
and with itself on one thread (elementwise kernels: bit-identical; attention's blocks run
their matmuls on one BLAS thread, so only to rounding)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tinymoe
from tinymoe import backend as B
from tinymoe import functional as F
from tests.oracle import torch_layers as TL
from tests.oracle.compare import assert_close, check_against_torch, default_tol


def rnd(*shape, seed=0, mean=0.3, std=1.0):
    return np.random.default_rng(seed).normal(mean, std, size=shape)


# ---- parallel_rows itself ------------------------------------------------------------------

@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("n, block_rows, min_rows", [(10, None, 1), (10, 3, 1), (7, 2, 4), (1, None, 1),
                                                     (100, 7, 10)])
def test_parallel_rows_covers_every_row_once(threads, n_threads, n, block_rows, min_rows):
    threads(n_threads)
    a = np.zeros((n, 2))
    calls = []
    lock = threading.Lock()

    def fn(lo, hi):
        with lock:
            calls.append((lo, hi))
        a[lo:hi] += 1

    B.parallel_rows(fn, a, block_rows=block_rows, min_rows=min_rows)
    assert np.all(a == 1), f"rows covered {a[:, 0]}"
    if block_rows is not None:
        assert all(hi - lo <= block_rows for lo, hi in calls), calls
    workers = max(1, min(n_threads, n // min_rows))
    if workers == 1:
        assert calls == sorted(calls), "a single thread should walk the rows in order"


def test_parallel_rows_uses_several_threads_and_raises_worker_errors(threads):
    threads(2)
    seen = set()
    B.parallel_rows(lambda lo, hi: seen.add(threading.get_ident()), np.zeros((8, 1)))
    assert len(seen) == 2, f"expected 2 threads, saw {len(seen)}"

    def boom(lo, hi):
        if lo > 0:
            raise RuntimeError("worker failed")

    with pytest.raises(RuntimeError, match="worker failed"):
        B.parallel_rows(boom, np.zeros((8, 1)))


def test_nested_parallel_rows_runs_inline(threads):
    """A kernel that itself calls parallel_rows must not wait on the pool it runs in."""
    threads(2)
    out = np.zeros((8, 4))

    def inner(lo, hi):
        def cell(a, b):
            out[lo:hi, a:b] += 1
        B.parallel_rows(cell, np.zeros((4, 1)))             # 4 columns, split again if allowed

    B.parallel_rows(inner, out)
    assert np.all(out == 1), out


def test_parallel_rows_empty_and_small_inputs(threads):
    threads(2)
    calls = []
    B.parallel_rows(lambda lo, hi: calls.append((lo, hi)), np.zeros((0, 3)))
    assert calls == []
    seen = set()
    B.parallel_rows(lambda lo, hi: seen.add(threading.get_ident()), np.zeros((8, 1)), min_rows=8)
    assert seen == {threading.get_ident()}, "below min_rows per thread the caller runs everything"


def test_set_num_threads_validates_and_sets_blas(threads):
    with pytest.raises(ValueError, match="must be >= 1"):
        B.set_num_threads(0)
    threads(1)
    assert B.get_num_threads() == 1
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    if blas:
        assert all(p["num_threads"] == 1 for p in blas), blas


# ---- the fused ops on shapes that get split -------------------------------------------------

@pytest.fixture
def split_seen(monkeypatch):
    """The set of threads that ran kernel rows (B.parallel_rows spied on)."""
    seen: set[int] = set()
    real = B.parallel_rows

    def spy(fn, a, **kw):
        def recording(lo, hi):
            seen.add(threading.get_ident())
            fn(lo, hi)
        real(recording, a, **kw)

    monkeypatch.setattr(B, "parallel_rows", spy)
    return seen


OPS = {
    "swiglu": (F.swiglu, TL.swiglu, lambda: [rnd(4, 128, 1024, seed=1), rnd(4, 128, 1024, seed=2, mean=-0.2)]),
    "rms_norm": (lambda x, w: F.rms_norm(x, w, 1e-6), lambda x, w: TL.rms_norm(x, w, 1e-6),
                 lambda: [rnd(16, 128, 256, seed=3), rnd(256, seed=4, mean=1.0, std=0.3)]),
    "causal_attention": (F.causal_attention, TL.causal_attention,
                         lambda: [rnd(2, 4, 128, 16, seed=s, std=0.5) for s in (5, 6, 7)]),
}


def _rope_case():
    cos, sin = F.rope_tables(128, 32, 10000.0, np.float64)
    tcos, tsin = TL.rope_tables(128, 32, 10000.0, torch.float64)
    return (lambda x: F.rope(x, cos, sin), lambda x: TL.rope(x, tcos, tsin), [rnd(32, 4, 128, 32, seed=8)])


@pytest.mark.parametrize("name", ["swiglu", "rms_norm", "causal_attention"])
def test_split_ops_match_torch(threads, split_seen, name):
    threads(2)
    ours, theirs, make = OPS[name]
    for dtype in (np.float64, np.float32):
        check_against_torch(ours, theirs, make(), dtype=dtype, name=f"{name} on 2 threads")
    assert len(split_seen) == 2, f"{name}: these shapes should be split over 2 threads"


def test_split_rope_matches_torch(threads, split_seen):
    threads(2)
    ours, theirs, inputs = _rope_case()
    check_against_torch(ours, theirs, inputs, dtype=np.float64, name="rope on 2 threads")
    assert len(split_seen) == 2


def test_split_cross_entropy_matches_torch(threads, split_seen):
    threads(2)
    targets = np.random.default_rng(9).integers(0, 1024, size=512)
    targets[::7] = -100
    check_against_torch(lambda z: F.cross_entropy(z, targets), lambda z: torch.nn.functional.cross_entropy(
        z, torch.tensor(targets), ignore_index=-100), [rnd(512, 1024, seed=10, std=2.0)], name="cross_entropy on 2 threads")
    assert len(split_seen) == 2


def _run(fn, inputs):
    ts = [tinymoe.Tensor(np.asarray(a, np.float32), requires_grad=True) for a in inputs]
    out = fn(*ts)
    w = np.random.default_rng(0).normal(size=out.shape).astype(np.float32)
    (out * tinymoe.Tensor(w)).sum().backward()
    return [out.numpy()] + [t.grad for t in ts]


@pytest.mark.parametrize("name", ["swiglu", "rms_norm", "rope", "causal_attention"])
def test_one_thread_and_two_threads_agree(threads, name):
    if name == "rope":
        ours, _, inputs = _rope_case()
        cos, sin = F.rope_tables(128, 32, 10000.0, np.float32)
        ours = lambda x: F.rope(x, cos, sin)  # noqa: E731
    else:
        ours, _, make = OPS[name]
        inputs = make()
    threads(1)
    one = _run(ours, inputs)
    threads(2)
    two = _run(ours, inputs)
    for i, (a, b) in enumerate(zip(one, two)):
        if name == "causal_attention":
            # another split of the same float32 sums: longest reduction T = 128, 3 stages
            assert_close(f"{name} output/grad {i}: 2 threads vs 1", b, a, rtol=default_tol(np.float32, 128, 3))
        else:
            assert np.array_equal(a, b), f"{name} output/grad {i}: 2 threads differ from 1, " \
                                         f"max diff {np.max(np.abs(a - b)):.3e}"
