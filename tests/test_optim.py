"""tinymoe.optim against torch: AdamW vs torch.optim.AdamW, Adafactor vs a torch reference
written from T5X's rule with a per-expert loop (tests/oracle/torch_adafactor.py),
clip_grad_norm_ vs torch, schedules by hand, state_dict round trips and error messages."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tinymoe import optim

from tests.oracle.compare import assert_close, default_tol, f32_tol
from tests.oracle.torch_adafactor import TorchAdafactor


class P:
    """Stand-in parameter: .data updated in place, .grad or None."""

    def __init__(self, a):
        self.data = a
        self.grad = None


SHAPES = [(7,), (5, 3), (2, 4, 6), (3, 1)]


def _init(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 0.5 + 0.1).astype(dtype) for s in shapes]


def _grads(shapes, n_steps, dtype, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_steps):
        # varying scale across steps, a non-zero mean, non-symmetric
        out.append([(rng.standard_normal(s) * (1 + 0.3 * k) + 0.05).astype(dtype) for s in shapes])
    return out


# --------------------------------------------------------------------------- AdamW


# float32: elementwise updates (n = 1); over 20 steps each rounds p once and adds an update
# of a few roundings on a step 20x smaller than p: depth 20.
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, f32_tol(1, depth=20))])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_torch(dtype, rtol, wd, threads):
    threads(2)                     # the (700, 300) parameter is 4 update chunks, split over threads
    shapes = SHAPES + [(700, 300)]
    inits = _init(shapes, dtype)
    ours = [P(a.copy()) for a in inits]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in inits]
    opt = optim.AdamW(ours, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    topt = torch.optim.AdamW(theirs, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd,
                             foreach=False)
    for k, gs in enumerate(_grads(shapes, 20, dtype)):
        for p, t, g in zip(ours, theirs, gs):
            p.grad = g.copy()
            t.grad = torch.tensor(g.copy())
        opt.step()
        topt.step()
        for j, (p, t) in enumerate(zip(ours, theirs)):
            assert p.data.dtype == dtype
            assert_close(f"step {k} param {j}", p.data, t.detach().numpy(), rtol)


def test_adamw_param_groups_and_lr_changes_match_torch():
    dtype = np.float64
    inits = _init(SHAPES, dtype, seed=3)
    ours = [P(a.copy()) for a in inits]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in inits]
    opt = optim.AdamW([{"params": ours[:2], "weight_decay": 0.2},
                       {"params": ours[2:], "lr": 1e-2, "betas": (0.9, 0.99)}],
                      lr=5e-2, weight_decay=0.0)
    topt = torch.optim.AdamW([{"params": theirs[:2], "weight_decay": 0.2},
                              {"params": theirs[2:], "lr": 1e-2, "betas": (0.9, 0.99)}],
                             lr=5e-2, weight_decay=0.0, foreach=False)
    for k, gs in enumerate(_grads(SHAPES, 20, dtype, seed=4)):
        for p, t, g in zip(ours, theirs, gs):
            if k % 5 == 3 and p is ours[1]:  # a parameter without a gradient is skipped
                p.grad, t.grad = None, None
                continue
            p.grad = g.copy()
            t.grad = torch.tensor(g.copy())
        if k == 10:  # a schedule changes the lr of every group
            optim.set_lr(opt, 2e-2)
            for tg in topt.param_groups:
                tg["lr"] = 2e-2
        opt.step()
        topt.step()
        for j, (p, t) in enumerate(zip(ours, theirs)):
            assert_close(f"step {k} param {j}", p.data, t.detach().numpy(), 1e-12)


def test_adamw_updates_in_place_and_keeps_dtype():
    a = np.ones((3, 4), np.float32)
    p = P(a)
    p.grad = np.full((3, 4), 0.5, np.float32)
    opt = optim.AdamW([p], lr=0.1)
    opt.step()
    assert p.data is a and a.dtype == np.float32 and np.all(a < 1)
    assert all(v.dtype == np.float32 for k, v in opt.state[0].items() if k != "step")
    opt.zero_grad()
    assert p.grad is None


def test_param_groups_for_decay():
    named = [("emb", P(np.zeros((10, 4)))), ("norm", P(np.zeros(4))),
             ("experts", P(np.zeros((2, 4, 3)))), ("bias", P(np.zeros(3)))]
    named.append(("tied_head", named[0][1]))  # tied weight yielded twice
    groups = optim.param_groups_for_decay(named, 0.1)
    assert [len(g["params"]) for g in groups] == [2, 2]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["params"][1] is named[2][1]  # expert weights decayed
    assert {id(p) for p in groups[1]["params"]} == {id(named[1][1]), id(named[3][1])}
    opt = optim.AdamW(groups, lr=1e-3)
    assert opt.param_groups[1]["weight_decay"] == 0.0


# --------------------------------------------------------------------------- Adafactor

AF_SHAPES = [(6, 5), (3, 5, 4), (7,), (2, 3), (6, 1), (2, 3, 1)]  # min_dim_size_to_factor=4:
# (6,5) factored; (3,5,4) and (2,3,1) factored per expert (an expert tensor whatever its
# size: T5X's explicit rule); (7,) unfactored; (2,3) and (6,1) matrices too small


def _spread_experts(arrays, lo, hi):
    """Scale expert e of every stacked [E, r, c] array by logspace(lo, hi)[e], in place, so
    the experts differ in scale by orders of magnitude (a whole-tensor RMS or clipping
    then gives a different update than the per-expert one)."""
    for a in arrays:
        if a.ndim == 3:
            a *= np.logspace(lo, hi, a.shape[0])[:, None, None].astype(a.dtype)
    return arrays


@pytest.mark.parametrize("cfg", [
    dict(),                                                   # relative step + param scale
    dict(lr=0.05),                                            # explicit lr, param scale
    dict(lr=0.02, scale_parameter=False, clip_threshold=0.5),  # clipping very active
    dict(beta1=0.9, weight_decay=0.1, lr=0.03),               # momentum + weight decay
    dict(warmup_init=True, decay_rate=0.6),
])
def test_adafactor_matches_torch_reference(cfg):
    dtype = np.float64
    inits = _spread_experts(_init(AF_SHAPES, dtype, seed=5), -2, 2)   # experts x 0.01 .. x 100
    ours = [P(a.copy()) for a in inits]
    theirs = [torch.tensor(a.copy()) for a in inits]
    opt = optim.Adafactor(ours, min_dim_size_to_factor=4, **cfg)
    ref_cfg = dict(cfg)
    if "eps" in ref_cfg:
        ref_cfg["eps1"], ref_cfg["eps2"] = ref_cfg.pop("eps")
    ref = TorchAdafactor(theirs, min_dim_size_to_factor=4, **ref_cfg)
    for k, gs in enumerate(_grads(AF_SHAPES, 20, dtype, seed=6)):
        gs = _spread_experts(gs, 1, -1)                                # gradients x 10 .. x 0.1
        for p, g in zip(ours, gs):
            p.grad = g.copy()
        opt.step()
        ref.step([torch.tensor(g) for g in gs])
        for j, (p, t) in enumerate(zip(ours, theirs)):
            assert_close(f"{cfg} step {k} param {j}", p.data, t.numpy(), 1e-10)
    # state memory: factored r + c, per expert E (r + c), unfactored full
    sizes = {k: v.shape for k, v in opt.state[0].items() if k != "step"}
    assert sizes["exp_avg_sq_row"] == (6,) and sizes["exp_avg_sq_col"] == (5,)
    s1 = opt.state[1]
    assert s1["exp_avg_sq_row"].shape == (3, 5) and s1["exp_avg_sq_col"].shape == (3, 4)
    s5 = opt.state[5]
    assert s5["exp_avg_sq_row"].shape == (2, 3) and s5["exp_avg_sq_col"].shape == (2, 1)
    for j in (2, 3, 4):
        assert opt.state[j]["exp_avg_sq"].shape == AF_SHAPES[j]
    n_mom = sum(math.prod(s) for s in AF_SHAPES) if cfg.get("beta1") is not None else 0
    assert opt.state_size() == (6 + 5) + 3 * (5 + 4) + 7 + 6 + 6 + 2 * (3 + 1) + n_mom


def test_adafactor_scale_and_clipping_are_per_expert():
    """The T5X rule on a stacked tensor equals updating each expert matrix as a separate
    parameter; with experts of different scales that differs from whole-tensor statistics
    (the pre-fix behaviour) by far more than rounding."""
    rng = np.random.default_rng(11)
    scales = np.array([0.01, 1.0, 30.0])[:, None, None]
    w = rng.standard_normal((3, 4, 6)) * scales                       # [E, r, c]
    grads = [rng.standard_normal((3, 4, 6)) * s for s in (1.0, 0.01, 50.0)]  # a spike: clipping
    p = P(w.copy())
    opt = optim.Adafactor([p], lr=0.1)
    sep = [P(w[e].copy()) for e in range(3)]
    opt_sep = optim.Adafactor(sep, lr=0.1, min_dim_size_to_factor=4)   # each [4, 6] factored
    for g in grads:
        p.grad = g.copy()
        opt.step()
        for e, q in enumerate(sep):
            q.grad = g[e].copy()
        opt_sep.step()
    for e in range(3):
        assert_close(f"expert {e}", p.data[e], sep[e].data, 1e-12)


def test_adafactor_clipping_is_active_in_tests():
    """The update clipping branch is exercised: a gradient whose U has RMS > 1 (a spike
    after small gradients) changes the result compared with clip_threshold=None."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((5, 6))
    g1, g2 = rng.standard_normal((5, 6)) * 0.01, rng.standard_normal((5, 6)) * 10
    res = []
    for clip in (1.0, None):
        p = P(a.copy())
        opt = optim.Adafactor([p], lr=0.1, clip_threshold=clip, min_dim_size_to_factor=2)
        for g in (g1, g2):
            p.grad = g.copy()
            opt.step()
        res.append(p.data)
    assert np.abs(res[0] - res[1]).max() > 1e-3
    # and the reference agrees with the clipped one
    t = torch.tensor(a.copy())
    ref = TorchAdafactor([t], lr=0.1, min_dim_size_to_factor=2)
    ref.step([torch.tensor(g1)])
    ref.step([torch.tensor(g2)])
    assert_close("clipped spike", res[0], t.numpy(), 1e-10)


def test_adafactor_default_factoring_threshold_and_float32():
    shapes = [(130, 128), (2, 128, 200), (127, 300), (128,)]
    inits = _init(shapes, np.float32, seed=8)
    ours = [P(a.copy()) for a in inits]
    theirs = [torch.tensor(a.astype(np.float64)) for a in inits]
    opt = optim.Adafactor(ours)  # min_dim_size_to_factor=128
    ref = TorchAdafactor(theirs)
    for gs in _grads(shapes, 5, np.float32, seed=9):
        for p, g in zip(ours, gs):
            p.grad = g
        opt.step()
        ref.step([torch.tensor(g.astype(np.float64)) for g in gs])
    assert opt.state[0]["exp_avg_sq_row"].shape == (130,)
    assert opt.state[0]["exp_avg_sq_col"].shape == (128,)
    assert opt.state[1]["exp_avg_sq_row"].shape == (2, 128)
    assert opt.state[1]["exp_avg_sq_col"].shape == (2, 200)
    assert opt.state[2]["exp_avg_sq"].shape == (127, 300)  # 127 < 128: unfactored
    for j, (p, t) in enumerate(zip(ours, theirs)):
        assert p.data.dtype == np.float32
        assert all(v.dtype == np.float32 for k, v in opt.state[j].items() if k != "step")
        # float64 reference; row/column means over <= 300 entries, 5 steps
        assert_close(f"float32 param {j}", p.data, t.numpy(), f32_tol(300, depth=5))


def test_adafactor_openmoe_schedule_sets_lr():
    p = P(np.ones((4, 4)))
    opt = optim.Adafactor([p], min_dim_size_to_factor=2)
    assert opt.param_groups[0]["lr"] is None
    optim.set_lr(opt, optim.inverse_sqrt(1))
    assert opt.param_groups[0]["lr"] == 0.01
    p.grad = np.full((4, 4), 2.0)
    opt.step()
    # first step: beta2 = 0, V = G^2 + eps1, U = sign(G) = 1, RMS(U) = 1 (no clip),
    # alpha = max(1e-3, RMS(p)=1) * 0.01 -> p = 1 - 0.01
    np.testing.assert_allclose(p.data, 0.99, rtol=1e-12)


def test_adafactor_bad_config():
    with pytest.raises(ValueError, match="relative_step"):
        optim.Adafactor([P(np.ones(3))], lr=None, relative_step=False)


# --------------------------------------------------------------------------- clip_grad_norm_


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clip_grad_norm_matches_torch(max_norm, dtype):
    n = sum(int(np.prod(s)) for s in SHAPES)       # the norm sums all elements
    rtol = 1e-12 if dtype == np.float64 else default_tol(dtype, n)
    rng = np.random.default_rng(10)
    gs = [(rng.standard_normal(s) + 0.2).astype(dtype) for s in SHAPES]
    ours = [P(np.zeros(s, dtype)) for s in SHAPES] + [P(np.zeros(2, dtype))]  # last: no grad
    theirs = [torch.zeros(s, dtype=torch.from_numpy(np.zeros(1, dtype)).dtype, requires_grad=True)
              for s in SHAPES]
    for p, t, g in zip(ours, theirs, gs):
        p.grad = g.copy()
        t.grad = torch.tensor(g.copy())
    total = optim.clip_grad_norm_(ours, max_norm)
    ttotal = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert isinstance(total, float)
    assert abs(total - float(ttotal)) <= rtol * float(ttotal), (total, float(ttotal))
    for p, t in zip(ours, theirs):
        assert p.grad.dtype == dtype
        assert_close("clipped grad", p.grad, t.grad.numpy(), rtol)
    assert ours[-1].grad is None
    if max_norm < total:
        new = math.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in ours[:-1]))
        # clipped to max_norm / (total + 1e-6), each grad rounded once more
        assert abs(new - max_norm) <= max_norm * (1e-6 / total + rtol)


def test_clip_grad_norm_nonfinite_leaves_grads():
    p = P(np.zeros(3))
    p.grad = np.array([1.0, np.inf, 2.0])
    assert math.isinf(optim.clip_grad_norm_([p], 1.0))
    assert p.grad[0] == 1.0 and p.grad[2] == 2.0


def test_scale_grads_for_accumulation():
    p, q = P(np.zeros(2)), P(np.zeros(2))
    p.grad = np.array([2.0, 4.0])
    optim.scale_grads_([p, q], 0.25)
    np.testing.assert_array_equal(p.grad, [0.5, 1.0])
    assert q.grad is None


# --------------------------------------------------------------------------- schedules


def test_inverse_sqrt_values():
    assert optim.inverse_sqrt(100) == pytest.approx(0.01, rel=1e-15)      # 1/sqrt(1e4)
    assert optim.inverse_sqrt(0) == pytest.approx(0.01, rel=1e-15)
    assert optim.inverse_sqrt(40_000) == pytest.approx(0.005, rel=1e-15)  # 1/sqrt(4e4)
    assert optim.inverse_sqrt(400, warmup_steps=100, scale=2.0) == pytest.approx(0.1, rel=1e-15)
    assert optim.inverse_sqrt(0, warmup_steps=0) == 1.0


def test_warmup_cosine_values():
    base, lo, w, n = 1e-3, 1e-4, 10, 110
    assert optim.warmup_cosine(0, base, w, n, lo) == pytest.approx(base / 11)
    assert optim.warmup_cosine(4, base, w, n, lo) == pytest.approx(base * 5 / 11)
    assert optim.warmup_cosine(w, base, w, n, lo) == pytest.approx(base)
    assert optim.warmup_cosine(60, base, w, n, lo) == pytest.approx((base + lo) / 2)  # half way
    assert optim.warmup_cosine(35, base, w, n, lo) == pytest.approx(lo + (base - lo) * (1 + math.sqrt(0.5)) / 2)
    assert optim.warmup_cosine(n, base, w, n, lo) == pytest.approx(lo)
    assert optim.warmup_cosine(n + 50, base, w, n, lo) == lo
    vals = [optim.warmup_cosine(s, base, w, n, lo) for s in range(n + 1)]
    assert all(b >= a for a, b in zip(vals[:w + 1], vals[1:w + 1]))
    assert all(b <= a for a, b in zip(vals[w:], vals[w + 1:]))
    assert optim.constant(123, 3e-4) == 3e-4
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.warmup_cosine(0, base, 20, 10)


def test_set_lr_all_groups():
    opt = optim.AdamW([{"params": [P(np.ones(2))]}, {"params": [P(np.ones(2))], "lr": 5.0}])
    assert optim.set_lr(opt, 0.25) == 0.25
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


# --------------------------------------------------------------------------- state_dict


def _make(kind, params):
    if kind == "adamw":
        return optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
                           lr=2e-2, weight_decay=0.05)
    return optim.Adafactor(params, beta1=0.9, min_dim_size_to_factor=4)


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_state_dict_round_trip_is_bitwise(kind):
    shapes = AF_SHAPES
    inits = _init(shapes, np.float32, seed=11)
    grads = _grads(shapes, 10, np.float32, seed=12)
    a = [P(x.copy()) for x in inits]
    opt_a = _make(kind, a)
    for gs in grads[:5]:
        for p, g in zip(a, gs):
            p.grad = g.copy()
        opt_a.step()
    sd = opt_a.state_dict()
    assert sd["steps"] == 5 and sd["type"] in ("AdamW", "Adafactor")
    for s in sd["state"].values():
        assert s["step"] == 5
        assert all(isinstance(v, np.ndarray) for k, v in s.items() if k != "step")
    b = [P(p.data.copy()) for p in a]
    opt_b = _make(kind, b)
    opt_b.load_state_dict(sd)
    assert opt_b.steps == 5
    # the saved dict is a copy: stepping A must not change what B loaded
    for gs in grads[5:]:
        for pa, pb, g in zip(a, b, gs):
            pa.grad, pb.grad = g.copy(), g.copy()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.data, pb.data)


def test_load_state_dict_errors():
    ps = [P(np.ones((4, 4))), P(np.ones(3))]
    opt = optim.AdamW(ps)
    for p in ps:
        p.grad = np.ones_like(p.data)
    opt.step()
    sd = opt.state_dict()

    def fresh():
        return optim.AdamW([P(np.ones((4, 4))), P(np.ones(3))])

    bad = {**sd, "state": {0: {**sd["state"][0], "exp_avg": np.zeros((4, 5))}, 1: sd["state"][1]}}
    with pytest.raises(ValueError, match=r"parameter 0 state 'exp_avg' has shape \(4, 5\), expected \(4, 4\)"):
        fresh().load_state_dict(bad)
    bad = {**sd, "state": {0: {"step": 1, "exp_avg": np.zeros((4, 4))}}}
    with pytest.raises(ValueError, match="state keys"):
        fresh().load_state_dict(bad)
    with pytest.raises(ValueError, match="optimizer has 2 parameters"):
        fresh().load_state_dict({**sd, "state": {**sd["state"], 7: sd["state"][1]}})
    with pytest.raises(ValueError, match="from AdamW, not Adafactor"):
        optim.Adafactor([P(np.ones(3))]).load_state_dict(sd)
    with pytest.raises(ValueError, match="params, optimizer has 3"):
        optim.AdamW([P(np.ones((4, 4))), P(np.ones(3)), P(np.ones(1))]).load_state_dict(sd)
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        fresh().load_state_dict({"weights": 1})
    # a failed load leaves the optimizer untouched
    o = fresh()
    with pytest.raises(ValueError):
        o.load_state_dict(bad)
    assert o.state == {} and o.steps == 0
    # string keys (e.g. after JSON) are accepted
    o.load_state_dict({**sd, "state": {str(k): v for k, v in sd["state"].items()}})
    assert o.state[1]["step"] == 1


def test_constructor_errors():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.AdamW([])
    with pytest.raises(ValueError, match="unknown keys"):
        optim.AdamW([{"params": [P(np.ones(2))], "weight_decy": 0.1}])
    with pytest.raises(ValueError, match="invalid betas"):
        optim.AdamW([P(np.ones(2))], betas=(0.9, 1.0))
    p = P(np.ones(2))
    with pytest.raises(ValueError, match="more than once"):
        optim.AdamW([{"params": [p]}, {"params": [p]}])


# --------------------------------------------------------------------------- configure_optimizers


def test_configure_optimizers_builds_the_training_optimizer():
    """One builder for train, bench and the lessons: decay on matrices only, AdamW with the
    config's betas and eps 1e-8, Adafactor as OpenMoE ran it; a bad name is one line."""
    from types import SimpleNamespace

    from tinymoe.train import TrainConfig, build_optimizer

    class Model:
        def __init__(self):
            self.w, self.b = P(np.ones((3, 2))), P(np.ones(2))

        def named_parameters(self):
            return [("w", self.w), ("b", self.b), ("w_tied", self.w)]   # tied: kept once

    m = Model()
    opt = optim.configure_optimizers(m, TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.1,
                                                    adam_beta1=0.8, adam_beta2=0.9))
    assert type(opt) is optim.AdamW
    (dec, nodec) = opt.param_groups
    assert dec["params"] == [m.w] and nodec["params"] == [m.b]
    assert (dec["weight_decay"], nodec["weight_decay"]) == (0.1, 0.0)
    assert dec["lr"] == 2e-3 and dec["betas"] == (0.8, 0.9) and dec["eps"] == 1e-8
    cfg = SimpleNamespace(optimizer="adafactor", lr=1e-2, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95)
    ada = optim.configure_optimizers(m, cfg)
    assert type(ada) is optim.Adafactor
    g = ada.param_groups[0]
    assert (g["lr"], g["decay_rate"], g["beta1"], g["clip_threshold"], g["scale_parameter"],
            g["relative_step"], g["weight_decay"]) == (1e-2, 0.8, None, 1.0, True, False, 0.01)
    assert ada.param_groups[1]["weight_decay"] == 0.0
    assert type(build_optimizer(m, TrainConfig(optimizer="adafactor"))) is optim.Adafactor
    with pytest.raises(ValueError, match="optimizer='sgd' is not one of adamw, adafactor"):
        optim.configure_optimizers(m, SimpleNamespace(optimizer="sgd", lr=1.0, weight_decay=0.0,
                                                      adam_beta1=0.9, adam_beta2=0.9))
