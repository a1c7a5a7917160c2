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
    bias balancing (if on): b <- b + rate * sign(mean load - load), load summed over the step

Around it, :func:`train`: a progress bar (loss, tokens/s, aux loss, dropped fraction,
busiest expert's share), held-out evaluation per domain (nats per token and per byte),
and the run folder (:mod:`tinymoe.runfolder`: lock, ``log.jsonl``, ``curves.png``,
routing snapshots on a fixed probe batch, checkpoints).

Reliability (docs/architecture.md §8, "Reliability promises"):

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
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tinymoe import backend as B
from tinymoe.autograd import no_grad
from tinymoe.config import ModelConfig, count_parameters
from tinymoe.data import Batch, BatchSampler, unigram_entropy
from tinymoe.evaluate import evaluate, probe_batch, routing_summary
from tinymoe.optim import Optimizer, clip_grad_norm_, scale_grads_, set_lr
from tinymoe.recipes import RECIPES
from tinymoe.runfolder import RunFolder, RunFolderView, plot_curves, write_line
# the set-up pieces, importable from here as before the split
from tinymoe.session import (RESUME_MUST_MATCH, Session, build_optimizer, build_tokenizer,
                             load_data, lr_at, set_up)

if TYPE_CHECKING:   # the model code loads lazily (docs/architecture.md §3)
    from tinymoe.parallel import Parallel

np = B.np

__all__ = ["TrainConfig", "TrainResult", "StepStats", "UpdateInterrupted", "train",
           "train_step", "evaluate", "lr_at", "build_optimizer", "load_data",
           "build_tokenizer", "routing_summary", "plot_curves", "RESUME_MUST_MATCH",
           "SCHEDULES", "OPTIMIZERS", "TOKENIZERS", "RECIPES"]

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
from tinymoe.optim import OPTIMIZERS  # noqa: E402  (one vocabulary: optim owns the optimizer names)
TOKENIZERS = ("byte", "bpe")


@dataclass
class TrainConfig:
    """Every training setting, flat: each field is a ``python -m tinymoe train`` flag and
    the string under it is that flag's help (``--help`` is generated from them)."""

    recipe: str = "none"
    ("a set of settings applied under your explicit flags (which win); the run log lists what "
     "it set. none: nothing. openmoe: what OpenMoE trained with (tinymoe/recipes.py): "
     "optimizer adafactor, weight_decay 0, grad_clip 0 (no global clipping), schedule "
     "inverse_sqrt with lr 0.01 held constant for warmup = steps/50 updates (OpenMoE: 10k of "
     "500k steps, a constant lr, no ramp) then decaying as 1/sqrt(t); router z-loss 1e-4 "
     "(1e-3 for the 34B shape), output-logit z-loss 1e-4, init openmoe, untied LM head "
     "(tie_embeddings false: OpenMoE's, which its N(0, 1) embedding needs). In Python: "
     "tinymoe.recipes.apply_recipe")
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
     "adafactor (OpenMoE: decay 0.8, no momentum, update clipping 1.0, parameter scaling, "
     "per expert; alone it keeps weight_decay, grad_clip and the schedule: see --recipe)")
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
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r} is not one of {', '.join(RECIPES)}")
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
               grad_clip: float = 1.0, rng: Any = None,
               parallel: Parallel | None = None) -> StepStats:
    """One optimizer update on ``batches`` (one per micro-batch, drawn lazily).

    llm.c's order: zero_grad, then per micro-batch forward (``model(x, targets=y)`` gives
    L = CE + aux + z) and backward (gradients add up), then g /= n_micro, global-norm
    clip, update at rate ``lr``, zero_grad. A non-finite loss or gradient norm skips the
    update (``StepStats.bad``). ``grad_clip`` 0 measures the norm without clipping.
    Bias balancing (``router_bias_rate > 0``) moves its bias after the update, once, from
    the expert load summed over the step's micro-batches (DeepSeek-V3 updates per step;
    :func:`tinymoe.nn.routers.update_biases`); a skipped update leaves the bias alone.

    ``parallel`` (:class:`tinymoe.parallel.Parallel`, MPI ranks; None: one process): each
    batch is this rank's rows of the global batch; the statistics (and the loss checked for
    NaN) are those of the global batch, the gradients are averaged over ranks before the
    micro-batch mean, and the clipping norm counts expert shards once (docs/parallel.md).

    Host syncs (one process): the losses, routing statistics and gradient norm stay on the device until
    the end of the step and come back in ONE transfer (a non-finite loss is therefore seen
    after every micro-batch's backward, not before; the update is skipped all the same).
    The forward adds one sync per MoE layer (the rows per expert, which size the grouped
    matmuls); nothing else in a step reads the device.
    """
    from tinymoe.nn.routers import clear_bias_loads, update_biases  # noqa: PLC0415 (lazy model code)

    params = list(model.parameters())
    optimizer.zero_grad()
    clear_bias_loads(model)                                      # nothing left from an earlier forward
    lr = set_lr(optimizer, lr)
    names = ("loss", "ce", "aux", "z", "dropped", "busiest")
    n, bad = 0, None
    if parallel is None:
        sums: list[Any] = []                                     # 0-d device arrays, one per name
        for batch in batches:
            out = model(batch.x, targets=batch.y, rng=rng)       # [B, T] -> logits, losses
            out.loss.backward()                                  # grads += dL/dtheta
            dropped, busiest = routing_summary(out.routing, sync=False)
            xp = B.array_module(out.loss.data)
            parts = [xp.asarray(v, dtype=xp.float64)             # summed in float64, as floats were
                     for v in (out.loss.data, out.ce.data, out.aux_loss.data, out.z_loss.data,
                               dropped, busiest)]
            sums = parts if not sums else [a + b for a, b in zip(sums, parts)]
            n += 1
        if n > 1:
            scale_grads_(params, 1.0 / n)                        # mean over micro-batches
        gnorm = clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"), sync=False)
        # The step's one host sync: every statistic in one device -> host transfer.
        xp = B.array_module(gnorm)
        host = B.to_numpy(xp.stack(sums + [xp.asarray(gnorm, dtype=xp.float64)]))   # [7] or [1]
        values = ({k: float(host[i]) / n for i, k in enumerate(names)} if n
                  else dict.fromkeys(names, 0.0))
        gnorm = float(host[-1])
    else:
        # MPI ranks: the statistics of the global batch (one Allreduce per micro-batch), so
        # every rank sees a NaN on any rank before its backward and skips the same update.
        totals = dict.fromkeys(names, 0.0)
        gnorm = float("nan")
        for batch in batches:
            out = model(batch.x, targets=batch.y, rng=rng)       # this rank's rows [b, T]
            stats = parallel.step_stats(out)                     # collective
            if not math.isfinite(stats[0]):
                bad = f"loss is {stats[0]}"
                break
            out.loss.backward()                                  # grads += dL/dtheta
            n += 1
            for k, v in zip(names, stats):
                totals[k] += float(v)
        if bad is None:
            parallel.reduce_grads(model.named_parameters())      # mean over ranks
            if n > 1:
                scale_grads_(params, 1.0 / n)                    # mean over micro-batches
            clip = parallel.clip_grad_norm_fn(model, clip_grad_norm_)
            gnorm = clip(params, grad_clip if grad_clip > 0 else float("inf"))
        values = {k: v / max(n, 1) for k, v in totals.items()}
    if bad is None and not math.isfinite(values["loss"]):
        bad = f"loss is {values['loss']}"
    elif bad is None and not math.isfinite(gnorm):
        bad = f"gradient norm is {gnorm}"
    stats = StepStats(**values, grad_norm=gnorm, lr=lr, bad=bad)
    if bad is not None:
        optimizer.zero_grad()
        clear_bias_loads(model)
        return stats
    try:
        optimizer.step()                                         # theta <- update(theta, g, lr)
        optimizer.zero_grad()
        update_biases(model)                                     # bias balancing: one move per step
    except KeyboardInterrupt:
        raise UpdateInterrupted("interrupted during the weight update") from None
    return stats


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


def _next_loss(model: Any, sampler: BatchSampler, rng: Any, parallel: Parallel) -> float:
    """The training loss of the next batch on the current weights (the loss the next
    update will see), without moving the data position or the routing RNG. Under MPI the
    loss of the next global batch (every rank takes part)."""
    state, rng_state = sampler.state_dict(), rng.bit_generator.state
    try:
        batch = parallel.local_rows(sampler.next())
        with no_grad():
            return parallel.mean(float(model(batch.x, targets=batch.y, rng=rng).loss.item()))
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


class _AgreedStop(KeyboardInterrupt):
    """The loop's own stop after a Ctrl-C / SIGTERM (under MPI: seen by some rank and
    agreed by all at the top of a step, so every rank saves at the same step)."""


# ---------------------------------------------------------------------------- the loop
def train(model_cfg: ModelConfig | None, train_cfg: TrainConfig, progress: bool = True,
          on_step: Callable[[int, Any], None] | None = None,
          parallel: Parallel | None = None) -> TrainResult:
    """Train (or resume) an OpenMoE model; see the module docstring.

    model_cfg   the model; None when resuming (the checkpoint's is used). The vocabulary
                size is set to the tokenizer's.
    train_cfg   every training setting.
    progress    show a progress bar and notes (on stderr; warnings are printed anyway).
    on_step     called as ``on_step(step, model)`` after every update (tests, lessons).
    parallel    MPI data/expert parallelism (:func:`tinymoe.parallel.setup`; every rank
                calls ``train``); None: one process. Rank 0 alone owns the run folder
                (lock, log, checkpoints, snapshots, curves) and prints; the others see it
                through a :class:`tinymoe.runfolder.RunFolderView`.

    Bad input raises ValueError / FileNotFoundError / CheckpointError (one line), a folder
    in use ``RunFolderBusy``, a failed write ``RunFolderError`` (after logging it). A NaN,
    Ctrl-C / SIGTERM, or ``stop_at`` return normally; see ``TrainResult.status``.
    """
    t_start = time.perf_counter()
    from tinymoe.parallel import Parallel  # noqa: PLC0415 (imports the model code)

    par = parallel if parallel is not None else Parallel("none", None)
    if train_cfg.device is not None:
        B.set_device(train_cfg.device)
    folder = RunFolder if par.is_root else RunFolderView
    with folder.open(train_cfg.out_dir) as rf:
        s = set_up(model_cfg, train_cfg, rf, par)
        if par.is_root:
            for line in rf.notes + s.notes:
                write_line(line)
        par.barrier()          # every rank has passed every check before rank 0 writes
        return _run(s, rf, progress and par.is_root, on_step, t_start)


def _run(s: Session, rf: RunFolder, progress: bool,
         on_step: Callable[[int, Any], None] | None, t_start: float) -> TrainResult:
    """The loop of :func:`train`: updates, logs, evals, snapshots, checkpoints."""
    cfg, model, optimizer, sampler, route_rng = s.cfg, s.model, s.optimizer, s.sampler, s.route_rng
    par = s.parallel
    tokens_per_update = cfg.grad_accum * par.global_batch(cfg.batch_size) * cfg.seq_len
    end_step = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)

    def note(msg: str) -> None:
        if progress:
            write_line(msg)

    rf.start_log(fresh=s.ckpt is None)
    # routing snapshots need routing: a dense model (no MoE block) writes none
    probe_x, probe_dom = (probe_batch(s.val_tok, cfg.seq_len)
                          if cfg.snapshot_every and s.model_cfg.moe_layers else (None, None))
    counts = count_parameters(s.model_cfg)
    rf.log({"event": "start", "step": s.start_step, "time": time.time(),
            "resumed_from": s.ckpt.path if s.ckpt is not None else None,
            "model_config": s.model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "params_total": counts["total"], "params_active": counts["active"],
            "tokenizer": s.tokenizer.to_dict().get("type"), "vocab_size": s.tokenizer.vocab_size,
            "recipe": s.recipe,
            "domains": {k: {"train_tokens": int(s.train_tok[k].size),
                            "val_tokens": int(s.val_tok[k].size),
                            "val_unigram_entropy": unigram_entropy(s.val_tok[k])}
                        for k in s.train_tok},
            "notes": rf.notes + s.notes, **par.log_fields(cfg.batch_size)})
    note(f"model: {s.model_cfg.describe()}")
    note(f"data: {s.corpus!r}; tokens per update {tokens_per_update}")
    last_eval: dict[str, Any] | None = s.ckpt.extra.get("last_eval") if s.ckpt is not None else None

    def save(step_now: int) -> str | None:
        """Write the checkpoint if the state is good; else return why it is not saved.
        Under MPI every rank calls it: the ranks agree on the verdict, the expert shards
        are gathered, and rank 0 writes one ordinary checkpoint."""
        bad = par.agree(_bad_state(model, optimizer))
        if bad is None:
            loss = _next_loss(model, sampler, route_rng, par)
            if not math.isfinite(loss):
                bad = f"loss is {loss} at step {step_now + 1} (on the weights of step {step_now})"
        if bad is not None:
            return bad
        model_state, optimizer_state = par.full_states(model, optimizer)   # None off rank 0
        rf.save(step_now, model_config=s.model_cfg, model_state=model_state,
                tokenizer=s.tokenizer, train_config=cfg.to_dict(),
                optimizer_state=optimizer_state, sampler_state=sampler.state_dict(),
                rng_state={"route_rng": route_rng.bit_generator.state},
                extra={"data_fingerprint": s.fingerprint, "last_eval": last_eval,
                       "corpus": s.corpus.source, "domains": list(s.train_tok),
                       **par.log_fields(cfg.batch_size)})
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
                    if par.any_rank(interrupt.requested):   # MPI: all ranks stop together
                        raise _AgreedStop
                    pre_state = (step, sampler.state_dict(), route_rng.bit_generator.state)
                    st = train_step(model, optimizer,
                                    (par.local_rows(sampler.next()) for _ in range(cfg.grad_accum)),
                                    lr=lr_at(step, cfg), grad_clip=cfg.grad_clip, rng=route_rng,
                                    parallel=par)
                    if st.bad is not None:
                        status = "nan"
                        message = (f"{st.bad} at step {step + 1}; stopped before updating the "
                                   f"weights; {rf.kept_message()}")
                        break
                    step += 1
                    if on_step is not None:
                        on_step(step, model)

                    losses.append(st.loss)
                    for k in ("loss", "ce", "aux", "z", "dropped", "busiest"):
                        interval[k] = interval.get(k, 0.0) + getattr(st, k)
                    interval["gnorm"] = interval.get("gnorm", 0.0) + st.grad_norm
                    interval["count"] = interval.get("count", 0.0) + 1
                    tokens_seen += tokens_per_update
                    if step % cfg.log_every == 0 or step == end_step:
                        now = time.perf_counter()
                        c = interval.pop("count")
                        tps = c * tokens_per_update / max(now - t_interval, 1e-9)
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
            if par.size > 1 and not isinstance(e, _AgreedStop):
                raise    # one rank alone (a second Ctrl-C): no collective save; the job aborts
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
