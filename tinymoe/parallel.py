"""Training on P processes with MPI: data parallelism and expert parallelism.

Run under ``mpiexec -n P``; every rank executes the same program (SPMD).

Data parallelism (``mode="data"``): every rank holds the whole model and its own
micro-batch of b sequences; after the backward pass the gradients are averaged over the
ranks with one ``Allreduce`` per parameter, so every rank takes the same optimizer step.

Expert parallelism (``mode="expert"``): the E experts of every MoE layer are sharded, rank
r owns experts ``r*E/P ... (r+1)*E/P - 1``; every other parameter is replicated (its
gradient is averaged as above). Each rank routes its own groups, fills the fixed-capacity
dispatch buffer ``[E, R, d]`` (R = n_groups * C rows per expert) and sends expert e's rows
to e's owner with one ``Alltoall``; the owner runs its experts on the filled rows of
``[E/P, P*R, d]`` (all ranks' rows; which are filled it learns from a one-byte-per-row mask
sent alongside) with grouped GEMMs, as one process does, and returns the outputs with a
second ``Alltoall``. The backward pass mirrors
both exchanges (the adjoint of an all-to-all is the same all-to-all with the roles of
sender and receiver swapped). Because the capacity C is fixed, every rank knows in advance
how many bytes go to every other rank: the exchange is static, a plain ``Alltoall``.
Dropless routing (``capacity_factor=None``) sets C = G, so it is static too, at the price
of a buffer E/k times larger than the tokens (counted by :class:`Comm`).

Same training as one process. With P ranks and micro-batch b the sampler draws the global
batch of P*b sequences exactly as one process with batch P*b would, and rank r takes rows
``r*b ... r*b+b-1``. The loss of one process is a mean over the global batch (CE over
tokens, aux/z over groups); every rank's loss is the mean over its own rows, so the global
loss is the mean of the P local losses and its gradient is (1/P) * sum of the local
gradients: replicated gradients are summed with ``Allreduce`` and divided by P; an
expert's gradient already arrives summed over every rank's tokens on its owner (through
the exchange's backward), so it is divided by P and not reduced. Routing groups must not
straddle ranks (they are one sequence, or ``group_size`` must divide b*T).

GPUs (CuPy): every buffer is staged through host memory (``.get()`` before the MPI call,
back to the device after) unless the MPI library reports CUDA-aware support
(``MPI.Query_cuda_support()``), in which case the device arrays are passed directly.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import time
from typing import Any, Iterable

from tinymoe import backend as B
from tinymoe import routing
from tinymoe.autograd import Context, Function, Tensor
from tinymoe.evaluate import routing_summary
from tinymoe.nn.module import Module, Parameter
from tinymoe.nn.moe import MoE, MoEStats, Experts, combine, dispatch, gather_rows, route_layer

np = B.np

__all__ = ["MODES", "Comm", "Parallel", "ExpertParallelMoE", "exchange_to_owners",
           "exchange_to_sources", "shard_experts", "is_expert_param", "setup", "alltoall_bytes"]

MODES = ("none", "data", "expert")


class ParallelError(ValueError):
    """A setup error: one line (without mpiexec: exit status 2; under mpiexec every rank
    reports it and the job aborts)."""


# --------------------------------------------------------------------------------------
# the communicator: MPI calls, host staging, byte counts
# --------------------------------------------------------------------------------------

class Comm:
    """A thin wrapper of an mpi4py communicator that counts the bytes it sends and the time
    it spends in MPI.

    ``bytes[kind]`` adds up, per call kind (the all-to-alls "dispatch", "combine",
    "dispatch_backward", "combine_backward"; "allreduce" for gradients, "scalars" for the
    small all-reduces of statistics, norms and flags; "gather"), the bytes this rank hands
    to MPI; ``remote_bytes[kind]`` only the part that leaves the rank (an all-to-all keeps
    1/P of its buffer at home). Counts are exact (array sizes).

    ``seconds[kind]``: wall time inside those calls, host staging included (on a GPU the
    device is synchronised before the clock starts, so pending compute is not counted).
    An MPI call also waits for the slowest rank to arrive, so this is transfer time plus
    load imbalance, not bandwidth alone.
    """

    def __init__(self, mpi_comm: Any = None):
        from mpi4py import MPI  # noqa: PLC0415
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        query = getattr(MPI, "Query_cuda_support", None)
        try:
            self.cuda_aware = bool(query()) if query is not None else False
        except Exception:  # noqa: BLE001 (an MPI without the query: stage through the host)
            self.cuda_aware = False
        self.bytes: dict[str, int] = {}
        self.remote_bytes: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def _count(self, kind: str, total: int, remote: int, t0: float) -> None:
        """Add one call's bytes and the seconds since ``t0`` to ``kind``."""
        self.seconds[kind] = self.seconds.get(kind, 0.0) + (time.perf_counter() - t0)
        self.bytes[kind] = self.bytes.get(kind, 0) + int(total)
        self.remote_bytes[kind] = self.remote_bytes.get(kind, 0) + int(remote)

    @staticmethod
    def _start(a: Any = None) -> float:
        """The clock at the start of a call (after finishing pending device work on ``a``)."""
        if a is not None and B.array_module(a) is not np:
            B.synchronize()
        return time.perf_counter()

    def reset_counts(self) -> None:
        self.bytes.clear()
        self.remote_bytes.clear()
        self.seconds.clear()

    def _host(self, a: Any) -> tuple[Any, bool]:
        """(a buffer MPI can read, whether it was staged from the device)."""
        if type(a).__module__.startswith("cupy") and not self.cuda_aware:
            return np.ascontiguousarray(B.to_numpy(a)), True      # device -> host copy
        return a, False

    def alltoall(self, send: Any, kind: str = "alltoall") -> Any:
        """``send [P, ...]``: chunk q goes to rank q; returns ``recv [P, ...]`` with chunk q
        from rank q. One ``MPI_Alltoall``; equal chunk sizes (the exchange is static)."""
        if send.shape[0] != self.size:
            raise ValueError(f"alltoall: leading axis {send.shape[0]} != {self.size} ranks")
        t0 = self._start(send)
        xp = B.array_module(send)
        buf, staged = self._host(xp.ascontiguousarray(send))
        recv = np.empty_like(buf) if staged else B.array_module(buf).empty_like(buf)
        if staged or xp is not np:
            B.synchronize()
        self.comm.Alltoall(buf, recv)
        out = xp.asarray(recv) if staged else recv               # host -> device copy when staged
        self._count(kind, buf.nbytes, buf.nbytes * (self.size - 1) // self.size, t0)
        return out

    def allreduce_sum(self, a: Any, kind: str = "allreduce") -> Any:
        """The element-wise sum of ``a`` over ranks (a new array, same device)."""
        t0 = self._start(a)
        xp = B.array_module(a)
        buf, staged = self._host(xp.ascontiguousarray(a))
        out = np.empty_like(buf) if staged else B.array_module(buf).empty_like(buf)
        self.comm.Allreduce(buf, out, op=self.MPI.SUM)
        res = xp.asarray(out) if staged else out
        self._count(kind, buf.nbytes, buf.nbytes, t0)
        return res

    def allreduce_float(self, v: float, kind: str = "scalars") -> float:
        """The sum of a Python float over ranks (counted as 8 bytes of ``kind``)."""
        t0 = self._start()
        total = float(self.comm.allreduce(float(v), op=self.MPI.SUM))
        self._count(kind, 8, 8, t0)
        return total

    def gather_axis0(self, a: Any, kind: str = "gather") -> Any:
        """Rank 0 gets the ranks' arrays concatenated along axis 0 (others get None)."""
        t0 = self._start(a)
        host = np.ascontiguousarray(B.to_numpy(a))
        parts = self.comm.gather(host, root=0)
        self._count(kind, host.nbytes, 0 if self.rank == 0 else host.nbytes, t0)
        return np.concatenate(parts, axis=0) if self.rank == 0 else None

    def allgather_obj(self, obj: Any) -> list[Any]:
        """Every rank's (picklable) ``obj``, in rank order, on every rank (not counted)."""
        return self.comm.allgather(obj)

    def bcast(self, obj: Any) -> Any:
        return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, message: str, code: int = 1) -> None:
        """Print one line and end every rank of the job (``MPI_Abort``), never a hang."""
        sys.stderr.write(f"error (rank {self.rank} of {self.size}): {message}\n")
        sys.stderr.flush()
        time.sleep(0.2)  # let mpiexec forward the line before the abort tears the job down
        self.comm.Abort(code)
        os._exit(code)   # MPICH's MPI_Abort can return to the caller before the job is torn down


def mpi_world_size() -> int:
    """The number of ranks mpiexec started (from the environment; 1 without mpiexec).
    Read before importing mpi4py, so a plain run never initialises MPI."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 1


# --------------------------------------------------------------------------------------
# the two exchanges of expert parallelism, as autograd Functions
# --------------------------------------------------------------------------------------

def _to_owners(comm: Comm, buf: Any, kind: str) -> Any:
    """[E, R, d] (this rank's rows for every expert) -> [E/P, P*R, d] (every rank's rows
    for this rank's experts, source-rank-major within each expert)."""
    p = comm.size
    e, r, d = buf.shape
    recv = comm.alltoall(buf.reshape(p, e // p, r, d), kind)         # [P(dst), E/P, R, d] -> [P(src), E/P, R, d]
    return recv.transpose(1, 0, 2, 3).reshape(e // p, p * r, d)      # -> [E/P, P*R, d]


def _to_sources(comm: Comm, local: Any, kind: str) -> Any:
    """[E/P, P*R, d] (outputs of this rank's experts) -> [E, R, d] (outputs for this rank's
    rows from every expert): the inverse permutation of :func:`_to_owners`."""
    p = comm.size
    el, pr, d = local.shape
    send = local.reshape(el, p, pr // p, d).transpose(1, 0, 2, 3)    # [P(dst), E/P, R, d]
    recv = comm.alltoall(send, kind)                                  # [P(owner), E/P, R, d]
    return recv.reshape(el * p, pr // p, d)                          # -> [E, R, d]


class ToOwners(Function):
    """Dispatch exchange: [E, R, d] -> [E/P, P*R, d] with one Alltoall. Backward: the
    gradient [E/P, P*R, d] goes back with the inverse exchange (one Alltoall)."""

    @staticmethod
    def forward(ctx: Context, buf: Any, comm: Comm = None) -> Any:
        ctx.comm = comm
        return _to_owners(comm, buf, "dispatch")

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        return (_to_sources(ctx.comm, g, "dispatch_backward"),)


class ToSources(Function):
    """Combine exchange: [E/P, P*R, d] -> [E, R, d] with one Alltoall. Backward: the
    gradient [E, R, d] goes to the experts' owners (one Alltoall)."""

    @staticmethod
    def forward(ctx: Context, local: Any, comm: Comm = None) -> Any:
        ctx.comm = comm
        return _to_sources(comm, local, "combine")

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        return (_to_owners(ctx.comm, g, "combine_backward"),)


def exchange_to_owners(buf: Tensor, comm: Comm) -> Tensor:
    """Differentiable dispatch exchange [E, R, d] -> [E/P, P*R, d] (see :class:`ToOwners`)."""
    return ToOwners.apply(buf, comm=comm)


def exchange_to_sources(local: Tensor, comm: Comm) -> Tensor:
    """Differentiable combine exchange [E/P, P*R, d] -> [E, R, d] (see :class:`ToSources`)."""
    return ToSources.apply(local, comm=comm)


def alltoall_bytes(n_groups: int, capacity: int, n_experts: int, d_model: int, itemsize: int) -> int:
    """Bytes one rank hands to one Alltoall of one MoE layer: the whole dispatch buffer
    ``E * n_groups * C * d * itemsize`` (a fraction (P-1)/P of it leaves the rank)."""
    return n_experts * n_groups * capacity * d_model * itemsize


# --------------------------------------------------------------------------------------
# the expert-parallel MoE layer
# --------------------------------------------------------------------------------------

class ExpertParallelMoE(Module):
    """An MoE layer whose experts are split over the ranks of ``comm``.

    Same parameter names as :class:`tinymoe.nn.moe.MoE` (``router.weight`` [d, E],
    ``experts.w_gate`` ... but only this rank's E/P experts: [E/P, d, f]). Forward on this
    rank's tokens x [b, T, d]:

        z = x W_r; route per group (as one process)        -> weights [N, k], aux, z-loss
        buf = dispatch(x)                                  [N, d] -> [E, R, d]
        mine = Alltoall(buf)                               [E, R, d] -> [E/P, P*R, d]
        filled = Alltoall(row mask of buf)                 [E, R] -> [E/P, P*R] (1 byte a row)
        packed = mine[filled]                              -> [M_r, d], expert-major
        out = experts_r(packed, load_r)                    [M_r, d] grouped GEMMs, kept rows only
        full = scatter(out into zeros at filled)           -> [E/P, P*R, d] (empty slots 0)
        back = Alltoall(full)                              [E/P, P*R, d] -> [E, R, d]
        y = combine(back, weights)                         [E, R, d] -> [N, d]

    The data exchanges stay static (whole buffers, the bytes of the volume formula); only
    the M_r filled rows are computed, in the order one process computes them (rank 0's
    groups first), so the receiving rank does the single-process MoE's work, not the
    buffer's. ``rows_computed`` holds M_r of the last forward.
    """

    def __init__(self, moe: MoE, comm: Comm):
        super().__init__()
        cfg = moe.cfg
        p, r = comm.size, comm.rank
        if cfg.n_experts % p:
            raise ParallelError(f"n_experts={cfg.n_experts} is not divisible by {p} ranks")
        self.cfg, self.layer_idx, self.comm = cfg, moe.layer_idx, comm
        self.training = moe.training
        self.router = moe.router
        per = cfg.n_experts // p
        self.lo, self.hi = r * per, (r + 1) * per
        full = moe.experts
        ex = Experts.__new__(Experts)
        Module.__init__(ex)
        ex.n_experts, ex.d_model, ex.d_ff, ex.kind = per, full.d_model, full.d_ff, full.kind
        names = ("w_gate", "w_up", "w_down") if full.kind == "swiglu" else ("wi_0", "wi_1", "wo")
        for name in names:
            setattr(ex, name, Parameter(getattr(full, name).data[self.lo:self.hi].copy()))
        self.experts = ex
        self.rows_computed = 0

    def _filled_rows(self, flat_pos: Any, n_rows: int) -> tuple[Any, Any]:
        """(rows [M_r], load [E/P]): the filled rows of this rank's received buffer
        [E/P, P*R] (flattened, expert-major) and how many belong to each of its experts.
        Each rank marks its kept slots in a [E, R] byte mask and sends it with the data's
        Alltoall pattern."""
        xp = B.array_module(flat_pos)
        e = self.cfg.n_experts
        mask = xp.zeros(e * n_rows, dtype=xp.uint8)                        # [E * R]
        mask[flat_pos] = 1
        mine = _to_owners(self.comm, mask.reshape(e, n_rows, 1), "dispatch_mask")   # [E/P, P*R, 1]
        mine = mine.reshape(e // self.comm.size, -1)                       # [E/P, P*R]
        rows = xp.nonzero(mine.reshape(-1))[0].astype(xp.int64)            # [M_r], sorted
        return rows, mine.sum(axis=1, dtype=xp.int64)                      # [M_r], [E/P]

    def forward(self, x: Tensor, rng: Any = None) -> tuple[Tensor, Tensor, Tensor, MoEStats]:
        cfg = self.cfg
        # the same routing as one process (per group; refused variants never get here)
        tokens, weight, aux, z, result = route_layer(self.router, cfg, self.training, x, rng)
        bsz, seq, d = x.shape
        n = bsz * seq
        flat_pos, token, rank = routing.dispatch_indices(result)          # [M] each
        rows = result.rows_per_expert                                     # R = n_groups * C
        buf = dispatch(tokens, flat_pos, token, cfg.n_experts, rows)      # [N, d] -> [E, R, d]
        mine = exchange_to_owners(buf, self.comm)                         # -> [E/P, P*R, d]
        el, pr = mine.shape[0], mine.shape[1]
        filled, load = self._filled_rows(flat_pos, rows)                  # [M_r], [E/P]
        packed = gather_rows(mine.reshape(el * pr, d), filled)            # [E/P * P*R, d] -> [M_r, d]
        out = self.experts(packed, load=load)                             # [M_r, d]
        xp = B.array_module(filled)
        full = dispatch(out, filled, xp.arange(len(filled)), el, pr)      # [M_r, d] -> [E/P, P*R, d]
        self.rows_computed = int(len(filled))
        back = exchange_to_sources(full, self.comm)                       # -> [E, R, d]
        y = combine(back, weight, flat_pos, token, rank, n)               # [N, d]
        stats = MoEStats.from_result(result, self.layer_idx, (bsz, seq))
        return y.reshape(bsz, seq, d), aux, z, stats

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"n_experts={c.n_experts} (experts {self.lo}..{self.hi - 1} here), "
                f"top_k={c.top_k}, d_ff={c.expert_ff}")


def is_expert_param(name: str) -> bool:
    """Whether a parameter name is an expert weight (sharded under expert parallelism)."""
    return ".moe.experts." in name or name.startswith("moe.experts.") or name.startswith("experts.")


def shard_experts(model: Module, comm: Comm) -> None:
    """Replace every MoE layer of ``model`` (in place) by an :class:`ExpertParallelMoE`
    holding this rank's experts; other parameters stay (replicated). The parameter order
    is kept, so optimizer state indices are those of one process."""
    for _, m in list(model.named_modules()):
        if getattr(m, "is_moe", False) and isinstance(getattr(m, "moe", None), MoE):
            order = list(m._modules)
            m.moe = ExpertParallelMoE(m.moe, comm)
            m._modules.update({k: m._modules.pop(k) for k in order})   # "moe" back in its place


# --------------------------------------------------------------------------------------
# what the training loop calls
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# the cost model (bytes exact, times projected; see docs/parallel.md)
# --------------------------------------------------------------------------------------

def exchange_bytes_per_step(cfg: Any, tokens_per_rank: int, seq_len: int, itemsize: int | None = None,
                            training: bool = True) -> dict[str, float]:
    """Bytes one rank hands to the expert-parallel ``Alltoall``s in one training step.

    Per MoE layer and exchange the rank sends its whole dispatch buffer [E, n_groups*C, d]:

        bytes = tokens * k * d * itemsize * padding,   padding = E * C / (k * G)

    (G tokens per group, C slots per expert per group: ``routing.capacity``); padding < 1
    means the buffer holds fewer slots than assignments (OpenMoE's capacity drops some),
    > 1 empty slots travel too (dropless: padding = E/k). Four exchanges per layer:
    dispatch and combine, forward and backward. Returns ``per_exchange``, ``per_step``
    (all MoE layers, 4 exchanges), ``padding``, ``remote_fraction`` is (P-1)/P of it and
    is left to the caller (it depends on P).
    """
    g = seq_len if cfg.group_size is None else min(cfg.group_size, tokens_per_rank)
    cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
    c = routing.capacity(g, cfg.n_experts, cfg.top_k, cf, cfg.min_capacity, cfg.capacity_mode)
    item = np.dtype(cfg.dtype).itemsize if itemsize is None else itemsize
    padding = cfg.n_experts * c / (cfg.top_k * g)
    per_exchange = tokens_per_rank * cfg.top_k * cfg.d_model * item * padding
    n_moe = len(cfg.moe_layers)
    return {"per_exchange": per_exchange, "per_step": 4 * n_moe * per_exchange,
            "padding": padding, "capacity": c, "group": g, "moe_layers": n_moe}


def project_step(cfg: Any, machines: int, tokens_per_machine: int, seq_len: int, *,
                 flops_per_s: float, bandwidth: float, latency: float, mode: str = "expert",
                 itemsize: int = 2, grad_itemsize: int = 4) -> dict[str, float]:
    """Projected seconds of one training step on ``machines`` ranks (one per machine),
    as the sum of compute and communication (no overlap: an upper bound on time).

    compute   = 6 * N_active * tokens / flops_per_s   (forward + backward matmuls)
    alltoall  = 4 * L_moe * [(P-1)/P * V_exchange / bandwidth + (P-1) * latency]
                (expert mode; V_exchange from :func:`exchange_bytes_per_step`)
    allreduce = 2 (P-1)/P * W * grad_itemsize / bandwidth + 2 (P-1) * latency  (ring)
                W = the replicated parameters (expert mode: all but the experts;
                data mode: all of them)
    memory    = bytes of weights + grads + AdamW state (m, v) per rank, float32
    """
    from tinymoe.config import count_parameters  # noqa: PLC0415
    p = machines
    counts = count_parameters(cfg)
    compute = 6 * counts["active"] * tokens_per_machine / flops_per_s
    if mode == "expert" and p > 1:
        v = exchange_bytes_per_step(cfg, tokens_per_machine, seq_len, itemsize)
        n_msgs = 4 * v["moe_layers"]
        a2a = n_msgs * ((p - 1) / p * v["per_exchange"] / bandwidth + (p - 1) * latency)
        a2a_bytes = (p - 1) / p * v["per_step"]
        replicated = counts["total"] - counts["experts"]
        held = replicated + counts["experts"] / p
    else:
        a2a = a2a_bytes = 0.0
        replicated = counts["total"]
        held = counts["total"]
    ar = (2 * (p - 1) / p * replicated * grad_itemsize / bandwidth + 2 * (p - 1) * latency) if p > 1 else 0.0
    return {"compute_s": compute, "alltoall_s": a2a, "allreduce_s": ar,
            "step_s": compute + a2a + ar, "alltoall_bytes": a2a_bytes,
            "allreduce_bytes": 2 * (p - 1) / p * replicated * grad_itemsize if p > 1 else 0.0,
            "params_per_rank": held, "memory_bytes_per_rank": held * 4 * 4,
            "tokens_per_s": p * tokens_per_machine / (compute + a2a + ar)}
