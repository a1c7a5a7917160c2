"""Torch twins of the building blocks, written from the spec (docs/architecture.md,
docs/openmoe-facts.md), not from tinymoe's code. Plain eager torch, used only as a test oracle.

Conventions shared with the spec: Linear weights stored [in, out] (y = x @ W), no biases
unless asked; RMSNorm is T5LayerNorm (scale only); RoPE is rotate-half with base 10000;
attention scale 1/sqrt(dh) unless given; query i attends to keys j <= i + (S - T).
"""
from __future__ import annotations

import math

import torch
from torch import nn


# ---- ops ---------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0,
                dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, head_dim]: angle(p, i) = p / base^(2i/dh), halves repeated."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float64)
    ang = pos[:, None] * inv_freq[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     causal: bool = True) -> torch.Tensor:
    T, S, dh = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ---- modules -------------------------------------------------------------------------------

class TorchLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool = False, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_in, n_out, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


class TorchRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class TorchFeedForward(nn.Module):
    def __init__(self, d: int, f: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.w_gate = TorchLinear(d, f, dtype=dtype)
        self.w_up = TorchLinear(d, f, dtype=dtype)
        self.w_down = TorchLinear(f, d, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(swiglu(self.w_gate(x), self.w_up(x)))


def gated_triple(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """OpenMoE's FFN gate (flaxformer dense.py: ``A * swish(B)`` on the halves of wi_0's
    output, times the linear wi_1 output): a * silu(b) * v with [a | b] = u."""
    a, b = u.chunk(2, dim=-1)
    return a * torch.nn.functional.silu(b) * v


class TorchOpenMoEFeedForward(nn.Module):
    """Wo [(x A) * silu(x B) * (x W1)], [A | B] = W0 = wi_0 [d, 2f], W1 = wi_1 [d, f]."""

    def __init__(self, d: int, f: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.wi_0 = TorchLinear(d, 2 * f, dtype=dtype)
        self.wi_1 = TorchLinear(d, f, dtype=dtype)
        self.wo = TorchLinear(f, d, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(gated_triple(self.wi_0(x), self.wi_1(x)))


class TorchAttention(nn.Module):
    """Full-sequence causal self-attention with RoPE; head h = columns h*dh:(h+1)*dh."""

    def __init__(self, d: int, n_heads: int, d_head: int, max_seq_len: int, base: float = 10000.0,
                 scale: float | None = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        inner = n_heads * d_head
        self.wq = TorchLinear(d, inner, dtype=dtype)
        self.wk = TorchLinear(d, inner, dtype=dtype)
        self.wv = TorchLinear(d, inner, dtype=dtype)
        self.wo = TorchLinear(inner, d, dtype=dtype)
        self.n_heads, self.d_head, self.scale = n_heads, d_head, scale
        self.cos, self.sin = rope_tables(max_seq_len, d_head, base, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, T, _ = x.shape
        heads = lambda t: t.view(Bsz, T, self.n_heads, self.d_head).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        cos, sin = self.cos[:T], self.sin[:T]
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = causal_attention(q, k, v, self.scale)
        return self.wo(o.transpose(1, 2).reshape(Bsz, T, self.n_heads * self.d_head))
