"""Collecting routing: run a model on token windows, or read the trainer's snapshots.

:func:`token_windows` cuts held-out tokens into model inputs; :func:`collect_routing`
runs the model (eval mode, no gradients, optionally under other routing settings via
:func:`routing_settings`) and returns a :class:`RoutingTrace` of host arrays, the input
of every measure in :mod:`.measures`; :func:`load_snapshots` reads the routing snapshots
the trainer writes with ``--snapshot-every`` (input of :func:`.measures.early_routing`).
The only module of the package that runs a model or reads routing from files.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tinymoe import backend as B
from tinymoe.analysis.measures import position_in_group
from tinymoe.checkpoint import read_npz

np = B.np

__all__ = ["RoutingTrace", "routing_settings", "collect_routing", "load_snapshots",
           "token_windows"]

Array = Any


@dataclass
class RoutingTrace:
    """Routing of many tokens by one model under one setting, as host arrays.

    Per token [N]: ``token_ids``, ``position`` (index in its sequence), ``group_pos``
    (index in its routing group), ``domain`` (index into ``domain_names``), ``window``
    (which input window). Per MoE layer (``layers`` = block indices): ``expert_index``
    [N, k] and ``kept`` [N, k]. ``group_len`` = positions per group, ``ce`` = mean
    next-token cross-entropy over the tokens, ``token_ce`` [N] each token's own
    cross-entropy (``-log softmax(logits)[target]``, computed here from the logits the
    model returns; for the loss cost of drops per position).
    """

    token_ids: Array
    position: Array
    group_pos: Array
    domain: Array
    window: Array
    layers: list[int]
    expert_index: list[Array]
    kept: list[Array]
    n_experts: int
    top_k: int
    group_len: int
    domain_names: list[str] = field(default_factory=list)
    ce: float = float("nan")
    token_ce: Array | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.size)

    def all_kept(self) -> Array:
        """kept of every layer side by side: [N, n_layers * k] (for drops over all layers)."""
        return np.concatenate(self.kept, axis=1)


_ROUTING_FIELDS = ("capacity_factor", "eval_capacity_factor", "slot_priority", "group_size",
                   "min_capacity", "capacity_mode")


@contextlib.contextmanager
def routing_settings(model: Any, **overrides: Any) -> Iterator[None]:
    """Temporarily change routing fields of the config the model reads at forward time
    (``eval_capacity_factor``, ``slot_priority`` ...); restored on exit.

    The MoE layers read ``self.cfg`` on every forward (tinymoe.nn.moe.MoE), so this
    evaluates a cure on the loaded weights without copying the model.
    """
    bad = [k for k in overrides if k not in _ROUTING_FIELDS]
    if bad:
        raise ValueError(f"not a routing setting: {', '.join(bad)} "
                         f"(choose from {', '.join(_ROUTING_FIELDS)})")
    cfgs = {id(m.cfg): m.cfg for m in model.modules() if hasattr(m, "cfg")}
    saved = [(c, {k: getattr(c, k) for k in overrides}) for c in cfgs.values()]
    try:
        for c, _ in saved:
            for k, v in overrides.items():
                setattr(c, k, v)
            c.validate()
        yield
    finally:
        for c, old in saved:
            for k, v in old.items():
                setattr(c, k, v)


def _usable_rows(n_rows: int, seq_len: int, group_size: int | None) -> bool:
    """A batch of n_rows sequences can be cut into routing groups (tinymoe.routing)."""
    n = n_rows * seq_len
    return group_size is None or group_size >= n or n % group_size == 0


def collect_routing(model: Any, windows: Array, domain: Array | None = None,
                    batch_size: int = 16, domain_names: Sequence[str] = (),
                    **overrides: Any) -> RoutingTrace:
    """Run ``model`` (eval mode, no gradients) on token windows and keep its routing.

    windows [n, T+1] int: inputs ``w[:, :-1]``, next-token targets ``w[:, 1:]``.
    domain: None, [n] (one domain per window) or [n, T+1] / [n, T] (per token).
    ``overrides``: routing settings for this run (see :func:`routing_settings`); the model
    runs in eval mode, so its capacity factor is ``eval_capacity_factor``.
    A trailing batch whose size does not split into routing groups is left out.
    """
    w = np.asarray(windows, dtype=np.int64)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"windows must be [n, T+1] with T >= 1, got shape {w.shape}")
    n_win, seq = w.shape[0], w.shape[1] - 1
    if domain is None:
        dom = np.zeros((n_win, seq), dtype=np.int64)
    else:
        d = np.asarray(domain, dtype=np.int64)
        dom = (np.broadcast_to(d[:, None], (n_win, seq)) if d.ndim == 1 else d[:, :seq])
    cfg = model.cfg
    parts: dict[str, list[Array]] = {k: [] for k in ("ids", "pos", "gpos", "dom", "win", "ce")}
    experts: dict[int, list[Array]] = {}
    kept: dict[int, list[Array]] = {}
    ce_sum, n_ce, group_len = 0.0, 0, 0
    route_rng = B.default_rng(0)   # slot priority "random": a fixed stream, as the snapshots use
    with model.evaluating(), routing_settings(model, **overrides):   # eval mode, no graph
        for s in range(0, n_win, batch_size):
            rows = w[s: s + batch_size]                               # [b, T+1]
            b = rows.shape[0]
            if not _usable_rows(b, seq, cfg.group_size):
                continue
            out = model(rows[:, :-1], rows[:, 1:], rng=route_rng)   # rng: priority "random"
            ce_sum += float(B.to_numpy(out.ce.data)) * b * seq
            n_ce += b * seq
            gpos = position_in_group(b, seq, cfg.group_size)          # [b*T]
            group_len = max(group_len, int(gpos.max()) + 1)
            parts["ids"].append(rows[:, :-1].reshape(-1))
            parts["pos"].append(np.tile(np.arange(seq, dtype=np.int64), b))
            parts["gpos"].append(gpos)
            parts["dom"].append(dom[s: s + b].reshape(-1))
            parts["win"].append(np.repeat(np.arange(s, s + b, dtype=np.int64), seq))
            parts["ce"].append(_token_ce(B.to_numpy(out.logits.data), rows[:, 1:]))
            for st in out.routing:
                experts.setdefault(st.layer, []).append(B.to_numpy(st.expert_index))
                kept.setdefault(st.layer, []).append(B.to_numpy(st.kept))
    if n_ce == 0:
        raise ValueError(f"no batch of {batch_size} windows of {seq} tokens fits the routing "
                         f"group size {cfg.group_size}")
    layers = sorted(experts)
    return RoutingTrace(
        token_ids=np.concatenate(parts["ids"]), position=np.concatenate(parts["pos"]),
        group_pos=np.concatenate(parts["gpos"]), domain=np.concatenate(parts["dom"]),
        window=np.concatenate(parts["win"]), layers=layers,
        expert_index=[np.concatenate(experts[i]).astype(np.int64) for i in layers],
        kept=[np.concatenate(kept[i]).astype(bool) for i in layers],
        n_experts=cfg.n_experts, top_k=cfg.top_k, group_len=group_len,
        domain_names=list(domain_names), ce=ce_sum / n_ce, token_ce=np.concatenate(parts["ce"]))


def _token_ce(logits: Array, targets: Array) -> Array:
    """Per-token cross-entropy ``logsumexp(z) - z[target]`` in float64: logits [b, T, V],
    targets [b, T] -> [b*T]."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])   # [b*T, V]
    t = np.asarray(targets, dtype=np.int64).reshape(-1)                     # [b*T]
    m = z.max(axis=1)                                                       # [b*T]
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))                    # [b*T]
    return lse - z[np.arange(t.size), t]                                    # [b*T]


_SNAPSHOT_RE = re.compile(r"step_?(\d+)\.npz$")


def load_snapshots(folder: str | Path) -> list[dict[str, Any]]:
    """Routing snapshots written by the trainer (``<out_dir>/snapshots/step_N.npz``).

    Trainer format (tinymoe.train): ``step``, ``tokens`` [N, T] (the fixed probe batch),
    ``layers`` [L] (block indices), ``expert_index`` [L, N, T, k], ``top1`` [L, N, T],
    ``kept``, ``probs_top1``, ``domain``. Also accepted: ``token_ids`` / ``ids`` for the
    tokens and one array per layer named ``experts_<layer>`` (or ``layer_<layer>``,
    ``expert_index_<layer>``, ``top1_<layer>``). The step comes from ``step`` or the file
    name. Returns dicts for :func:`early_routing` (``step``, ``token_ids`` [N*T],
    ``experts`` {layer: [N*T, k]}, ``sequence`` [N*T] = probe row of each token, ``path``),
    sorted by step.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.npz") if _SNAPSHOT_RE.search(p.name))
    snaps = []
    for p in files:
        data = read_npz(p, kind="routing snapshot")   # damaged file: one-line CheckpointError
        ids = next((data[k] for k in ("tokens", "token_ids", "ids") if k in data), None)
        if ids is None:
            raise ValueError(f"{p}: routing snapshot has no token_ids")
        per_layer: dict[int, Array] = {}
        for k, v in data.items():
            m = re.fullmatch(r"(?:experts|layer|expert_index|top1)_(\d+)", k)
            if m:
                per_layer[int(m.group(1))] = v
        if not per_layer:
            stacked = next((data[k] for k in ("expert_index", "experts", "top1") if k in data),
                           None)
            if stacked is None:
                raise ValueError(f"{p}: routing snapshot has no expert arrays")
            layer_ids = (data["layers"].tolist() if "layers" in data
                         else list(range(stacked.shape[0])))
            per_layer = {int(layer): stacked[j] for j, layer in enumerate(layer_ids)}
        ids = np.asarray(ids)
        # probe sequence of each token: the rows of a [N, T] probe (units of the
        # intervals and of the split halves); one unit per token for a flat probe
        seq = (np.repeat(np.arange(ids.shape[0]), ids.shape[1]) if ids.ndim == 2
               else np.arange(ids.size))
        ids = ids.reshape(-1)
        per_layer = {k: np.asarray(v).reshape(ids.size, -1) for k, v in per_layer.items()}
        step = int(data["step"]) if "step" in data else int(_SNAPSHOT_RE.search(p.name).group(1))
        snaps.append({"step": step, "token_ids": ids, "experts": per_layer, "sequence": seq,
                      "path": str(p)})
    return sorted(snaps, key=lambda s: s["step"])


def token_windows(tokens: Array, seq_len: int, n_windows: int) -> Array:
    """Up to ``n_windows`` non-overlapping windows [n, T+1] of a 1-D token array, spread
    evenly over it (tinymoe.data.eval_batches): inputs and the next-token target of each."""
    from tinymoe.data import eval_batches  # noqa: PLC0415

    batch = next(eval_batches(tokens, batch_size=max(n_windows, 1), seq_len=seq_len,
                              max_batches=1))
    return np.concatenate([batch.x, batch.y[:, -1:]], axis=1)             # [n, T+1]
