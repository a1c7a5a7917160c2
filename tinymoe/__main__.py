"""Command line: ``python -m tinymoe {train,generate,params,analyze,bench} --help``.

    python -m tinymoe train                              preset "mini", built-in corpus
    python -m tinymoe train --config toy --n-experts 8 --top-k 1 --capacity-factor 1.0 \\
                            --slot-priority probability --steps 500 --out runs/try
    python -m tinymoe train --resume runs/mini           continue where it stopped
    mpiexec -n 2 python -m tinymoe train --parallel expert --batch-size 8
                                                         experts sharded over 2 MPI ranks
    python -m tinymoe generate runs/mini --prompt "def " --temperature 0.8 --top-k 50
    python -m tinymoe params --config openmoe-base
    python -m tinymoe analyze ... / bench ...            (see their --help)

Every subcommand is a :class:`Command`: a name, a help line, and ``add_arguments(p)`` /
``run(args)`` (for ``analyze`` and ``bench``: those two functions of their module, imported
only when that command runs). Every ``TrainConfig`` field is a ``train`` flag
(``--batch-size``, ``--lr`` ...) and every ``ModelConfig`` field is a model flag
(``--d-model``, ``--n-experts``, ``--capacity-factor none`` for dropless ...), with types
from the field annotations and help from the field docstrings (:mod:`tinymoe.flags`).
Bad flags or values end with one line on stderr and exit status 2; so do bad configs, a
missing data path, a corrupt checkpoint, a run folder in use or a failed write (set
TINYMOE_DEBUG=1 to see the traceback instead). Exit status of ``train``: 0 finished (or
stopped at --stop-at), 1 stopped on NaN/inf, 130 interrupted by Ctrl-C or SIGTERM
(checkpoint saved).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "Command", "COMMANDS"]

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message (see prog --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` wires its flags, ``run(args)`` runs it and
    returns the exit status. ``module`` names a module that provides both, imported only
    when the command is used (:meth:`load`)."""

    name: str
    help: str
    description: str = ""
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    module: str | None = None

    def load(self) -> "Command":
        """This command with ``add_arguments``/``run`` of its module (ImportError if absent)."""
        if self.module is None:
            return self
        mod = importlib.import_module(self.module)
        for attr in ("add_arguments", "run"):
            if not hasattr(mod, attr):
                raise ImportError(f"{mod.__name__} has no {attr}()")
        return Command(self.name, self.help, self.description or (mod.__doc__ or "").split("\n")[0],
                       mod.add_arguments, mod.run)


# ---------------------------------------------------------------------------- shared flags
def _choices() -> dict[str, Sequence[str]]:
    """Fields whose value is one of a fixed set (validated by the dataclasses)."""
    from tinymoe.config import (AUX_LOSS_KINDS, CAPACITY_MODES, DTYPES, FFN_KINDS,  # noqa: PLC0415
                                INITS, ROUTER_SCORES, ROUTER_TYPES, SLOT_PRIORITIES)
    from tinymoe.train import OPTIMIZERS, RECIPES, SCHEDULES, TOKENIZERS  # noqa: PLC0415

    return {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "tokenizer": TOKENIZERS,
            "capacity_mode": CAPACITY_MODES, "slot_priority": SLOT_PRIORITIES, "dtype": DTYPES,
            "recipe": RECIPES, "ffn_kind": FFN_KINDS, "init": INITS, "router_type": ROUTER_TYPES,
            "router_score": ROUTER_SCORES, "aux_loss_kind": AUX_LOSS_KINDS}


def _add_model_flags(p: argparse.ArgumentParser) -> list[str]:
    from tinymoe.config import ModelConfig  # noqa: PLC0415
    from tinymoe.flags import add_dataclass_flags  # noqa: PLC0415

    g = p.add_argument_group("model (override any field of the preset)")
    return add_dataclass_flags(g, ModelConfig, "model__", choices=_choices(),
                               default_note="default: the preset's")


def _add_config_flag(p: argparse.ArgumentParser, extra: str = "") -> None:
    from tinymoe.config import DEFAULT_PRESET, preset_names  # noqa: PLC0415

    p.add_argument("--config", default=None, metavar="PRESET",
                   help=f"model preset, one of: {', '.join(preset_names())} "
                        f"(default: {DEFAULT_PRESET}{extra})")




def _add_threads_flag(p: argparse.ArgumentParser) -> None:
    from tinymoe.flags import positive_int  # noqa: PLC0415

    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="threads for BLAS and tinymoe's row-parallel kernels (default: every core; "
                        "1 is faster on a machine busy with other work)")


def _add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="array library: NumPy (cpu) or CuPy (cuda) (default: cpu)")


def _given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in vars(args).items()
            if k.startswith(prefix) and v is not None}


# ---------------------------------------------------------------------------- train
# TrainConfig fields with a hand-written flag
_TRAIN_SPECIAL = ("out_dir", "resume", "device", "overwrite")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from tinymoe.flags import add_dataclass_flags  # noqa: PLC0415
    from tinymoe.parallel import MODES  # noqa: PLC0415  (the one vocabulary; MPI loads lazily)
    from tinymoe.train import TrainConfig  # noqa: PLC0415

    _add_config_flag(p, "; with --resume: the checkpoint's config")
    p.add_argument("--out", "--out-dir", dest="out", default=None,
                   help="run folder (default: runs/<config>; with --resume: the checkpoint's "
                        "folder); one run at a time")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="checkpoint file or run folder to continue from")
    p.add_argument("--overwrite", action="store_true",
                   help="allow replacing a checkpoint already in the run folder")
    _add_device_flag(p)
    _add_threads_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--parallel", choices=MODES, default="none",
                   help="MPI parallelism, run under mpiexec -n P (see docs/parallel.md): "
                        "none = one process (default); data = every rank holds the model, "
                        "gradients are all-reduced; expert = the experts are sharded E/P per "
                        "rank, tokens exchanged with Alltoall. --batch-size is then the "
                        "per-rank micro-batch b (global batch P*b)")
    g = p.add_argument_group("training")
    add_dataclass_flags(g, TrainConfig, "train__", skip=_TRAIN_SPECIAL, choices=_choices())
    _add_model_flags(p)
    fg = p.add_argument_group(
        "fine-grained experts (DeepSeekMoE; applied to the preset after the model flags, "
        "the run stores the resulting n_experts, top_k, d_ff_expert, d_ff_shared)")
    fg.add_argument("--fine-grained", type=int, default=None, metavar="M",
                    help="split every expert into M experts of 1/M the width and route to "
                         "M*top_k of the M*n_experts (same parameters and compute); M must "
                         "divide the expert width")
    fg.add_argument("--shared-experts", type=int, default=None, metavar="S",
                    help="make the shared FFN S always-on experts of the expert width / M "
                         "(d_ff_shared = S * width / M; 0: no shared FFN; default: the "
                         "preset's shared FFN unchanged)")


def _train_run(args: argparse.Namespace) -> int:
    from tinymoe.checkpoint import load_checkpoint  # noqa: PLC0415
    from tinymoe.config import DEFAULT_PRESET, get_preset  # noqa: PLC0415
    from tinymoe.parallel import run_train, setup  # noqa: PLC0415
    from tinymoe.recipes import RECIPES, apply_recipe  # noqa: PLC0415
    from tinymoe.routing_variants import fine_grained_flags  # noqa: PLC0415
    from tinymoe.train import TrainConfig, train  # noqa: PLC0415

    par = setup(args.parallel)          # one line without mpiexec (or P ranks and "none")
    model_over = _given(args, "model__")
    train_over = _given(args, "train__")
    split, shared = args.fine_grained, args.shared_experts
    if args.resume is not None:
        if split is not None or shared is not None:
            raise ValueError("--fine-grained/--shared-experts shape a new run; a resumed run "
                             "keeps its checkpoint's experts")
        ckpt = load_checkpoint(args.resume)
        if args.config is not None:
            model_cfg = get_preset(args.config, **model_over)
        else:
            model_cfg = ckpt.model_config.replace(**model_over)
        base = {**ckpt.train_config, "resume": None, "stop_at": None, "device": None,
                "overwrite": False}
        out = args.out if args.out is not None else str(Path(ckpt.path).parent)
        tcfg = TrainConfig.from_dict({**base, **train_over, "resume": ckpt.path,
                                      "out_dir": out, "device": args.device,
                                      "overwrite": args.overwrite})
    else:
        name = args.config or DEFAULT_PRESET
        recipe = train_over.get("recipe", TrainConfig.recipe)
        if recipe in RECIPES and recipe != "none":      # the recipe under the explicit flags
            train_over, model_cfg = apply_recipe(recipe, get_preset(name), train_over,
                                                 model_over, TrainConfig.steps)
        else:                                            # (a bad name: TrainConfig says so)
            model_cfg = get_preset(name, **model_over)
        model_cfg = fine_grained_flags(model_cfg, split, shared)   # concrete shapes, no "m" stored
        out = args.out if args.out is not None else f"runs/{name}"
        tcfg = TrainConfig(**train_over, out_dir=out, device=args.device,
                           overwrite=args.overwrite)
    result = run_train(par, train, model_cfg, tcfg, progress=not args.quiet)
    code = {"done": 0, "stopped": 0, "nan": 1, "interrupted": 130}[result.status]
    if not par.is_root:                 # rank 0 reports for every rank
        return code
    if result.eval and result.status in ("done", "stopped"):
        for dom, v in result.eval.items():
            print(f"held-out {dom:>8}: {v['ce']:.4f} nats/token, {v['nats_per_byte']:.4f} nats/byte")
        print(f"steps {result.step}, wall time {result.wall_time:.1f} s, "
              f"{result.tokens_per_s:,.0f} tokens/s")
    print(("error: " if result.status == "nan" else "") + result.message, file=sys.stderr)
    return code


# ---------------------------------------------------------------------------- generate
def _generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run folder")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="prompt text (default: empty -> BOS)")
    src.add_argument("--prompt-ids", default=None, metavar="IDS",
                     help="prompt as comma-separated token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=200,
                     help="tokens to sample (default: 200)")
    gen.add_argument("--temperature", type=float, default=1.0,
                     help="divide the logits by this (default: 1.0)")
    gen.add_argument("--top-k", type=int, default=None,
                     help="sample among the k most likely tokens only (default: all)")
    gen.add_argument("--top-p", type=float, default=None,
                     help="nucleus sampling: the smallest set of tokens with probability >= p "
                          "(default: off)")
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    _add_device_flag(gen)
    _add_threads_flag(gen)


def _generate_run(args: argparse.Namespace) -> int:
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


# ---------------------------------------------------------------------------- params
def _params_arguments(pa: argparse.ArgumentParser) -> None:
    _add_config_flag(pa)
    pa.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. n_experts=32")
    _add_model_flags(pa)
    _add_device_flag(pa)


def _params_run(args: argparse.Namespace) -> int:
    from tinymoe.config import DEFAULT_PRESET, parse_overrides  # noqa: PLC0415
    from tinymoe.params_table import params_command  # noqa: PLC0415

    if args.device is not None:
        from tinymoe import backend as B  # noqa: PLC0415
        B.set_device(args.device)                # the table does not depend on it; checks CuPy
    overrides = parse_overrides(args.overrides)
    overrides.update(_given(args, "model__"))
    print(params_command(args.config or DEFAULT_PRESET, overrides))
    return 0


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("train", "train or resume a model",
            "Train an OpenMoE model (default: preset mini on the built-in corpus) or resume one.",
            _train_arguments, _train_run),
    Command("generate", "sample text from a checkpoint",
            "Continue a prompt with a trained model (KV cache); tokens are streamed to stdout.",
            _generate_arguments, _generate_run),
    Command("params", "parameter counts and memory of a config",
            "Parameter / memory table of a preset with overrides.",
            _params_arguments, _params_run),
    Command("analyze", "routing analysis of a checkpoint (the paper's findings)",
            module="tinymoe.analysis"),
    Command("bench", "throughput, MFU, memory vs the same model in PyTorch", module="tinymoe.bench"),
    Command("compare-routers", "train router variants on the same budget and compare them",
            module="tinymoe.variants"),
    Command("findings", "the routing study: train MoE, dense twins, seeds; one report",
            "Train the runs of the routing study (the MoE over seeds, dense twins of equal "
            "active and of equal total parameters, the MoE without one domain), skipping "
            "finished runs and resuming interrupted ones, then write one report: "
            "findings.md (the findings table), its PNGs and findings.json "
            "(docs/findings.md).", module="tinymoe.study"),
)}


# ---------------------------------------------------------------------------- parser
def build_parser(extra: str | None = None) -> _Parser:
    """The full parser. Commands backed by a module (``analyze``, ``bench``) get their flags
    only when named by ``extra`` (so other commands never import them)."""
    parser = _Parser(prog="python -m tinymoe", allow_abbrev=False,
                     description="tinymoe: OpenMoE (a Mixture-of-Experts decoder) on NumPy.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}",
                                parser_class=_Parser)
    sub.required = True
    for cmd in COMMANDS.values():
        if cmd.module is not None and cmd.name == extra:
            cmd = cmd.load()
        sp = sub.add_parser(cmd.name, help=cmd.help, allow_abbrev=False,
                            description=cmd.description or None)
        if cmd.add_arguments is not None:
            cmd.add_arguments(sp)
    return parser


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = COMMANDS.get(argv[0]) if argv else None
    if cmd is not None and cmd.module is not None:
        try:
            cmd = cmd.load()
        except ImportError as e:
            print(f"error: '{cmd.name}' is not available in this installation ({e})",
                  file=sys.stderr)
            return 1
    args = build_parser(cmd.name if cmd is not None else None).parse_args(argv)
    cmd = cmd if cmd is not None and cmd.run is not None else COMMANDS[args.command]
    from tinymoe import backend as B  # noqa: PLC0415
    from tinymoe.backend import DeviceError  # noqa: PLC0415
    from tinymoe.checkpoint import CheckpointError  # noqa: PLC0415

    B.keep_freed_memory()                        # reuse big freed blocks (see its docstring)
    try:
        if getattr(args, "threads", None) is not None:
            B.set_num_threads(args.threads)
        return int(cmd.run(args) or 0)
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
