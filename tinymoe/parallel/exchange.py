"""The two exchanges of expert parallelism, as autograd Functions.

Each rank fills the fixed-capacity dispatch buffer ``[E, R, d]`` (R = n_groups * C rows per
expert) and sends expert e's rows to e's owner with one ``Alltoall`` (:class:`ToOwners`);
the owner's outputs come back with a second ``Alltoall`` (:class:`ToSources`). The backward
pass mirrors both exchanges (the adjoint of an all-to-all is the same all-to-all with the
roles of sender and receiver swapped). Because the capacity C is fixed, every rank knows in
advance how many bytes go to every other rank: the exchange is static, a plain ``Alltoall``.
"""
from __future__ import annotations

from typing import Any

from tinymoe.autograd import Context, Function, Tensor
from tinymoe.parallel.comm import Comm


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
