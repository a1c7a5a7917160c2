"""Command-line flags generated from a dataclass: one ``--field-name`` per field, its type
from the field's annotation and its help from the field's docstring.

A field docstring is the string literal written right after the field in the class body
(the convention of Sphinx autodoc and PEP 257's "attribute docstrings"):

    @dataclass
    class TrainConfig:
        steps: int = 1200
        "optimizer updates in the whole run"

Python keeps no such string at run time, so :func:`field_docs` reads the class's source
with :mod:`ast`. Supported annotations: ``int``, ``float``, ``str``, ``bool`` (true/false,
yes/no, on/off, 1/0), ``X | None`` (``none`` or ``null`` -> None) and ``tuple[str, ...]``
(comma-separated); any other annotation raises TypeError when the parser is built, so a
new field can never be silently mis-parsed.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, Callable, Sequence

__all__ = ["field_docs", "flag_converter", "add_dataclass_flags", "flag_name", "positive_int"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def flag_name(field_name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + field_name.replace("_", "-")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (whitespace collapsed to single spaces) for every
    annotated field of ``cls`` followed by a string literal."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _scalar(name: str, kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if kind is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise argparse.ArgumentTypeError(f"{name}={text!r} must be true or false")
        try:
            return kind(text)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise argparse.ArgumentTypeError(f"{name}={text!r} must be {what}") from None

    return convert


def flag_converter(name: str, annotation: Any) -> Callable[[str], Any]:
    """A function text -> value for a field of type ``annotation`` (see the module doc)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"field {name}: cannot make a flag for {annotation}")
        base = flag_converter(name, inner[0])

        def optional(text: str) -> Any:
            return None if text.strip().lower() in ("none", "null") else base(text)

        convert = optional
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = flag_converter(name, args[0])

        def items(text: str) -> tuple[Any, ...]:
            return tuple(item(t.strip()) for t in text.split(",") if t.strip())

        convert = items
    elif annotation in (int, float, str, bool):
        convert = _scalar(name, annotation)
    else:
        raise TypeError(f"field {name}: cannot make a flag for {annotation}")
    convert.__name__ = name        # argparse names the type in its own error messages
    return convert


def _metavar(name: str, annotation: Any, choices: Sequence[str] | None) -> str:
    if choices:
        return "{" + ",".join(choices) + "}"
    return name.upper()


def add_dataclass_flags(group: Any, cls: type, dest_prefix: str, *, skip: Sequence[str] = (),
                        choices: dict[str, Sequence[str]] | None = None,
                        default_note: str | None = None) -> list[str]:
    """Add ``--field-name`` for every field of dataclass ``cls`` (except ``skip``) to the
    argparse ``group``; values land in ``dest_prefix + field`` (None when not given).
    Help: the field docstring, the choices from ``choices`` (validation stays with the
    dataclass), and ``default_note`` or the field's default. Returns the field names."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        opts = (choices or {}).get(f.name)
        parts = [docs.get(f.name, "")]
        if opts:
            parts.append(f"one of: {', '.join(opts)}")
        if default_note is not None:
            parts.append(default_note)
        elif f.default is not dataclasses.MISSING:
            parts.append(f"default: {f.default!r}")
        help_text = "; ".join(p for p in parts if p).replace("%", "%%")
        group.add_argument(flag_name(f.name), dest=dest_prefix + f.name,
                           type=flag_converter(f.name, hints[f.name]), default=None,
                           metavar=_metavar(f.name, hints[f.name], opts), help=help_text)
        names.append(f.name)
    return names


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts that must be >= 1 (steps, seeds, threads, ...)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n
