"""Reference Adafactor in plain torch, written from the paper, not from tinymoe.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018:
Algorithm 4 (factored second moment, matrices), Algorithm 5 (unfactored, vectors),
section 7.1 update clipping, section 7.2 increasing decay beta2_t = 1 - t^(-c),
section 8 relative step size and parameter scale. The paper's row/column *sums* are used
here on purpose (tinymoe uses means; both give the same V).

Conventions taken to match T5X (which OpenMoE trained with):
- factoring applies to the last two dims; leading dims (experts) keep their own stats;
- a tensor is factored when ndim >= 2 and both last dims >= min_dim_size_to_factor;
- momentum, when beta1 is set, averages the scaled update alpha_t * U^_t;
- weight decay is decoupled: X <- X - alpha_t * wd * X.
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
        self.t = 0
        self.state = []
        for x in self.params:
            st = {}
            if x.dim() >= 2 and x.shape[-2] >= self.min_dim and x.shape[-1] >= self.min_dim:
                st["R"] = torch.zeros(x.shape[:-1], dtype=x.dtype)           # row sums  [..., n]
                st["C"] = torch.zeros(x.shape[:-2] + x.shape[-1:], dtype=x.dtype)  # col sums [..., m]
            else:
                st["V"] = torch.zeros_like(x)
            if beta1 is not None:
                st["M"] = torch.zeros_like(x)
            self.state.append(st)

    def rms(self, x):
        return torch.sqrt(torch.mean(x * x))

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        t = self.t
        if self.lr is None:  # section 8: rho_t = min(10^-2, 1/sqrt(t))
            rho = min(1e-6 * t if self.warmup_init else 1e-2, 1.0 / math.sqrt(t))
        else:
            rho = self.lr
        beta2 = 1.0 - t ** (-self.c)  # section 7.2
        for x, G, st in zip(self.params, grads, self.state):
            if self.scale_parameter:  # alpha_t = max(eps2, RMS(X_{t-1})) rho_t
                alpha = torch.clamp(self.rms(x), min=self.eps2) * rho
            else:
                alpha = torch.tensor(rho, dtype=x.dtype)
            G2 = G * G + self.eps1
            if "R" in st:  # Algorithm 4
                st["R"] = beta2 * st["R"] + (1 - beta2) * G2.sum(dim=-1)   # (G2) 1_m
                st["C"] = beta2 * st["C"] + (1 - beta2) * G2.sum(dim=-2)   # 1_n^T (G2)
                V = st["R"].unsqueeze(-1) * st["C"].unsqueeze(-2) / st["R"].sum(dim=-1)[..., None, None]
            else:  # Algorithm 5
                st["V"] = beta2 * st["V"] + (1 - beta2) * G2
                V = st["V"]
            U = G / torch.sqrt(V)
            U_hat = U / torch.clamp(self.rms(U) / self.d, min=1.0)  # section 7.1
            step = alpha * U_hat
            if self.beta1 is not None:
                st["M"] = self.beta1 * st["M"] + (1 - self.beta1) * step
                step = st["M"]
            if self.wd:
                x -= alpha * self.wd * x
            x -= step
