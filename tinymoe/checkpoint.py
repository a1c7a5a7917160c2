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
    "atomic_write_bytes", "temp_path", "temp_writer_pid",
]

FORMAT_NAME = "tinymoe-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.npz"   # the file name the trainer writes inside its out_dir

_META = "__meta__"
_CHECKSUM = "__checksum__"
_REQUIRED_META = ("format", "version", "model_config", "train_config", "tokenizer", "step",
                  "sampler_state", "rng_state", "optimizer", "extra", "arrays")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, truncated, edited, from another version,
    or not matching its config. The message is one line naming the file and the problem."""


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
def resolve_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or ``path/checkpoint.npz`` when ``path`` is a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def _read_npz(path: Path) -> dict[str, Any]:
    """All entries of the npz as host arrays; a truncated or non-zip file -> CheckpointError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt "
                              f"({reason})") from None


def _check_meta(path: Path, meta: Any) -> None:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a tinymoe checkpoint (format {meta.get('format')!r})")
    version = meta.get("version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(f"{path}: checkpoint format version {version!r}; this tinymoe "
                              f"reads version {FORMAT_VERSION}"
                              + (" (written by a newer tinymoe)" if newer else ""))
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify a checkpoint (file, or run folder holding ``checkpoint.npz``)."""
    p = resolve_checkpoint_path(path)
    entries = _read_npz(p)
    if _META not in entries or _CHECKSUM not in entries:
        raise CheckpointError(f"{p}: not a tinymoe checkpoint (no {_META} / {_CHECKSUM} entry)")
    meta_bytes = entries.pop(_META).tobytes()
    stored_sum = entries.pop(_CHECKSUM).tobytes().decode("ascii", errors="replace")
    try:
        meta = json.loads(meta_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: checkpoint metadata is not valid JSON ({e})") from None
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
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{p}: bad model config in checkpoint ({e})") from None
    model_state = {k[len("model/"):]: v for k, v in entries.items() if k.startswith("model/")}
    _check_weights(p, cfg, model_state)
    optimizer_state = _join_optimizer_state(p, meta["optimizer"], entries)
    step = meta["step"]
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{p}: bad step {step!r} in checkpoint")
    return Checkpoint(path=str(p), model_config=cfg, train_config=meta["train_config"],
                      tokenizer=meta["tokenizer"], model_state=model_state,
                      optimizer_state=optimizer_state, sampler_state=meta["sampler_state"],
                      rng_state=meta["rng_state"], step=step, extra=meta["extra"],
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


def _join_optimizer_state(path: Path, opt_meta: Any, entries: dict[str, Any]
                          ) -> dict[str, Any] | None:
    """Rebuild an optimizer ``state_dict`` from its JSON part and ``optim/<i>/<k>`` arrays."""
    if opt_meta is None:
        return None
    if not isinstance(opt_meta, dict) or "state_steps" not in opt_meta:
        raise CheckpointError(f"{path}: bad optimizer metadata in checkpoint")
    state: dict[int, dict[str, Any]] = {}
    for i, n in opt_meta["state_steps"].items():
        state[int(i)] = {"step": int(n)}
    for name, a in entries.items():
        if not name.startswith("optim/"):
            continue
        _, i, k = name.split("/", 2)
        if int(i) not in state:
            raise CheckpointError(f"{path}: optimizer array {name} has no step count")
        state[int(i)][k] = a
    out = {k: v for k, v in opt_meta.items() if k != "state_steps"}
    out["state"] = state
    return out


def load_model(path: str | os.PathLike[str]) -> tuple[Any, Any, ModelConfig]:
    """(model in eval mode, tokenizer, config) from a checkpoint, for sampling or analysis."""
    from tinymoe.nn.model import OpenMoE  # noqa: PLC0415 (model code loads only when needed)

    ckpt = load_checkpoint(path)
    model = OpenMoE(ckpt.model_config)
    try:
        model.load_state_dict(ckpt.model_state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    model.eval()
    return model, ckpt.make_tokenizer(), ckpt.model_config
