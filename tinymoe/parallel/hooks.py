"""What the training loop calls: :class:`Parallel` (one per run), :func:`setup`,
:func:`run_train`, :func:`call_on_every_rank` and the tests' fault hook (``TINYMOE_FAULT``).

Data parallelism (``mode="data"``): every rank holds the whole model and its own
micro-batch of b sequences; after the backward pass the gradients are averaged over the
ranks with one ``Allreduce`` per parameter, so every rank takes the same optimizer step.
Expert parallelism (``mode="expert"``): the experts are sharded
(:mod:`tinymoe.parallel.layer`), every other parameter is replicated.

Same training as one process. With P ranks and micro-batch b the sampler draws the global
batch of P*b sequences exactly as one process with batch P*b would, and rank r takes rows
``r*b ... r*b+b-1``. The loss of one process is a mean over the global batch (CE over
tokens, aux/z over groups); every rank's loss is the mean over its own rows, so the global
loss is the mean of the P local losses and its gradient is (1/P) * sum of the local
gradients: replicated gradients are summed with ``Allreduce`` and divided by P; an
expert's gradient already arrives summed over every rank's tokens on its owner (through
the exchange's backward), so it is divided by P and not reduced. Routing groups must not
straddle ranks (they are one sequence, or ``group_size`` must divide b*T).
"""
from __future__ import annotations

import faulthandler
import os
import sys
from typing import Any, Iterable

from tinymoe import backend as B
from tinymoe.evaluate import routing_summary
from tinymoe.nn.module import Module
from tinymoe.parallel.comm import Comm, ParallelError, mpi_world_size
from tinymoe.parallel.layer import is_expert_param, shard_experts

np = B.np

MODES = ("none", "data", "expert")


class Parallel:
    """The parallel side of one training run: batch slicing, gradient reduction, norm,
    checkpoint gather/scatter, and which rank talks. ``mode="none"`` is one process and
    every method is then the identity (rank 0 of 1)."""

    def __init__(self, mode: str, comm: Comm | None):
        if mode not in MODES:
            raise ValueError(f"parallel mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode, self.comm = mode, comm
        self.rank = comm.rank if comm is not None else 0
        self.size = comm.size if comm is not None else 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # ---- setup checks
    def check(self, model_cfg: Any, train_cfg: Any, ckpt: Any = None) -> None:
        """One-line ParallelError for a combination this mode cannot run exactly, or a
        checkpoint (``ckpt``, when resuming) drawn with another global batch."""
        if ckpt is not None and ckpt.sampler_state is not None:
            saved = ckpt.sampler_state.get("batch_size")
            now = self.global_batch(train_cfg.batch_size)
            if saved is not None and int(saved) != now:
                raise ParallelError(
                    f"{ckpt.path}: trained with a global batch of {int(saved)} sequences, this "
                    f"run draws {self.size} rank(s) x --batch-size {train_cfg.batch_size} = {now}; "
                    "resume with the same number of ranks and --batch-size")
        if self.mode == "none":
            return
        p = self.size
        if model_cfg.slot_priority == "random":
            raise ParallelError("slot priority 'random' draws noise for the whole batch; "
                                "it is not supported with --parallel (use 'position' or 'probability')")
        variant = [name for name, on in (
            ("router_type=expert_choice", model_cfg.router_type != "token_choice"),
            ("router_noise", model_cfg.router_noise),
            ("router_bias_rate", model_cfg.router_bias_rate > 0),
            ("router_score=sigmoid", model_cfg.router_score != "softmax")) if on]
        if variant:
            raise ParallelError(f"{variant[0]}: the routing variants are not supported with "
                                "--parallel (their noise and bias updates are per batch, and "
                                "sigmoid scores are untested there); "
                                "train them in one process")
        t = train_cfg.seq_len
        if model_cfg.group_size is not None and (train_cfg.batch_size * t) % model_cfg.group_size:
            raise ParallelError(f"group_size={model_cfg.group_size} does not divide a rank's "
                                f"{train_cfg.batch_size}*{t} tokens: a group would straddle ranks")
        if self.mode == "expert":
            e = model_cfg.n_experts
            if p > e:
                raise ParallelError(f"{p} ranks > n_experts={e}: every rank needs at least one expert")
            if e % p:
                raise ParallelError(f"n_experts={e} is not divisible by {p} ranks")
            if train_cfg.optimizer == "adafactor":
                raise ParallelError("adafactor under --parallel expert is not yet verified "
                                    "against one process; use --optimizer adamw")

    def global_batch(self, batch_size: int) -> int:
        """The sampler's batch: P*b sequences."""
        return batch_size * self.size

    def local_rows(self, batch: Any) -> Any:
        """Rows r*b ... r*b+b-1 of the global batch (``x``, ``y``, ``domain``)."""
        if self.size == 1:
            return batch
        b = batch.x.shape[0] // self.size
        sl = slice(self.rank * b, (self.rank + 1) * b)
        return type(batch)(x=batch.x[sl], y=batch.y[sl], domain=batch.domain[sl])

    def prepare_model(self, model: Module) -> None:
        if self.mode == "expert":
            shard_experts(model, self.comm)

    # ---- small collectives the training loop needs
    def mean(self, *values: float) -> Any:
        """The mean over ranks of each Python float (one Allreduce for all); returns one
        float for one value, else a tuple. A NaN on any rank makes every rank's mean NaN,
        so all ranks stop at the same step."""
        if self.size == 1:
            return values[0] if len(values) == 1 else values
        sums = self.comm.allreduce_sum(np.asarray(values, dtype=np.float64), kind="scalars")
        out = tuple(float(v) / self.size for v in sums)
        return out[0] if len(out) == 1 else out

    def step_stats(self, out: Any) -> tuple[float, float, float, float, float, float]:
        """(loss, ce, aux, z, dropped, busiest) of one micro-batch on the global batch,
        from a model output ``out``; one Allreduce on P ranks.

        loss, ce, aux, z: means over ranks (each rank's loss is a mean over its own rows,
        the same number on every rank, so the mean over ranks is the global mean); a NaN on
        any rank makes every rank's value NaN, so all ranks skip the same update.
        dropped: per layer dropped assignments / assignments, the same mean (equal counts).
        busiest: per layer max_e L_e / sum_e L_e with L_e = sum over ranks of expert e's
        kept assignments (the busiest expert of the global batch, as one process reports
        it), averaged over layers (:func:`tinymoe.evaluate.routing_summary`)."""
        scalars = [float(out.loss.item()), float(out.ce.item()), float(out.aux_loss.item()),
                   float(out.z_loss.item())]
        if self.size == 1:
            return (*scalars, *routing_summary(out.routing))      # type: ignore[return-value]
        routing_ = list(out.routing)
        n_layers = len(routing_)
        drops = [float(s.dropped_fraction) for s in routing_]
        loads = [B.to_numpy(s.load_after).astype(np.float64) for s in routing_]   # L x [E]
        send = np.concatenate([np.asarray(scalars + drops, dtype=np.float64), *loads])
        total = self.comm.allreduce_sum(send, kind="scalars")      # [4 + L + L*E]
        mean = total[:4 + n_layers] / self.size
        if not n_layers:
            return (*(float(v) for v in mean[:4]), 0.0, 0.0)      # type: ignore[return-value]
        load = total[4 + n_layers:].reshape(n_layers, -1)         # [L, E] global kept loads
        sums = load.sum(axis=1)
        busiest = float(np.mean([load[i].max() / sums[i] if sums[i] > 0 else 0.0
                                 for i in range(n_layers)]))
        return (*(float(v) for v in mean[:4]), float(mean[4:].mean()), busiest)  # type: ignore[return-value]

    def agree(self, reason: str | None) -> str | None:
        """The first rank's non-None ``reason`` (e.g. why a checkpoint may not be
        written), the same on every rank; None when no rank has one."""
        if self.size == 1:
            return reason
        reasons = self.comm.allgather_obj(reason)
        for r, why in enumerate(reasons):
            if why is not None:
                return f"{why} (rank {r})"
        return None

    def all_ranks(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        if self.size == 1:
            return bool(flag)
        return self.comm.allreduce_float(0.0 if flag else 1.0) == 0.0

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is true on some rank (so that a Ctrl-C seen by the ranks at
        different steps stops them all at the same step)."""
        if self.size == 1:
            return bool(flag)
        return self.comm.allreduce_float(1.0 if flag else 0.0) > 0.0

    def barrier(self) -> None:
        if self.size > 1:
            self.comm.barrier()

    def log_fields(self, batch_size: int) -> dict[str, Any]:
        """What the log and the checkpoint record about the parallel run."""
        if self.mode == "none":
            return {}
        return {"parallel": {"mode": self.mode, "ranks": self.size, "micro_batch": batch_size,
                             "global_batch": self.global_batch(batch_size)}}

    def full_states(self, model: Module, optimizer: Any) -> tuple[Any, Any]:
        """(model state, optimizer state) as one process holds them, on rank 0 (expert
        shards gathered: a collective every rank must call); (None, None) elsewhere."""
        return self.full_model_state(model), self.full_optimizer_state(model, optimizer)

    def clip_grad_norm_fn(self, model: Module, serial: Any) -> Any:
        """The clipping function to call as ``clip(params, max_norm)``: ``serial``
        (:func:`tinymoe.optim.clip_grad_norm_`) unless the experts are sharded; then the
        norm of the shards is summed over ranks."""
        if self.mode != "expert" or self.size == 1:
            return serial
        return lambda params, max_norm: self.clip_grad_norm_(list(model.named_parameters()), max_norm)

    # ---- gradients
    def reduce_grads(self, named_params: Iterable[tuple[str, Any]]) -> None:
        """Average gradients over ranks: replicated ones Allreduce(sum)/P; expert shards
        (expert mode) /P only, they already hold every rank's contribution."""
        if self.size == 1:
            return
        inv = 1.0 / self.size
        for name, p in named_params:
            if p.grad is None:
                xp = B.array_module(p.data)
                p.grad = xp.zeros_like(p.data)                    # a rank whose layer got no gradient
            if self.mode == "expert" and is_expert_param(name):
                p.grad *= inv
            else:
                p.grad = self.comm.allreduce_sum(p.grad) * p.grad.dtype.type(inv)

    def clip_grad_norm_(self, named_params: list[tuple[str, Any]], max_norm: float) -> float:
        """Global-norm clipping as :func:`tinymoe.optim.clip_grad_norm_`, where the norm
        of the expert shards is summed over ranks (replicated gradients count once)."""
        from tinymoe.optim import _sum_sq  # noqa: PLC0415
        rep = shard = 0.0
        grads = []
        for name, p in named_params:
            if p.grad is None:
                continue
            grads.append(p.grad)
            if self.mode == "expert" and is_expert_param(name):
                shard += float(_sum_sq(p.grad))
            else:
                rep += float(_sum_sq(p.grad))
        if self.mode == "expert" and self.size > 1:
            shard = self.comm.allreduce_float(shard)
        total = (rep + shard) ** 0.5
        if total != total or total == float("inf"):
            return total
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads:
                g *= coef
        return total

    # ---- checkpoints: one ordinary full state on rank 0
    def _gather(self, state: dict[str, Any], sharded: set[str]) -> dict[str, Any] | None:
        out = {}
        for k in sorted(state):
            v = state[k]
            if k in sharded:
                v = self.comm.gather_axis0(v)
            out[k] = v
        return out if self.is_root else None

    def full_model_state(self, model: Module) -> dict[str, Any] | None:
        """The whole model's state on rank 0 (expert shards gathered), None elsewhere."""
        state = model.state_dict()
        if self.mode != "expert":
            return state if self.is_root else None
        return self._gather(state, {k for k in state if is_expert_param(k)})

    def local_model_state(self, model: Module, full: dict[str, Any]) -> dict[str, Any]:
        """This rank's slice of a full state (expert tensors cut along axis 0)."""
        if self.mode != "expert":
            return full
        local = dict(full)
        for name, p in model.named_parameters():
            if is_expert_param(name):
                per = p.data.shape[0]
                local[name] = full[name][self.rank * per:(self.rank + 1) * per]
        return local

    def _optimizer_expert_index(self, model: Module, optimizer: Any) -> dict[int, str]:
        names = {id(p): n for n, p in model.named_parameters()}
        return {i: names[id(p)] for i, _, p in optimizer._indexed_params()
                if is_expert_param(names[id(p)])}

    def full_optimizer_state(self, model: Module, optimizer: Any) -> dict[str, Any] | None:
        """The optimizer state as one process would hold it, on rank 0 (None elsewhere)."""
        sd = optimizer.state_dict()
        if self.mode != "expert":
            return sd if self.is_root else None
        experts = self._optimizer_expert_index(model, optimizer)
        state = {}
        for i in sorted(sd["state"]):
            s = sd["state"][i]
            if i in experts:
                s = {k: (v if k == "step" else self.comm.gather_axis0(v)) for k, v in sorted(s.items())}
            state[i] = s
        return {**sd, "state": state} if self.is_root else None

    def local_optimizer_state(self, model: Module, optimizer: Any, full: dict[str, Any]) -> dict[str, Any]:
        """This rank's slice of a full optimizer state."""
        if self.mode != "expert":
            return full
        experts = self._optimizer_expert_index(model, optimizer)
        params = {i: p for i, _, p in optimizer._indexed_params()}
        state = {}
        for key, s in full["state"].items():
            i = int(key)
            if i in experts:
                per = params[i].data.shape[0]
                s = {k: (v if k == "step" else v[self.rank * per:(self.rank + 1) * per])
                     for k, v in s.items()}
            state[key] = s
        return {**full, "state": state}


def setup(mode: str, command: str = "train") -> Parallel:
    """The :class:`Parallel` of this process for ``--parallel mode``.

    ``none``: one process, no MPI (under mpiexec with P > 1 ranks a one-line
    ParallelError: P independent runs would write the same folder). ``data``/``expert``:
    MPI is initialised; without mpiexec (one rank) it raises a one-line ParallelError
    naming ``command`` (train, bench) in the mpiexec line it suggests."""
    if mode not in MODES:
        raise ValueError(f"--parallel {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        n = mpi_world_size()
        if n > 1:
            raise ParallelError(f"running under mpiexec with {n} ranks but --parallel none: "
                                "add --parallel data or --parallel expert")
        return Parallel("none", None)
    if mpi_world_size() < 2:
        raise ParallelError(f"--parallel {mode} needs at least 2 ranks: run it as "
                            f"mpiexec -n P python -m tinymoe {command} --parallel {mode} ...")
    try:
        comm = Comm()
    except ImportError:
        raise ParallelError("--parallel needs mpi4py (pip install mpi4py mpich)") from None
    # a rank killed by a fatal signal (segfault, abort, bus error) prints its Python stack;
    # mpiexec (hydra) then names the signal and ends the other ranks
    faulthandler.enable()
    return Parallel(mode, comm)


FAULT_ENV = "TINYMOE_FAULT"


def _fault_hook(par: Parallel) -> Any:
    """Fault injection for tests: ``TINYMOE_FAULT="rank:step:kind"`` makes that rank, after
    that update, ``raise`` a RuntimeError, ``sysexit`` (``sys.exit(3)``), ``exit`` (die by
    ``os._exit(1)``: no Python clean-up, no MPI call) or ``segv`` (a real segmentation
    fault)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    rank, step, kind = spec.split(":")

    def hook(step_now: int, model: Any) -> None:
        if par.rank == int(rank) and step_now == int(step):
            if kind == "exit":
                os._exit(1)
            if kind == "sysexit":
                sys.exit(3)
            if kind == "segv":
                import faulthandler  # noqa: PLC0415
                faulthandler._sigsegv()
            raise RuntimeError(f"injected fault on rank {rank} after step {step}")
    return hook


def call_on_every_rank(par: Parallel, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on this rank. On P > 1 ranks any exception on any rank
    prints one line and aborts the whole job (``MPI_Abort``), so no rank waits forever in
    a collective."""
    if par.size == 1:
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 (every failure ends the job, never a hang)
        msg = str(e).splitlines()[0] if str(e) else ""
        par.comm.abort(f"{type(e).__name__}: {msg}" if not isinstance(e, ValueError) else msg)
        raise  # not reached


def run_train(par: Parallel, train_fn: Any, model_cfg: Any, train_cfg: Any, progress: bool) -> Any:
    """``python -m tinymoe train --parallel mode``: ``train_fn`` (tinymoe.train.train) on this
    rank with ``parallel=par`` (:func:`call_on_every_rank`: a failure on any rank aborts the
    job; the last good checkpoint, written atomically by rank 0, is kept). The caller
    prints the results on rank 0 only (``par.is_root``)."""
    if par.mode == "none":
        return train_fn(model_cfg, train_cfg, progress=progress)
    return call_on_every_rank(par, train_fn, model_cfg, train_cfg, progress=progress and par.is_root,
                              parallel=par, on_step=_fault_hook(par))
