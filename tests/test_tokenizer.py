"""Tokenizers: byte round trips, hand-written BPE against a naive reference, saving."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tinymoe.tokenizer import (DEFAULT_PATTERN, BPETokenizer, ByteTokenizer,
                               tokenizer_from_dict)

SAMPLES = [
    "",
    "hello world",
    "naïve café — ünïcødé, 日本語のテキスト, emoji 🙂🚀, maths ∑∫√",
    "line1\nline2\r\n\ttabbed   spaces  \n\n",
    "def f(x_1, y):\n    return x_1 ** 2 + y  # comment\n",
    "17+25=42\n(12+7)*3=57\n",
]


def random_unicode(rng: np.random.Generator, n: int) -> str:
    """Characters from ASCII, Latin-1, Greek/Cyrillic, CJK and emoji ranges (no surrogates)."""
    ranges = [(0x20, 0x7F), (0x0A, 0x0B), (0xA0, 0x250), (0x370, 0x500),
              (0x4E00, 0x4F00), (0x1F600, 0x1F650), (0x09, 0x0E)]
    out = []
    for _ in range(n):
        lo, hi = ranges[rng.integers(len(ranges))]
        out.append(chr(int(rng.integers(lo, hi))))
    return "".join(out)


def code_text() -> str:
    """Some real Python source (this repository's tests and the stdlib json package)."""
    import json as json_mod
    src = Path(json_mod.__file__).parent
    return "".join(p.read_text(encoding="utf-8") for p in sorted(src.glob("*.py")))


# ---------------------------------------------------------------- byte tokenizer
def test_byte_ids_are_utf8_bytes_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    for s in SAMPLES:
        ids = tok.encode(s)
        assert ids.dtype == np.int64
        assert ids.tolist() == list(s.encode("utf-8"))
        assert tok.decode(ids) == s
        assert tok.decode(ids.tolist()) == s


def test_byte_specials():
    tok = ByteTokenizer()
    ids = tok.encode("é", bos=True, eos=True)
    assert ids.tolist() == [256, 0xC3, 0xA9, 257]
    assert tok.decode(ids) == "é"  # specials are skipped
    assert tok.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence is replaced, not an error


def test_byte_decode_out_of_range():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"^token id 300 >= vocab_size 258$"):
        tok.decode([1, 300, 2])
    with pytest.raises(ValueError, match="token id -1 < 0"):
        tok.decode([-1])


def test_encode_never_fails():
    tok = ByteTokenizer()
    bpe = BPETokenizer.train("abc abc abd " * 20, 270)
    for s in ["\x00\x01\x7f", "\ud800 lone surrogate", "\U0010ffff", " " * 50]:
        for t in (tok, bpe):
            ids = t.encode(s)
            assert ids.ndim == 1 and ids.dtype == np.int64
            t.decode(ids)  # no exception


# ---------------------------------------------------------------- BPE vs naive reference
def naive_bpe_train(text: str, n_merges: int) -> list[tuple[int, int]]:
    """Textbook BPE: recount all pairs after every merge; most frequent pair wins, ties to
    the smaller pair; pairs never cross regex chunks; stop when the best count < 2."""
    words = [list(c.encode("utf-8")) for c in re.findall(DEFAULT_PATTERN, text)]
    merges = []
    for r in range(n_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < 2:
            break
        merges.append(best)
        new = 256 + r
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
    return merges


def naive_bpe_encode(text: str, merges: list[tuple[int, int]]) -> list[int]:
    """Apply merges one after the other, in learned order, to every chunk."""
    out = []
    for chunk in re.findall(DEFAULT_PATTERN, text):
        w = list(chunk.encode("utf-8"))
        for r, pair in enumerate(merges):
            res, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    res.append(256 + r)
                    j += 2
                else:
                    res.append(w[j])
                    j += 1
            w = res
        out.extend(w)
    return out


@pytest.fixture(scope="module")
def small_text() -> str:
    return code_text()[:40_000] + "\n" + random_unicode(np.random.default_rng(0), 2000)


@pytest.fixture(scope="module")
def bpe(small_text: str) -> BPETokenizer:
    return BPETokenizer.train(small_text, 258 + 300)


def test_bpe_train_matches_naive(small_text):
    text = small_text[:6000]
    fast = BPETokenizer.train(text, 258 + 120)
    ref = naive_bpe_train(text, 120)
    assert len(ref) == 120
    assert fast.merges == ref, f"first differences: {[(i, a, b) for i, (a, b) in enumerate(zip(fast.merges, ref)) if a != b][:3]}"


def test_bpe_encode_matches_naive(small_text, bpe):
    text = small_text[:8000]
    assert bpe.encode(text).tolist() == naive_bpe_encode(text, bpe.merges)


def test_bpe_vocab_layout(bpe):
    assert len(bpe.merges) == 300
    assert bpe.vocab_size == 558 and bpe.bos_id == 556 and bpe.eos_id == 557
    ids = bpe.encode("x = 1", bos=True, eos=True)
    assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id
    with pytest.raises(ValueError, match=r"^token id 558 >= vocab_size 558$"):
        bpe.decode([558])


def test_bpe_round_trip_unicode_and_code(bpe):
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = random_unicode(rng, int(rng.integers(0, 300)))
        assert bpe.decode(bpe.encode(s)) == s
    for s in SAMPLES:
        assert bpe.decode(bpe.encode(s)) == s
    code = code_text()
    assert bpe.decode(bpe.encode(code)) == code


def test_bpe_reduces_token_count(small_text, bpe):
    code = code_text()[40_000:80_000]  # text not seen in training
    n_bytes = len(code.encode("utf-8"))
    n_small = len(BPETokenizer.train(small_text, 258 + 50).encode(code))
    n_big = len(bpe.encode(code))
    assert n_big < n_small < n_bytes
    assert n_big < 0.6 * n_bytes, (n_big, n_bytes)


def test_bpe_merged_tokens_are_frequent_pairs(bpe):
    # The first merge is the most frequent adjacent byte pair of the training text.
    first = bpe.token_bytes(256)
    assert len(first) == 2
    assert bpe.token_bytes(bpe.bos_id) == b""


def test_bpe_stops_when_no_pair_repeats():
    tok = BPETokenizer.train("abcdefg", 1000)
    assert tok.merges == [] and tok.vocab_size == 258
    with pytest.raises(ValueError, match="vocab_size=100 < 258"):
        BPETokenizer.train("abc", 100)


# ---------------------------------------------------------------- saving and restoring
def test_to_dict_from_dict_round_trip(bpe, small_text):
    d = json.loads(json.dumps(bpe.to_dict()))  # must be JSON-safe
    tok2 = tokenizer_from_dict(d)
    assert isinstance(tok2, BPETokenizer)
    assert tok2.vocab_size == bpe.vocab_size and tok2.merges == bpe.merges
    text = small_text[:20_000]
    assert np.array_equal(tok2.encode(text), bpe.encode(text))
    b = tokenizer_from_dict(json.loads(json.dumps(ByteTokenizer().to_dict())))
    assert isinstance(b, ByteTokenizer)


@pytest.mark.parametrize("bad, msg", [
    ({"type": "sentencepiece"}, "unknown tokenizer type 'sentencepiece'"),
    ({}, "unknown tokenizer type None"),
    ([1, 2], "tokenizer dict expected"),
    ({"type": "bpe", "merges": "nope"}, "corrupt BPE tokenizer dict"),
    ({"type": "bpe", "merges": [[1, 2, 3]]}, "corrupt BPE tokenizer dict"),
    ({"type": "bpe", "merges": [[1, 256]]}, r"merge 0 = \(1, 256\) uses an id outside"),
    ({"type": "bpe", "merges": [[1, 2], [1, 2]]}, "same pair twice"),
    ({"type": "bpe", "merges": [[1, 2]], "vocab_size": 300}, "vocab_size 300"),
    ({"type": "bpe", "merges": [], "pattern": "("}, "bad pattern"),
    ({"type": "bpe", "version": 7, "merges": []}, "unsupported BPE tokenizer version"),
    ({"type": "byte", "vocab_size": 300}, "corrupt byte tokenizer dict"),
])
def test_bad_dict_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tokenizer_from_dict(bad)
