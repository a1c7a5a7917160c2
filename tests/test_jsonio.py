"""tinymoe.jsonio.json_ready: every conversion of its table, and the NaN policy."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tinymoe.jsonio import json_ready


def test_numpy_values_containers_and_paths_become_plain_python():
    obj = {"f32": np.float32(0.5), "i64": np.int64(7), "flag": np.bool_(True),
           "arr": np.arange(6, dtype=np.int16).reshape(2, 3), "tup": (1, np.float64(2.5)),
           "path": Path("runs") / "mini", 3: "int key", "nested": [{"x": np.array([1.5])}],
           "plain": ["s", 1, 2.0, None, False]}
    out = json_ready(obj)
    assert out == {"f32": 0.5, "i64": 7, "flag": True, "arr": [[0, 1, 2], [3, 4, 5]],
                   "tup": [1, 2.5], "path": str(Path("runs") / "mini"), "3": "int key",
                   "nested": [{"x": [1.5]}], "plain": ["s", 1, 2.0, None, False]}
    # exact Python types, not NumPy subclasses that happen to compare equal
    assert type(out["f32"]) is float and type(out["i64"]) is int and type(out["flag"]) is bool
    assert all(type(v) is int for v in out["arr"][0])
    assert json.loads(json.dumps(out, allow_nan=False)) == out


def test_nan_policy_default_is_strict_json_with_null():
    obj = {"nan": float("nan"), "inf": math.inf, "ninf": np.float32(-np.inf),
           "arr": np.array([1.0, np.nan, np.inf]), "ok": 1.5}
    out = json_ready(obj)
    assert out == {"nan": None, "inf": None, "ninf": None, "arr": [1.0, None, None], "ok": 1.5}
    json.dumps(out, allow_nan=False)                 # would raise on any NaN / inf left


def test_nan_policy_keep_round_trips_through_python_json():
    out = json_ready({"clip": math.inf, "x": np.float64(np.nan), "a": np.array([-np.inf])},
                     nonfinite="keep")
    back = json.loads(json.dumps(out))
    assert back["clip"] == math.inf and math.isnan(back["x"]) and back["a"] == [-math.inf]
    with pytest.raises(ValueError):
        json.dumps(out, allow_nan=False)             # not strict JSON, as documented
    with pytest.raises(ValueError, match="nonfinite"):
        json_ready(1.0, nonfinite="none")


def test_arrays_can_be_refused():
    assert json_ready({"n": np.int32(3), "t": (1, 2)}, arrays=False) == {"n": 3, "t": [1, 2]}
    with pytest.raises(TypeError, match="shape"):
        json_ready({"w": [np.zeros((2, 2))]}, arrays=False)


def test_unknown_objects_are_left_for_json_dumps_to_reject():
    thing = object()
    assert json_ready({"o": thing})["o"] is thing
    with pytest.raises(TypeError):
        json.dumps(json_ready({"o": thing}))
