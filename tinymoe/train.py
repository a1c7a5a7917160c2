"""The training loop: data, model, optimizer, schedule, eval, logs, checkpoints, resume.

One optimizer update ("step") of the loop:

    lr_t = schedule(t)                            warmup + cosine / inverse sqrt / constant
    for each of grad_accum micro-batches:         gradients add up over micro-batches
        L = CE + aux_coef * L_aux + z_coef * L_z  (the model returns L; OpenMoE's loss)
        backward(L)
    g <- g / grad_accum                           (only when grad_accum > 1)
    g <- g * min(1, clip / ||g||_2)               global-norm clipping
    optimizer step (AdamW or Adafactor), then forget the gradients

Around it: a progress bar (loss, tokens/s, aux loss, dropped fraction, busiest expert's
share), held-out evaluation per domain (nats per token and per byte), ``log.jsonl`` (one
JSON object per event), ``curves.png``, routing snapshots on a fixed probe batch for the
routing analysis, and checkpoints.

Reliability (DESIGN.md "Reliability promises"):

- Resume is exact: the checkpoint holds weights, optimizer state, the batch sampler's
  RNG state (the data position) and the routing RNG, so N steps + resume + N steps gives
  bit-identical weights to 2N steps straight (``stop_at`` ends a run early without
  changing its schedule, for exactly this).
- A NaN/inf loss or gradient norm stops the run before the bad update, with one line
  naming the step; weights are checked to be finite before every save, so the last good
  checkpoint is never overwritten by a bad state.
- Ctrl-C (SIGINT) finishes the current step, saves a checkpoint and returns with a line
  saying how to resume; a second Ctrl-C stops at once (still saving, unless the weights
  were in the middle of an update).
- A new run refuses an ``out_dir`` that already holds a checkpoint unless told to
  ``overwrite`` it (or to ``resume`` from it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from tinymoe import backend as B
from tinymoe.autograd import no_grad
from tinymoe.checkpoint import (CHECKPOINT_NAME, CheckpointError, atomic_write_bytes,
                                load_checkpoint, save_checkpoint)
from tinymoe.config import ModelConfig, count_parameters
from tinymoe.data import (BatchSampler, Corpus, builtin_corpus, encode_corpus, eval_batches,
                          load_corpus, train_bpe, unigram_entropy)
from tinymoe.optim import (Adafactor, AdamW, Optimizer, clip_grad_norm_, constant,
                           inverse_sqrt, param_groups_for_decay, scale_grads_, set_lr,
                           warmup_cosine)
from tinymoe.tokenizer import ByteTokenizer, tokenizer_from_dict

np = B.np

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "lr_at", "build_optimizer",
           "load_data", "build_tokenizer", "routing_summary", "plot_curves",
           "RESUME_MUST_MATCH", "SCHEDULES", "OPTIMIZERS", "TOKENIZERS"]

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
OPTIMIZERS = ("adamw", "adafactor")
TOKENIZERS = ("byte", "bpe")
# Train-config fields that must be the same when resuming, or the continuation would not
# be the same run (other fields, e.g. steps or eval_every, may change on resume).
RESUME_MUST_MATCH = ("batch_size", "seq_len", "seed", "data", "exclude_domains", "max_chars",
                     "tokenizer", "optimizer", "grad_accum", "weight_decay", "adam_beta1",
                     "adam_beta2")


@dataclass
class TrainConfig:
    """Every training setting, flat (each field is a ``python -m tinymoe train`` flag).

    Schedule and optimizer
        steps          optimizer updates in the whole run.
        batch_size, seq_len  sequences per micro-batch and tokens per sequence
                       (seq_len None: the model's max_seq_len).
        grad_accum     micro-batches per update (tokens per update = grad_accum * B * T).
        lr, min_lr, warmup  peak rate, floor of the cosine, warmup updates (at most
                       ``steps`` are used).
        schedule       "cosine" (linear warmup, cosine to min_lr at ``steps``),
                       "inverse_sqrt" (OpenMoE/T5X: lr * sqrt(warmup) / sqrt(max(t, warmup)),
                       so ``lr`` is the plateau; OpenMoE: lr 0.01, warmup 10000),
                       "constant".
        optimizer      "adamw" (betas adam_beta1/adam_beta2, decoupled weight_decay on
                       matrices only) or "adafactor" (OpenMoE: decay 0.8, no momentum,
                       update clipping 1.0, parameter scaling; the schedule sets its rate).
        grad_clip      global gradient-norm clip (0 = off).
    Data
        data           None = the built-in corpus; else a text file or folder.
        exclude_domains  domains left out (e.g. ("code",) for the paper's "w/o code").
        max_chars      cut each domain's train text to this many characters (quick runs).
        tokenizer      "byte" or "bpe" (trained on the corpus to the model's vocab_size).
    Bookkeeping
        eval_every / eval_batches  held-out eval every so many updates, on so many
                       batches per domain (0 = only at the end).
        save_every     checkpoint every so many updates (and always at the end).
        log_every      a log.jsonl line every so many updates.
        snapshot_every routing snapshots (``snapshots/step_N.npz``) every so many updates,
                       plus at step 0 and at the end (0 = none).
        seed           model init, batch order and routing randomness.
        out_dir        where checkpoint.npz, log.jsonl, curves.png, snapshots/ go.
        resume         a checkpoint (or run folder) to continue from.
        stop_at        end this session after this update (checkpoint saved) without
                       changing the schedule; resume later to continue.
        overwrite      allow a new run to replace a checkpoint already in out_dir.
        device         "cpu" or "cuda" (None: leave the current device).
    """

    steps: int = 1200
    batch_size: int = 16
    seq_len: int | None = None
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 60
    schedule: str = "cosine"
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 300
    eval_batches: int = 8
    save_every: int = 300
    log_every: int = 10
    snapshot_every: int = 300
    seed: int = 0
    out_dir: str = "runs/mini"
    data: str | None = None
    exclude_domains: tuple[str, ...] = ()
    max_chars: int | None = None
    tokenizer: str = "byte"
    resume: str | None = None
    stop_at: int | None = None
    overwrite: bool = False
    device: str | None = None

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
        if not self.out_dir:
            raise ValueError("out_dir is empty")

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

    status      "done", "stopped" (stop_at reached), "interrupted" (Ctrl-C) or "nan".
    step        updates completed (counting any resumed ones).
    losses      total loss of every update of this session, in order.
    eval        the last held-out evaluation: domain -> {"ce", "nats_per_byte", ...}, plus
                "mean" (unweighted mean over domains); None when none ran.
    checkpoint  path of the last checkpoint written or kept (None when there is none).
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
    was_training = model.training
    model.eval()
    rng = B.default_rng(seed)
    results: dict[str, dict[str, float]] = {}
    try:
        with no_grad():
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
    finally:
        model.train(was_training)
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


def _save_snapshot(path: Path, model: Any, step: int, tokens: Any, domain: Any,
                   domain_names: list[str], write: bool = True) -> None:
    """Route the probe batch in eval mode and save, per MoE layer, each token's experts.

    File (npz): step, tokens [N, T], domain [N], domain_names [D], layers [L] (block
    indices), expert_index [L, N, T, k] (rank order), top1 [L, N, T] (= expert_index[..., 0]),
    kept [L, N, T, k] (after capacity), probs_top1 [L, N, T] (router probability of the
    first choice).
    """
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            out = model(tokens, rng=B.default_rng(0))
    finally:
        model.train(was_training)
    if not write:   # another MPI rank writes it (the forward above is collective)
        return
    n, t = tokens.shape
    idx = np.stack([B.to_numpy(s.expert_index).reshape(n, t, -1) for s in out.routing])  # [L, N, T, k]
    kept = np.stack([B.to_numpy(s.kept).reshape(n, t, -1) for s in out.routing])        # [L, N, T, k]
    ptop = np.stack([B.to_numpy(s.topk_prob)[:, 0].reshape(n, t) for s in out.routing])  # [L, N, T]
    arrays = {"step": np.asarray(step, dtype=np.int64), "tokens": tokens.astype(np.int64),
              "domain": domain.astype(np.int64), "domain_names": np.asarray(domain_names),
              "layers": np.asarray([s.layer for s in out.routing], dtype=np.int64),
              "expert_index": idx.astype(np.int16), "top1": idx[..., 0].astype(np.int16),
              "kept": kept.astype(bool), "probs_top1": ptop.astype(np.float32)}
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def _params_finite(model: Any) -> bool:
    for p in model.parameters():
        if not bool(B.array_module(p.data).isfinite(p.data).all()):
            return False
    return True


# ---------------------------------------------------------------------------- log and plot
class _Log:
    """Appends one JSON object per line to ``log.jsonl`` (flushed each time)."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "w" if fresh else "a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> None:
        self._f.write(json.dumps(event, sort_keys=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def plot_curves(log_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> Path | None:
    """Draw training loss and held-out loss per domain (top), and the dropped fraction
    and busiest expert's share (bottom), from ``log.jsonl``; returns the PNG path."""
    # matplotlib's object API on an Agg canvas: no pyplot, so the caller's backend is untouched
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (plotting only when asked)
    from matplotlib.figure import Figure  # noqa: PLC0415

    log_path, png_path = Path(log_path), Path(png_path)
    train_ev, eval_ev = [], []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("event") == "train":
            train_ev.append(ev)
        elif ev.get("event") == "eval":
            eval_ev.append(ev)
    if not train_ev:
        return None
    fig = Figure(figsize=(8, 7))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    steps = [e["step"] for e in train_ev]
    ax1.plot(steps, [e["ce"] for e in train_ev], label="train CE", color="black", lw=1)
    domains = [k for k in (eval_ev[-1]["eval"] if eval_ev else {}) if k != "mean"]
    for name in domains:
        pts = [(e["step"], e["eval"][name]["nats_per_byte"]) for e in eval_ev if name in e["eval"]]
        ax1.plot(*zip(*pts), marker="o", ms=3, label=f"held-out {name}")
    ax1.set_ylabel("loss (nats per token / per byte)")
    ax1.set_title("tinymoe training: train cross-entropy and held-out nats per byte")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [100 * e["dropped"] for e in train_ev], label="dropped assignments (%)")
    ax2.plot(steps, [100 * e["busiest"] for e in train_ev], label="busiest expert's share (%)")
    ax2.set_xlabel("step (optimizer updates)")
    ax2.set_ylabel("percent")
    ax2.set_title("routing: capacity drops and expert load")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    return png_path


# ---------------------------------------------------------------------------- Ctrl-C
class _Interrupt:
    """First SIGINT sets ``requested`` (the loop stops after the current step); a second
    one raises KeyboardInterrupt at once. Installed only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ---------------------------------------------------------------------------- train
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


def train(model_cfg: ModelConfig | None, train_cfg: TrainConfig, progress: bool = True,
          on_step: Callable[[int, Any], None] | None = None, parallel: Any = None) -> TrainResult:
    """Train (or resume) an OpenMoE model; see the module docstring.

    model_cfg   the model; None when resuming (the checkpoint's is used). The vocabulary
                size is set to the tokenizer's.
    train_cfg   every training setting.
    progress    show a progress bar and notes (on stderr).
    on_step     called as ``on_step(step, model)`` after every update (tests, lessons).
    parallel    a :class:`tinymoe.parallel.Parallel` (MPI data/expert parallelism; every
                ``par.`` call below is its hook); None: one process.

    Bad input raises ValueError / FileNotFoundError / CheckpointError (one line). A NaN,
    Ctrl-C, or ``stop_at`` return normally; see ``TrainResult.status``.
    """
    from tinymoe.nn.model import OpenMoE  # noqa: PLC0415

    from tinymoe.parallel import Parallel  # noqa: PLC0415
    par = parallel if parallel is not None else Parallel("none", None)   # [parallel hook]
    progress = progress and par.is_root                        # only rank 0 talks
    t_start = time.perf_counter()
    cfg = train_cfg
    if cfg.device is not None:
        B.set_device(cfg.device)

    def note(msg: str) -> None:
        if progress:
            _write(msg)

    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME

    # ---- resume or fresh start
    ckpt = None
    if cfg.resume is not None:
        ckpt = load_checkpoint(cfg.resume)
        model_cfg = _resume_model_config(ckpt, model_cfg)
        tokenizer = ckpt.make_tokenizer()
    elif model_cfg is None:
        raise ValueError("train: model_cfg is None and there is no checkpoint to resume")
    if (ckpt_path.exists() and not cfg.overwrite
            and (ckpt is None or Path(ckpt.path).resolve() != ckpt_path.resolve())):
        raise FileExistsError(f"{out_dir} already holds a checkpoint ({ckpt_path}); "
                              f"resume it with --resume {ckpt_path}, start over with "
                              "--overwrite, or choose another --out")

    if cfg.seq_len is None:
        cfg = cfg.replace(seq_len=model_cfg.max_seq_len)
    if ckpt is not None:
        _check_resume_train(ckpt, cfg)
    par.check(model_cfg, cfg)                                  # [parallel hook]
    corpus = load_data(cfg)
    if ckpt is None:
        tokenizer = build_tokenizer(cfg, corpus, model_cfg.vocab_size)
    if model_cfg.vocab_size != tokenizer.vocab_size:
        note(f"note: vocab_size {model_cfg.vocab_size} -> {tokenizer.vocab_size} "
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
                           seed=cfg.seed)                      # [parallel hook] P*b rows
    route_rng = B.default_rng(cfg.seed + 1_000_003)   # slot priority "random" only
    byte_lengths = _token_byte_lengths(tokenizer, model_cfg.vocab_size)

    model = OpenMoE(model_cfg, seed=cfg.seed)
    par.prepare_model(model)                                   # [parallel hook] shard experts
    model.train()
    optimizer = build_optimizer(model, cfg)
    start_step = 0
    if ckpt is not None:
        try:
            model.load_state_dict(par.local_model_state(model, ckpt.model_state))   # [parallel hook]
            optimizer.load_state_dict(par.local_optimizer_state(model, optimizer, ckpt.optimizer_state))
            sampler.load_state_dict(ckpt.sampler_state)
            if ckpt.rng_state and "route_rng" in ckpt.rng_state:
                route_rng.bit_generator.state = ckpt.rng_state["route_rng"]
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path}: cannot restore training state ({e})") from None
        start_step = ckpt.step
    end_step = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)

    out_dir.mkdir(parents=True, exist_ok=True)
    log = _Log(out_dir / "log.jsonl" if par.is_root else Path(os.devnull),   # [parallel hook]
               fresh=ckpt is None)
    if ckpt is None and par.is_root:   # a fresh run: routing snapshots of an earlier run here are stale
        for old in (out_dir / "snapshots").glob("step_*.npz"):
            old.unlink()
    probe_x, probe_dom = (_probe_batch(val_tok, cfg.seq_len) if cfg.snapshot_every
                          else (None, None))
    counts = count_parameters(model_cfg)
    log.write({"event": "start", "step": start_step, "time": time.time(),
               "resumed_from": ckpt.path if ckpt is not None else None,
               "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
               "params_total": counts["total"], "params_active": counts["active"],
               "tokenizer": tokenizer.to_dict().get("type"), "vocab_size": tokenizer.vocab_size,
               "domains": {k: {"train_tokens": int(train_tok[k].size),
                               "val_tokens": int(val_tok[k].size),
                               "val_unigram_entropy": unigram_entropy(val_tok[k])}
                           for k in train_tok},
               **par.log_fields(cfg.batch_size)})              # [parallel hook] mode, P
    note(f"model: {model_cfg.describe()}")
    note(f"data: {corpus!r}; tokens per update "
         f"{cfg.grad_accum * par.global_batch(cfg.batch_size) * cfg.seq_len}")

    last_ckpt: str | None = str(ckpt_path) if ckpt_path.exists() and ckpt is not None else None
    last_ckpt_step = ckpt.step if ckpt is not None else None
    if ckpt is not None and Path(ckpt.path).resolve() != ckpt_path.resolve():
        last_ckpt, last_ckpt_step = ckpt.path, ckpt.step

    def save(step_now: int, sampler_state: dict[str, Any], rng_state: Any) -> bool:
        """Write the checkpoint unless a weight is non-finite (then keep the old one)."""
        nonlocal last_ckpt, last_ckpt_step
        if not par.all_ranks(_params_finite(model)):           # [parallel hook]
            return False
        model_state, optim_state = par.full_states(model, optimizer)   # [parallel hook] gather
        if par.is_root:
            save_checkpoint(ckpt_path, model_config=model_cfg, model_state=model_state,
                            tokenizer=tokenizer, step=step_now, train_config=cfg.to_dict(),
                            optimizer_state=optim_state, sampler_state=sampler_state,
                            rng_state={"route_rng": rng_state},
                            extra={"data_fingerprint": fingerprint, "last_eval": last_eval,
                                   "corpus": corpus.source, "domains": list(train_tok),
                                   **par.log_fields(cfg.batch_size)})
        par.barrier()                                          # [parallel hook]
        last_ckpt, last_ckpt_step = str(ckpt_path), step_now
        return True

    def kept_msg() -> str:
        if last_ckpt is None:
            return "no checkpoint was written"
        return f"the last good checkpoint (step {last_ckpt_step}) is kept at {last_ckpt}"

    def snapshot(step_now: int) -> None:
        if probe_x is not None:
            _save_snapshot(out_dir / "snapshots" / f"step_{step_now}.npz", model, step_now,
                           probe_x, probe_dom, list(val_tok), write=par.is_root)   # [parallel hook]

    def run_eval(step_now: int) -> dict[str, dict[str, float]]:
        res = evaluate(model, val_tok, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                       byte_lengths, seed=cfg.seed)
        log.write({"event": "eval", "step": step_now, "eval": res})
        per = ", ".join(f"{k} {v['nats_per_byte']:.3f}" for k, v in res.items())
        note(f"step {step_now}: held-out nats/byte: {per}")
        return res

    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=end_step, initial=start_step, desc="train", unit="step",
                   dynamic_ncols=True, file=sys.stderr)
    losses: list[float] = []
    last_eval: dict[str, Any] | None = ckpt.extra.get("last_eval") if ckpt is not None else None
    interval: dict[str, float] = {}
    tokens_seen = 0
    t_interval = time.perf_counter()
    t_loop = time.perf_counter()
    status, message = "done", ""
    step = start_step
    pre_state: tuple[dict[str, Any], Any] | None = None   # data/rng state before this step
    updating = False
    params = list(model.parameters())

    def cur_state() -> tuple[dict[str, Any], Any]:
        return sampler.state_dict(), route_rng.bit_generator.state

    try:
        # NaN/inf are detected and reported below in one line, so NumPy's warnings about
        # them would only repeat it (several lines each)
        with _Interrupt() as interrupt, np.errstate(invalid="ignore", over="ignore",
                                                    divide="ignore"):
            if step == 0 and cfg.snapshot_every:
                snapshot(0)
            while step < end_step:
                if par.any_rank(interrupt.requested):           # [parallel hook] stop together
                    raise KeyboardInterrupt
                pre_state = cur_state()
                lr = set_lr(optimizer, lr_at(step, cfg))
                sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0, "dropped": 0.0,
                        "busiest": 0.0}
                bad = None
                for _ in range(cfg.grad_accum):
                    batch = par.local_rows(sampler.next())     # [parallel hook] rows r*b...
                    out = model(batch.x, targets=batch.y, rng=route_rng)
                    loss_value = par.mean(float(out.loss.item()))   # [parallel hook] global mean
                    if not math.isfinite(loss_value):
                        bad = f"loss is {loss_value}"
                        break
                    out.loss.backward()
                    dropped, busiest = routing_summary(out.routing)
                    ce, aux, zl, dropped, busiest = par.mean(   # [parallel hook] over ranks
                        float(out.ce.item()), float(out.aux_loss.item()),
                        float(out.z_loss.item()), dropped, busiest)
                    sums["loss"] += loss_value
                    sums["ce"] += ce
                    sums["aux"] += aux
                    sums["z"] += zl
                    sums["dropped"] += dropped
                    sums["busiest"] += busiest
                if bad is None:
                    par.reduce_grads(model.named_parameters())  # [parallel hook] all-reduce
                    if cfg.grad_accum > 1:
                        scale_grads_(params, 1.0 / cfg.grad_accum)
                    clip = par.clip_grad_norm_fn(model, clip_grad_norm_)   # [parallel hook]
                    gnorm = clip(params, cfg.grad_clip) if cfg.grad_clip > 0 \
                        else clip(params, float("inf"))
                    if not math.isfinite(gnorm):
                        bad = f"gradient norm is {gnorm}"
                if bad is not None:
                    optimizer.zero_grad()
                    status = "nan"
                    message = (f"{bad} at step {step + 1}; stopped before updating the "
                               f"weights; {kept_msg()}")
                    break
                updating = True
                optimizer.step()
                optimizer.zero_grad()
                updating = False
                step += 1
                pre_state = None
                if on_step is not None:
                    on_step(step, model)

                n = cfg.grad_accum
                losses.append(sums["loss"] / n)
                for k, v in sums.items():
                    interval[k] = interval.get(k, 0.0) + v / n
                interval["gnorm"] = interval.get("gnorm", 0.0) + gnorm
                interval["count"] = interval.get("count", 0.0) + 1
                tokens_seen += n * par.global_batch(cfg.batch_size) * cfg.seq_len
                if step % cfg.log_every == 0 or step == end_step:
                    now = time.perf_counter()
                    c = interval.pop("count")
                    tps = c * n * par.global_batch(cfg.batch_size) * cfg.seq_len / max(now - t_interval, 1e-9)
                    ev = {"event": "train", "step": step, "lr": lr, "tokens_per_s": tps,
                          **{k: v / c for k, v in interval.items()}}
                    ev["grad_norm"] = ev.pop("gnorm")
                    log.write(ev)
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
                    if par.is_root:                            # [parallel hook]
                        plot_curves(log.path, out_dir / "curves.png")
                if cfg.snapshot_every and step % cfg.snapshot_every == 0 and step != end_step:
                    snapshot(step)
                if cfg.save_every and step % cfg.save_every == 0 and step != end_step:
                    if not save(step, *cur_state()):
                        status = "nan"
                        message = (f"a weight became non-finite at step {step}; stopped "
                                   f"without saving; {kept_msg()}")
                        break
            if status == "done":
                # the end of the run (or of this session, with stop_at)
                last_eval = run_eval(step)
                if cfg.snapshot_every:
                    snapshot(step)
                if not save(step, *cur_state()):
                    status = "nan"
                    message = (f"a weight became non-finite by step {step}; not saved; "
                               f"{kept_msg()}")
                elif step < cfg.steps:
                    status = "stopped"
                    message = (f"stopped at step {step} of {cfg.steps}; continue with "
                               f"--resume {last_ckpt}")
                else:
                    message = f"done: {step} steps; checkpoint {last_ckpt}"
    except KeyboardInterrupt:
        status = "interrupted"
        if updating:
            message = (f"interrupted during the weight update of step {step + 1}; "
                       f"{kept_msg()}")
        else:
            if pre_state is not None:   # the interrupted step's batches are drawn again on resume
                sampler.load_state_dict(pre_state[0])
                route_rng.bit_generator.state = pre_state[1]
            optimizer.zero_grad()
            if save(step, *cur_state()):
                message = (f"interrupted at step {step}; checkpoint saved; resume with: "
                           f"python -m tinymoe train --resume {last_ckpt}")
            else:
                message = f"interrupted at step {step} with non-finite weights; {kept_msg()}"
    finally:
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - t_start
        loop_time = time.perf_counter() - t_loop
        log.write({"event": "end", "step": step, "status": status, "message": message,
                   "wall_time": wall, "time": time.time()})
        log.close()
    try:
        if par.is_root:                                        # [parallel hook]
            plot_curves(out_dir / "log.jsonl", out_dir / "curves.png")
    except Exception as e:  # noqa: BLE001 (a plot must never lose a finished run)
        note(f"note: could not draw curves.png ({type(e).__name__}: {e})")
    return TrainResult(status=status, step=step, losses=losses, eval=last_eval,
                       checkpoint=last_ckpt, out_dir=str(out_dir), wall_time=wall,
                       tokens_per_s=tokens_seen / max(loop_time, 1e-9), message=message,
                       model_config=model_cfg)


def _write(msg: str) -> None:
    """A line on stderr that does not break a tqdm bar."""
    try:
        from tqdm import tqdm  # noqa: PLC0415
        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr)
