"""tinymoe.routing: against the torch twin (tests/oracle/torch_routing.py) and by properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tinymoe import backend as B
from tinymoe import routing as R

from tests.oracle.compare import assert_close, default_tol
from tests.oracle.torch_routing import twin_capacity, twin_route


@pytest.fixture
def xp(backend):
    """The array module of the backend under test (conftest's ``backend`` fixture: NumPy,
    and CuPy where it sees a GPU)."""
    return B.xp


def make_logits(xp, n, e, seed=0, dtype=np.float32, scale=2.0):
    """Non-symmetric random logits [n, e] on the device of ``xp``."""
    host = (np.random.default_rng(seed).normal(size=(n, e)) * scale + 0.3).astype(dtype)
    return xp.asarray(host)


def h(a):
    return B.to_numpy(a)


def assert_same(name, ours, ref):
    ours, ref = np.asarray(h(ours)), np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    bad = np.argwhere(ours != ref)
    assert bad.size == 0, (f"{name}: {len(bad)} mismatches, first at {bad[:5].tolist()}: "
                           f"ours {ours[tuple(bad[0])]} ref {ref[tuple(bad[0])]}")


def group_of(res, n):
    return np.arange(n) // res.group_size


# ------------------------------------------------------------------ against the torch twin

# (top_k, capacity_factor, group_size, min_capacity, capacity_mode, renormalize)
TWIN_CASES = [
    (1, 1.25, None, 4, "openmoe", False),
    (2, 1.25, None, 4, "openmoe", False),
    (4, 1.0, None, 4, "openmoe", False),
    (2, 1.0, 16, 1, "openmoe", False),     # several groups, small capacity
    (2, 1.25, 32, 1, "openmoe", True),     # renormalised (Mixtral) weights
    (2, 0, 16, 4, "openmoe", False),       # dropless
    (2, None, None, 4, "openmoe", False),  # dropless
    (2, 1.0, 32, 1, "k_scaled", False),
    (4, 0.5, 64, 1, "k_scaled", True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("priority", ["position", "probability", "random"])
@pytest.mark.parametrize("case", TWIN_CASES)
def test_matches_torch_twin(xp, case, priority, dtype):
    k, cf, gs, min_cap, mode, renorm = case
    n, e = 128, 8
    # float32: longest reduction = the n tokens of a mean (mean_prob, z-loss, confidence)
    tol = 1e-12 if dtype == np.float64 else default_tol(dtype, n)
    logits = make_logits(xp, n, e, seed=k * 7 + (gs or 0), dtype=dtype)
    logits = logits + xp.asarray(np.linspace(1.0, -0.5, e).astype(dtype))  # popular experts
    seed = 123
    res = R.route(logits, k, cf, gs, min_capacity=min_cap, capacity_mode=mode,
                  priority=priority, renormalize=renorm, rng=B.default_rng(seed))
    g = n if gs is None else gs
    order = None
    if priority == "random":  # the documented draw: argsort(rng.random((n_groups, k, G)))
        draw = np.random.default_rng(seed).random((n // g, k, g))
        order = torch.from_numpy(np.argsort(draw, axis=-1, kind="stable"))
    ref = twin_route(torch.from_numpy(h(logits)), k, cf, gs, min_cap, mode, priority, renorm,
                     order=order)

    assert res.capacity == ref["capacity"] and res.n_groups == ref["n_groups"]
    for name in ("expert_index", "kept", "slot", "load_before", "load_after"):
        assert_same(name, getattr(res, name), ref[name].numpy())
    for name in ("probs", "topk_prob", "combine_weight"):
        got = getattr(res, name)
        assert got.dtype == dtype, f"{name} dtype {got.dtype} != {np.dtype(dtype)}"
        assert_close(name, got, ref[name].numpy(), tol)
    for name in ("aux_loss", "z_loss", "dropped_fraction", "confidence"):
        assert_close(name, getattr(res, name), ref[name], tol)
    if cf:  # the case is meant to exercise dropping
        assert res.dropped_fraction > 0, "test case drops nothing; make it harder"
    else:
        assert res.dropped_fraction == 0 and bool(h(res.kept).all())


def test_capacity_formula_by_hand():
    assert R.capacity(4096, 16, 2, 1.25) == 320          # OpenMoE-Base: round(1.25*4096/16)
    assert R.capacity(4096, 16, 2, 2.0) == 512           # eval cf
    assert R.capacity(8, 4, 1, 1.25, min_capacity=0) == 2   # 2.5 -> 2 (half to even)
    assert R.capacity(24, 16, 1, 1.0, min_capacity=0) == 2  # 1.5 -> 2 (half to even)
    assert R.capacity(56, 16, 1, 1.0, min_capacity=0) == 4  # 3.5 -> 4
    assert R.capacity(16, 16, 1, 1.0) == 4                  # min_capacity wins
    assert R.capacity(16, 4, 2, 1.25, 0, "k_scaled") == 10  # ceil(2*1.25*16/4)
    assert R.capacity(16, 8, 2, 1.1, 0, "k_scaled") == 5    # ceil(4.4)
    assert R.capacity(16, 4, 2, 0) == 16 and R.capacity(16, 4, 2, None) == 16  # dropless
    for args in [(8, 4, 1, 1.25, 0, "openmoe"), (24, 16, 1, 1.0, 0, "openmoe"),
                 (100, 6, 3, 0.7, 2, "k_scaled"), (4096, 16, 2, 1.25, 4, "openmoe")]:
        assert R.capacity(*args) == twin_capacity(*args)


# ------------------------------------------------------------------ properties

@pytest.mark.parametrize("priority", ["position", "probability", "random"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_capacity_never_exceeded_and_ranks_in_order(xp, priority, k):
    n, e, gs = 96, 6, 24
    logits = make_logits(xp, n, e, seed=5 + k, scale=1.5)
    # make expert 2 popular so some experts overflow
    logits[:, 2] += 1.5
    res = R.route(logits, k, 1.0, gs, min_capacity=1, priority=priority, rng=B.default_rng(0))
    ei, kept, slot = h(res.expert_index), h(res.kept), h(res.slot)
    grp = group_of(res, n)
    assert res.dropped_fraction > 0
    assert np.all((slot == -1) == ~kept)
    assert np.all(h(res.combine_weight)[~kept] == 0)
    for g in range(res.n_groups):
        for ex in range(e):
            here = (grp[:, None] == g) & (ei == ex)
            slots = np.sort(slot[here & kept])
            assert len(slots) <= res.capacity
            assert np.array_equal(slots, np.arange(len(slots))), f"slots {slots}"
            # every rank-j choice is served before any rank-(j+1) choice
            for j in range(k - 1):
                lower = slot[:, j][here[:, j]]
                upper = slot[:, j + 1:][here[:, j + 1:]]
                if lower.size and np.any(upper >= 0):
                    assert np.all(lower >= 0), "a later rank kept while an earlier rank dropped"
                    assert lower.max() < upper[upper >= 0].min()


def test_position_drop_means_expert_full_of_earlier_first_choices(xp):
    n, e, gs = 128, 8, 32
    logits = make_logits(xp, n, e, seed=11)
    logits[:, 0] += 2.0
    res = R.route(logits, 2, 1.0, gs, min_capacity=1)
    ei, kept = h(res.expert_index), h(res.kept)
    grp = group_of(res, n)
    dropped0 = np.flatnonzero(~kept[:, 0])
    assert len(dropped0) > 0
    for t in dropped0:
        earlier = (grp == grp[t]) & (np.arange(n) < t) & (ei[:, 0] == ei[t, 0]) & kept[:, 0]
        assert earlier.sum() == res.capacity


def test_second_choices_drop_at_perfect_balance(xp):
    """G=16, E=4, k=2, cf=1: C=4; each expert gets 4 first and 4 second choices -> every
    second choice drops under the OpenMoE formula, none under the k-scaled one."""
    n, e = 16, 4
    host = np.zeros((n, e))
    t = np.arange(n)
    host[t, t % e] = 2.0
    host[t, (t + 1) % e] = 1.0
    logits = xp.asarray(host.astype(np.float32))
    res = R.route(logits, 2, 1.0)
    assert res.capacity == 4
    assert np.array_equal(h(res.load_before), [8, 8, 8, 8])
    assert bool(h(res.kept)[:, 0].all()) and not bool(h(res.kept)[:, 1].any())
    assert res.dropped_fraction == 0.5
    assert np.array_equal(h(res.load_after), [4, 4, 4, 4])
    res_k = R.route(logits, 2, 1.0, capacity_mode="k_scaled")
    assert res_k.capacity == 8 and res_k.dropped_fraction == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_loss_is_k_at_perfect_balance(xp, k, dtype):
    e, reps = 6, 3
    tol = 1e-12 if dtype == np.float64 else default_tol(dtype, e * reps)   # means over <= 18 tokens
    base = np.array([1.3, 0.2, -0.4, 0.9, -1.1, 0.05])
    rows = [np.roll(base, s) for s in range(e)] * reps  # every expert equally often at every rank
    logits = xp.asarray(np.array(rows, dtype=dtype))
    res = R.route(logits, k, None, group_size=e)  # groups of E tokens: each group is balanced
    assert res.n_groups == reps
    assert_close("f", res.f, np.full((reps, e), k / e), tol)
    assert_close("mean_prob", res.mean_prob, np.full((reps, e), 1 / e), tol)
    assert_close("aux_loss", res.aux_loss, float(k), tol)


def test_aux_and_z_loss_match_hand_formula(xp):
    n, e, k, gs = 60, 5, 2, 20
    logits = make_logits(xp, n, e, seed=3, dtype=np.float64)
    z = h(logits)
    res = R.route(logits, k, 1.25, gs)
    aux = []
    for g in range(n // gs):
        zg = z[g * gs:(g + 1) * gs]
        p = np.exp(zg) / np.exp(zg).sum(1, keepdims=True)
        top = [set(np.argsort(-row)[:k]) for row in p]
        f = np.array([sum(i in s for s in top) / gs for i in range(e)])
        aux.append(e * np.sum(f * p.mean(0)))
    assert_close("aux_loss", res.aux_loss, np.mean(aux), 1e-12)
    assert_close("z_loss", res.z_loss, np.mean(np.log(np.exp(z).sum(1)) ** 2), 1e-12)
    assert_close("z_loss fn", R.z_loss(logits), np.mean(np.log(np.exp(z).sum(1)) ** 2), 1e-12)
    assert_close("load_balance_loss fn", R.load_balance_loss(res.probs, res.expert_index, e, n // gs),
                 np.mean(aux), 1e-12)


def test_softmax_stable_and_dtypes(xp):
    logits = make_logits(xp, 32, 8, seed=2) + 1000.0  # float32, exp would overflow unshifted
    res = R.route(logits, 2, 1.25)
    p = h(res.probs)
    assert np.isfinite(p).all() and np.allclose(p.sum(1), 1, rtol=0, atol=default_tol(np.float32, 8))
    for name in ("probs", "topk_prob", "combine_weight", "lse", "f", "mean_prob"):
        assert getattr(res, name).dtype == np.float32, name
    for name in ("expert_index", "slot", "load_before", "load_after"):
        assert getattr(res, name).dtype == np.int64, name
    assert res.kept.dtype == np.bool_
    base = make_logits(xp, 32, 8, seed=2).astype(np.float64)
    lse_ref = np.log(np.exp(h(base)).sum(1)) + 1000.0
    assert_close("lse", res.lse, lse_ref, default_tol(np.float32, 8))   # sum over E = 8
    # the scalar statistics are 0-d values of the logits' device (no host sync in route)
    for name in ("aux_loss", "z_loss", "confidence", "dropped_fraction"):
        v = getattr(res, name)
        assert v.shape == () and v.dtype == (np.float64 if name == "dropped_fraction" else np.float32), name
        assert B.array_module(v) is B.array_module(logits), name


def test_top_k_ties_go_to_lower_index(xp):
    p = xp.asarray(np.array([[0.25, 0.25, 0.25, 0.25],
                             [0.1, 0.4, 0.1, 0.4],
                             [0.3, 0.2, 0.3, 0.2]], dtype=np.float32))
    idx, val = R.top_k(p, 3)
    assert_same("index", idx, [[0, 1, 2], [1, 3, 0], [0, 2, 1]])
    assert_same("value", val, np.array([[0.25] * 3, [0.4, 0.4, 0.1], [0.3, 0.3, 0.2]], np.float32))
    # equal logits give exactly equal probabilities, so route breaks ties the same way
    res = R.route(xp.zeros((8, 4), dtype=xp.float32), 2, None)
    assert_same("route ties", res.expert_index, np.tile([0, 1], (8, 1)))


def overloaded_logits(xp, n=16, e=4, seed=0):
    """Every token's top choice is expert 0, with distinct probabilities."""
    host = np.zeros((n, e), dtype=np.float32)
    host[:, 0] = 2.0 + np.random.default_rng(seed).permutation(n).astype(np.float32) * 0.1
    return xp.asarray(host)


def test_probability_priority_keeps_most_confident(xp):
    logits = overloaded_logits(xp)
    res = R.route(logits, 1, 1.0, priority="probability")
    assert res.capacity == 4
    kept = np.flatnonzero(h(res.kept)[:, 0])
    best4 = np.argsort(-h(logits)[:, 0])[:4]
    assert set(kept) == set(best4)
    res_pos = R.route(logits, 1, 1.0, priority="position")
    assert np.array_equal(np.flatnonzero(h(res_pos.kept)[:, 0]), [0, 1, 2, 3])


def test_random_priority_reproducible_and_seed_dependent(xp):
    logits = overloaded_logits(xp, n=64)
    a = R.route(logits, 1, 1.0, priority="random", rng=B.default_rng(7))
    b = R.route(logits, 1, 1.0, priority="random", rng=B.default_rng(7))
    c = R.route(logits, 1, 1.0, priority="random", rng=B.default_rng(8))
    assert_same("same seed", a.slot, h(b.slot))
    assert not np.array_equal(h(a.kept), h(c.kept))
    assert int(h(a.kept).sum()) == a.capacity == 16
    with pytest.raises(ValueError, match="rng"):
        R.route(logits, 1, 1.0, priority="random")


def test_planted_late_overload_drops_only_at_the_end(xp):
    """Tokens 0..9 spread over 4 experts (0, 4, 8 on expert 0); from position 10 on every
    token picks expert 0. C = 64/4 = 16: expert 0 keeps tokens 0, 4, 8, 10..22, and
    drops exactly tokens 23..63."""
    n, e = 64, 4
    host = np.zeros((n, e), dtype=np.float32)
    t = np.arange(n)
    first = np.where(t < 10, t % e, 0)
    host[t, first] = 3.0
    res = R.route(xp.asarray(host), 1, 1.0)
    assert res.capacity == 16
    dropped = np.flatnonzero(~h(res.kept)[:, 0])
    assert np.array_equal(dropped, np.arange(23, 64))
    assert float(res.dropped_fraction) == pytest.approx(41 / 64)
    assert np.array_equal(h(res.load_before), [57, 3, 2, 2])
    assert np.array_equal(h(res.load_after), [16, 3, 2, 2])


def test_dispatch_indices_gather_and_combine(xp):
    n, e, k, gs, d = 96, 6, 2, 24, 5
    logits = make_logits(xp, n, e, seed=9)
    logits[:, 1] += 1.0
    res = R.route(logits, k, 1.0, gs, min_capacity=1, priority="probability")
    assert res.dropped_fraction > 0
    x = np.random.default_rng(1).normal(size=(n, d))
    flat_pos, token, rank = (h(a) for a in R.dispatch_indices(res))
    ei, kept, slot, w = h(res.expert_index), h(res.kept), h(res.slot), h(res.combine_weight)
    assert len(flat_pos) == kept.sum() and len(np.unique(flat_pos)) == len(flat_pos)
    assert np.all(kept[token, rank])
    buf = np.zeros((e, res.rows_per_expert, d))
    buf.reshape(-1, d)[flat_pos] = x[token]
    y = np.zeros((n, d))
    np.add.at(y, token, w[token, rank][:, None] * buf.reshape(-1, d)[flat_pos])
    y_ref = np.zeros((n, d))
    for tok in range(n):
        for j in range(k):
            if kept[tok, j]:
                col = (tok // gs) * res.capacity + slot[tok, j]
                assert np.array_equal(buf[ei[tok, j], col], x[tok])
                y_ref[tok] += w[tok, j] * x[tok]
    assert np.allclose(y, y_ref, atol=1e-12)


def test_assign_slots_block_with_explicit_order(xp):
    """assign_slots on its own: a reversed serving order keeps the last tokens."""
    ei = xp.asarray(np.zeros((1, 6, 1), dtype=np.int64))       # 6 tokens all want expert 0
    order = xp.asarray(np.arange(5, -1, -1).reshape(1, 1, 6))  # serve from the last token
    slot, kept = R.assign_slots(ei, None, 2, order=order, n_experts=2)
    assert_same("slot", slot[0, :, 0], [-1, -1, -1, -1, 1, 0])
    assert_same("kept", kept[0, :, 0], [False] * 4 + [True] * 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=5), "top_k=5"),
    (dict(top_k=0), "top_k=0"),
    (dict(priority="fifo"), "priority"),
    (dict(capacity_mode="tutel"), "capacity mode"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(capacity_factor=float("inf")), "capacity_factor"),
    (dict(group_size=7), "group_size=7"),
    (dict(group_size=0), "group_size=0"),
    (dict(min_capacity=-1), "min_capacity"),
])
def test_bad_arguments_one_line_errors(xp, kwargs, match):
    logits = make_logits(xp, 12, 4)
    args = dict(top_k=2) | kwargs
    with pytest.raises(ValueError, match=match) as info:
        R.route(logits, **args)
    assert "\n" not in str(info.value)


def test_bad_logits(xp):
    with pytest.raises(ValueError, match="2-D"):
        R.route(make_logits(xp, 12, 4).reshape(3, 4, 4), 2)
    with pytest.raises(ValueError, match="floating"):
        R.route(xp.zeros((4, 4), dtype=xp.int64), 2)


def test_group_size_at_least_n_is_one_group(xp):
    logits = make_logits(xp, 20, 4)
    a = R.route(logits, 2, 1.0, group_size=64)
    b = R.route(logits, 2, 1.0, group_size=None)
    assert a.n_groups == b.n_groups == 1 and a.group_size == 20
    assert_same("slot", a.slot, h(b.slot))
    assert math.isclose(a.confidence, float(h(a.probs).max(1).mean()), rel_tol=default_tol(np.float32, 20))
