"""The benchmark's tinymoe side: model, optimizer and a fixed batch, one method per phase.

The optimizer is the one ``python -m tinymoe train`` builds (:func:`tinymoe.optim.configure_optimizers`
from a :class:`tinymoe.train.TrainConfig`), so a "step" here costs what a training step costs.
"""
from __future__ import annotations

import time
from typing import Any

from tinymoe import backend as B
from tinymoe.autograd import no_grad
from tinymoe.config import ModelConfig
from tinymoe.nn.model import OpenMoE
from tinymoe.optim import clip_grad_norm_
from tinymoe.optim import configure_optimizers
from tinymoe.train import TrainConfig

__all__ = ["TinymoeSide", "bench_train_config", "check_dtype"]

# the benchmark's learning rates (the value does not change the cost of a step)
LEARNING_RATE = {"adamw": 1e-4, "adafactor": 1e-2}


def bench_train_config(optimizer: str) -> TrainConfig:
    """The training settings both sides build their optimizer from: AdamW (betas 0.9, 0.95,
    eps 1e-8) or Adafactor as OpenMoE ran it, weight decay 0.1 on matrices, clip 1.0."""
    lr = LEARNING_RATE[optimizer]
    return TrainConfig(optimizer=optimizer, lr=lr, min_lr=lr, weight_decay=0.1, grad_clip=1.0)


def check_dtype(model: OpenMoE, dtype: str) -> list[str]:
    """Names of parameters (or grads) whose dtype is not the model's: float64 creep."""
    bad = []
    for name, p in model.named_parameters():
        if str(p.data.dtype) != dtype:
            bad.append(f"{name} data {p.data.dtype}")
        if p.grad is not None and str(p.grad.dtype) != dtype:
            bad.append(f"{name} grad {p.grad.dtype}")
    return bad


class TinymoeSide:
    """tinymoe model, optimizer and a fixed batch [batch, seq] of random ids."""

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, train_cfg: TrainConfig, seed: int):
        self.cfg, self.train_cfg = cfg, train_cfg
        self.model = OpenMoE(cfg, seed=seed)
        self.params = list(self.model.parameters())
        self.opt = configure_optimizers(self.model, train_cfg)
        rng = B.default_rng(seed + 1)
        ids = rng.integers(0, cfg.vocab_size, size=(batch, seq + 1))      # [B, T + 1]
        self.x, self.y = ids[:, :-1], ids[:, 1:]                           # [B, T] each
        self.route_rng = B.default_rng(seed + 2)

    def sync(self) -> None:
        B.synchronize()

    def kept_fraction(self) -> float:
        """Share of the k expert assignments per token that capacity keeps on this batch
        (mean over MoE layers; 1.0 for a dense model). The torch side drops the same ones."""
        with no_grad():
            routing = self.model(self.x, rng=B.default_rng(0)).routing
        if not routing:
            return 1.0
        k = self.cfg.top_k
        return sum(float(B.to_numpy(s.load_after).sum()) / (s.kept.shape[0] * k) for s in routing) / len(routing)

    def forward(self) -> float:
        with no_grad():
            return float(self.model(self.x, targets=self.y, rng=self.route_rng).loss.item())

    def fwd_bwd(self) -> float:
        self.model.zero_grad()
        out = self.model(self.x, targets=self.y, rng=self.route_rng)
        out.loss.backward()
        return float(out.loss.item())

    def step(self) -> float:
        self.opt.zero_grad()
        out = self.model(self.x, targets=self.y, rng=self.route_rng)
        loss = float(out.loss.item())
        out.loss.backward()
        del out
        clip_grad_norm_(self.params, self.train_cfg.grad_clip)
        self.opt.step()
        return loss

    def generate(self, prompt: Any, n_new: int) -> tuple[float, float, list[int]]:
        """Greedy KV-cache decoding of ``prompt [1, P]``; returns (prefill seconds, decode
        seconds, the n_new new ids)."""
        model = self.model
        with model.evaluating():   # eval-mode routing, no graph; the mode is restored after
            cache = model.new_cache(1, prompt.shape[1] + n_new)
            B.synchronize()
            t0 = time.perf_counter()
            logits = model(prompt, cache=cache).logits.data[0, -1]           # [V]
            nxt = int(logits.argmax())
            t1 = time.perf_counter()
            ids = [nxt]
            for _ in range(n_new - 1):
                logits = model(B.np.asarray([[nxt]]), cache=cache).logits.data[0, -1]
                nxt = int(logits.argmax())
                ids.append(nxt)
            B.synchronize()
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, ids
