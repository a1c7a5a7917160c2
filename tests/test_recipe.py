"""``--recipe openmoe`` (tinymoe/recipes.py): the values it sets (docs/openmoe-facts.md §8-§11),
the warmup scaling, explicit flags winning over it, what the run log records, and that
``--recipe none`` / ``--optimizer adafactor`` alone change nothing else."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tinymoe.checkpoint import load_checkpoint
from tinymoe.config import get_preset
from tinymoe.recipes import apply_recipe, openmoe_warmup, recipe_settings
from tinymoe.train import TrainConfig

from tests.test_cli import InProcess, one_line_error

OPENMOE_TRAIN = {"optimizer": "adafactor", "weight_decay": 0.0, "grad_clip": 0.0,
                 "schedule": "inverse_sqrt", "lr": 0.01}
OPENMOE_MODEL = {"z_loss_coef": 1e-4, "logit_z_loss_coef": 1e-4, "init": "openmoe",
                 "tie_embeddings": False}


def test_recipe_settings_are_openmoes():
    train, model = recipe_settings("openmoe", 1200, get_preset("mini"))
    assert train == {**OPENMOE_TRAIN, "warmup": 24}
    assert model == OPENMOE_MODEL
    # 34B's last gin config: router z-loss 1e-3 (OM-xl:25)
    assert recipe_settings("openmoe", 1200, get_preset("openmoe-34b"))[1]["z_loss_coef"] == 1e-3
    assert recipe_settings("none", 1200, get_preset("mini")) == ({}, {})
    with pytest.raises(ValueError, match="recipe='t5' is not one of none, openmoe"):
        recipe_settings("t5", 10, get_preset("mini"))


def test_warmup_is_openmoes_fraction_of_the_run():
    """OpenMoE: 10,000 constant-lr steps of 500,000 (1/50); a shorter run keeps the fraction."""
    assert openmoe_warmup(500_000) == 10_000
    assert [openmoe_warmup(n) for n in (1200, 5000, 100, 10, 1)] == [24, 100, 2, 1, 1]
    # the lr it gives: constant 0.01 up to the warmup (no ramp), then 0.01 sqrt(w / t)
    from tinymoe.session import lr_at
    cfg = TrainConfig(steps=1200, **OPENMOE_TRAIN, warmup=24, out_dir="unused")
    assert [lr_at(t, cfg) for t in (0, 1, 23, 24)] == [0.01] * 4
    assert lr_at(96, cfg) == pytest.approx(0.005, rel=1e-12)
    assert lr_at(1199, cfg) == pytest.approx(0.01 * np.sqrt(24 / 1199), rel=1e-12)


def test_apply_recipe_explicit_settings_win():
    base = get_preset("toy")
    train, model = apply_recipe("openmoe", base, {"lr": 0.005, "steps": 500},
                                {"init": "normal", "d_model": 32}, default_steps=1200)
    assert train == {**OPENMOE_TRAIN, "lr": 0.005, "steps": 500, "warmup": 10,
                     "recipe": "openmoe"}
    assert (model.init, model.d_model, model.logit_z_loss_coef, model.tie_embeddings) == \
        ("normal", 32, 1e-4, False)
    assert model.ffn_kind == base.ffn_kind         # the architecture is the preset's


def _start_event(out):
    for line in open(out / "log.jsonl"):
        e = json.loads(line)
        if e.get("event") == "start":
            return e
    raise AssertionError("no start event")


RUN = ("train", "--config", "toy", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
       "--max-chars", "4000", "--eval-batches", "1", "--snapshot-every", "0", "--quiet",
       "--threads", "1")


def test_cli_recipe_sets_the_values_and_logs_them(tmp_path, capsys):
    out = tmp_path / "r"
    p = InProcess(capsys, *RUN, "--recipe", "openmoe", "--lr", "0.005", "--init", "normal",
                  "--out", out)
    assert p.returncode == 0, p.stderr
    e = _start_event(out)
    tc, mc = e["train_config"], e["model_config"]
    assert tc["recipe"] == "openmoe" and tc["warmup"] == 1          # 2 steps / 50, at least 1
    for k, v in {**OPENMOE_TRAIN, "lr": 0.005}.items():
        assert tc[k] == v, k
    for k, v in {**OPENMOE_MODEL, "init": "normal"}.items():
        assert mc[k] == v, k
    assert e["recipe"]["kept"] == {"lr": [0.005, 0.01], "init": ["normal", "openmoe"]}
    assert e["recipe"]["set"] == {"optimizer": "adafactor", "weight_decay": 0.0, "grad_clip": 0.0,
                                  "schedule": "inverse_sqrt", "warmup": 1, "z_loss_coef": 1e-4,
                                  "logit_z_loss_coef": 1e-4, "tie_embeddings": False}
    assert any(n.startswith("recipe openmoe set: optimizer=adafactor") and
               "your settings kept: lr=0.005 (recipe: 0.01), init=normal (recipe: openmoe)" in n
               for n in e["notes"])
    assert "recipe openmoe set:" in p.stderr                         # printed at the start
    ck = load_checkpoint(out / "checkpoint.npz")
    assert ck.optimizer_state["type"] == "Adafactor"
    assert all(g["weight_decay"] == 0.0 for g in ck.optimizer_state["param_groups"])
    assert "lm_head.weight" in ck.model_state                        # untied


def test_cli_without_recipe_nothing_changes(tmp_path, capsys):
    """--recipe none (the default) and --optimizer adafactor alone keep every other default:
    weight decay 0.1, clipping 1.0, the cosine schedule, the preset's model."""
    for extra, opt in (((), "adamw"), (("--optimizer", "adafactor"), "adafactor")):
        out = tmp_path / opt
        p = InProcess(capsys, *RUN, *extra, "--out", out)
        assert p.returncode == 0, p.stderr
        e = _start_event(out)
        tc, mc = e["train_config"], e["model_config"]
        d = TrainConfig(out_dir="unused")
        assert (tc["recipe"], tc["optimizer"], tc["weight_decay"], tc["grad_clip"],
                tc["schedule"], tc["lr"], tc["warmup"]) == \
            ("none", opt, d.weight_decay, d.grad_clip, d.schedule, d.lr, d.warmup)
        assert mc == get_preset("toy").to_dict()
        assert e["recipe"] is None and not any("recipe" in n for n in e["notes"])


def test_cli_recipe_errors_and_resume(tmp_path, capsys):
    one_line_error(InProcess(capsys, *RUN, "--recipe", "t5x", "--out", tmp_path / "x"),
                   match="recipe='t5x' is not one of none, openmoe")
    out = tmp_path / "r"
    assert InProcess(capsys, *RUN, "--out", out).returncode == 0
    one_line_error(InProcess(capsys, "train", "--resume", out, "--steps", "3", "--recipe",
                             "openmoe", "--quiet"),
                   match="cannot resume with changed recipe='openmoe' (checkpoint: 'none')")


def test_bench_refuses_the_openmoe_ffn_preset(capsys):
    """bench's FLOP count and torch side are SwiGLU only: the preset with OpenMoE's FFN is
    refused in one line instead of timing with a wrong FLOP count."""
    one_line_error(InProcess(capsys, "bench", "--config", "openmoe-base-code", "--side", "tinymoe",
                             "--steps", "1"),
                   match="ffn_kind='openmoe'; bench supports the swiglu presets only")
