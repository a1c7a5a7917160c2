"""Smoke test of ``python -m tinymoe bench``: it runs on the toy config with one repeat and
prints every field of its table. No timing assertions (numbers come from the bench)."""
from __future__ import annotations

import json

import pytest

from tinymoe.__main__ import main
from tinymoe.bench import model_flops
from tinymoe.config import get_preset


def test_bench_toy_prints_fields(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    rc = main(["bench", "--config", "toy", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0", "--roof-size", "256",
               "--gen-prompt", "4", "--gen-new", "4", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for field in ("GEMM roof", "model FLOPs/token", "forward", "fwd_bwd", "step", "generate",
                  "tok/s", "MFU", "peak", "load average", "float32: yes"):
        assert field in text, f"{field!r} missing from:\n{text}"
    report = json.loads(out_json.read_text())
    res = report["results"]["tinymoe"]
    for phase in ("forward", "fwd_bwd", "step", "generate"):
        assert res[phase]["tokens_per_s"] > 0
        assert res[phase]["memory"]["peak_rss"] > 0
    assert 0 < res["step"]["mfu"]
    assert res["step"]["dtype_check"] == "ok"
    assert report["gemm_roof"]["flops_per_s"] > 0


def test_bench_compare_torch_toy(capsys):
    pytest.importorskip("torch")
    rc = main(["bench", "--config", "toy", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0", "--roof-size", "256",
               "--phases", "step,generate", "--gen-prompt", "4", "--gen-new", "4", "--compare-torch",
               "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "torch tok/s" in text and "tinymoe/torch" in text
    assert "greedy tokens equal to torch's: 4/4" in text     # same weights, same greedy tokens
    assert "per interleaved repeat pair, median [quartiles]: step" in text


def test_bench_ops_mode(capsys):
    rc = main(["bench", "--ops", "--steps", "1", "--roof-size", "256"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "us/op forward" in text and "ratio" in text


def test_model_flops_counts_shapes():
    cfg = get_preset("toy")                                   # d 64, 2 layers (1 MoE), ff 128, 4E top-2, V 258
    f = model_flops(cfg, seq=64)
    d, ff, V = 64, 128, 258
    n = 2 * 4 * d * d + 3 * d * ff + (d * 4 + 2 * 3 * d * ff + 3 * d * ff) + d * V
    assert f["n_active_matmul_params"] == n
    assert f["train_per_token"] == 6 * n + 12 * 2 * 64 * 64
    half = model_flops(cfg, seq=64, kept_fraction=0.5)       # dropped assignments are not computed
    assert half["n_active_matmul_params"] == n - 0.5 * 2 * 3 * d * ff


@pytest.mark.parametrize("over", [dict(ffn_kind="openmoe"), dict(d_ff_shared=96),
                                  dict(ffn_kind="openmoe", d_ff_shared=32, moe_every=1)])
def test_model_flops_matches_the_weight_shapes(over):
    """The active matmul parameters are the weight shapes a token passes through, read
    from config.parameter_shapes: every attention and dense/shared FFN matrix, the router,
    k of the E experts' matrices, and the head (d V) -- for both FFN kinds (OpenMoE's has
    4 d f weights) and a shared FFN of its own width."""
    from tinymoe.config import parameter_shapes

    cfg = get_preset("toy", **over)
    n = 0
    for name, shape in parameter_shapes(cfg).items():
        if len(shape) < 2 or name == "tok_emb.weight":
            continue                                          # norms; the embedding is a gather
        size = int(np.prod(shape))
        n += size * cfg.top_k // cfg.n_experts if ".experts." in name else size
    n += cfg.d_model * cfg.vocab_size                         # the (tied) head
    assert model_flops(cfg, seq=64)["n_active_matmul_params"] == n


def test_bench_bad_input():
    assert main(["bench", "--config", "toy", "--steps", "0"]) != 0


# ---- the torch side: the same model, the same decisions, the same loss ----------------------
# tinymoe/bench/torch_side.py is written for speed (SDPA, fused projections, vectorised
# routing, kept rows by expert); these tests hold it to tinymoe's function on the same
# weights and batch, with capacity drops.

import numpy as np  # noqa: E402

from tinymoe import backend as B  # noqa: E402
from tinymoe.autograd import no_grad  # noqa: E402
from tinymoe.bench.tinymoe_side import TinymoeSide, bench_train_config  # noqa: E402
from tinymoe.nn.model import OpenMoE  # noqa: E402

DROP_CASES = {
    # 4 groups of 8 tokens, C = round(1.0 * 8 / 4) = 2 slots for 16 assignments per expert-group
    "position": dict(capacity_factor=1.0, eval_capacity_factor=1.5, min_capacity=1, group_size=8),
    # one group per sequence (G = 16), C = ceil(2 * 0.5 * 16 / 4) = 4; untied head, Mixtral weights
    "probability": dict(capacity_factor=0.5, eval_capacity_factor=1.0, min_capacity=1, capacity_mode="k_scaled",
                        slot_priority="probability", renormalize=True, tie_embeddings=False),
}


def _float32_tolerance(cfg, seq, n_tokens):
    """Relative bound on a float32 loss or logit difference between the two sides.

    A dot product or sum of n terms carries a relative error of at most ~n u (u = eps / 2);
    to first order the errors of the steps along the computation add up, the RMSNorms keep
    every step's condition number O(1). Per block: the norm (d), Q/K/V (d), attention scores
    and P v (T), the output projection (d_attn), the FFN norm and input (2 d), the FFN output
    (f), the router softmax (E); then the final norm and the head (2 d), the cross-entropy's
    logsumexp (V) and its mean over N tokens. Two float32 sides: twice that, in eps."""
    per_block = 4 * cfg.d_model + seq + cfg.attn_dim + max(cfg.d_ff, cfg.expert_ff) + cfg.n_experts
    path = cfg.n_layers * per_block + 2 * cfg.d_model + cfg.vocab_size + n_tokens
    return 2 * path * float(np.finfo(np.float32).eps)


def _pair(case, dtype, batch=2, seq=16, seed=3):
    torch_side = pytest.importorskip("tinymoe.bench.torch_side")
    cfg = get_preset("toy").replace(dtype=dtype, **DROP_CASES[case])
    tm = OpenMoE(cfg, seed=seed)
    th = torch_side.TorchOpenMoE(cfg, tm.state_dict())
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, seq + 1))
    return torch_side, cfg, tm, th, ids[:, :-1], ids[:, 1:]


def _decision_margin(stats, cfg):
    """How far the routing decisions are from a tie: the smallest gap between a token's k-th
    and (k+1)-th router probability and, under priority "probability", between two
    probabilities that slot order compares (same group, same rank)."""
    p = -np.sort(-B.to_numpy(stats.probs), axis=1)                              # [N, E] descending
    margin = float((p[:, cfg.top_k - 1] - p[:, cfg.top_k]).min())
    if cfg.slot_priority == "probability":
        top = B.to_numpy(stats.topk_prob).reshape(stats.n_groups, stats.group_size, cfg.top_k)
        margin = min(margin, float(np.diff(np.sort(top, axis=1), axis=1).min()))
    return margin


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(DROP_CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_side_same_loss_logits_and_kept_as_tinymoe(case, dtype, mode):
    torch_side, cfg, tm, th, x, y = _pair(case, dtype)
    torch = torch_side.torch
    if mode == "eval":                                        # eval capacity factor on both sides
        tm.eval()
        th.eval()
    with no_grad():
        ours = tm(x, targets=y)
    with torch.no_grad():
        theirs = th(torch.as_tensor(x), torch.as_tensor(y))
    rtol = 1e-11 if dtype == "float64" else _float32_tolerance(cfg, x.shape[1], x.size)
    for name, a, b in (("loss", ours.loss, theirs.loss), ("ce", ours.ce, theirs.ce),
                       ("aux", ours.aux_loss, theirs.aux), ("z", ours.z_loss, theirs.z),
                       ("logits", ours.logits, theirs.logits)):
        a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
        assert np.abs(a - b).max() <= rtol * np.abs(a).max(), (name, np.abs(a - b).max(), rtol)
    assert len(ours.routing) == len(theirs.kept) == 1
    stats = ours.routing[0]
    if dtype == "float32":
        # float32 decisions can only differ at a near-tie: the probabilities' float32 error,
        # measured against the float64 model, must be far below the closest decision
        exact = OpenMoE(cfg.replace(dtype="float64"), seed=3)
        (exact.eval() if mode == "eval" else exact.train())
        with no_grad():
            p64 = B.to_numpy(exact(x).routing[0].probs)
        err = float(np.abs(B.to_numpy(stats.probs) - p64).max())
        assert _decision_margin(stats, cfg) > 10 * err, (_decision_margin(stats, cfg), err)
    kept = B.to_numpy(stats.kept)
    assert 0 < kept.sum() < kept.size, "the case must drop some assignments and keep others"
    np.testing.assert_array_equal(theirs.kept[0].numpy(), kept)


@pytest.mark.parametrize("case", list(DROP_CASES))
def test_torch_side_same_gradients_as_tinymoe(case):
    """float64: every parameter's gradient (fused QKV and gate|up cut back into tinymoe's names)."""
    torch_side, cfg, tm, th, x, y = _pair(case, "float64")
    torch = torch_side.torch
    tm(x, targets=y).loss.backward()
    th(torch.as_tensor(x), torch.as_tensor(y)).loss.backward()
    grads = th.tinymoe_named(lambda p: p.grad)
    names = [n for n, _ in tm.named_parameters()]
    assert sorted(grads) == sorted(names)
    for name, p in tm.named_parameters():
        ours, theirs = B.to_numpy(p.grad), grads[name]
        assert np.abs(ours - theirs).max() <= 1e-9 * np.abs(ours).max(), name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_side_greedy_generation_matches_tinymoe(dtype):
    """The bench's two generate() on a toy model: the same greedy tokens, a prefill with
    eval-capacity drops (G = 8 prompt tokens, C = round(1.0 * 8 / 4) = 2) then one token at
    a time through each side's own KV cache."""
    torch_side = pytest.importorskip("tinymoe.bench.torch_side")
    cfg = get_preset("toy").replace(dtype=dtype, capacity_factor=0.5, eval_capacity_factor=1.0, min_capacity=1,
                                    init_std=0.3)        # weights large enough for a varied sequence
    train_cfg = bench_train_config("adamw")
    tm = TinymoeSide(cfg, batch=2, seq=16, train_cfg=train_cfg, seed=4)
    th = torch_side.TorchSide(cfg, tm.model.state_dict(), tm.x, tm.y, train_cfg)
    prompt = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(1, 8))
    ours, theirs = tm.generate(prompt, 24)[2], th.generate(prompt, 24)[2]
    assert ours == theirs
    assert len(set(ours)) > 3                                 # a sequence, not one token repeated


def test_torch_side_cache_in_chunks_equals_full_forward():
    """The torch side's cached forward (prefill at 0, a chunk at start > 0 with its
    bottom-right causal mask, single tokens) gives the logits of one full forward (dropless,
    so that routing does not depend on how the tokens are cut)."""
    torch_side = pytest.importorskip("tinymoe.bench.torch_side")
    torch = torch_side.torch
    cfg = get_preset("toy").replace(dtype="float64", capacity_factor=None, eval_capacity_factor=None)
    th = torch_side.TorchOpenMoE(cfg, OpenMoE(cfg, seed=6).state_dict()).eval()
    ids = torch.as_tensor(np.random.default_rng(7).integers(0, cfg.vocab_size, size=(2, 14)))
    with torch.inference_mode():
        full = th(ids).logits
        cache = th.new_cache(2, 14)
        parts = [th(ids[:, lo:hi], cache=cache, start=lo).logits for lo, hi in ((0, 5), (5, 6), (6, 11), (11, 14))]
    got = torch.cat(parts, dim=1)
    assert (got - full).abs().max() <= 1e-12 * full.abs().max()


def test_bench_imports_torch_only_for_compare_torch(monkeypatch, capsys):
    """``import tinymoe.bench`` loads no torch; without torch, --compare-torch is a one-line
    error with exit status 2."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import tinymoe.bench  # noqa: PLC0415
    code = "import sys, tinymoe.bench, tinymoe.functional; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "torch", None)           # as if torch were not installed
    monkeypatch.delitem(sys.modules, "tinymoe.bench.torch_side", raising=False)
    monkeypatch.delattr(tinymoe.bench, "torch_side", raising=False)
    assert main(["bench", "--config", "toy", "--steps", "1", "--compare-torch"]) == 2
    assert "--compare-torch needs PyTorch" in capsys.readouterr().err


@pytest.mark.parametrize("settle,runs", [(0, 1 + 2), (2, 1 + 2 * 3)])
def test_bench_settle_runs_untimed_steps_before_each_repeat(monkeypatch, capsys, settle, runs):
    """--settle N: N untimed runs of a side before each of its --steps timed ones (after the
    one untimed run that measures memory); the report says how many."""
    from tinymoe.bench import tinymoe_side
    calls = []
    real = tinymoe_side.TinymoeSide.step
    monkeypatch.setattr(tinymoe_side.TinymoeSide, "step", lambda self: calls.append(1) or real(self))
    rc = main(["bench", "--config", "toy", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
               "--roof-size", "256", "--phases", "step", "--settle", str(settle)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert len(calls) == runs
    assert f"{settle} untimed before each repeat" in text


def test_bench_settle_must_not_be_negative(capsys):
    assert main(["bench", "--config", "toy", "--settle", "-1", "--roof-size", "256"]) == 2
    assert "--settle=-1" in capsys.readouterr().err


def test_paired_ratios_pair_each_repeat_with_its_neighbour():
    """Throughput ratio per repeat pair = torch's time / tinymoe's (worked by hand)."""
    from tinymoe.bench.cli import paired_ratios
    r = paired_ratios([1.0, 2.0, 4.0, 1.0], [2.0, 2.0, 2.0, 3.0])   # ratios 2, 1, 0.5, 3
    assert r["ratios"] == [0.5, 1.0, 2.0, 3.0]
    assert r["median"] == 1.5 and r["q1"] == 0.875 and r["q3"] == 2.25
    one = paired_ratios([2.0], [1.0])
    assert one["median"] == one["q1"] == one["q3"] == 0.5


def test_bench_by_function_splits_the_step_and_restores_the_functions(tmp_path, capsys):
    """--by-function: per Function calls and times, and the rest of the step; the times add up
    to the step (each part >= 0), and the Functions' methods are the originals afterwards."""
    from tinymoe import functional as F
    before = (F.MatMul.__dict__["forward"], F.MatMul.__dict__["backward"])
    out_json = tmp_path / "bench.json"
    rc = main(["bench", "--config", "toy", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "0",
               "--roof-size", "256", "--phases", "step", "--by-function", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "by autograd Function" in text and "outside Functions" in text
    bf = json.loads(out_json.read_text())["by_function"]
    fns = bf["functions"]
    assert {"MatMul", "QKVRoPE", "CausalAttention", "GroupedMatmul", "CrossEntropy"} <= set(fns)
    assert fns["QKVRoPE"]["calls"] == 2                      # one per block of toy's 2 blocks
    assert all(x["forward_ms"] > 0 and x["backward_ms"] >= 0 for x in fns.values())
    inside = sum(x["forward_ms"] + x["backward_ms"] for x in fns.values())
    assert bf["outside_ms"] > 0 and abs(inside + bf["outside_ms"] - bf["step_ms"]) < 1e-6
    assert (F.MatMul.__dict__["forward"], F.MatMul.__dict__["backward"]) == before
