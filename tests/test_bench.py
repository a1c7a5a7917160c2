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


def test_bench_bad_input():
    assert main(["bench", "--config", "toy", "--steps", "0"]) != 0
