"""The expert-parallel MoE layer (``mode="expert"``).

The E experts of every MoE layer are sharded, rank r owns experts
``r*E/P ... (r+1)*E/P - 1``; every other parameter is replicated (its gradient is averaged
over the ranks, :mod:`tinymoe.parallel.hooks`). Each rank routes its own groups, fills the
fixed-capacity dispatch buffer ``[E, R, d]`` (R = n_groups * C rows per expert) and sends
expert e's rows to e's owner with one ``Alltoall``; the owner runs its experts on the filled
rows of ``[E/P, P*R, d]`` (all ranks' rows; which are filled it learns from a
one-byte-per-row mask sent alongside) with grouped GEMMs, as one process does, and returns
the outputs with a second ``Alltoall`` (:mod:`tinymoe.parallel.exchange`). Dropless routing
(``capacity_factor=None``) sets C = G, so the exchange is static too, at the price of a
buffer E/k times larger than the tokens (counted by :class:`~tinymoe.parallel.comm.Comm`).

Holds :class:`ExpertParallelMoE`, :func:`shard_experts` (puts it in a model) and
:func:`is_expert_param` (which parameter names are sharded).
"""
from __future__ import annotations

from typing import Any

from tinymoe import backend as B
from tinymoe import routing
from tinymoe.autograd import Tensor
from tinymoe.nn.module import Module, Parameter
from tinymoe.nn.moe import MoE, MoEStats, Experts, combine, dispatch, gather_rows, route_layer
from tinymoe.parallel.comm import Comm, ParallelError
from tinymoe.parallel.exchange import _to_owners, exchange_to_owners, exchange_to_sources


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
