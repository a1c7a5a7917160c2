"""Corpora, splits, user text loading, batch sampling, evaluation windows."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tinymoe import data as D
from tinymoe.tokenizer import BPETokenizer, ByteTokenizer


# ---------------------------------------------------------------- built-in corpus
@pytest.fixture(scope="module")
def corpus() -> D.Corpus:
    return D.builtin_corpus()


def test_builtin_domains_exist_and_sizes(corpus):
    assert corpus.names == ["prose", "code", "arith"]
    for name, d in corpus.domains.items():
        assert len(d.train) > 100_000, name
        assert len(d.val) > 5_000, name
        frac = len(d.val) / (len(d.train) + len(d.val))
        assert 0.05 < frac < 0.2, (name, frac)
    assert "statement" in corpus.domains["prose"].train
    assert "def " in corpus.domains["code"].train and "import " in corpus.domains["code"].train
    total_code = len(corpus.domains["code"].train) + len(corpus.domains["code"].val)
    assert total_code <= D.CODE_MAX_BYTES


def test_builtin_deterministic(corpus):
    again = {"prose": D._prose(), "code": D._code(), "arith": D._arith()}  # rebuilt, uncached
    for name in corpus.names:
        assert again[name] == corpus.domains[name], name


def test_arith_lines_are_correct(corpus):
    lines = corpus.domains["arith"].train.splitlines()[:2000]
    kinds = set()
    for line in lines:
        expr, ans = line.split("=")
        assert set(expr) <= set("0123456789+-*()"), line
        kinds.add("(" in expr)
        # evaluate independently: Python's own arithmetic on the digit/operator string
        assert eval(expr, {"__builtins__": {}}) == int(ans), line  # noqa: S307 (digits only)
    assert kinds == {True, False}  # both plain and parenthesised problems occur


def test_heldout_disjoint_from_train(corpus):
    a = corpus.domains["arith"]
    train_lines = set(a.train.splitlines())
    val_lines = set(a.val.splitlines())
    assert val_lines and not (train_lines & val_lines)
    prose = corpus.domains["prose"]
    rng = np.random.default_rng(0)
    for start in rng.integers(0, len(prose.val) - 300, size=10):
        snippet = prose.val[start: start + 300]
        assert snippet not in prose.train, snippet[:60]


def test_split_documents_whole_and_about_ten_percent():
    rng = np.random.default_rng(0)
    docs = [f"doc{i}:" + "x" * int(rng.integers(10, 2000)) for i in range(200)]
    d = D._split_documents(docs)
    tr = d.train.strip().split("\n\n")
    va = d.val.strip().split("\n\n")
    assert sorted(tr + va) == sorted(docs) and not set(tr) & set(va)
    frac = sum(map(len, va)) / sum(map(len, docs))
    assert 0.08 < frac < 0.13, frac


def test_exclude_and_max_chars():
    c = D.builtin_corpus(exclude=["code"], max_chars=5000)
    assert c.names == ["prose", "arith"]
    for d in c.domains.values():
        assert 0 < len(d.train) <= 5000 and 0 < len(d.val) <= 500
    assert D.builtin_corpus(exclude="arith").names == ["prose", "code"]
    with pytest.raises(ValueError, match="unknown domain 'poetry' in exclude"):
        D.builtin_corpus(exclude=["poetry"])
    with pytest.raises(ValueError, match="no domain"):
        D.builtin_corpus(exclude=D.BUILTIN_DOMAINS)


# ---------------------------------------------------------------- user corpora
def test_load_corpus_file(tmp_path):
    text = "".join(f"line {i} of my text\n" for i in range(100))
    p = tmp_path / "notes.txt"
    p.write_text(text, encoding="utf-8")
    c = D.load_corpus(p)
    assert c.names == ["notes"]
    d = c.domains["notes"]
    assert d.train + d.val == text
    assert d.train.endswith("\n") and 0.05 < len(d.val) / len(text) < 0.2


def test_load_corpus_folder(tmp_path):
    (tmp_path / "poems.txt").write_text("roses are red\n" * 30, encoding="utf-8")
    sub = tmp_path / "letters"
    (sub / "deep").mkdir(parents=True)
    (sub / "a.txt").write_text("dear A\n" * 20, encoding="utf-8")
    (sub / "deep" / "b.md").write_text("dear B\n" * 20, encoding="utf-8")
    (tmp_path / ".hidden").write_text("ignored", encoding="utf-8")
    c = D.load_corpus(tmp_path)
    assert c.names == ["letters", "poems"]
    letters = c.domains["letters"].train + c.domains["letters"].val
    assert letters == "dear A\n" * 20 + "\n" + "dear B\n" * 20
    assert "ignored" not in letters


def test_load_corpus_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        D.load_corpus(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt: empty"):
        D.load_corpus(empty)
    folder = tmp_path / "dir"
    folder.mkdir()
    with pytest.raises(ValueError, match="empty folder"):
        D.load_corpus(folder)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(ValueError, match=r"bad.txt: not UTF-8 text .*byte offset 6"):
        D.load_corpus(bad)
    clash = tmp_path / "clash"
    (clash / "x").mkdir(parents=True)
    (clash / "x" / "f.txt").write_text("abc\n" * 5, encoding="utf-8")
    (clash / "x.txt").write_text("abc\n" * 5, encoding="utf-8")
    with pytest.raises(ValueError, match="domain name 'x' used twice"):
        D.load_corpus(clash)


# ---------------------------------------------------------------- encoding, entropy
def test_encode_corpus_and_bpe(corpus):
    small = D.builtin_corpus(max_chars=20_000)
    tr, va = D.encode_corpus(small, ByteTokenizer())
    assert list(tr) == list(va) == small.names
    for k in small.names:
        assert tr[k].dtype == np.int64 and tr[k].ndim == 1
        assert tr[k].size == len(small.domains[k].train.encode("utf-8"))
    bpe = D.train_bpe(small, 258 + 200)
    trb, _ = D.encode_corpus(small, bpe)
    assert all(trb[k].size < tr[k].size for k in small.names)


def test_unigram_entropy():
    assert D.unigram_entropy(np.array([3, 3, 3])) == 0.0
    assert math.isclose(D.unigram_entropy(np.arange(8).repeat(5)), math.log(8), rel_tol=1e-12)
    p = np.array([0.5, 0.25, 0.25])
    assert math.isclose(D.unigram_entropy([0, 0, 1, 2]), -(p * np.log(p)).sum(), rel_tol=1e-12)
    with pytest.raises(ValueError, match="empty"):
        D.unigram_entropy(np.array([], dtype=np.int64))


# ---------------------------------------------------------------- batch sampler
def labelled_tokens() -> dict[str, np.ndarray]:
    """Domain d's tokens are 10_000 * d + position, so a token tells domain and position."""
    return {"a": np.arange(0, 500), "b": 10_000 + np.arange(0, 300), "c": 20_000 + np.arange(0, 40)}


def test_sampler_windows_shift_and_labels():
    s = D.BatchSampler(labelled_tokens(), batch_size=16, seq_len=20, seed=3)
    seen = set()
    for _ in range(30):
        b = s.next()
        assert b.x.shape == b.y.shape == (16, 20) and b.domain.shape == (16,)
        assert b.x.dtype == b.y.dtype == b.domain.dtype == np.int64
        assert np.array_equal(b.y, b.x + 1)                # y is x shifted by one position
        assert np.array_equal(np.diff(b.x, axis=1), np.ones((16, 19)))  # contiguous windows
        assert np.array_equal(b.x[:, 0] // 10_000, b.domain)  # label = true domain
        n = np.array([500, 300, 40])[b.domain]
        assert np.all(b.y[:, -1] % 10_000 < n)             # window inside its domain
        seen.update(b.domain.tolist())
    assert seen == {0, 1, 2}
    assert s.domain_names == ["a", "b", "c"] and s.step == 30


def test_sampler_domain_frequencies_follow_weights():
    s = D.BatchSampler(labelled_tokens(), batch_size=64, seq_len=8, seed=0,
                       weights={"a": 3.0, "b": 1.0})
    doms = np.concatenate([s.next().domain for _ in range(50)])
    assert not np.any(doms == 2)
    assert abs(np.mean(doms == 0) - 0.75) < 0.05
    s2 = D.BatchSampler(labelled_tokens(), batch_size=64, seq_len=8, seed=0)  # token counts
    doms = np.concatenate([s2.next().domain for _ in range(50)])
    assert abs(np.mean(doms == 0) - 500 / 840) < 0.05


def test_sampler_determinism_and_exact_resume():
    toks = labelled_tokens()
    a = D.BatchSampler(toks, 4, 16, seed=7)
    b = D.BatchSampler(toks, 4, 16, seed=7)
    c = D.BatchSampler(toks, 4, 16, seed=8)
    xa = [a.next().x for _ in range(5)]
    assert all(np.array_equal(p, q.next().x) for p, q in zip(xa, [b] * 5))
    assert not all(np.array_equal(p, c.next().x) for p in xa)

    s = D.BatchSampler(toks, 4, 16, seed=11)
    for _ in range(6):
        s.next()
    state = json.loads(json.dumps(s.state_dict()))  # checkpoints store it as JSON
    after = [s.next() for _ in range(5)]
    r = D.BatchSampler(toks, 4, 16, seed=11)
    r.load_state_dict(state)
    assert r.step == 6
    for want in after:
        got = r.next()
        assert np.array_equal(got.x, want.x) and np.array_equal(got.domain, want.domain)


def test_sampler_errors():
    toks = labelled_tokens()
    with pytest.raises(ValueError, match=r"domain 'c' has 40 tokens < seq_len\+1 = 65"):
        D.BatchSampler(toks, 2, 64)
    with pytest.raises(ValueError, match="unknown domain"):
        D.BatchSampler(toks, 2, 8, weights={"z": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        D.BatchSampler(toks, 2, 8, weights=[0, 0, 0])
    s = D.BatchSampler(toks, 2, 8)
    with pytest.raises(ValueError, match="seq_len 16 != 8"):
        s.load_state_dict({**s.state_dict(), "seq_len": 16})
    with pytest.raises(ValueError, match="corrupt sampler state"):
        s.load_state_dict({"step": 1})


# ---------------------------------------------------------------- evaluation windows
def test_eval_batches_tile_without_overlap():
    tokens = np.arange(1000)
    batches = list(D.eval_batches(tokens, batch_size=4, seq_len=10, domain=2))
    x = np.concatenate([b.x for b in batches])
    assert x.shape == (99, 10)                           # (1000 - 1) // 10 windows
    assert np.array_equal(x.reshape(-1), np.arange(990))  # the tiling, in order
    assert all(np.array_equal(b.y, b.x + 1) for b in batches)
    assert all(np.all(b.domain == 2) for b in batches)
    again = list(D.eval_batches(tokens, 4, 10))
    assert all(np.array_equal(p.x, q.x) for p, q in zip(batches, again))


def test_eval_batches_max_batches_spread():
    tokens = np.arange(1001)
    batches = list(D.eval_batches(tokens, batch_size=5, seq_len=10, max_batches=2))
    starts = np.concatenate([b.x[:, 0] for b in batches])
    assert len(batches) == 2 and starts.size == 10
    assert np.all(starts % 10 == 0) and np.all(np.diff(starts) >= 10)  # aligned, disjoint
    assert starts[0] == 0 and starts[-1] == 990                       # spread over the text
    with pytest.raises(ValueError, match="too few"):
        list(D.eval_batches(np.arange(5), 2, 10))


# ---------------------------------------------------------------- mixed-domain sequences
def test_multi_turn_text_labels():
    letters = "".join("abcdefghij"[i % 10] for i in range(3000))
    digits = "".join(str(i % 10) for i in range(3000))
    punct = "".join("+-*/=<>!?%"[i % 10] for i in range(3000))
    corpus = D.Corpus({k: D.DomainText(v, v) for k, v in
                       {"letters": letters, "digits": digits, "punct": punct}.items()})
    m = D.multi_turn_text(corpus, ByteTokenizer(), n_seqs=6, seq_len=200,
                          segment_len=(10, 30), seed=1)
    assert m.tokens.shape == m.domain.shape == (6, 200) and m.tokens.dtype == np.int64
    alphabets = [set(letters.encode()), set(digits.encode()), set(punct.encode())]
    for tok, lab in zip(m.tokens.ravel(), m.domain.ravel()):
        assert int(tok) in alphabets[lab]
    for row in m.domain:
        runs = row[np.r_[True, row[1:] != row[:-1]]]  # domain of each segment
        assert np.all(runs[1:] != runs[:-1]) and runs.size >= 200 // 30
        lengths = np.diff(np.flatnonzero(np.r_[True, row[1:] != row[:-1], True]))
        assert np.all(lengths[:-1] >= 10) and np.all(lengths <= 30)
    again = D.multi_turn_text(corpus, ByteTokenizer(), n_seqs=6, seq_len=200,
                              segment_len=(10, 30), seed=1)
    assert np.array_equal(again.tokens, m.tokens)
    assert m.domain_names == ["letters", "digits", "punct"]


def test_multi_turn_text_on_builtin_with_bpe():
    c = D.builtin_corpus(max_chars=30_000)
    tok = BPETokenizer.train(D.corpus_text_sample(c), 258 + 100)
    m = D.multi_turn_text(c, tok, n_seqs=2, seq_len=64, segment_len=(8, 16), domains=["code", "arith"])
    assert set(np.unique(m.domain).tolist()) <= {0, 1} and m.tokens.max() < tok.vocab_size
