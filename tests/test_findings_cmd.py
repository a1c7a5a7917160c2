"""``python -m tinymoe findings``: the whole study in fast mode (files, table rows, JSON keys,
skipping finished runs, resuming an interrupted one), the dense twins' parameter counts,
the capacity-0 loss, and the caveat logic on synthetic numbers."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from tinymoe import backend as B
from tinymoe.checkpoint import load_checkpoint
from tinymoe.config import count_parameters, get_preset
from tinymoe.nn.model import OpenMoE
from tinymoe.study import (REMOVAL_MIN, ZERO_CAPACITY, StudySettings, compare_losses,
                           dense_twin, flops_per_update, format_markdown, plan_runs,
                           scale_criteria, seed_summary, window_losses)
from tinymoe.study.measures import CAVEAT_TAIL
from tinymoe.study.plan import FAST

from tests.test_cli import InProcess, one_line_error

FLAGS = ("--config", "--steps", "--seeds", "--without", "--data", "--out", "--fast",
         "--threads", "--quiet")


# ---------------------------------------------------------------------------- dense twins
@pytest.mark.parametrize("name,over", [("toy", {}), ("mini", {}), ("small", {}),
                                       ("mini", {"n_experts": 16, "top_k": 1}),
                                       ("mini", {"shared_ffn": False, "d_ff_expert": 96}),
                                       ("openmoe-base", {})])
def test_dense_twins_match_the_moe_within_one_row_of_d_ff(name, over):
    moe = get_preset(name, **over)
    c = count_parameters(moe)
    row = 3 * moe.d_model * moe.n_layers          # what one more unit of d_ff adds (SwiGLU)
    for match in ("active", "total"):
        twin = dense_twin(moe, match)
        assert twin.moe_layers == []
        for f in ("d_model", "n_layers", "n_heads", "vocab_size", "max_seq_len", "d_head",
                  "tie_embeddings", "dtype"):
            assert getattr(twin, f) == getattr(moe, f), f
        n = count_parameters(twin)
        assert n["active"] == n["total"]
        miss = abs(n[match] - c[match])
        assert miss <= row / 2, (match, twin.d_ff, miss, row)
        # no other width is closer (the one above and below by one d_ff)
        for other in (twin.d_ff - 1, twin.d_ff + 1):
            if other >= 1:
                assert abs(count_parameters(twin.replace(d_ff=other))[match] - c[match]) >= miss
    # equal active parameters -> (almost) equal training FLOPs per token: the MoE adds only
    # its routers (d E per MoE layer); equal total -> more FLOPs than the MoE
    run = plan_runs(StudySettings(preset=name, steps=10, seeds=1), "/nonexistent")[0]
    active, total = dense_twin(moe, "active"), dense_twin(moe, "total")
    if not over and name != "openmoe-base":
        f_moe = flops_per_update(moe, run.train)
        assert abs(flops_per_update(active, run.train) / f_moe - 1) < 0.02
        assert flops_per_update(total, run.train) > 1.2 * f_moe


def test_plan_has_every_kind_and_seed():
    runs = plan_runs(StudySettings(steps=40, seeds=3, total_seeds=3, without="arith"), "out")
    names = [r.name for r in runs]
    assert names == ["moe-seed0", "moe-seed1", "moe-seed2", "dense_active-seed0",
                     "dense_active-seed1", "dense_active-seed2", "dense_total-seed0",
                     "dense_total-seed1", "dense_total-seed2", "moe_without_arith-seed0"]
    # by default the equal-total reference is trained for one seed only
    default = [r.name for r in plan_runs(StudySettings(steps=40, seeds=3, without="arith"), "o")]
    assert default == [n for n in names if n not in ("dense_total-seed1", "dense_total-seed2")]
    assert all(Path(r.train.out_dir) == Path("out/runs") / r.name for r in runs)
    assert [r.train.seed for r in runs[:3]] == [0, 1, 2]
    assert runs[-1].train.exclude_domains == ("arith",)
    assert all(r.train.exclude_domains == () for r in runs[:-1])
    # the same recipe for every run; snapshots only where there is routing
    assert len({(r.train.steps, r.train.batch_size, r.train.seq_len, r.train.lr,
                 r.train.eval_every) for r in runs}) == 1
    assert all((r.train.snapshot_every > 0) == r.kind.startswith("moe") for r in runs)


# ---------------------------------------------------------------------------- capacity 0
def _toy_model(seed=0):
    model = OpenMoE(get_preset("toy"), seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.parameters():              # make the experts matter: larger weights
        p.data = p.data + B.np.asarray(rng.normal(0, 0.05, p.data.shape), dtype=p.data.dtype)
    return model.eval()


def test_capacity_zero_is_the_model_without_its_experts():
    """Loss at ZERO_CAPACITY == loss of the same weights with every expert zeroed (dropped
    assignments contribute nothing), and != the loss with the experts."""
    model = _toy_model()
    w = np.random.default_rng(1).integers(0, 256, size=(6, 17))        # [n, T+1]
    ones = np.ones(258, dtype=np.int64)
    zero = window_losses(model, w, ones, 4, **ZERO_CAPACITY)
    full = window_losses(model, w, ones, 4)
    assert zero["kept"] == 0.0 and full["kept"] > 0.5
    assert np.array_equal(zero["bytes"], np.full(6, 16.0))
    # window sums agree with the model's own mean CE of each window
    for i in range(6):
        with model.evaluating():
            ce = float(model(w[i:i + 1, :-1], w[i:i + 1, 1:]).ce.item())
        assert full["nll"][i] == pytest.approx(16 * ce, rel=1e-5)
    state = model.state_dict()
    no_experts = OpenMoE(model.cfg)
    no_experts.load_state_dict({k: (np.zeros_like(v) if ".moe.experts." in k else v)
                                for k, v in state.items()})
    no_experts.eval()
    ref = window_losses(no_experts, w, ones, 4)
    np.testing.assert_allclose(zero["nll"], ref["nll"], rtol=1e-5)
    assert np.abs(zero["nll"] - full["nll"]).max() > 1e-3
    # the paired cost of a model against itself is exactly 0, against capacity 0 it is not
    val = {"a": w.reshape(-1)[:60], "b": w.reshape(-1)[40:]}
    same = compare_losses((model, {}), (model, {}), val, ones, 16, 3, 4, n_boot=50)
    assert all(same[k]["diff"]["estimate"] == 0.0 for k in ("a", "b", "all"))
    cost = compare_losses((model, ZERO_CAPACITY), (model, {}), val, ones, 16, 3, 4, n_boot=50)
    assert cost["all"]["diff"]["estimate"] == pytest.approx(
        cost["all"]["first"]["estimate"] - cost["all"]["second"]["estimate"], abs=1e-9)
    assert cost["all"]["diff"]["estimate"] != 0.0


# ---------------------------------------------------------------------------- the caveat
def _iv(est, lo, hi):
    return {"estimate": est, "low": lo, "high": hi}


GOOD_MOE = seed_summary([2.00, 2.04, 2.08])
GOOD_DENSE = seed_summary([2.20, 2.23, 2.30])


def test_caveat_logic_on_synthetic_numbers():
    ok = scale_criteria(_iv(0.42, 0.38, 0.46), GOOD_MOE, GOOD_DENSE)
    assert ok["met"] and ok["experts_matter"] and ok["beats_dense_active"]
    assert ok["caveat"] is None and ok["reasons"] == []
    cases = {
        # removal cost estimate above 0.3 but its interval is not: not enough
        "removal": scale_criteria(_iv(0.32, 0.27, 0.37), GOOD_MOE, GOOD_DENSE),
        "removal_small": scale_criteria(_iv(0.05, 0.01, 0.09), GOOD_MOE, GOOD_DENSE),
        # MoE better on average, but the seed ranges overlap
        "overlap": scale_criteria(_iv(0.42, 0.38, 0.46), seed_summary([2.0, 2.1, 2.25]),
                                  GOOD_DENSE),
        "worse": scale_criteria(_iv(0.42, 0.38, 0.46), GOOD_DENSE, GOOD_MOE),
        "one_seed": scale_criteria(_iv(0.42, 0.38, 0.46), seed_summary([2.0]),
                                   seed_summary([2.3])),
        "nan": scale_criteria(_iv(float("nan"), float("nan"), float("nan")), GOOD_MOE,
                              GOOD_DENSE),
    }
    for name, c in cases.items():
        assert not c["met"], name
        assert c["caveat"] is not None and c["caveat"].endswith(CAVEAT_TAIL + "."), name
        assert len(c["reasons"]) == 1, (name, c["reasons"])
    assert cases["removal"]["experts_matter"] is False
    assert cases["removal"]["beats_dense_active"] is True
    assert "removing every expert costs 0.320" in cases["removal"]["caveat"]
    assert cases["overlap"]["beats_dense_active"] is False
    assert cases["worse"]["beats_dense_active"] is False
    assert cases["one_seed"]["beats_dense_active"] is None
    assert "1 seed(s)" in cases["one_seed"]["caveat"]
    assert cases["nan"]["experts_matter"] is None
    assert REMOVAL_MIN == 0.3


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Fast mode three times in one folder. The first invocation is interrupted at step 2
    of its first run (a KeyboardInterrupt inside the training loop: the trainer's Ctrl-C
    path, which saves a checkpoint); the second must resume that run and train the
    others; the third must skip every run."""
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    import tinymoe.train  # noqa: PLC0415
    from tinymoe.__main__ import main  # noqa: PLC0415

    out = tmp_path_factory.mktemp("study")
    threads = B.get_num_threads()
    runs = plan_runs(StudySettings(**FAST), out)
    real_train = tinymoe.train.train

    def interrupted_train(model_cfg, tcfg, progress=True):
        def ctrl_c(step, model):
            if step == 2:
                raise KeyboardInterrupt
        return real_train(model_cfg, tcfg, progress, on_step=ctrl_c)

    def invoke():
        o, e = io.StringIO(), io.StringIO()      # capsys is function-scoped: capture by hand
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = main(["findings", "--fast", "--out", str(out), "--threads", "1", "--quiet"])
        return {"rc": rc, "stdout": o.getvalue(), "stderr": e.getvalue()}

    results = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tinymoe.train, "train", interrupted_train)
            stopped = invoke()
        stopped["written"] = sorted(p.name for p in out.iterdir())
        for _ in range(2):
            res = invoke()
            res.update(json=json.loads((out / "findings.json").read_text()),
                       md=(out / "findings.md").read_text(),
                       ckpt_bytes={r.name: (r.folder / "checkpoint.npz").read_bytes()
                                   for r in runs})
            results.append(res)
    finally:
        B.set_num_threads(threads)
    return {"out": out, "runs": runs, "stopped": stopped, "results": results}


def test_fast_mode_writes_the_report(study):
    first = study["results"][0]
    assert first["rc"] == 0, first["stderr"][-2000:]
    out = study["out"]
    for name in ("findings.md", "findings.json", "loss_vs_flops.png", "expert_removal.png",
                 "specialization.png", "domain_share.png", "early_routing.png",
                 "drop_vs_position.png", "held_out_drop_vs_position.png"):
        p = out / name
        assert p.is_file() and p.stat().st_size > 0, name
        if name.endswith(".png"):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    js = first["json"]
    for key in ("fast", "note", "settings", "models", "runs", "comparison", "removal",
                "held_out", "analysis", "scale", "findings", "host", "wall_seconds",
                "figures", "command"):
        assert key in js, key
    for key in ("cpu", "cores", "threads", "load_start", "load_end"):
        assert js["host"][key] not in (None, ""), key
    assert js["host"]["threads"] == 1
    assert js["fast"] is True and "NOT meaningful" in js["note"]
    assert set(js["models"]) == {"moe", "dense_active", "dense_total", "moe_without"}
    assert set(js["removal"]["domains"]) == {"prose", "code", "arith", "all"}
    assert set(js["held_out"]["loss"]) == {"prose", "code", "arith", "all"}
    assert js["held_out"]["domain"] == "code"
    # every run has its final loss and a loss-vs-FLOPs curve that ends at the last step
    for r in js["runs"]:
        assert r["final_mean"] is not None and r["curve"]["step"][-1] == FAST["steps"]
        assert r["curve"]["flops"][-1] == pytest.approx(
            FAST["steps"] * js["models"][r["kind"]]["flops_per_update"])
    assert "code" not in js["runs"][-1]["final"]        # the run without code never saw it
    # the parameter counts stated in the report are the ones the twins have
    m = js["models"]
    row = 3 * get_preset("toy").d_model * get_preset("toy").n_layers
    assert abs(m["dense_active"]["params"]["active"] - m["moe"]["params"]["active"]) <= row / 2
    assert abs(m["dense_total"]["params"]["total"] - m["moe"]["params"]["total"]) <= row / 2
    md = first["md"]
    assert ("| finding | measure | effect [interval] | baseline | baseline [interval] | "
            "verdict |") in md
    findings = {r["finding"] for r in js["findings"]}
    for f in ("experts matter (expert removal)", "MoE against a dense model",
              "context-independent specialization", "early routing learning",
              "drop-towards-the-end", "held-out domain"):
        assert f in findings, f
        assert f"| {f} |" in md, f
    assert len([ln for ln in md.splitlines() if ln.startswith("| ")]) >= len(js["findings"])
    for r in js["findings"]:
        assert r["verdict"] in (True, False, None) and r["effect"] and r["baseline"]
    # fast mode says its verdicts mean nothing; one seed cannot meet the criteria
    assert "NOT meaningful" in md and "NOT meaningful" in first["stdout"]
    assert js["scale"]["met"] is False and CAVEAT_TAIL in md and CAVEAT_TAIL in first["stdout"]
    assert js["host"]["cpu"] in md
    assert "load average" in md and "Wall time" in md


def test_interrupted_run_is_resumed_and_finished_runs_are_skipped(study):
    stopped = study["stopped"]
    assert stopped["rc"] == 130
    assert "run the same command again to resume" in stopped["stderr"]
    assert stopped["written"] == ["runs"]                       # no report from a cut study
    first, second = study["results"]
    actions = {r["name"]: (r["action"], r["from_step"]) for r in first["json"]["runs"]}
    main_run = study["runs"][0]
    assert actions.pop(main_run.name) == ("resumed", 2)
    assert set(actions.values()) == {("trained", 0)}
    starts = [json.loads(line) for line in (main_run.folder / "log.jsonl").read_text().splitlines()]
    starts = [e for e in starts if e["event"] == "start"]
    assert [e["step"] for e in starts] == [0, 2]
    assert starts[1]["resumed_from"].endswith("checkpoint.npz")
    for r in study["runs"]:
        assert load_checkpoint(r.folder).step == FAST["steps"]
    # the second invocation trains nothing and rewrites the same report
    assert second["rc"] == 0, second["stderr"][-2000:]
    assert {r["action"] for r in second["json"]["runs"]} == {"skipped"}
    assert second["ckpt_bytes"] == first["ckpt_bytes"]
    assert [r["final_mean"] for r in second["json"]["runs"]] == \
        [r["final_mean"] for r in first["json"]["runs"]]
    assert second["json"]["findings"] == first["json"]["findings"]


def test_jobs_trains_in_worker_processes_with_the_same_result(study, tmp_path):
    """--jobs 2 trains the runs two at a time in spawned processes (1 thread each): every
    run ends with the same weights as the one-at-a-time study, and the report is written."""
    from tinymoe.__main__ import main

    threads = B.get_num_threads()
    out = tmp_path / "jobs"
    o, e = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = main(["findings", "--fast", "--out", str(out), "--threads", "2", "--jobs", "2",
                       "--quiet"])
    finally:
        B.set_num_threads(threads)
    assert rc == 0, e.getvalue()[-2000:]
    assert "2 at a time, 1 thread(s) each" in o.getvalue() + e.getvalue()
    js = json.loads((out / "findings.json").read_text())
    assert {r["action"] for r in js["runs"]} == {"trained"}
    for r in study["runs"]:
        mine = load_checkpoint(out / "runs" / r.name).model_state
        ref = load_checkpoint(r.folder).model_state
        assert mine.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(mine[k], ref[k], err_msg=f"{r.name} {k}")


def test_markdown_caveat_follows_the_criteria(study):
    js = study["results"][0]["json"]
    good = scale_criteria(_iv(0.42, 0.38, 0.46), GOOD_MOE, GOOD_DENSE)
    bad = scale_criteria(_iv(0.10, 0.05, 0.15), GOOD_MOE, GOOD_DENSE)
    md_good = format_markdown({**js, "fast": False, "scale": good})
    md_bad = format_markdown({**js, "fast": False, "scale": bad})
    assert CAVEAT_TAIL not in md_good and "NOT meaningful" not in md_good
    assert "Both met" in md_good
    assert md_bad.count(CAVEAT_TAIL) == 2          # at the top and under the criteria


def test_cli_errors_are_one_line(study, capsys, tmp_path):
    def cli(*args):
        return InProcess(capsys, "findings", *args)

    one_line_error(cli("--steps", "0"), match="0 must be >= 1")
    one_line_error(cli("--seeds", "x"), match="invalid int value: 'x'")
    one_line_error(cli("--fast", "--without", "poetry", "--out", tmp_path / "o"),
                   match="--without 'poetry' is not a domain of the data")
    one_line_error(cli("--config", "nope", "--out", tmp_path / "o"), match="unknown preset")
    one_line_error(cli("--fast", "--data", tmp_path / "missing", "--out", tmp_path / "o"),
                   match="not found")
    (tmp_path / "file").write_text("x")
    one_line_error(cli("--fast", "--out", tmp_path / "file"), match="is not a folder")
    # a study folder holding runs of other settings is refused, not overwritten
    before = (study["runs"][0].folder / "checkpoint.npz").read_bytes()
    one_line_error(cli("--fast", "--steps", "7", "--out", study["out"], "--quiet"),
                   match="holds a run with other settings: steps 6 (study: 7)")
    assert (study["runs"][0].folder / "checkpoint.npz").read_bytes() == before
    assert not (tmp_path / "o").exists()


def test_help_explains_every_flag(capsys):
    p = InProcess(capsys, "findings", "--help")
    assert p.returncode == 0
    for flag in FLAGS:
        assert flag in p.stdout, flag
    for word in ("mini", "toy", "runs/findings", "prose, code, arith", "not meaningful"):
        assert word in " ".join(p.stdout.split()), word
    top = InProcess(capsys, "--help")
    assert "findings" in top.stdout
