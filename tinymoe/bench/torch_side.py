"""The benchmark's PyTorch side: the same OpenMoE model, written as a speed-minded PyTorch
user would write it, on the same weights (loaded from tinymoe's ``state_dict``).

Same function as :class:`tinymoe.nn.model.OpenMoE`: pre-norm blocks, RMSNorm, rotate-half
RoPE, causal attention, SwiGLU FFNs, token-choice top-k MoE with OpenMoE's capacity and
drops, slot priority, combine weights, aux and z losses, the shared FFN after the MoE, the
tied (or untied) LM head. Written for speed with what PyTorch offers:

- ``torch.nn.functional.rms_norm`` and ``scaled_dot_product_attention(is_causal=True)``
  (PyTorch's fused kernels: flash / memory-efficient attention where available);
- one fused QKV projection per block, ``[d, 3 H dh]``: the three weights are
  concatenated once at load; likewise one ``[d, 2 f]`` gate|up projection per SwiGLU
  (``[E, d, 2 f]`` for the experts); RoPE from tables computed once;
- routing vectorised over all groups at once: softmax, top-k, then the slots of every
  group from one ``cumsum`` of a one-hot tensor ``[n_groups, k G, E]`` over the k-major
  queue (rank-0 choices first; the flaxformer formula, no loop over groups);
- experts computed on the kept rows only: rows sorted by expert, one GEMM per expert and
  weight (as Hugging Face's Mixtral loops over experts), added back with ``index_add_``;
- ``torch.optim.AdamW(foreach=True)`` (or ``Adafactor(foreach=True)``) and
  ``clip_grad_norm_(foreach=True)``; ``inference_mode`` for generation, with its own
  KV cache and cached forward.

It runs eager (no ``torch.compile``), as tinymoe does. Choices that keep tinymoe's
semantics where the fast PyTorch call would not:

- top-k by a stable descending sort of the probabilities, not ``torch.topk``, whose order
  among equal values is unspecified: ties go to the lower expert index, as in tinymoe;
- slot priority "probability" sorts stably (ties by position); "random" draws its own
  permutations from torch's generator (the same distribution as tinymoe's, not the same
  draws, so only "position" and "probability" give identical decisions).

``torch`` is imported at the top of this module: ``bench`` imports the module only for
``--compare-torch``, so tinymoe itself never needs PyTorch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as TF
from torch import nn

from tinymoe import backend as B
from tinymoe.config import ModelConfig
from tinymoe.routing import capacity
from tinymoe.train import TrainConfig

np = B.np

__all__ = ["TorchOpenMoE", "TorchOutput", "TorchSide", "setup_torch", "torch_gemm_roof"]


# ----------------------------------------------------------------------------- loading

class _Loader:
    """Makes parameters from tinymoe's state dict, concatenating several along ``dim`` when
    asked, and remembers how to cut them back into tinymoe's names (for the tests)."""

    def __init__(self, state: Mapping[str, Any], dtype: torch.dtype, device: torch.device):
        # state: name -> NumPy or CuPy array (copied through the host)
        self.state, self.dtype, self.device = state, dtype, device
        self.sources: list[tuple[nn.Parameter, tuple[str, ...], int]] = []

    def __call__(self, *names: str, dim: int = -1) -> nn.Parameter:
        parts = [torch.as_tensor(B.to_numpy(self.state[n]), dtype=self.dtype, device=self.device) for n in names]
        p = nn.Parameter(torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone())
        self.sources.append((p, names, dim))
        return p


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x cos + [-x2, x1] sin; x [B, H, T, dh], cos/sin [T, dh]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """(silu(x W_gate) * (x W_up)) W_down with W_gate|W_up fused: [.., d] -> [.., d]."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)                       # [.., 2f] -> [.., f] x 2
    return (TF.silu(gate) * up) @ w_down


# ----------------------------------------------------------------------------- modules

class TorchMoE(nn.Module):
    """Token-choice top-k MoE with OpenMoE capacity: routing vectorised over groups, experts
    on the kept rows sorted by expert."""

    def __init__(self, cfg: ModelConfig, load: _Loader, prefix: str):
        super().__init__()
        self.cfg = cfg
        self.router = load(f"{prefix}.router.weight")                                      # [d, E]
        self.w_gate_up = load(f"{prefix}.experts.w_gate", f"{prefix}.experts.w_up", dim=2)  # [E, d, 2f]
        self.w_down = load(f"{prefix}.experts.w_down")                                     # [E, f, d]

    def route(self, logits: torch.Tensor, seq: int) -> tuple[torch.Tensor, ...]:
        """logits [N, E] -> (expert [N, k], combine weight [N, k] (0 where dropped),
        kept [N, k], aux, z)."""
        cfg = self.cfg
        n, n_exp = logits.shape
        k = cfg.top_k
        g = seq if cfg.group_size is None else cfg.group_size         # tinymoe: one sequence per group by default
        g = n if g >= n else g                                        # a group larger than the batch: one group
        if n % g:
            raise ValueError(f"group_size={g} does not divide the number of tokens N={n}")
        n_groups = n // g
        cf = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        cap = capacity(g, n_exp, k, cf, cfg.min_capacity, cfg.capacity_mode)

        probs = torch.softmax(logits, dim=-1)                                        # [N, E]
        expert = probs.detach().sort(dim=-1, descending=True, stable=True).indices[:, :k]  # [N, k]
        top_p = probs.gather(1, expert)                                              # [N, k]
        weight = top_p / top_p.sum(dim=-1, keepdim=True) if cfg.renormalize else top_p

        # the k-major queue of every group: rank-0 choices, then rank-1 ... [ng, k, G]
        queue = expert.view(n_groups, g, k).transpose(1, 2)                          # [ng, k, G]
        order = None
        if cfg.slot_priority == "probability":
            score = top_p.detach().view(n_groups, g, k).transpose(1, 2)              # [ng, k, G]
            order = (-score).argsort(dim=-1, stable=True)                            # ties by position
        elif cfg.slot_priority == "random":
            order = torch.rand(n_groups, k, g, device=logits.device).argsort(dim=-1)
        if order is not None:
            queue = queue.gather(2, order)                                           # [ng, k, G] served order
        one_hot = TF.one_hot(queue.reshape(n_groups, k * g), n_exp)                  # [ng, kG, E]
        slot = ((one_hot.cumsum(dim=1) - 1) * one_hot).sum(dim=-1)                  # [ng, kG]
        kept = (slot < cap).view(n_groups, k, g)                                     # [ng, k, G] served order
        if order is not None:
            kept = torch.empty_like(kept).scatter_(2, order, kept)                   # back to token order
        kept = kept.transpose(1, 2).reshape(n, k)                                    # [N, k]

        chosen = TF.one_hot(expert, n_exp).sum(dim=1).to(probs.dtype)               # [N, E] (constant)
        f = chosen.view(n_groups, g, n_exp).mean(dim=1)                              # [ng, E]
        mean_prob = probs.view(n_groups, g, n_exp).mean(dim=1)                       # [ng, E]
        aux = (n_exp * (f * mean_prob).sum(dim=-1)).mean()                          # Switch eq. 4-6, top-k
        z = (torch.logsumexp(logits, dim=-1) ** 2).mean()                           # ST-MoE eq. 5
        return expert, weight * kept, kept, aux, z

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (y [B, T, d], aux, z, kept [N, k])."""
        bsz, seq, d = x.shape
        tokens = x.reshape(bsz * seq, d)                                             # [N, d]
        expert, weight, kept, aux, z = self.route(tokens @ self.router, seq)
        tok, rank = kept.nonzero(as_tuple=True)                                      # [M] kept assignments
        by_expert = expert[tok, rank].argsort(stable=True)
        tok, rank = tok[by_expert], rank[by_expert]                                  # sorted by expert
        sizes = torch.bincount(expert[tok, rank], minlength=self.cfg.n_experts).tolist()
        outs = [_swiglu(rows, self.w_gate_up[e], self.w_down[e])                     # [n_e, d], one GEMM each
                for e, rows in enumerate(tokens[tok].split(sizes)) if sizes[e]]
        out = torch.cat(outs) if outs else tokens.new_zeros(0, d)                    # [M, d]
        y = tokens.new_zeros(tokens.shape).index_add_(0, tok, out * weight[tok, rank, None])  # [N, d]
        return y.view(bsz, seq, d), aux, z, kept


class TorchBlock(nn.Module):
    """Pre-norm block: h += Attn(N(h)); then h += FFN(N(h)), or h += MoE(N(h)) and
    h += FFN_shared(N'(h))."""

    def __init__(self, cfg: ModelConfig, i: int, load: _Loader):
        super().__init__()
        b = f"blocks.{i}"
        self.cfg, self.is_moe = cfg, cfg.is_moe_block(i)
        self.attn_norm = load(f"{b}.attn_norm.weight")                                          # [d]
        self.wqkv = load(f"{b}.attn.wq.weight", f"{b}.attn.wk.weight", f"{b}.attn.wv.weight")  # [d, 3 H dh]
        self.wo = load(f"{b}.attn.wo.weight")                                                   # [H dh, d]
        self.ffn_norm = load(f"{b}.ffn_norm.weight")
        self.has_shared = self.is_moe and cfg.shared_ffn
        if self.is_moe:
            self.moe = TorchMoE(cfg, load, f"{b}.moe")
            if self.has_shared:
                self.shared_norm = load(f"{b}.shared_norm.weight")
                self.shared_gate_up = load(f"{b}.shared_ffn.w_gate.weight", f"{b}.shared_ffn.w_up.weight")
                self.shared_down = load(f"{b}.shared_ffn.w_down.weight")
        else:
            self.ffn_gate_up = load(f"{b}.ffn.w_gate.weight", f"{b}.ffn.w_up.weight")      # [d, 2f]
            self.ffn_down = load(f"{b}.ffn.w_down.weight")                                 # [f, d]

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return TF.rms_norm(x, (x.shape[-1],), w, self.cfg.norm_eps)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
        """x [B, T, d] at positions start.. -> [B, T, d]; with a cache, k and v of the new
        positions are written into it and the queries attend to every cached key."""
        bsz, seq, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = (x @ self.wqkv).view(bsz, seq, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, dh] x 3
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if cache is None:
            o = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            ck, cv = cache                                                           # [B, H, L, dh]
            ck[:, :, start:start + seq] = k
            cv[:, :, start:start + seq] = v
            k, v = ck[:, :, :start + seq], cv[:, :, :start + seq]                    # [B, H, S, dh]
            if seq == 1:                                                             # one new token sees all
                o = TF.scaled_dot_product_attention(q, k, v)
            elif start == 0:                                                         # prefill: plain causal
                o = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:   # is_causal aligns the mask top-left; new queries sit bottom-right
                S = start + seq
                mask = torch.ones(seq, S, dtype=torch.bool, device=q.device).tril(diagonal=S - seq)
                o = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(bsz, seq, H * dh) @ self.wo                # [B, T, d]

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> tuple:
        """h [B, T, d] -> (h, aux, z, kept) (the last three None in a dense block)."""
        h = h + self.attention(self._norm(h, self.attn_norm), cos, sin, cache, start)
        x = self._norm(h, self.ffn_norm)
        if not self.is_moe:
            return h + _swiglu(x, self.ffn_gate_up, self.ffn_down), None, None, None
        y, aux, z, kept = self.moe(x)
        h = h + y
        if self.has_shared:
            h = h + _swiglu(self._norm(h, self.shared_norm), self.shared_gate_up, self.shared_down)
        return h, aux, z, kept


@dataclass
class TorchOutput:
    """logits [B, T, V]; ce, aux, z, loss (0-d; ce and loss None without targets); kept
    [N, k] bool per MoE layer."""

    logits: torch.Tensor
    ce: torch.Tensor | None
    aux: torch.Tensor
    z: torch.Tensor
    loss: torch.Tensor | None
    kept: list[torch.Tensor] = field(default_factory=list)


class TorchOpenMoE(nn.Module):
    """The decoder: embedding -> blocks -> RMSNorm -> LM head (tied: logits = h E^T).
    Loss = CE + aux_loss_coef * mean(L_aux) + z_loss_coef * mean(L_z) over MoE layers."""

    def __init__(self, cfg: ModelConfig, state: Mapping[str, Any], device: Any = None):
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        device = torch.get_default_device() if device is None else torch.device(device)
        load = _Loader(state, dtype, device)
        self.tok_emb = load("tok_emb.weight")                                        # [V, d]
        self.blocks = nn.ModuleList(TorchBlock(cfg, i, load) for i in range(cfg.n_layers))
        self.norm_f = load("norm_f.weight")
        self.lm_head = None if cfg.tie_embeddings else load("lm_head.weight")       # [d, V]
        self._sources = load.sources
        dh = cfg.head_dim
        inv_freq = cfg.rope_base ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)    # [dh/2]
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)  # [L, dh/2]
        angles = torch.cat((angles, angles), dim=-1)                                         # [L, dh]
        self.register_buffer("cos", angles.cos().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype=dtype, device=device), persistent=False)

    def new_cache(self, batch: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Empty (k, v) caches [batch, H, max_len, dh] per block."""
        c = self.cfg
        shape = (batch, c.n_heads, max_len, c.head_dim)
        return [(self.cos.new_zeros(shape), self.cos.new_zeros(shape)) for _ in range(c.n_layers)]

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list | None = None, start: int = 0) -> TorchOutput:
        """ids [B, T] (at positions start.. with a cache) -> :class:`TorchOutput`."""
        cfg = self.cfg
        seq = ids.shape[1]
        cos, sin = self.cos[start:start + seq], self.sin[start:start + seq]          # [T, dh]
        h = TF.embedding(ids, self.tok_emb)                                          # [B, T, d]
        auxes, zs, kept = [], [], []
        for i, block in enumerate(self.blocks):
            h, aux, z, kp = block(h, cos, sin, None if cache is None else cache[i], start)
            if aux is not None:
                auxes.append(aux)
                zs.append(z)
                kept.append(kp)
        h = TF.rms_norm(h, (cfg.d_model,), self.norm_f, cfg.norm_eps)
        logits = TF.linear(h, self.tok_emb) if self.lm_head is None else h @ self.lm_head  # [B, T, V]
        zero = logits.new_zeros(())
        aux = torch.stack(auxes).mean() if auxes else zero
        z = torch.stack(zs).mean() if zs else zero
        ce = loss = None
        if targets is not None:
            ce = TF.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            loss = ce + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        return TorchOutput(logits, ce, aux, z, loss, kept)

    def tinymoe_named(self, which: Callable[[nn.Parameter], torch.Tensor | None] = lambda p: p
                      ) -> dict[str, np.ndarray]:
        """``which(p)`` of every parameter (the weight by default; ``lambda p: p.grad`` for
        the gradients) cut back into tinymoe's parameter names, as NumPy arrays."""
        out: dict[str, np.ndarray] = {}
        for p, names, dim in self._sources:
            t = which(p)
            if t is None:
                continue
            parts = t.detach().chunk(len(names), dim=dim) if len(names) > 1 else (t.detach(),)
            out.update({n: part.cpu().numpy() for n, part in zip(names, parts)})
        return out


# ----------------------------------------------------------------------------- the side

def setup_torch(threads: dict[str, Any], device: str) -> None:
    """torch on the benchmark's thread count, and on the GPU when tinymoe is."""
    n = threads.get("threads")
    if n:
        torch.set_num_threads(int(n))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--compare-torch with --device cuda needs a CUDA build of PyTorch")
        torch.set_default_device("cuda")
    threads["torch_threads"] = torch.get_num_threads()


def _sync() -> None:
    if torch.cuda.is_available() and torch.get_default_device().type == "cuda":
        torch.cuda.synchronize()                                      # CUDA kernels are asynchronous


def torch_gemm_roof(n: int, repeats: int, timer: Callable) -> dict[str, Any]:
    """float32 n x n matmul rate of torch (best of ``repeats``), timed by ``timer``
    (:func:`tinymoe.bench.measure.median_time`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def gemm() -> None:
        a @ b
        _sync()

    _, times = timer(gemm, repeats, 2)
    return {"n": n, "flops_per_s": 2.0 * n ** 3 / min(times), "seconds": times}


class TorchSide:
    """:class:`TorchOpenMoE` on tinymoe's weights and batch, its optimizer, one method per phase."""

    def __init__(self, cfg: ModelConfig, state: Mapping[str, Any], x: Any, y: Any, train_cfg: TrainConfig):
        self.cfg, self.train_cfg = cfg, train_cfg
        self.model = TorchOpenMoE(cfg, state)
        self.params = list(self.model.parameters())
        decay = [p for p in self.params if p.ndim >= 2]               # matrices, as tinymoe
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if train_cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                                         eps=1e-8, foreach=True)
        else:   # factored second moments, decay t^-0.8, no momentum (torch's own Adafactor)
            self.opt = torch.optim.Adafactor(groups, lr=train_cfg.lr, beta2_decay=-0.8, d=1.0, foreach=True)
        device = self.model.cos.device
        self.x = torch.as_tensor(np.asarray(x), device=device)        # [B, T]
        self.y = torch.as_tensor(np.asarray(y), device=device)

    def sync(self) -> None:
        _sync()

    def forward(self) -> float:
        with torch.no_grad():
            return float(self.model(self.x, self.y).loss.item())

    def fwd_bwd(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(self.x, self.y).loss
        loss.backward()
        return float(loss.item())

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(self.x, self.y).loss
        value = float(loss.item())
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(self.params, self.train_cfg.grad_clip, foreach=True)
        self.opt.step()
        return value

    def generate(self, prompt: Any, n_new: int) -> tuple[float, float, list[int]]:
        """Greedy KV-cache decoding of ``prompt [1, P]`` in eval mode (eval capacity
        factor); returns (prefill seconds, decode seconds, the n_new new ids)."""
        model = self.model
        model.eval()
        try:
            with torch.inference_mode():
                ids = torch.as_tensor(np.asarray(prompt), device=model.cos.device)
                cache = model.new_cache(1, ids.shape[1] + n_new)
                _sync()
                t0 = time.perf_counter()
                nxt = int(model(ids, cache=cache).logits[0, -1].argmax())
                t1 = time.perf_counter()
                out, pos = [nxt], ids.shape[1]
                for _ in range(n_new - 1):
                    step = torch.tensor([[nxt]], device=ids.device)
                    nxt = int(model(step, cache=cache, start=pos).logits[0, -1].argmax())
                    out.append(nxt)
                    pos += 1
                _sync()
                t2 = time.perf_counter()
        finally:
            model.train()
        return t1 - t0, t2 - t1, out
