"""The parameter / memory table printed by ``python -m tinymoe params``.

All numbers come from :func:`tinymoe.config.parameter_shapes` (shapes only, nothing is
allocated), so the table for OpenMoE-34B prints instantly.
"""
from __future__ import annotations

from typing import Any

from tinymoe.config import (COMPONENTS, PRESET_LITERATURE, ModelConfig, count_parameters,
                            get_preset, memory_bytes, parse_overrides)

__all__ = ["format_params_table", "params_command"]

_LABELS = {
    "embedding": "token embedding",
    "lm_head": "LM head (untied)",
    "attention": "attention (q, k, v, o)",
    "dense_ffn": "dense FFNs",
    "experts": "experts (all)",
    "shared_ffn": "shared FFNs",
    "routers": "routers",
    "norms": "RMSNorms",
}


def _count(n: int) -> str:
    """Exact count with thousands separators plus a short form: '649,946,112 (649.95M)'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n:,} ({n / div:.2f}{unit})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    """Bytes in GiB when at least 1 GiB, else MiB."""
    if n >= 2**30:
        return f"{n / 2**30:,.2f} GiB"
    return f"{n / 2**20:,.2f} MiB"


def format_params_table(cfg: ModelConfig, name: str | None = None) -> str:
    """Parameters by component (count, %), totals, active per token and memory."""
    c = count_parameters(cfg)
    m = memory_bytes(cfg)
    total = c["total"]
    n_moe = len(cfg.moe_layers)
    lines = []
    title = f"{name}: " if name else ""
    lines.append(f"{title}{cfg.describe()}")
    lines.append("")
    w, cw = 24, 26
    rule = "-" * (w + cw + 9)
    lines.append(f"{'component':<{w}} {'parameters':>{cw}} {'%':>7}")
    lines.append(rule)
    for comp in COMPONENTS:
        n = c[comp]
        if n == 0:
            continue
        label = _LABELS[comp]
        if comp == "experts" and n_moe:
            label = f"experts ({n_moe} x {cfg.n_experts})"
        lines.append(f"{label:<{w}} {_count(n):>{cw}} {100 * n / total:>6.2f}%")
    lines.append(rule)
    lines.append(f"{'total':<{w}} {_count(total):>{cw}} {100.0:>6.2f}%")
    emb = "embedding (tied, counted once)" if cfg.tie_embeddings else "embedding + untied head"
    lines.append(f"{'active per token':<{w}} {_count(c['active']):>{cw}} "
                 f"{100 * c['active'] / total:>6.2f}%")
    lines.append(f"  convention: active = {emb} + attention + top-{cfg.top_k} of "
                 f"{cfg.n_experts} experts + shared/dense FFNs + routers + norms")
    lines.append(f"{'blocks only, total':<{w}} {_count(c['total_blocks_only']):>{cw}}")
    lines.append(f"{'blocks only, active':<{w}} {_count(c['active_blocks_only']):>{cw}}")
    lines.append("  blocks only = parameters under blocks.*, the convention of the original "
                 "code's count")
    ffn_kind = ("4*d*ff per FFN, OpenMoE's code" if cfg.ffn_kind == "openmoe"
                else "3*d*ff per FFN, SwiGLU")
    attn_ffn = {t: c["attention"] + c["dense_ffn"] + c["shared_ffn"]
                + (c["experts"] if t else c["experts_active"]) for t in (True, False)}
    lines.append(f"{'attention + FFN weights':<{w}} {_count(attn_ffn[True]):>{cw}}  total "
                 f"({ffn_kind})")
    lines.append(f"{'':<{w}} {_count(attn_ffn[False]):>{cw}}  active; "
                 f"+ one embedding: {_count(attn_ffn[False] + c['embedding'])}")
    literature = PRESET_LITERATURE.get(name or "")
    if literature:
        lines.append(f"  literature: {literature}")
    lines.append("")
    lines.append(f"memory ({cfg.dtype}, {m['bytes_per_value']} bytes per value)")
    lines.append(f"  {'weights':<22} {_bytes(m['weights']):>12}")
    lines.append(f"  {'gradients':<22} {_bytes(m['grads']):>12}")
    lines.append(f"  {'AdamW state (m, v)':<22} {_bytes(m['adamw']):>12}")
    lines.append(f"  {'Adafactor (factored v)':<22} {_bytes(m['adafactor']):>12}")
    lines.append(f"  {'train, AdamW':<22} {_bytes(m['weights'] + m['grads'] + m['adamw']):>12}"
                 "  (weights + grads + state; activations not included)")
    lines.append(f"  {'train, Adafactor':<22} "
                 f"{_bytes(m['weights'] + m['grads'] + m['adafactor']):>12}")
    if n_moe:
        g = cfg.group_size
        g_text = f"group of {g} tokens" if g else f"one sequence of {cfg.max_seq_len} tokens"
        cap = {t: "dropless" if cfg.is_dropless(t) else f"{cfg.capacity(g or cfg.max_seq_len, t)} slots"
               for t in (True, False)}
        lines.append("")
        lines.append(f"expert capacity ({cfg.capacity_mode}, {g_text}): train "
                     f"{cap[True]}, eval {cap[False]} per expert")
    return "\n".join(lines)


def params_command(config_name: str, overrides: dict[str, Any] | None = None) -> str:
    """Table for preset ``config_name`` with ``overrides`` (typed values or strings)."""
    cfg = get_preset(config_name, **parse_overrides(overrides or {}))
    return format_params_table(cfg, config_name.strip().lower().replace("_", "-"))
