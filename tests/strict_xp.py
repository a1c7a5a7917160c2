"""A strict stand-in for CuPy: NumPy underneath, CuPy's rules on top. For the tests only.

No GPU is needed to check that tinymoe's device path is plumbed right. This module gives
an array module ``xp`` and an array type ``StrictArray`` that behave like CuPy where
mistakes hide on a CPU-only run:

- only names CuPy 14.2 has exist (``CUPY_NAMES``, ``CUPY_ARRAY_METHODS``: recorded from
  ``dir(cupy)`` / ``dir(cupy.ndarray)`` of cupy-cuda12x 14.2.0, imported without a GPU);
- a NumPy array mixed into a device operation raises TypeError, as CuPy does
  ("Unsupported type <class 'numpy.ndarray'>"); so does a NumPy function called on a
  device array, and ``__array__`` (implicit conversion to the host);
- reductions return 0-d arrays, never host scalars;
- every device -> host transfer (``get``, ``item``, ``tolist``, ``float()``,
  ``int()``, ``bool()``, ``repr``) is a *host sync* and is counted (:func:`count_syncs`),
  with the line of tinymoe that asked for it;
- the scatter operations that use atomic adds on a GPU (``bincount`` with ``weights``,
  ``ufunc.at``, ``ndarray.scatter_add``) and float ``cumsum``/``cumprod`` (CUB's scan
  does not promise a fixed order) are refused, so that a run-to-run non-deterministic
  sum cannot creep back into the device path.

It is a guard for the plumbing, not a model of GPU numerics: the results are NumPy's.
tinymoe finds it through ``backend.register_device_module`` (see ``use_strict_device``);
``set_device("cuda")`` then selects it instead of CuPy.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
from typing import Any, Iterator

import numpy as np

__all__ = ["StrictArray", "xp", "count_syncs", "use_strict_device", "CUPY_NAMES", "CUPY_ARRAY_METHODS"]

# dir(cupy), public names, cupy-cuda12x 14.2.0
CUPY_NAMES = frozenset("""
AxisError ComplexWarning DataSource ElementwiseKernel Inf Infinity ModuleDeprecationWarning NAN 
NINF NZERO NaN PINF PZERO RankWarning RawKernel RawModule ReductionKernel TooHardError 
VisibleDeprecationWarning abs absolute acos acosh add all allclose alltrue amax amin angle 
annotations any append apply_along_axis apply_over_axes arange arccos arccosh arcsin arcsinh arctan 
arctan2 arctanh argmax argmin argpartition argsort argwhere around array array2string array_equal 
array_equiv array_repr array_split array_str asanyarray asarray asarray_chkfinite ascontiguousarray 
asfarray asfortranarray asin asinh asnumpy astype atan atan2 atanh atleast_1d atleast_2d atleast_3d 
average bartlett base_repr binary_repr bincount bitwise_and bitwise_count bitwise_invert 
bitwise_left_shift bitwise_not bitwise_or bitwise_right_shift bitwise_xor blackman bool bool_ 
broadcast broadcast_arrays broadcast_shapes broadcast_to byte byte_bounds c_ can_cast cbrt cdouble 
ceil cfloat choose clear_memo clip column_stack common_type complex128 complex64 complex_ 
complexfloating compress concat concatenate conj conjugate convolve copy copysign copyto corrcoef 
correlate cos cosh count_nonzero cov cross csingle cuda cumprod cumproduct cumsum cumulative_prod 
cumulative_sum deg2rad degrees delete diag diag_indices diag_indices_from diagflat diagonal diff 
digitize disable_experimental_feature_warning disp divide divmod dot double dsplit dstack dtype e 
ediff1d einsum empty empty_like equal euler_gamma exceptions exp exp2 expand_dims expm1 extract eye 
fabs fft fill_diagonal find_common_type finfo fix flatiter flatnonzero flip fliplr flipud float16 
float32 float64 float_ float_power floating floor floor_divide fmax fmin fmod 
format_float_positional format_float_scientific format_parser frexp fromDlpack from_dlpack 
frombuffer fromfile fromfunction fromiter fromstring full full_like fuse gcd generic genfromtxt 
get_array_module get_array_wrap get_default_memory_pool get_default_pinned_memory_pool 
get_printoptions gradient greater greater_equal half hamming hanning heaviside histogram 
histogram2d histogramdd hsplit hstack hypot i0 identity iinfo imag in1d index_exp indices inexact 
inf infty inner int16 int32 int64 int8 int_ intc integer interp intersect1d intp invert 
is_available isclose iscomplex iscomplexobj isdtype isfinite isfortran isin isinf isnan isneginf 
isposinf isreal isrealobj isscalar issctype issubclass_ issubdtype issubsctype iterable ix_ kaiser 
kron lcm ldexp left_shift less less_equal lexsort lib linalg linspace load loadtxt log log10 log1p 
log2 logaddexp logaddexp2 logical_and logical_not logical_or logical_xor logspace long longlong 
make_aligned_dtype mask_indices matmul matrix_transpose max maximum may_share_memory mean median 
memoize meshgrid mgrid min min_scalar_type minimum mintypecode mod modf moveaxis msort multiply nan 
nan_to_num nanargmax nanargmin nancumprod nancumsum nanmax nanmean nanmedian nanmin nanprod nanstd 
nansum nanvar ndarray ndim ndindex negative newaxis nextafter nonzero not_equal number obj2sctype 
ogrid ones ones_like outer packbits pad partition percentile permute_dims pi piecewise place poly 
poly1d polyadd polyfit polymul polynomial polysub polyval positive pow power printoptions prod 
product promote_types ptp put put_along_axis putmask quantile r_ rad2deg radians random ravel 
ravel_multi_index real real_if_close reciprocal remainder repeat require reshape resize result_type 
right_shift rint roll rollaxis roots rot90 round round_ row_stack s_ safe_eval save savetxt savez 
savez_compressed sctype2char searchsorted select set_printoptions set_string_function setdiff1d 
setxor1d shape shares_memory short show_config sign signbit signedinteger sin sinc single 
singlecomplex sinh size sometrue sort sort_complex split sqrt square squeeze stack std subtract sum 
swapaxes take take_along_axis tan tanh tensordot testing tile trace transpose trapezoid trapz tri 
tril tril_indices tril_indices_from trim_zeros triu triu_indices triu_indices_from true_divide 
trunc typename typing ubyte ufunc uint uint16 uint32 uint64 uint8 uintc uintp ulong ulonglong 
union1d unique unique_all unique_counts unique_inverse unique_values unpackbits unravel_index 
unsignedinteger unwrap ushort vander var vdot vectorize vsplit vstack where who zeros zeros_like
""".split())

# dir(cupy.ndarray), public names, cupy-cuda12x 14.2.0
CUPY_ARRAY_METHODS = frozenset("""
T all any argmax argmin argpartition argsort astype base byteswap choose clip compress conj 
conjugate copy cstruct cumprod cumsum data device diagonal dot dtype dump dumps fill flags flat 
flatten get imag item itemsize mT max mdspan mean min nbytes ndim nonzero partition prod ptp put 
ravel real reduced_view repeat reshape round scatter_add scatter_max scatter_min searchsorted set 
shape size sort squeeze std strides sum swapaxes take toDlpack tobytes tofile tolist trace 
transpose var view
""".split())

# CuPy has these, but they add with atomics on a GPU (the order of a sum changes from run
# to run); tinymoe's device path must not use them.
ATOMIC = {"scatter_add", "scatter_max", "scatter_min"}

_HERE = os.path.abspath(__file__)
_NUMPY_DIR = os.path.dirname(np.__file__)


# ----------------------------------------------------------------------------- syncs
class SyncLog(list):
    """The host syncs seen inside :func:`count_syncs`: one ``"kind at file:line"`` each."""

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for s in self:
            counts[s] = counts.get(s, 0) + 1
        return "\n".join(f"{n:4d} x {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))


_logs: list[SyncLog] = []


def _caller() -> str:
    """file:line of the first frame outside this module and NumPy."""
    f = sys._getframe(2)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if path != _HERE and not path.startswith(_NUMPY_DIR):
            root = os.path.dirname(os.path.dirname(_HERE))
            return f"{os.path.relpath(path, root)}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


def _sync(kind: str) -> None:
    if _logs:
        where = f"{kind} at {_caller()}"
        for log in _logs:
            log.append(where)


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncLog]:
    """Record every device -> host transfer made inside the block."""
    log = SyncLog()
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


# ----------------------------------------------------------------------------- wrapping
def _refuse_host(x: Any) -> None:
    raise TypeError(f"Unsupported type {type(x)} (strict device backend: a NumPy array "
                    "mixed into a device operation; move it with backend.to_device)")


def _unwrap(x: Any) -> Any:
    """StrictArray -> its ndarray; NumPy arrays refused; lists/tuples/dicts walked."""
    if isinstance(x, StrictArray):
        return x._a
    if isinstance(x, np.ndarray):
        _refuse_host(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x: Any) -> Any:
    """ndarray -> StrictArray; NumPy scalars -> 0-d StrictArray (CuPy never returns host
    scalars from array operations); tuples/lists walked."""
    if isinstance(x, np.ndarray):
        return StrictArray(x)
    if isinstance(x, np.generic):
        return StrictArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _operand(x: Any) -> Any:
    """An operand of an arithmetic operator: a StrictArray or a scalar; NumPy arrays are
    refused; anything else (a Tensor) -> NotImplemented so that its reflected method runs."""
    if isinstance(x, StrictArray):
        return x._a
    if isinstance(x, np.ndarray):
        _refuse_host(x)
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return x
    return NotImplemented


# ----------------------------------------------------------------------------- the array
class StrictArray:
    """A device array of the strict backend: an ndarray inside, CuPy's rules outside."""

    __slots__ = ("_a",)
    __array_priority__ = 100          # below tinymoe.Tensor's 1000: Tensor's operators win
    __array_ufunc__ = None            # np.ufunc(strict) and ndarray <op> strict: TypeError
    __hash__ = None                   # type: ignore[assignment]

    def __init__(self, a: np.ndarray):
        self._a = a

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        raise TypeError(f"strict device backend: numpy.{func.__name__} called on a device array "
                        "(use the device module, backend.array_module(a))")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` "
                        "to construct a NumPy array explicitly.")

    # -- the host syncs --------------------------------------------------------------
    def get(self, *args: Any, **kwargs: Any) -> np.ndarray:
        _sync("get")
        return self._a.copy()

    def item(self, *args: Any) -> Any:
        _sync("item")
        return self._a.item(*args)

    def tolist(self) -> Any:
        _sync("tolist")
        return self._a.tolist()

    def __float__(self) -> float:
        _sync("float")
        return float(self._a)

    def __int__(self) -> int:
        _sync("int")
        return int(self._a)

    def __bool__(self) -> bool:
        _sync("bool")
        return bool(self._a)

    def __complex__(self) -> complex:
        _sync("complex")
        return complex(self._a)

    def __repr__(self) -> str:
        _sync("repr")
        return "strict_" + repr(self._a)

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        _sync("format")
        return format(self._a, spec)

    # -- properties --------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: StrictArray(self._a.T))
    mT = property(lambda self: StrictArray(self._a.mT))
    real = property(lambda self: StrictArray(self._a.real))
    imag = property(lambda self: StrictArray(self._a.imag))

    @property
    def base(self) -> Any:
        return None if self._a.base is None else StrictArray(self._a.base)

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator["StrictArray"]:
        return (StrictArray(np.asarray(v)) for v in self._a)   # 0-d arrays, as CuPy

    def __getattr__(self, name: str) -> Any:
        if name in ATOMIC:
            raise AttributeError(f"strict device backend: ndarray.{name} adds with atomics on a "
                                 "GPU (non-deterministic order); use backend.scatter_add_rows")
        if name not in CUPY_ARRAY_METHODS:
            raise AttributeError(f"strict device backend: cupy.ndarray has no attribute {name!r}")
        attr = getattr(self._a, name)
        if name in ("nonzero", "compress"):
            _sync(name)
        if name in ("cumsum", "cumprod") and self.dtype.kind in "fc":
            raise TypeError(f"strict device backend: {name} of floats has no fixed order on a GPU "
                            "(CUB scan); use a fixed-order sum")
        if not callable(attr):
            return _wrap(attr)

        def method(*args: Any, **kwargs: Any) -> Any:
            return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
        return method

    def __getitem__(self, idx: Any) -> Any:
        _count_mask(idx)
        return _wrap(self._a[_unwrap(idx)])

    def __setitem__(self, idx: Any, value: Any) -> None:
        _count_mask(idx)
        self._a[_unwrap(idx)] = _unwrap(value)


def _count_mask(idx: Any) -> None:
    """CuPy indexes with a boolean mask by first counting its True entries on the host
    (the result's shape depends on them): one sync per mask."""
    for part in idx if isinstance(idx, tuple) else (idx,):
        if isinstance(part, StrictArray) and part.dtype == np.bool_ and part.ndim > 0:
            _sync("boolean mask index")


def _binary(name: str) -> Any:
    op = getattr(np.ndarray, name)

    def method(self: StrictArray, other: Any) -> Any:
        o = _operand(other)
        if o is NotImplemented:
            return NotImplemented
        out = op(self._a, o)
        if out is self._a:                                     # in-place operator
            return self
        return _wrap(out)
    method.__name__ = name
    return method


for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
           "lshift", "rshift"):
    for _form in (f"__{_n}__", f"__r{_n}__", f"__i{_n}__"):
        setattr(StrictArray, _form, _binary(_form))
for _n in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(StrictArray, f"__{_n}__", _binary(f"__{_n}__"))
for _n in ("neg", "pos", "abs", "invert"):
    setattr(StrictArray, f"__{_n}__", (lambda op: lambda self: _wrap(op(self._a)))(getattr(np.ndarray, f"__{_n}__")))


# ----------------------------------------------------------------------------- the module
class _Ufunc:
    """A NumPy ufunc behind CuPy's rules (``at`` refused: atomic adds on a GPU)."""

    def __init__(self, uf: np.ufunc):
        self._uf = uf
        self.__name__ = uf.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _call(self._uf, args, kwargs)

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        return _call(self._uf.reduce, args, kwargs)

    def accumulate(self, *args: Any, **kwargs: Any) -> Any:
        return _call(self._uf.accumulate, args, kwargs)

    def reduceat(self, *args: Any, **kwargs: Any) -> Any:
        return _call(self._uf.reduceat, args, kwargs)

    def outer(self, *args: Any, **kwargs: Any) -> Any:
        return _call(self._uf.outer, args, kwargs)

    def at(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"strict device backend: {self.__name__}.at adds with atomics on a GPU "
                        "(non-deterministic order); use backend.scatter_add_rows")


def _call(fn: Any, args: tuple, kwargs: dict) -> Any:
    out = kwargs.get("out")
    result = fn(*_unwrap(args), **_unwrap(kwargs))
    if isinstance(out, StrictArray) and result is out._a:
        return out
    return _wrap(result)


def _from_host(x: Any) -> Any:
    """Host data (lists, scalars, NumPy arrays) -> the device: what cupy.asarray allows."""
    if isinstance(x, StrictArray):
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_from_host(v) for v in x)
    return x


def _transfer(fn: Any) -> Any:
    def f(a: Any, *args: Any, **kwargs: Any) -> Any:
        result = fn(_from_host(a), *args, **_unwrap(kwargs))
        if isinstance(a, StrictArray) and result is a._a:
            return a
        return _wrap(np.asarray(result))
    return f


def _bincount(x: Any, weights: Any = None, minlength: int = 0) -> Any:
    if weights is not None:
        raise TypeError("strict device backend: bincount with weights adds with atomics on a GPU "
                        "(non-deterministic order); use backend.scatter_add_flat")
    _sync("bincount (min check)")            # cupy.bincount reads min(x) and max(x) on the host
    _sync("bincount (max for the size)")
    return _call(np.bincount, (x,), {"minlength": minlength})


def _scan(fn: Any) -> Any:
    """cumsum / cumprod on integers only: on floats CuPy may run CUB's scan, which does not
    promise the same rounding order from run to run."""
    def f(a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, StrictArray) and a.dtype.kind in "fc":
            raise TypeError(f"strict device backend: {fn.__name__} of floats has no fixed order "
                            "on a GPU (CUB scan); use a fixed-order sum")
        return _call(fn, (a,) + args, kwargs)
    return f


def _data_dependent(fn: Any, what: str) -> Any:
    """A function whose output shape depends on the values (nonzero ...): CuPy reads the
    count on the host first, one sync."""
    def f(*args: Any, **kwargs: Any) -> Any:
        _sync(what)
        return _call(fn, args, kwargs)
    return f


def _asnumpy(a: Any, *args: Any, **kwargs: Any) -> np.ndarray:
    if isinstance(a, StrictArray):
        return a.get()
    return np.asarray(a)


class _MemoryPool:
    def total_bytes(self) -> int:
        return 0

    def used_bytes(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        pass


class _Device:
    def synchronize(self) -> None:
        pass


_POOL = _MemoryPool()
_SPECIAL = {
    "asarray": _transfer(np.asarray), "array": _transfer(np.array),
    "ascontiguousarray": _transfer(np.ascontiguousarray), "asanyarray": _transfer(np.asarray),
    "asnumpy": _asnumpy, "bincount": _bincount,
    "cumsum": _scan(np.cumsum), "cumprod": _scan(np.cumprod),
    "nonzero": _data_dependent(np.nonzero, "nonzero"),
    "flatnonzero": _data_dependent(np.flatnonzero, "flatnonzero"),
    "argwhere": _data_dependent(np.argwhere, "argwhere"),
    "unique": _data_dependent(np.unique, "unique"),
    "compress": _data_dependent(np.compress, "compress"),
    "extract": _data_dependent(np.extract, "extract"),
    "get_default_memory_pool": lambda: _POOL,
    "cuda": types.SimpleNamespace(Device=_Device),
}


class StrictModule(types.ModuleType):
    """The array module of the strict backend: CuPy's public names, NumPy's behaviour."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in CUPY_NAMES:
            raise AttributeError(f"strict device backend: module 'cupy' has no attribute {name!r}")
        if name in _SPECIAL:
            value = _SPECIAL[name]
        else:
            attr = getattr(np, name, None)
            if attr is None:
                raise AttributeError(f"strict device backend: cupy.{name} has no NumPy counterpart here")
            if isinstance(attr, np.ufunc):
                value = _Ufunc(attr)
            elif isinstance(attr, (type, np.dtype, int, float)) or attr is None:
                value = attr                                      # dtypes, constants (inf, pi ...)
            elif callable(attr):
                value = (lambda fn: lambda *a, **k: _call(fn, a, k))(attr)
            else:
                value = attr
        setattr(self, name, value)                                # cache
        return value


xp = StrictModule("strict_cupy", "CuPy's names with NumPy inside (tests/strict_xp.py)")
xp.ndarray = StrictArray  # type: ignore[attr-defined]


@contextlib.contextmanager
def use_strict_device() -> Iterator[Any]:
    """Make ``set_device("cuda")`` select the strict backend for the block (and go back to
    the CPU afterwards)."""
    from tinymoe import backend as B  # noqa: PLC0415
    B.register_device_module(xp, StrictArray)
    try:
        yield xp
    finally:
        B.set_device("cpu")
        B.register_device_module(None)
