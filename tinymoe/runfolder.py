"""The run folder of a training run: lock, stale temporary files, log, checkpoints,
routing snapshots and curves.

    runs/mini/
        train.lock          while a run trains here: {"pid", "host", "started"}
        log.jsonl           one JSON object per event (start, train, eval, end)
        checkpoint.npz      the last good checkpoint (tinymoe.checkpoint)
        curves.png          training and held-out loss, drops and load
        snapshots/step_N.npz  routing of a fixed probe batch (tinymoe.analysis reads them)

Guarantees (the trainer relies on them):

- **One run per folder.** :meth:`RunFolder.open` takes an exclusive ``fcntl.flock`` on
  ``train.lock``; a second run in the same folder is refused with one line naming the
  running process (pid, host). The kernel drops the lock when its holder dies, even by
  SIGKILL, so a lock file left by a dead process is simply taken over (with a note). The
  file is removed at exit, Ctrl-C and SIGTERM included.
- **No leftovers.** Files are written atomically (``tinymoe.checkpoint.atomic_write_bytes``:
  temp file named ``.<name>.<pid>.<random>.tmp``, fsync, rename). A writer killed
  mid-write leaves its temp file; opening the folder removes every such file whose writer
  pid is no longer running.
- **Failed writes name the file.** A write that fails (a full disk: ``ENOSPC``) raises
  :class:`RunFolderError`, one line naming the path and saying which checkpoint is kept.
- Every file follows the umask (no 0600 temp-file modes leak into the results).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tinymoe import backend as B
from tinymoe.checkpoint import CHECKPOINT_NAME, atomic_write_bytes, save_checkpoint, temp_writer_pid

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no advisory locks; runs are not locked)
    fcntl = None  # type: ignore[assignment]

np = B.np

__all__ = ["RunFolder", "RunFolderView", "RunFolderBusy", "RunFolderError", "LOCK_NAME",
           "pid_alive", "remove_stale_temps", "plot_curves", "save_snapshot", "routing_snapshot"]

LOCK_NAME = "train.lock"


class RunFolderBusy(FileExistsError):
    """Another training run holds the folder's lock (one line: pid, host, folder)."""


class RunFolderError(OSError):
    """A file of the run folder could not be written; ``str()`` is one line naming it."""

    def __init__(self, err: OSError, path: Path, kept: str = ""):
        super().__init__(err.errno, err.strerror or str(err))
        self.filename = str(path)
        self.message = (f"could not write {path}: {err.strerror or err}"
                        + (f" [{errno.errorcode.get(err.errno, err.errno)}]" if err.errno else "")
                        + (f"; {kept}" if kept else ""))

    def __str__(self) -> str:
        return self.message


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (``os.kill(pid, 0)``)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # exists, owned by another user
        return True
    except OSError:                # pragma: no cover (cannot tell: assume it runs)
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the ``.<name>.<pid>.<random>.tmp`` files in ``folder`` (not recursive)
    whose writer pid is not running; returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        pid = temp_writer_pid(p.name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:  # pragma: no cover (removed by someone else meanwhile)
            pass
    return removed


# ---------------------------------------------------------------------------- the lock
class _Lock:
    """An exclusive ``flock`` on ``folder/train.lock`` holding this process's pid and host."""

    def __init__(self, path: Path, fd: int | None, note: str | None):
        self.path, self._fd, self.note = path, fd, note

    @classmethod
    def acquire(cls, folder: Path) -> "_Lock":
        path = folder / LOCK_NAME
        if fcntl is None:  # pragma: no cover
            return cls(path, None, "note: no file locking on this platform; the run folder "
                                   "is not protected against a second run")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
                       if holder else "another process")
                raise RunFolderBusy(f"{folder} is in use by another training run ({who}, "
                                    f"lock {path}); wait for it to end or choose another "
                                    "--out") from None
            # the holder may have removed the file between our open and flock: then we
            # locked a deleted file, so start again on the new one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read_holder(fd)
            note = None
            if old and old.get("pid") != os.getpid():
                state = ("no longer running" if old.get("host") == socket.gethostname()
                         and not pid_alive(int(old.get("pid", 0))) else "no longer holding it")
                note = (f"note: took over {path}, left by pid {old.get('pid')} on host "
                        f"{old.get('host')} ({state})")
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode() + b"\n", 0)
            return cls(path, fd, note)

    def release(self) -> None:
        """Remove the lock file (only if it is still ours), then drop the lock."""
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------- the folder
class RunFolder:
    """One training session's view of its folder; use as ``with RunFolder.open(path) as rf``.

    ``open`` creates the folder, takes the lock and removes stale temp files;
    ``notes`` says what it found (a taken-over lock, removed files). The trainer then calls
    :meth:`start_log`, :meth:`log`, :meth:`save`, :meth:`snapshot`, :meth:`curves`, and
    reads :attr:`kept` / :meth:`kept_message` for the last good checkpoint.
    """

    def __init__(self, path: Path, lock: _Lock, created: bool, notes: list[str]):
        self.path = path
        self.checkpoint_path = path / CHECKPOINT_NAME
        self.log_path = path / "log.jsonl"
        self.notes = notes
        self._lock, self._created = lock, created
        self._log: Any = None
        self.kept: tuple[str, int] | None = None      # (path, step) of the last good checkpoint

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "RunFolder":
        path = Path(path)
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        lock = _Lock.acquire(path)
        notes = [lock.note] if lock.note else []
        removed = remove_stale_temps(path) + remove_stale_temps(path / "snapshots")
        if removed:
            mb = sum(_size(p) for p in removed) / 2 ** 20
            more = ", ..." if len(removed) > 1 else ""
            size = f"; {mb:.0f} MB" if mb >= 1 else ""
            notes.append(f"note: removed {len(removed)} temporary file(s) of writers that are "
                         f"no longer running ({removed[0].name}{more}{size})")
        return cls(path, lock, created, notes)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the log and release the lock; a folder this session created and left
        empty (a failed start) is removed again."""
        if self._log is not None:
            self._log.close()
            self._log = None
        self._lock.release()
        if self._created:
            try:
                self.path.rmdir()
            except OSError:
                pass

    # -- log ------------------------------------------------------------------------------
    def start_log(self, fresh: bool) -> None:
        """Open ``log.jsonl`` (a fresh run truncates it and drops stale snapshots)."""
        if fresh:
            for old in (self.path / "snapshots").glob("step_*.npz"):
                old.unlink()
        self._log = open(self.log_path, "w" if fresh else "a", encoding="utf-8")

    def log(self, event: dict[str, Any]) -> None:
        """Append one JSON line (flushed); a failed write raises :class:`RunFolderError`."""
        try:
            self._log.write(json.dumps(event, sort_keys=False) + "\n")
            self._log.flush()
        except OSError as e:
            raise RunFolderError(e, self.log_path, self.kept_message()) from None

    # -- checkpoints ----------------------------------------------------------------------
    def kept_message(self) -> str:
        if self.kept is None:
            return "no checkpoint was written"
        return f"the last good checkpoint (step {self.kept[1]}) is kept at {self.kept[0]}"

    def save(self, step: int, **state: Any) -> str:
        """Write ``checkpoint.npz`` atomically (``save_checkpoint(..., **state)``) and make
        it the kept one. The caller checks that the state is good before calling."""
        try:
            save_checkpoint(self.checkpoint_path, step=step, **state)
        except OSError as e:
            raise RunFolderError(e, self.checkpoint_path, self.kept_message()) from None
        self.kept = (str(self.checkpoint_path), step)
        return self.kept[0]

    def snapshot(self, model: Any, step: int, tokens: Any, domain: Any,
                 domain_names: list[str]) -> None:
        """``snapshots/step_N.npz``; see :func:`save_snapshot`."""
        path = self.path / "snapshots" / f"step_{step}.npz"
        try:
            save_snapshot(path, model, step, tokens, domain, domain_names)
        except OSError as e:
            raise RunFolderError(e, path, self.kept_message()) from None

    def curves(self) -> str | None:
        """Redraw ``curves.png``; a failure is returned as a note (a plot never stops a run)."""
        try:
            plot_curves(self.log_path, self.path / "curves.png")
        except Exception as e:  # noqa: BLE001
            return f"note: could not draw curves.png ({type(e).__name__}: {e})"
        return None


class RunFolderView(RunFolder):
    """The run folder as an MPI rank other than 0 sees it (:mod:`tinymoe.parallel`): it
    reads (``checkpoint_path``, ``kept``) and writes nothing, takes no lock and creates no
    folder; rank 0's :class:`RunFolder` does all of that. :meth:`snapshot` still runs the
    model on the probe batch, since under expert parallelism that forward is collective
    (every rank must take part)."""

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "RunFolderView":
        return cls(Path(path), _Lock(Path(path) / LOCK_NAME, None, None), False, [])

    def close(self) -> None:
        pass

    def start_log(self, fresh: bool) -> None:
        pass

    def log(self, event: dict[str, Any]) -> None:
        pass

    def save(self, step: int, **state: Any) -> str:
        """Nothing is written here; records what rank 0 saved, so messages agree."""
        self.kept = (str(self.checkpoint_path), step)
        return self.kept[0]

    def snapshot(self, model: Any, step: int, tokens: Any, domain: Any,
                 domain_names: list[str]) -> None:
        routing_snapshot(model, step, tokens, domain, domain_names)   # the collective forward

    def curves(self) -> str | None:
        return None


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:  # pragma: no cover
        return 0


# ---------------------------------------------------------------------------- snapshots
def save_snapshot(path: Path, model: Any, step: int, tokens: Any, domain: Any,
                  domain_names: list[str]) -> None:
    """Route the probe batch in eval mode and save, per MoE layer, each token's experts.

    File (npz): step, tokens [N, T], domain [N], domain_names [D], layers [L] (block
    indices), expert_index [L, N, T, k] (rank order), top1 [L, N, T] (= expert_index[..., 0]),
    kept [L, N, T, k] (after capacity), probs_top1 [L, N, T] (router probability of the
    first choice).
    """
    arrays = routing_snapshot(model, step, tokens, domain, domain_names)
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def routing_snapshot(model: Any, step: int, tokens: Any, domain: Any,
                     domain_names: list[str]) -> dict[str, Any]:
    """The arrays of :func:`save_snapshot` (the probe batch routed in eval mode)."""
    with model.evaluating():
        out = model(tokens, rng=B.default_rng(0))
    n, t = tokens.shape
    idx = np.stack([B.to_numpy(s.expert_index).reshape(n, t, -1) for s in out.routing])  # [L, N, T, k]
    kept = np.stack([B.to_numpy(s.kept).reshape(n, t, -1) for s in out.routing])        # [L, N, T, k]
    ptop = np.stack([B.to_numpy(s.topk_prob)[:, 0].reshape(n, t) for s in out.routing])  # [L, N, T]
    arrays = {"step": np.asarray(step, dtype=np.int64), "tokens": tokens.astype(np.int64),
              "domain": domain.astype(np.int64), "domain_names": np.asarray(domain_names),
              "layers": np.asarray([s.layer for s in out.routing], dtype=np.int64),
              "expert_index": idx.astype(np.int16), "top1": idx[..., 0].astype(np.int16),
              "kept": kept.astype(bool), "probs_top1": ptop.astype(np.float32)}
    return arrays


# ---------------------------------------------------------------------------- curves
def plot_curves(log_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> Path | None:
    """Draw training loss and held-out loss per domain (top), and the dropped fraction
    and busiest expert's share (bottom), from ``log.jsonl``; returns the PNG path."""
    from tinymoe.plotting import agg_figure  # noqa: PLC0415 (matplotlib only when asked)

    log_path, png_path = Path(log_path), Path(png_path)
    train_ev, eval_ev = [], []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("event") == "train":
            train_ev.append(ev)
        elif ev.get("event") == "eval":
            eval_ev.append(ev)
    if not train_ev:
        return None
    fig = agg_figure(8, 7)   # Agg canvas, no pyplot: the caller's backend is untouched
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    steps = [e["step"] for e in train_ev]
    ax1.plot(steps, [e["ce"] for e in train_ev], label="train CE", color="black", lw=1)
    domains = [k for k in (eval_ev[-1]["eval"] if eval_ev else {}) if k != "mean"]
    for name in domains:
        pts = [(e["step"], e["eval"][name]["nats_per_byte"]) for e in eval_ev if name in e["eval"]]
        ax1.plot(*zip(*pts), marker="o", ms=3, label=f"held-out {name}")
    ax1.set_ylabel("loss (nats per token / per byte)")
    ax1.set_title("tinymoe training: train cross-entropy and held-out nats per byte")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [100 * e["dropped"] for e in train_ev], label="dropped assignments (%)")
    ax2.plot(steps, [100 * e["busiest"] for e in train_ev], label="busiest expert's share (%)")
    ax2.set_xlabel("step (optimizer updates)")
    ax2.set_ylabel("percent")
    ax2.set_title("routing: capacity drops and expert load")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    return png_path


def write_line(msg: str) -> None:
    """A line on stderr that does not break a tqdm bar."""
    try:
        from tqdm import tqdm  # noqa: PLC0415
        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr)
