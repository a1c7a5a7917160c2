"""The OpenMoE decoder (tinymoe/nn/model.py) against its torch twin; names, cache, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tinymoe
from tinymoe import backend as B
from tinymoe.config import get_preset, parameter_shapes
from tinymoe.nn.model import OpenMoE

from tests.oracle.compare import assert_close, default_tol, f32_tol
from tests.oracle.torch_model import twin_model


def model_tols(cfg, n_tokens):
    """(forward tol, gradient tol) for comparing the model with its twin in cfg.dtype.

    float64: 1e-8. float32 (tests/oracle/compare.py f32_tol): the longest reduction of a
    forward pass is over d_model, d_ff, the attention width or the tokens of a weight
    gradient; the backward pass adds the LM head's sum over the vocabulary. A forward pass
    chains 2 * n_layers + 2 stages (embedding, attention and FFN/MoE of each block, head
    with the loss); the gradient of a parameter goes down and back up: twice that. The
    gradient bound is the worst-case one (n u per reduction): deep in the backward pass a
    small gradient (the keys' one, under a peaked softmax) is the difference of large
    terms, and the error is relative to the gradient tensor's own scale."""
    if cfg.dtype == "float64":
        return 1e-8, 1e-8
    depth = 2 * cfg.n_layers + 2
    n_fwd = max(cfg.d_model, cfg.d_ff, cfg.expert_ff, cfg.attn_dim, n_tokens)
    return (default_tol(cfg.dtype, n_fwd, depth),
            f32_tol(max(n_fwd, cfg.vocab_size), 2 * depth, worst_case=True))


def small_cfg(dtype="float64", **kw):
    """4 blocks (MoE on 1 and 3), 2 heads of 8, 4 experts top-2, capacity small enough to
    drop; loss coefficients large so the aux and z paths weigh in the gradients."""
    base = dict(d_model=16, n_layers=4, n_heads=2, d_ff=24, d_ff_expert=20, n_experts=4, top_k=2,
                moe_every=2, max_seq_len=32, capacity_factor=1.0, eval_capacity_factor=1.5,
                min_capacity=1, aux_loss_coef=0.3, z_loss_coef=0.2, dtype=dtype)
    base.update(kw)
    return get_preset("toy", **base)


def randomize(model, seed=1):
    """Non-symmetric non-zero weights everywhere (norms around 1, routers spread wide so
    float32 and float64 take the same routing decisions). Returns the float64 values."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name == "norm_f.weight":
            v = 1.0 + 0.2 * rng.normal(size=p.shape)
        elif ".router." in name:
            v = rng.normal(0.05, 1.0, size=p.shape)
        else:
            v = rng.normal(0.01, 0.3, size=p.shape)
        values[name] = v
    model.load_state_dict(values)
    return values


def compare(cfg, bsz=2, seq=12, train=True, seed=0):
    dt = cfg.dtype
    model = OpenMoE(cfg, seed=3)
    values = randomize(model)
    if not train:
        model.eval()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(bsz, seq))
    targets = rng.integers(0, cfg.vocab_size, size=(bsz, seq))
    targets[0, :2] = -100                                   # ignored positions
    out = model(ids, targets=targets)
    out.loss.backward()

    p_t = {k: torch.tensor(v.astype(dt), requires_grad=True) for k, v in values.items()}
    twin_cfg = cfg if train else cfg.replace(capacity_factor=cfg.eval_capacity_factor)
    ref = twin_model(twin_cfg, p_t, torch.tensor(ids), torch.tensor(targets))
    ref["loss"].backward()

    tol, grad_tol = model_tols(cfg, bsz * seq)
    assert out.logits.dtype == np.dtype(dt) and out.loss.dtype == np.dtype(dt)
    assert [s.layer for s in out.routing] == cfg.moe_layers
    for s, r in zip(out.routing, ref["routing"]):
        np.testing.assert_array_equal(B.to_numpy(s.kept), r["kept"].numpy())
    assert_close("logits", out.logits, ref["logits"], tol)
    for key, theirs in (("ce", ref["ce"]), ("aux_loss", ref["aux"]), ("z_loss", ref["z"]), ("loss", ref["loss"])):
        assert_close(key, getattr(out, key), theirs, tol)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.dtype == np.dtype(dt), f"{name}: grad dtype {p.grad.dtype} != {dt}"
        assert_close(f"grad {name}", p.grad, p_t[name].grad, grad_tol)
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", [
    dict(),                                                         # tied, shared FFN
    dict(tie_embeddings=False, shared_ffn=False),
    dict(tie_embeddings=False, renormalize=True, slot_priority="probability", group_size=6),
    dict(top_k=1, capacity_mode="k_scaled", d_head=4),              # attention width 8 != d_model
    dict(ffn_kind="openmoe", tie_embeddings=False, logit_z_loss_coef=0.05),  # the original code's
    dict(ffn_kind="openmoe", logit_z_loss_coef=0.05, shared_ffn=True),       # ... tied
])
def test_model_matches_torch(dtype, variant):
    out = compare(small_cfg(dtype, **variant))
    assert any(s.dropped_fraction > 0 for s in out.routing), "meant to drop some assignments"


def test_model_matches_torch_on_backend(backend):
    """The float64 comparison on every available backend (CuPy when a GPU is present)."""
    out = compare(small_cfg("float64", tie_embeddings=False))
    assert B.array_module(out.logits.data) is B.xp
    assert B.array_module(out.routing[0].kept) is B.xp


def test_model_eval_mode_and_dense():
    out = compare(small_cfg("float64"), train=False)
    assert all(s.capacity == round(1.5 * 12 / 4) for s in out.routing)
    dense = compare(small_cfg("float64", moe_every=8))              # no MoE block at all
    assert dense.routing == [] and float(dense.aux_loss.item()) == 0.0 and float(dense.z_loss.item()) == 0.0


@pytest.mark.parametrize("name,kw", [("toy", {}), ("mini", {}),
                                     ("toy", dict(tie_embeddings=False, shared_ffn=False, n_layers=4)),
                                     ("toy", dict(ffn_kind="openmoe", tie_embeddings=False))])
def test_parameter_names_and_shapes(name, kw):
    cfg = get_preset(name, **kw)
    model = OpenMoE(cfg)
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert got == list(parameter_shapes(cfg).items())
    assert all(p.dtype == np.float32 for p in model.parameters())
    assert OpenMoE(cfg.replace(dtype="float64")).tok_emb.weight.dtype == np.float64


def test_logit_z_loss_value_and_off_by_default():
    """The output-logit z-loss is mean over real targets of logsumexp(logits)^2, weighted by
    logit_z_loss_coef; with the default 0 it is not computed and the loss is unchanged."""
    cfg = small_cfg("float64", logit_z_loss_coef=0.5)
    model = OpenMoE(cfg, seed=2)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 10))
    targets = ids.copy()
    targets[1, 3:] = -100
    out = model(ids, targets=targets)
    z = B.to_numpy(out.logits.data).reshape(-1, cfg.vocab_size)[targets.reshape(-1) != -100]
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
    assert_close("logit z", out.logit_z, np.mean(lse ** 2), 1e-12)
    rest = out.ce + out.aux_loss * cfg.aux_loss_coef + out.z_loss * cfg.z_loss_coef
    assert_close("loss", out.loss, rest.numpy() + 0.5 * np.mean(lse ** 2), 1e-12)
    off = OpenMoE(cfg.replace(logit_z_loss_coef=0.0), seed=2)(ids, targets=targets)
    assert off.logit_z is None and float(off.loss.item()) == float(rest.item())


def test_openmoe_init():
    """cfg.init "openmoe" (docs/openmoe-facts.md §9): embedding N(0, 1), attention and
    experts N(0, 0.1 / fan_in), dense/shared FFN and untied head the same std truncated at
    2 std, routers N(0, 0.02^2), norms 1. "normal" keeps every matrix N(0, init_std^2)."""
    from tinymoe.nn.layers import TRUNCATED_NORMAL_STD
    cfg = get_preset("toy", d_model=128, d_ff=256, n_heads=4, n_experts=4, init="openmoe",
                     ffn_kind="openmoe", tie_embeddings=False, vocab_size=512)
    sd = OpenMoE(cfg, seed=0).state_dict()
    def std_ok(name, want, rel=0.05):
        got = sd[name].std()
        assert abs(got / want - 1) < rel, f"{name}: std {got} vs {want}"
    std_ok("tok_emb.weight", 1.0)
    for w, fan in (("wq", 128), ("wk", 128), ("wv", 128), ("wo", 128)):
        std_ok(f"blocks.0.attn.{w}.weight", np.sqrt(0.1 / fan))
    for w, fan in (("wi_0", 128), ("wi_1", 128), ("wo", 256)):
        a = sd[f"blocks.0.ffn.{w}.weight"]
        std_ok(f"blocks.0.ffn.{w}.weight", np.sqrt(0.1 / fan))
        assert np.abs(a).max() <= 2 * np.sqrt(0.1 / fan) / TRUNCATED_NORMAL_STD * (1 + 1e-6)
        std_ok(f"blocks.1.shared_ffn.{w}.weight", np.sqrt(0.1 / fan))
    for w, fan in (("wi_0", 128), ("wi_1", 128), ("wo", 256)):
        a = sd[f"blocks.1.moe.experts.{w}"]
        std_ok(f"blocks.1.moe.experts.{w}", np.sqrt(0.1 / fan))
        assert np.abs(a).max() > 2.5 * np.sqrt(0.1 / fan)          # experts: not truncated
    std_ok("blocks.1.moe.router.weight", 0.02, rel=0.1)
    std_ok("lm_head.weight", np.sqrt(0.1 / 128))
    assert np.all(sd["norm_f.weight"] == 1)
    normal = OpenMoE(cfg.replace(init="normal"), seed=0).state_dict()
    assert abs(normal["tok_emb.weight"].std() / 0.02 - 1) < 0.05
    assert abs(normal["blocks.0.ffn.wo.weight"].std() / 0.02 - 1) < 0.05


@pytest.mark.parametrize("packed", [True, False])
def test_openmoe_experts_match_torch(packed):
    """Experts of ffn_kind "openmoe" (wi_0 [E, d, 2f], wi_1 [E, d, f], wo [E, f, d]) on packed
    rows and on the full [E, R, d] buffer, forward and gradients vs the torch twin's FFN."""
    from tinymoe.nn.moe import Experts
    from tests.oracle.torch_moe import openmoe_ffn
    E, d, f, sizes = 3, 6, 5, (4, 0, 3)
    ex = Experts(E, d, f, rng=B.default_rng(0), kind="openmoe", dtype="float64")
    rng = np.random.default_rng(1)
    w = {k: rng.normal(0.05, 0.4, size=p.shape) for k, p in ex.named_parameters()}
    ex.load_state_dict(w)
    assert [k for k, _ in ex.named_parameters()] == ["wi_0", "wi_1", "wo"]
    x = rng.normal(0.1, 1.0, size=(sum(sizes), d) if packed else (E, 4, d))
    g = rng.normal(size=x.shape)
    xt = tinymoe.Tensor(x, requires_grad=True)
    y = ex(xt, load=np.array(sizes)) if packed else ex(xt)
    (y * tinymoe.Tensor(g)).sum().backward()
    wt = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
    xtt = torch.tensor(x, requires_grad=True)
    if packed:
        bounds = np.cumsum((0,) + sizes)
        parts = [openmoe_ffn(xtt[bounds[e]:bounds[e + 1]], wt["wi_0"][e], wt["wi_1"][e], wt["wo"][e])
                 for e in range(E)]
        yt = torch.cat(parts)
    else:
        yt = torch.stack([openmoe_ffn(xtt[e], wt["wi_0"][e], wt["wi_1"][e], wt["wo"][e]) for e in range(E)])
    (yt * torch.tensor(g)).sum().backward()
    assert_close("y", y, yt.detach(), 1e-12)
    assert_close("dx", xt.grad, xtt.grad, 1e-12)
    for k, p in ex.named_parameters():
        assert_close(f"d{k}", p.grad, wt[k].grad, 1e-12, atol=1e-15)


def test_same_seed_same_weights():
    cfg = get_preset("toy")
    a, b, c = OpenMoE(cfg, seed=5), OpenMoE(cfg, seed=5), OpenMoE(cfg, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["tok_emb.weight"], sc["tok_emb.weight"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kv_cache_matches_full_forward(backend, dtype):
    cfg = small_cfg(dtype, eval_capacity_factor=0.0, tie_embeddings=False)     # dropless in eval
    # float32: the two orders of the same forward differ by rounding (forward tolerance)
    tol = 1e-10 if dtype == "float64" else model_tols(cfg, 11)[0]
    model = OpenMoE(cfg, seed=3)
    randomize(model)
    model.eval()
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 11))
    with tinymoe.no_grad():
        full = model(ids).logits.numpy()                    # [2, 11, V]
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, :5], cache=cache).logits.numpy()]           # prefill 5
        for t in range(5, 11):                                            # then one at a time
            parts.append(model(ids[:, t:t + 1], cache=cache).logits.numpy())
    assert cache.length == 11
    assert_close("cached logits", np.concatenate(parts, axis=1), full, tol)


def test_bad_inputs_give_one_line_errors():
    cfg = get_preset("toy")
    model = OpenMoE(cfg)

    def one_line(excinfo):
        assert "\n" not in str(excinfo.value)
        return str(excinfo.value)

    with pytest.raises(ValueError) as e:
        model(np.array([[1, 2, 258]]))
    assert one_line(e) == "token id 258 is out of range for vocab_size=258"
    with pytest.raises(ValueError) as e:
        model(np.array([[-1, 2]]))
    assert "token id -1" in one_line(e)
    with pytest.raises(ValueError) as e:
        model(np.zeros((1, cfg.max_seq_len + 1), dtype=np.int64))
    assert one_line(e) == f"sequence length {cfg.max_seq_len + 1} > max_seq_len={cfg.max_seq_len}"
    with pytest.raises(TypeError) as e:
        model(np.zeros((1, 4)))
    assert "integers" in one_line(e)
    with pytest.raises(ValueError) as e:
        model(np.zeros(4, dtype=np.int64))
    assert "[batch, seq]" in one_line(e)
    with pytest.raises(ValueError) as e:
        model(np.zeros((1, 4), dtype=np.int64), targets=np.full((1, 4), 300))
    assert "target id 300" in one_line(e)

    cache = model.new_cache(1, 4)
    with pytest.raises(RuntimeError) as e:
        model(np.zeros((1, 2), dtype=np.int64), cache=cache)
    assert "no_grad" in one_line(e)
    with tinymoe.no_grad():
        model(np.zeros((1, 3), dtype=np.int64), cache=cache)
        with pytest.raises(ValueError) as e:
            model(np.zeros((1, 2), dtype=np.int64), cache=cache)
    assert "3 cached + 2 new positions > cache max_len=4" == one_line(e)


def test_random_priority_needs_rng_and_is_reproducible():
    cfg = small_cfg("float64", slot_priority="random")
    model = OpenMoE(cfg, seed=3)
    randomize(model)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12))
    with pytest.raises(ValueError, match="rng"):
        model(ids)
    a = model(ids, rng=np.random.default_rng(9))
    b = model(ids, rng=np.random.default_rng(9))
    assert np.array_equal(a.logits.numpy(), b.logits.numpy())
    assert all(np.array_equal(sa.kept, sb.kept) for sa, sb in zip(a.routing, b.routing))
