"""Command line: ``python -m tinymoe {train,generate,params,analyze,bench} --help``.

    python -m tinymoe train                              preset "mini", built-in corpus
    python -m tinymoe train --config toy --n-experts 8 --top-k 1 --capacity-factor 1.0 \\
                            --slot-priority probability --steps 500 --out runs/try
    python -m tinymoe train --resume runs/mini           continue where it stopped
    python -m tinymoe generate runs/mini --prompt "def " --temperature 0.8 --top-k 50
    python -m tinymoe params --config openmoe-base
    python -m tinymoe analyze ... / bench ...            (see their --help)

Every ``TrainConfig`` field is a ``train`` flag (``--batch-size``, ``--lr`` ...) and
every ``ModelConfig`` field is a model flag (``--d-model``, ``--n-experts``,
``--capacity-factor none`` for dropless ...), generated from the dataclasses. Bad flags
or values end with one line on stderr and exit status 2; so do bad configs, a missing
data path or a corrupt checkpoint (set TINYMOE_DEBUG=1 to see the traceback instead).
Exit status of ``train``: 0 finished (or stopped at --stop-at), 1 stopped on NaN/inf,
130 interrupted by Ctrl-C (checkpoint saved).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message (see prog --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------- flag types
def _model_type(name: str) -> Callable[[str], Any]:
    """Parse a model flag value with the config's own rules (ints, floats, 'none', bools)."""
    from tinymoe.config import parse_overrides  # noqa: PLC0415

    def convert(text: str) -> Any:
        try:
            return parse_overrides({name: text})[name]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__
    return convert


def _domains(text: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in text.split(",") if d.strip())


_TRAIN_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "int | None": _optional(int),
    "str | None": _optional(str), "tuple[str, ...]": _domains,
}
# TrainConfig fields with a hand-written flag
_TRAIN_SPECIAL = {"out_dir", "resume", "device", "overwrite"}


def _add_model_flags(p: argparse.ArgumentParser) -> list[str]:
    from tinymoe.config import ModelConfig  # noqa: PLC0415

    g = p.add_argument_group("model (override any field of the preset)")
    names = []
    for f in fields(ModelConfig):
        g.add_argument(_flag(f.name), dest=f"model__{f.name}", type=_model_type(f.name),
                       default=None, metavar=f.name.upper())
        names.append(f.name)
    return names


def _add_train_flags(p: argparse.ArgumentParser) -> list[str]:
    from tinymoe.train import TrainConfig  # noqa: PLC0415

    g = p.add_argument_group("training")
    names = []
    for f in fields(TrainConfig):
        if f.name in _TRAIN_SPECIAL:
            continue
        kind = _TRAIN_TYPES[str(f.type)]
        g.add_argument(_flag(f.name), dest=f"train__{f.name}", type=kind, default=None,
                       metavar=f.name.upper(), help=f"default: {f.default!r}")
        names.append(f.name)
    return names


# ---------------------------------------------------------------------------- parser
def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def _add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_threads, default=None, metavar="N",
                   help="threads for BLAS and tinymoe's row-parallel kernels (default: every core; "
                        "1 is faster on a machine busy with other work)")


def build_parser(extra: str | None = None) -> _Parser:
    """The full parser; ``extra`` ("analyze" or "bench") also wires that module's flags."""
    parser = _Parser(prog="python -m tinymoe", allow_abbrev=False,
                     description="tinymoe: OpenMoE (a Mixture-of-Experts decoder) on NumPy.")
    sub = parser.add_subparsers(dest="command", metavar="{train,generate,params,analyze,bench}",
                                parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train or resume a model", allow_abbrev=False,
                       description="Train an OpenMoE model (default: preset mini on the "
                                   "built-in corpus) or resume one.")
    t.add_argument("--config", default=None, help="preset name (default: mini; with "
                   "--resume: the checkpoint's config)")
    t.add_argument("--out", "--out-dir", dest="out", default=None,
                   help="run folder (default: runs/<config>; with --resume: the checkpoint's folder)")
    t.add_argument("--resume", default=None, metavar="CKPT",
                   help="checkpoint file or run folder to continue from")
    t.add_argument("--overwrite", action="store_true",
                   help="allow replacing a checkpoint already in the run folder")
    t.add_argument("--device", choices=("cpu", "cuda"), default=None)
    _add_threads_flag(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--parallel", choices=("none", "data", "expert"), default="none",
                   help="MPI parallelism, run under mpiexec -n P (see docs/parallel.md): "
                        "none = one process; data = every rank holds the model, gradients "
                        "are all-reduced; expert = experts sharded E/P per rank, tokens "
                        "exchanged with Alltoall. --batch-size is the per-rank micro-batch b "
                        "(global batch P*b)")
    _add_train_flags(t)
    _add_model_flags(t)

    gen = sub.add_parser("generate", help="sample text from a checkpoint", allow_abbrev=False,
                         description="Continue a prompt with a trained model (KV cache); "
                                     "tokens are streamed to stdout.")
    gen.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run folder")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="prompt text (default: empty -> BOS)")
    src.add_argument("--prompt-ids", default=None, metavar="IDS",
                     help="prompt as comma-separated token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    gen.add_argument("--device", choices=("cpu", "cuda"), default=None)
    _add_threads_flag(gen)

    pa = sub.add_parser("params", help="parameter counts and memory of a config",
                        allow_abbrev=False,
                        description="Parameter / memory table of a preset with overrides.")
    pa.add_argument("--config", default=None, help="preset name (default: mini)")
    pa.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. n_experts=32")
    _add_model_flags(pa)

    for name, helptext in (("analyze", "routing analysis of a checkpoint (the paper's findings)"),
                           ("bench", "throughput, MFU, memory vs a PyTorch twin")):
        sp = sub.add_parser(name, help=helptext, allow_abbrev=False)
        if name == extra:
            _load_optional(name).add_arguments(sp)
    return parser


def _load_optional(name: str) -> Any:
    """``tinymoe.analysis`` / ``tinymoe.bench``; ImportError when it is not there."""
    module = importlib.import_module(f"tinymoe.{'analysis' if name == 'analyze' else name}")
    for attr in ("add_arguments", "run"):
        if not hasattr(module, attr):
            raise ImportError(f"{module.__name__} has no {attr}()")
    return module


# ---------------------------------------------------------------------------- commands
def _given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in vars(args).items()
            if k.startswith(prefix) and v is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    from tinymoe.checkpoint import load_checkpoint  # noqa: PLC0415
    from tinymoe.config import DEFAULT_PRESET, get_preset  # noqa: PLC0415
    from tinymoe.train import TrainConfig, train  # noqa: PLC0415

    model_over = _given(args, "model__")
    train_over = _given(args, "train__")
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume)
        if args.config is not None:
            model_cfg = get_preset(args.config, **model_over)
        else:
            model_cfg = ckpt.model_config.replace(**model_over)
        base = {**ckpt.train_config, "resume": None, "stop_at": None, "device": None,
                "overwrite": False}
        tcfg = TrainConfig.from_dict({**base, **train_over, "resume": ckpt.path,
                                      "out_dir": args.out or str(Path(ckpt.path).parent),
                                      "device": args.device, "overwrite": args.overwrite})
    else:
        name = args.config or DEFAULT_PRESET
        model_cfg = get_preset(name, **model_over)
        tcfg = TrainConfig(**train_over, out_dir=args.out or f"runs/{name}",
                           device=args.device, overwrite=args.overwrite)
    from tinymoe.parallel import run_train  # noqa: PLC0415  [parallel hook]
    result = run_train(args.parallel, train, model_cfg, tcfg, progress=not args.quiet)
    if result.eval and result.status in ("done", "stopped"):
        for dom, v in result.eval.items():
            print(f"held-out {dom:>8}: {v['ce']:.4f} nats/token, {v['nats_per_byte']:.4f} nats/byte")
        print(f"steps {result.step}, wall time {result.wall_time:.1f} s, "
              f"{result.tokens_per_s:,.0f} tokens/s")
    print(("error: " if result.status == "nan" else "") + result.message, file=sys.stderr)
    return {"done": 0, "stopped": 0, "nan": 1, "interrupted": 130}[result.status]


def _cmd_generate(args: argparse.Namespace) -> int:
    from tinymoe import backend as B  # noqa: PLC0415
    from tinymoe.checkpoint import load_model  # noqa: PLC0415
    from tinymoe.generate import check_sampling_args, generate, parse_prompt_ids  # noqa: PLC0415

    if args.device is not None:
        B.set_device(args.device)
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    model, tokenizer, cfg = load_model(args.checkpoint)
    prompt: Any = args.prompt
    if args.prompt_ids is not None:
        prompt = parse_prompt_ids(args.prompt_ids, cfg.vocab_size)
    if not args.no_echo:
        echo = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
        sys.stdout.write(echo)
        sys.stdout.flush()

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 greedy=args.greedy, seed=args.seed, stream=stream)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    sys.stdout.write("\n")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from tinymoe.config import DEFAULT_PRESET, params_command, parse_overrides  # noqa: PLC0415

    overrides = parse_overrides(args.overrides)
    overrides.update(_given(args, "model__"))
    print(params_command(args.config or DEFAULT_PRESET, overrides))
    return 0


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[0] if argv and argv[0] in ("analyze", "bench") else None
    module = None
    if extra is not None:
        try:
            module = _load_optional(extra)
        except ImportError as e:
            print(f"error: '{extra}' is not available in this installation ({e})", file=sys.stderr)
            return 1
    args = build_parser(extra).parse_args(argv)
    from tinymoe.backend import DeviceError  # noqa: PLC0415
    from tinymoe.checkpoint import CheckpointError  # noqa: PLC0415

    commands = {"train": _cmd_train, "generate": _cmd_generate, "params": _cmd_params}
    from tinymoe import backend as B  # noqa: PLC0415

    B.keep_freed_memory()                        # reuse big freed blocks (see its docstring)
    try:
        if getattr(args, "threads", None) is not None:
            B.set_num_threads(args.threads)
        if module is not None:
            return int(module.run(args) or 0)
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, CheckpointError, DeviceError, KeyError) as e:
        if os.environ.get("TINYMOE_DEBUG"):
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
