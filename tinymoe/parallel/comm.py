"""The communicator of MPI training: :class:`Comm` wraps an mpi4py communicator (the MPI
calls, host staging, byte and time counts), :func:`mpi_world_size` reads the number of ranks
before MPI is touched, :class:`ParallelError` is the one-line setup error.

mpi4py is imported only inside ``Comm()``: importing this module (or ``tinymoe.parallel``)
never initialises MPI.

GPUs (CuPy): every buffer is staged through host memory (``.get()`` before the MPI call,
back to the device after) unless the MPI library reports CUDA-aware support
(``MPI.Query_cuda_support()``), in which case the device arrays are passed directly.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from tinymoe import backend as B

np = B.np


class ParallelError(ValueError):
    """A setup error: one line (without mpiexec: exit status 2; under mpiexec every rank
    reports it and the job aborts)."""


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
