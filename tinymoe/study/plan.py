"""The runs of the routing study, their configs, and running them resumably.

The study compares four kinds of model trained on the same data with the same recipe
(:data:`KINDS`):

=================  =====================================================================
``moe``            the MoE of the preset, one run per seed (seed 0 is the *main* run:
                   the routing analysis is made on it)
``dense_active``   dense twin with as many **active** parameters per token as the MoE
``dense_total``    dense twin with as many **total** parameters as the MoE
``moe_without``    the MoE trained without one domain (seed 0 only): the held-out-domain
                   effect
=================  =====================================================================

A dense twin (:func:`dense_twin`) keeps the MoE's d_model, n_layers, heads, vocabulary and
sequence length; every block gets a dense SwiGLU FFN (``moe_every = n_layers + 1``) of
width ``d_ff`` chosen so the parameter count (``count_parameters(cfg)["active"]`` or
``["total"]``) is as close as a whole d_ff can make it. A dense block holds ``3 d d_ff``
FFN weights, so the count is linear in d_ff,

    count(d_ff) = a + b d_ff,  b = 3 d n_layers,  d_ff* = round((target - a) / b),

and the twin misses the target by at most b / 2 (half of one "row" of d_ff).

Each run is its own run folder ``<out>/runs/<name>`` (the trainer's: checkpoint,
``log.jsonl``, snapshots). :func:`run_state` says what is there: nothing (``new``), an
unfinished checkpoint (``partial``: an interrupted run, resumed with ``resume=``) or a
checkpoint at the final step (``done``: skipped). A folder holding a run with other
settings is refused with one line (never overwritten).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tinymoe.config import ModelConfig, count_parameters, get_preset
from tinymoe.train import RESUME_MUST_MATCH, TrainConfig

__all__ = ["KINDS", "RunSpec", "StudySettings", "dense_twin", "plan_runs", "run_state",
           "run_one", "seeds_of", "flops_per_update", "param_counts", "STUDY_PRESET",
           "STUDY_STEPS", "FAST"]

KINDS = ("moe", "dense_active", "dense_total", "moe_without")
STUDY_PRESET = "mini"        # default --config (a laptop-scale MoE)
STUDY_STEPS = 300            # default --steps (see docs/findings.md for the time it takes)
STUDY_BATCH = 16             # sequences per update (the trainer's default)


@dataclass(frozen=True)
class StudySettings:
    """Everything that shapes the study's runs and measures (set by the CLI).

    ``fast``: the test-suite mode (tiny data and budgets: the verdicts mean nothing).
    Budgets: ``eval_batches`` held-out batches per domain in each evaluation,
    ``removal_windows`` held-out windows per domain for the expert-removal and
    held-out-domain losses, ``analysis_tokens`` / ``drop_tokens`` / ``init_tokens`` and
    ``n_boot`` / ``n_splits`` for :func:`tinymoe.analysis.analyze`.
    """

    preset: str = STUDY_PRESET
    steps: int = STUDY_STEPS
    seeds: int = 3
    total_seeds: int = 1
    without: str = "code"
    data: str | None = None
    batch_size: int = STUDY_BATCH
    seq_len: int | None = None
    max_chars: int | None = None
    eval_batches: int = 8
    curve_points: int = 8
    removal_windows: int = 64
    analysis_tokens: int = 16384
    drop_tokens: int = 8192
    init_tokens: int = 8192
    analysis_batch: int = 16
    n_boot: int = 1000
    n_splits: int = 50
    fast: bool = False

    def validate(self) -> None:
        """One-line ValueError naming the first bad setting."""
        for name in ("steps", "seeds", "total_seeds", "batch_size", "eval_batches", "curve_points",
                     "removal_windows", "analysis_tokens", "drop_tokens", "init_tokens",
                     "analysis_batch", "n_boot", "n_splits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')}={v!r} must be an integer >= 1")
        get_preset(self.preset)                       # unknown preset: one line


# Fast mode (the test suite): the toy model, a few updates, tiny data and budgets.
FAST = dict(preset="toy", steps=6, seeds=1, batch_size=2, seq_len=32, max_chars=6000,
            eval_batches=1, curve_points=3, removal_windows=6, analysis_tokens=384,
            drop_tokens=192, init_tokens=192, analysis_batch=4, n_boot=50, n_splits=4,
            fast=True)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: its folder ``name``, ``kind`` (one of KINDS),
    ``seed``, and the exact model and train configs it is trained with."""

    name: str
    kind: str
    seed: int
    model: ModelConfig
    train: TrainConfig

    @property
    def folder(self) -> Path:
        return Path(self.train.out_dir)


def _dense(moe: ModelConfig, d_ff: int) -> ModelConfig:
    """The dense model of ``moe``'s shape with FFN width ``d_ff`` in every block."""
    return moe.replace(moe_every=moe.n_layers + 1, n_experts=1, top_k=1, d_ff=d_ff,
                       d_ff_expert=None)


def dense_twin(moe: ModelConfig, match: str = "active") -> ModelConfig:
    """The dense twin of ``moe`` whose parameter count ``match`` ("active" or "total")
    is closest to the MoE's (see the module docstring: count(d_ff) = a + b d_ff)."""
    if match not in ("active", "total"):
        raise ValueError(f"match={match!r}: choose 'active' or 'total'")
    target = count_parameters(moe)[match]
    c1 = count_parameters(_dense(moe, 1))[match]
    b = count_parameters(_dense(moe, 2))[match] - c1          # = 3 d n_layers
    a = c1 - b
    d_ff = max(1, int(round((target - a) / b)))
    return _dense(moe, d_ff)


def plan_runs(settings: StudySettings, out: str | Path) -> list[RunSpec]:
    """Every run of the study, in training order: the MoE seeds, the dense twin of equal
    active parameters per seed, the twin of equal total parameters for the first
    ``total_seeds`` seeds (a reference, not part of the scale criteria; the costliest run),
    then the MoE without ``settings.without`` (seed 0).

    Same recipe for all: ``steps`` updates, ``batch_size`` x ``seq_len`` tokens each,
    held-out evaluation ``curve_points`` times during training (the loss-vs-FLOPs
    curves), a checkpoint at each of them (resume points); MoE runs also write routing
    snapshots there (early routing)."""
    settings.validate()
    moe = get_preset(settings.preset)
    T = settings.seq_len or moe.max_seq_len
    every = max(1, settings.steps // settings.curve_points)
    models = {"moe": moe, "dense_active": dense_twin(moe, "active"),
              "dense_total": dense_twin(moe, "total"), "moe_without": moe}
    runs_dir = Path(out) / "runs"

    def spec(kind: str, seed: int) -> RunSpec:
        name = (f"moe_without_{settings.without}" if kind == "moe_without" else kind)
        name = f"{name}-seed{seed}"
        tcfg = TrainConfig(
            steps=settings.steps, batch_size=settings.batch_size, seq_len=T,
            warmup=min(60, max(1, settings.steps // 10)), eval_every=every,
            eval_batches=settings.eval_batches, save_every=every,
            log_every=max(1, min(10, every)),
            snapshot_every=every if kind.startswith("moe") else 0, seed=seed,
            out_dir=str(runs_dir / name), data=settings.data,
            exclude_domains=(settings.without,) if kind == "moe_without" else (),
            max_chars=settings.max_chars)
        return RunSpec(name=name, kind=kind, seed=seed, model=models[kind], train=tcfg)

    runs = [spec(k, s) for s in range(settings.seeds) for k in ("moe", "dense_active")]
    runs += [spec("dense_total", s) for s in range(min(settings.total_seeds, settings.seeds))]
    runs.sort(key=lambda r: KINDS.index(r.kind))
    return runs + [spec("moe_without", 0)]


def run_state(spec: RunSpec) -> tuple[str, int]:
    """``("new", 0)``, ``("partial", step)`` (a checkpoint before the final step: resume
    it) or ``("done", steps)``. A checkpoint of a run with other settings (model config,
    steps, or a field of ``RESUME_MUST_MATCH``) raises one-line ValueError."""
    from tinymoe.checkpoint import CHECKPOINT_NAME, load_checkpoint  # noqa: PLC0415

    path = spec.folder / CHECKPOINT_NAME
    if not path.exists():
        return "new", 0
    ckpt = load_checkpoint(path)
    saved = ckpt.model_config.to_dict()
    want = spec.model.replace(vocab_size=ckpt.model_config.vocab_size).to_dict()
    diff = [f"{k} {saved[k]!r} (study: {want[k]!r})" for k in want if saved[k] != want[k]]
    now = spec.train.to_dict()
    diff += [f"{k} {ckpt.train_config.get(k)!r} (study: {now[k]!r})"
             for k in ("steps",) + RESUME_MUST_MATCH
             if k in ckpt.train_config and ckpt.train_config[k] != now[k]]
    if diff:
        raise ValueError(f"{spec.folder} holds a run with other settings: {'; '.join(diff)}; "
                         "choose another --out (or remove that folder)")
    if ckpt.step >= spec.train.steps:
        return "done", ckpt.step
    return "partial", ckpt.step


def run_one(spec: RunSpec, progress: bool = True,
            train_fn: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Train ``spec`` unless it is done; resume it if partial. Returns ``{"name", "action"
    ("skipped" | "trained" | "resumed"), "from_step", "status", "message", "seconds"}``
    (``status`` of :class:`tinymoe.train.TrainResult`; "done" when skipped)."""
    import time  # noqa: PLC0415

    from tinymoe.train import train  # noqa: PLC0415

    train_fn = train_fn or train
    state, step = run_state(spec)
    if state == "done":
        return {"name": spec.name, "action": "skipped", "from_step": step, "status": "done",
                "message": f"finished earlier at step {step}", "seconds": 0.0}
    tcfg = spec.train
    if state == "partial":
        tcfg = tcfg.replace(resume=str(spec.folder / "checkpoint.npz"))
    t0 = time.perf_counter()
    res = train_fn(spec.model, tcfg, progress=progress)
    return {"name": spec.name, "action": "resumed" if state == "partial" else "trained",
            "from_step": step, "status": res.status, "message": res.message,
            "seconds": time.perf_counter() - t0}


def seeds_of(runs: Sequence[RunSpec], kind: str) -> list[RunSpec]:
    """The runs of one kind, by seed."""
    return sorted((r for r in runs if r.kind == kind), key=lambda r: r.seed)


def flops_per_update(model: ModelConfig, train: TrainConfig) -> float:
    """Training FLOPs of one update: ``model_flops(cfg, T)["train_per_token"]`` (6 N_active
    + 12 L T d_attn per token, Kaplan et al. 2020 / PaLM appendix B; the MoE's expert term
    counts all k assignments, i.e. no capacity drops) x tokens per update
    (grad_accum x batch_size x T)."""
    from tinymoe.bench.measure import model_flops  # noqa: PLC0415

    T = int(train.seq_len or model.max_seq_len)
    per_token = model_flops(model, T)["train_per_token"]
    return float(per_token * train.grad_accum * train.batch_size * T)


def param_counts(model: ModelConfig) -> dict[str, int]:
    """Total and active parameters, and the FFN width (the study's parameter table)."""
    c = count_parameters(model)
    return {"total": int(c["total"]), "active": int(c["active"]), "d_ff": model.d_ff,
            "d_ff_expert": model.expert_ff, "moe_layers": len(model.moe_layers)}

