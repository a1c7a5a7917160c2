"""One JSON sanitizer: nested Python / NumPy values -> what ``json.dumps`` writes as is.

:func:`json_ready` walks dicts, lists and tuples and converts, recursively:

================================  ==============================================
value                             becomes
================================  ==============================================
mapping (dict, ...)               dict with ``str`` keys (``{1: x}`` -> ``{"1": x}``)
list, tuple                       list
NumPy array (host ``ndarray``)    nested lists (``arrays=True``) or TypeError
NumPy scalar (``np.float32``...)  the Python number / bool (``.item()``)
path (``os.PathLike``)            its ``str``
NaN, +inf, -inf                   see *NaN policy* below
str, int, bool, None, float       unchanged
anything else                     unchanged (``json.dumps`` then raises TypeError)
================================  ==============================================

NaN policy. JSON (RFC 8259) has no NaN or infinity; Python's ``json.dumps`` writes them
as the bare words ``NaN`` / ``Infinity`` that strict parsers (JavaScript's
``JSON.parse``, jq, most other languages) reject. So by default (``nonfinite="null"``)
every non-finite float, also inside arrays, becomes ``None`` (``null``) and the result
passes ``json.dumps(..., allow_nan=False)``. ``null`` then means "no number": an empty
bin, a measure without data (this is what ``python -m tinymoe analyze`` writes).
The cost: NaN, +inf and -inf all read back as ``None``. Files that tinymoe itself reads
back and where an infinity is a value (a config field such as a clip threshold) can ask
for ``nonfinite="keep"``: floats stay as they are and ``json.dumps`` writes ``NaN`` /
``Infinity``, which ``json.loads`` reads back exactly.

Device (CuPy) arrays are not handled here (this module never imports the array backend):
move them to the host first (``tinymoe.backend.to_numpy``).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

__all__ = ["json_ready"]


def json_ready(obj: Any, *, nonfinite: Literal["null", "keep"] = "null",
               arrays: bool = True) -> Any:
    """``obj`` with every container, NumPy value and path converted for ``json.dumps``
    (table in the module docstring).

    ``nonfinite``: ``"null"`` (default) turns NaN / +-inf into None, so the output is
    strict JSON; ``"keep"`` leaves them as floats. ``arrays``: False raises TypeError on
    a NumPy array (for JSON that must stay small, with the arrays stored elsewhere).
    """
    if nonfinite not in ("null", "keep"):
        raise ValueError(f"nonfinite={nonfinite!r}: choose 'null' or 'keep'")
    return _convert(obj, nonfinite == "null", arrays)


def _convert(obj: Any, nan_to_none: bool, arrays: bool) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _convert(v, nan_to_none, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_convert(v, nan_to_none, arrays) for v in obj]
    if isinstance(obj, np.ndarray):
        if not arrays:
            raise TypeError(f"a NumPy array of shape {obj.shape} is not allowed in this JSON")
        return _convert(obj.tolist(), nan_to_none, arrays)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if nan_to_none and isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
