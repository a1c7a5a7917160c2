"""Routing variants (tinymoe/routing_variants.py, tinymoe/nn/routers.py) against torch twins
written from their papers (tests/oracle/torch_variants.py), forward and backward, float64
and float32; config validation; fine-grained experts; the expert-choice leak."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import tinymoe
from tinymoe import backend as B
from tinymoe.config import count_parameters, get_preset
from tinymoe.nn.model import OpenMoE
from tinymoe.nn.moe import MoE
from tinymoe.nn.routers import update_biases
from tinymoe.routing_variants import bias_update, fine_grained, routing_changed

from tests.oracle.compare import assert_close
from tests.oracle.torch_variants import (twin_bias_update, twin_expert_choice, twin_noisy_logits,
                                         twin_shazeer_losses, twin_sigmoid_token_choice,
                                         twin_token_choice)
from tests.test_moe import make_weights, moe_tol

BSZ, SEQ = 2, 16


def variant_cfg(dtype="float64", **kw):
    base = dict(d_model=8, n_experts=4, top_k=2, d_ff_expert=12, min_capacity=1, dtype=dtype)
    return get_preset("toy", **{**base, **kw})


def run_variant(cfg, extra_weights=None, training=True, noise_seed=7):
    """Forward + backward of our MoE on fixed weights; returns what the twins compare."""
    dt = np.dtype(cfg.dtype)
    weights = make_weights(cfg)
    weights.update(extra_weights or {})
    moe = MoE(cfg, rng=B.default_rng(0))
    moe.load_state_dict(weights)
    moe.train(training)
    rng = np.random.default_rng(0)
    x_np = rng.normal(0.1, 1.0, size=(BSZ, SEQ, cfg.d_model)).astype(dt)
    g_np = rng.normal(size=(BSZ, SEQ, cfg.d_model)).astype(dt)
    x = tinymoe.Tensor(B.to_device(x_np), requires_grad=True)
    y, aux, z, stats = moe(x, rng=np.random.default_rng(noise_seed))
    ((y * tinymoe.Tensor(B.to_device(g_np))).sum() + aux * 1.3 + z * 0.5).backward()
    tw = {k: torch.tensor(np.asarray(v, dtype=dt), requires_grad=True) for k, v in weights.items()}
    xt = torch.tensor(x_np, requires_grad=True)
    return dict(moe=moe, x=x, y=y, aux=aux, z=z, stats=stats, tw=tw, xt=xt,
                tokens_t=xt.reshape(BSZ * SEQ, cfg.d_model), g=torch.tensor(g_np))


def backward_twin(r, ref):
    loss = (ref["y"].reshape(BSZ, SEQ, -1) * r["g"]).sum() + ref.get("aux", 0.0) * 1.3 + ref["z"] * 0.5
    loss.backward()


def compare_grads(r, tol, names):
    assert_close("grad x", r["x"].grad, r["xt"].grad, tol)
    params = dict(r["moe"].named_parameters())
    for name in names:
        assert_close(f"grad {name}", params[name].grad, r["tw"][name].grad, tol)


# ------------------------------------------------------------------------ expert choice

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("group", [None, 8])
def test_expert_choice_matches_torch(dtype, group):
    cfg = variant_cfg(dtype, router_type="expert_choice", capacity_mode="k_scaled",
                      capacity_factor=0.5, eval_capacity_factor=0.5, group_size=group)
    g = SEQ if group is None else group
    cap = int(np.ceil(2 * 0.5 * g / 4))                      # k_scaled: ceil(k cf G / E)
    r = run_variant(cfg)
    tw = r["tw"]
    logits = r["tokens_t"] @ tw["router.weight"]
    ref = twin_expert_choice(r["tokens_t"], logits, tw["experts.w_gate"], tw["experts.w_up"],
                             tw["experts.w_down"], cap, g)
    backward_twin(r, ref)
    st, tol = r["stats"], moe_tol(cfg, BSZ * SEQ)
    assert st.capacity == cap
    ours = np.zeros((BSZ * SEQ, 4), dtype=bool)
    ei, kept = B.to_numpy(st.expert_index), B.to_numpy(st.kept)
    ours[np.nonzero(kept)[0], ei[kept]] = True
    np.testing.assert_array_equal(ours, ref["chosen"].numpy())
    per_token = ours.sum(axis=1)
    assert per_token.min() == 0 and per_token.max() > 1, "case meant to give some tokens none, some several"
    assert st.dropped_fraction == pytest.approx(float((per_token == 0).mean()))
    np.testing.assert_array_equal(B.to_numpy(st.load_after), [cap * BSZ * SEQ // g] * 4)
    assert float(r["aux"].item()) == 0.0
    assert_close("y", r["y"], ref["y"].reshape(BSZ, SEQ, -1), tol)
    assert_close("z", r["z"], ref["z"], tol)
    compare_grads(r, tol, ["router.weight", "experts.w_gate", "experts.w_up", "experts.w_down"])


# ------------------------------------------------------------------------ bias balancing

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bias_balancing_matches_torch(dtype):
    rate = 0.01
    cfg = variant_cfg(dtype, router_bias_rate=rate, capacity_factor=1.0, eval_capacity_factor=1.0)
    bias0 = np.array([0.3, -0.2, 0.05, -0.1])                # large enough to change choices
    r = run_variant(cfg, {"router.bias": bias0})
    tw = r["tw"]
    logits = r["tokens_t"] @ tw["router.weight"]
    cap = int(round(1.0 * SEQ / 4))                           # openmoe: round(cf G / E)
    ref = twin_token_choice(r["tokens_t"], logits, tw["experts.w_gate"], tw["experts.w_up"],
                            tw["experts.w_down"], 2, cap, SEQ, bias=torch.tensor(bias0, dtype=logits.dtype))
    unbiased = twin_token_choice(r["tokens_t"], logits, tw["experts.w_gate"], tw["experts.w_up"],
                                 tw["experts.w_down"], 2, cap, SEQ)
    assert not torch.equal(ref["index"], unbiased["index"]), "the bias must change some choices here"
    backward_twin(r, ref)
    st, tol = r["stats"], moe_tol(cfg, BSZ * SEQ)
    np.testing.assert_array_equal(B.to_numpy(st.expert_index), ref["index"].numpy())
    np.testing.assert_array_equal(B.to_numpy(st.kept), ref["kept"].numpy())
    assert_close("y", r["y"], ref["y"].reshape(BSZ, SEQ, -1), tol)
    assert_close("aux", r["aux"], ref["aux"], tol)
    assert_close("z", r["z"], ref["z"], tol)
    compare_grads(r, tol, ["router.weight", "experts.w_gate", "experts.w_up", "experts.w_down"])
    bias = r["moe"].router.bias
    assert bias.grad is None, "the balancing bias must get no gradient"
    np.testing.assert_array_equal(B.to_numpy(bias.data), bias0.astype(dtype))   # moves per step, not per forward
    assert update_biases(r["moe"]) == 1
    expected = twin_bias_update(torch.tensor(bias0), ref["load"], rate).numpy()
    np.testing.assert_allclose(B.to_numpy(bias.data), expected.astype(dtype), rtol=0, atol=1e-7)
    assert not np.array_equal(expected, bias0)


def test_bias_moves_only_in_training_with_grad():
    cfg = variant_cfg(router_bias_rate=0.1)
    moe = MoE(cfg, rng=B.default_rng(0))
    x = tinymoe.Tensor(np.random.default_rng(0).normal(size=(2, 16, 8)))
    with moe.evaluating():
        moe(x)
    with tinymoe.no_grad():
        moe(x)
    assert moe.router.bias_load is None and update_biases(moe) == 0
    assert not np.any(B.to_numpy(moe.router.bias.data)), "eval or no_grad forwards must not move the bias"
    moe(x)
    assert not np.any(B.to_numpy(moe.router.bias.data)), "a forward alone must not move the bias"
    assert update_biases(moe) == 1 and moe.router.bias_load is None
    assert np.any(B.to_numpy(moe.router.bias.data))


def test_bias_moves_once_per_step_under_grad_accum():
    """grad_accum=2: the bias moves once per optimizer step, by one sign step of the load
    summed over both micro-batches (DeepSeek-V3 updates per training step), and both
    micro-batches are routed with the bias of the step's start."""
    from tinymoe.data import Batch  # noqa: PLC0415
    from tinymoe.train import build_optimizer, train_step  # noqa: PLC0415
    from tests.test_train import tcfg  # noqa: PLC0415

    rate = 0.01
    cfg = get_preset("toy", router_bias_rate=rate, aux_loss_coef=0.0, dtype="float64")
    model = OpenMoE(cfg, seed=0)
    rng = np.random.default_rng(0)
    batches = [Batch(x=rng.integers(0, 258, size=(2, 16)), y=rng.integers(0, 258, size=(2, 16)),
                     domain=np.zeros(2, dtype=np.int64)) for _ in range(2)]
    for blk in model.blocks:                                  # a start bias that changes choices
        if getattr(blk, "moe", None) is not None:
            blk.moe.router.bias.data[...] = rng.normal(0.0, 0.02, size=cfg.n_experts)
    routers_ = [blk.moe.router for blk in model.blocks if getattr(blk, "moe", None) is not None]
    b0 = [r.bias.data.copy() for r in routers_]
    with tinymoe.no_grad():                                   # the loads the step will see
        loads = [[B.to_numpy(st.load_before) for st in model(b.x).routing] for b in batches]
    summed = [loads[0][i] + loads[1][i] for i in range(len(routers_))]
    optimizer = build_optimizer(model, tcfg(Path("/nonexistent"), grad_accum=2))
    st = train_step(model, optimizer, iter(batches), lr=1e-3)
    assert st.bad is None
    per_micro_batch_differs = False
    for r, b, load, l0, l1 in zip(routers_, b0, summed, loads[0], loads[1]):
        expected = b + rate * np.sign(load.mean() - load)                   # [E]
        np.testing.assert_array_equal(B.to_numpy(r.bias.data), expected)
        assert r.bias_load is None
        twice = b + rate * np.sign(l0.mean() - l0) + rate * np.sign(l1.mean() - l1)
        per_micro_batch_differs |= not np.allclose(twice, expected)
    assert per_micro_batch_differs, "case meant to tell one update per step from one per micro-batch"


def test_bias_update_sign_rule():
    b = np.zeros(4)
    bias_update(b, np.array([10, 2, 4, 0]), 0.5)              # mean 4
    np.testing.assert_array_equal(b, [-0.5, 0.5, 0.0, 0.5])


def test_bias_balancing_evens_load_without_aux_loss():
    """A router that prefers expert 0 for almost every token: the bias alone (no aux loss,
    no weight update) spreads the load."""
    cfg = variant_cfg(router_bias_rate=0.01, top_k=1, aux_loss_coef=0.0, capacity_factor=0.0)
    moe = MoE(cfg, rng=B.default_rng(0))
    rng = np.random.default_rng(1)
    w = rng.normal(0.0, 0.3, size=(8, 4))
    w[:, 0] += 0.6
    moe.router.weight.data[...] = w
    x = tinymoe.Tensor(np.abs(rng.normal(size=(4, 16, 8))))
    ratio = []                                                # max load / mean load
    for _ in range(150):
        load = B.to_numpy(moe(x)[3].load_before)
        update_biases(moe)                                    # one "step" per forward here
        ratio.append(load.max() / load.mean())
    assert ratio[0] > 3.0, ratio[0]
    assert np.mean(ratio[-20:]) < 2.0, ratio[-20:]            # (4.0 = everything on one expert)


# ------------------------------------------------------------------------ sigmoid scores

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ["plain", "bias", "groups", "noise"])
def test_sigmoid_scores_match_torch(dtype, case):
    """DeepSeek-V3's sigmoid router (eq. 13-16) with capacity drops, against the twin: the
    same choices and drops, y, L_aux = k * the paper's sequence-wise balance loss (eq.
    17-20, alpha 1), z-loss, and every gradient (with noisy logits too)."""
    group = 8 if case == "groups" else None
    rate = 0.01 if case == "bias" else 0.0
    noise = case == "noise"
    cfg = variant_cfg(dtype, router_score="sigmoid", renormalize=True, capacity_factor=0.75,
                      eval_capacity_factor=0.75, group_size=group, router_bias_rate=rate,
                      router_noise=noise)
    g = SEQ if group is None else group
    cap = max(int(round(0.75 * g / 4)), 1)                       # openmoe: round(cf G / E)
    bias0 = np.array([0.3, -0.2, 0.05, -0.1])
    extra = {"router.bias": bias0} if rate else None
    if noise:
        extra = {"router.noise_weight": np.random.default_rng(5).normal(0.0, 0.5, size=(8, 4))}
    r = run_variant(cfg, extra, noise_seed=11)
    tw = r["tw"]
    logits = r["tokens_t"] @ tw["router.weight"]
    if noise:
        eps = torch.tensor(np.random.default_rng(11).standard_normal((BSZ * SEQ, 4)).astype(dtype))
        logits = twin_noisy_logits(r["tokens_t"], tw["router.weight"], tw["router.noise_weight"], eps)
    bias_t = torch.tensor(bias0, dtype=logits.dtype) if rate else None
    ref = twin_sigmoid_token_choice(r["tokens_t"], logits, tw["experts.w_gate"], tw["experts.w_up"],
                                    tw["experts.w_down"], 2, cap, g, bias=bias_t)
    ref["aux"] = 2 * ref["bal"]                                   # Switch top-k form = K * L_Bal
    if rate:
        plain = twin_sigmoid_token_choice(r["tokens_t"], logits, tw["experts.w_gate"], tw["experts.w_up"],
                                          tw["experts.w_down"], 2, cap, g)
        assert not torch.equal(ref["index"], plain["index"]), "the bias must change some choices here"
    backward_twin(r, ref)
    st, tol = r["stats"], moe_tol(cfg, BSZ * SEQ)
    assert st.capacity == cap and st.score == "sigmoid"
    np.testing.assert_array_equal(B.to_numpy(st.expert_index), ref["index"].numpy())
    np.testing.assert_array_equal(B.to_numpy(st.kept), ref["kept"].numpy())
    assert not ref["kept"].all(), "case meant to drop some assignments"
    np.testing.assert_allclose(B.to_numpy(st.probs).sum(axis=1), 1.0, rtol=1e-6)
    assert_close("y", r["y"], ref["y"].reshape(BSZ, SEQ, -1), tol)
    assert_close("aux", r["aux"], ref["aux"], tol)
    assert_close("z", r["z"], ref["z"], tol)
    compare_grads(r, tol, ["router.weight", "experts.w_gate", "experts.w_up", "experts.w_down"]
                  + (["router.noise_weight"] if noise else []))


def test_sigmoid_router_function_gradient_alone():
    """RouterFunction's sigmoid backward on its own (combine weights, aux and z-loss with
    separate upstream gradients), float64, against torch autograd on eq. 13-15 and 17-20."""
    from tinymoe import routing  # noqa: PLC0415
    from tinymoe.nn.moe import RouterFunction  # noqa: PLC0415

    rng = np.random.default_rng(4)
    n, E, k, g = 24, 6, 3, 12
    z_np = rng.normal(0.0, 2.0, size=(n, E))
    gw_np, ga, gz = rng.normal(size=(n, k)), 0.7, -0.4
    result = routing.route(z_np, k, 1.0, g, 1, "openmoe", "position", True, score="sigmoid")
    assert not result.kept.all()
    z = tinymoe.Tensor(z_np, requires_grad=True)
    w, aux, zl = RouterFunction.apply(z, result)
    ((w * tinymoe.Tensor(gw_np)).sum() + aux * ga + zl * gz).backward()

    zt = torch.tensor(z_np, requires_grad=True)
    s = torch.sigmoid(zt)
    idx = torch.tensor(result.expert_index)
    sel = s.gather(1, idx)
    gate = sel / sel.sum(-1, keepdim=True) * torch.tensor(result.kept)
    s_norm = s / s.sum(-1, keepdim=True)
    f = torch.zeros(n // g, E, dtype=zt.dtype)
    for gi in range(n // g):
        for e in range(E):
            f[gi, e] = (idx[gi * g:(gi + 1) * g] == e).any(dim=1).double().mean()
    aux_t = (E * (f * s_norm.reshape(n // g, g, E).mean(1)).sum(1)).mean()
    z_t = (torch.logsumexp(zt, -1) ** 2).mean()
    ((gate * torch.tensor(gw_np)).sum() + aux_t * ga + z_t * gz).backward()
    assert_close("w", w, gate, 1e-12)
    assert_close("aux", aux, aux_t, 1e-12)
    assert_close("grad z", z.grad, zt.grad, 1e-10)


# ------------------------------------------------------------------------ noisy gating

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("renorm", [True, False])
def test_noisy_gating_matches_torch(dtype, renorm):
    cfg = variant_cfg(dtype, router_noise=True, renormalize=renorm, capacity_factor=1.0)
    w_noise = np.random.default_rng(5).normal(0.0, 0.5, size=(8, 4))
    r = run_variant(cfg, {"router.noise_weight": w_noise}, noise_seed=11)
    tw = r["tw"]
    eps = torch.tensor(np.random.default_rng(11).standard_normal((BSZ * SEQ, 4)).astype(dtype))
    logits = twin_noisy_logits(r["tokens_t"], tw["router.weight"], tw["router.noise_weight"], eps)
    ref = twin_token_choice(r["tokens_t"], logits, tw["experts.w_gate"], tw["experts.w_up"],
                            tw["experts.w_down"], 2, int(round(SEQ / 4)), SEQ, renormalize=renorm)
    backward_twin(r, ref)
    st, tol = r["stats"], moe_tol(cfg, BSZ * SEQ)
    np.testing.assert_array_equal(B.to_numpy(st.expert_index), ref["index"].numpy())
    assert_close("y", r["y"], ref["y"].reshape(BSZ, SEQ, -1), tol)
    assert_close("aux", r["aux"], ref["aux"], tol)
    assert_close("z", r["z"], ref["z"], tol)
    compare_grads(r, tol, ["router.weight", "router.noise_weight", "experts.w_gate", "experts.w_down"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("renorm,group", [(True, None), (False, 8)])
def test_shazeer_balance_loss_matches_torch(dtype, renorm, group):
    """aux_loss_kind="shazeer" (Shazeer et al. 2017 eq. 6-11) with noisy gating and capacity
    drops: L_aux = CV(Importance)^2 + CV(Load)^2 against torch autograd on the paper's
    formula, and every gradient (router, W_noise, x, experts) of y, L_aux and L_z."""
    cfg = variant_cfg(dtype, router_noise=True, aux_loss_kind="shazeer", renormalize=renorm,
                      capacity_factor=1.0, group_size=group)
    g = SEQ if group is None else group
    w_noise = np.random.default_rng(5).normal(0.0, 0.5, size=(8, 4))
    r = run_variant(cfg, {"router.noise_weight": w_noise}, noise_seed=11)
    tw = r["tw"]
    eps = torch.tensor(np.random.default_rng(11).standard_normal((BSZ * SEQ, 4)).astype(dtype))
    logits = twin_noisy_logits(r["tokens_t"], tw["router.weight"], tw["router.noise_weight"], eps)
    ref = twin_token_choice(r["tokens_t"], logits, tw["experts.w_gate"], tw["experts.w_up"],
                            tw["experts.w_down"], 2, int(round(g / 4)), g, renormalize=renorm)
    ref["aux"] = twin_shazeer_losses(r["tokens_t"], tw["router.weight"], tw["router.noise_weight"],
                                     eps, 2, g, renorm)
    backward_twin(r, ref)
    st, tol = r["stats"], moe_tol(cfg, BSZ * SEQ)
    np.testing.assert_array_equal(B.to_numpy(st.expert_index), ref["index"].numpy())
    assert not ref["kept"].all(), "case meant to drop some assignments"
    assert st.aux_kind == "shazeer"
    assert_close("y", r["y"], ref["y"].reshape(BSZ, SEQ, -1), tol)
    assert_close("aux", r["aux"], ref["aux"], tol)
    assert_close("stats aux", st.aux_loss, ref["aux"], tol)
    assert_close("z", r["z"], ref["z"], tol)
    compare_grads(r, tol, ["router.weight", "router.noise_weight", "experts.w_gate", "experts.w_up",
                           "experts.w_down"])


def test_shazeer_loss_pieces_alone():
    """Each half on its own (float64): the importance half through RouterFunction and the
    load half through ShazeerLoad, against the twin with only that half's gradient."""
    from tinymoe import routing  # noqa: PLC0415
    from tinymoe.nn.moe import RouterFunction  # noqa: PLC0415
    from tinymoe.nn.routers import noisy_logits, shazeer_load_loss  # noqa: PLC0415

    rng = np.random.default_rng(9)
    n, d, E, k, g = 24, 5, 6, 2, 12
    x_np, wg_np, wn_np = rng.normal(size=(n, d)), rng.normal(0, 0.7, (d, E)), rng.normal(0, 0.5, (d, E))
    eps_np = rng.standard_normal((n, E))
    x, wg, wn = (tinymoe.Tensor(a, requires_grad=True) for a in (x_np, wg_np, wn_np))
    clean, u = x @ wg, x @ wn
    h = noisy_logits(clean, u, eps_np)
    res = routing.route(h.data, k, None, g, 1, "openmoe", "position", True)
    res = dataclasses.replace(res, aux_kind="shazeer")
    _, imp, _ = RouterFunction.apply(h, res)
    load = shazeer_load_loss(clean, u, eps_np, h.data, res.expert_index, res.n_groups)
    (imp * 0.3 + load * 1.7).backward()

    xt, wgt, wnt = (torch.tensor(a, requires_grad=True) for a in (x_np, wg_np, wn_np))
    total = twin_shazeer_losses(xt, wgt, wnt, torch.tensor(eps_np), k, g, True)
    # the twin's importance half written out again, so that load = total - importance
    ht = xt @ wgt + torch.tensor(eps_np) * TF.softplus(xt @ wnt)
    pt = torch.softmax(ht, -1)
    idx = torch.topk(ht.detach(), k, -1).indices
    gk = pt.gather(1, idx)
    gates = torch.zeros(n, E, dtype=ht.dtype).scatter(1, idx, gk / gk.sum(-1, keepdim=True))
    imp_t = torch.stack([gates[lo:lo + g].sum(0).var(unbiased=False) / gates[lo:lo + g].sum(0).mean() ** 2
                         for lo in range(0, n, g)]).mean()
    load_t = total - imp_t
    (imp_t * 0.3 + load_t * 1.7).backward()
    assert_close("importance", imp, imp_t, 1e-12)
    assert_close("load", load, load_t, 1e-12)
    for name, ours, theirs in (("x", x, xt), ("W_g", wg, wgt), ("W_noise", wn, wnt)):
        assert_close(f"grad {name}", ours.grad, theirs.grad, 1e-10)


def test_shazeer_loss_in_eval_has_no_noise():
    cfg = variant_cfg(router_noise=True, aux_loss_kind="shazeer", renormalize=True)
    moe = MoE(cfg, rng=B.default_rng(0))
    x = tinymoe.Tensor(np.random.default_rng(0).normal(size=(2, 16, 8)))
    with moe.evaluating():
        a = moe(x)[1].item()
        b = moe(x)[1].item()
    assert a == b and np.isfinite(a) and a > 0


def test_noise_only_in_training_and_seeded():
    cfg = variant_cfg(router_noise=True)
    moe = MoE(cfg, rng=B.default_rng(0))
    x = tinymoe.Tensor(np.random.default_rng(0).normal(size=(2, 16, 8)))
    with moe.evaluating():
        a = moe(x)[3].expert_index
        b = moe(x, rng=np.random.default_rng(1))[3].expert_index
    np.testing.assert_array_equal(a, b)                      # eval: no noise, no rng needed
    one = moe(x, rng=np.random.default_rng(3))[3].expert_index
    same = moe(x, rng=np.random.default_rng(3))[3].expert_index
    other = moe(x, rng=np.random.default_rng(4))[3].expert_index
    np.testing.assert_array_equal(one, same)
    assert not np.array_equal(one, other)
    with pytest.raises(ValueError, match="rng"):
        moe(x)


# ------------------------------------------------------------------------ fine-grained + shared

def test_fine_grained_keeps_parameters_and_compute():
    cfg = get_preset("mini")
    fg = fine_grained(cfg, 4, shared_experts=4)              # 4 shared small experts = d_ff width
    assert (fg.n_experts, fg.top_k, fg.expert_ff, fg.shared_ff) == (32, 8, 64, 256)
    a, b = count_parameters(cfg), count_parameters(fg)
    assert a["experts"] == b["experts"] and a["experts_active"] == b["experts_active"]
    assert a["shared_ffn"] == b["shared_ffn"]
    assert b["routers"] == 4 * a["routers"]                  # the router grows: [d, E] -> [d, 4 E]
    assert b["total"] - b["routers"] == a["total"] - a["routers"]
    assert count_parameters(fine_grained(cfg, 2, shared_experts=0))["shared_ffn"] == 0


def test_fine_grained_layer_equals_split_experts():
    """m copies of each router column and each expert cut into m slices of its hidden
    units (w_down scaled by m): with renormalised weights and no drops, the fine-grained
    layer computes exactly the original top-k layer (DeepSeekMoE's construction)."""
    m = 3
    cfg = variant_cfg(d_ff_expert=12, renormalize=True, capacity_factor=0.0, eval_capacity_factor=0.0)
    fg = fine_grained(cfg, m, shared_experts=0)
    w = make_weights(cfg)
    E, f = cfg.n_experts, cfg.expert_ff
    def cut(a):                                               # [E, d, f] -> [E m, d, f/m]
        return a.reshape(E, 8, m, f // m).transpose(0, 2, 1, 3).reshape(E * m, 8, f // m)

    split = {"router.weight": np.repeat(w["router.weight"], m, axis=1),         # [d, E m]
             "experts.w_gate": cut(w["experts.w_gate"]), "experts.w_up": cut(w["experts.w_up"]),
             "experts.w_down": m * w["experts.w_down"].reshape(E * m, f // m, 8)}
    x = tinymoe.Tensor(np.random.default_rng(2).normal(size=(2, 16, 8)))
    outs = []
    for c, weights in ((cfg, w), (fg, split)):
        moe = MoE(c, rng=B.default_rng(0))
        moe.load_state_dict(weights)
        outs.append(moe(x)[0].numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ validation

@pytest.mark.parametrize("kw,match", [
    (dict(router_type="expert_choice", capacity_factor=3.0, capacity_mode="k_scaled"), "larger than the group"),
    (dict(router_type="expert_choice", eval_capacity_factor=0.5, min_capacity=100), "larger than the group"),
    (dict(router_bias_rate=-0.1), "router_bias_rate=-0.1 < 0"),
    (dict(router_type="mixed"), "router_type='mixed' is not one of"),
    (dict(router_type="expert_choice", router_noise=True), "not supported"),
    (dict(d_ff_shared=0), "d_ff_shared=0"),
    (dict(router_score="tanh"), "router_score='tanh' is not one of softmax, sigmoid"),
    (dict(aux_loss_kind="gshard"), "aux_loss_kind='gshard' is not one of switch, shazeer"),
    (dict(aux_loss_kind="shazeer"), "needs router_noise=True"),
    (dict(aux_loss_kind="shazeer", router_noise=True, top_k=4, n_experts=4), "needs top_k < n_experts"),
    (dict(aux_loss_kind="shazeer", router_noise=True, router_bias_rate=0.1), "not supported"),
    (dict(router_score="sigmoid"), "needs renormalize=True"),
    (dict(router_score="sigmoid", renormalize=True, router_type="expert_choice",
          capacity_mode="k_scaled", capacity_factor=1.0), "not supported"),
])
def test_bad_variant_configs(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        get_preset("toy", **kw)
    assert "\n" not in str(e.value)


def test_config_without_new_variant_fields_loads_with_defaults():
    """A config saved before router_score / aux_loss_kind existed (an old checkpoint's)
    loads with OpenMoE's behaviour."""
    from tinymoe.config import ModelConfig  # noqa: PLC0415

    old = get_preset("toy").to_dict()
    for name in ("router_score", "aux_loss_kind"):
        old.pop(name)
    cfg = ModelConfig.from_dict(old)
    assert (cfg.router_score, cfg.aux_loss_kind) == ("softmax", "switch")
    assert cfg == get_preset("toy")


def test_fine_grained_refuses_bad_splits():
    with pytest.raises(ValueError, match="does not divide the expert FFN width 128"):
        fine_grained(get_preset("toy"), 3)
    with pytest.raises(ValueError, match="top_k=5 > n_experts=4"):
        fine_grained(get_preset("toy", top_k=5), 2)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        fine_grained(get_preset("toy"), 0)


@pytest.mark.parametrize("flags,match", [
    (["--router-type", "expert_choice", "--capacity-factor", "9", "--capacity-mode", "k_scaled"],
     "larger than the group"),
    (["--router-bias-rate", "-1"], "router_bias_rate"),
    (["--router-type", "nope"], "router_type"),
    (["--router-score", "sigmoid"], "needs renormalize=True"),
    (["--router-score", "relu"], "router_score"),
    (["--aux-loss-kind", "shazeer"], "needs router_noise=True"),
])
def test_cli_bad_variant_exit_2(capsys, tmp_path, flags, match):
    from tests.test_cli import InProcess, one_line_error  # noqa: PLC0415

    p = InProcess(capsys, "train", "--config", "toy", "--steps", "1", "--out", tmp_path / "r", *flags)
    one_line_error(p)
    assert match in p.stderr


@pytest.mark.parametrize("flags,match", [
    (["--fine-grained", "3"], "does not divide the expert FFN width 128"),
    (["--fine-grained", "0"], "split=0 must be an integer >= 1"),
    (["--fine-grained", "-2"], "split=-2 must be an integer >= 1"),
    (["--shared-experts", "-1"], "shared_experts=-1 must be an integer >= 0"),
    (["--fine-grained", "two"], "invalid int value"),
    (["--fine-grained", "2", "--n-experts", "3", "--top-k", "4"], "top_k=4 > n_experts=3"),
])
def test_cli_bad_fine_grained_exit_2(capsys, tmp_path, flags, match):
    from tests.test_cli import InProcess, one_line_error  # noqa: PLC0415

    p = InProcess(capsys, "train", "--config", "toy", "--steps", "1", "--out", tmp_path / "r", *flags)
    one_line_error(p, match=match)


def test_cli_fine_grained_refused_on_resume(capsys, tmp_path):
    from tests.test_cli import InProcess, one_line_error  # noqa: PLC0415

    p = InProcess(capsys, "train", "--resume", tmp_path / "nothing.npz", "--fine-grained", "2")
    one_line_error(p, match="a resumed run keeps its checkpoint's experts")


@pytest.mark.parametrize("flags,want", [
    # toy: 4 experts of width 128, top-2, shared FFN of width d_ff=128
    (["--fine-grained", "2", "--shared-experts", "1"], (8, 4, 64, True, 64)),
    (["--fine-grained", "4"], (16, 8, 32, True, None)),          # shared FFN left as it was
    (["--fine-grained", "2", "--shared-experts", "0"], (8, 4, 64, False, None)),
    (["--shared-experts", "3"], (4, 2, 128, True, 384)),          # no split: 3 experts' width
])
def test_cli_fine_grained_stores_concrete_shapes(capsys, tmp_path, flags, want):
    """``train --fine-grained M --shared-experts S`` trains the split layer; the checkpoint
    holds its shapes (no M), so loading it needs nothing else."""
    from tinymoe.checkpoint import load_checkpoint, load_model  # noqa: PLC0415
    from tests.test_cli import InProcess  # noqa: PLC0415

    out = tmp_path / "r"
    p = InProcess(capsys, "train", "--config", "toy", "--steps", "1", "--batch-size", "2",
                  "--seq-len", "16", "--eval-batches", "1", "--snapshot-every", "0",
                  "--max-chars", "4000", "--out", out, "--quiet", "--threads", "1", *flags)
    assert p.returncode == 0, p.stderr
    cfg = load_checkpoint(out / "checkpoint.npz").model_config
    assert (cfg.n_experts, cfg.top_k, cfg.expert_ff, cfg.shared_ffn, cfg.d_ff_shared) == want
    assert "fine_grained" not in cfg.to_dict() and "split" not in cfg.to_dict()
    model, _, _ = load_model(out / "checkpoint.npz")
    moe = next(b.moe for b in model.blocks if getattr(b, "moe", None) is not None)
    assert tuple(moe.experts.w_gate.shape) == (want[0], cfg.d_model, want[2])
    base = get_preset("toy")
    assert count_parameters(cfg)["experts"] == count_parameters(base)["experts"]


def test_help_lists_variant_fields(capsys):
    from tests.test_cli import InProcess  # noqa: PLC0415

    p = InProcess(capsys, "train", "--help")
    for flag in ("--router-type", "--router-noise", "--router-bias-rate", "--d-ff-shared",
                 "--fine-grained", "--shared-experts", "--router-score", "--aux-loss-kind"):
        assert flag in p.stdout
    assert "expert_choice" in p.stdout


# ------------------------------------------------------------------------ the leak

def test_expert_choice_leaks_token_choice_top1_does_not():
    ids = np.random.default_rng(0).integers(0, 258, size=(4, 32))
    ec = OpenMoE(get_preset("toy", router_type="expert_choice", capacity_mode="k_scaled",
                            capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1), seed=0)
    top1 = OpenMoE(get_preset("toy", top_k=1, eval_capacity_factor=0.5, min_capacity=1), seed=0)
    leak = routing_changed(ec, ids, 16)
    causal = routing_changed(top1, ids, 16)
    assert leak["changed"] > 0.05, leak
    assert causal["changed"] == 0.0, causal


# ------------------------------------------------------------------------ exact resume

@pytest.mark.parametrize("variant", [
    dict(router_bias_rate=0.01, aux_loss_coef=0.0),
    dict(router_bias_rate=0.01, aux_loss_coef=0.0, grad_accum=2),
    dict(router_noise=True, renormalize=True),
    dict(router_type="expert_choice", capacity_mode="k_scaled", capacity_factor=1.0,
         eval_capacity_factor=1.0, min_capacity=1),
    dict(router_score="sigmoid", renormalize=True, router_bias_rate=0.01, aux_loss_coef=0.0),
    dict(router_noise=True, renormalize=True, aux_loss_kind="shazeer"),
])
def test_variant_resume_is_bitwise_exact(tmp_path, variant):
    """The bias (a router 'parameter' without gradient) and the noise RNG (the trainer's
    routing RNG) are in the checkpoint: 2 + 2 steps equal 4 steps bit for bit."""
    from tinymoe.checkpoint import load_checkpoint  # noqa: PLC0415
    from tinymoe.train import train  # noqa: PLC0415
    from tests.test_train import tcfg  # noqa: PLC0415

    variant = dict(variant)
    accum = variant.pop("grad_accum", 1)
    model_cfg = get_preset("toy", **variant)
    straight = train(model_cfg, tcfg(tmp_path, "straight", grad_accum=accum), progress=False)
    first = train(model_cfg, tcfg(tmp_path, "split", stop_at=2, grad_accum=accum), progress=False)
    second = train(None, tcfg(tmp_path, "split", resume=first.checkpoint, grad_accum=accum),
                   progress=False)
    assert second.status == "done" and second.step == 4
    a = load_checkpoint(straight.checkpoint).model_state
    b = load_checkpoint(second.checkpoint).model_state
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert np.array_equal(v, b[k]), f"{k} differs after resume"
    assert straight.losses[2:] == second.losses
    if variant.get("router_bias_rate"):
        assert np.any(a["blocks.1.moe.router.bias"]), "the bias must have moved"
    if variant.get("router_noise"):
        assert np.any(a["blocks.1.moe.router.noise_weight"]), "W_noise must have trained"


# ------------------------------------------------------------------------ devices

@pytest.mark.parametrize("variant", [
    dict(router_type="expert_choice", capacity_mode="k_scaled", capacity_factor=0.5, eval_capacity_factor=0.5),
    dict(router_noise=True, renormalize=True),
    dict(router_bias_rate=0.01),
    dict(router_score="sigmoid", renormalize=True),
    dict(router_noise=True, renormalize=True, aux_loss_kind="shazeer"),
])
def test_variants_same_on_every_backend(backend, variant):
    """The same float64 forward, backward and bias update on the active backend as on
    NumPy (the CuPy case runs only where a GPU is visible)."""
    cfg = variant_cfg(**variant)
    extra = ({"router.noise_weight": np.full((8, 4), 0.1)} if variant.get("router_noise") else
             {"router.bias": np.array([0.1, -0.1, 0.0, 0.05])} if variant.get("router_bias_rate") else None)
    r = run_variant(cfg, extra)
    B.set_device("cpu")
    try:
        ref = run_variant(cfg, extra)
    finally:
        B.set_device(backend)
    np.testing.assert_array_equal(B.to_numpy(r["stats"].kept), B.to_numpy(ref["stats"].kept))
    np.testing.assert_allclose(r["y"].numpy(), ref["y"].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(B.to_numpy(r["x"].grad), B.to_numpy(ref["x"].grad), rtol=1e-10, atol=1e-12)
    for name, p in r["moe"].named_parameters():
        q = dict(ref["moe"].named_parameters())[name]
        np.testing.assert_allclose(B.to_numpy(p.data), B.to_numpy(q.data), rtol=1e-12, atol=1e-14)
