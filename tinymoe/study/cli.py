"""``python -m tinymoe findings``: train the study's runs (resumably), measure, write the report.

Steps (each printed with the time since the start; training shows the trainer's bars):

1. train every run of :func:`.plan.plan_runs` that is not finished (a finished run is
   skipped, an interrupted one resumed; Ctrl-C stops the study after saving, and the same
   command continues it);
2. read each run's held-out evaluations from its ``log.jsonl`` (final loss per domain,
   the loss-vs-FLOPs curve);
3. (a) expert removal on the main MoE (seed 0): held-out loss at capacity 0 against the
   eval capacity factor, per domain, intervals over windows (:mod:`.measures`);
4. (b) MoE against the dense twins: final held-out loss over seeds;
5. (c) the routing analysis of the main MoE (:func:`tinymoe.analysis.analyze`, with its
   routing snapshots and an untrained control);
6. (d) the MoE trained without one domain: its held-out loss on that domain against the
   main MoE's, and its routing analysis with that domain marked as held out;
7. the scale criteria and their caveat; ``findings.md``, ``findings.json`` and the PNGs in
   ``--out``.

Bad input ends with one line on stderr and exit status 2 (the ``ValueError`` /
``OSError`` lines of ``tinymoe.__main__``); a run that hits NaN ends the study with exit
status 1, Ctrl-C with 130 (every finished step is kept: run the same command again).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tinymoe import backend as B
from tinymoe.flags import positive_int
from tinymoe.jsonio import json_ready
from tinymoe.study import measures as M
from tinymoe.study.plan import (FAST, STUDY_PRESET, STUDY_STEPS, RunSpec, StudySettings,
                                flops_per_update, param_counts, plan_runs, run_one, run_state,
                                seeds_of)
from tinymoe.study.report import (FAST_NOTE, findings_rows, format_markdown,
                                  plot_loss_vs_flops, plot_removal)

__all__ = ["add_arguments", "run", "settings_from_args", "host_info", "read_log",
           "run_summary", "command_line"]




def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``python -m tinymoe findings``."""
    from tinymoe.config import preset_names  # noqa: PLC0415

    p.add_argument("--config", default=None, metavar="PRESET",
                   help=f"model preset of the MoE, one of: {', '.join(preset_names())} "
                        f"(default: {STUDY_PRESET}; with --fast: {FAST['preset']}); the dense "
                        "twins are derived from it")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help=f"optimizer updates of every run (default: {STUDY_STEPS}; with "
                        f"--fast: {FAST['steps']})")
    p.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                   help="seeds of the MoE and of each dense twin; the spread over seeds is "
                        f"the MoE-vs-dense interval (default: 3; with --fast: {FAST['seeds']})")
    p.add_argument("--total-seeds", type=positive_int, default=None, metavar="N",
                   help="seeds of the dense twin of equal TOTAL parameters, a reference line "
                        "that is not part of the scale criteria and the slowest run "
                        "(default: 1; at most --seeds)")
    p.add_argument("--without", default="code", metavar="DOMAIN",
                   help="domain left out of training for the held-out-domain run (default: "
                        "code; one of the data's domains: prose, code, arith for the "
                        "built-in corpus)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a folder of domains (one file or subfolder each) instead of the "
                        "built-in corpus")
    p.add_argument("--out", default="runs/findings", metavar="DIR",
                   help="study folder: runs/<run>/ (one run folder each), findings.md, "
                        "findings.json and the PNGs (default: runs/findings)")
    p.add_argument("--fast", action="store_true",
                   help="test mode: toy model, a few steps, one seed, tiny data and budgets; "
                        "runs in seconds, its verdicts are not meaningful (the report says so)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="threads for BLAS and tinymoe's row-parallel kernels (default: every "
                        "core; 1 is faster on a machine busy with other work)")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="runs trained at once, each in its own process with --threads / N "
                        "threads (default: 1; on 2 cores, --jobs 2 trains two small runs in "
                        "about the time of one). Only training is parallel; the measures "
                        "after it run in this process")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """The study settings: the defaults (or the fast ones), then the flags given."""
    base = dict(FAST) if args.fast else {}
    given = {"preset": args.config, "steps": args.steps, "seeds": args.seeds,
             "total_seeds": getattr(args, "total_seeds", None),
             "without": args.without, "data": args.data}
    base.update({k: v for k, v in given.items() if v is not None})
    s = StudySettings(**base)
    s.validate()
    return s


def _check_domain(s: StudySettings) -> None:
    """``--without`` names a domain of the data, and the data has another one."""
    from tinymoe.data import BUILTIN_DOMAINS, load_corpus  # noqa: PLC0415

    names = list(BUILTIN_DOMAINS) if s.data is None else list(load_corpus(s.data).domains)
    if s.without not in names:
        raise ValueError(f"--without {s.without!r} is not a domain of the data "
                         f"(domains: {', '.join(names)})")
    if len(names) < 2:
        raise ValueError(f"--without {s.without!r} would leave no domain to train on "
                         "(the data needs at least two domains)")


def command_line(s: StudySettings, out: str) -> str:
    """The command that reproduces (or resumes) this study."""
    parts = ["python -m tinymoe findings"] + (["--fast"] if s.fast else [])
    parts += [f"--config {s.preset}", f"--steps {s.steps}", f"--seeds {s.seeds}",
              f"--total-seeds {s.total_seeds}",
              f"--without {s.without}"] + ([f"--data {s.data}"] if s.data else [])
    return " ".join(parts + [f"--out {out}"])


def host_info() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), cores, threads in use, load average, versions."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine() or "unknown",
            "cores": os.cpu_count(), "threads": B.get_num_threads(), "load_start": _load(),
            "python": platform.python_version(), "numpy": B.np.__version__,
            "device": B.get_device()}


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def read_log(folder: Path) -> dict[str, Any]:
    """From a run folder's ``log.jsonl``: ``train`` [(step, CE)] and ``eval`` {step: the
    evaluation dict}; a later line for the same step (a resumed run redoing steps)
    replaces an earlier one. Missing file: empty."""
    train: dict[int, float] = {}
    evals: dict[int, dict[str, Any]] = {}
    path = Path(folder) / "log.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if e.get("event") == "train" and "ce" in e:
                train[int(e["step"])] = float(e["ce"])
            elif e.get("event") == "eval":
                evals[int(e["step"])] = e["eval"]
    return {"train": sorted(train.items()), "eval": dict(sorted(evals.items()))}


def run_summary(spec: RunSpec, outcome: dict[str, Any]) -> dict[str, Any]:
    """One run's row of the report: final held-out loss (per domain, mean) and its curve."""
    log = read_log(spec.folder)
    flops = flops_per_update(spec.model, spec.train)
    final = log["eval"].get(spec.train.steps)
    if final is None:                           # the log was lost: the checkpoint keeps it
        from tinymoe.checkpoint import load_checkpoint  # noqa: PLC0415

        final = load_checkpoint(spec.folder).extra.get("last_eval")
    steps = [s for s, e in log["eval"].items() if "mean" in e]
    return {"name": spec.name, "kind": spec.kind, "seed": spec.seed,
            "folder": str(spec.folder), **outcome,
            "final": {k: v["nats_per_byte"] for k, v in (final or {}).items() if k != "mean"},
            "final_mean": (final or {}).get("mean", {}).get("nats_per_byte"),
            "curve": {"step": steps, "flops": [s * flops for s in steps],
                      "nats_per_byte": [log["eval"][s]["mean"]["nats_per_byte"]
                                        for s in steps]},
            "train_curve": log["train"]}


def run(args: argparse.Namespace) -> int:
    """``python -m tinymoe findings`` (see the module docstring); returns the exit status."""
    t0 = time.perf_counter()
    s = settings_from_args(args)
    _check_domain(s)
    out = Path(args.out)
    if not str(args.out).strip():
        raise ValueError("--out is empty")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    progress = not args.quiet

    def say(msg: str) -> None:
        from tinymoe.runfolder import write_line  # noqa: PLC0415

        write_line(f"[findings {time.perf_counter() - t0:6.1f}s] {msg}")

    host = host_info()
    runs = plan_runs(s, out)
    states = [run_state(r)[0] for r in runs]      # refuse other runs' folders before training
    out.mkdir(parents=True, exist_ok=True)
    if s.fast:
        say(FAST_NOTE)
    say(f"{len(runs)} runs in {out / 'runs'}: " + ", ".join(
        f"{states.count(k)} {k}" for k in ("done", "partial", "new") if k in states)
        + " (done: skipped; partial: resumed)")
    outcomes: dict[str, dict[str, Any]] = {}
    jobs = min(int(getattr(args, "jobs", 1) or 1), len(runs))

    def finished(i: int, spec: RunSpec, res: dict[str, Any]) -> int | None:
        outcomes[spec.name] = res
        say(f"run {i}/{len(runs)} {spec.name}: {res['action']}"
            + (f" from step {res['from_step']}" if res["action"] == "resumed" else "")
            + f" ({res['message']})")
        if res["status"] == "interrupted":
            print(f"interrupted in run {spec.name}; run the same command again to resume: "
                  f"{command_line(s, str(out))}", file=sys.stderr)
            return 130
        if res["status"] != "done":
            print(f"error: run {spec.name} stopped: {res['message']}", file=sys.stderr)
            return 1
        return None

    if jobs > 1:
        stop = train_in_parallel(runs, jobs, max(1, B.get_num_threads() // jobs), say, finished)
        if stop is not None:
            return stop
    for i, spec in enumerate(runs, 1):
        if spec.name in outcomes:
            continue
        say(f"run {i}/{len(runs)} {spec.name}: {spec.model.describe()}")
        stop = finished(i, spec, run_one(spec, progress=progress))
        if stop is not None:
            return stop
    t_train = time.perf_counter() - t0
    study = measure(s, runs, outcomes, say, progress)
    study["host"] = {**host, "load_end": _load()}
    study["command"] = command_line(s, str(out))
    study["phases"]["training_seconds"] = round(t_train, 2)
    write_report(study, out, say)
    study["wall_seconds"] = round(time.perf_counter() - t0, 2)
    write_report(study, out, None)                 # again, with the final wall time
    print(summary_text(study, out))
    return 0


def _train_worker(spec: RunSpec, threads: int) -> dict[str, Any]:
    """One run in a worker process of :func:`train_in_parallel` (no progress bar)."""
    B.keep_freed_memory()
    B.set_num_threads(threads)
    return run_one(spec, progress=False)


def train_in_parallel(runs: list[RunSpec], jobs: int, threads: int,
                      say: Callable[[str], None],
                      finished: Callable[[int, RunSpec, dict[str, Any]], int | None]
                      ) -> int | None:
    """Train ``runs`` in ``jobs`` worker processes of ``threads`` threads each (``spawn``:
    a fresh interpreter per worker, no state shared with this one). ``finished(i, spec,
    outcome)`` is called as each run ends (runs finished before are left to the caller,
    which skips them); its first non-None value (an exit status) is
    returned after the runs already started have ended: Ctrl-C reaches every worker, each
    saves its run at the end of the current update (resumable), and the runs not yet
    started are cancelled."""
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait  # noqa: PLC0415

    todo = [(i, r) for i, r in enumerate(runs, 1) if run_state(r)[0] != "done"]
    if not todo:                                    # finished runs: skipped by the caller
        return None
    say(f"training {len(todo)} runs, {jobs} at a time, {threads} thread(s) each")
    status: int | None = None
    with ProcessPoolExecutor(max_workers=jobs,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {}
        for i, r in todo:
            pending[pool.submit(_train_worker, r, threads)] = (i, r)
        while pending:
            try:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:                   # the workers got the signal too
                for f in pending:
                    f.cancel()
                status = status or 130
                continue
            for f in done:
                i, r = pending.pop(f)
                if f.cancelled():
                    continue
                try:
                    res = f.result()
                except Exception as e:                  # noqa: BLE001 (a worker died)
                    res = {"name": r.name, "action": "trained", "from_step": 0,
                           "status": "error", "message": f"{type(e).__name__}: {e}",
                           "seconds": 0.0}
                stop = finished(i, r, res)
                if stop is not None and status is None:
                    status = stop
                    for g in pending:                   # not started yet: not started at all
                        g.cancel()
    return status


def measure(s: StudySettings, runs: list[RunSpec], outcomes: dict[str, dict[str, Any]],
            say: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """Steps 2-7 of the module docstring on finished runs: the JSON-ready study dict
    without the figures, host and wall time."""
    from tinymoe.analysis import analyze, load_snapshots  # noqa: PLC0415
    from tinymoe.checkpoint import load_model  # noqa: PLC0415
    from tinymoe.data import encode_corpus  # noqa: PLC0415
    from tinymoe.evaluate import token_byte_lengths  # noqa: PLC0415
    from tinymoe.nn.model import OpenMoE  # noqa: PLC0415
    from tinymoe.train import load_data  # noqa: PLC0415

    phases: dict[str, float] = {}
    summaries = [run_summary(r, outcomes[r.name]) for r in runs]
    by_name = {r["name"]: r for r in summaries}
    main = seeds_of(runs, "moe")[0]
    without = seeds_of(runs, "moe_without")[0]
    models = {}
    for kind in ("moe", "dense_active", "dense_total", "moe_without"):
        spec = seeds_of(runs, kind)[0]
        models[kind] = {"describe": spec.model.describe(), "params": param_counts(spec.model),
                        "flops_per_update": flops_per_update(spec.model, spec.train),
                        "config": spec.model.to_dict()}
    comparison: dict[str, Any] = {
        kind: M.seed_summary([by_name[r.name]["final_mean"] for r in seeds_of(runs, kind)])
        for kind in ("moe", "dense_active", "dense_total")}

    # (a) expert removal, on the main MoE
    t = time.perf_counter()
    say("(a) expert removal: held-out loss of the main MoE at capacity 0 and at its eval cf")
    model, tokenizer, cfg = load_model(main.folder)
    corpus = load_data(main.train)                                # every domain
    _, val_tok = encode_corpus(corpus, tokenizer)
    byte_len = token_byte_lengths(tokenizer, cfg.vocab_size)
    T = int(main.train.seq_len)
    bar = _bar("expert removal") if progress else None
    removal = M.compare_losses((model, M.ZERO_CAPACITY), (model, {}), val_tok, byte_len, T,
                               s.removal_windows, s.analysis_batch, s.n_boot, 0, bar)
    removal = {"eval_capacity_factor": cfg.eval_capacity_factor or 0.0, "domains": removal}
    phases["removal_seconds"] = round(time.perf_counter() - t, 2)

    # (c) routing analysis of the main MoE
    t = time.perf_counter()
    say("(c) routing analysis of the main MoE")
    budgets = dict(max_tokens=s.analysis_tokens, drop_tokens=s.drop_tokens,
                   batch_size=s.analysis_batch, seq_len=T, n_boot=s.n_boot,
                   n_splits=s.n_splits, log=lambda m: say("    " + m))
    rep_main = analyze(model, tokenizer, corpus, excluded=[],
                       snapshots=load_snapshots(main.folder / "snapshots"),
                       init_model=OpenMoE(cfg.replace(), seed=1).eval(),
                       init_tokens=s.init_tokens,
                       loss_curve=by_name[main.name]["train_curve"], **budgets)
    phases["analysis_seconds"] = round(time.perf_counter() - t, 2)

    # (d) the held-out domain
    t = time.perf_counter()
    say(f"(d) held-out domain: the MoE trained without {s.without} against the main MoE")
    wo_model, wo_tok, _ = load_model(without.folder)
    if wo_tok.to_dict() != tokenizer.to_dict():
        raise ValueError(f"{without.folder} uses another tokenizer than {main.folder}")
    bar = _bar("held-out domain") if progress else None
    held = M.compare_losses((wo_model, {}), (model, {}), val_tok, byte_len, T,
                            s.removal_windows, s.analysis_batch, s.n_boot, 0, bar)
    rep_wo = analyze(wo_model, wo_tok, corpus, excluded=[s.without],
                     snapshots=load_snapshots(without.folder / "snapshots"),
                     loss_curve=by_name[without.name]["train_curve"], **budgets)
    phases["held_out_seconds"] = round(time.perf_counter() - t, 2)

    scale = M.scale_criteria(removal["domains"]["all"]["diff"], comparison["moe"],
                             comparison["dense_active"])
    from tinymoe.analysis import format_report  # noqa: PLC0415

    reports = {"main": json_ready(rep_main), "without": json_ready(rep_wo)}
    study: dict[str, Any] = {
        "fast": s.fast, "note": FAST_NOTE if s.fast else None,
        "settings": dataclasses.asdict(s), "seq_len": T, "models": models, "runs": summaries,
        "comparison": comparison, "removal": removal,
        "held_out": {"domain": s.without, "run": without.name, "loss": held},
        "analysis_rows": {k: v.get("findings", []) for k, v in reports.items()},
        "analysis": reports,
        "analysis_text": {k: format_report(v) for k, v in reports.items()},
        "scale": scale, "phases": phases}
    study["findings"] = findings_rows(study)
    return study


def _bar(desc: str) -> Callable[[Any], Any]:
    from tqdm import tqdm  # noqa: PLC0415

    return lambda it: tqdm(it, desc=desc, unit="domain", file=sys.stderr, leave=False)


def write_report(study: dict[str, Any], out: Path, say: Callable[[str], None] | None) -> None:
    """The PNGs (first call only), ``findings.json`` and ``findings.md`` in ``out``."""
    from tinymoe.analysis import plot_drop_vs_position, plot_report  # noqa: PLC0415
    from tinymoe.checkpoint import atomic_write_bytes  # noqa: PLC0415

    if "figures" not in study:
        if say is not None:
            say(f"writing the report to {out}")
        main, wo = study["analysis"]["main"], study["analysis"]["without"]
        figs = {"loss_vs_flops": plot_loss_vs_flops(study["runs"], out / "loss_vs_flops.png"),
                "expert_removal": plot_removal(study["removal"], out / "expert_removal.png",
                                               study["scale"]["threshold"]),
                **plot_report(main, out)}
        figs["held_out_drop_vs_position"] = plot_drop_vs_position(
            wo["drops"], out / "held_out_drop_vs_position.png")
        study["figures"] = figs
    study.setdefault("wall_seconds", 0.0)
    study["json"] = str(out / "findings.json")
    study["markdown"] = str(out / "findings.md")
    text = json.dumps(json_ready(study), indent=1, allow_nan=False)
    atomic_write_bytes(out / "findings.json", lambda f: f.write(text.encode("utf-8")))
    md = format_markdown(json_ready(study))
    atomic_write_bytes(out / "findings.md", lambda f: f.write(md.encode("utf-8")))


def summary_text(study: dict[str, Any], out: Path) -> str:
    """What the command prints at the end: the verdict counts, the criteria, the files."""
    rows = study["findings"]
    n_pass = sum(r["verdict"] is True for r in rows)
    n_fail = sum(r["verdict"] is False for r in rows)
    lines = []
    if study["fast"]:
        lines.append(FAST_NOTE)
    c = study["comparison"]
    lines.append("final held-out loss, nats/byte (mean of domains; mean [min, max] over "
                 "seeds): " + "; ".join(
                     f"{k} {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]" for k, v in c.items()))
    r = study["removal"]["domains"]["all"]["diff"]
    lines.append(f"expert removal (capacity 0) costs {r['estimate']:.3f} nats/byte "
                 f"[{r['low']:.3f}, {r['high']:.3f}]")
    lines.append(f"{len(rows)} findings rows: {n_pass} PASS, {n_fail} fail, "
                 f"{len(rows) - n_pass - n_fail} undecided")
    sc = study["scale"]
    lines.append(sc["caveat"] if sc["caveat"] else
                 "scale criteria met: the experts matter at this scale")
    lines.append(f"report: {out / 'findings.md'}; numbers: {out / 'findings.json'}; "
                 f"wall time {study['wall_seconds']:.0f} s")
    return "\n".join(lines)
