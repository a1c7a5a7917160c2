"""Corpora, held-out splits, batches.

The built-in corpus needs no download; it comes from the running Python installation:

    prose   the English reference text of ``pydoc_data.topics`` (what ``help("if")`` shows),
            repeated paragraphs removed
    code    the standard library's ``.py`` files (tests, ``site-packages``, ``encodings``,
            ``idlelib``, ``pydoc_data`` and machine-generated files left out; files over
            100 kB left out; spread evenly over the sorted file list up to ~3 MB)
    arith   arithmetic lines generated with a fixed seed: ``17+25=42``, ``(12+7)*3=57``

Held-out split (deterministic): for prose and code, whole documents (topics, files) in
sorted order go to validation whenever less than 10% of the text seen so far is held out;
for arith, a problem is validation when the CRC-32 of its line is divisible by 10, so no
validation problem ever appears in training.

Your own text: ``load_corpus(path)``
    a file     one domain, named after the file's stem
    a folder   each non-hidden file directly inside is one domain (named after its stem),
               each subfolder is one domain (named after the folder; its files, found
               recursively and read in sorted order, are joined)
Each user domain's last ~10% (cut at a line break when one is near) is its validation text.

Batches: ``BatchSampler`` draws random windows for training (a pure function of seed and
step, resumable exactly through ``state_dict``); ``eval_batches`` walks non-overlapping
windows of held-out text. All batches are host int64 arrays; the trainer moves them to
the device.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from tinymoe import backend as B
from tinymoe.tokenizer import BPETokenizer, Tokenizer

np = B.np

__all__ = [
    "BUILTIN_DOMAINS", "DomainText", "Corpus", "builtin_corpus", "load_corpus",
    "corpus_text_sample", "train_bpe", "encode_corpus", "Batch", "BatchSampler",
    "eval_batches", "MixedWindows", "multi_turn_text", "unigram_entropy",
]

BUILTIN_DOMAINS: tuple[str, ...] = ("prose", "code", "arith")
CODE_MAX_BYTES = 3_000_000     # cap on the code domain (train + val), in bytes of source
CODE_MAX_FILE_BYTES = 100_000  # larger stdlib files are skipped (tables, generated code)
ARITH_LINES = 100_000          # ~1 MB of arithmetic
ARITH_SEED = 1234
VAL_EVERY = 10                 # 1 document (or problem) in 10 is held out

_CODE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings",
                   "idlelib", "pydoc_data", "lib-dynload", "ensurepip", "__phello__"}


@dataclass(frozen=True)
class DomainText:
    """One domain's text, split into training and held-out (validation) parts."""

    train: str
    val: str


@dataclass
class Corpus:
    """Named domains, in a fixed order (domain index i = i-th key of ``domains``)."""

    domains: dict[str, DomainText]
    source: str = "builtin"

    @property
    def names(self) -> list[str]:
        return list(self.domains)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {len(v.train):,}+{len(v.val):,}" for k, v in self.domains.items())
        return f"Corpus(source={self.source!r}, chars train+val: {sizes})"


# ------------------------------------------------------------------ built-in corpus
def _split_documents(docs: Sequence[str]) -> DomainText:
    """Whole documents, in order, go to val whenever the val share of the text seen so far
    is below 1/VAL_EVERY (so about 10% of the characters, spread over the whole list)."""
    train: list[str] = []
    val: list[str] = []
    seen = held = 0
    for d in docs:
        if held < seen / VAL_EVERY:
            val.append(d)
            held += len(d)
        else:
            train.append(d)
        seen += len(d)
    return DomainText("\n\n".join(train) + "\n", "\n\n".join(val) + "\n")


def _prose() -> DomainText:
    """Python's reference documentation topics, one document per topic, sorted by key.

    Many topics repeat whole paragraphs of others (about 18% of the text); a paragraph of
    40+ characters seen before is dropped, so held-out text is not also training text.
    """
    from pydoc_data.topics import topics  # noqa: PLC0415 (stdlib, imported when needed)
    seen: set[str] = set()
    docs = []
    for key in sorted(topics):
        paragraphs = []
        for para in topics[key].strip().split("\n\n"):
            if len(para) >= 40 and para in seen:
                continue
            seen.add(para)
            paragraphs.append(para)
        docs.append("\n\n".join(paragraphs))
    return _split_documents(docs)


def _stdlib_files() -> list[Path]:
    """Candidate stdlib ``.py`` files, sorted by relative path (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _CODE_SKIP_DIRS and not d.startswith(("config-", ".")))
        for f in sorted(filenames):
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                found.append(Path(dirpath) / f)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _code() -> DomainText:
    """Standard-library source: UTF-8 files <= 100 kB, every k-th file so the total fits
    CODE_MAX_BYTES (k the smallest stride that does), one document per file."""
    files: list[tuple[Path, bytes]] = []
    for p in _stdlib_files():
        try:
            if p.stat().st_size > CODE_MAX_FILE_BYTES:
                continue
            data = p.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if data.strip():
            files.append((p, data))
    total = sum(len(d) for _, d in files)
    stride = max(1, -(-total // CODE_MAX_BYTES))
    while sum(len(d) for _, d in files[::stride]) > CODE_MAX_BYTES:
        stride += 1
    docs = [d.decode("utf-8").strip() for _, d in files[::stride]]
    if not docs:
        raise FileNotFoundError(f"no standard-library .py files found under "
                                f"{sysconfig.get_paths()['stdlib']}")
    return _split_documents(docs)


def _arith_lines(n: int, seed: int) -> list[str]:
    """``n`` arithmetic problems with answers, drawn with a fixed seed.

    Kinds (chosen uniformly): a+b, a-b (a, b < 1000), a*b (a, b < 100), (a+b)*c,
    (a-b)*c, a*b+c, a+b-c (a, b < 100, c < 10 for products, < 100 otherwise).
    """
    rng = B.default_rng(seed)
    kind = rng.integers(0, 7, size=n)
    big = rng.integers(0, 1000, size=(n, 2))
    small = rng.integers(0, 100, size=(n, 3))
    tiny = rng.integers(2, 10, size=n)
    lines: list[str] = []
    for i in range(n):
        k = int(kind[i])
        a, b = int(big[i, 0]), int(big[i, 1])
        x, y, z = (int(v) for v in small[i])
        c = int(tiny[i])
        if k == 0:
            lines.append(f"{a}+{b}={a + b}")
        elif k == 1:
            lines.append(f"{a}-{b}={a - b}")
        elif k == 2:
            lines.append(f"{x}*{y}={x * y}")
        elif k == 3:
            lines.append(f"({x}+{y})*{c}={(x + y) * c}")
        elif k == 4:
            lines.append(f"({x}-{y})*{c}={(x - y) * c}")
        elif k == 5:
            lines.append(f"{x}*{c}+{z}={x * c + z}")
        else:
            lines.append(f"{x}+{y}-{z}={x + y - z}")
    return lines


def _is_val_line(line: str) -> bool:
    return zlib.crc32(line.encode("utf-8")) % VAL_EVERY == 0


def _arith() -> DomainText:
    """Generated arithmetic; a problem is held out iff crc32(line) % 10 == 0."""
    lines = _arith_lines(ARITH_LINES, ARITH_SEED)
    train = [s for s in lines if not _is_val_line(s)]
    val = [s for s in lines if _is_val_line(s)]
    return DomainText("\n".join(train) + "\n", "\n".join(val) + "\n")


@functools.lru_cache(maxsize=None)
def _builtin_domain(name: str) -> DomainText:
    """One built-in domain (cached per process: a pure function of the installation)."""
    return {"prose": _prose, "code": _code, "arith": _arith}[name]()


def _cut(text: str, n: int) -> str:
    """The first ``n`` characters of ``text``, ending at a line break when one is near."""
    if len(text) <= n:
        return text
    nl = text.rfind("\n", 0, n)
    return text[: nl + 1] if nl >= n // 2 else text[:n]


def builtin_corpus(exclude: Sequence[str] = (), max_chars: int | None = None) -> Corpus:
    """The built-in corpus: domains prose, code, arith, minus those in ``exclude``.

    max_chars: cut each domain's train text to at most ``max_chars`` characters and its
    val text to at most ``max(max_chars // 10, 1)`` (for quick runs and tests).
    """
    if isinstance(exclude, str):
        exclude = (exclude,)
    for name in exclude:
        if name not in BUILTIN_DOMAINS:
            raise ValueError(f"unknown domain {name!r} in exclude "
                             f"(built-in domains: {', '.join(BUILTIN_DOMAINS)})")
    names = [n for n in BUILTIN_DOMAINS if n not in exclude]
    if not names:
        raise ValueError("exclude leaves no domain in the built-in corpus")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars={max_chars} < 1")
    domains = {}
    for name in names:
        d = _builtin_domain(name)
        if max_chars is not None:
            d = DomainText(_cut(d.train, max_chars), _cut(d.val, max(max_chars // 10, 1)))
        domains[name] = d
    tag = "builtin" if not exclude else "builtin-minus-" + "-".join(sorted(exclude))
    return Corpus(domains, source=tag)


# ------------------------------------------------------------------ user text
def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} "
                         f"at byte offset {e.start})") from None


def _split_tail(text: str, where: Path) -> DomainText:
    """Last ~10% of ``text`` is val, cut just after a line break in the last 20% if any."""
    if len(text.strip()) == 0:
        raise ValueError(f"{where}: empty (no text)")
    if len(text) < 2:
        raise ValueError(f"{where}: too short to split into train and val ({len(text)} char)")
    cut = int(len(text) * (1 - 1 / VAL_EVERY))
    nl = text.rfind("\n", 0, cut)
    if nl + 1 >= int(len(text) * (1 - 2 / VAL_EVERY)) and nl + 1 < len(text):
        cut = nl + 1
    cut = min(max(cut, 1), len(text) - 1)
    return DomainText(text[:cut], text[cut:])


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def load_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Read a user corpus from a text file or a folder (see the module docstring)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    if root.is_file():
        return Corpus({root.stem: _split_tail(_read_text(root), root)}, source=str(root))
    if not root.is_dir():
        raise ValueError(f"{root}: neither a file nor a folder")
    domains: dict[str, DomainText] = {}
    for entry in sorted(filter(_visible, root.iterdir())):
        if entry.is_file():
            name, text = entry.stem, _read_text(entry)
        elif entry.is_dir():
            files = sorted(p for p in entry.rglob("*")
                           if p.is_file()
                           and not any(q.startswith(".") for q in p.relative_to(entry).parts))
            if not files:
                raise ValueError(f"{entry}: folder holds no files")
            name = entry.name
            text = "\n".join(_read_text(p).rstrip("\n") + "\n" for p in files)
        else:
            continue
        if name in domains:
            raise ValueError(f"{entry}: domain name {name!r} used twice in {root}")
        domains[name] = _split_tail(text, entry)
    if not domains:
        raise ValueError(f"{root}: empty folder (no text files)")
    return Corpus(domains, source=str(root))


# ------------------------------------------------------------------ tokenizing
def corpus_text_sample(corpus: Corpus, max_chars: int | None = 4_000_000) -> str:
    """All domains' train text joined, each domain cut to an equal share of ``max_chars``."""
    share = None if max_chars is None else max(max_chars // len(corpus.domains), 1)
    parts = [d.train if share is None else _cut(d.train, share) for d in corpus.domains.values()]
    return "\n".join(parts)


def train_bpe(corpus: Corpus, vocab_size: int, max_chars: int | None = 4_000_000
              ) -> BPETokenizer:
    """A BPE tokenizer trained on (a sample of) the corpus's train text."""
    return BPETokenizer.train(corpus_text_sample(corpus, max_chars), vocab_size)


def encode_corpus(corpus: Corpus, tokenizer: Tokenizer
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, val): domain name -> 1-D int64 token array, in the corpus's domain order."""
    train = {k: np.asarray(tokenizer.encode(d.train), dtype=np.int64)
             for k, d in corpus.domains.items()}
    val = {k: np.asarray(tokenizer.encode(d.val), dtype=np.int64)
           for k, d in corpus.domains.items()}
    return train, val


def unigram_entropy(tokens: Any) -> float:
    """H = -sum_v p(v) ln p(v) in nats, p the token frequencies: the loss of the best
    model that ignores context (a bar a trained LM must get below)."""
    arr = np.asarray(B.to_numpy(tokens)).reshape(-1)
    if arr.size == 0:
        raise ValueError("unigram_entropy of an empty token array")
    counts = np.bincount(arr.astype(np.int64))
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------ batches
@dataclass(frozen=True)
class Batch:
    """x [B, T] inputs, y [B, T] targets (y[:, t] = token after x[:, t]), domain [B]."""

    x: Any
    y: Any
    domain: Any


def _check_shape(batch_size: int, seq_len: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} < 1")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} < 1")


class BatchSampler:
    """Random training windows from several domains.

    Each sample: domain d ~ Categorical(w) (w = ``weights`` normalised, default the token
    counts, i.e. uniform over tokens), start s ~ Uniform{0, ..., n_d - T - 1}, then
    x = tokens_d[s : s+T], y = tokens_d[s+1 : s+T+1]. Domain indices follow the order
    of ``tokens`` (``domain_names``). The draws depend only on ``seed`` and the number of
    batches drawn so far; ``state_dict``/``load_state_dict`` resume exactly.
    """

    def __init__(self, tokens: Mapping[str, Any], batch_size: int, seq_len: int,
                 seed: int = 0, weights: Mapping[str, float] | Sequence[float] | None = None
                 ) -> None:
        _check_shape(batch_size, seq_len)
        if not tokens:
            raise ValueError("BatchSampler needs at least one domain")
        self.domain_names: list[str] = list(tokens)
        self.tokens = [np.asarray(B.to_numpy(tokens[k]), dtype=np.int64).reshape(-1)
                       for k in self.domain_names]
        for name, t in zip(self.domain_names, self.tokens):
            if t.size < seq_len + 1:
                raise ValueError(f"domain {name!r} has {t.size} tokens < seq_len+1 = {seq_len + 1}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, int(seed)
        if weights is None:
            w = np.array([t.size for t in self.tokens], dtype=np.float64)
        elif isinstance(weights, Mapping):
            unknown = set(weights) - set(self.domain_names)
            if unknown:
                raise ValueError(f"weights for unknown domain(s) {sorted(unknown)} "
                                 f"(domains: {self.domain_names})")
            w = np.array([float(weights.get(k, 0.0)) for k in self.domain_names])
        else:
            w = np.array([float(v) for v in weights])
            if w.size != len(self.domain_names):
                raise ValueError(f"{w.size} weights for {len(self.domain_names)} domains")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"domain weights must be >= 0 with a positive sum, got {w.tolist()}")
        self.probs = w / w.sum()
        self.rng = B.default_rng(self.seed)
        self.step = 0

    def next(self) -> Batch:
        """The next training batch (host int64 arrays)."""
        B_, T = self.batch_size, self.seq_len
        dom = self.rng.choice(len(self.tokens), size=B_, p=self.probs)          # [B]
        highs = np.array([self.tokens[d].size - T for d in dom], dtype=np.int64)  # [B]
        starts = self.rng.integers(0, highs)                                     # [B]
        win = np.stack([self.tokens[d][s: s + T + 1] for d, s in zip(dom, starts)])  # [B, T+1]
        self.step += 1
        return Batch(x=win[:, :-1].copy(), y=win[:, 1:].copy(), domain=dom.astype(np.int64))

    __next__ = next

    def __iter__(self) -> Iterator[Batch]:
        return self

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: the generator state, step count and the settings it needs."""
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "domain_names": list(self.domain_names),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was taken (same settings required)."""
        for key in ("batch_size", "seq_len", "domain_names"):
            want, got = getattr(self, key), state.get(key)
            if got is not None and list(np.atleast_1d(got)) != list(np.atleast_1d(want)):
                raise ValueError(f"sampler state mismatch: {key} {got!r} != {want!r}")
        try:
            self.rng.bit_generator.state = state["rng"]
            self.step = int(state["step"])
            self.seed = int(state.get("seed", self.seed))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt sampler state ({type(e).__name__}: {e})") from None


def eval_batches(tokens: Any, batch_size: int, seq_len: int, max_batches: int | None = None,
                 domain: int = 0) -> Iterator[Batch]:
    """Deterministic, non-overlapping windows of a 1-D token array, for held-out loss.

    The array is tiled into n = (len - 1) // T windows (window j: x = tokens[jT : jT+T],
    y = tokens[jT+1 : jT+T+1]). With ``max_batches`` the m = max_batches * batch_size
    windows used are spread evenly over the tiling (not just its start). The last batch
    may be smaller. ``domain`` fills ``Batch.domain``.
    """
    _check_shape(batch_size, seq_len)
    arr = np.asarray(B.to_numpy(tokens), dtype=np.int64).reshape(-1)
    T = seq_len
    n = (arr.size - 1) // T
    if n < 1:
        raise ValueError(f"{arr.size} tokens are too few for one window of seq_len {T} (+1)")
    idx = np.arange(n)
    if max_batches is not None:
        if max_batches < 1:
            raise ValueError(f"max_batches={max_batches} < 1")
        m = max_batches * batch_size
        if m < n:
            idx = np.unique(np.round(np.linspace(0, n - 1, m)).astype(np.int64))
    for b in range(0, idx.size, batch_size):
        starts = idx[b: b + batch_size] * T                                   # [b]
        pos = starts[:, None] + np.arange(T + 1)[None, :]                     # [b, T+1]
        win = arr[pos]                                                        # [b, T+1]
        yield Batch(x=win[:, :-1].copy(), y=win[:, 1:].copy(),
                    domain=np.full(starts.size, domain, dtype=np.int64))


# ------------------------------------------------------------------ mixed-domain sequences
@dataclass(frozen=True)
class MixedWindows:
    """tokens [N, T] int64 and domain [N, T] int64 (index into ``domain_names``)."""

    tokens: Any
    domain: Any
    domain_names: list[str] = field(default_factory=list)


def multi_turn_text(corpus: Corpus, tokenizer: Tokenizer, n_seqs: int = 8, seq_len: int = 256,
                    segment_len: tuple[int, int] = (32, 128), split: str = "val",
                    seed: int = 0, domains: Sequence[str] | None = None) -> MixedWindows:
    """Sequences stitched from segments of different domains, like turns of a chat.

    Each sequence is filled left to right with segments: segment length L ~
    Uniform{lo..hi} tokens (the last one cut to fit), domain chosen uniformly among those
    different from the previous segment's (any domain when there is only one), start
    uniform in that domain's ``split`` tokens. ``domain[i, t]`` says which domain token
    ``tokens[i, t]`` came from, so drop rates can be read by position and by domain.
    """
    _check_shape(n_seqs, seq_len)
    lo, hi = segment_len
    if not 1 <= lo <= hi:
        raise ValueError(f"segment_len={segment_len}: need 1 <= lo <= hi")
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: use 'train' or 'val'")
    names = list(corpus.domains) if domains is None else list(domains)
    for name in names:
        if name not in corpus.domains:
            raise ValueError(f"unknown domain {name!r} (corpus domains: {list(corpus.domains)})")
    if not names:
        raise ValueError("multi_turn_text needs at least one domain")
    toks = [np.asarray(tokenizer.encode(getattr(corpus.domains[k], split)), dtype=np.int64)
            for k in names]
    for name, t in zip(names, toks):
        if t.size < hi:
            raise ValueError(f"domain {name!r} {split} has {t.size} tokens < segment length {hi}")
    rng = B.default_rng(seed)
    out = np.empty((n_seqs, seq_len), dtype=np.int64)       # [N, T]
    lab = np.empty((n_seqs, seq_len), dtype=np.int64)       # [N, T]
    for i in range(n_seqs):
        t, prev = 0, -1
        while t < seq_len:
            choices = [d for d in range(len(names)) if d != prev] or [prev]
            d = choices[int(rng.integers(len(choices)))]
            L = min(int(rng.integers(lo, hi + 1)), seq_len - t)
            s = int(rng.integers(0, toks[d].size - L + 1))
            out[i, t: t + L] = toks[d][s: s + L]
            lab[i, t: t + L] = d
            t, prev = t + L, d
    return MixedWindows(tokens=out, domain=lab, domain_names=names)
