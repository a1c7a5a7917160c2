"""``python -m tinymoe compare-routers`` (tinymoe/variants.py) in fast mode: the report,
its figures, resumability, the leak it measures, and one-line errors."""
from __future__ import annotations

import json

import pytest

from tinymoe.config import get_preset

from tests.test_cli import InProcess, one_line_error

ROUTERS = "openmoe,expert_choice,switch"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "cmp"
    return out


def test_compare_routers_fast(capsys, lab):
    p = InProcess(capsys, "compare-routers", "--fast", "--routers", ROUTERS, "--out", lab)
    assert p.returncode == 0, p.stderr
    report = json.loads((lab / "report.json").read_text())
    assert list(report["variants"]) == ROUTERS.split(",")
    md = (lab / "report.md").read_text()
    for name in ROUTERS.split(","):
        r = report["variants"][name]
        assert r["status"] == "trained" and name in md
        assert set(r["held_out"]) >= {"mean"} and r["held_out"]["mean"]["nats_per_byte"] > 0
        assert r["load"]["step"] == [0, 2, 4, 6]                     # a snapshot every 2 steps
        assert len(r["drops_train_cf"]["drop_rate"]) == 8
        assert (lab / name / "checkpoint.npz").exists()
    ec, tc, sw = (report["variants"][n] for n in ("expert_choice", "openmoe", "switch"))
    assert ec["load"]["max_over_mean"] == [1.0] * 4                  # C tokens per expert, always
    assert ec["drops_eval_cf"]["what"] == "tokens with no expert"
    # counted per token, not per (token, expert) pair: the unkept pairs would be exactly
    # 1 - C E / (G E) = 1 - k/E = 0.5 here
    assert ec["drops_eval_cf"]["overall"] < 0.25
    assert tc["drops_train_cf"]["overall"] > tc["drops_eval_cf"]["overall"]  # cf 1.25 < 2.0
    assert ec["leak"]["changed"] > 0.05                              # routing sees later tokens
    assert sw["leak"]["changed"] == 0.0                              # top-1, position priority: causal
    figs = sorted(f.split("/")[-1] for f in report["figures"])
    assert figs == ["analysis.png", "drops_eval_cf.png", "drops_train_cf.png", "held_out_loss.png",
                    "leak.png", "load_balance.png"]
    # the routing study's analyses, on every variant: rows with baselines, intervals, verdicts
    assert "the routing study's analyses on each variant" in md
    for name in ROUTERS.split(","):
        a = report["variants"][name]["analysis"]
        n_moe = len(get_preset("toy").moe_layers)                        # toy: one MoE block
        assert a["specialization"]["blocks"] == n_moe and a["early_routing"]["blocks"] == n_moe
        assert 0 <= a["specialization"]["id_accuracy"] <= 1
        assert a["early_routing"]["curve"]["fraction"][-1] == 1.0
        assert a["early_routing"]["curve"]["tokens"][-1] == 1.0       # the final routing vs itself
        for row in a["findings"]:
            assert row["verdict"] in (True, False, None)
            assert {"estimate", "low", "high"} <= set(row["effect"]) and row["baseline_name"]
        assert a["drops"]["eval_all"]["baseline_name"].startswith("random routing")
    for f in report["figures"]:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_routers_resumes(capsys, lab):
    """A second call reuses finished runs; more steps resume them."""
    before = json.loads((lab / "report.json").read_text())
    p = InProcess(capsys, "compare-routers", "--fast", "--routers", "openmoe,switch", "--out", lab)
    assert p.returncode == 0, p.stderr
    again = json.loads((lab / "report.json").read_text())
    assert [r["status"] for r in again["variants"].values()] == ["reused", "reused"]
    assert again["variants"]["switch"]["held_out"] == before["variants"]["switch"]["held_out"]
    p = InProcess(capsys, "compare-routers", "--fast", "--steps", "8", "--routers", "switch", "--out", lab)
    assert p.returncode == 0, p.stderr
    more = json.loads((lab / "report.json").read_text())
    assert more["variants"]["switch"]["status"] == "resumed"
    assert more["variants"]["switch"]["load"]["step"][-1] == 8


def test_compare_routers_jobs_gives_the_same_runs(capsys, tmp_path):
    """--jobs 2 trains the variants in two worker processes: the same weights as one at a
    time (same data, seed, steps)."""
    import numpy as np

    from tinymoe import backend as B
    from tinymoe.checkpoint import load_checkpoint

    out, lab = tmp_path / "jobs", tmp_path / "one"
    threads = B.get_num_threads()
    try:
        p = InProcess(capsys, "compare-routers", "--fast", "--routers", "openmoe,expert_choice",
                      "--out", lab, "--threads", "1")
        assert p.returncode == 0, p.stderr
        p = InProcess(capsys, "compare-routers", "--fast", "--routers", "openmoe,expert_choice",
                      "--out", out, "--threads", "2", "--jobs", "2")
    finally:
        B.set_num_threads(threads)
    assert p.returncode == 0, p.stderr
    assert "2 at a time, 1 thread(s) each" in p.stdout
    mine = json.loads((out / "report.json").read_text())["variants"]
    for name in ("openmoe", "expert_choice"):
        assert mine[name]["status"] == "trained"
        a, b = (load_checkpoint(f / name).model_state for f in (out, lab))
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")


def test_compare_routers_sigmoid_bias(capsys, tmp_path):
    """DeepSeek-V3's combination is a lab variant: sigmoid scores, bias, no aux loss."""
    out = tmp_path / "sig"
    p = InProcess(capsys, "compare-routers", "--fast", "--steps", "2", "--routers", "sigmoid_bias",
                  "--out", out)
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "report.json").read_text())["variants"]["sigmoid_bias"]
    cfg = r["model_config"]
    assert (cfg["router_score"], cfg["renormalize"], cfg["aux_loss_coef"]) == ("sigmoid", True, 0.0)
    assert cfg["router_bias_rate"] > 0 and r["status"] == "trained"
    assert "sigmoid_bias" in (out / "report.md").read_text()


@pytest.mark.parametrize("flags,match", [
    (["--routers", "openmoe,bogus"], "bogus"),
    (["--steps", "0"], "must be >= 1"),
    (["--routers", "fine_grained", "--fine-grained-split", "3"], "does not divide the expert FFN width 128"),
    (["--routers", "fine_grained", "--shared-experts", "-1"], "shared_experts=-1"),
])
def test_compare_routers_bad_flags(capsys, tmp_path, flags, match):
    p = InProcess(capsys, "compare-routers", "--fast", "--out", tmp_path / "x", *flags)
    one_line_error(p)
    assert match in p.stderr
