"""Write the compact record of a routing study that the repository keeps (docs/study/).

``python -m tinymoe findings`` writes findings.json next to its run folders; that file
holds the full analysis reports (hundreds of kB). This keeps what the README and lesson 10
quote: the command, host, wall time, settings, models, runs' final losses, the MoE-vs-dense
comparison, the expert-removal cost, the scale criteria and every findings row.

    python scripts/study_summary.py runs/findings/findings.json docs/study/lab.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

KEEP = ("command", "host", "wall_seconds", "settings", "seq_len", "models", "comparison",
        "removal", "scale", "findings", "fast", "note", "phases")


def summary(study: dict) -> dict:
    """The kept keys, and per run its name, kind, seed, final losses and how it ended."""
    out = {k: study[k] for k in KEEP if k in study}
    out["runs"] = [{k: r.get(k) for k in ("name", "kind", "seed", "final", "final_mean", "action",
                                          "seconds", "curve")} for r in study["runs"]]
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python scripts/study_summary.py FINDINGS_JSON OUT_JSON", file=sys.stderr)
        return 2
    src, dst = (Path(a) for a in argv)
    dst.write_text(json.dumps(summary(json.loads(src.read_text())), indent=1) + "\n")
    print(f"{dst}: {dst.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
