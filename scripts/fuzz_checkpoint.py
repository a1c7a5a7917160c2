"""Flip every byte of a small checkpoint, two values each, and load each damaged copy the
way ``python -m tinymoe generate`` does (``tinymoe.checkpoint.load_model``).

    python scripts/fuzz_checkpoint.py [--checkpoint PATH] [--values 0x01,0xff]
                                      [--positions all|structure] [--show N]

Each load ends in one of three ways:

    refused     one-line CheckpointError naming the file (the CLI prints it, exit 2)
    loaded      the load succeeded and every weight, the config and the tokenizer equal
                the undamaged file's (a flip in a field nothing reads, e.g. a zip timestamp)
    traceback   any other exception, or a load whose contents differ: must be 0

Without ``--checkpoint`` it writes one: the toy preset shrunk (d_model 8, 2 heads,
d_ff 16, 4 experts, max_seq_len 16) after one AdamW step, so optimizer arrays are in it
(about 60 kB; the full toy checkpoint is 0.8 MB, i.e. 1.6 M loads). ``--positions
structure`` flips only the bytes outside array data (zip headers, npy headers, central
directory, metadata JSON). Prints the counts per region of the file, the first ``--show``
tracebacks, and the wall time. Exit status 1 when any traceback was seen. Runs in one
process; not part of the test suite (``tests/test_checkpoint.py`` runs a sampled version).
"""
from __future__ import annotations

import argparse
import io
import struct
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tinymoe.checkpoint import CheckpointError, load_model, save_checkpoint

REGIONS = ("local header", "npy header", "meta JSON", "array data", "central directory")


def regions(data: bytes) -> list[str]:
    """The region of every byte of an npz: "local header" (zip local file header with its
    name and extra field), "npy header" (magic, version, length and header dict of a
    member), "meta JSON" (data of the ``__meta__`` member), "array data" (other members'
    data) or "central directory" (central directory and end records). Computed from the
    zip structure (the central directory's offsets, then each local header's lengths)."""
    out = ["central directory"] * len(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            off = info.header_offset
            name_len, extra_len = struct.unpack("<HH", data[off + 26:off + 30])
            start = off + 30 + name_len + extra_len                  # the member's first byte
            out[off:start] = ["local header"] * (start - off)
            major = data[start + 6]
            hlen = (struct.unpack("<H", data[start + 8:start + 10])[0] + 10 if major == 1
                    else struct.unpack("<I", data[start + 8:start + 12])[0] + 12)
            out[start:start + hlen] = ["npy header"] * hlen
            body = "meta JSON" if info.filename == "__meta__.npy" else "array data"
            n = info.file_size - hlen
            out[start + hlen:start + hlen + n] = [body] * n
    return out


def small_checkpoint(path: Path) -> Path:
    """The toy preset shrunk, after one AdamW step (so the optimizer arrays exist)."""
    from tinymoe.config import get_preset  # noqa: PLC0415
    from tinymoe.nn.model import OpenMoE  # noqa: PLC0415
    from tinymoe.optim import AdamW  # noqa: PLC0415
    from tinymoe.tokenizer import ByteTokenizer  # noqa: PLC0415

    cfg = get_preset("toy", d_model=8, n_heads=2, d_ff=16, max_seq_len=16)
    model = OpenMoE(cfg, seed=0)
    opt = AdamW(model.parameters(), lr=1e-3)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8))
    model(x, targets=np.roll(x, -1, axis=1)).loss.backward()
    opt.step()
    return save_checkpoint(path, model_config=cfg, model_state=model.state_dict(),
                           tokenizer=ByteTokenizer(), step=1, optimizer_state=opt.state_dict(),
                           train_config={"steps": 1})


def reference(path: Path) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(weights, config, tokenizer dict) of the undamaged file, to compare loads with."""
    model, tok, cfg = load_model(path)
    return {k: np.array(v) for k, v in model.state_dict().items()}, cfg, tok.to_dict()


def classify(path: Path, ref: tuple[dict[str, Any], Any, dict[str, Any]]) -> tuple[str, str]:
    """Load ``path`` as ``generate`` does -> ("refused" | "loaded" | "traceback", detail)."""
    try:
        model, tok, cfg = load_model(path)
    except CheckpointError as e:
        msg = str(e)
        if "\n" in msg or str(path) not in msg:
            return "traceback", f"CheckpointError not one line naming the file: {msg!r}"
        return "refused", msg
    except Exception as e:  # noqa: BLE001  (what this script exists to count)
        return "traceback", f"{type(e).__name__}: {e}"
    weights, ref_cfg, ref_tok = ref
    state = model.state_dict()
    same = (cfg == ref_cfg and tok.to_dict() == ref_tok and state.keys() == weights.keys()
            and all(np.array_equal(np.asarray(state[k]), weights[k]) for k in weights))
    return ("loaded", "") if same else ("traceback", "loaded, but the contents differ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="checkpoint to damage (default: write the shrunk toy one)")
    ap.add_argument("--values", default="0x01,0xff",
                    help="XOR masks applied to each byte, one load each (default: 0x01,0xff)")
    ap.add_argument("--positions", choices=("all", "structure"), default="all",
                    help="all bytes, or only those outside array data")
    ap.add_argument("--show", type=int, default=5, help="tracebacks to print (default: 5)")
    args = ap.parse_args(argv)
    masks = [int(v, 0) for v in args.values.split(",")]
    if not masks or any(not 0 < m < 256 for m in masks):
        ap.error("--values: XOR masks in 1..255")

    with tempfile.TemporaryDirectory() as tmp:
        src = args.checkpoint or small_checkpoint(Path(tmp) / "checkpoint.npz")
        data = Path(src).read_bytes()
        ref = reference(Path(src))
        where = regions(data)
        positions = [i for i in range(len(data))
                     if args.positions == "all" or where[i] != "array data"]
        target = Path(tmp) / "damaged.npz"
        counts: Counter[tuple[str, str]] = Counter()
        shown: list[str] = []
        start = time.perf_counter()
        for i in positions:
            for m in masks:
                damaged = bytearray(data)
                damaged[i] ^= m
                target.write_bytes(damaged)
                outcome, detail = classify(target, ref)
                counts[(where[i], outcome)] += 1
                if outcome == "traceback" and len(shown) < args.show:
                    shown.append(f"  byte {i} ({where[i]}) ^ {m:#04x}: {detail}")
        wall = time.perf_counter() - start

    print(f"{src}: {len(data):,} bytes; {len(positions):,} positions x {len(masks)} values "
          f"= {len(positions) * len(masks):,} loads in {wall:.1f} s")
    print(f"{'region':<18} {'bytes':>7} {'refused':>9} {'loaded':>8} {'traceback':>10}")
    for r in REGIONS:
        n = sum(1 for i in positions if where[i] == r)
        if n:
            print(f"{r:<18} {n:>7,} " + " ".join(
                f"{counts[(r, o)]:>{w},}" for o, w in (("refused", 9), ("loaded", 8),
                                                        ("traceback", 10))))
    tot = {o: sum(v for (_, oo), v in counts.items() if oo == o)
           for o in ("refused", "loaded", "traceback")}
    print(f"{'total':<18} {len(positions):>7,} {tot['refused']:>9,} {tot['loaded']:>8,} "
          f"{tot['traceback']:>10,}")
    for line in shown:
        print(line)
    return 1 if tot["traceback"] else 0


if __name__ == "__main__":
    sys.exit(main())
