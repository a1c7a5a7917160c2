"""``Module`` and ``Parameter``: the PyTorch-style containers every layer builds on.

Assigning a ``Parameter`` or a ``Module`` as an attribute registers it, so
``named_parameters()`` finds every weight by a dotted name (``blocks.3.moe.router.weight``)
in the order the layers were built. ``state_dict()`` returns host NumPy copies under those
names; ``load_state_dict()`` is strict and says exactly which keys are missing, unexpected
or mis-shaped.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from tinymoe import backend as B
from tinymoe.autograd import Tensor, no_grad


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimizer updates (always requires grad)."""

    __slots__ = ()

    def __init__(self, data: Any, dtype: Any = None):
        super().__init__(data, requires_grad=True, dtype=dtype)

    def __repr__(self) -> str:
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype})"


class Module:
    """Base class of layers. Subclasses set attributes in ``__init__`` and define ``forward``."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before setting attributes")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # -- traversal -------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator["Module"]:
        yield from self._modules.values()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        for mod_name, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if id(p) in seen:             # a shared (tied) weight is listed once
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters()))

    # -- modes and grads -------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    @contextmanager
    def evaluating(self) -> Iterator["Module"]:
        """``with model.evaluating():`` eval mode (e.g. the eval capacity factor) and no
        autograd graph inside the block; the previous mode (of every submodule) is
        restored on exit, also after an exception."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with no_grad():
                yield self
        finally:
            for m, mode in modes:
                object.__setattr__(m, "training", mode)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Host NumPy copies of every parameter, by dotted name."""
        return {name: B.to_numpy(p.data).copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copy arrays into the parameters in place (dtype kept). Strict: the key sets
        must match exactly and every shape must agree; errors name the offending keys."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {_short(missing)}")
            if unexpected:
                parts.append(f"unexpected keys {_short(unexpected)}")
            raise KeyError("load_state_dict: " + "; ".join(parts))
        for name, p in params.items():
            if name not in state:
                continue
            value = state[name]
            shape = tuple(getattr(value, "shape", ()))
            if shape != tuple(p.shape):
                raise ValueError(f"load_state_dict: {name} has shape {shape}, the model expects {tuple(p.shape)}")
            p.data[...] = B.to_device(value, p.dtype)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + (")" if len(lines) == 1 else "\n)")


class ModuleList(Module):
    """A list of modules registered as ``0``, ``1``, ... (e.g. ``blocks.3``)."""

    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, m: Module) -> None:
        setattr(self, str(len(self._modules)), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, i: int) -> Module:
        return self._modules[str(i % len(self) if i < 0 else i)]


def _short(keys: list[str], n: int = 5) -> str:
    head = ", ".join(keys[:n])
    return f"[{head}{', ...' if len(keys) > n else ''}] ({len(keys)})"
