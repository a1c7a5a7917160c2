# %% [markdown]
# # Solutions to lesson 1 — automatic differentiation
#
# Each exercise of `lessons/01_autograd.py`, worked and checked. Run it like a lesson:
# `python lessons/solutions/01_autograd.py` (`TINYMOE_FAST=1` for the quick version).

# %%
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST

import tinymoe
from tinymoe import functional as F

# %% [markdown]
# The scalar toy of the lesson, with the two new operations of exercise 1 (`exp`, `relu`)
# and a switch for exercise 2 (`accumulate=False` assigns instead of adding).

# %%
class Value:
    """A scalar that remembers how it was computed (lesson 1's toy, plus exp and relu)."""

    accumulate = True                                    # exercise 2 flips this

    def __init__(self, data, parents=(), local_grads=(), op=""):
        self.data, self.grad = float(data), 0.0
        self.parents, self.local_grads, self.op = parents, local_grads, op

    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data + other.data, (self, other), (1.0, 1.0), "+")

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data * other.data, (self, other), (other.data, self.data), "*")

    __radd__, __rmul__ = __add__, __mul__
    def __neg__(self): return self * -1.0
    def __sub__(self, other): return self + (-other)

    def __pow__(self, p):
        return Value(self.data ** p, (self,), (p * self.data ** (p - 1),), f"**{p}")

    def tanh(self):
        t = math.tanh(self.data)
        return Value(t, (self,), (1.0 - t * t,), "tanh")

    def exp(self):                                       # d e^x / dx = e^x
        e = math.exp(self.data)
        return Value(e, (self,), (e,), "exp")

    def relu(self):                                      # d relu(x) / dx = [x > 0]
        return Value(max(self.data, 0.0), (self,), (1.0 if self.data > 0 else 0.0,), "relu")

    def backward(self):
        self.grad = 1.0
        for v in reversed(topological_order(self)):
            for parent, local in zip(v.parents, v.local_grads):
                if Value.accumulate:
                    parent.grad += local * v.grad
                else:                                    # the bug of exercise 2
                    parent.grad = local * v.grad


def topological_order(root):
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        v, parents_done = stack.pop()
        if parents_done:
            order.append(v)
        elif id(v) not in seen:
            seen.add(id(v))
            stack.append((v, True))
            stack.extend((p, False) for p in v.parents if id(p) not in seen)
    return order


def finite_difference(f, x, h=1e-6):
    return (f(x + h) - f(x - h)) / (2 * h)

# %% [markdown]
# ## Exercise 1 — `exp` and `relu`
#
# $f(x) = \mathrm{relu}(x)\,e^{x}$ uses both; its derivative is $[x>0]\,e^x(1 + x)$. Check it
# by finite differences at points away from 0 (at 0 relu has a kink: the central difference
# gives the average slope 0.5 of the two sides).

# %%
def f_value(x):
    v = Value(x)
    return v, v.relu() * v.exp()


for x0 in (-1.3, 0.7, 2.0):
    leaf, out = f_value(x0)
    out.backward()
    fd = finite_difference(lambda t: f_value(t)[1].data, x0)
    by_hand = (x0 > 0) * math.exp(x0) * (1 + x0)
    print(f"x = {x0:+.1f}: backprop {leaf.grad:+.8f}   finite diff {fd:+.8f}   by hand {by_hand:+.8f}")
    assert abs(leaf.grad - fd) <= 1e-6 * max(1.0, abs(fd)) and abs(leaf.grad - by_hand) < 1e-12, \
        f"exp/relu backward wrong at x = {x0}"
kink = finite_difference(lambda t: Value(t).relu().data, 0.0)
print(f"finite difference of relu at 0: {kink} (the average of the slopes 0 and 1)")
assert kink == 0.5

# %% [markdown]
# ## Exercise 2 — break the chain rule on purpose
#
# With `parent.grad = local * v.grad`, a node used by several operations keeps only the
# gradient of the use visited last. In $y = a\cdot a + a$ the node $a$ has three uses: the
# check "value used twice" fails (it gets 3, not 7). The neuron check still passes because in
# the neuron **no node feeds more than one operation**: every node has exactly one consumer,
# so there is nothing to sum and `=` equals `+=`.

# %%
def neuron(x1, x2, w1, w2, b):
    return ((x1 * w1 + x2 * w2 + b).tanh() - 0.5) ** 2


inputs = {"x1": 1.5, "x2": -0.5, "w1": 0.8, "w2": -1.2, "b": 0.1}
grads = {}
for accumulate in (True, False):
    Value.accumulate = accumulate
    leaves = {k: Value(v) for k, v in inputs.items()}
    L = neuron(**leaves)
    L.backward()
    a = Value(3.0)
    y = a * a + a
    y.backward()
    grads[accumulate] = ({k: v.grad for k, v in leaves.items()}, a.grad, L)
Value.accumulate = True
print("neuron gradients with += :", grads[True][0])
print("neuron gradients with =  :", grads[False][0])
print(f"dy/da for y = a*a + a: += gives {grads[True][1]}, = gives {grads[False][1]}")
uses = {}
for v in topological_order(grads[False][2]):
    for p in v.parents:
        uses[id(p)] = uses.get(id(p), 0) + 1
print(f"most consumers of any node in the neuron graph: {max(uses.values())}")
assert grads[True][0] == grads[False][0], "the neuron's gradients should not depend on += vs ="
assert grads[True][1] == 7.0 and grads[False][1] == 3.0, "y = a*a + a: 7 with +=, 3 (the last use only) with ="
assert max(uses.values()) == 1, "every node of the neuron feeds exactly one operation"

# %% [markdown]
# ## Exercise 3 — a float32 gradient check that passes
#
# Error of the central difference $\approx \frac{h^2}{6}|L'''| + \frac{\varepsilon |L|}{h}$:
# minimal near $h^* \sim \varepsilon^{1/3}$, where both terms are of order $\varepsilon^{2/3}$
# (times the scale of $L$ and its derivatives). For float32, $\varepsilon = 1.19\cdot10^{-7}$:
# $h^* \approx 5\cdot10^{-3}$, $\varepsilon^{2/3} \approx 2\cdot10^{-5}$. A relative tolerance
# of $10^{-3}$ leaves room for the constants (larger losses, longer reductions). The same
# sweep as the lesson measures it:

# %%
rng = np.random.default_rng(0)
N, d, m = 6, 4, 3
X_np = rng.normal(size=(N, d))
W_np = rng.normal(size=(d, m)) * 0.5
W = tinymoe.tensor(W_np, requires_grad=True)
loss64 = (F.tanh(tinymoe.tensor(X_np) @ W) ** 2).sum() / N        # [] float64
loss64.backward()
exact = W.grad[1, 2]                                             # float64 backprop


def L32(Wa):
    with tinymoe.no_grad():
        out = F.tanh(tinymoe.tensor(X_np.astype(np.float32)) @ tinymoe.tensor(Wa.astype(np.float32)))
        return float(((out * out).sum() / N).item())


def fd32(h):
    Wp, Wm = W_np.copy(), W_np.copy()
    Wp[1, 2] += h
    Wm[1, 2] -= h
    return (L32(Wp) - L32(Wm)) / (2 * h)


eps32 = float(np.finfo(np.float32).eps)
h_star = eps32 ** (1 / 3)
steps = np.logspace(-1, -7, 13 if FAST else 25)
errs = np.array([abs(fd32(h) - exact) / abs(exact) for h in steps])
best = steps[int(np.argmin(errs))]
err_star = abs(fd32(h_star) - exact) / abs(exact)
print(f"eps^(1/3) = {h_star:.1e}: relative error {err_star:.1e}; best h of the sweep {best:.0e} "
      f"(error {errs.min():.1e}); at h = 1e-7 the error is {errs[-1]:.1e}")
print(f"choice: h = {h_star:.0e}, tolerance 1e-3 (relative)")
assert err_star < 1e-3, f"float32 check at h = eps^(1/3) should pass a 1e-3 tolerance, error {err_star:.1e}"
assert 0.1 * h_star <= best <= 10 * h_star, f"the best step {best:.0e} should be near eps^(1/3) = {h_star:.0e}"
assert errs[-1] > 10 * err_star, "a tiny step should be much worse in float32 (rounding error ~ eps/h)"
