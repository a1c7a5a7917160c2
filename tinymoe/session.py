"""Setting up a training session: the learning-rate schedule, optimizer, data, tokenizer,
and everything a resume must check, before :func:`tinymoe.train.train` runs its loop.

:func:`set_up` returns a :class:`Session` (config, model, optimizer, sampler, RNGs, data)
or refuses the start with one line: a checkpoint that does not match the model config or
the train settings of :data:`RESUME_MUST_MATCH`, changed data, a finished run, an
``out_dir`` that already holds another run's checkpoint. A resume that changes the
learning-rate schedule starts with a one-line note (``Session.notes``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinymoe import backend as B
from tinymoe.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from tinymoe.config import ModelConfig
from tinymoe.data import BatchSampler, Corpus, builtin_corpus, encode_corpus, load_corpus, train_bpe
from tinymoe.evaluate import token_byte_lengths
from tinymoe.optim import (Optimizer, configure_optimizers, constant, inverse_sqrt,
                           warmup_cosine)
from tinymoe.recipes import recipe_report
from tinymoe.runfolder import RunFolder
from tinymoe.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from tinymoe.parallel import Parallel
    from tinymoe.train import TrainConfig

np = B.np

__all__ = ["Session", "set_up", "lr_at", "build_optimizer", "load_data", "build_tokenizer",
           "RESUME_MUST_MATCH", "SCHEDULE_FIELDS"]

# Train-config fields that must be the same when resuming, or the continuation would not
# be the same run (other fields, e.g. steps or eval_every, may change on resume).
RESUME_MUST_MATCH = ("batch_size", "seq_len", "seed", "data", "exclude_domains", "max_chars",
                     "tokenizer", "optimizer", "grad_accum", "weight_decay", "adam_beta1",
                     "adam_beta2", "recipe")
# Fields that shape the learning-rate schedule (a resume that changes one says so).
SCHEDULE_FIELDS = ("schedule", "steps", "lr", "min_lr", "warmup")


# ---------------------------------------------------------------------------- pieces
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for update number ``step`` (0 for the first), by ``cfg.schedule``."""
    if cfg.schedule == "cosine":
        return warmup_cosine(step, cfg.lr, min(cfg.warmup, cfg.steps), cfg.steps, cfg.min_lr)
    if cfg.schedule == "inverse_sqrt":
        return inverse_sqrt(step, cfg.warmup, scale=cfg.lr * math.sqrt(max(cfg.warmup, 1)))
    return constant(step, cfg.lr)


def build_optimizer(model: Any, cfg: TrainConfig) -> Optimizer:
    """The run's optimizer: :func:`tinymoe.optim.configure_optimizers` (kept as a name)."""
    return configure_optimizers(model, cfg)


def load_data(cfg: TrainConfig) -> Corpus:
    """The built-in corpus, or the user's text (file/folder), minus ``exclude_domains``."""
    if cfg.data is None:
        return builtin_corpus(exclude=cfg.exclude_domains, max_chars=cfg.max_chars)
    corpus = load_corpus(cfg.data)
    unknown = [d for d in cfg.exclude_domains if d not in corpus.domains]
    if unknown:
        raise ValueError(f"exclude_domains: unknown domain(s) {unknown} "
                         f"(domains of {cfg.data}: {', '.join(corpus.names)})")
    domains = {k: v for k, v in corpus.domains.items() if k not in cfg.exclude_domains}
    if not domains:
        raise ValueError("exclude_domains leaves no domain")
    if cfg.max_chars is not None:
        from tinymoe.data import DomainText, _cut  # noqa: PLC0415
        domains = {k: DomainText(_cut(v.train, cfg.max_chars),
                                 _cut(v.val, max(cfg.max_chars // 10, 1)))
                   for k, v in domains.items()}
    return Corpus(domains, source=corpus.source)


def build_tokenizer(cfg: TrainConfig, corpus: Corpus, vocab_size: int) -> Any:
    """Byte tokenizer, or a BPE trained on the corpus up to ``vocab_size`` ids."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if vocab_size <= ByteTokenizer.vocab_size:
        raise ValueError(f"tokenizer 'bpe' with vocab_size={vocab_size} learns no merges; "
                         "set a larger vocab_size (e.g. --vocab-size 2048)")
    return train_bpe(corpus, vocab_size)


def _data_fingerprint(train: dict[str, Any], val: dict[str, Any]) -> str:
    """sha256 of the domain names and token arrays (checked on resume)."""
    h = hashlib.sha256()
    for split in (train, val):
        for name, arr in split.items():
            h.update(name.encode("utf-8") + b"\0")
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- resume checks
def _resume_model_config(ckpt: Any, model_cfg: ModelConfig | None) -> ModelConfig:
    """The model config to use when resuming; a mismatch raises one CheckpointError."""
    saved = ckpt.model_config
    if model_cfg is not None:
        a, b = saved.to_dict(), model_cfg.to_dict()
        diff = [f"{k}={b[k]!r} (checkpoint: {a[k]!r})" for k in a if a[k] != b[k]]
        if diff:
            raise CheckpointError(f"{ckpt.path}: model config mismatch: {', '.join(diff)}")
    if ckpt.optimizer_state is None or ckpt.sampler_state is None:
        raise CheckpointError(f"{ckpt.path}: holds no optimizer/sampler state, so training "
                              "cannot resume from it")
    return saved


def _check_resume_train(ckpt: Any, cfg: TrainConfig) -> None:
    """The fields of RESUME_MUST_MATCH must equal the checkpoint's."""
    tc = ckpt.train_config
    now = cfg.to_dict()
    diff = [f"{k}={now[k]!r} (checkpoint: {tc.get(k)!r})"
            for k in RESUME_MUST_MATCH if k in tc and tc[k] != now[k]]
    if diff:
        raise CheckpointError(f"{ckpt.path}: cannot resume with changed "
                              f"{', '.join(diff)}")


def _check_not_finished(ckpt: Checkpoint, cfg: TrainConfig) -> None:
    """Resuming needs updates left to do; say how to continue a finished run."""
    n = ckpt.step
    if n >= cfg.steps:
        raise ValueError(f"the run in {Path(ckpt.path).parent} has finished at step {n} "
                         f"(--steps {cfg.steps}); to train it further resume with --steps M "
                         f"(M > {n}: the schedule is re-shaped to end at M), or start runs you "
                         "want to split with their full --steps and --stop-at")
    if cfg.stop_at is not None and cfg.stop_at <= n:
        raise ValueError(f"--stop-at {cfg.stop_at}: the checkpoint {ckpt.path} is already at "
                         f"step {n}")


def _schedule_notice(ckpt: Checkpoint, cfg: TrainConfig) -> str | None:
    """One line when a resume changes the learning-rate schedule, else None."""
    old = {k: ckpt.train_config[k] for k in SCHEDULE_FIELDS if k in ckpt.train_config}
    used = {"cosine": SCHEDULE_FIELDS, "inverse_sqrt": ("schedule", "lr", "warmup"),
            "constant": ("schedule", "lr")}
    relevant = set(used[cfg.schedule]) | set(used.get(old.get("schedule", cfg.schedule), ()))
    changed = [k for k, v in old.items() if k in relevant and v != getattr(cfg, k)]
    if not changed:
        return None
    try:
        before = lr_at(ckpt.step, cfg.replace(**old))
    except ValueError:  # pragma: no cover (a checkpoint's own config is valid)
        return None
    after = lr_at(ckpt.step, cfg)
    what = ", ".join(f"{k} {old[k]} -> {getattr(cfg, k)}" for k in changed)
    return (f"note: resuming with {what} changes the learning-rate schedule (lr of step "
            f"{ckpt.step + 1}: {before:.3g} -> {after:.3g}); to split a run into sessions "
            "without changing it, keep its --steps and use --stop-at")


@dataclass
class Session:
    """Everything :func:`set_up` builds for a training session."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    model: Any
    optimizer: Optimizer
    sampler: BatchSampler
    route_rng: Any
    tokenizer: Any
    corpus: Corpus
    train_tok: dict[str, Any]
    val_tok: dict[str, Any]
    byte_lengths: Any
    fingerprint: str
    ckpt: Checkpoint | None
    start_step: int
    notes: list[str]
    parallel: Parallel
    recipe: dict[str, Any] | None = None
    "what the recipe set (:func:`tinymoe.recipes.recipe_report`); None without one"


def set_up(model_cfg: ModelConfig | None, cfg: TrainConfig, rf: RunFolder,
           parallel: Parallel | None = None) -> Session:
    """Checkpoint (when resuming), data, tokenizer, model, optimizer, sampler, RNGs, with
    every check that can refuse the start (one-line errors).

    ``parallel`` (MPI ranks, :mod:`tinymoe.parallel`; None: one process) makes the sampler
    draw the global batch of P * batch_size rows, shards the experts (expert mode) and
    loads this rank's slice of a checkpoint."""
    from tinymoe.nn.model import OpenMoE  # noqa: PLC0415
    from tinymoe.parallel import Parallel  # noqa: PLC0415

    par = parallel if parallel is not None else Parallel("none", None)
    ckpt = None
    notes: list[str] = []
    if cfg.resume is not None:
        ckpt = load_checkpoint(cfg.resume)
        model_cfg = _resume_model_config(ckpt, model_cfg)
        tokenizer = ckpt.make_tokenizer()
    elif model_cfg is None:
        raise ValueError("train: model_cfg is None and there is no checkpoint to resume")
    ckpt_path = rf.checkpoint_path
    if (ckpt_path.exists() and not cfg.overwrite
            and (ckpt is None or Path(ckpt.path).resolve() != ckpt_path.resolve())):
        raise FileExistsError(f"{rf.path} already holds a checkpoint ({ckpt_path}); "
                              f"resume it with --resume {ckpt_path}, start over with "
                              "--overwrite, or choose another --out")
    if cfg.seq_len is None:
        cfg = cfg.replace(seq_len=model_cfg.max_seq_len)
    if ckpt is not None:
        _check_resume_train(ckpt, cfg)
        _check_not_finished(ckpt, cfg)
        notes += filter(None, [_schedule_notice(ckpt, cfg)])
    par.check(model_cfg, cfg, ckpt)
    corpus = load_data(cfg)
    if ckpt is None:
        tokenizer = build_tokenizer(cfg, corpus, model_cfg.vocab_size)
    if model_cfg.vocab_size != tokenizer.vocab_size:
        notes.append(f"note: vocab_size {model_cfg.vocab_size} -> {tokenizer.vocab_size} "
                     f"(the {cfg.tokenizer} tokenizer's)")
        model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} > the model's max_seq_len={model_cfg.max_seq_len}")
    train_tok, val_tok = encode_corpus(corpus, tokenizer)
    fingerprint = _data_fingerprint(train_tok, val_tok)
    if ckpt is not None and ckpt.extra.get("data_fingerprint") not in (None, fingerprint):
        raise CheckpointError(f"{ckpt.path}: the training data differs from the data the "
                              "checkpoint was trained on (changed files or settings)")
    sampler = BatchSampler(train_tok, par.global_batch(cfg.batch_size), cfg.seq_len,
                           seed=cfg.seed)                        # P * b rows, one process: b
    route_rng = B.default_rng(cfg.seed + 1_000_003)   # slot priority "random" only
    recipe = recipe_report(cfg.recipe, cfg, model_cfg)
    if recipe is not None and ckpt is None:
        notes.append(_recipe_note(recipe))
    if model_cfg.init == "openmoe" and model_cfg.tie_embeddings and ckpt is None:
        notes.append("note: init openmoe draws the embedding N(0, 1) and the LM head is tied "
                     f"to it, so the first logits have std ~sqrt(d_model) = "
                     f"{math.sqrt(model_cfg.d_model):.0f}; OpenMoE's head is untied "
                     "(--tie-embeddings false, or --config openmoe-base-code)")
    model = OpenMoE(model_cfg, seed=cfg.seed)
    par.prepare_model(model)                                     # expert mode: E/P experts here
    model.train()
    optimizer = build_optimizer(model, cfg)
    if ckpt is not None:
        try:
            model.load_state_dict(par.local_model_state(model, ckpt.model_state))
            optimizer.load_state_dict(par.local_optimizer_state(model, optimizer,
                                                                ckpt.optimizer_state))
            sampler.load_state_dict(ckpt.sampler_state)
            if ckpt.rng_state and "route_rng" in ckpt.rng_state:
                route_rng.bit_generator.state = ckpt.rng_state["route_rng"]
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path}: cannot restore training state ({e})") from None
        same = Path(ckpt.path).resolve() == ckpt_path.resolve()
        rf.kept = (str(ckpt_path) if same else ckpt.path, ckpt.step)
    return Session(cfg=cfg, model_cfg=model_cfg, model=model, optimizer=optimizer,
                    sampler=sampler, route_rng=route_rng, tokenizer=tokenizer, corpus=corpus,
                    train_tok=train_tok, val_tok=val_tok,
                    byte_lengths=token_byte_lengths(tokenizer, model_cfg.vocab_size),
                    fingerprint=fingerprint, ckpt=ckpt,
                    start_step=ckpt.step if ckpt is not None else 0, notes=notes, recipe=recipe,
                    parallel=par)


def _recipe_note(report: dict[str, Any]) -> str:
    """One line: what the recipe set, and which of its values an explicit setting replaced."""
    line = (f"recipe {report['recipe']} set: "
            + ", ".join(f"{k}={v}" for k, v in report["set"].items()))
    if report["kept"]:
        line += "; your settings kept: " + ", ".join(
            f"{k}={yours} (recipe: {theirs})" for k, (yours, theirs) in report["kept"].items())
    return line

