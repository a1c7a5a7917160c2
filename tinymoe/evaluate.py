"""Held-out evaluation and routing statistics of a model during training.

:func:`evaluate` gives nats per token and per byte on each domain's held-out text (model
in eval mode: the eval capacity factor, no gradients); :func:`routing_summary` reduces
the routing of one forward pass to the two numbers the progress bar shows;
:func:`probe_batch` picks the fixed batch whose routing the snapshots record.
"""
from __future__ import annotations

from typing import Any, Sequence

from tinymoe import backend as B
from tinymoe.data import eval_batches

np = B.np

__all__ = ["evaluate", "routing_summary", "probe_batch", "token_byte_lengths"]


def token_byte_lengths(tokenizer: Any, vocab_size: int) -> Any:
    """bytes[v] = number of text bytes token v stands for (0 for BOS/EOS)."""
    out = np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        if hasattr(tokenizer, "token_bytes"):
            out[i] = len(tokenizer.token_bytes(i))
        else:
            out[i] = 1 if i < 256 else 0
    return out


def routing_summary(routing: Sequence[Any], sync: bool = True) -> tuple[Any, Any]:
    """(dropped fraction, busiest expert's share), each averaged over MoE layers.

    busiest share of a layer = max_e load_after[e] / sum_e load_after[e] (1/E at perfect
    balance, 1 when one expert takes every kept assignment). Python floats; with
    ``sync=False`` 0-d float64 arrays of the routing's device (no host sync)."""
    if not routing:
        return 0.0, 0.0
    xp = B.array_module(routing[0].load_after)
    dropped = busiest = xp.zeros((), dtype=xp.float64)
    for s in routing:
        dropped = dropped + s.dropped_fraction
        load = s.load_after.astype(xp.float64)                            # [E]
        total = load.sum()                                                # []
        busiest = busiest + xp.where(total > 0, load.max() / xp.maximum(total, 1.0), 0.0)
    n = len(routing)
    if sync:
        both = B.to_numpy(xp.stack([dropped, busiest]))                   # one transfer
        return float(both[0]) / n, float(both[1]) / n
    return dropped / n, busiest / n


def evaluate(model: Any, val: dict[str, Any], batch_size: int, seq_len: int,
             max_batches: int | None, byte_lengths: Any = None, seed: int = 0
             ) -> dict[str, dict[str, float]]:
    """Held-out loss per domain, model in eval mode (eval capacity factor), no gradients.

    ce             nats per token: sum of token losses / number of tokens, over
                   ``max_batches`` batches of non-overlapping windows spread over the text.
    nats_per_byte  the same sum / number of UTF-8 bytes of the target tokens (equal to
                   ce for the byte tokenizer, which is comparable across tokenizers).
    dropped        mean dropped fraction of the MoE layers on that domain.
    "mean"         the unweighted mean over domains of ce and nats_per_byte.
    """
    rng = B.default_rng(seed)
    results: dict[str, dict[str, float]] = {}
    with model.evaluating():
        for name, tokens in val.items():
            T = min(seq_len, int(tokens.size) - 1)
            if T < 1:
                continue
            nll = 0.0
            n_tok = n_bytes = 0
            dropped, n_batches = 0.0, 0
            for batch in eval_batches(tokens, batch_size, T, max_batches):
                out = model(batch.x, targets=batch.y, rng=rng)
                n = int(batch.y.size)
                nll += float(out.ce.item()) * n
                n_tok += n
                n_bytes += int(byte_lengths[batch.y].sum()) if byte_lengths is not None else n
                dropped += routing_summary(out.routing)[0]
                n_batches += 1
            results[name] = {"ce": nll / n_tok,
                             "nats_per_byte": nll / max(n_bytes, 1),
                             "tokens": float(n_tok), "bytes": float(n_bytes),
                             "dropped": dropped / max(n_batches, 1)}
    if results:
        doms = list(results.values())
        results["mean"] = {"ce": sum(d["ce"] for d in doms) / len(doms),
                           "nats_per_byte": sum(d["nats_per_byte"] for d in doms) / len(doms)}
    return results


def probe_batch(val: dict[str, Any], seq_len: int, per_domain: int = 4) -> tuple[Any, Any]:
    """A fixed probe batch for routing snapshots: ``per_domain`` held-out windows of each
    domain, spread over its text. Returns (tokens [N, T], domain index [N])."""
    xs, doms = [], []
    for d, tokens in enumerate(val.values()):
        if tokens.size < seq_len + 1:
            continue
        batch = next(eval_batches(tokens, per_domain, seq_len, max_batches=1, domain=d))
        xs.append(batch.x)
        doms.append(batch.domain)
    if not xs:
        return None, None
    return np.concatenate(xs), np.concatenate(doms)

