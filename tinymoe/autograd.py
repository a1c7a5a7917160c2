"""Reverse-mode automatic differentiation, in one sitting.

A ``Tensor`` wraps an array of the current backend (``backend.xp``). Every differentiable
operation is a ``Function`` with two static methods:

    forward(ctx, *arrays, **options)  -> array (or tuple of arrays)
    backward(ctx, *grad_outputs)      -> one gradient per positional input (None = no grad)

``Function.apply`` unwraps the input tensors, runs ``forward`` on plain arrays and, when a
gradient is wanted, records a ``Node`` that remembers the function, its ``ctx`` (what
``forward`` saved for ``backward``) and the input tensors. The recorded nodes form a DAG.

``Tensor.backward()`` walks that DAG in reverse topological order, found by an *iterative*
depth-first search (no recursion limit: a 10,000-op chain is fine). Gradients of a tensor
used several times are summed. After a node's backward has run, its ``ctx`` and inputs are
dropped so saved activations are freed as early as possible; a second ``backward()``
through the same graph then raises a clear error (pass ``retain_graph=True`` to keep it).

Gradients are plain arrays: ``tensor.grad`` is an ``xp`` array, not a Tensor (no
higher-order derivatives here). Leaf tensors accumulate into ``.grad`` across calls, as in
PyTorch; call ``zero_grad`` (or set ``.grad = None``) between steps.

dtype policy: float32 by default (Python floats and lists become float32), float64 when
you pass float64 arrays explicitly; an op never silently mixes float32 and float64 tensors
(it raises), and Python scalars keep the tensor's dtype.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from tinymoe import backend as B

_ndarray = B.np.ndarray   # a host array: Function.apply's fast path for the device check

__all__ = ["Tensor", "Function", "Context", "no_grad", "enable_grad", "is_grad_enabled", "tensor"]

_grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block no graph is recorded (inference, optimizer updates)."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


@contextlib.contextmanager
def enable_grad() -> Iterator[None]:
    """Re-enable graph recording inside a ``no_grad`` block."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, True
    try:
        yield
    finally:
        _grad_enabled = prev


def is_grad_enabled() -> bool:
    return _grad_enabled


def _is_float(dtype: Any) -> bool:
    return B.np.dtype(dtype).kind == "f"


# --------------------------------------------------------------------------------------
# Tensor
# --------------------------------------------------------------------------------------

class Tensor:
    """An array plus what autograd needs: ``requires_grad``, ``grad`` and the node that made it."""

    __slots__ = ("data", "grad", "requires_grad", "_node", "_index", "_retain", "name", "__weakref__")
    __array_priority__ = 1000  # so ``ndarray * Tensor`` calls Tensor.__rmul__

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        if B.is_device_array(data):                  # a device array stays where it is
            if dtype is not None and data.dtype != dtype:
                data = data.astype(dtype)
        elif isinstance(data, B.np.ndarray):         # a host array goes to the current device
            data = B.to_device(data, dtype)          # (no copy on the CPU when the dtype fits)
        else:                                        # Python scalars / lists: floats -> float32
            host = B.np.asarray(data)
            if dtype is None and host.dtype.kind == "f":
                dtype = B.DEFAULT_DTYPE
            data = B.to_device(host, dtype)
        if requires_grad and not _is_float(data.dtype):
            raise TypeError(f"Tensor: only floating tensors can require grad, got dtype {data.dtype}")
        self.data = data
        self.grad: Any = None
        self.requires_grad = bool(requires_grad)
        self._node: Node | None = None   # the Node that produced this tensor (None for leaves)
        self._index = 0                  # which output of that node
        self._retain = False             # keep .grad on a non-leaf (see retain_grad)
        self.name = name

    # -- basic properties ---------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    @property
    def device(self) -> str:
        return "cuda" if B.is_device_array(self.data) else "cpu"

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({B.to_numpy(self.data)!r}{grad})"

    @classmethod
    def _wrap(cls, data: Any, requires_grad: bool) -> "Tensor":
        """Fast constructor for arrays an op just produced (no conversion checks)."""
        t = object.__new__(cls)
        t.data, t.grad, t.requires_grad = data, None, requires_grad
        t._node, t._index, t._retain, t.name = None, 0, False, None
        return t

    def numpy(self) -> Any:
        """A host NumPy array (a copy when the tensor lives on the GPU)."""
        return B.to_numpy(self.data)

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def retain_grad(self) -> None:
        """Keep ``.grad`` on this non-leaf tensor after backward (for inspection)."""
        self._retain = True

    def zero_grad(self) -> None:
        self.grad = None

    # -- backward -------------------------------------------------------------------------
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` defaults to 1 for a scalar; it must be given for a non-scalar tensor.
        """
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require grad (no graph was recorded)")
        xp = B.array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward: grad must be given for a non-scalar output of shape {self.shape}")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward: grad shape {grad.shape} != tensor shape {self.shape}")
        _run_backward(self, grad, retain_graph)

    # -- operators (defined in functional.py) --------------------------------------------
    def __add__(self, o): return F.add(self, o)
    def __radd__(self, o): return F.add(o, self)
    def __sub__(self, o): return F.sub(self, o)
    def __rsub__(self, o): return F.sub(o, self)
    def __mul__(self, o): return F.mul(self, o)
    def __rmul__(self, o): return F.mul(o, self)
    def __truediv__(self, o): return F.div(self, o)
    def __rtruediv__(self, o): return F.div(o, self)
    def __neg__(self): return F.neg(self)
    def __pow__(self, p): return F.pow(self, p)
    def __matmul__(self, o): return F.matmul(self, o)
    def __rmatmul__(self, o): return F.matmul(o, self)
    def __getitem__(self, idx): return F.getitem(self, idx)

    def sum(self, axis=None, keepdims=False): return F.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return F.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return F.max(self, axis, keepdims)
    def reshape(self, *shape): return F.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
    def transpose(self, *axes): return F.transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))
    def permute(self, *axes): return self.transpose(*axes)
    def exp(self): return F.exp(self)
    def log(self): return F.log(self)
    def sqrt(self): return F.sqrt(self)
    def tanh(self): return F.tanh(self)
    def sigmoid(self): return F.sigmoid(self)
    def relu(self): return F.relu(self)

    @property
    def T(self) -> "Tensor":
        return F.transpose(self, None)


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """Make a Tensor (float data becomes float32 unless ``dtype`` says otherwise)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


# --------------------------------------------------------------------------------------
# Function and the recorded graph
# --------------------------------------------------------------------------------------

class Context:
    """What ``forward`` leaves for ``backward``. Save arrays with ``save_for_backward``;
    other small values (shapes, axes) may be set as attributes."""

    def __init__(self, needs_input_grad: tuple[bool, ...]):
        self.needs_input_grad = needs_input_grad
        self.saved: tuple[Any, ...] = ()

    def save_for_backward(self, *arrays: Any) -> None:
        self.saved = arrays


class Node:
    """One recorded call of a Function: its ctx, its input tensors and its outputs' grads."""

    __slots__ = ("fn", "ctx", "inputs", "n_outputs", "freed")

    def __init__(self, fn: type, ctx: Context, inputs: tuple, n_outputs: int):
        self.fn = fn
        self.ctx = ctx
        self.inputs = inputs          # tuple of Tensor-or-None, one per positional input
        self.n_outputs = n_outputs
        self.freed = False


class Function:
    """Base class of differentiable operations. Subclasses define two static methods:

    ``forward(ctx, *args, **kwargs)``: args are arrays (from Tensors) or plain Python values;
    return an array or a tuple of arrays. Save what backward needs on ``ctx``.

    ``backward(ctx, *grads)``: one incoming gradient per output (zeros for unused outputs);
    return one gradient per positional input of forward (None where there is none). A
    returned gradient must already have the input's shape (see ``unbroadcast``).
    ``ctx.needs_input_grad[i]`` tells whether input i wants a gradient at all.
    """

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, *grads: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    name: str | None = None   # the op's name in error messages; default from the class name

    @classmethod
    def op_name(cls) -> str:
        """``CrossEntropy`` -> ``cross_entropy`` unless the class sets ``name``."""
        if cls.name:
            return cls.name
        return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(cls.__name__))

    @classmethod
    def apply(cls, *inputs: Any, **kwargs: Any) -> Any:
        """Run ``forward`` on the inputs' arrays and record the node for backward.

        Devices: Tensors are never moved; two on different devices are refused. A plain
        array argument (targets, an index, a mask: data, not a tensor) follows the op's
        tensors: a host NumPy array is copied to the device when the tensors live there
        (as ``Tensor(numpy_array)`` does after ``set_device("cuda")``); a device array
        handed to an op on host tensors is refused, as moving it would be a host sync."""
        device = None
        for x in inputs:
            if isinstance(x, Tensor):
                dev = "cpu" if type(x.data) is _ndarray else x.device   # (the common case first)
                if device is None:
                    device = dev
                elif dev != device:
                    raise ValueError(f"{cls.op_name()}: tensors on different devices ({device} and {dev}); "
                                     "move them with tinymoe.backend.to_device")
        if device == "cuda" or (device == "cpu" and B.device_arrays_possible()):
            inputs = tuple(x if isinstance(x, Tensor) else _to_op_device(cls, x, device) for x in inputs)
        arrays = []
        needs = []
        float_dtype = None
        for x in inputs:
            if isinstance(x, Tensor):
                if x.data.dtype.kind == "f":
                    if float_dtype is None:
                        float_dtype = x.data.dtype
                    elif x.data.dtype != float_dtype:
                        raise TypeError(f"{cls.op_name()}: dtype mismatch {float_dtype} vs {x.data.dtype} "
                                        "(no silent upcasts; convert explicitly)")
                arrays.append(x.data)
                needs.append(x.requires_grad and _grad_enabled)
            else:
                if isinstance(x, B.np.floating):    # a NumPy float scalar would upcast float32: keep it weak
                    x = float(x)
                elif getattr(x, "dtype", None) is not None and x.dtype.kind == "f" and x.ndim > 0:
                    if float_dtype is None:
                        float_dtype = x.dtype
                    elif x.dtype != float_dtype:
                        raise TypeError(f"{cls.op_name()}: dtype mismatch {float_dtype} vs {x.dtype} "
                                        "(no silent upcasts; convert explicitly)")
                arrays.append(x)
                needs.append(False)
        ctx = Context(tuple(needs))
        try:
            out = cls.forward(ctx, *arrays, **kwargs)
        except (ValueError, IndexError) as e:
            shapes = ", ".join(str(tuple(a.shape)) for a in arrays if hasattr(a, "shape"))
            raise type(e)(f"{cls.op_name()}: inputs of shapes {shapes}: {e}") from None
        requires = any(needs)
        if not isinstance(out, tuple):           # one output (most ops)
            result = Tensor._wrap(out, requires and out.dtype.kind == "f")
            if result.requires_grad:
                result._node = Node(cls, ctx, _parents(inputs), 1)
            return result
        ctx.output_shapes = [o.shape for o in out]     # backward gets zeros for unused outputs
        ctx.output_dtypes = [o.dtype for o in out]
        results = tuple(Tensor._wrap(o, requires and o.dtype.kind == "f") for o in out)
        if requires:
            node = Node(cls, ctx, _parents(inputs), len(out))
            for i, r in enumerate(results):
                if r.requires_grad:
                    r._node, r._index = node, i
        return results


def _parents(inputs: tuple) -> tuple:
    """A node's inputs as the graph sees them: the tensors that need a gradient, None for
    every other argument (one entry per positional input)."""
    return tuple(x if isinstance(x, Tensor) and x.requires_grad else None for x in inputs)


def _to_op_device(fn: type, x: Any, device: str) -> Any:
    """A non-Tensor input of ``fn`` on the device of its tensors (see ``Function.apply``);
    tuples (an index like ``(rows, cols)``) are walked."""
    if isinstance(x, tuple):
        return tuple(_to_op_device(fn, v, device) for v in x)
    if device == "cuda" and isinstance(x, B.np.ndarray):
        return B.to_device(x)                                     # host -> device copy
    if device == "cpu" and B.is_device_array(x):
        raise ValueError(f"{fn.op_name()}: a device (cuda) array was mixed with cpu tensors; "
                         "move it with tinymoe.backend.to_numpy, or the tensors with to_device")
    return x


def _topological_order(root: Node) -> list[Node]:
    """Nodes reachable from ``root``, each after every node that consumes its outputs.

    Iterative post-order DFS (an explicit stack instead of recursion), then reversed.
    """
    order: list[Node] = []
    visited: set[int] = {id(root)}
    stack: list[tuple[Node, int]] = [(root, 0)]
    while stack:
        node, i = stack.pop()
        if node.freed:
            raise RuntimeError(
                "backward: trying to backward through the graph a second time (its saved buffers "
                "were freed after the first backward); call backward(retain_graph=True) the first time")
        inputs = node.inputs
        while i < len(inputs):
            t = inputs[i]
            i += 1
            if t is not None and t._node is not None and id(t._node) not in visited:
                visited.add(id(t._node))
                stack.append((node, i))          # come back to this node afterwards
                stack.append((t._node, 0))       # visit the child first
                break
        else:
            order.append(node)                   # all children done: post-order
    order.reverse()
    return order


def _accumulate(store: Any, key: int, g: Any, owned: bool) -> None:
    """Sum gradient ``g`` into ``store[key]`` = [array, owned] (store: a dict or a list of
    slots). An array we did not allocate (a view, or one also handed to someone else) is
    never modified in place; the first sum makes a fresh, owned array."""
    entry = store.get(key) if isinstance(store, dict) else store[key]
    if entry is None:
        store[key] = [g, owned]
    elif entry[1]:
        entry[0] += g
    else:
        store[key] = [entry[0] + g, True]


def _run_backward(root: Tensor, grad: Any, retain_graph: bool) -> None:
    if root._node is None:                       # backward on a leaf: d(self)/d(self) = grad
        root.grad = grad.copy() if root.grad is None else root.grad + grad
        return
    order = _topological_order(root._node)
    pending: dict[int, list] = {}                # id(node) -> list of [grad, owned] per output
    leaves: dict[int, list] = {}                 # id(leaf tensor) -> [grad, owned]
    leaf_tensors: dict[int, Tensor] = {}
    pending[id(root._node)] = [None] * root._node.n_outputs
    pending[id(root._node)][root._index] = [grad, False]
    retained: dict[tuple[int, int], Tensor] = {}  # (id(node), output index) -> tensor asking retain_grad

    for node in order:
        slots = pending.pop(id(node), None)
        if slots is None or all(s is None for s in slots):
            continue                             # nothing flows into this node
        ctx = node.ctx
        grads_out = [s[0] if s is not None else None for s in slots]
        for i, g in enumerate(grads_out):         # totals are final now: hand them to retain_grad()
            t = retained.pop((id(node), i), None)
            if t is not None and g is not None:
                t.grad = g.copy() if t.grad is None else t.grad + g
        if any(g is None for g in grads_out):    # an unused output of a multi-output op
            xp = B.array_module(next(g for g in grads_out if g is not None))
            grads_out = [g if g is not None else xp.zeros(ctx.output_shapes[i], dtype=ctx.output_dtypes[i])
                         for i, g in enumerate(grads_out)]
        ctx.retain_graph = retain_graph          # a backward may reuse saved buffers unless retained
        in_grads = node.fn.backward(ctx, *grads_out)
        if not isinstance(in_grads, tuple):
            in_grads = (in_grads,)
        seen: set[int] = {id(g) for g in grads_out}
        for t, g in zip(node.inputs, in_grads):
            if t is None or g is None:
                continue
            if g.shape != t.data.shape:
                raise RuntimeError(f"{node.fn.__name__}.backward returned a grad of shape {g.shape} "
                                   f"for an input of shape {t.data.shape}")
            owned = g.base is None and id(g) not in seen
            seen.add(id(g))
            if t._node is None:                  # a leaf
                leaf_tensors[id(t)] = t
                _accumulate(leaves, id(t), g, owned)
            else:
                if t._retain:
                    retained[(id(t._node), t._index)] = t
                slot_list = pending.setdefault(id(t._node), [None] * t._node.n_outputs)
                _accumulate(slot_list, t._index, g, owned)
        if not retain_graph:                     # free saved activations right away
            node.ctx = None
            node.inputs = ()
            node.freed = True

    for key, (g, owned) in leaves.items():
        t = leaf_tensors[key]
        if t.grad is None:
            t.grad = g if owned else g.copy()
        else:
            t.grad += g


# functional.py defines the operators used by Tensor's dunder methods; imported last
# because it needs Tensor and Function from this module.
from tinymoe import functional as F  # noqa: E402
