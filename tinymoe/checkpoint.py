"""Checkpoints: one ``.npz`` file holding everything needed to resume or sample.

Layout of the file (a NumPy ``savez`` zip, read with ``allow_pickle=False``):

    __meta__       JSON (UTF-8 bytes as a uint8 array): format name and version, model
                   config, train config, tokenizer, step, sampler state (the data
                   position), routing RNG state, optimizer hyperparameters and step
                   counts, free-form ``extra`` (data fingerprint, last eval), and the
                   list of array names with dtype and shape
    __checksum__   sha256 (hex, as uint8) of the meta JSON and of every array (name,
                   dtype, shape, bytes) in sorted name order
    model/<name>   each model weight, by its dotted parameter name
    optim/<i>/<k>  optimizer state array ``k`` of parameter number ``i``

Writing is atomic: the file is written to a temporary name in the same folder
(``.checkpoint.npz.<pid>.<random>.tmp``, so leftovers of a killed writer can be told
apart and removed), flushed and fsync'ed, then renamed over the target with
``os.replace`` (a crash leaves either the old file or the new one, never half of one). Reading checks, in order: the zip can
be read (a truncated file fails here), the format name and version, the checksum (a file
edited by hand fails here), that every listed array is present with its dtype and shape,
and that the weights match the stored model config name by name and shape by shape
(``tinymoe.config.parameter_shapes``). Every failure is one :class:`CheckpointError`
line naming the file and the problem.

The zip and npy layers are read by :func:`read_npz` (also for routing snapshots): it
never unpickles, checks each npy header against its member's size before allocating,
reads every member to its end so the zip CRC-32 is verified, and turns any exception of
those layers into that one line; so does a bad metadata JSON. By default a checkpoint
with a NaN or inf in any weight or optimizer array is refused too (``require_finite``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinymoe import backend as B
from tinymoe.jsonio import json_ready
from tinymoe.config import ModelConfig, parameter_shapes

np = B.np

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "CHECKPOINT_NAME", "CheckpointError", "Checkpoint",
    "save_checkpoint", "load_checkpoint", "load_model", "resolve_checkpoint_path",
    "atomic_write_bytes", "temp_path", "temp_writer_pid", "read_npz",
]

FORMAT_NAME = "tinymoe-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.npz"   # the file name the trainer writes inside its out_dir

_META = "__meta__"
_CHECKSUM = "__checksum__"
_REQUIRED_META = ("format", "version", "model_config", "train_config", "tokenizer", "step",
                  "sampler_state", "rng_state", "optimizer", "extra", "arrays")


class CheckpointError(Exception):
    """A checkpoint (or other ``.npz``) that cannot be used: missing, not an npz, truncated,
    damaged, edited, from another version, not matching its config, or not finite. The
    message is one line naming the file and the problem: any control character in it
    (a newline in a file name or in a damaged entry name) is escaped."""

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, as host objects.

    model_state: parameter name -> NumPy array. optimizer_state: the optimizer's
    ``state_dict()`` (``None`` when saved without one). sampler_state: the training
    ``BatchSampler.state_dict()`` (the data position). rng_state: states of any other
    generators the trainer uses (e.g. the routing RNG for random slot priority).
    """

    path: str
    model_config: ModelConfig
    train_config: dict[str, Any]
    tokenizer: dict[str, Any]
    model_state: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    sampler_state: dict[str, Any] | None
    rng_state: dict[str, Any] | None
    step: int
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def make_tokenizer(self) -> Any:
        """The tokenizer object saved with the model."""
        from tinymoe.tokenizer import tokenizer_from_dict  # noqa: PLC0415

        try:
            return tokenizer_from_dict(self.tokenizer)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: bad tokenizer in checkpoint ({e})") from None


# ---------------------------------------------------------------------------- writing
def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` that records the writer's pid:
    ``.<name>.<pid>.<random>.tmp`` (so a run can tell a dead writer's leftovers,
    :func:`temp_writer_pid`, from a live writer's file)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def temp_writer_pid(name: str) -> int | None:
    """The pid recorded in a temporary file name of :func:`temp_path`; None for any other name."""
    m = _TEMP_RE.match(name)
    return int(m.group(1)) if m else None


def atomic_write_bytes(path: str | os.PathLike[str], write: Any) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, then rename it
    over ``path`` (``os.replace`` is atomic on POSIX and Windows). On any error, or
    Ctrl-C, the temporary file is removed and ``path`` is untouched.

    The temporary file is created like any other file (mode 0666 minus the umask, so the
    result has the same permissions as ``log.jsonl``) and named by :func:`temp_path`; a
    writer killed with SIGKILL leaves it behind, and the next run in that folder removes
    it (``tinymoe.runfolder.remove_stale_temps``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_path(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
            break
        except FileExistsError:  # pragma: no cover (a 32-bit random name taken)
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _digest(meta_bytes: bytes, arrays: dict[str, Any]) -> str:
    """sha256 over the meta JSON and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(meta_bytes)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\n{name}|{a.dtype.str}|{list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json_safe(obj: Any) -> Any:
    """The checkpoint's JSON policy: :func:`tinymoe.jsonio.json_ready` keeping non-finite
    floats (an ``inf`` config value must come back as ``inf``) and refusing arrays (they
    belong in the npz part)."""
    return json_ready(obj, nonfinite="keep", arrays=False)


def _split_optimizer_state(opt_state: dict[str, Any] | None
                           ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Optimizer ``state_dict`` -> (JSON part, arrays ``optim/<i>/<k>``)."""
    if opt_state is None:
        return None, {}
    arrays: dict[str, Any] = {}
    steps: dict[str, int] = {}
    for i, s in opt_state.get("state", {}).items():
        for k, v in s.items():
            if k == "step":
                steps[str(i)] = int(v)
            else:
                arrays[f"optim/{i}/{k}"] = np.ascontiguousarray(B.to_numpy(v))
    meta = {k: v for k, v in opt_state.items() if k != "state"}
    meta["state_steps"] = steps
    return _json_safe(meta), arrays


def save_checkpoint(path: str | os.PathLike[str], *, model_config: ModelConfig,
                    model_state: dict[str, Any], tokenizer: dict[str, Any] | Any,
                    step: int, train_config: dict[str, Any] | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    sampler_state: dict[str, Any] | None = None,
                    rng_state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically; returns its path.

    ``model_state`` is ``model.state_dict()``; ``tokenizer`` a tokenizer or its
    ``to_dict()``; ``optimizer_state`` an ``Optimizer.state_dict()``.
    """
    tok = tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else tokenizer
    arrays: dict[str, Any] = {f"model/{k}": np.ascontiguousarray(B.to_numpy(v))
                              for k, v in model_state.items()}
    opt_meta, opt_arrays = _split_optimizer_state(optimizer_state)
    arrays.update(opt_arrays)
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "model_config": model_config.to_dict(),
        "train_config": _json_safe(train_config or {}),
        "tokenizer": _json_safe(tok), "step": int(step),
        "sampler_state": _json_safe(sampler_state), "rng_state": _json_safe(rng_state),
        "optimizer": opt_meta, "extra": _json_safe(extra or {}),
        "arrays": {k: [a.dtype.str, list(a.shape)] for k, a in sorted(arrays.items())},
    }
    meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    checksum = _digest(meta_bytes, arrays)
    payload = dict(arrays)
    payload[_META] = np.frombuffer(meta_bytes, dtype=np.uint8)
    payload[_CHECKSUM] = np.frombuffer(checksum.encode("ascii"), dtype=np.uint8)
    return atomic_write_bytes(path, lambda f: np.savez(f, **payload))


# ---------------------------------------------------------------------------- reading
def _article(kind: str) -> str:
    return f"{'an' if kind[:1].lower() in 'aeiou.' else 'a'} {kind}"


def _reason(e: BaseException) -> str:
    """``TypeName: first line of the message`` (at most 160 characters), for one-line errors."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _regular_file(path: Path, kind: str) -> Path:
    """``path`` if it is an existing regular file (never opens a FIFO or a device)."""
    if not path.exists():
        raise CheckpointError(f"{kind} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not {_article(kind)} (not a regular file)")
    return path


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")   # a zip with entries / an empty zip
_NPY_MAGIC = b"\x93NUMPY"
_READ_CHUNK = 1 << 24                          # bytes per read of array data


class _Foreign(ValueError):
    """An intact npz that tinymoe never writes (object arrays)."""


def _read_npy_entry(f: Any, entry_size: int, name: str) -> Any:
    """One ``.npy`` member of an npz (``f`` open in the zip, ``entry_size`` its declared
    uncompressed size) -> array. Checks, before allocating, that the header's shape and
    dtype account for exactly the bytes the entry holds; reads to the end of the entry so
    that ``zipfile`` verifies its CRC-32 (which covers the header and the data)."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = fmt.read_array_header_2_0(f)
    else:
        raise ValueError(f"entry {name!r}: unsupported .npy format version {version}")
    if dtype.hasobject:   # would need pickle: never written by tinymoe, never unpickled here
        raise _Foreign(f"entry {name!r} holds pickled Python objects, which tinymoe never "
                       "writes or reads")
    count = 1
    for n in shape:
        count *= int(n)
    nbytes = count * dtype.itemsize
    header = f.tell()
    if header + nbytes != entry_size:
        raise ValueError(f"entry {name!r}: its header declares {nbytes} bytes of "
                         f"{dtype}{tuple(shape)}, the entry holds {entry_size - header}")
    flat = np.empty(count, dtype=dtype)                                     # [count]
    raw = flat.view(np.uint8) if nbytes else np.empty(0, np.uint8)          # [nbytes]
    pos = 0
    while pos < nbytes:
        chunk = f.read(min(_READ_CHUNK, nbytes - pos))
        if not chunk:
            raise ValueError(f"entry {name!r} ends after {pos} of {nbytes} data bytes")
        raw[pos:pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        pos += len(chunk)
    if f.read(1):
        raise ValueError(f"entry {name!r} has bytes after its array data")
    if fortran_order:
        return flat.reshape(tuple(shape)[::-1]).transpose()
    return flat.reshape(tuple(shape))


def _check_members_tile(path: Path, infos: list[zipfile.ZipInfo], start_dir: int) -> None:
    """The members listed in the central directory must cover the file from byte 0 to
    the central directory without a gap: ``zipfile`` stops reading the directory early,
    silently, when a damaged length field (e.g. a comment length) overruns it, and the
    members it did not list would be dropped without an error."""
    infos = sorted(infos, key=lambda i: i.header_offset)
    ends = [i.header_offset for i in infos[1:]] + [start_dir]    # where each member must end
    pos = 0
    with open(path, "rb") as f:
        for info, end in zip(infos, ends):
            if info.header_offset != pos:
                raise ValueError(f"the central directory lists a member at byte "
                                 f"{info.header_offset}, the previous one ends at byte {pos}")
            f.seek(pos)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"no local header at byte {pos}")
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            data_end = pos + 30 + name_len + extra_len + info.compress_size
            # a data descriptor (flag bit 3: written to a stream) follows the data:
            # crc + two sizes of 4 or 8 bytes, with or without its 4-byte signature
            allowed = ({data_end + d for d in (12, 16, 20, 24)} if info.flag_bits & 0x08
                       else {data_end})
            if end not in allowed:
                raise ValueError(f"member {info.filename!r} ends at byte {data_end}, the next "
                                 f"listed item starts at byte {end} (members missing from "
                                 "the directory, or a damaged size)")
            pos = end


def read_npz(path: str | os.PathLike[str], kind: str = ".npz file") -> dict[str, Any]:
    """Every array of an ``.npz`` (name without ``.npy`` -> NumPy array), or one
    :class:`CheckpointError` line naming the file. ``kind`` names the file in messages
    ("tinymoe checkpoint", "routing snapshot").

    Nothing is unpickled. A file that is not an npz (empty, text, an image, a lone
    ``.npy``) is "not a <kind>"; any failure of the zip layer (truncation, a bad CRC,
    an unknown compression method, encryption flags, inconsistent headers) or of the npy
    layer (an unparsable header, a shape or dtype that does not match the entry's size,
    object arrays) is "not a readable <kind>, truncated or corrupt (<reason>)". The
    zip's CRC-32 of every entry is verified.
    """
    p = _regular_file(Path(path), kind)
    try:
        with open(p, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read this {kind} ({e.strerror or _reason(e)})") from None
    try:
        if not head:
            raise CheckpointError(f"{p}: not {_article(kind)} (empty file)")
        if head.startswith(_NPY_MAGIC):
            raise CheckpointError(f"{p}: not {_article(kind)} (a single .npy array, "
                                  "not an .npz archive)")
        if not head.startswith(_ZIP_MAGIC):
            raise CheckpointError(f"{p}: not {_article(kind)} (not an .npz/zip archive)")
        out: dict[str, Any] = {}
        with zipfile.ZipFile(p) as zf:
            _check_members_tile(p, zf.infolist(), zf.start_dir)
            for info in zf.infolist():
                name = info.filename
                if not name.endswith(".npy") or info.is_dir():
                    raise CheckpointError(f"{p}: not {_article(kind)} (entry {name!r} is "
                                          "not an .npy array)")
                if name[:-4] in out:
                    raise ValueError(f"entry {name!r} appears twice")
                with zf.open(info) as member:
                    out[name[:-4]] = _read_npy_entry(member, info.file_size, name)
        return out
    except CheckpointError:
        raise
    except _Foreign as e:
        raise CheckpointError(f"{p}: not {_article(kind)} ({e})") from None
    except Exception as e:   # any failure of the zip or npy layer: one line, never a traceback
        raise CheckpointError(f"{p}: not a readable {kind}, truncated or corrupt "
                              f"({_reason(e)})") from None


def resolve_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or ``path/checkpoint.npz`` when ``path`` is a run folder."""
    p = Path(path)
    if p.is_dir():
        if not (p / CHECKPOINT_NAME).exists():
            raise CheckpointError(f"{p}: not a tinymoe checkpoint (a folder without "
                                  f"{CHECKPOINT_NAME})")
        p = p / CHECKPOINT_NAME
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    return _regular_file(p, "tinymoe checkpoint")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_meta(path: Path, meta: Any) -> None:
    """Format name and version first (so a newer file says so), then every field's type:
    a file whose checksum matches can still have been written by something else."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a tinymoe checkpoint (format {meta.get('format')!r})")
    version = meta.get("version")
    if not _is_int(version) or version != FORMAT_VERSION:
        newer = _is_int(version) and version > FORMAT_VERSION
        raise CheckpointError(f"{path}: checkpoint format version {version!r}; this tinymoe "
                              f"reads version {FORMAT_VERSION}"
                              + (" (written by a newer tinymoe)" if newer else ""))
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    for key in ("model_config", "train_config", "tokenizer", "extra", "arrays"):
        if not isinstance(meta[key], dict):
            raise CheckpointError(f"{path}: checkpoint metadata: {key} is not a JSON object")
    for key in ("sampler_state", "rng_state", "optimizer"):
        if meta[key] is not None and not isinstance(meta[key], dict):
            raise CheckpointError(f"{path}: checkpoint metadata: {key} is not a JSON object")
    if not _is_int(meta["step"]) or meta["step"] < 0:
        raise CheckpointError(f"{path}: bad step {meta['step']!r} in checkpoint")
    for name, spec in meta["arrays"].items():
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
                and isinstance(spec[1], list) and all(_is_int(n) and n >= 0 for n in spec[1])):
            raise CheckpointError(f"{path}: checkpoint metadata: bad entry for array {name!r}")


def load_checkpoint(path: str | os.PathLike[str], require_finite: bool = True) -> Checkpoint:
    """Read and verify a checkpoint (file, or run folder holding ``checkpoint.npz``).

    Every problem is one :class:`CheckpointError` line naming the file. With
    ``require_finite`` (the default: sampling, analysis and resuming all need it) a NaN or
    inf in any weight or optimizer array is refused; pass False only to inspect a
    diverged checkpoint.
    """
    p = resolve_checkpoint_path(path)
    entries = read_npz(p, kind="tinymoe checkpoint")
    if _META not in entries or _CHECKSUM not in entries:
        raise CheckpointError(f"{p}: not a tinymoe checkpoint (no {_META} / {_CHECKSUM} entry)")
    meta_arr, sum_arr = entries.pop(_META), entries.pop(_CHECKSUM)
    if meta_arr.dtype != np.uint8 or sum_arr.dtype != np.uint8:
        raise CheckpointError(f"{p}: not a tinymoe checkpoint ({_META} / {_CHECKSUM} are not bytes)")
    meta_bytes = meta_arr.tobytes()
    stored_sum = sum_arr.tobytes().decode("ascii", errors="replace")
    try:
        meta = json.loads(meta_bytes.decode("utf-8"))
    except Exception as e:   # bad UTF-8, bad JSON, nesting too deep, an int too long
        raise CheckpointError(f"{p}: checkpoint metadata is not valid JSON ({_reason(e)})") from None
    _check_meta(p, meta)
    if _digest(meta_bytes, entries) != stored_sum:
        raise CheckpointError(f"{p}: checksum mismatch: the file was modified after it was "
                              "written (edited by hand or damaged)")

    listed: dict[str, Any] = meta["arrays"]
    missing = sorted(set(listed) - set(entries))
    unexpected = sorted(set(entries) - set(listed))
    if missing or unexpected:
        raise CheckpointError(f"{p}: arrays missing {missing[:3]} / unexpected {unexpected[:3]}")
    for name, (dtype, shape) in listed.items():
        a = entries[name]
        if a.dtype.str != dtype or list(a.shape) != list(shape):
            raise CheckpointError(f"{p}: array {name} is {a.dtype.str}{list(a.shape)}, "
                                  f"listed as {dtype}{shape}")

    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{p}: bad model config in checkpoint ({_reason(e)})") from None
    model_state = {k[len("model/"):]: v for k, v in entries.items() if k.startswith("model/")}
    _check_weights(p, cfg, model_state)
    optimizer_state = _join_optimizer_state(p, meta["optimizer"], entries)
    if require_finite:
        _check_finite(p, entries)
    return Checkpoint(path=str(p), model_config=cfg, train_config=meta["train_config"],
                      tokenizer=meta["tokenizer"], model_state=model_state,
                      optimizer_state=optimizer_state, sampler_state=meta["sampler_state"],
                      rng_state=meta["rng_state"], step=meta["step"], extra=meta["extra"],
                      version=meta["version"])


def _check_weights(path: Path, cfg: ModelConfig, state: dict[str, Any]) -> None:
    """Weight names, shapes and dtype must be exactly what ``cfg`` describes."""
    expected = parameter_shapes(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{path}: weights do not match the config: missing "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        raise CheckpointError(f"{path}: weights do not match the config: unexpected "
                              f"{', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(f"{path}: weights do not match the config: {k} has shape "
                                  f"{tuple(state[k].shape)}, the config implies {tuple(shape)}")
        if state[k].dtype != np.dtype(cfg.dtype):
            raise CheckpointError(f"{path}: weight {k} is {state[k].dtype}, the config says "
                                  f"{cfg.dtype}")


def _check_finite(path: Path, arrays: dict[str, Any]) -> None:
    """Every floating-point array (weights ``model/...``, optimizer state ``optim/...``)
    must hold only finite numbers."""
    for name in sorted(arrays):
        a = arrays[name]
        if a.dtype.kind in "fc":
            bad = a.size - int(np.count_nonzero(np.isfinite(a)))
            if bad:
                what = "weight" if name.startswith("model/") else "array"
                raise CheckpointError(
                    f"{path}: {what} {name.split('/', 1)[-1] if what == 'weight' else name} "
                    f"holds {bad} non-finite value(s) (NaN or inf); this checkpoint cannot be "
                    "used to sample, analyse or resume")


def _join_optimizer_state(path: Path, opt_meta: Any, entries: dict[str, Any]
                          ) -> dict[str, Any] | None:
    """Rebuild an optimizer ``state_dict`` from its JSON part and ``optim/<i>/<k>`` arrays."""
    if opt_meta is None:
        if any(name.startswith("optim/") for name in entries):
            raise CheckpointError(f"{path}: optimizer arrays without optimizer metadata")
        return None
    steps = opt_meta.get("state_steps") if isinstance(opt_meta, dict) else None
    if not isinstance(steps, dict) or not all(
            isinstance(i, str) and i.isdigit() and _is_int(n) for i, n in steps.items()):
        raise CheckpointError(f"{path}: bad optimizer metadata in checkpoint")
    state: dict[int, dict[str, Any]] = {int(i): {"step": n} for i, n in steps.items()}
    for name, a in entries.items():
        if not name.startswith("optim/"):
            continue
        parts = name.split("/", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
            raise CheckpointError(f"{path}: bad optimizer array name {name!r}")
        if int(parts[1]) not in state:
            raise CheckpointError(f"{path}: optimizer array {name} has no step count")
        state[int(parts[1])][parts[2]] = a
    out = {k: v for k, v in opt_meta.items() if k != "state_steps"}
    out["state"] = state
    return out


def load_model(path: str | os.PathLike[str], require_finite: bool = True
               ) -> tuple[Any, Any, ModelConfig]:
    """(model in eval mode, tokenizer, config) from a checkpoint, for sampling or analysis.

    Refuses (one :class:`CheckpointError` line) anything :func:`load_checkpoint` refuses,
    including non-finite weights unless ``require_finite=False``."""
    from tinymoe.nn.model import OpenMoE  # noqa: PLC0415 (model code loads only when needed)

    ckpt = load_checkpoint(path, require_finite=require_finite)
    tokenizer = ckpt.make_tokenizer()
    model = OpenMoE(ckpt.model_config)
    try:
        model.load_state_dict(ckpt.model_state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: {_reason(e)}") from None
    model.eval()
    return model, tokenizer, ckpt.model_config
