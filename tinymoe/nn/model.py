"""The OpenMoE decoder: token embedding -> L blocks -> RMSNorm -> LM head.

Block i (pre-norm, residual; OpenMoE / flaxformer order):

    dense block:  x += Attn(N_attn(x));  x += FFN(N_ffn(x))
    MoE block:    x += Attn(N_attn(x));  x += MoE(N_ffn(x));  x += FFN_shared(N_shared(x))

The shared FFN of an MoE block runs *after* the MoE with its own norm (sequential, as in
the original code; the paper's eq. 4 writes it in parallel). A token whose expert
assignments were all dropped still flows through the residual and the shared FFN.

LM head: tied by default, logits = h E^T with E the embedding [V, d]; untied, a Linear
[d, V]. Training loss (OpenMoE): L = CE + aux_loss_coef * L_aux + z_loss_coef * L_z
(+ logit_z_loss_coef * L_zout), with L_aux (Switch Transformer eq. 4-6, top-k form) and L_z
(ST-MoE eq. 5) averaged over the MoE layers, and the output-logit z-loss
L_zout = mean over target tokens of logsumexp(logits)^2 (T5X ``losses.py``; off by default).

Init (``cfg.init``, docs/openmoe-facts.md §9): "normal", every matrix N(0, init_std^2); or
"openmoe": token embedding N(0, 1), attention and expert matrices N(0, 0.1 / fan_in), dense
and shared FFNs and the untied LM head the same std from a normal truncated at 2 std;
routers N(0, 0.02^2) and norm scales 1 either way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tinymoe import backend as B
from tinymoe import functional as F
from tinymoe.autograd import Context, Function, Tensor, is_grad_enabled
from tinymoe.config import ModelConfig
from tinymoe.nn.layers import (Attention, Embedding, FeedForward, KVCache, Linear, RMSNorm,
                               fan_in_std)
from tinymoe.nn.module import Module, ModuleList
from tinymoe.nn.moe import MoE, MoEStats

__all__ = ["Block", "OpenMoE", "ModelOutput", "ModelCache", "tied_lm_head", "LogitZLoss",
           "logit_z_loss"]


# --------------------------------------------------------------------------------------
# tied LM head: logits = h E^T without materialising E^T
# --------------------------------------------------------------------------------------

class TiedLMHead(Function):
    """logits = h W^T for h [N, d] and the embedding W [V, d] -> [N, V].

    ``h @ W.T`` is a GEMM on a transposed *view* (BLAS reads W with the transpose flag, no
    copy). Backward: dh = g W [N, d]; dW = g^T h [V, d], computed directly in W's layout so
    it adds to the embedding's own gradient without a transposed temporary.
    """

    @staticmethod
    def forward(ctx: Context, h: Any, weight: Any) -> Any:
        ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        return h @ weight.T                                               # [N, d] @ [d, V] -> [N, V]

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        h, weight = ctx.saved
        gh = g @ weight if ctx.needs_input_grad[0] else None              # [N, V] @ [V, d] -> [N, d]
        gw = g.T @ h if ctx.needs_input_grad[1] else None                 # [V, N] @ [N, d] -> [V, d]
        return gh, gw


def tied_lm_head(h: Tensor, weight: Tensor) -> Tensor:
    """Logits h [..., d] against the embedding weight [V, d] -> [..., V]."""
    lead = h.shape[:-1]
    logits = TiedLMHead.apply(h.reshape(-1, h.shape[-1]), weight)         # [N, d] -> [N, V]
    return logits.reshape(*lead, weight.shape[0])                         # [N, V] -> [..., V]


# --------------------------------------------------------------------------------------
# output-logit z-loss (T5X)
# --------------------------------------------------------------------------------------

class LogitZLoss(Function):
    """L = (1/n) sum over counted tokens of lse(z_t)^2, z [N, V] the logits, n the number of
    tokens whose target is not ``ignore_index`` (T5X ``cross_entropy_with_logits``: the
    ``z_loss * log_z^2`` term, normalised like the cross-entropy, by the real targets).

    Backward: d lse / dz = softmax(z), so dL/dz_t = 2 lse(z_t) softmax(z_t) / n on counted
    rows, 0 elsewhere. Forward keeps only lse [N]; backward recomputes the softmax.
    """

    @staticmethod
    def forward(ctx: Context, logits: Any, valid: Any) -> Any:
        xp = B.array_module(logits)
        m = logits.max(axis=-1, keepdims=True)                            # [N, 1]
        lse = (m + xp.log(xp.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]   # [N]
        count = max(int(valid.sum()), 1)
        ctx.save_for_backward(logits, lse, valid)
        ctx.count = count
        return xp.asarray((lse * lse * valid).sum() / count, dtype=logits.dtype)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple:
        logits, lse, valid = ctx.saved
        xp = B.array_module(logits)
        p = xp.exp(logits - lse[:, None])                                 # softmax [N, V]
        coef = (g * 2.0 / ctx.count) * lse * valid                        # [N]
        p *= coef.astype(p.dtype, copy=False)[:, None]
        return p, None


def logit_z_loss(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean over counted targets of logsumexp(logits)^2: logits [..., V], targets [...]."""
    V = logits.shape[-1]
    valid = (targets.reshape(-1) != ignore_index).astype(logits.dtype)   # [N] 1 / 0
    return LogitZLoss.apply(logits.reshape(-1, V), valid)                # [N, V] -> []


# --------------------------------------------------------------------------------------
# block
# --------------------------------------------------------------------------------------

class Block(Module):
    """One decoder block; an MoE block when ``cfg.is_moe_block(layer_idx)``.

    Parameters: ``attn_norm``, ``attn`` (wq, wk, wv, wo), ``ffn_norm``; then either ``ffn``
    (dense FFN of ``cfg.ffn_kind``) or ``moe`` (``moe.router``, ``moe.experts``) plus, with
    ``cfg.shared_ffn``, ``shared_norm`` and ``shared_ffn``.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, rng: Any):
        super().__init__()
        dt, std, s = cfg.dtype, cfg.init_std, cfg.init_fan_in_scale
        self.layer_idx = layer_idx
        self.is_moe = cfg.is_moe_block(layer_idx)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype=dt)
        self.attn = Attention(cfg.d_model, cfg.n_heads, max_seq_len=cfg.max_seq_len, d_head=cfg.d_head,
                              rope_base=cfg.rope_base, rng=rng, init_std=std, fan_in_scale=s,
                              dtype=dt)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype=dt)
        self.has_shared = self.is_moe and cfg.shared_ffn
        if self.is_moe:
            self.moe = MoE(cfg, layer_idx=layer_idx, rng=rng)
            if self.has_shared:
                self.shared_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype=dt)
                self.shared_ffn = FeedForward(cfg.d_model, cfg.shared_ff, rng=rng, init_std=std,
                                              kind=cfg.ffn_kind, fan_in_scale=s, dtype=dt)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ff, rng=rng, init_std=std,
                                   kind=cfg.ffn_kind, fan_in_scale=s, dtype=dt)

    def forward(self, x: Tensor, cache: KVCache | None = None, rng: Any = None
                ) -> tuple[Tensor, Tensor | None, Tensor | None, MoEStats | None]:
        """x [B, T, d] -> (x [B, T, d], L_aux, L_z, stats); the last three are None in a
        dense block."""
        x = x + self.attn(self.attn_norm(x), cache=cache)                 # [B, T, d]
        if not self.is_moe:
            return x + self.ffn(self.ffn_norm(x)), None, None, None       # [B, T, d]
        y, aux, z, stats = self.moe(self.ffn_norm(x), rng=rng)            # [B, T, d], [], [], stats
        x = x + y
        if self.has_shared:
            x = x + self.shared_ffn(self.shared_norm(x))                  # [B, T, d]
        return x, aux, z, stats

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, {'moe' if self.is_moe else 'dense'}"


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------

@dataclass
class ModelOutput:
    """What one forward returns.

    logits   [B, T, V] Tensor.
    ce       mean next-token cross-entropy (0-d Tensor) when targets were given, else None.
    aux_loss load-balance loss averaged over MoE layers (0-d Tensor; 0 for a dense model).
    z_loss   router z-loss averaged over MoE layers (0-d Tensor; 0 for a dense model).
    loss     ce + aux_loss_coef * aux_loss + z_loss_coef * z_loss (+ logit_z_loss_coef *
             logit_z) (None without targets).
    routing  one :class:`MoEStats` per MoE layer, in block order (``stats.layer`` = block index).
    """

    logits: Tensor
    ce: Tensor | None
    aux_loss: Tensor
    z_loss: Tensor
    loss: Tensor | None
    routing: list[MoEStats] = field(default_factory=list)
    logit_z: Tensor | None = None
    "output-logit z-loss, mean logsumexp(logits)^2 over targets (only when its coef > 0)"


class ModelCache:
    """KV caches of every block for incremental decoding; ``length`` = positions seen."""

    def __init__(self, layers: list[KVCache]):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def reset(self) -> None:
        for c in self.layers:
            c.reset()

    def __repr__(self) -> str:
        return f"ModelCache(layers={len(self.layers)}, batch={self.batch_size}, length={self.length}/{self.max_len})"


class OpenMoE(Module):
    """The OpenMoE decoder-only language model (Xue et al. 2024).

    Parameters are named exactly as :func:`tinymoe.config.parameter_shapes` lists them:
    ``tok_emb.weight``, ``blocks.{i}.*``, ``norm_f.weight`` and, untied, ``lm_head.weight``.
    Weights are N(0, init_std^2) (routers N(0, 0.02^2)), or OpenMoE's init with
    ``cfg.init == "openmoe"`` (see the module docstring), norms ones, drawn from one host
    Generator seeded by ``seed`` (or the ``rng`` given) in parameter order.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, rng: Any = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        rng = B.default_rng(seed) if rng is None else rng
        dt = cfg.dtype
        s = cfg.init_fan_in_scale
        emb_std = cfg.init_std if s is None else 1.0                     # OpenMoE: N(0, 1)
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, init_std=emb_std, dtype=dt)
        self.blocks = ModuleList(Block(cfg, i, rng) for i in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, dtype=dt)
        if not cfg.tie_embeddings:
            head_std = cfg.init_std if s is None else fan_in_std(s, cfg.d_model)
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, rng=rng, init_std=head_std,
                                  truncated=s is not None, dtype=dt)

    # -- generation support ------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None) -> ModelCache:
        """Empty KV caches for ``batch_size`` sequences of up to ``max_len`` positions
        (default and maximum: cfg.max_seq_len)."""
        max_len = self.cfg.max_seq_len if max_len is None else int(max_len)
        if not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} must be between 1 and max_seq_len={self.cfg.max_seq_len}")
        return ModelCache([b.attn.new_cache(batch_size, max_len) for b in self.blocks])

    # -- forward -------------------------------------------------------------------------
    def _check_ids(self, ids: Any, cache: ModelCache | None) -> Any:
        """ids as device ints [B, T], with one-line errors for every bad input."""
        ids = _int_array(ids, "token ids must be integers")
        if ids.ndim != 2:
            raise ValueError(f"token ids must have shape [batch, seq], got {tuple(ids.shape)}")
        bsz, seq = ids.shape
        if bsz < 1 or seq < 1:
            raise ValueError(f"token ids must be non-empty, got shape {tuple(ids.shape)}")
        V = self.cfg.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for vocab_size={V}")
        start = 0 if cache is None else cache.length
        if cache is None and seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} > max_seq_len={self.cfg.max_seq_len}")
        if cache is not None:
            if is_grad_enabled():
                raise RuntimeError("forward with a KV cache is for generation only; call it under tinymoe.no_grad()")
            if bsz != cache.batch_size:
                raise ValueError(f"batch size {bsz} != KV cache batch size {cache.batch_size}")
            if start + seq > cache.max_len:
                raise ValueError(f"{start} cached + {seq} new positions > cache max_len={cache.max_len}")
        return B.to_device(ids).astype(B.xp.int64, copy=False)

    def forward(self, ids: Any, targets: Any = None, cache: ModelCache | None = None,
                rng: Any = None) -> ModelOutput:
        """ids [B, T] ints -> :class:`ModelOutput`.

        targets [B, T] ints (next tokens; -100 = ignore) adds ``ce`` and ``loss``.
        cache (from :meth:`new_cache`, under ``no_grad`` only): ids are the new tokens, at
        positions cache.length ..; logits are for those positions. rng: a host NumPy
        Generator, needed by slot priority "random".
        """
        cfg = self.cfg
        ids = self._check_ids(ids, cache)
        h = self.tok_emb(ids)                                             # [B, T] -> [B, T, d]
        aux_terms: list[Tensor] = []
        z_terms: list[Tensor] = []
        routing: list[MoEStats] = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            h, aux, z, stats = block(h, cache=layer_cache, rng=rng)       # [B, T, d]
            if stats is not None:
                aux_terms.append(aux)
                z_terms.append(z)
                routing.append(stats)
        h = self.norm_f(h)                                                # [B, T, d]
        if cfg.tie_embeddings:
            logits = tied_lm_head(h, self.tok_emb.weight)                 # [B, T, d] -> [B, T, V]
        else:
            logits = self.lm_head(h)                                      # [B, T, d] -> [B, T, V]

        aux_loss = _layer_mean(aux_terms, h.dtype)                        # []
        z_loss = _layer_mean(z_terms, h.dtype)                            # []
        ce = loss = logit_z = None
        if targets is not None:
            targets = self._check_targets(targets, ids.shape)
            ce = F.cross_entropy(logits, targets)                         # [B, T, V], [B, T] -> []
            loss = ce + aux_loss * cfg.aux_loss_coef + z_loss * cfg.z_loss_coef
            if cfg.logit_z_loss_coef > 0:
                logit_z = logit_z_loss(logits, targets)                   # [B, T, V], [B, T] -> []
                loss = loss + logit_z * cfg.logit_z_loss_coef
        return ModelOutput(logits=logits, ce=ce, aux_loss=aux_loss, z_loss=z_loss, loss=loss,
                           routing=routing, logit_z=logit_z)

    def _check_targets(self, targets: Any, shape: tuple[int, ...]) -> Any:
        targets = _int_array(targets, "targets must be integer token ids")
        if tuple(targets.shape) != tuple(shape):
            raise ValueError(f"targets shape {tuple(targets.shape)} != ids shape {tuple(shape)}")
        V = self.cfg.vocab_size
        valid = targets[targets != -100]
        if valid.size and (int(valid.min()) < 0 or int(valid.max()) >= V):
            bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
            raise ValueError(f"target id {bad} is out of range for vocab_size={V} (use -100 to ignore a position)")
        return B.to_device(targets).astype(B.xp.int64, copy=False)

    def extra_repr(self) -> str:
        return self.cfg.describe()


def _layer_mean(terms: list[Tensor], dtype: Any) -> Tensor:
    """Mean of 0-d loss Tensors over MoE layers; a constant 0 for a dense model."""
    if not terms:
        return Tensor(B.xp.zeros((), dtype=dtype))
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total * (1.0 / len(terms))


def _int_array(x: Any, what: str) -> Any:
    """``x`` (Tensor, array or list) as an array, refused unless it holds integers."""
    if isinstance(x, Tensor):
        x = x.data
    if not hasattr(x, "dtype"):
        x = B.np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{what}, got dtype {x.dtype}")
    return x
