"""Torch twin of the whole OpenMoE decoder (docs/architecture.md §5, docs/openmoe-facts.md),
written from the spec as one plain function over a dict of named parameters.

    h = E[ids]
    block i:  h += Attn(RMSNorm(h))                           pre-norm, RoPE rotate-half, causal
              dense:  h += FFN(RMSNorm(h))
              MoE:    h += MoE(RMSNorm(h)); h += FFN_shared(RMSNorm'(h))   (sequential)
    FFN = SwiGLU, or with ffn_kind "openmoe" Wo[(x A) silu(x B) (x W1)], [A | B] = wi_0
    logits = RMSNorm(h) E^T (tied) or RMSNorm(h) W_head (untied)
    loss = CE + aux_coef * mean_layers(L_aux) + z_coef * mean_layers(L_z)
           + logit_z_coef * mean over real targets of logsumexp(logits)^2   (T5X losses.py)

Hyper-parameters are read from any object with the config's attribute names (duck typing);
it does not import tinymoe.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as TF

try:
    from oracle.torch_moe import openmoe_ffn, swiglu_ffn, twin_moe
except ImportError:  # tests/ imported as a package
    from tests.oracle.torch_moe import openmoe_ffn, swiglu_ffn, twin_moe

FFN_WEIGHTS = {"swiglu": ("w_gate", "w_up", "w_down"), "openmoe": ("wi_0", "wi_1", "wo")}


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE: pair (x_i, x_{i+dh/2}) rotated by angle pos * base^(-2i/dh)."""
    dh = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)      # [dh/2]
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]              # [T, dh/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(x: torch.Tensor, p: dict, prefix: str, n_heads: int, d_head: int, base: float) -> torch.Tensor:
    bsz, seq, _ = x.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(bsz, seq, n_heads, d_head).transpose(1, 2)             # [B, H, T, dh]

    q = heads(x @ p[f"{prefix}.wq.weight"])
    k = heads(x @ p[f"{prefix}.wk.weight"])
    v = heads(x @ p[f"{prefix}.wv.weight"])
    pos = torch.arange(seq)
    q, k = rope(q, pos, base), rope(k, pos, base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)                        # [B, H, T, T]
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    o = torch.softmax(scores, -1) @ v                                           # [B, H, T, dh]
    return o.transpose(1, 2).reshape(bsz, seq, n_heads * d_head) @ p[f"{prefix}.wo.weight"]


def twin_model(cfg: Any, p: dict, ids: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """Forward of the decoder with parameters ``p`` (name -> torch tensor), ``ids`` [B, T].

    Returns logits, ce, aux, z, loss (None without targets) and per-MoE-layer routing dicts.
    The MoE uses the capacity factor ``cfg.capacity_factor`` (pass an eval-mode config for
    eval comparisons) and priority position/probability (no random order here).
    """
    d_head = cfg.d_head if cfg.d_head is not None else cfg.d_model // cfg.n_heads
    eps = cfg.norm_eps
    kind = getattr(cfg, "ffn_kind", "swiglu")
    ffn, names = (openmoe_ffn if kind == "openmoe" else swiglu_ffn), FFN_WEIGHTS[kind]
    h = p["tok_emb.weight"][ids]                                                # [B, T, d]
    auxes, zs, routing = [], [], []
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        h = h + attention(rms_norm(h, p[f"{b}.attn_norm.weight"], eps), p, f"{b}.attn",
                          cfg.n_heads, d_head, cfg.rope_base)
        x = rms_norm(h, p[f"{b}.ffn_norm.weight"], eps)
        if (i + 1) % cfg.moe_every == 0:
            r = twin_moe(x, p[f"{b}.moe.router.weight"],
                         *[p[f"{b}.moe.experts.{n}"] for n in names], cfg.top_k,
                         cfg.capacity_factor, cfg.group_size, cfg.min_capacity, cfg.capacity_mode,
                         cfg.slot_priority, cfg.renormalize, ffn=ffn)
            h = h + r["y"]
            auxes.append(r["aux"])
            zs.append(r["z"])
            routing.append(r)
            if cfg.shared_ffn:
                s = rms_norm(h, p[f"{b}.shared_norm.weight"], eps)
                h = h + ffn(s, *[p[f"{b}.shared_ffn.{n}.weight"] for n in names])
        else:
            h = h + ffn(x, *[p[f"{b}.ffn.{n}.weight"] for n in names])
    h = rms_norm(h, p["norm_f.weight"], eps)
    head = p["tok_emb.weight"].T if cfg.tie_embeddings else p["lm_head.weight"]
    logits = h @ head                                                           # [B, T, V]
    zero = torch.zeros((), dtype=logits.dtype)
    aux = torch.stack(auxes).mean() if auxes else zero
    z = torch.stack(zs).mean() if zs else zero
    ce = loss = None
    if targets is not None:
        ce = TF.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        loss = ce + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        coef = getattr(cfg, "logit_z_loss_coef", 0.0)
        if coef:
            real = targets.reshape(-1) != -100
            lse = torch.logsumexp(logits.reshape(-1, logits.shape[-1])[real], dim=-1)
            loss = loss + coef * (lse ** 2).mean()
    return dict(logits=logits, ce=ce, aux=aux, z=z, loss=loss, routing=routing)
