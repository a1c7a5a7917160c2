"""The MoE layer (tinymoe/nn/moe.py) against its torch twin, and the dropping properties."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tinymoe
from tinymoe import backend as B
from tinymoe.config import get_preset
from tinymoe.nn.moe import MoE, Router, combine, dispatch, gather_rows, grouped_matmul, route_differentiable
from tinymoe.routing import dispatch_indices

from tests.oracle.compare import assert_close, check_against_torch, default_tol
from tests.oracle.torch_moe import twin_moe


def moe_tol(cfg, n_tokens):
    """1e-8 in float64; float32: ``default_tol`` with the longest reduction (d, the expert
    width, E, or the tokens a weight gradient sums over) and 8 stages (router, softmax,
    expert up/gate and down, combine: 4 forward, 4 backward)."""
    if cfg.dtype == "float64":
        return 1e-8
    return default_tol(cfg.dtype, max(cfg.d_model, cfg.expert_ff, cfg.n_experts, n_tokens), 8)


def make_cfg(dtype="float64", k=2, cf=0.5, E=4, d=8, f=12, group_size=None, priority="position",
             renormalize=False, mode="openmoe", min_capacity=1):
    return get_preset("toy", d_model=d, n_experts=E, top_k=k, d_ff_expert=f, capacity_factor=cf,
                      eval_capacity_factor=cf, group_size=group_size, slot_priority=priority,
                      renormalize=renormalize, capacity_mode=mode, min_capacity=min_capacity,
                      dtype=dtype)


def make_weights(cfg, seed=1):
    """Non-symmetric, non-zero weights; the router scale spreads the probabilities so that
    float32 and float64 agree on every top-k and priority decision."""
    rng = np.random.default_rng(seed)
    d, E, f = cfg.d_model, cfg.n_experts, cfg.expert_ff
    return {
        "router.weight": rng.normal(0.1, 0.8, size=(d, E)),
        "experts.w_gate": rng.normal(0.05, 0.4, size=(E, d, f)),
        "experts.w_up": rng.normal(-0.05, 0.4, size=(E, d, f)),
        "experts.w_down": rng.normal(0.02, 0.3, size=(E, f, d)),
    }


def random_order(seed, n_groups, k, g):
    """The slot order of priority "random" as the spec defines it (one permutation per
    group and rank from the caller's generator)."""
    return np.argsort(np.random.default_rng(seed).random((n_groups, k, g)), axis=-1, kind="stable")


def run_both(cfg, bsz=2, seq=16, seed=0):
    """Forward + backward of our MoE and the torch twin on the same weights and input."""
    dt = np.dtype(cfg.dtype)
    weights = make_weights(cfg)
    moe = MoE(cfg, rng=B.default_rng(0))
    moe.load_state_dict(weights)
    rng = np.random.default_rng(seed)
    x_np = rng.normal(0.1, 1.0, size=(bsz, seq, cfg.d_model)).astype(dt)
    g_np = rng.normal(size=(bsz, seq, cfg.d_model)).astype(dt)
    c_aux, c_z = 1.3, 0.5

    x = tinymoe.Tensor(B.to_device(x_np), requires_grad=True)
    y, aux, z, stats = moe(x, rng=np.random.default_rng(7))
    loss = (y * tinymoe.Tensor(B.to_device(g_np))).sum() + aux * c_aux + z * c_z
    loss.backward()

    tw = {k: torch.tensor(v.astype(dt), requires_grad=True) for k, v in weights.items()}
    xt = torch.tensor(x_np, requires_grad=True)
    n_tokens = bsz * seq
    g_eff = seq if cfg.group_size is None else min(cfg.group_size, n_tokens)
    order = torch.tensor(random_order(7, n_tokens // g_eff, cfg.top_k, g_eff))
    ref = twin_moe(xt, tw["router.weight"], tw["experts.w_gate"], tw["experts.w_up"],
                   tw["experts.w_down"], cfg.top_k, cfg.capacity_factor, cfg.group_size,
                   cfg.min_capacity, cfg.capacity_mode, cfg.slot_priority, cfg.renormalize,
                   order=order)
    loss_t = (ref["y"] * torch.tensor(g_np)).sum() + ref["aux"] * c_aux + ref["z"] * c_z
    loss_t.backward()
    params = dict(moe.named_parameters())
    return dict(y=y, aux=aux, z=z, stats=stats, x=x, params=params, ref=ref, xt=xt, tw=tw)


CASES = [  # (k, cf, priority, renormalize, group_size, mode, E, expect_drops)
    (1, 0.5, "position", False, None, "openmoe", 4, True),
    (2, 0.5, "position", False, None, "openmoe", 4, True),
    (2, 0.75, "probability", False, None, "openmoe", 4, True),
    (2, 0.5, "random", False, None, "openmoe", 4, True),
    (4, 0.5, "position", False, None, "openmoe", 6, True),
    (2, 0.0, "position", False, None, "openmoe", 4, False),     # dropless
    (2, 0.5, "position", False, None, "k_scaled", 4, True),
    (2, 0.5, "position", True, None, "openmoe", 4, True),       # renormalised top-k
    (2, 0.5, "probability", True, 8, "openmoe", 4, True),       # 4 groups of 8 tokens
    (1, 1.0, "position", False, 8, "k_scaled", 4, True),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("k,cf,priority,renorm,group,mode,E,drops", CASES)
def test_moe_matches_torch(dtype, k, cf, priority, renorm, group, mode, E, drops):
    cfg = make_cfg(dtype, k=k, cf=cf, E=E, group_size=group, priority=priority,
                   renormalize=renorm, mode=mode)
    r = run_both(cfg)
    tol, ref, stats = moe_tol(cfg, 2 * 16), r["ref"], r["stats"]
    np.testing.assert_array_equal(B.to_numpy(stats.kept), ref["kept"].numpy())
    np.testing.assert_array_equal(B.to_numpy(stats.expert_index), ref["expert_index"].numpy())
    assert stats.capacity == ref["capacity"] and stats.n_groups == ref["n_groups"]
    if drops:
        assert stats.dropped_fraction > 0, "this case is meant to drop assignments"
    else:
        assert stats.dropped_fraction == 0
    assert r["y"].dtype == np.dtype(dtype) and r["aux"].dtype == np.dtype(dtype)
    assert r["aux"].shape == () and r["z"].shape == ()
    assert_close("y", r["y"], ref["y"], tol)
    assert_close("aux", r["aux"], ref["aux"], tol)
    assert_close("z", r["z"], ref["z"], tol)
    assert_close("grad x", r["x"].grad, r["xt"].grad, tol)
    for name, p in r["params"].items():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(f"grad {name}", p.grad, r["tw"][name].grad, tol)


def test_moe_matches_torch_on_backend(backend):
    """The same comparison on every available backend (CuPy when a GPU is present)."""
    cfg = make_cfg("float64", k=2, cf=0.5, priority="probability", group_size=8)
    r = run_both(cfg)
    assert r["stats"].dropped_fraction > 0
    assert B.array_module(r["y"].data) is B.xp
    for key in ("y", "aux", "z"):
        assert_close(key, r[key], r["ref"][key], 1e-8)
    assert_close("grad x", r["x"].grad, r["xt"].grad, 1e-8)
    for name, p in r["params"].items():
        assert_close(f"grad {name}", p.grad, r["tw"][name].grad, 1e-8)


@pytest.mark.parametrize("renorm", [False, True])
def test_each_router_loss_gradient(renorm):
    """Combine weights, L_aux and L_z each checked alone (no term can hide behind another)."""
    rng = np.random.default_rng(3)
    logits_np = rng.normal(0.2, 1.5, size=(24, 5))
    for which in range(3):
        gw = rng.normal(size=(24, 2))
        zt = tinymoe.Tensor(logits_np.copy(), requires_grad=True)
        w, aux, z, res = route_differentiable(zt, 2, 0.6, 8, 1, renormalize=renorm)
        assert res.dropped_fraction > 0
        out = [(w * tinymoe.Tensor(gw)).sum(), aux, z][which]
        out.backward()

        lt = torch.tensor(logits_np, requires_grad=True)
        p = torch.softmax(lt, -1)
        idx = torch.tensor(B.to_numpy(res.expert_index))
        kept = torch.tensor(B.to_numpy(res.kept))
        top = p.gather(1, idx)
        if renorm:
            top = top / top.sum(1, keepdim=True)
        w_t = torch.where(kept, top, torch.zeros_like(top))
        f = torch.zeros(24, 5, dtype=torch.float64).scatter_(1, idx, 1.0).reshape(3, 8, 5).mean(1)
        aux_t = (5 * (f * p.reshape(3, 8, 5).mean(1)).sum(1)).mean()
        z_t = (torch.logsumexp(lt, -1) ** 2).mean()
        out_t = [(w_t * torch.tensor(gw)).sum(), aux_t, z_t][which]
        out_t.backward()
        assert_close(f"forward {which}", out, out_t, 1e-12)
        assert_close(f"grad logits {which}", zt.grad, lt.grad, 1e-10)


def _swiglu_np(x, wg, wu, wd):
    a = x @ wg
    return (a / (1 + np.exp(-a)) * (x @ wu)) @ wd


def test_dropped_assignments_contribute_nothing():
    """y equals the sum over KEPT assignments only, computed directly; a token whose every
    assignment was dropped gets y = 0 and no gradient through the MoE; the combine weight of
    a dropped assignment is 0 and receives 0 gradient."""
    cfg = make_cfg("float64", k=1, cf=0.5, E=4)      # C = 2 per expert for 16 tokens: many drops
    moe = MoE(cfg, rng=B.default_rng(0))
    weights = make_weights(cfg)
    moe.load_state_dict(weights)
    rng = np.random.default_rng(5)
    x_np = rng.normal(0.1, 1.0, size=(2, 16, cfg.d_model))
    x = tinymoe.Tensor(x_np, requires_grad=True)
    tokens = x.reshape(32, cfg.d_model)
    w, aux, z, res = route_differentiable(moe.router(tokens), 1, cfg.capacity_factor, 16, 1)
    w.retain_grad()
    y, _, _, stats = moe(x)
    np.testing.assert_array_equal(stats.kept, res.kept)

    kept = res.kept
    assert 0 < kept.sum() < kept.size
    y_ref = np.zeros((32, cfg.d_model))
    for n, j in zip(*np.nonzero(kept)):
        e = res.expert_index[n, j]
        y_ref[n] += res.combine_weight[n, j] * _swiglu_np(
            x_np.reshape(32, -1)[n], weights["experts.w_gate"][e], weights["experts.w_up"][e],
            weights["experts.w_down"][e])
    assert_close("y kept-only", y.reshape(32, -1), y_ref, 1e-12)

    all_dropped = ~kept.any(axis=1)
    assert all_dropped.any()
    assert np.all(y.data.reshape(32, -1)[all_dropped] == 0)
    assert np.all(res.combine_weight[~kept] == 0)

    # the gradient of a loss on y alone: dropped tokens get exactly zero
    g = rng.normal(size=y.shape)
    (y * tinymoe.Tensor(g)).sum().backward()
    assert np.all(x.grad.reshape(32, -1)[all_dropped] == 0)
    assert np.any(x.grad.reshape(32, -1)[~all_dropped] != 0)

    # the routing Function's weights: a dropped assignment gets zero gradient
    flat_pos, token, rank = dispatch_indices(res)
    buf = dispatch(tokens, flat_pos, token, 4, res.rows_per_expert)
    yy = combine(moe.experts(buf), w, flat_pos, token, rank, 32)
    (yy * tinymoe.Tensor(g.reshape(32, -1))).sum().backward()
    assert np.all(w.grad[~kept] == 0) and np.any(w.grad[kept] != 0)


def test_stats_modes_and_errors():
    cfg = make_cfg("float32", k=2, cf=1.25).replace(eval_capacity_factor=2.0, min_capacity=4)
    moe = MoE(cfg, layer_idx=3, rng=B.default_rng(0))
    x = tinymoe.Tensor(np.random.default_rng(0).normal(size=(2, 64, cfg.d_model)).astype(np.float32))
    _, _, _, s_train = moe(x)
    moe.eval()
    y, aux, z, s_eval = moe(x)
    assert s_train.capacity == round(1.25 * 64 / 4) and s_eval.capacity == round(2.0 * 64 / 4)
    assert s_eval.layer == 3 and s_eval.batch_shape == (2, 64)
    assert s_eval.n_groups == 2 and s_eval.group_size == 64        # group = one sequence
    assert s_eval.expert_index.shape == (128, 2) and s_eval.kept.shape == (128, 2)
    assert s_eval.probs.shape == (128, 4) and s_eval.load_after.shape == (4,)
    assert int(s_eval.load_before.sum()) == 256
    assert y.dtype == np.float32 and aux.dtype == np.float32 and z.dtype == np.float32
    assert moe.router.weight.dtype == np.float32

    rnd = MoE(cfg.replace(slot_priority="random"), rng=B.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        rnd(x)
    with pytest.raises(ValueError, match="MoE expects x"):
        moe(tinymoe.Tensor(np.zeros((2, 3), dtype=np.float32)))


def test_router_init():
    r = Router(64, 16, rng=B.default_rng(0))
    w = B.to_numpy(r.weight.data)
    assert w.shape == (64, 16) and w.dtype == np.float32
    assert abs(w.std() - 0.02) < 0.003 and abs(w.mean()) < 0.003
    # one seeding rule: an explicit Generator, never a silent default seed
    with pytest.raises(TypeError, match="rng must be a NumPy Generator"):
        Router(64, 16, rng=None)
    with pytest.raises(TypeError, match="rng"):
        MoE(make_cfg())                                      # no rng at all
    again = Router(64, 16, rng=B.default_rng(0)).weight.data
    np.testing.assert_array_equal(B.to_numpy(again), w)      # same Generator seed, same draws
    assert [n for n, _ in r.named_parameters()] == ["weight"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grouped_matmul_matches_torch(dtype):
    """Per-expert GEMMs on rows sorted by expert, an expert without rows included: forward,
    d x and d W (zero for the empty expert) against a torch loop over the groups."""
    sizes = (3, 0, 5, 1)
    rng = np.random.default_rng(7)
    x = rng.normal(0.2, 1.0, size=(sum(sizes), 6))
    w = rng.normal(-0.1, 0.5, size=(len(sizes), 6, 4))

    def theirs(xt, wt):
        outs, lo = [], 0
        for e, n in enumerate(sizes):
            outs.append(xt[lo:lo + n] @ wt[e])
            lo += n
        return torch.cat(outs)

    check_against_torch(lambda a, b: grouped_matmul(a, b, np.array(sizes)), theirs, [x, w], dtype=dtype,
                        name="grouped_matmul")
    xt, wt = tinymoe.Tensor(x, requires_grad=True), tinymoe.Tensor(w, requires_grad=True)
    grouped_matmul(xt, wt, np.array(sizes)).sum().backward()
    assert np.all(wt.grad[1] == 0) and np.all(wt.grad[[0, 2, 3]] != 0)
    with pytest.raises(ValueError, match="do not split"):
        grouped_matmul(xt, wt, np.array([3, 0, 5, 2]))


def test_gather_rows_matches_torch():
    token = np.array([4, 0, 4, 2, 2, 2, 1])              # repeats: gradients must add up
    x = np.random.default_rng(8).normal(0.3, 1.0, size=(5, 3))
    check_against_torch(lambda a: gather_rows(a, token), lambda a: a[torch.tensor(token)], [x],
                        name="gather_rows")


def test_packed_experts_equal_the_full_buffer():
    """The layer's packed path (kept rows only, grouped matmuls) gives the same outputs and
    gradients as the [E, R, d] dispatch buffer with its empty slots."""
    cfg = make_cfg("float64", k=2, cf=0.5, E=4)
    moe = MoE(cfg, rng=B.default_rng(0))
    moe.load_state_dict(make_weights(cfg))
    x_np = np.random.default_rng(9).normal(0.1, 1.0, size=(2, 16, cfg.d_model))
    g = np.random.default_rng(10).normal(size=(2, 16, cfg.d_model))

    x1 = tinymoe.Tensor(x_np, requires_grad=True)
    y1, _, _, stats = moe(x1)                                                   # packed path
    (y1 * tinymoe.Tensor(g)).sum().backward()
    grads1 = {k: p.grad.copy() for k, p in moe.named_parameters()}
    assert 0 < stats.kept.sum() < stats.kept.size                               # drops happen
    moe.zero_grad()

    x2 = tinymoe.Tensor(x_np, requires_grad=True)
    tokens = x2.reshape(32, cfg.d_model)
    w, _, _, res = route_differentiable(moe.router(tokens), 2, cfg.capacity_factor, 16, 1)
    flat_pos, token, rank = dispatch_indices(res)
    buf = dispatch(tokens, flat_pos, token, 4, res.rows_per_expert)            # [E, R, d], empty slots 0
    y2 = combine(moe.experts(buf), w, flat_pos, token, rank, 32).reshape(2, 16, cfg.d_model)
    (y2 * tinymoe.Tensor(g)).sum().backward()
    assert_close("y packed vs buffer", y1, y2, 1e-12)
    assert_close("dx packed vs buffer", x1.grad, x2.grad, 1e-12)
    for k, p in moe.named_parameters():
        if k.startswith("experts"):
            assert_close(f"d{k} packed vs buffer", grads1[k], p.grad, 1e-12)
