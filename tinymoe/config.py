"""Model configuration, presets and parameter counting for tinymoe.

One flat dataclass, :class:`ModelConfig`, describes a whole OpenMoE-style decoder:

    token embedding -> n_layers blocks -> RMSNorm -> LM head (tied by default)

Block ``i`` (0-indexed) is an MoE block when ``(i + 1) % moe_every == 0`` (OpenMoE-Base:
``moe_every=4`` -> blocks 3, 7, 11); the other blocks use a dense FFN. An MoE block also
carries a shared dense FFN with its own RMSNorm when ``shared_ffn`` is true. Every FFN
(dense, shared, expert) has the form ``ffn_kind``: SwiGLU, or OpenMoE's gated triple product.

Parameter counting is done from shapes only (:func:`parameter_shapes`), so the 34B preset
is counted instantly without allocating anything. ``parameter_shapes`` is the single
source of truth for parameter names: the model's ``state_dict`` uses the same names.

This module imports no array library: it is plain Python. It is the ground floor of the
package: the routing vocabulary (``CAPACITY_MODES``, ``SLOT_PRIORITIES``) and the capacity
formula (:func:`capacity`) are defined here once, and :mod:`tinymoe.routing` uses them.
The parameter table printed by ``python -m tinymoe params`` lives in
:mod:`tinymoe.params_table`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

__all__ = [
    "ModelConfig", "PRESETS", "DEFAULT_PRESET", "get_preset", "preset_names",
    "parameter_shapes", "count_parameters", "memory_bytes", "parse_overrides",
    "CAPACITY_MODES", "SLOT_PRIORITIES", "ROUTER_TYPES", "ROUTER_SCORES", "AUX_LOSS_KINDS",
    "capacity", "FFN_KINDS", "INITS",
]

# The routing vocabulary (see tinymoe.routing for what each choice does). Adding a choice
# means adding it here and implementing it in tinymoe.routing.
CAPACITY_MODES = ("openmoe", "k_scaled")
SLOT_PRIORITIES = ("position", "probability", "random")
ROUTER_TYPES = ("token_choice", "expert_choice")  # see tinymoe.routing_variants
ROUTER_SCORES = ("softmax", "sigmoid")             # softmax: OpenMoE; sigmoid: DeepSeek-V3
AUX_LOSS_KINDS = ("switch", "shazeer")             # Switch eq. 4-6; Shazeer et al. 2017 eq. 6-11
DTYPES = ("float32", "float64")
_DTYPE_BYTES = {"float32": 4, "float64": 8}

# Field groups, used by validation and by string parsing of CLI overrides.
_INT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "n_experts", "top_k",
               "moe_every", "max_seq_len", "min_capacity")
_OPT_INT_FIELDS = ("d_ff_expert", "d_head", "group_size")
_FLOAT_FIELDS = ("aux_loss_coef", "z_loss_coef", "rope_base", "norm_eps", "init_std")
_OPT_FLOAT_FIELDS = ("capacity_factor", "eval_capacity_factor")
_BOOL_FIELDS = ("shared_ffn", "renormalize", "tie_embeddings")
_STR_FIELDS = ("capacity_mode", "slot_priority", "dtype")
# OpenMoE's original-code choices (docs/openmoe-facts.md §4, §8, §9): FFN form, output-logit
# z-loss, initialisation
FFN_KINDS = ("swiglu", "openmoe")
INITS = ("normal", "openmoe")
OPENMOE_INIT_SCALE = 0.1
_FLOAT_FIELDS += ("logit_z_loss_coef",)
_STR_FIELDS += ("ffn_kind", "init")
# routing variants (tinymoe.routing_variants): one block, validated in _validate_variants
_OPT_INT_FIELDS += ("d_ff_shared",)
_FLOAT_FIELDS += ("router_bias_rate",)
_BOOL_FIELDS += ("router_noise",)
_STR_FIELDS += ("router_type",)
_STR_FIELDS += ("router_score", "aux_loss_kind")


def capacity(group_size: int, n_experts: int, top_k: int, capacity_factor: float | None,
             min_capacity: int = 4, mode: str = "openmoe") -> int:
    """Expert capacity C (slots per expert per routing group of ``group_size`` tokens).

    ``"openmoe"`` (flaxformer, no factor k): ``C = max(round(cf * G / E), min_capacity)``,
    ``round`` = Python's round half to even, as flaxformer's ``int(round(...))`` on a
    Python float (2.5 -> 2, 3.5 -> 4);
    ``"k_scaled"`` (DeepSpeed / Tutel): ``C = max(ceil(k * cf * G / E), min_capacity)``;
    ``cf`` 0 or None: dropless, ``C = G`` (an expert gets at most one assignment per
    token, so G slots never drop one). C is not capped at G otherwise.
    """
    if mode not in CAPACITY_MODES:
        raise ValueError(f"unknown capacity mode {mode!r}: use one of {CAPACITY_MODES}")
    if group_size < 1 or n_experts < 1:
        raise ValueError(f"group_size={group_size} and n_experts={n_experts} must be >= 1")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
    if min_capacity < 0:
        raise ValueError(f"min_capacity={min_capacity} must be >= 0")
    if capacity_factor is None or capacity_factor == 0:
        return int(group_size)  # dropless
    cf = float(capacity_factor)
    if not math.isfinite(cf) or cf < 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be a finite number >= 0")
    if mode == "openmoe":
        c = int(round(cf * group_size / n_experts))
    else:
        c = int(math.ceil(top_k * cf * group_size / n_experts))
    return max(c, int(min_capacity))


def _fmt(v: Any) -> str:
    """Value as it appears in error messages: repr for strings, str otherwise."""
    return repr(v) if isinstance(v, str) else str(v)


@dataclass
class ModelConfig:
    """Every hyper-parameter of a tinymoe decoder, flat.

    Sizes
        vocab_size, d_model, n_layers, n_heads, max_seq_len.
        d_head: width of one attention head; None -> d_model // n_heads (then d_model must
            be divisible by n_heads). Attention inner width = n_heads * d_head, which may
            differ from d_model (OpenMoE-8B/34B: 24 x 128 = 3072 heads on d_model 2048/3072).
            Must be even (RoPE rotates pairs).
        d_ff: hidden width of the dense FFNs and of the shared FFN in MoE blocks.
        d_ff_expert: hidden width of each expert's FFN; None -> d_ff.

    Mixture of experts
        n_experts (E), top_k (k), moe_every (MoE on block i when (i+1) % moe_every == 0;
        moe_every > n_layers gives a dense model), shared_ffn.

    Router (see docs/router.md, :func:`capacity` and :mod:`tinymoe.routing`)
        capacity_factor (train) / eval_capacity_factor: C = max(round(cf*G/E), min_capacity)
            with capacity_mode "openmoe" (flaxformer, no k), or
            C = max(ceil(k*cf*G/E), min_capacity) with "k_scaled" (DeepSpeed).
            cf = 0 or None means dropless (C = G: no token is ever dropped).
        group_size: tokens per routing group G; None -> one sequence per group. A group
            size larger than the number of tokens available N means one group of N
            (OpenMoE used 4096; with a [1, 512] batch a group is just those 512 tokens).
        slot_priority: "position" (OpenMoE: first choices in token order, then second
            choices), "probability" (batch-prioritised routing) or "random".
        renormalize: renormalise the top-k combine weights to sum 1 (Mixtral) instead of
            using raw softmax probabilities (OpenMoE).

    Losses
        aux_loss_coef: load-balance loss weight (L_aux = E * sum_i f_i P_i, Switch eq. 4-6
            in its top-k form); z_loss_coef: router z-loss weight (ST-MoE,
            mean logsumexp(z)^2).

    Routing variants (docs/router.md §13, :mod:`tinymoe.routing_variants`)
        router_type ("token_choice" | "expert_choice"), router_noise (noisy top-k gating),
        router_bias_rate (DeepSeek-V3 bias balancing; 0 = off), d_ff_shared (shared FFN
        width: s shared fine-grained experts). Defaults: OpenMoE's router, unchanged.

    Other
        tie_embeddings (LM head = embedding^T), rope_base, norm_eps (RMSNorm),
        init_std (normal init), dtype ("float32" | "float64").

    OpenMoE's original code (docs/openmoe-facts.md §4, §8, §9; defaults change nothing)
        ffn_kind: "swiglu" (W_down(silu(x W_gate) * (x W_up)), 3 d f weights) or "openmoe"
            (Wo[(x A) * silu(x B) * (x W1)], [A | B] = W0 [d, 2f]: 4 d f weights), for the
            dense, shared and expert FFNs.
        logit_z_loss_coef: weight of the output-logit z-loss, the mean over target tokens
            of logsumexp(logits)^2 (T5X ``z_loss``); 0 = off.
        init: "normal" (every matrix N(0, init_std^2), routers N(0, 0.02^2)) or "openmoe"
            (embedding N(0, 1), other matrices std sqrt(0.1 / fan_in), routers N(0, 0.02^2)).
    """

    vocab_size: int
    "token ids 0 .. vocab_size-1 (set to the tokenizer's when training)"
    d_model: int
    "width of the residual stream"
    n_layers: int
    "number of decoder blocks"
    n_heads: int
    "attention heads per block"
    d_ff: int
    "hidden width of the dense FFNs and of the shared FFN in MoE blocks"
    n_experts: int
    "experts per MoE layer (E)"
    top_k: int
    "experts each token is routed to (k)"
    moe_every: int
    "block i is an MoE block when (i + 1) % moe_every == 0 (> n_layers: a dense model)"
    max_seq_len: int
    "longest sequence (RoPE and the KV cache are sized for it)"
    d_ff_expert: int | None = None
    "hidden width of each expert's FFN (none: d_ff)"
    d_head: int | None = None
    "width of one attention head, even (none: d_model // n_heads)"
    shared_ffn: bool = True
    "MoE blocks also run a shared dense FFN with its own RMSNorm (OpenMoE)"
    capacity_factor: float | None = 1.25
    "expert capacity factor in training (0 or none: dropless)"
    eval_capacity_factor: float | None = 2.0
    "expert capacity factor in eval mode (0 or none: dropless)"
    min_capacity: int = 4
    "lower bound of the expert capacity C"
    capacity_mode: str = "openmoe"
    ("openmoe: C = max(round(cf*G/E), min_capacity) (no k); "
     "k_scaled: C = max(ceil(k*cf*G/E), min_capacity) (DeepSpeed)")
    group_size: int | None = None
    "tokens per routing group G (none: one sequence per group)"
    slot_priority: str = "position"
    ("who gets capacity first: position (OpenMoE: first choices in token order), "
     "probability (batch-prioritised) or random")
    renormalize: bool = False
    ("renormalise the top-k combine weights to sum 1 (Mixtral) instead of raw softmax "
     "probabilities (OpenMoE)")
    aux_loss_coef: float = 0.01
    "weight of the load-balance loss L_aux = E * sum_i f_i P_i (Switch eq. 4-6)"
    z_loss_coef: float = 1e-4
    "weight of the router z-loss mean(logsumexp(z)^2) (ST-MoE)"
    tie_embeddings: bool = True
    "the LM head is the embedding transposed"
    rope_base: float = 10000.0
    "RoPE frequency base"
    norm_eps: float = 1e-6
    "RMSNorm epsilon"
    init_std: float = 0.02
    "standard deviation of the normal weight init"
    dtype: str = "float32"
    "floating-point type of weights and activations"
    # -- OpenMoE's original code (docs/openmoe-facts.md §4, §8, §9); the defaults change nothing
    ffn_kind: str = "swiglu"
    ("form of the dense, shared and expert FFNs: swiglu (W_down(silu(x W_gate) * x W_up), "
     "3 d ff weights) or openmoe (the original code's Wo[(x A) * silu(x B) * (x W1)] with "
     "[A | B] = W0 of width 2 ff: 4 d ff weights)")
    logit_z_loss_coef: float = 0.0
    ("weight of the output-logit z-loss, mean over target tokens of logsumexp(logits)^2 "
     "(OpenMoE: 1e-4 in the code, 1e-3 in the paper's Table 12; 0 = off)")
    init: str = "normal"
    ("weight init: normal (every matrix N(0, init_std^2), routers N(0, 0.02^2)) or openmoe "
     "(embedding N(0, 1); other matrices std sqrt(0.1 / fan_in), truncated at 2 std for dense "
     "FFNs and the LM head; routers N(0, 0.02^2))")
    # ---- routing variants (tinymoe.routing_variants; docs/router.md §13)
    router_type: str = "token_choice"
    ("token_choice (each token picks its top-k experts: OpenMoE, Switch, noisy, bias) or "
     "expert_choice (each expert picks its top-C tokens of a group, Zhou et al. 2022; "
     "C from capacity_factor/capacity_mode; a token's routing depends on LATER tokens)")
    router_noise: bool = False
    ("noisy top-k gating (Shazeer et al. 2017): in training, logits + N(0,1) * "
     "softplus(x W_noise) with a trainable W_noise (init 0); noise drawn from the run's "
     "routing RNG (seeded, in checkpoints)")
    router_bias_rate: float = 0.0
    ("bias balancing without aux loss (DeepSeek-V3): a per-expert bias added to the "
     "scores for top-k selection only, moved by this rate times sign(mean load - "
     "load) after every optimizer step (load summed over its micro-batches); 0 = off")
    d_ff_shared: int | None = None
    ("hidden width of the shared FFN of MoE blocks (none: d_ff); s shared fine-grained "
     "experts of width w (DeepSeekMoE) are one shared SwiGLU of width s*w")
    router_score: str = "softmax"
    ("router scores: softmax (OpenMoE: p = softmax(z) over the experts) or sigmoid "
     "(DeepSeek-V3 eq. 13-15: s = sigmoid(z) per expert, top-k on s (+ bias), gate weights "
     "the chosen s normalised to sum 1: needs renormalize=true; the aux loss uses "
     "s / sum_e s, the z-loss stays logsumexp(z)^2)")
    aux_loss_kind: str = "switch"
    ("the load-balance loss L_aux: switch (E * sum_i f_i P_i, Switch eq. 4-6) or shazeer "
     "(Shazeer et al. 2017 eq. 6-11: CV(Importance)^2 + CV(Load)^2 per group, Load from "
     "the normal CDF of the noise; needs router_noise=true), weighted by aux_loss_coef")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check types and ranges; raise a one-line ``ValueError`` naming field and value.

        Ints given where a float is expected are converted to float.
        """
        for name in _INT_FIELDS + _OPT_INT_FIELDS:
            v = getattr(self, name)
            if v is None and name in _OPT_INT_FIELDS:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}={_fmt(v)} must be an integer")
        for name in _FLOAT_FIELDS + _OPT_FLOAT_FIELDS:
            v = getattr(self, name)
            if v is None and name in _OPT_FLOAT_FIELDS:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name}={_fmt(v)} must be a number")
            if not math.isfinite(v):
                raise ValueError(f"{name}={v} must be finite")
            setattr(self, name, float(v))
        for name in _BOOL_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{name}={_fmt(v)} must be True or False")
        for name in _STR_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, str):
                raise ValueError(f"{name}={_fmt(v)} must be a string")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "n_experts",
                     "max_seq_len"):
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"{name}={v} must be positive")
        for name in ("d_ff_expert", "d_head", "group_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}={v} must be positive (or None)")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} < 1")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} > n_experts={self.n_experts}")
        if self.moe_every < 1:
            raise ValueError(f"moe_every={self.moe_every} < 1")
        if self.d_head is None and self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads} (or set d_head)")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} is odd; RoPE needs an even head "
                             f"dimension (d_model={self.d_model}, n_heads={self.n_heads}, "
                             f"d_head={self.d_head})")
        if self.capacity_factor is not None and self.capacity_factor < 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} < 0 "
                             "(use 0 or None for dropless)")
        if self.eval_capacity_factor is not None and self.eval_capacity_factor < 0:
            raise ValueError(f"eval_capacity_factor={self.eval_capacity_factor} < 0 "
                             "(use 0 or None for dropless)")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity={self.min_capacity} < 0")
        self._check_choice("capacity_mode", CAPACITY_MODES)
        self._check_choice("slot_priority", SLOT_PRIORITIES)
        self._check_choice("dtype", DTYPES)
        self._check_choice("ffn_kind", FFN_KINDS)
        self._check_choice("init", INITS)
        for name in ("aux_loss_coef", "z_loss_coef", "init_std", "logit_z_loss_coef"):
            v = getattr(self, name)
            if v < 0:
                raise ValueError(f"{name}={v} < 0")
        for name in ("rope_base", "norm_eps"):
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"{name}={v} must be positive")
        self._validate_variants()

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        """One-line ValueError when the string field ``name`` is not one of ``choices``."""
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")

    def _validate_variants(self) -> None:
        """The routing-variant fields: one line naming the bad setting."""
        self._check_choice("router_type", ROUTER_TYPES)
        if self.router_bias_rate < 0:
            raise ValueError(f"router_bias_rate={self.router_bias_rate} < 0")
        if self.d_ff_shared is not None and self.d_ff_shared <= 0:
            raise ValueError(f"d_ff_shared={self.d_ff_shared} must be positive (or None)")
        self._check_choice("router_score", ROUTER_SCORES)
        self._check_choice("aux_loss_kind", AUX_LOSS_KINDS)
        if self.aux_loss_kind == "shazeer":
            if not self.router_noise:
                raise ValueError("aux_loss_kind='shazeer' needs router_noise=True (its Load is "
                                 "the probability under the gating noise)")
            if self.top_k >= self.n_experts:
                raise ValueError(f"aux_loss_kind='shazeer' needs top_k < n_experts (got "
                                 f"{self.top_k} of {self.n_experts}: no expert is ever left out)")
            if self.router_bias_rate > 0 or self.router_score != "softmax":
                raise ValueError("aux_loss_kind='shazeer' is not supported with bias balancing "
                                 "or sigmoid scores (its Load assumes the top-k of H)")
        if self.router_score == "sigmoid":
            if self.router_type != "token_choice":
                raise ValueError("router_score='sigmoid' is not supported with "
                                 f"router_type={self.router_type!r} (token choice only)")
            if not self.renormalize:
                raise ValueError("router_score='sigmoid' needs renormalize=True (DeepSeek-V3 "
                                 "eq. 13: the chosen sigmoid scores are normalised to sum 1)")
        if self.router_type == "expert_choice":
            for name in ("router_noise", "renormalize"):
                if getattr(self, name):
                    raise ValueError(f"{name}=True is not supported with router_type='expert_choice'")
            if self.router_bias_rate > 0:
                raise ValueError("router_bias_rate > 0 is not supported with "
                                 "router_type='expert_choice' (it is balanced by construction)")
            g = self.group_size if self.group_size is not None else self.max_seq_len
            for name in ("capacity_factor", "eval_capacity_factor"):
                cf = getattr(self, name)
                c = capacity(g, self.n_experts, self.top_k, cf, self.min_capacity,
                             self.capacity_mode)
                if c > g:
                    raise ValueError(f"expert choice: capacity C={c} ({name}={cf}, "
                                     f"capacity_mode={self.capacity_mode!r}, min_capacity="
                                     f"{self.min_capacity}) is larger than the group of G={g} tokens")

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        """Width of one attention head: d_head, or d_model // n_heads when d_head is None."""
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def attn_dim(self) -> int:
        """Attention inner width n_heads * head_dim (width of q, k, v)."""
        return self.n_heads * self.head_dim

    @property
    def expert_ff(self) -> int:
        """Hidden width of one expert's FFN (d_ff_expert, or d_ff when None)."""
        return self.d_ff_expert if self.d_ff_expert is not None else self.d_ff

    @property
    def init_fan_in_scale(self) -> float | None:
        """OpenMoE's init scale 0.1 (``SCALE``, TC-*:40; docs/openmoe-facts.md §9): a matrix
        with fan-in n is drawn with std sqrt(0.1 / n); None with ``init="normal"``."""
        return OPENMOE_INIT_SCALE if self.init == "openmoe" else None

    @property
    def shared_ff(self) -> int:
        """Hidden width of the shared FFN of MoE blocks (d_ff_shared, or d_ff when None)."""
        return self.d_ff_shared if self.d_ff_shared is not None else self.d_ff

    @property
    def moe_layers(self) -> list[int]:
        """0-indexed blocks that hold an MoE: i with (i + 1) % moe_every == 0."""
        return [i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0]

    def is_moe_block(self, i: int) -> bool:
        """True when block ``i`` (0-indexed) is an MoE block."""
        if not 0 <= i < self.n_layers:
            raise IndexError(f"block index {i} out of range for n_layers={self.n_layers}")
        return (i + 1) % self.moe_every == 0

    def is_dropless(self, training: bool = True) -> bool:
        """True when the capacity factor in force (train or eval) is 0 or None."""
        return not (self.capacity_factor if training else self.eval_capacity_factor)

    def capacity(self, group_tokens: int, training: bool = True) -> int:
        """Expert capacity C for a group of ``group_tokens`` tokens (see :func:`capacity`;
        dropless gives C = group_tokens), at the train or eval capacity factor."""
        cf = self.capacity_factor if training else self.eval_capacity_factor
        return capacity(group_tokens, self.n_experts, self.top_k, cf, self.min_capacity,
                        self.capacity_mode)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build a validated config from a dict; unknown or missing keys raise ValueError."""
        _check_keys(d.keys())
        missing = [f.name for f in fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ValueError(f"missing config key(s): {', '.join(missing)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A new validated config with some fields changed (self is untouched)."""
        _check_keys(overrides.keys())
        return ModelConfig(**{**self.to_dict(), **overrides})

    def describe(self) -> str:
        """One-line summary, e.g. for a log header."""
        moe = (f"MoE {self.n_experts}E top-{self.top_k} on blocks "
               f"{','.join(map(str, self.moe_layers))}"
               f"{' +shared FFN' if self.shared_ffn else ''}") if self.moe_layers else "dense"
        heads = f"{self.n_heads}x{self.head_dim} heads"
        ff = f"ff {self.d_ff}" + (f"/expert {self.expert_ff}" if self.expert_ff != self.d_ff
                                  else "")
        cf = "dropless" if not self.capacity_factor else f"cf {self.capacity_factor:g}"
        c = count_parameters(self)
        variant = "".join(part for part, on in (
            (f" {self.router_type}", self.router_type != "token_choice"),
            (" +noise", self.router_noise),
            (f" +bias {self.router_bias_rate:g}", self.router_bias_rate > 0),
            (" sigmoid", self.router_score != "softmax"),
            (" +shazeer loss", self.aux_loss_kind != "switch")) if on)
        return (f"{self.n_layers}L d{self.d_model} {heads} {ff} | {moe} | {cf} "
                f"{self.slot_priority}{variant} | vocab {self.vocab_size} "
                f"{'tied' if self.tie_embeddings else 'untied'} | seq {self.max_seq_len} | "
                f"{_human(c['total'])} params, {_human(c['active'])} active | {self.dtype}")


def _field_names() -> list[str]:
    return [f.name for f in fields(ModelConfig)]


def _check_keys(keys: Iterable[str]) -> None:
    """Raise one ValueError listing every unknown key with its closest field names."""
    names = _field_names()
    unknown = [k for k in keys if k not in names]
    if not unknown:
        return
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        parts.append(f"{k!r}{hint}")
    raise ValueError(f"unknown config key(s): {', '.join(parts)}")


def _human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


# ---------------------------------------------------------------------- string overrides
def _parse_value(name: str, text: str) -> Any:
    """Parse one CLI override value according to the field's type."""
    low = text.strip().lower()
    try:
        if name in _OPT_INT_FIELDS + _OPT_FLOAT_FIELDS and low in ("none", "null", ""):
            return None
        if name in _INT_FIELDS + _OPT_INT_FIELDS:
            return int(text)
        if name in _FLOAT_FIELDS + _OPT_FLOAT_FIELDS:
            return float(text)
    except ValueError:
        kind = "an integer" if name in _INT_FIELDS + _OPT_INT_FIELDS else "a number"
        raise ValueError(f"{name}={text!r} must be {kind}") from None
    if name in _BOOL_FIELDS:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={text!r} must be true or false")
    return text


def parse_overrides(items: Iterable[str] | dict[str, Any]) -> dict[str, Any]:
    """Turn ``["top_k=1", "capacity_factor=none"]`` (or a dict of strings) into typed values.

    Values that are not strings pass through unchanged. Unknown keys raise ValueError with
    suggestions; so does an item without '='.
    """
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            k, v = item.split("=", 1)
            pairs.append((k.strip(), v))
    _check_keys(k for k, _ in pairs)
    return {k: _parse_value(k, v) if isinstance(v, str) else v for k, v in pairs}


# ---------------------------------------------------------------------- presets
_BYTE_VOCAB = 258  # 256 bytes + BOS (256) + EOS (257)
_OPENMOE_VOCAB = 256_384  # umT5 sentencepiece 256,000 + 300 extra ids, padded

PRESETS: dict[str, ModelConfig] = {
    # Seconds: used by tests.
    "toy": ModelConfig(vocab_size=_BYTE_VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                       n_experts=4, top_k=2, moe_every=2, max_seq_len=64),
    # Default of `python -m tinymoe train`: about 2.3M parameters, trains on 2 CPU cores.
    "mini": ModelConfig(vocab_size=_BYTE_VOCAB, d_model=128, n_layers=4, n_heads=4, d_ff=256,
                        n_experts=8, top_k=2, moe_every=2, max_seq_len=128),
    # The routing lab (`python -m tinymoe findings --config lab`): mini's shape with the
    # experts carrying every FFN (MoE in all 4 blocks, no shared FFN), so removing them
    # removes the model's FFNs; capacity k-scaled (C = ceil(k cf G / E)) over groups of
    # 2048 tokens (a whole 16 x 128 batch, OpenMoE's groups are 4096), so a token's second
    # choice is not dropped by the formula itself (docs/findings.md section 3).
    "lab": ModelConfig(vocab_size=_BYTE_VOCAB, d_model=128, n_layers=4, n_heads=4, d_ff=256,
                       n_experts=8, top_k=2, moe_every=1, shared_ffn=False, max_seq_len=128,
                       capacity_mode="k_scaled", group_size=2048),
    # A laptop in under an hour (with a BPE vocabulary of 4096).
    "small": ModelConfig(vocab_size=4096, d_model=256, n_layers=8, n_heads=8, d_ff=1024,
                         n_experts=8, top_k=2, moe_every=2, max_seq_len=256),
    # OpenMoE-Base/16E with the paper's dimensions (Table 11: FFN 3072). The original has
    # an untied output head (and FFN width 2048 in code); tied here for one embedding,
    # which reproduces the paper's 650M.
    "openmoe-base": ModelConfig(vocab_size=_OPENMOE_VOCAB, d_model=768, n_layers=12,
                                n_heads=12, d_ff=3072, n_experts=16, top_k=2, moe_every=4,
                                max_seq_len=2048, group_size=4096),
    # OpenMoE-8B/32E: 24 heads x 128 on d_model 2048; MoE blocks 5, 11, 17, 23.
    # The original has an untied output head; tied here for consistency with the family.
    "openmoe-8b": ModelConfig(vocab_size=_OPENMOE_VOCAB, d_model=2048, n_layers=24,
                              n_heads=24, d_head=128, d_ff=8192, n_experts=32, top_k=2,
                              moe_every=6, max_seq_len=2048, group_size=4096),
    # OpenMoE-34B/32E: 24 heads x 128 on d_model 3072; MoE blocks 3, 7, ..., 31.
    # Untied head in the original. Router z-loss 1e-3 and group size 8192 as in the last
    # commit of its gin file (OM-xl:25-26; docs/openmoe-facts.md §1, §8).
    "openmoe-34b": ModelConfig(vocab_size=_OPENMOE_VOCAB, d_model=3072, n_layers=32,
                               n_heads=24, d_head=128, d_ff=12288, n_experts=32, top_k=2,
                               moe_every=4, max_seq_len=2048, group_size=8192,
                               z_loss_coef=1e-3),
    # OpenMoE-Base/16E as the original code built it (docs/openmoe-facts.md §1, §4, §5,
    # §8, §9): FFN width 2048 in the 4-matrix form, untied output head, output-logit
    # z-loss 1e-4, OpenMoE's init.
    "openmoe-base-code": ModelConfig(vocab_size=_OPENMOE_VOCAB, d_model=768, n_layers=12,
                                     n_heads=12, d_ff=2048, n_experts=16, top_k=2,
                                     moe_every=4, max_seq_len=2048, group_size=4096,
                                     tie_embeddings=False, ffn_kind="openmoe",
                                     logit_z_loss_coef=1e-4, init="openmoe"),
}

# What the literature reports for a preset (printed by ``python -m tinymoe params``).
PRESET_LITERATURE: dict[str, str] = {
    "openmoe-base": ("paper Table 11 (OpenMoE-Base/16E): 650M total, 339M active with "
                     "embedding, 142M active without"),
    "openmoe-base-code": ("paper Table 11 (OpenMoE-Base/16E): 650M total, 339M active with "
                          "embedding, 142M active without; the code's form reproduces the two "
                          "active counts (docs/openmoe-facts.md §13)"),
}

DEFAULT_PRESET = "mini"


def preset_names() -> list[str]:
    """Names of the built-in presets, smallest first."""
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh copy of preset ``name`` with ``overrides`` applied (and validated).

    Underscores are accepted for hyphens ("openmoe_base"). Unknown names raise ValueError
    listing the presets.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in PRESETS:
        close = difflib.get_close_matches(key, list(PRESETS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint}; choose one of: "
                         f"{', '.join(PRESETS)}")
    return PRESETS[key].replace(**overrides)


# ---------------------------------------------------------------------- shapes and counts
def _ffn_shapes(prefix: str, d: int, f: int, kind: str) -> dict[str, tuple[int, ...]]:
    """A dense FFN's weights (Linear weights stored [in, out]):
    swiglu  out = W_down (silu(x W_gate) * (x W_up)): w_gate, w_up [d, f], w_down [f, d];
    openmoe out = Wo [(x A) * silu(x B) * (x W1)], [A | B] = W0: wi_0 [d, 2f], wi_1 [d, f],
            wo [f, d] (flaxformer's names)."""
    if kind == "openmoe":
        return {f"{prefix}.wi_0.weight": (d, 2 * f), f"{prefix}.wi_1.weight": (d, f),
                f"{prefix}.wo.weight": (f, d)}
    return {f"{prefix}.w_gate.weight": (d, f), f"{prefix}.w_up.weight": (d, f),
            f"{prefix}.w_down.weight": (f, d)}


def _expert_shapes(prefix: str, E: int, d: int, f: int, kind: str) -> dict[str, tuple[int, ...]]:
    """The stacked expert weights: the FFN form of :func:`_ffn_shapes` with a leading E."""
    return {f"{prefix}.{name.rsplit('.', 2)[1]}": (E, *shape)
            for name, shape in _ffn_shapes(prefix, d, f, kind).items()}


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in module order, without allocating anything.

    The model's state_dict uses exactly these names. Linear weights are stored [in, out].
    Expert weights are stacked over experts: w_gate/w_up [E, d, f], w_down [E, f, d]
    (``ffn_kind="openmoe"``: wi_0 [E, d, 2f], wi_1 [E, d, f], wo [E, f, d]).
    """
    d, V, E, A = cfg.d_model, cfg.vocab_size, cfg.n_experts, cfg.attn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (V, d)}
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        shapes[f"{b}.attn_norm.weight"] = (d,)
        shapes[f"{b}.attn.wq.weight"] = (d, A)
        shapes[f"{b}.attn.wk.weight"] = (d, A)
        shapes[f"{b}.attn.wv.weight"] = (d, A)
        shapes[f"{b}.attn.wo.weight"] = (A, d)
        shapes[f"{b}.ffn_norm.weight"] = (d,)
        if cfg.is_moe_block(i):
            f = cfg.expert_ff
            shapes[f"{b}.moe.router.weight"] = (d, E)
            if cfg.router_noise:
                shapes[f"{b}.moe.router.noise_weight"] = (d, E)
            if cfg.router_bias_rate > 0:
                shapes[f"{b}.moe.router.bias"] = (E,)
            shapes.update(_expert_shapes(f"{b}.moe.experts", E, d, f, cfg.ffn_kind))
            if cfg.shared_ffn:
                shapes[f"{b}.shared_norm.weight"] = (d,)
                shapes.update(_ffn_shapes(f"{b}.shared_ffn", d, cfg.shared_ff, cfg.ffn_kind))
        else:
            shapes.update(_ffn_shapes(f"{b}.ffn", d, cfg.d_ff, cfg.ffn_kind))
    shapes["norm_f.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (d, V)
    return shapes


COMPONENTS = ("embedding", "lm_head", "attention", "dense_ffn", "experts", "shared_ffn",
              "routers", "norms")


def component_of(name: str) -> str:
    """Which component (one of COMPONENTS) a parameter name belongs to."""
    if name == "tok_emb.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".moe.router." in name:
        return "routers"
    if ".moe.experts." in name:
        return "experts"
    if ".shared_ffn." in name:
        return "shared_ffn"
    if ".ffn." in name:
        return "dense_ffn"
    raise ValueError(f"parameter name {name!r} belongs to no known component")


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by component, derived from :func:`parameter_shapes`.

    Keys: the COMPONENTS, then
      total               all parameters (a tied embedding counted once);
      active              per token: embedding once + LM head if untied + attention +
                          top_k of the n_experts experts + shared/dense FFNs + routers + norms;
      experts_active      the top_k/E share of the expert parameters;
      total_blocks_only   parameters under ``blocks.*`` (no embedding, head, final norm);
      active_blocks_only  the same, per token (top_k experts).
    """
    counts = {c: 0 for c in COMPONENTS}
    blocks_total = 0
    for name, shape in parameter_shapes(cfg).items():
        n = math.prod(shape)
        counts[component_of(name)] += n
        if name.startswith("blocks."):
            blocks_total += n
    # Each expert tensor has a leading E axis; a token uses top_k of the E slices.
    experts_active = counts["experts"] // cfg.n_experts * cfg.top_k
    expert_skip = counts["experts"] - experts_active
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    counts["active"] = counts["total"] - expert_skip
    counts["experts_active"] = experts_active
    counts["total_blocks_only"] = blocks_total
    counts["active_blocks_only"] = blocks_total - expert_skip
    return counts


def memory_bytes(cfg: ModelConfig, dtype: str | None = None) -> dict[str, int]:
    """Bytes for weights, gradients and optimizer state (``dtype`` defaults to cfg.dtype).

    weights, grads: one value per parameter.
    adamw:          two moments (m, v) per parameter -> 2 x weights.
    adafactor:      factored second moment (Shazeer & Stern 2018, no momentum as in
                    OpenMoE): a matrix [r, c] keeps r + c values, each expert matrix of a
                    stacked [E, r, c] tensor keeps r + c, a vector keeps all its values.
                    (A matrix with a dim < 128 is stored unfactored; counted factored here.)
    """
    dtype = cfg.dtype if dtype is None else dtype
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    size = _DTYPE_BYTES[dtype]
    n_params = 0
    n_adafactor = 0
    for shape in parameter_shapes(cfg).values():
        n_params += math.prod(shape)
        if len(shape) == 1:
            n_adafactor += shape[0]
        else:  # [..., r, c]: one row vector and one column vector per matrix
            n_adafactor += math.prod(shape[:-2]) * (shape[-2] + shape[-1])
    return {"bytes_per_value": size, "weights": n_params * size, "grads": n_params * size,
            "adamw": 2 * n_params * size, "adafactor": n_adafactor * size}

