"""Training recipes: a name for a set of train and model settings, applied under the
user's explicit ones (``python -m tinymoe train --recipe openmoe``).

``openmoe``: what OpenMoE trained with (docs/openmoe-facts.md §8-§11; T5X + the gin files):

    optimizer      adafactor      decay 0.8, no momentum, update clipping 1.0, parameter
                                  scaling, per expert for [E, r, c] (tinymoe.optim.Adafactor)
    weight_decay   0.0            none in any OpenMoE gin file (§10)
    grad_clip      0.0            no global gradient-norm clipping (§10)
    schedule       inverse_sqrt   lr(t) = lr sqrt(warmup) / sqrt(max(t, warmup)) (§11): a
    lr             0.01           *constant* 0.01 for `warmup` steps (no ramp), then 1/sqrt(t)
    warmup         steps / 50     OpenMoE: 10,000 of 500,000 steps; a laptop run keeps the
                                  same fraction (at least 1 step), so its lr ends at the
                                  same fraction of the peak: sqrt(1/50) = 0.14
    z_loss_coef    1e-4           router z-loss (ST-*:16); 1e-3 for the 34B shape (OM-xl:25)
    logit_z_loss_coef 1e-4        output-logit z-loss of the code (TC-*:59; the paper's
                                  Table 12 says 1e-3)
    init           openmoe        embedding N(0, 1), matrices std sqrt(0.1 / fan_in), router
                                  N(0, 0.02^2) (§9)
    tie_embeddings false          OpenMoE's output head is untied (§5), and its N(0, 1)
                                  embedding assumes it: tied to it, tinymoe's head (no
                                  1/sqrt(d) on the logits) starts with logits of std
                                  sqrt(d_model) and a cross-entropy near 100 nats on `mini`

Otherwise the recipe leaves the architecture alone (``ffn_kind``, sizes): that is the
preset's job (``--config openmoe-base-code`` follows the original code).
``none`` sets nothing: every default stays as it is (``--optimizer adafactor`` alone keeps
weight decay 0.1, clipping 1.0 and the cosine schedule).
"""
from __future__ import annotations

from typing import Any

from tinymoe.config import ModelConfig

__all__ = ["RECIPES", "recipe_settings", "apply_recipe", "recipe_report", "openmoe_warmup"]

RECIPES = ("none", "openmoe")

OPENMOE_STEPS = 500_000     # TRAIN_STEPS of OM-base/large (docs/openmoe-facts.md §1)
OPENMOE_WARMUP = 10_000     # warmup_steps of the MoE pretrain.gin (§11)


def openmoe_warmup(steps: int) -> int:
    """OpenMoE's 10,000 constant-lr steps of 500,000, scaled to a run of ``steps``: the same
    fraction, 1/50, rounded, at least 1."""
    return max(1, round(steps * OPENMOE_WARMUP / OPENMOE_STEPS))


def _is_openmoe_34b(cfg: ModelConfig) -> bool:
    """The OpenMoE-34B shape (32 layers of d 3072, 32 experts), whose last gin config used
    router z-loss 1e-3 (OM-xl:25)."""
    return (cfg.d_model, cfg.n_layers, cfg.n_experts) == (3072, 32, 32)


def recipe_settings(name: str, steps: int, model_cfg: ModelConfig
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train settings, model settings) of recipe ``name`` for a run of ``steps`` updates
    of ``model_cfg``'s shape. ``"none"``: two empty dicts."""
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r} is not one of {', '.join(RECIPES)}")
    if name == "none":
        return {}, {}
    train = {"optimizer": "adafactor", "weight_decay": 0.0, "grad_clip": 0.0,
             "schedule": "inverse_sqrt", "lr": 0.01, "warmup": openmoe_warmup(steps)}
    model = {"z_loss_coef": 1e-3 if _is_openmoe_34b(model_cfg) else 1e-4,
             "logit_z_loss_coef": 1e-4, "init": "openmoe", "tie_embeddings": False}
    return train, model


def apply_recipe(name: str, model_cfg: ModelConfig, train_given: dict[str, Any],
                 model_given: dict[str, Any], default_steps: int
                 ) -> tuple[dict[str, Any], ModelConfig]:
    """The recipe under the user's explicit settings: returns (TrainConfig keyword
    arguments, ModelConfig). ``train_given`` / ``model_given``: only the settings the user
    gave (they win); ``model_cfg``: the preset, before ``model_given``; ``default_steps``:
    the run length when ``steps`` is not given (the warmup is scaled to it)."""
    steps = train_given.get("steps", default_steps)
    train, model = recipe_settings(name, steps, model_cfg)
    return ({**train, **train_given, "recipe": name},
            model_cfg.replace(**{**model, **model_given}))


def recipe_report(name: str, train_cfg: Any, model_cfg: ModelConfig) -> dict[str, Any] | None:
    """What recipe ``name`` set in this run, for the log: ``{"recipe", "set": {field: value},
    "kept": {field: [yours, recipe's]}}`` (``kept``: fields where the run's value differs
    from the recipe's, i.e. an explicit setting won). None for ``"none"``."""
    if name == "none":
        return None
    train, model = recipe_settings(name, train_cfg.steps, model_cfg)
    have = {**{k: getattr(train_cfg, k) for k in train}, **{k: getattr(model_cfg, k) for k in model}}
    want = {**train, **model}
    return {"recipe": name,
            "set": {k: v for k, v in want.items() if have[k] == v},
            "kept": {k: [have[k], v] for k, v in want.items() if have[k] != v}}
