"""Text generation with a KV cache: prefill the prompt once, then one token per forward.

Each new token costs one forward over a single position: its keys and values are
appended to every layer's cache and its query attends over all cached positions, so the
logits equal those of a full forward over the whole sequence (``tests/test_generate.py``
checks greedy decoding against exactly that). The model runs in eval mode (eval capacity
factor) under ``model.evaluating()`` (eval mode, no graph).

Choosing the next token from the last position's logits z (float64 on the host):

    greedy (or temperature 0)   argmax z (ties: the lowest id)
    otherwise                   p = softmax(z / temperature), then
        top_k                   keep the k most probable ids (ties: lower ids first)
        top_p (nucleus)         keep the smallest set of most probable ids whose total
                                probability reaches top_p (Holtzman et al. 2020)
                                renormalise and draw one id with a seeded NumPy generator

A context longer than the model's ``max_seq_len`` (RoPE positions and cache size) is cut:
when the cache is full, it is rebuilt from the last ``max_seq_len // 2`` tokens. Non-finite
logits (a model whose weights hold NaN or inf) stop generation with a one-line ValueError
instead of drawing tokens from NaN probabilities.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tinymoe import backend as B

np = B.np

__all__ = ["Generation", "generate", "next_token_distribution", "sample_token",
           "check_sampling_args", "parse_prompt_ids"]


@dataclass
class Generation:
    """prompt_ids and ids (the new tokens) as lists of ints; text = the new tokens decoded;
    stop_reason "eos" (the tokenizer's end token was drawn; not included) or "length"."""

    prompt_ids: list[int]
    ids: list[int]
    text: str
    stop_reason: str


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None,
                        top_p: float | None) -> None:
    """One-line ValueError for a bad sampling setting."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 (or None)")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (or None)")


def next_token_distribution(logits: Any, temperature: float = 1.0, top_k: int | None = None,
                            top_p: float | None = None) -> Any:
    """Probabilities [V] (float64, host) of the next token after temperature, top-k and
    top-p filtering; ids removed by the filters have probability exactly 0."""
    z = np.asarray(B.to_numpy(logits), dtype=np.float64).reshape(-1)     # [V]
    if temperature <= 0:
        p = np.zeros_like(z)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")             # most probable first, ties: lower id
    keep = np.ones(p.size, dtype=bool)
    if top_k is not None and top_k < p.size:
        keep[order[top_k:]] = False
    if top_p is not None and top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q_sorted = q[order] / q.sum()
        # first index where the running total reaches top_p: keep ids up to and including it
        cut = int(np.searchsorted(np.cumsum(q_sorted), top_p, side="left"))
        keep[order[cut + 1:]] = False
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def sample_token(probs: Any, rng: Any) -> int:
    """Draw one id from ``probs`` [V] by inverse CDF (an id of probability 0 is never drawn)."""
    c = np.cumsum(probs)                                  # [V]
    u = rng.random() * c[-1]
    i = min(int(np.searchsorted(c, u, side="right")), probs.size - 1)  # first i with c[i] > u
    if probs[i] == 0:              # only when rounding put u at the very top of the CDF
        i = int(np.flatnonzero(probs)[-1])
    return i


def parse_prompt_ids(text: str, vocab_size: int) -> list[int]:
    """``"1,2,999"`` -> [1, 2, 999], each checked to be in [0, vocab_size)."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"prompt ids {text!r} must be comma-separated integers") from None
    _check_ids(ids, vocab_size)
    return ids


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    for t in ids:
        if not 0 <= int(t) < vocab_size:
            raise ValueError(f"prompt token id {int(t)} is out of range for vocab_size={vocab_size}")


def _token_bytes(tokenizer: Any, i: int) -> bytes:
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes(i)
    return bytes([i]) if i < 256 else b""


def generate(model: Any, tokenizer: Any, prompt: str | Sequence[int], max_new_tokens: int = 200,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             greedy: bool = False, seed: int = 0, stream: Callable[[str], Any] | None = None,
             stop_at_eos: bool = True) -> Generation:
    """Continue ``prompt`` (text, or a list of token ids) by up to ``max_new_tokens`` tokens.

    ``stream(piece)`` is called with the text of each new token as soon as it is drawn
    (multi-byte characters are held back until complete). The same ``seed`` gives the
    same text. An empty prompt starts from the tokenizer's BOS token.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    V = model.cfg.vocab_size
    if isinstance(prompt, str):
        prompt_ids = [int(t) for t in tokenizer.encode(prompt)]
    else:
        prompt_ids = [int(t) for t in prompt]
    _check_ids(prompt_ids, V)
    if not prompt_ids:
        prompt_ids = [int(tokenizer.bos_id)]
        _check_ids(prompt_ids, V)
    rng = B.default_rng(seed)
    route_rng = B.default_rng(seed + 1)   # slot priority "random" only (its own stream)
    greedy = greedy or temperature == 0
    window = model.cfg.max_seq_len
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    new_ids: list[int] = []
    stop_reason = "length"
    with model.evaluating():   # eval-mode routing, no graph; the mode is restored after
        context = list(prompt_ids)
        cache = model.new_cache(1, window)
        feed = context if len(context) < window else context[-(window // 2):]
        for _ in range(max_new_tokens):
            if cache.length + len(feed) > window:         # full: restart from the tail
                cache = model.new_cache(1, window)
                feed = context[-(window // 2):]
            out = model(np.asarray([feed], dtype=np.int64), cache=cache, rng=route_rng)
            logits = B.to_numpy(out.logits.data[0, -1])                   # [V] on the host
            if not np.isfinite(logits).all():
                raise ValueError(f"the model's logits are not finite (NaN or inf) at new "
                                 f"token {len(new_ids)}: its weights are not usable")
            if greedy:
                nxt = int(np.argmax(logits))
            else:
                nxt = sample_token(next_token_distribution(logits, temperature, top_k, top_p), rng)
            if stop_at_eos and nxt == getattr(tokenizer, "eos_id", None):
                stop_reason = "eos"
                break
            new_ids.append(nxt)
            context.append(nxt)
            feed = [nxt]
            piece = decoder.decode(_token_bytes(tokenizer, nxt))
            if piece:
                pieces.append(piece)
                if stream is not None:
                    stream(piece)
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if stream is not None:
                stream(tail)
    return Generation(prompt_ids=prompt_ids, ids=new_ids, text="".join(pieces),
                      stop_reason=stop_reason)
