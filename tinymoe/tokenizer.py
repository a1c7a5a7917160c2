"""Tokenizers: bytes, and a byte-level BPE written by hand.

Both tokenizers are *byte level*: text is first turned into its UTF-8 bytes, so every
``str`` can be encoded (there is no unknown token) and ``decode(encode(s)) == s``.

Ids:
    ByteTokenizer  0..255 = bytes, 256 = BOS, 257 = EOS                (vocab 258)
    BPETokenizer   0..255 = bytes, 256..256+M-1 = merges, then BOS, EOS (vocab 256+M+2)

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
Subword Units"; byte-level variant as in GPT-2, Radford et al. 2019):

    training   start from bytes; repeat M times: find the most frequent adjacent pair
               (a, b) in the training text, give it a new id, replace every (a, b) by it.
    encoding   split the text into chunks with a regex (words, numbers, punctuation,
               whitespace; merges never cross a chunk boundary), then inside each chunk
               apply the learned merges in the order they were learned (lowest rank first).

Training is fast because the text is reduced to its *unique* chunks with counts (a few
hundred thousand for megabytes of text), and after each merge only the chunks that
contain the merged pair are rewritten and their pair counts updated (a heap with lazy
deletion finds the next most frequent pair).

Every tokenizer has ``to_dict()`` (JSON-safe: lists, ints, strings) and
``tokenizer_from_dict(d)`` restores it, e.g. from a checkpoint.
"""
from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from typing import Any, Iterable, Protocol

from tinymoe import backend as B

np = B.np

__all__ = [
    "Tokenizer", "ByteTokenizer", "BPETokenizer", "tokenizer_from_dict", "DEFAULT_PATTERN",
]

# Pre-tokenisation regex (GPT-2 style, adapted to Python's `re`, which has no \p{L}):
#   English contractions | optional space + letters/underscores (identifiers stay whole)
#   | optional space + 1-3 digits | optional space + punctuation run
#   | whitespace not followed by a non-space (so " word" keeps its space) | whitespace
#   | any single character (a safety net: the alternatives above already cover every str).
DEFAULT_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)"
    r"| ?[^\W\d]+"
    r"| ?\d{1,3}"
    r"| ?[^\s\w]+"
    r"|\s+(?!\S)"
    r"|\s+"
    r"|[\s\S]"
)

_CACHE_LIMIT = 500_000  # chunks remembered by BPETokenizer.encode


class Tokenizer(Protocol):
    """What the trainer, generator and analysis rely on."""

    name: str
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> Any: ...
    def decode(self, ids: Iterable[int] | Any) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


def _check_ids(ids: Any, vocab_size: int) -> Any:
    """``ids`` as a 1-D host int64 array, every id in [0, vocab_size) (else ValueError)."""
    arr = np.asarray(B.to_numpy(ids)).reshape(-1)
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    hi, lo = int(arr.max()), int(arr.min())
    if hi >= vocab_size:
        raise ValueError(f"token id {hi} >= vocab_size {vocab_size}")
    if lo < 0:
        raise ValueError(f"token id {lo} < 0")
    return arr


def _with_specials(ids: list[int] | Any, bos_id: int | None, eos_id: int | None) -> Any:
    """int64 array of ``[bos] + ids + [eos]`` (each special only when not None)."""
    arr = np.asarray(ids, dtype=np.int64)
    parts = []
    if bos_id is not None:
        parts.append(np.array([bos_id], dtype=np.int64))
    parts.append(arr)
    if eos_id is not None:
        parts.append(np.array([eos_id], dtype=np.int64))
    return np.concatenate(parts) if len(parts) > 1 else arr


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255), plus BOS = 256 and EOS = 257."""

    name = "byte"
    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> Any:
        """``text`` -> int64 array of its UTF-8 bytes, with BOS/EOS when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8)
        return _with_specials(ids.astype(np.int64), self.bos_id if bos else None,
                              self.eos_id if eos else None)

    def decode(self, ids: Iterable[int] | Any) -> str:
        """ids -> text; BOS/EOS are skipped; invalid UTF-8 becomes U+FFFD."""
        arr = _check_ids(ids, self.vocab_size)
        data = arr[arr < 256].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "byte", "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258)"


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` in ``word`` (left to right)."""
    a, b = pair
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE. Build with ``BPETokenizer.train(text, vocab_size)`` or from merges.

    ``merges[r] = (a, b)`` means: rank r, the pair of ids (a, b) becomes id 256 + r.
    BOS = 256 + len(merges), EOS = BOS + 1, vocab_size = 256 + len(merges) + 2.
    """

    def __init__(self, merges: Iterable[tuple[int, int]] | Iterable[list[int]],
                 pattern: str = DEFAULT_PATTERN) -> None:
        merges = [(int(a), int(b)) for a, b in merges]
        for r, (a, b) in enumerate(merges):
            limit = 256 + r  # a merge may only use ids that exist before it
            if not (0 <= a < limit and 0 <= b < limit):
                raise ValueError(f"merge {r} = ({a}, {b}) uses an id outside [0, {limit})")
        self.merges: list[tuple[int, int]] = merges
        self.pattern = pattern
        self._regex = re.compile(pattern)
        self._ranks: dict[tuple[int, int], int] = {p: r for r, p in enumerate(merges)}
        if len(self._ranks) != len(merges):
            raise ValueError("merges contain the same pair twice")
        vocab: list[bytes] = [bytes([i]) for i in range(256)]
        for a, b in merges:
            vocab.append(vocab[a] + vocab[b])
        self._vocab = vocab                      # id -> bytes, for decode
        self.bos_id = 256 + len(merges)
        self.eos_id = self.bos_id + 1
        self.vocab_size = self.eos_id + 1
        self.name = f"bpe{self.vocab_size}"
        self._cache: dict[str, list[int]] = {}   # chunk -> ids (speed only; results identical)

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, text: str, vocab_size: int, min_frequency: int = 2,
              pattern: str = DEFAULT_PATTERN) -> "BPETokenizer":
        """Learn ``vocab_size - 258`` merges from ``text`` (fewer if no pair occurs
        ``min_frequency`` times any more; then the vocabulary is smaller than asked).

        Ties between equally frequent pairs go to the smaller pair (a, b), so training
        is deterministic.
        """
        if vocab_size < 258:
            raise ValueError(f"vocab_size={vocab_size} < 258 (256 bytes + BOS + EOS)")
        if min_frequency < 1:
            raise ValueError(f"min_frequency={min_frequency} < 1")
        n_merges = vocab_size - 258
        chunk_counts = Counter(re.findall(pattern, text))
        words: list[list[int]] = [list(c.encode("utf-8", errors="surrogatepass"))
                                  for c in chunk_counts]
        freqs: list[int] = list(chunk_counts.values())

        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunk indices
        for i, (w, f) in enumerate(zip(words, freqs)):
            for p in zip(w, w[1:]):
                pair_counts[p] += f
                where[p].add(i)
        heap = [(-c, p) for p, c in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        while len(merges) < n_merges and heap:
            neg_count, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count != -neg_count:
                continue  # a stale heap entry: the count has changed since it was pushed
            if count < min_frequency:
                break
            new_id = 256 + len(merges)
            merges.append(pair)
            delta: dict[tuple[int, int], int] = defaultdict(int)
            for i in where.pop(pair, ()):
                w, f = words[i], freqs[i]
                new_w = _merge_word(w, pair, new_id)
                if len(new_w) == len(w):
                    continue  # stale index: this chunk no longer holds the pair
                for p in zip(w, w[1:]):
                    delta[p] -= f
                for p in zip(new_w, new_w[1:]):
                    delta[p] += f
                    where[p].add(i)
                words[i] = new_w
            for p, d in delta.items():
                if d == 0:
                    continue
                c = pair_counts[p] + d
                if c > 0:
                    pair_counts[p] = c
                    heapq.heappush(heap, (-c, p))
                else:
                    pair_counts.pop(p, None)
            pair_counts.pop(pair, None)
        return cls(merges, pattern=pattern)

    # ---------------------------------------------------------------- encoding
    def _encode_chunk(self, chunk: str) -> list[int]:
        """Apply the merges to one chunk, always the lowest-ranked present pair first."""
        ids = list(chunk.encode("utf-8", errors="surrogatepass"))
        ranks = self._ranks
        while len(ids) >= 2:
            best_rank, best = None, None
            for p in zip(ids, ids[1:]):
                r = ranks.get(p)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, p
            if best is None:
                break
            ids = _merge_word(ids, best, 256 + best_rank)
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> Any:
        """``text`` -> int64 array of token ids, with BOS/EOS when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        out: list[int] = []
        for chunk in self._regex.findall(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = self._encode_chunk(chunk)
                cache[chunk] = ids
            out.extend(ids)
        return _with_specials(out, self.bos_id if bos else None,
                              self.eos_id if eos else None)

    def decode(self, ids: Iterable[int] | Any) -> str:
        """ids -> text; BOS/EOS are skipped; invalid UTF-8 becomes U+FFFD."""
        arr = _check_ids(ids, self.vocab_size)
        vocab = self._vocab
        n = len(vocab)
        data = b"".join(vocab[i] for i in arr.tolist() if i < n)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        """The bytes that id ``i`` stands for (b"" for BOS/EOS)."""
        _check_ids([i], self.vocab_size)
        return self._vocab[i] if i < len(self._vocab) else b""

    # ---------------------------------------------------------------- saving
    def to_dict(self) -> dict[str, Any]:
        return {"type": "bpe", "version": 1, "vocab_size": self.vocab_size,
                "pattern": self.pattern, "merges": [[a, b] for a, b in self.merges]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BPETokenizer":
        """Inverse of ``to_dict``; ValueError naming the problem for a corrupt dict."""
        if not isinstance(d, dict) or d.get("type") != "bpe":
            raise ValueError("not a BPE tokenizer dict (expected type 'bpe')")
        if d.get("version", 1) != 1:
            raise ValueError(f"unsupported BPE tokenizer version {d.get('version')!r}")
        merges = d.get("merges")
        if not isinstance(merges, list) or not all(
                isinstance(m, (list, tuple)) and len(m) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in m)
                for m in merges):
            raise ValueError("corrupt BPE tokenizer dict: 'merges' must be a list of [int, int]")
        pattern = d.get("pattern", DEFAULT_PATTERN)
        if not isinstance(pattern, str):
            raise ValueError("corrupt BPE tokenizer dict: 'pattern' must be a string")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"corrupt BPE tokenizer dict: bad pattern ({e})") from None
        try:
            tok = cls(merges, pattern=pattern)
        except ValueError as e:
            raise ValueError(f"corrupt BPE tokenizer dict: {e}") from None
        if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
            raise ValueError(f"corrupt BPE tokenizer dict: vocab_size {d['vocab_size']} "
                             f"!= 256 + {len(merges)} merges + 2")
        return tok

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"


def tokenizer_from_dict(d: Any) -> ByteTokenizer | BPETokenizer:
    """Restore a tokenizer saved with ``to_dict()`` (e.g. from a checkpoint)."""
    if not isinstance(d, dict):
        raise ValueError(f"tokenizer dict expected, got {type(d).__name__}")
    kind = d.get("type")
    if kind == "byte":
        if d.get("vocab_size", 258) != 258:
            raise ValueError(f"corrupt byte tokenizer dict: vocab_size {d['vocab_size']} != 258")
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer type {kind!r} (expected 'byte' or 'bpe')")
