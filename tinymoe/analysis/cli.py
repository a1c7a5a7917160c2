"""The command ``python -m tinymoe analyze CKPT``: flags, loading, and the output files.

:func:`add_arguments` adds the flags to the ``analyze`` sub-parser and :func:`run` runs
the command (``tinymoe.__main__`` finds both as ``tinymoe.analysis.add_arguments`` /
``tinymoe.analysis.run``). :func:`run` loads the checkpoint, its data and snapshots, the
optional ``--compare`` model and the untrained control, calls :func:`.report.analyze`,
then writes the figures (:mod:`.plots`), ``analysis.md`` (the findings table: finding,
measure, effect, baseline, interval, verdict; then the text report) and ``analysis.json`` (:func:`tinymoe.jsonio.json_ready`:
NaN -> null, strict JSON) and prints the tables (:mod:`.text`). Bad input ends with one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from tinymoe import backend as B
from tinymoe.analysis.collect import load_snapshots
from tinymoe.analysis.plots import plot_report
from tinymoe.analysis.report import analyze
from tinymoe.analysis.text import format_markdown, format_report
from tinymoe.jsonio import json_ready

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m tinymoe analyze``."""
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="checkpoint file, or a run folder holding checkpoint.npz")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="text file or folder of domains (default: the data the checkpoint "
                             "was trained on, else the built-in corpus); held-out parts are used")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write the PNGs and analysis.json "
                             "(default: <checkpoint folder>/analysis)")
    parser.add_argument("--max-tokens", type=int, default=65536, metavar="N",
                        help="held-out tokens per domain for the specialization measures "
                             "(default 65536)")
    parser.add_argument("--drop-tokens", type=int, default=16384, metavar="N",
                        help="tokens per data set for each drop-vs-position run "
                             "(default 16384)")
    parser.add_argument("--init-tokens", type=int, default=16384, metavar="N",
                        help="tokens per domain routed by the untrained control "
                             "(default 16384)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help="sequences per forward pass (default 16)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="T",
                        help="tokens per sequence (default: the model's max_seq_len)")
    parser.add_argument("--min-count", type=int, default=16, metavar="M",
                        help="ids seen fewer times are left out of the std measure and of the "
                             "'most specific' tokens (paper: 128; default 16)")
    parser.add_argument("--top-tokens", type=int, default=8, metavar="K",
                        help="top tokens kept per expert (default 8)")
    parser.add_argument("--bins", type=int, default=16, metavar="N",
                        help="position bins of the drop curves (default 16)")
    parser.add_argument("--larger-cf", type=float, default=None, metavar="CF",
                        help="capacity factor of the 'larger cf' cure (default: 2x the larger "
                             "of the train and eval factors)")
    parser.add_argument("--compare", metavar="CKPT2", default=None,
                        help="a second checkpoint (e.g. trained with the shifted data mixed in) "
                             "drawn on the drop figure")
    parser.add_argument("--snapshots", metavar="DIR", default=None,
                        help="routing snapshots folder (default: <checkpoint folder>/snapshots)")
    parser.add_argument("--exclude", metavar="DOMAIN", action="append", default=None,
                        help="treat this domain as left out of training (default: read from "
                             "the checkpoint's train config); repeatable")
    parser.add_argument("--no-init-control", dest="init_control", action="store_false",
                        help="skip the untrained model of the same config routed as a control")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads for BLAS and tinymoe's row-parallel kernels (default: "
                             "every core). 1 is often faster on a busy machine")
    parser.add_argument("--paper-group", type=int, default=None, metavar="G",
                        help="tokens per routing group of the paper-like drop run (default: "
                             "batch size x sequence length, i.e. several sequences per group "
                             "as in OpenMoE's 4096-token groups)")
    parser.add_argument("--boot", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of every 95%% interval (default 1000)")
    parser.add_argument("--splits", type=int, default=50, metavar="N",
                        help="random split halves of the snapshot probe for the early-routing "
                             "majority agreement and its ceiling (default 50)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="array library: NumPy (cpu) or CuPy (cuda) (default: cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the multi-turn sequences, shuffled baselines, random-"
                             "routing baselines and bootstrap resamples")


def _train_info(train_config: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """(domains excluded from training, data path or None) from a checkpoint's train config."""
    excluded: Any = None
    for key in ("exclude", "exclude_domains", "excluded_domains", "exclude_domain"):
        if train_config.get(key):
            excluded = train_config[key]
            break
    if isinstance(excluded, str):
        excluded = [e for e in re.split(r"[,\s]+", excluded) if e]
    data = None
    for key in ("data", "data_path"):
        if isinstance(train_config.get(key), str) and train_config[key] not in ("", "builtin"):
            data = train_config[key]
            break
    return list(excluded or []), data


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("max_tokens", "drop_tokens", "init_tokens", "batch_size", "min_count",
                 "top_tokens", "bins", "boot", "splits"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')}={v} must be >= 1")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be >= 1")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len={args.seq_len} must be >= 1")
    if args.larger_cf is not None and args.larger_cf <= 0:
        raise ValueError(f"--larger-cf={args.larger_cf} must be > 0")
    if args.paper_group is not None and args.paper_group < 1:
        raise ValueError(f"--paper-group={args.paper_group} must be >= 1")


def _loss_curve(log_path: Path) -> list[tuple[int, float]]:
    """(step, train CE) of the trainer's ``log.jsonl`` (events ``train``); [] if absent."""
    if not log_path.is_file():
        return []
    curve = []
    for line in log_path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("event") == "train" and "step" in e and "ce" in e:
            curve.append((int(e["step"]), float(e["ce"])))
    return curve


def run(args: argparse.Namespace) -> int:
    """``python -m tinymoe analyze``: print the tables, write PNGs and analysis.json."""
    from tinymoe.checkpoint import CheckpointError  # noqa: PLC0415

    try:
        if getattr(args, "threads", None) is not None:
            B.set_num_threads(args.threads)
        if getattr(args, "device", None) is not None:
            B.set_device(args.device)
        return _run_analysis(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_analysis(args: argparse.Namespace) -> int:
    from tinymoe.checkpoint import (  # noqa: PLC0415
        load_checkpoint, load_model, resolve_checkpoint_path)
    from tinymoe.data import builtin_corpus, load_corpus  # noqa: PLC0415

    start = time.perf_counter()
    _check_positive(args)

    def log(msg: str) -> None:
        print(f"[analyze {time.perf_counter() - start:5.1f}s] {msg}", flush=True)

    ckpt_path = resolve_checkpoint_path(args.checkpoint)
    model, tokenizer, cfg = load_model(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    excluded, data_path = _train_info(ckpt.train_config or {})
    if args.exclude is not None:
        excluded = list(args.exclude)
    if args.data:
        corpus = load_corpus(args.data)
    elif data_path and Path(data_path).exists():
        corpus = load_corpus(data_path)
    else:
        corpus = builtin_corpus()
    excluded = [e for e in excluded if e in corpus.domains] if args.exclude is None else excluded
    log(f"loaded {ckpt_path} (step {ckpt.step}); data {corpus.source}: "
        f"{', '.join(corpus.domains)}" + (f"; left out of training: {', '.join(excluded)}"
                                          if excluded else ""))
    if cfg.router_type == "expert_choice":
        log("note: expert-choice router: every token lists all E experts by score and an "
            "expert keeps its top-C tokens, so 'drops' below count the (token, expert) pairs "
            "not picked and the std measure has no spread (k = E); for tokens with no expert "
            "by position see `python -m tinymoe compare-routers`")

    compare_model = None
    compare_name = "compare"
    if args.compare:
        cpath = resolve_checkpoint_path(args.compare)
        compare_model, ctok, ccfg = load_model(cpath)
        if ctok.to_dict() != tokenizer.to_dict():
            raise ValueError(f"--compare {cpath}: uses a different tokenizer than {ckpt_path}")
        T = args.seq_len or cfg.max_seq_len
        if ccfg.max_seq_len < T:
            raise ValueError(f"--compare {cpath}: max_seq_len {ccfg.max_seq_len} < {T}")
        compare_name = "compare " + (cpath.parent.name if cpath.name == "checkpoint.npz"
                                     else cpath.stem)

    init_model = None
    if getattr(args, "init_control", True):
        from tinymoe.nn.model import OpenMoE  # noqa: PLC0415

        init_model = OpenMoE(cfg.replace(), seed=args.seed + 1)
        init_model.eval()

    snap_dir = Path(args.snapshots) if args.snapshots else ckpt_path.parent / "snapshots"
    snapshots: list[dict[str, Any]] = []
    note = ""
    if snap_dir.is_dir():
        snapshots = load_snapshots(snap_dir)
        if not snapshots:
            note = f"no step_N.npz files in {snap_dir}"
        elif snapshots[-1]["step"] != ckpt.step:
            note = (f"the last snapshot (step {snapshots[-1]['step']}) is the reference; the "
                    f"checkpoint is at step {ckpt.step}")
    else:
        note = (f"no snapshot folder {snap_dir} (train with --snapshot-every N, or pass "
                "--snapshots DIR)")

    report = analyze(model, tokenizer, corpus, excluded=excluded, compare_model=compare_model,
                     compare_name=compare_name, snapshots=snapshots, snapshot_note=note,
                     max_tokens=args.max_tokens, drop_tokens=args.drop_tokens,
                     batch_size=args.batch_size, seq_len=args.seq_len,
                     min_count=args.min_count, n_top=args.top_tokens, n_bins=args.bins,
                     large_cf=args.larger_cf, seed=args.seed, init_model=init_model,
                     init_tokens=args.init_tokens,
                     loss_curve=_loss_curve(ckpt_path.parent / "log.jsonl"),
                     paper_group=args.paper_group, n_boot=args.boot, n_splits=args.splits,
                     log=log)
    report = {"checkpoint": str(ckpt_path), "step": ckpt.step, **report}

    out_dir = Path(args.out) if args.out else ckpt_path.parent / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plot_report(report, out_dir)
    report["figures"] = figures
    report["wall_seconds"] = round(time.perf_counter() - start, 2)
    report["json"] = str(out_dir / "analysis.json")
    report["markdown"] = str(out_dir / "analysis.md")
    report = json_ready(report)                  # NaN -> null: strict JSON
    text = json.dumps(report, indent=1, allow_nan=False)
    from tinymoe.checkpoint import atomic_write_bytes  # noqa: PLC0415

    atomic_write_bytes(out_dir / "analysis.json", lambda f: f.write(text.encode("utf-8")))
    md = format_markdown(report)
    atomic_write_bytes(out_dir / "analysis.md", lambda f: f.write(md.encode("utf-8")))
    print()
    print(format_report(report))
    print(f"numbers: {report['json']}; findings table: {report['markdown']}")
    return 0
