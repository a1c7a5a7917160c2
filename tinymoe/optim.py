"""Optimizers, learning-rate schedules and gradient clipping, on plain arrays.

The optimizers follow the PyTorch API: ``opt = AdamW(model.parameters(), lr=3e-4)``, then
per step ``opt.zero_grad(); loss.backward(); opt.step()``. A *parameter* is any object with

- ``.data``: an array (NumPy or CuPy, float32 or float64) that the optimizer updates
  **in place** (``p.data`` is never rebound, so views and tied weights stay shared), and
- ``.grad``: an array of the same shape, or ``None`` (that parameter is skipped this step).

``params`` may also be a list of *param groups*, dicts ``{"params": [...], "lr": ...,
"weight_decay": ...}`` whose keys override the optimizer's defaults for those parameters
(``param_groups_for_decay`` builds the usual "decay matrices, not norms" split). A
schedule changes the learning rate between steps by writing ``group["lr"]``
(``set_lr(opt, inverse_sqrt(step))``).

Gradient accumulation needs no helper: gradients *add* on every ``backward()``, so run
``n`` micro-batches, each loss divided by ``n`` (or call ``scale_grads_(params, 1 / n)``
once afterwards), then ``clip_grad_norm_`` and ``step()`` once, then ``zero_grad()``.

Contents

- ``Optimizer``: param groups, ``zero_grad``, ``state_dict`` / ``load_state_dict``
  (host NumPy arrays, ready for a checkpoint).
- ``AdamW``: Loshchilov & Hutter 2019, exactly as ``torch.optim.AdamW``.
- ``Adafactor``: Shazeer & Stern 2018, as OpenMoE / T5X used it (factored second moments,
  update clipping, relative step, parameter scaling, no momentum).
- ``configure_optimizers(model, cfg)``: the optimizer of a training run, built one way for
  train, bench and the lessons (nanoGPT's ``configure_optimizers``).
- schedules ``warmup_cosine``, ``inverse_sqrt`` (OpenMoE), ``constant``; ``set_lr``.
- ``clip_grad_norm_`` (global L2 norm, like ``torch.nn.utils.clip_grad_norm_``),
  ``scale_grads_``.

All arithmetic stays in the parameter's dtype: optimizer state has the parameter's dtype
and every scalar is a Python float or a 0-d array of that dtype (no silent float64).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from tinymoe import backend as B

__all__ = [
    "Optimizer", "AdamW", "Adafactor", "param_groups_for_decay", "configure_optimizers",
    "OPTIMIZERS",
    "warmup_cosine", "inverse_sqrt", "constant", "set_lr",
    "clip_grad_norm_", "scale_grads_",
]


def _sum_sq(a: Any) -> Any:
    """sum(a**2) as a 0-d value of ``a``'s dtype, without a full-size temporary."""
    xp = B.array_module(a)
    flat = a.ravel()  # a view for contiguous arrays
    return xp.vdot(flat, flat)


def _rms(a: Any) -> Any:
    """Root mean square sqrt(mean(a**2)), 0-d, in ``a``'s dtype."""
    xp = B.array_module(a)
    return xp.sqrt(_sum_sq(a) / a.size)


# --------------------------------------------------------------------------- base class


class Optimizer:
    """Base class: holds param groups and per-parameter state; subclasses write
    ``update_one`` (DeZero's ``update`` -> ``update_one`` split): :meth:`step` walks the
    parameters that have a gradient, checks their group's hyperparameters, creates their
    state on the first step, counts the step and calls ``update_one(p, group, state)``.

    ``params``: an iterable of parameters, or of dicts ``{"params": [...], **overrides}``.
    ``defaults``: the hyperparameters (every key a group may override).
    ``self.state[i]``: a dict of arrays for parameter number ``i`` (numbered across all
    groups in order), created lazily on its first step. ``self.steps`` counts ``step()``
    calls.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[int, dict[str, Any]] = {}
        self.steps = 0
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if all(isinstance(g, dict) for g in items):
            groups = items
        elif any(isinstance(g, dict) for g in items):
            raise TypeError("params mixes parameters and param-group dicts; use one kind")
        else:
            groups = [{"params": items}]
        seen: set[int] = set()
        for gi, g in enumerate(groups):
            if "params" not in g:
                raise ValueError(f"param group {gi} has no 'params' key")
            unknown = sorted(set(g) - set(self.defaults) - {"params"})
            if unknown:
                raise ValueError(
                    f"param group {gi} has unknown keys {unknown}; allowed: {sorted(self.defaults)}"
                )
            group = {**self.defaults, **{k: v for k, v in g.items() if k != "params"}}
            ps = [g["params"]] if hasattr(g["params"], "data") else list(g["params"])
            for p in ps:
                if not (hasattr(p, "data") and hasattr(p, "grad")):
                    raise TypeError(
                        f"param group {gi}: expected parameters with .data and .grad, "
                        f"got {type(p).__name__}"
                    )
                if id(p) in seen:
                    raise ValueError(f"param group {gi}: a parameter appears more than once")
                seen.add(id(p))
            group["params"] = ps
            self._check_group(group)
            self.param_groups.append(group)

    # subclasses validate their hyperparameters here
    def _check_group(self, group: dict[str, Any]) -> None:
        pass

    def _indexed_params(self) -> Iterable[tuple[int, dict[str, Any], Any]]:
        """(index, group, parameter) over all groups, indices numbered in order."""
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, group, p
                i += 1

    def zero_grad(self) -> None:
        """Forget all gradients (``p.grad = None``), ready for the next accumulation."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        """One update of every parameter that has a gradient (``p.grad is None``: skipped)."""
        self.steps += 1
        for i, group, p in self._indexed_params():
            if p.grad is None:
                continue
            self._check_group(group)  # lr may have been set by a schedule
            s = self.state.get(i)
            if s is None:
                xp = B.array_module(p.data)
                s = self.state[i] = {"step": 0}
                for k, shape in self._expected_state_shapes(p, group).items():
                    s[k] = xp.zeros(shape, dtype=p.data.dtype)
            s["step"] += 1
            self.update_one(p, group, s)

    def update_one(self, p: Any, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Update ``p.data`` in place from ``p.grad``; ``state["step"]`` is already counted."""
        raise NotImplementedError

    # ---- checkpointing

    def _expected_state_shapes(self, p: Any, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Array name -> shape of the state this optimizer keeps for ``p`` (besides "step")."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """A checkpointable copy: ``{"type", "steps", "param_groups", "state"}``.

        ``param_groups``: the hyperparameters of each group (tuples as lists) with
        ``"params"`` replaced by the parameter indices. ``state``: ``{index: {"step": int,
        name: host NumPy array}}`` for every parameter that has been stepped.
        """
        groups = []
        for group in self.param_groups:
            g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            groups.append(g)
        index = 0
        for g, group in zip(groups, self.param_groups):
            g["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
        state = {
            i: {k: (int(v) if k == "step" else B.to_numpy(v).copy()) for k, v in s.items()}
            for i, s in self.state.items()
        }
        return {"type": type(self).__name__, "steps": int(self.steps),
                "param_groups": groups, "state": state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore hyperparameters, step counts and state saved by ``state_dict``.

        The parameters themselves are this optimizer's; only their count, grouping and
        shapes must match. Everything is checked before anything is changed, so a bad
        state dict raises a one-line ``ValueError`` and leaves the optimizer as it was.
        """
        name = type(self).__name__
        if not isinstance(sd, dict) or not {"param_groups", "state"} <= set(sd):
            raise ValueError(f"{name}.load_state_dict: not an optimizer state dict "
                             "(needs keys 'param_groups' and 'state')")
        if sd.get("type", name) != name:
            raise ValueError(f"{name}.load_state_dict: state dict is from {sd['type']}, not {name}")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: {len(groups)} param groups saved, "
                             f"optimizer has {len(self.param_groups)}")
        for gi, (g, group) in enumerate(zip(groups, self.param_groups)):
            if len(g.get("params", [])) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: param group {gi} saved "
                                 f"{len(g.get('params', []))} params, optimizer has {len(group['params'])}")
            unknown = sorted(set(g) - set(self.defaults) - {"params"})
            if unknown:
                raise ValueError(f"{name}.load_state_dict: param group {gi} has unknown keys {unknown}")
        # index -> (parameter, merged hyperparameters of its saved group)
        slots: dict[int, tuple[Any, dict[str, Any]]] = {}
        merged_groups = []
        i = 0
        for g, group in zip(groups, self.param_groups):
            merged = dict(group)
            for k, v in g.items():
                if k != "params":
                    merged[k] = tuple(v) if isinstance(self.defaults.get(k), tuple) else v
            try:
                self._check_group(merged)
            except ValueError as e:
                raise ValueError(f"{name}.load_state_dict: saved hyperparameters invalid: {e}") from None
            merged_groups.append(merged)
            for p in group["params"]:
                slots[i] = (p, merged)
                i += 1
        new_state: dict[int, dict[str, Any]] = {}
        for key, s in sd["state"].items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"{name}.load_state_dict: state key {key!r} is not a parameter index") from None
            if i not in slots:
                raise ValueError(f"{name}.load_state_dict: state for parameter {i}, "
                                 f"but the optimizer has {len(slots)} parameters")
            p, merged = slots[i]
            expected = self._expected_state_shapes(p, merged)
            if not isinstance(s, dict) or "step" not in s or set(s) - {"step"} != set(expected):
                got = sorted(s) if isinstance(s, dict) else type(s).__name__
                raise ValueError(f"{name}.load_state_dict: parameter {i} {tuple(p.data.shape)} has state "
                                 f"keys {got}, expected {sorted(['step', *expected])}")
            xp = B.array_module(p.data)
            entry: dict[str, Any] = {"step": int(s["step"])}
            for k, shape in expected.items():
                arr = B.to_numpy(s[k])
                if tuple(arr.shape) != shape:
                    raise ValueError(f"{name}.load_state_dict: parameter {i} state {k!r} has shape "
                                     f"{tuple(arr.shape)}, expected {shape}")
                entry[k] = xp.array(arr, dtype=p.data.dtype)  # a fresh copy on p's device
            new_state[i] = entry
        # all checks passed: commit
        for merged, group in zip(merged_groups, self.param_groups):
            group.update(merged)
        self.state = new_state
        self.steps = int(sd.get("steps", 0))

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for gi, group in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in group.items() if k != "params")
            lines.append(f"  group {gi}: {len(group['params'])} params, {hp}")
        return "\n".join(lines) + "\n)"


# --------------------------------------------------------------------------- AdamW


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2), exactly
    as ``torch.optim.AdamW`` (amsgrad off). For each parameter p with gradient g, step t:

        p   <- p * (1 - lr * wd)                    decoupled weight decay
        m   <- b1 * m + (1 - b1) * g                first moment
        v   <- b2 * v + (1 - b2) * g^2              second moment
        m^  =  m / (1 - b1^t),  v^ = v / (1 - b2^t) bias correction
        p   <- p - lr * m^ / (sqrt(v^) + eps)

    State per parameter: ``exp_avg`` (m) and ``exp_avg_sq`` (v), each the parameter's
    shape: 2x the parameter memory. The update runs in cache-sized chunks with one
    chunk-sized scratch buffer (see ``_adamw_update``).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    def _check_group(self, group: dict[str, Any]) -> None:
        b1, b2 = group["betas"]
        if group["lr"] is None or group["lr"] < 0:
            raise ValueError(f"AdamW: invalid lr={group['lr']} (needs a number >= 0)")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"AdamW: invalid betas={group['betas']} (each in [0, 1))")
        if group["eps"] < 0:
            raise ValueError(f"AdamW: invalid eps={group['eps']} (needs >= 0)")
        if group["weight_decay"] < 0:
            raise ValueError(f"AdamW: invalid weight_decay={group['weight_decay']} (needs >= 0)")

    def _expected_state_shapes(self, p: Any, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        shape = tuple(p.data.shape)
        return {"exp_avg": shape, "exp_avg_sq": shape}

    def update_one(self, p: Any, group: dict[str, Any], s: dict[str, Any]) -> None:
        """One AdamW update of ``p`` (step ``s["step"]``, moments ``s["exp_avg"]``,
        ``s["exp_avg_sq"]``)."""
        g = p.grad
        xp = B.array_module(p.data)
        lr = float(group["lr"])
        b1, b2 = (float(b) for b in group["betas"])
        eps, wd = float(group["eps"]), float(group["weight_decay"])
        t = s["step"]
        bias_correction1 = 1.0 - b1 ** t
        bias_correction2 = 1.0 - b2 ** t
        coef = _AdamCoef(decay=1.0 - lr * wd, b1=b1, b2=b2, eps=eps, step_size=lr / bias_correction1,
                         sqrt_bc2=math.sqrt(bias_correction2))
        arrays = (p.data, s["exp_avg"], s["exp_avg_sq"])
        if xp is B.np and all(a.flags.c_contiguous for a in arrays):
            # NumPy: update in chunks of _CHUNK elements, so the ~10 passes over one chunk
            # stay in the CPU cache instead of 10 trips to memory per parameter, and the
            # scratch buffer is one chunk instead of a parameter-sized array (787 MB for
            # the openmoe-base embedding). (On a GPU one whole-array pass is best.)
            # The chunks are spread over threads (B.parallel_rows), one scratch per range.
            pf, mf, vf = (a.reshape(-1) for a in arrays)    # views of contiguous arrays
            gf = g.reshape(-1)                               # a view, or a copy if g is strided
            _chunked_adamw(xp, pf, gf, mf, vf, coef)
        else:
            _adamw_update(xp, p.data, g, s["exp_avg"], s["exp_avg_sq"], xp.empty_like(p.data), coef)


_CHUNK = 1 << 16   # elements per optimizer chunk: 256 KB in float32, 5 arrays fit in L2/L3


def _chunked_adamw(xp: Any, p: Any, g: Any, m: Any, v: Any, coef: "_AdamCoef") -> None:
    """``_adamw_update`` on flat arrays, chunk by chunk; ranges of chunks run on threads."""
    size = p.size

    def kernel(first: int, last: int) -> None:                # chunk indices [first, last)
        tmp = xp.empty(min(_CHUNK, size), dtype=p.dtype)       # this range's scratch
        for c in range(first, last):
            lo, hi = c * _CHUNK, min((c + 1) * _CHUNK, size)
            _adamw_update(xp, p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], tmp[:hi - lo], coef)

    B.parallel_rows(kernel, -(-size // _CHUNK))                # ceil(size / _CHUNK) chunks


class _AdamCoef:
    """The scalars of one AdamW update (Python floats: no float64 arrays reach the data)."""

    __slots__ = ("decay", "b1", "b2", "eps", "step_size", "sqrt_bc2")

    def __init__(self, decay: float, b1: float, b2: float, eps: float, step_size: float, sqrt_bc2: float):
        self.decay, self.b1, self.b2, self.eps = decay, b1, b2, eps
        self.step_size, self.sqrt_bc2 = step_size, sqrt_bc2


def _adamw_update(xp: Any, p: Any, g: Any, m: Any, v: Any, tmp: Any, c: _AdamCoef) -> None:
    """In-place AdamW on arrays of one shape (a whole parameter or a chunk of it):
    p <- p (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    p <- p - step_size * m / (sqrt(v) / sqrt(bc2) + eps), with ``tmp`` as the only scratch.
    (The division by sqrt(bc2) is kept, not a multiply, to round exactly as torch does.)"""
    if c.decay != 1.0:                                   # (lr * wd != 0)
        p *= c.decay                                     # decoupled decay
    xp.subtract(g, m, out=tmp)                           # m <- m + (1-b1)(g - m)
    tmp *= 1.0 - c.b1
    m += tmp
    v *= c.b2                                            # v <- b2 v + (1-b2) g^2
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - c.b2
    v += tmp
    xp.sqrt(v, out=tmp)                                  # denom = sqrt(v^) + eps
    tmp /= c.sqrt_bc2
    tmp += c.eps
    xp.divide(m, tmp, out=tmp)                           # m / denom
    tmp *= c.step_size
    p -= tmp


def param_groups_for_decay(named_params: Iterable[tuple[str, Any]],
                           weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters into a decayed and a non-decayed group (nanoGPT convention).

    Tensors with ``ndim >= 2`` (matrices, embeddings, expert weights [E, d, f]) get
    ``weight_decay``; tensors with ``ndim < 2`` (norm scales, biases) get 0. A parameter
    yielded twice (tied weights) is kept once. Empty groups are left out.
    """
    decay: list[Any] = []
    no_decay: list[Any] = []
    seen: set[int] = set()
    for _name, p in named_params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.data.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


OPTIMIZERS = ("adamw", "adafactor")


def configure_optimizers(model: Any, cfg: Any) -> Optimizer:
    """The optimizer of a training run (nanoGPT's ``configure_optimizers``).

    ``model``: anything with ``named_parameters()``. ``cfg``: anything with ``.optimizer``
    (one of OPTIMIZERS), ``.lr``, ``.weight_decay``, ``.adam_beta1``, ``.adam_beta2`` (a
    :class:`tinymoe.train.TrainConfig`, or a ``types.SimpleNamespace`` in a lesson).
    Weight decay applies to matrices only (:func:`param_groups_for_decay`), and

    - ``"adamw"``: AdamW(lr, betas=(adam_beta1, adam_beta2), eps=1e-8);
    - ``"adafactor"``: Adafactor as OpenMoE ran it: decay rate 0.8, no momentum, update
      clipping 1.0, parameter scaling, the given lr (no relative step), decoupled weight
      decay.
    """
    groups = param_groups_for_decay(model.named_parameters(), cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8)
    if cfg.optimizer == "adafactor":
        return Adafactor(groups, lr=cfg.lr, decay_rate=0.8, beta1=None,
                         clip_threshold=1.0, scale_parameter=True, relative_step=False,
                         weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer={cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


# --------------------------------------------------------------------------- Adafactor


class Adafactor(Optimizer):
    """Adafactor (Shazeer & Stern 2018), as OpenMoE trained with it through T5X
    (``t5x/adafactor.py``; docs/openmoe-facts.md §10).

    Every statistic below is taken over the *averaging dims* of a parameter: all its dims
    for a vector or a matrix, the last two for a stacked tensor [E, r, c] (T5X names the
    expert axis a batch axis: each expert matrix has its own scale, clipping and factored
    second moment, exactly as if the E matrices were separate parameters).

    For a parameter X with gradient G at step t (per parameter, counted from 1):

    - relative step size (section 8, Algorithm 4 line 2): when ``lr`` is None,
          rho_t = min(1e-2, 1 / sqrt(t))   (``warmup_init``: min(1e-6 * t, 1 / sqrt(t)));
      otherwise rho_t = lr (e.g. OpenMoE's schedule 1 / sqrt(max(step, 1e4)), see
      ``inverse_sqrt``).
    - parameter scale (section 8): alpha_t = max(eps2, RMS(X_{t-1})) * rho_t when
      ``scale_parameter`` (one alpha per expert for [E, r, c]), else alpha_t = rho_t.
    - decay (section 7.2): beta2_t = 1 - t^(-decay_rate), decay_rate 0.8; beta2_1 = 0
      (T5X counts steps from 0 and writes 1 - (t + 1)^(-0.8): the same numbers).
    - second moment, factored (Algorithm 4): with G2 = G^2 + eps1,
          R_t = beta2_t R_{t-1} + (1 - beta2_t) rowmean(G2)     [..., r]
          C_t = beta2_t C_{t-1} + (1 - beta2_t) colmean(G2)     [..., c]
          V_t = (R_t / mean(R_t)) outer C_t                     [..., r, c]
      The paper writes row/column *sums* and V = R C / (1^T R); with means the result
      is identical and the numbers stay of the order of G^2. Which tensors (T5X's rules):
      a matrix when its smaller dim is >= ``min_dim_size_to_factor`` (128; the heuristic
      rule, A:366-385), a stacked expert tensor [E, r, c] always, whatever r and c (the
      explicit rule ``expert -> BATCH``, A:396-398), with per-expert R [E, r], C [E, c].
      Unfactored (Algorithm 5, vectors and small matrices):
          V_t = beta2_t V_{t-1} + (1 - beta2_t) G2.
    - update and clipping (section 7.1): U_t = G / sqrt(V_t),
          U^_t = U_t / max(1, RMS(U_t) / clip_threshold)        (RMS per expert for [E, r, c])
    - optional momentum (T5X ordering, on the scaled update): M = beta1 M + (1 - beta1) alpha_t U^_t.
    - optional decoupled weight decay: X <- X (1 - alpha_t weight_decay) (tinymoe's
      convention, scaled by the step size; T5X's ``weight_decay_rate`` is not, and OpenMoE
      used none).
    - X_t = X_{t-1} - alpha_t U^_t  (or - M with momentum).

    Memory: a factored [r, c] matrix keeps r + c numbers (E (r + c) for [E, r, c]),
    unfactored tensors keep one number per element, momentum doubles the parameter.
    """

    def __init__(self, params: Iterable[Any], lr: float | None = None, decay_rate: float = 0.8,
                 beta1: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, scale_parameter: bool = True,
                 relative_step: bool = True, warmup_init: bool = False,
                 weight_decay: float = 0.0, min_dim_size_to_factor: int = 128) -> None:
        super().__init__(params, {
            "lr": lr, "decay_rate": decay_rate, "beta1": beta1, "eps": tuple(eps),
            "clip_threshold": clip_threshold, "scale_parameter": scale_parameter,
            "relative_step": relative_step, "warmup_init": warmup_init,
            "weight_decay": weight_decay, "min_dim_size_to_factor": min_dim_size_to_factor,
        })

    def _check_group(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        if lr is None and not group["relative_step"]:
            raise ValueError("Adafactor: lr=None needs relative_step=True (or give an lr)")
        if lr is not None and lr < 0:
            raise ValueError(f"Adafactor: invalid lr={lr} (needs >= 0 or None)")
        if group["decay_rate"] <= 0:
            raise ValueError(f"Adafactor: invalid decay_rate={group['decay_rate']} (needs > 0)")
        if group["beta1"] is not None and not 0.0 <= group["beta1"] < 1.0:
            raise ValueError(f"Adafactor: invalid beta1={group['beta1']} (None or in [0, 1))")
        if len(group["eps"]) != 2 or min(group["eps"]) < 0:
            raise ValueError(f"Adafactor: invalid eps={group['eps']} (needs (eps1, eps2) >= 0)")
        if group["clip_threshold"] is not None and group["clip_threshold"] <= 0:
            raise ValueError(f"Adafactor: invalid clip_threshold={group['clip_threshold']} (> 0 or None)")
        if group["weight_decay"] < 0:
            raise ValueError(f"Adafactor: invalid weight_decay={group['weight_decay']} (needs >= 0)")

    @staticmethod
    def is_factored(shape: tuple[int, ...], min_dim_size_to_factor: int = 128) -> bool:
        """True when the second moment of a tensor of this shape is stored factored:
        a stacked tensor [E, r, c] (ndim >= 3) always, a matrix when both dims are
        >= ``min_dim_size_to_factor``, a vector never (T5X's rules)."""
        if len(shape) >= 3:
            return True
        return len(shape) == 2 and min(shape) >= min_dim_size_to_factor

    def _expected_state_shapes(self, p: Any, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        shape = tuple(p.data.shape)
        out: dict[str, tuple[int, ...]]
        if self.is_factored(shape, group["min_dim_size_to_factor"]):
            out = {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
        else:
            out = {"exp_avg_sq": shape}
        if group["beta1"] is not None:
            out["exp_avg"] = shape
        return out

    def state_size(self) -> int:
        """Number of array elements held in optimizer state (for memory reports)."""
        return sum(int(a.size) for s in self.state.values() for k, a in s.items() if k != "step")

    def update_one(self, p: Any, group: dict[str, Any], s: dict[str, Any]) -> None:
        """One Adafactor update of ``p`` (step ``s["step"]``, second-moment statistics and
        optional momentum in ``s``)."""
        g = p.grad
        xp = B.array_module(p.data)
        t = s["step"]
        eps1, eps2 = (float(e) for e in group["eps"])
        # the RMS over the averaging dims: whole tensor, or per expert matrix of [E, r, c]
        rms = _rms if p.data.ndim <= 2 else _rms_per_matrix

        # step size alpha_t (0-d, or [E, 1, 1] per expert; p's dtype)
        if group["lr"] is None:
            min_step = 1e-6 * t if group["warmup_init"] else 1e-2
            rho = min(min_step, 1.0 / math.sqrt(t))
        else:
            rho = float(group["lr"])
        if group["scale_parameter"]:
            alpha = xp.maximum(eps2, rms(p.data)) * rho
        else:
            alpha = xp.asarray(rho, dtype=p.data.dtype)
        beta2 = 1.0 - t ** (-float(group["decay_rate"]))

        # G2 = G^2 + eps1, then the second-moment estimate; u becomes U = G / sqrt(V)
        u = xp.multiply(g, g)                                  # [..., r, c]
        u += eps1
        if "exp_avg_sq_row" in s:
            row, col = s["exp_avg_sq_row"], s["exp_avg_sq_col"]
            row *= beta2
            row += (1.0 - beta2) * u.mean(axis=-1)             # [..., r, c] -> [..., r]
            col *= beta2
            col += (1.0 - beta2) * u.mean(axis=-2)             # [..., r, c] -> [..., c]
            # 1/sqrt(V) = 1/sqrt(R / mean(R)) * 1/sqrt(C), V never built in full
            row_factor = xp.sqrt(row.mean(axis=-1, keepdims=True) / row)   # [..., r]
            col_factor = 1.0 / xp.sqrt(col)                                 # [..., c]
            xp.multiply(g, row_factor[..., :, None], out=u)    # [..., r, c]
            u *= col_factor[..., None, :]
        else:
            v = s["exp_avg_sq"]
            v *= beta2
            u *= 1.0 - beta2
            v += u
            xp.sqrt(v, out=u)
            xp.divide(g, u, out=u)

        # update clipping: U^ = U / max(1, RMS(U) / d)
        if group["clip_threshold"] is not None:
            u /= xp.maximum(1.0, rms(u) / float(group["clip_threshold"]))
        u *= alpha                                             # alpha_t U^
        if group["beta1"] is not None:
            b1 = float(group["beta1"])
            m = s["exp_avg"]
            m *= b1
            u *= 1.0 - b1
            m += u
            u = m
        if group["weight_decay"] != 0.0:
            p.data *= 1.0 - alpha * float(group["weight_decay"])
        p.data -= u


def _rms_per_matrix(a: Any) -> Any:
    """RMS of each matrix of a stacked tensor [..., r, c] -> [..., 1, 1], in ``a``'s dtype
    (the per-expert RMS of Adafactor: the expert axis is a batch axis)."""
    xp = B.array_module(a)
    flat = a.reshape(a.shape[:-2] + (-1,))                     # [..., r, c] -> [..., r*c]
    sq = xp.einsum("...i,...i->...", flat, flat)               # [...] sums of squares
    return xp.sqrt(sq / flat.shape[-1])[..., None, None]       # [..., 1, 1]


# --------------------------------------------------------------------------- schedules


def warmup_cosine(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0) -> float:
    """Linear warmup then cosine decay to ``min_lr`` (nanoGPT).

    ``step`` counts updates already taken (0 for the first). Warmup:
    ``base_lr * (step + 1) / (warmup_steps + 1)`` for step < warmup_steps; then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * q)) / 2`` with
    q = (step - warmup_steps) / (total_steps - warmup_steps), so the rate is ``base_lr``
    at ``step == warmup_steps`` and ``min_lr`` from ``step == total_steps`` on.
    """
    if step < 0:
        raise ValueError(f"warmup_cosine: step={step} < 0")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"warmup_cosine: needs 0 <= warmup_steps={warmup_steps} <= total_steps={total_steps}")
    if min_lr < 0 or min_lr > base_lr:
        raise ValueError(f"warmup_cosine: needs 0 <= min_lr={min_lr} <= base_lr={base_lr}")
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return float(min_lr)
    q = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * q))


def inverse_sqrt(step: int, warmup_steps: int = 10_000, scale: float = 1.0) -> float:
    """OpenMoE / T5X ``rsqrt_decay``: ``scale / sqrt(max(step, warmup_steps))``.

    Constant ``scale / sqrt(warmup_steps)`` (0.01 for 1e4) until ``warmup_steps``, then
    decaying as 1 / sqrt(step). A step of 0 with ``warmup_steps=0`` counts as 1.
    """
    if step < 0:
        raise ValueError(f"inverse_sqrt: step={step} < 0")
    if warmup_steps < 0:
        raise ValueError(f"inverse_sqrt: warmup_steps={warmup_steps} < 0")
    return scale / math.sqrt(max(step, warmup_steps, 1))


def constant(step: int, base_lr: float) -> float:
    """The same ``base_lr`` at every step (``step`` is accepted for a uniform signature)."""
    if step < 0:
        raise ValueError(f"constant: step={step} < 0")
    return float(base_lr)


def set_lr(optimizer: Optimizer, lr: float) -> float:
    """Write ``lr`` into every param group of ``optimizer``; returns ``lr``.

    Usage: ``set_lr(opt, warmup_cosine(step, 3e-4, 100, 5000))`` before ``opt.step()``.
    """
    if lr is None or lr < 0 or not math.isfinite(lr):
        raise ValueError(f"set_lr: invalid lr={lr}")
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
    return float(lr)


# --------------------------------------------------------------------------- gradients


def clip_grad_norm_(params: Iterable[Any], max_norm: float, *, sync: bool = True) -> Any:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    total = sqrt(sum over params of sum(g^2)); when total > max_norm every gradient is
    multiplied by max_norm / (total + 1e-6), as ``torch.nn.utils.clip_grad_norm_``.
    Parameters without a gradient are skipped. Returns ``total`` (before clipping) as a
    Python float, or with ``sync=False`` as a 0-d float64 array of the gradients' device
    (no host sync: the training step reads it with its other statistics). The squares are
    summed per array in the gradient's own dtype (no float64 copies) and accumulated
    across arrays in float64, one by one in parameter order, on the device (a fixed
    order: the same bits on every run). A non-finite total leaves the gradients
    untouched (the caller should stop on it).

    Everything stays on the device: the clip factor c = min(1, max_norm / (total + 1e-6))
    (1 when total is not finite) multiplies every gradient; a factor of exactly 1 leaves
    the values bit for bit as they were.
    """
    if max_norm < 0:
        raise ValueError(f"clip_grad_norm_: max_norm={max_norm} < 0")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0 if sync else B.xp.zeros((), dtype=B.np.float64)
    xp = B.array_module(grads[0])
    total_sq = xp.zeros((), dtype=xp.float64)                           # []
    for g in grads:                                                     # in order, one by one
        total_sq = total_sq + _sum_sq(g).astype(xp.float64)
    total = xp.sqrt(total_sq)                                           # []
    coef = xp.minimum(max_norm / (total + 1e-6), 1.0)                     # []
    coef = xp.where(xp.isfinite(total), coef, 1.0)                       # []
    for g in grads:
        g *= coef.astype(g.dtype)
    return float(total) if sync else total


def scale_grads_(params: Iterable[Any], factor: float) -> None:
    """Multiply every existing gradient by ``factor`` in place (e.g. 1 / n_accumulate)."""
    for p in params:
        if p.grad is not None:
            p.grad *= float(factor)
