"""Reference Adafactor in plain torch, written from T5X's rule, not from tinymoe.

The update is T5X's ``Adafactor.apply_param_gradient`` (``t5x/adafactor.py``, the version
OpenMoE trained with; docs/openmoe-facts.md §10), applied to one *unit* at a time:

- a vector or a matrix is one unit (T5X's heuristic rule for rank <= 2: all dims are
  averaging dims; a matrix is factored when its second-largest dim is >= 128, along its
  two largest dims);
- a stacked expert tensor [E, r, c] is E units, one per expert, updated by a Python loop
  over the experts (T5X's explicit rule ``expert -> BATCH``: the expert axis is left out
  of the averaging dims, so each expert has its own parameter scale, update clipping and
  factored statistics; an explicit rule factors whatever the sizes).

Per unit X with gradient G, T5X's step counter t = 0, 1, 2, ... (0 at the first update):

    beta2      = 1 - (t + 1)^(-decay_rate)
    scale      = lr * max(RMS(X), eps2)                    (multiply_by_parameter_scale)
    G2         = G^2 + eps1
    factored   R = beta2 R + (1 - beta2) mean(G2 over the largest dim)
               C = beta2 C + (1 - beta2) mean(G2 over the second-largest dim)
               Y = G * (R / mean(R))^(-1/2) * C^(-1/2)
    unfactored V = beta2 V + (1 - beta2) G2,  Y = G * V^(-1/2)
    clipping   Y = Y / max(1, RMS(Y) / clip_threshold)
    X          = X - scale * Y

Extras tinymoe offers beyond what OpenMoE used, written from the paper / tinymoe's
documented conventions: the relative step rho = min(1e-2, 1/sqrt(t + 1)) when lr is None
(Shazeer & Stern 2018, section 8; ``warmup_init``: min(1e-6 (t + 1), 1/sqrt(t + 1))),
momentum on the scaled update (T5X's ordering), and decoupled weight decay scaled by the
step size, X <- X - scale * wd * X.
"""
from __future__ import annotations

import math

import torch


class TorchAdafactor:
    """step(grads) updates the list of torch tensors ``params`` in place."""

    def __init__(self, params, lr=None, decay_rate=0.8, beta1=None, eps1=1e-30, eps2=1e-3,
                 clip_threshold=1.0, scale_parameter=True, warmup_init=False,
                 weight_decay=0.0, min_dim_size_to_factor=128):
        self.params = list(params)
        self.lr, self.c, self.beta1 = lr, decay_rate, beta1
        self.eps1, self.eps2, self.d = eps1, eps2, clip_threshold
        self.scale_parameter, self.warmup_init = scale_parameter, warmup_init
        self.wd, self.min_dim = weight_decay, min_dim_size_to_factor
        self.t = 0                        # T5X's step: 0 at the first update
        # one list of unit states per parameter: E units for [E, r, c], else one
        self.state = [[self._new_unit(u, x.dim() >= 3) for u in self._units(x)]
                      for x in self.params]

    @staticmethod
    def _units(x):
        """The independent units of a parameter: its expert matrices, or itself."""
        if x.dim() >= 3:
            return [x[e] for e in range(x.shape[0])]          # views [r, c]
        return [x]

    def _new_unit(self, u, explicit_rule):
        st = {}
        if u.dim() == 2:
            small, large = sorted(range(2), key=lambda i: (u.shape[i], i))
            if explicit_rule or u.shape[small] >= self.min_dim:
                st["dims"] = (small, large)                    # (row dim, col dim)
                st["R"] = torch.zeros(u.shape[small], dtype=u.dtype)
                st["C"] = torch.zeros(u.shape[large], dtype=u.dtype)
        if "dims" not in st:
            st["V"] = torch.zeros_like(u)
        if self.beta1 is not None:
            st["M"] = torch.zeros_like(u)
        return st

    @staticmethod
    def rms(x):
        return torch.sqrt(torch.mean(x * x))

    @torch.no_grad()
    def step(self, grads):
        t = self.t
        if self.lr is None:
            rho = min(1e-6 * (t + 1) if self.warmup_init else 1e-2, 1.0 / math.sqrt(t + 1))
        else:
            rho = self.lr
        beta2 = 1.0 - (t + 1) ** (-self.c)
        for x, G, states in zip(self.params, grads, self.state):
            for X, Gu, st in zip(self._units(x), self._units(G), states):
                self._update_unit(X, Gu, st, beta2, rho)
        self.t += 1

    def _update_unit(self, X, G, st, beta2, rho):
        if self.scale_parameter:
            scale = rho * torch.clamp(self.rms(X), min=self.eps2)
        else:
            scale = torch.tensor(rho, dtype=X.dtype)
        G2 = G * G + self.eps1
        if "dims" in st:
            row, col = st["dims"]
            st["R"] = beta2 * st["R"] + (1 - beta2) * G2.mean(dim=col)
            st["C"] = beta2 * st["C"] + (1 - beta2) * G2.mean(dim=row)
            row_factor = (st["R"] / st["R"].mean()) ** -0.5
            col_factor = st["C"] ** -0.5
            Y = G * row_factor.unsqueeze(col) * col_factor.unsqueeze(row)
        else:
            st["V"] = beta2 * st["V"] + (1 - beta2) * G2
            Y = G * st["V"] ** -0.5
        if self.d is not None:
            Y = Y / torch.clamp(self.rms(Y) / self.d, min=1.0)
        step = scale * Y
        if self.beta1 is not None:
            st["M"] = self.beta1 * st["M"] + (1 - self.beta1) * step
            step = st["M"]
        if self.wd:
            X -= scale * self.wd * X
        X -= step
