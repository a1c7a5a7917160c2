"""The training loop: data, model, optimizer, schedule, eval, logs, checkpoints, resume.

One optimizer update ("step"), :func:`train_step` (llm.c's forward / zero_grad /
backward / update):

    lr_t = schedule(t)                            warmup + cosine / inverse sqrt / constant
    for each of grad_accum micro-batches:         gradients add up over micro-batches
        L = CE + aux_coef * L_aux + z_coef * L_z  (the model returns L; OpenMoE's loss)
        backward(L)
    g <- g / grad_accum                           (only when grad_accum > 1)
    g <- g * min(1, clip / ||g||_2)               global-norm clipping
    optimizer step (AdamW or Adafactor), then forget the gradients

Around it, :func:`train`: a progress bar (loss, tokens/s, aux loss, dropped fraction,
busiest expert's share), held-out evaluation per domain (nats per token and per byte),
and the run folder (:mod:`tinymoe.runfolder`: lock, ``log.jsonl``, ``curves.png``,
routing snapshots on a fixed probe batch, checkpoints).

Reliability (DESIGN.md "Reliability promises"):

- Resume is exact: the checkpoint holds weights, optimizer state, the batch sampler's
  RNG state (the data position) and the routing RNG, so N steps + resume + N steps gives
  bit-identical weights to 2N steps straight (``stop_at`` ends a run early without
  changing its schedule, for exactly this). Resuming a finished run is refused with how
  to continue; a resume that changes the schedule (``steps``, ``lr`` ...) says so.
- A checkpoint replaces the previous one only when it is good: its weights and optimizer
  state are finite and the training loss *on its weights* (the next step's batch) is
  finite. A NaN/inf loss or gradient norm stops the run before the bad update, with one
  line naming the step and the step of the checkpoint that is really kept.
- Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and returns with a line
  saying how to resume; a second Ctrl-C stops at once (still saving, unless the weights
  were in the middle of an update).
- One run per folder (a lock); a failed write (a full disk) ends the run with one line
  naming the file and the checkpoint kept, and ``log.jsonl`` records the failure.
- A new run refuses an ``out_dir`` that already holds a checkpoint unless told to
  ``overwrite`` it (or to ``resume`` from it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tinymoe import backend as B
from tinymoe.autograd import no_grad
from tinymoe.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from tinymoe.config import ModelConfig, count_parameters
from tinymoe.data import (Batch, BatchSampler, Corpus, builtin_corpus, encode_corpus,
                          eval_batches, load_corpus, train_bpe, unigram_entropy)
from tinymoe.optim import (Adafactor, AdamW, Optimizer, clip_grad_norm_, constant,
                           inverse_sqrt, param_groups_for_decay, scale_grads_, set_lr,
                           warmup_cosine)
from tinymoe.runfolder import RunFolder, plot_curves, write_line
from tinymoe.tokenizer import ByteTokenizer

np = B.np

__all__ = ["TrainConfig", "TrainResult", "StepStats", "UpdateInterrupted", "train",
           "train_step", "evaluate", "lr_at", "build_optimizer", "load_data",
           "build_tokenizer", "routing_summary", "plot_curves", "RESUME_MUST_MATCH",
           "SCHEDULES", "OPTIMIZERS", "TOKENIZERS"]

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
OPTIMIZERS = ("adamw", "adafactor")
TOKENIZERS = ("byte", "bpe")
# Train-config fields that must be the same when resuming, or the continuation would not
# be the same run (other fields, e.g. steps or eval_every, may change on resume).
RESUME_MUST_MATCH = ("batch_size", "seq_len", "seed", "data", "exclude_domains", "max_chars",
                     "tokenizer", "optimizer", "grad_accum", "weight_decay", "adam_beta1",
                     "adam_beta2")
# Fields that shape the learning-rate schedule (a resume that changes one says so).
SCHEDULE_FIELDS = ("schedule", "steps", "lr", "min_lr", "warmup")


@dataclass
class TrainConfig:
    """Every training setting, flat: each field is a ``python -m tinymoe train`` flag and
    the string under it is that flag's help (``--help`` is generated from them)."""

    steps: int = 1200
    "optimizer updates in the whole run (the cosine schedule ends here)"
    batch_size: int = 16
    "sequences per micro-batch"
    seq_len: int | None = None
    "tokens per sequence (none: the model's max_seq_len)"
    lr: float = 3e-3
    "peak learning rate (inverse_sqrt: the plateau; OpenMoE used 0.01 with warmup 10000)"
    min_lr: float = 3e-4
    "floor of the cosine schedule"
    warmup: int = 60
    "linear warmup updates (at most steps are used)"
    schedule: str = "cosine"
    ("learning-rate schedule: cosine (linear warmup, cosine to min_lr at steps), inverse_sqrt "
     "(OpenMoE/T5X: lr * sqrt(warmup) / sqrt(max(t, warmup))) or constant")
    optimizer: str = "adamw"
    ("adamw (betas adam_beta1/adam_beta2, decoupled weight decay on matrices only) or "
     "adafactor (OpenMoE: decay 0.8, no momentum, update clipping 1.0, parameter scaling)")
    weight_decay: float = 0.1
    "decoupled weight decay, on matrices only (not on norm scales)"
    adam_beta1: float = 0.9
    "AdamW first-moment decay"
    adam_beta2: float = 0.95
    "AdamW second-moment decay"
    grad_clip: float = 1.0
    "global gradient-norm clip (0 = off)"
    grad_accum: int = 1
    "micro-batches per update (tokens per update = grad_accum * batch_size * seq_len)"
    eval_every: int = 300
    "held-out evaluation every so many updates (0 = only at the end)"
    eval_batches: int = 8
    "held-out batches per domain in each evaluation"
    save_every: int = 300
    "checkpoint every so many updates (and always at the end; 0 = only at the end)"
    log_every: int = 10
    "a log.jsonl line (and progress-bar update) every so many updates"
    snapshot_every: int = 300
    ("routing snapshots (snapshots/step_N.npz) every so many updates, plus at step 0 and at "
     "the end (0 = none)")
    seed: int = 0
    "model init, batch order and routing randomness"
    out_dir: str = "runs/mini"
    "run folder: checkpoint.npz, log.jsonl, curves.png, snapshots/ (one run at a time)"
    data: str | None = None
    "a text file (one domain) or folder (one domain per file/subfolder); none: built-in corpus"
    exclude_domains: tuple[str, ...] = ()
    "domains left out, comma-separated (e.g. code, for the paper's 'w/o code')"
    max_chars: int | None = None
    "cut each domain's train text to this many characters (quick runs)"
    tokenizer: str = "byte"
    "byte (256 bytes + BOS + EOS) or bpe (trained on the corpus up to the model's vocab_size)"
    resume: str | None = None
    "a checkpoint (or run folder) to continue from"
    stop_at: int | None = None
    ("end this session after this update (checkpoint saved) without changing the schedule; "
     "resume later to continue")
    overwrite: bool = False
    "allow a new run to replace a checkpoint already in out_dir"
    device: str | None = None
    "cpu or cuda (none: leave the current device)"

    def __post_init__(self) -> None:
        if isinstance(self.exclude_domains, str):
            self.exclude_domains = tuple(d for d in self.exclude_domains.split(",") if d)
        else:
            self.exclude_domains = tuple(self.exclude_domains)
        self.out_dir = str(self.out_dir)
        self.validate()

    def validate(self) -> None:
        """One-line ValueError naming the first bad field."""
        ints_pos = ("steps", "batch_size", "grad_accum", "eval_batches", "log_every")
        ints_nonneg = ("warmup", "eval_every", "save_every", "snapshot_every", "seed")
        for name in ints_pos + ints_nonneg:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}={v!r} must be an integer")
            if name in ints_pos and v < 1:
                raise ValueError(f"{name}={v} must be >= 1")
            if v < 0:
                raise ValueError(f"{name}={v} must be >= 0")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r} must be a finite number")
            if v < 0:
                raise ValueError(f"{name}={v} must be >= 0")
            setattr(self, name, float(v))
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} > lr={self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be < 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
        if self.seq_len is not None and (isinstance(self.seq_len, bool)
                                         or not isinstance(self.seq_len, int) or self.seq_len < 1):
            raise ValueError(f"seq_len={self.seq_len!r} must be a positive integer or None")
        if self.max_chars is not None and (isinstance(self.max_chars, bool)
                                           or not isinstance(self.max_chars, int)
                                           or self.max_chars < 1):
            raise ValueError(f"max_chars={self.max_chars!r} must be a positive integer or None")
        if self.stop_at is not None and (isinstance(self.stop_at, bool)
                                         or not isinstance(self.stop_at, int) or self.stop_at < 1):
            raise ValueError(f"stop_at={self.stop_at!r} must be a positive integer or None")
        if self.device is not None and self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not one of cpu, cuda")
        if not self.out_dir.strip():
            raise ValueError(f"out_dir={self.out_dir!r} is empty")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exclude_domains"] = list(self.exclude_domains)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict (e.g. a checkpoint's); unknown keys raise ValueError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown train config key(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


@dataclass
class TrainResult:
    """What a call to :func:`train` did.

    status      "done", "stopped" (stop_at reached), "interrupted" (Ctrl-C / SIGTERM) or
                "nan" (a non-finite loss, gradient or state; nothing bad was saved).
    step        updates completed (counting any resumed ones).
    losses      total loss of every update of this session, in order.
    eval        the last held-out evaluation: domain -> {"ce", "nats_per_byte", ...}, plus
                "mean" (unweighted mean over domains); None when none ran.
    checkpoint  path of the last good checkpoint written or kept (None when there is none).
    message     one line for the user (how to resume, what went wrong).
    tokens_per_s  training tokens of this session / loop time (evals and saves included).
    """

    status: str
    step: int
    losses: list[float]
    eval: dict[str, dict[str, float]] | None
    checkpoint: str | None
    out_dir: str
    wall_time: float
    tokens_per_s: float
    message: str
    model_config: ModelConfig | None = None


# ---------------------------------------------------------------------------- pieces
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for update number ``step`` (0 for the first), by ``cfg.schedule``."""
    if cfg.schedule == "cosine":
        return warmup_cosine(step, cfg.lr, min(cfg.warmup, cfg.steps), cfg.steps, cfg.min_lr)
    if cfg.schedule == "inverse_sqrt":
        return inverse_sqrt(step, cfg.warmup, scale=cfg.lr * math.sqrt(max(cfg.warmup, 1)))
    return constant(step, cfg.lr)


def build_optimizer(model: Any, cfg: TrainConfig) -> Optimizer:
    """AdamW, or Adafactor as OpenMoE ran it (decay 0.8, no momentum, update clipping
    1.0, parameter scaling); either way weight decay applies to matrices only
    (``param_groups_for_decay``)."""
    groups = param_groups_for_decay(model.named_parameters(), cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8)
    return Adafactor(groups, lr=cfg.lr, decay_rate=0.8, beta1=None,
                     clip_threshold=1.0, scale_parameter=True, relative_step=False,
                     weight_decay=cfg.weight_decay)


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


def _token_byte_lengths(tokenizer: Any, vocab_size: int) -> Any:
    """bytes[v] = number of text bytes token v stands for (0 for BOS/EOS)."""
    out = np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        if hasattr(tokenizer, "token_bytes"):
            out[i] = len(tokenizer.token_bytes(i))
        else:
            out[i] = 1 if i < 256 else 0
    return out


def _data_fingerprint(train: dict[str, Any], val: dict[str, Any]) -> str:
    """sha256 of the domain names and token arrays (checked on resume)."""
    h = hashlib.sha256()
    for split in (train, val):
        for name, arr in split.items():
            h.update(name.encode("utf-8") + b"\0")
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    return h.hexdigest()


def routing_summary(routing: Sequence[Any]) -> tuple[float, float]:
    """(dropped fraction, busiest expert's share), each averaged over MoE layers.

    busiest share of a layer = max_e load_after[e] / sum_e load_after[e] (1/E at perfect
    balance, 1 when one expert takes every kept assignment)."""
    if not routing:
        return 0.0, 0.0
    dropped = busiest = 0.0
    for s in routing:
        dropped += float(s.dropped_fraction)
        load = B.to_numpy(s.load_after).astype(np.float64)                 # [E]
        total = load.sum()
        busiest += float(load.max() / total) if total > 0 else 0.0
    n = len(routing)
    return dropped / n, busiest / n


# ---------------------------------------------------------------------------- one update
@dataclass
class StepStats:
    """What one :func:`train_step` did; losses and routing stats are means over its
    micro-batches.

    loss, ce, aux, z   total loss L = ce + aux_coef * aux + z_coef * z, and its parts.
    dropped, busiest   dropped fraction of expert assignments and the busiest expert's
                       share of the kept ones (:func:`routing_summary`).
    grad_norm          global gradient norm before clipping.
    lr                 the learning rate of this update.
    bad                None, or why the update was skipped ("loss is nan", "gradient norm
                       is inf"): then the weights and the optimizer state are untouched.
    """

    loss: float
    ce: float
    aux: float
    z: float
    dropped: float
    busiest: float
    grad_norm: float
    lr: float
    bad: str | None = None


class UpdateInterrupted(KeyboardInterrupt):
    """Ctrl-C arrived during ``optimizer.step()``: the weights are partly updated."""


def train_step(model: Any, optimizer: Optimizer, batches: Iterable[Batch], *, lr: float,
               grad_clip: float = 1.0, rng: Any = None) -> StepStats:
    """One optimizer update on ``batches`` (one per micro-batch, drawn lazily).

    llm.c's order: zero_grad, then per micro-batch forward (``model(x, targets=y)`` gives
    L = CE + aux + z) and backward (gradients add up), then g /= n_micro, global-norm
    clip, update at rate ``lr``, zero_grad. A non-finite loss or gradient norm skips the
    update (``StepStats.bad``). ``grad_clip`` 0 measures the norm without clipping.
    """
    params = list(model.parameters())
    optimizer.zero_grad()
    lr = set_lr(optimizer, lr)
    sums = dict.fromkeys(("loss", "ce", "aux", "z", "dropped", "busiest"), 0.0)
    n, bad, gnorm = 0, None, float("nan")
    for batch in batches:
        out = model(batch.x, targets=batch.y, rng=rng)           # [B, T] -> logits, losses
        loss = float(out.loss.item())
        if not math.isfinite(loss):
            bad = f"loss is {loss}"
            break
        out.loss.backward()                                      # grads += dL/dtheta
        dropped, busiest = routing_summary(out.routing)
        n += 1
        for k, v in (("loss", loss), ("ce", out.ce.item()), ("aux", out.aux_loss.item()),
                     ("z", out.z_loss.item()), ("dropped", dropped), ("busiest", busiest)):
            sums[k] += float(v)
    if bad is None:
        if n > 1:
            scale_grads_(params, 1.0 / n)                        # mean over micro-batches
        gnorm = clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        if not math.isfinite(gnorm):
            bad = f"gradient norm is {gnorm}"
    stats = StepStats(**{k: v / max(n, 1) for k, v in sums.items()}, grad_norm=gnorm, lr=lr,
                      bad=bad)
    if bad is not None:
        optimizer.zero_grad()
        return stats
    try:
        optimizer.step()                                         # theta <- update(theta, g, lr)
        optimizer.zero_grad()
    except KeyboardInterrupt:
        raise UpdateInterrupted("interrupted during the weight update") from None
    return stats


def evaluate(model: Any, val: dict[str, Any], batch_size: int, seq_len: int,
             max_batches: int | None, byte_lengths: Any = None, seed: int = 0
             ) -> dict[str, dict[str, float]]:
    """Held-out loss per domain, model in eval mode (eval capacity factor), no gradients.

    ce             nats per token: sum of token losses / number of tokens, over
                   ``max_batches`` batches of non-overlapping windows spread over the text.
    nats_per_byte  the same sum / number of UTF-8 bytes of the target tokens (equal to
                   ce for the byte tokenizer, which is comparable across tokenizers).
    dropped        mean dropped fraction of the MoE layers on that domain.
    "mean"         the unweighted mean over domains of ce and nats_per_byte.
    """
    rng = B.default_rng(seed)
    results: dict[str, dict[str, float]] = {}
    with model.evaluating():
        for name, tokens in val.items():
            T = min(seq_len, int(tokens.size) - 1)
            if T < 1:
                continue
            nll = 0.0
            n_tok = n_bytes = 0
            dropped, n_batches = 0.0, 0
            for batch in eval_batches(tokens, batch_size, T, max_batches):
                out = model(batch.x, targets=batch.y, rng=rng)
                n = int(batch.y.size)
                nll += float(out.ce.item()) * n
                n_tok += n
                n_bytes += int(byte_lengths[batch.y].sum()) if byte_lengths is not None else n
                dropped += routing_summary(out.routing)[0]
                n_batches += 1
            results[name] = {"ce": nll / n_tok,
                             "nats_per_byte": nll / max(n_bytes, 1),
                             "tokens": float(n_tok), "bytes": float(n_bytes),
                             "dropped": dropped / max(n_batches, 1)}
    if results:
        doms = list(results.values())
        results["mean"] = {"ce": sum(d["ce"] for d in doms) / len(doms),
                           "nats_per_byte": sum(d["nats_per_byte"] for d in doms) / len(doms)}
    return results


def _probe_batch(val: dict[str, Any], seq_len: int, per_domain: int = 4) -> tuple[Any, Any]:
    """A fixed probe batch for routing snapshots: ``per_domain`` held-out windows of each
    domain, spread over its text. Returns (tokens [N, T], domain index [N])."""
    xs, doms = [], []
    for d, tokens in enumerate(val.values()):
        if tokens.size < seq_len + 1:
            continue
        batch = next(eval_batches(tokens, per_domain, seq_len, max_batches=1, domain=d))
        xs.append(batch.x)
        doms.append(batch.domain)
    if not xs:
        return None, None
    return np.concatenate(xs), np.concatenate(doms)


def _bad_state(model: Any, optimizer: Optimizer) -> str | None:
    """Why the weights or optimizer state may not be saved (a non-finite value), or None."""
    for name, p in model.named_parameters():
        if not bool(B.array_module(p.data).isfinite(p.data).all()):
            return f"weight {name} is non-finite"
    for i, s in optimizer.state.items():
        for k, v in s.items():
            if k != "step" and not bool(B.array_module(v).isfinite(v).all()):
                return f"optimizer state {k} of parameter {i} is non-finite"
    return None


def _next_loss(model: Any, sampler: BatchSampler, rng: Any) -> float:
    """The training loss of the next batch on the current weights (the loss the next
    update will see), without moving the data position or the routing RNG."""
    state, rng_state = sampler.state_dict(), rng.bit_generator.state
    try:
        batch = sampler.next()
        with no_grad():
            return float(model(batch.x, targets=batch.y, rng=rng).loss.item())
    finally:
        sampler.load_state_dict(state)
        rng.bit_generator.state = rng_state


# ---------------------------------------------------------------------------- Ctrl-C
class _Interrupt:
    """First SIGINT or SIGTERM sets ``requested`` (the loop stops after the current step
    and saves); a second SIGINT raises KeyboardInterrupt at once. Installed only in the
    main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------- set-up
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
class _Session:
    """Everything :func:`_set_up` builds for a training session."""

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


def _set_up(model_cfg: ModelConfig | None, cfg: TrainConfig, rf: RunFolder) -> _Session:
    """Checkpoint (when resuming), data, tokenizer, model, optimizer, sampler, RNGs, with
    every check that can refuse the start (one-line errors)."""
    from tinymoe.nn.model import OpenMoE  # noqa: PLC0415

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
    sampler = BatchSampler(train_tok, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    route_rng = B.default_rng(cfg.seed + 1_000_003)   # slot priority "random" only
    model = OpenMoE(model_cfg, seed=cfg.seed)
    model.train()
    optimizer = build_optimizer(model, cfg)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt.model_state)
            optimizer.load_state_dict(ckpt.optimizer_state)
            sampler.load_state_dict(ckpt.sampler_state)
            if ckpt.rng_state and "route_rng" in ckpt.rng_state:
                route_rng.bit_generator.state = ckpt.rng_state["route_rng"]
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path}: cannot restore training state ({e})") from None
        same = Path(ckpt.path).resolve() == ckpt_path.resolve()
        rf.kept = (str(ckpt_path) if same else ckpt.path, ckpt.step)
    return _Session(cfg=cfg, model_cfg=model_cfg, model=model, optimizer=optimizer,
                    sampler=sampler, route_rng=route_rng, tokenizer=tokenizer, corpus=corpus,
                    train_tok=train_tok, val_tok=val_tok,
                    byte_lengths=_token_byte_lengths(tokenizer, model_cfg.vocab_size),
                    fingerprint=fingerprint, ckpt=ckpt,
                    start_step=ckpt.step if ckpt is not None else 0, notes=notes)


def train(model_cfg: ModelConfig | None, train_cfg: TrainConfig, progress: bool = True,
          on_step: Callable[[int, Any], None] | None = None) -> TrainResult:
    """Train (or resume) an OpenMoE model; see the module docstring.

    model_cfg   the model; None when resuming (the checkpoint's is used). The vocabulary
                size is set to the tokenizer's.
    train_cfg   every training setting.
    progress    show a progress bar and notes (on stderr; warnings are printed anyway).
    on_step     called as ``on_step(step, model)`` after every update (tests, lessons).

    Bad input raises ValueError / FileNotFoundError / CheckpointError (one line), a folder
    in use ``RunFolderBusy``, a failed write ``RunFolderError`` (after logging it). A NaN,
    Ctrl-C / SIGTERM, or ``stop_at`` return normally; see ``TrainResult.status``.
    """
    t_start = time.perf_counter()
    if train_cfg.device is not None:
        B.set_device(train_cfg.device)
    with RunFolder.open(train_cfg.out_dir) as rf:
        s = _set_up(model_cfg, train_cfg, rf)
        for line in rf.notes + s.notes:
            write_line(line)
        return _run(s, rf, progress, on_step, t_start)


def _run(s: _Session, rf: RunFolder, progress: bool,
         on_step: Callable[[int, Any], None] | None, t_start: float) -> TrainResult:
    """The loop of :func:`train`: updates, logs, evals, snapshots, checkpoints."""
    cfg, model, optimizer, sampler, route_rng = s.cfg, s.model, s.optimizer, s.sampler, s.route_rng
    end_step = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)

    def note(msg: str) -> None:
        if progress:
            write_line(msg)

    rf.start_log(fresh=s.ckpt is None)
    probe_x, probe_dom = (_probe_batch(s.val_tok, cfg.seq_len) if cfg.snapshot_every
                          else (None, None))
    counts = count_parameters(s.model_cfg)
    rf.log({"event": "start", "step": s.start_step, "time": time.time(),
            "resumed_from": s.ckpt.path if s.ckpt is not None else None,
            "model_config": s.model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "params_total": counts["total"], "params_active": counts["active"],
            "tokenizer": s.tokenizer.to_dict().get("type"), "vocab_size": s.tokenizer.vocab_size,
            "domains": {k: {"train_tokens": int(s.train_tok[k].size),
                            "val_tokens": int(s.val_tok[k].size),
                            "val_unigram_entropy": unigram_entropy(s.val_tok[k])}
                        for k in s.train_tok},
            "notes": rf.notes + s.notes})
    note(f"model: {s.model_cfg.describe()}")
    note(f"data: {s.corpus!r}; tokens per update {cfg.grad_accum * cfg.batch_size * cfg.seq_len}")
    last_eval: dict[str, Any] | None = s.ckpt.extra.get("last_eval") if s.ckpt is not None else None

    def save(step_now: int) -> str | None:
        """Write the checkpoint if the state is good; else return why it is not saved."""
        bad = _bad_state(model, optimizer)
        if bad is None:
            loss = _next_loss(model, sampler, route_rng)
            if not math.isfinite(loss):
                bad = f"loss is {loss} at step {step_now + 1} (on the weights of step {step_now})"
        if bad is not None:
            return bad
        rf.save(step_now, model_config=s.model_cfg, model_state=model.state_dict(),
                tokenizer=s.tokenizer, train_config=cfg.to_dict(),
                optimizer_state=optimizer.state_dict(), sampler_state=sampler.state_dict(),
                rng_state={"route_rng": route_rng.bit_generator.state},
                extra={"data_fingerprint": s.fingerprint, "last_eval": last_eval,
                       "corpus": s.corpus.source, "domains": list(s.train_tok)})
        return None

    def snapshot(step_now: int) -> None:
        if probe_x is not None:
            rf.snapshot(model, step_now, probe_x, probe_dom, list(s.val_tok))

    def run_eval(step_now: int) -> dict[str, dict[str, float]]:
        res = evaluate(model, s.val_tok, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                       s.byte_lengths, seed=cfg.seed)
        rf.log({"event": "eval", "step": step_now, "eval": res})
        per = ", ".join(f"{k} {v['nats_per_byte']:.3f}" for k, v in res.items())
        note(f"step {step_now}: held-out nats/byte: {per}")
        return res

    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=end_step, initial=s.start_step, desc="train", unit="step",
                   dynamic_ncols=True, file=sys.stderr)
    losses: list[float] = []
    interval: dict[str, float] = {}
    tokens_seen = 0
    t_interval = t_loop = time.perf_counter()
    status, message = "done", ""
    step = s.start_step
    updates0 = optimizer.steps           # step = start_step + updates done (exact under Ctrl-C)
    pre_state: tuple[int, dict[str, Any], Any] | None = None   # data/rng state before a step
    try:
        try:
            # NaN/inf are detected and reported below in one line, so NumPy's warnings
            # about them would only repeat it (several lines each)
            with _Interrupt() as interrupt, np.errstate(invalid="ignore", over="ignore",
                                                        divide="ignore"):
                if step == 0 and cfg.snapshot_every:
                    snapshot(0)
                while step < end_step:
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    pre_state = (step, sampler.state_dict(), route_rng.bit_generator.state)
                    st = train_step(model, optimizer,
                                    (sampler.next() for _ in range(cfg.grad_accum)),
                                    lr=lr_at(step, cfg), grad_clip=cfg.grad_clip, rng=route_rng)
                    if st.bad is not None:
                        status = "nan"
                        message = (f"{st.bad} at step {step + 1}; stopped before updating the "
                                   f"weights; {rf.kept_message()}")
                        break
                    step += 1
                    if on_step is not None:
                        on_step(step, model)

                    n = cfg.grad_accum
                    losses.append(st.loss)
                    for k in ("loss", "ce", "aux", "z", "dropped", "busiest"):
                        interval[k] = interval.get(k, 0.0) + getattr(st, k)
                    interval["gnorm"] = interval.get("gnorm", 0.0) + st.grad_norm
                    interval["count"] = interval.get("count", 0.0) + 1
                    tokens_seen += n * cfg.batch_size * cfg.seq_len
                    if step % cfg.log_every == 0 or step == end_step:
                        now = time.perf_counter()
                        c = interval.pop("count")
                        tps = c * n * cfg.batch_size * cfg.seq_len / max(now - t_interval, 1e-9)
                        ev = {"event": "train", "step": step, "lr": st.lr, "tokens_per_s": tps,
                              **{k: v / c for k, v in interval.items()}}
                        ev["grad_norm"] = ev.pop("gnorm")
                        rf.log(ev)
                        if bar is not None:
                            bar.set_postfix_str(
                                f"loss {ev['loss']:.3f} ce {ev['ce']:.3f} aux {ev['aux']:.3f} "
                                f"drop {100 * ev['dropped']:.1f}% busiest {100 * ev['busiest']:.0f}% "
                                f"{tps:,.0f} tok/s", refresh=False)
                        interval.clear()
                        t_interval = now
                    if bar is not None:
                        bar.update(1)
                    if cfg.eval_every and step % cfg.eval_every == 0 and step != end_step:
                        last_eval = run_eval(step)
                        failed = rf.curves()
                        if failed:
                            note(failed)
                    if cfg.snapshot_every and step % cfg.snapshot_every == 0 and step != end_step:
                        snapshot(step)
                    if cfg.save_every and step % cfg.save_every == 0 and step != end_step:
                        bad = save(step)
                        if bad is not None:
                            status = "nan"
                            message = (f"{bad}; stopped without saving step {step}; "
                                       f"{rf.kept_message()}")
                            break
                if status == "done":
                    # the end of the run (or of this session, with stop_at)
                    last_eval = run_eval(step)
                    if cfg.snapshot_every:
                        snapshot(step)
                    bad = save(step)
                    if bad is not None:
                        status = "nan"
                        message = f"{bad}; step {step} not saved; {rf.kept_message()}"
                    elif step < cfg.steps:
                        status = "stopped"
                        message = (f"stopped at step {step} of {cfg.steps}; continue with "
                                   f"--resume {rf.kept[0]}")
                    else:
                        message = f"done: {step} steps; checkpoint {rf.kept[0]}"
        except KeyboardInterrupt as e:
            status = "interrupted"
            step = s.start_step + optimizer.steps - updates0
            if isinstance(e, UpdateInterrupted):
                step -= 1
                message = (f"interrupted during the weight update of step {step + 1}; "
                           f"{rf.kept_message()}")
            else:
                if pre_state is not None and pre_state[0] == step:
                    # the interrupted step's batches are drawn again on resume
                    sampler.load_state_dict(pre_state[1])
                    route_rng.bit_generator.state = pre_state[2]
                optimizer.zero_grad()
                bad = save(step)
                if bad is None:
                    message = (f"interrupted at step {step}; checkpoint saved; resume with: "
                               f"python -m tinymoe train --resume {rf.kept[0]}")
                else:
                    message = f"interrupted at step {step}; {bad}, not saved; {rf.kept_message()}"
    except Exception as e:   # a failed write (full disk) or a bug: logged, never "done"
        status = "error"
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise
    finally:
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - t_start
        loop_time = time.perf_counter() - t_loop
        try:
            rf.log({"event": "end", "step": step, "status": status, "message": message,
                    "wall_time": wall, "time": time.time()})
        except OSError:
            pass    # the disk is full: the message is still raised / returned
    failed = rf.curves()
    if failed:
        note(failed)
    return TrainResult(status=status, step=step, losses=losses, eval=last_eval,
                       checkpoint=rf.kept[0] if rf.kept else None, out_dir=str(rf.path),
                       wall_time=wall, tokens_per_s=tokens_seen / max(loop_time, 1e-9),
                       message=message, model_config=s.model_cfg)
