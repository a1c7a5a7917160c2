# %% [markdown]
# # Lesson 1 — Automatic differentiation: a scalar toy in 40 lines, then tinymoe's `Tensor`
#
# **What you will learn**
# - how reverse-mode autodiff works: every operation records its inputs and its *local*
#   derivative; `backward()` walks the recorded graph in reverse topological order and applies
#   the chain rule;
# - why gradients of a value used twice must be **summed**;
# - how to check any gradient with **finite differences**, and why such checks use float64;
# - how the same ideas look in tinymoe's `Tensor` (arrays instead of scalars), which every
#   later lesson builds on; and how it compares with PyTorch when PyTorch is installed.
#
# Run it: `python lessons/01_autograd.py` (or open it as a notebook with jupytext / VS Code).

# %%
import math

import numpy as np

from _lesson import FAST, plt, show  # lesson plumbing: fast mode, figure saving

import tinymoe
from tinymoe import functional as F

# %% [markdown]
# ## 1. The chain rule on a graph
#
# A program computes $L$ from inputs $x_1, x_2, \dots$ through simple operations. Write the
# intermediate values as nodes $v$; each node knows its parents $u$ and the local
# derivatives $\partial v / \partial u$. Reverse mode computes the *adjoint*
# $\bar v = \partial L / \partial v$ of every node, starting from $\bar L = 1$:
#
# $$\bar u \;=\; \sum_{v \,:\, u \text{ is a parent of } v} \bar v \,\frac{\partial v}{\partial u}.$$
#
# The sum runs over **every use** of $u$. A node's adjoint is final only when all nodes that
# use it are done, so we visit nodes in *reverse topological order* (consumers before producers).
#
# Here is the whole mechanism for scalars. Each operation stores its parents and its local
# derivatives at forward time; `backward` does the sum above.

# %%
class Value:
    """A scalar that remembers how it was computed (a node of the graph)."""

    def __init__(self, data, parents=(), local_grads=(), op="", label=""):
        self.data, self.grad = float(data), 0.0
        self.parents, self.local_grads = parents, local_grads   # d self / d parent, one per parent
        self.op, self.label = op, label

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

    def backward(self):
        self.grad = 1.0
        for v in reversed(topological_order(self)):        # consumers before producers
            for parent, local in zip(v.parents, v.local_grads):
                parent.grad += local * v.grad              # chain rule, summed over uses


def topological_order(root):
    """Every node reachable from root, parents before children (iterative DFS: no recursion limit)."""
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

# %% [markdown]
# That is 40 lines. Let us use it on one neuron with a squared-error loss:
#
# $$n = w_1 x_1 + w_2 x_2 + b,\qquad o = \tanh(n),\qquad L = (o - 0.5)^2 .$$
#
# By hand: $\partial L/\partial o = 2(o-0.5)$, $\partial o/\partial n = 1-o^2$, and
# $\partial n/\partial w_1 = x_1$, so $\partial L/\partial w_1 = 2(o-0.5)(1-o^2)\,x_1$.

# %%
def neuron(x1, x2, w1, w2, b):
    """The loss of one tanh neuron; works on Values (graph) and on floats wrapped as Values."""
    n = x1 * w1 + x2 * w2 + b
    n.label = "n"
    o = n.tanh()
    o.label = "o"
    loss = (o - 0.5) ** 2
    loss.label = "L"
    return loss


inputs = {"x1": 1.5, "x2": -0.5, "w1": 0.8, "w2": -1.2, "b": 0.1}
leaves = {k: Value(v, label=k) for k, v in inputs.items()}
L = neuron(**leaves)
L.backward()

print(f"L = {L.data:.6f}")
for k, v in leaves.items():
    print(f"  dL/d{k:<2} = {v.grad:+.6f}")

o = math.tanh(0.8 * 1.5 + (-1.2) * (-0.5) + 0.1)
by_hand = 2 * (o - 0.5) * (1 - o * o) * 1.5
print(f"by hand dL/dw1 = {by_hand:+.6f}")
assert abs(leaves["w1"].grad - by_hand) < 1e-12, (
    f"backprop gives dL/dw1 = {leaves['w1'].grad:.6g} but the chain rule by hand gives {by_hand:.6g}: "
    "look at the local derivatives stored by __mul__ and tanh")

order = topological_order(L)
print("topological order:", " -> ".join(v.label or v.op or f"{v.data:g}" for v in order))

# %% [markdown]
# ### The graph, drawn
#
# Each box shows the node's value and, after `backward()`, its gradient $\partial L/\partial v$.
# Nodes are placed by depth (longest path from an input); the number is the node's place in the
# topological order. `backward` visits the numbers from the largest down.

# %%
def draw_graph(root, title):
    order = topological_order(root)
    depth = {}
    for v in order:                       # parents come first, so their depth is known
        depth[id(v)] = 1 + max((depth[id(p)] for p in v.parents), default=-1)
    columns = {}
    for v in order:
        columns.setdefault(depth[id(v)], []).append(v)
    pos = {}
    for d, col in columns.items():
        for i, v in enumerate(col):
            pos[id(v)] = (d, (len(col) - 1) / 2 - i)
    fig, ax = plt.subplots(figsize=(12, 6))
    for v in order:
        for p in v.parents:
            (x0, y0), (x1, y1) = pos[id(p)], pos[id(v)]
            ax.annotate("", xy=(x1 - 0.28, y1), xytext=(x0 + 0.28, y0),
                        arrowprops=dict(arrowstyle="->", color="0.5"))
    for i, v in enumerate(order):
        x, y = pos[id(v)]
        leaf = not v.parents
        name = (f"{v.label} ({v.op})" if v.op else v.label) if v.label else (v.op or "const")
        ax.text(x, y, f"#{i} {name}\nvalue {v.data:+.3f}\ngrad {v.grad:+.3f}", ha="center", va="center",
                fontsize=8, bbox=dict(boxstyle="round", fc="#dbe9f6" if leaf else "#fde2c8", ec="0.3"))
    ax.set_xlim(-0.6, max(columns) + 0.6)
    half = max(len(col) for col in columns.values()) / 2
    ax.set_ylim(-half - 0.2, half + 0.2)
    ax.set_xlabel("depth (longest path from an input)")
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, fc="#dbe9f6", ec="0.3", label="input / constant"),
                       plt.Rectangle((0, 0), 1, 1, fc="#fde2c8", ec="0.3", label="operation")],
              loc="lower right", fontsize=8)
    return fig


show(draw_graph(L, "Lesson 1: the graph of L = (tanh(w1 x1 + w2 x2 + b) - 0.5)^2 after backward()"),
     "01_graph.png")

# %% [markdown]
# ## 2. Checking a gradient: finite differences
#
# The central difference approximates a derivative with two forward passes:
#
# $$\frac{\partial L}{\partial \theta} \approx \frac{L(\theta + h) - L(\theta - h)}{2h},
# \qquad \text{error} = O(h^2) \text{ (truncation)} + O(\varepsilon / h) \text{ (rounding)}.$$
#
# We compare with a *relative* error $|a-b| / \max(|a|, |b|, 10^{-12})$ so that large and small
# gradients are judged alike.

# %%
def rel_err(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def finite_difference(f, values, name, h=1e-6):
    up, down = dict(values), dict(values)
    up[name] += h
    down[name] -= h
    return (f(**up) - f(**down)) / (2 * h)


def loss_of_floats(**kw):
    return neuron(**{k: Value(v) for k, v in kw.items()}).data


for name in inputs:
    fd = finite_difference(loss_of_floats, inputs, name)
    err = rel_err(leaves[name].grad, fd)
    print(f"  {name:<3} backprop {leaves[name].grad:+.8f}   finite diff {fd:+.8f}   rel err {err:.1e}")
    assert err < 1e-6, (
        f"gradient of {name}: backprop {leaves[name].grad:.8g} vs finite difference {fd:.8g} "
        f"(rel err {err:.1e}); the local derivative of an op on the path from {name} to L is wrong")

# %% [markdown]
# ### A value used twice
#
# In $y = a\cdot a + a$ the node $a$ feeds three edges, so $\partial y/\partial a = a + a + 1$.
# This is why `backward` *adds* into `parent.grad` instead of assigning it.

# %%
a = Value(3.0, label="a")
y = a * a + a
y.backward()
print(f"dy/da = {a.grad} (expected 2a + 1 = {2 * 3.0 + 1})")
assert a.grad == 7.0, (f"dy/da = {a.grad}, expected 7: a gradient from one use of `a` overwrote another; "
                       "backward must accumulate with +=")

# %% [markdown]
# ## 3. tinymoe's `Tensor`: the same idea on arrays
#
# `tinymoe.Tensor` wraps a NumPy array (a CuPy array on a GPU). Every operation is a
# `Function` with a `forward` on arrays and a hand-written `backward` that maps the gradient of
# the output to the gradients of the inputs. For arrays the "local derivative times adjoint"
# becomes a vector-Jacobian product, e.g. for $y = \tanh(x)$: $\bar x = \bar y \odot (1-y^2)$.
#
# The neuron again, now with vectors $x, w \in \mathbb R^2$:

# %%
x = tinymoe.tensor([1.5, -0.5], requires_grad=True)   # [2], float32 by default
w = tinymoe.tensor([0.8, -1.2], requires_grad=True)   # [2]
b = tinymoe.tensor(0.1, requires_grad=True)           # []
o_t = F.tanh((x * w).sum() + b)                        # []
loss_t = (o_t - 0.5) ** 2                              # []
loss_t.backward()

print("loss", loss_t.item(), "dtype", loss_t.dtype)
print("dL/dw =", w.grad, " dL/dx =", x.grad, " dL/db =", b.grad)
toy = np.array([leaves["w1"].grad, leaves["w2"].grad])
assert np.allclose(w.grad, toy, rtol=1e-5, atol=1e-7), (
    f"tinymoe dL/dw = {w.grad} disagrees with the scalar toy {toy}")
assert np.allclose(x.grad, [leaves["x1"].grad, leaves["x2"].grad], rtol=1e-5, atol=1e-7), "dL/dx disagrees with the toy"

# %% [markdown]
# ### A gradient check on matrices (float64)
#
# $L(W) = \frac1N\sum_{n,j} \tanh\big((XW)_{nj}\big)^2$ with $X \in \mathbb R^{N\times d}$,
# $W \in \mathbb R^{d \times m}$. We check **every** entry of $\partial L/\partial W$ against
# central differences. tinymoe keeps float64 when you pass float64 arrays.

# %%
rng = np.random.default_rng(0)
N, d, m = 6, 4, 3
X_np = rng.normal(size=(N, d))                       # [N, d] float64
W_np = rng.normal(size=(d, m)) * 0.5                 # [d, m] float64


def L_of(W_array):
    with tinymoe.no_grad():                          # forward only: no graph recorded
        out = F.tanh(tinymoe.tensor(X_np) @ tinymoe.tensor(W_array))   # [N, d] @ [d, m] -> [N, m]
        return ((out * out).sum() / N).item()


W = tinymoe.tensor(W_np, requires_grad=True)         # float64 leaf
out = F.tanh(tinymoe.tensor(X_np) @ W)               # [N, m]
loss64 = (out * out).sum() / N                       # []
loss64.backward()

fd = np.zeros_like(W_np)
h = 1e-6
for i in range(d):
    for j in range(m):
        Wp, Wm = W_np.copy(), W_np.copy()
        Wp[i, j] += h
        Wm[i, j] -= h
        fd[i, j] = (L_of(Wp) - L_of(Wm)) / (2 * h)
worst = np.max(np.abs(W.grad - fd) / np.maximum(np.abs(fd), 1e-12))
print(f"W.grad dtype {W.grad.dtype}; worst relative error against finite differences: {worst:.1e}")
assert worst < 1e-6, f"dL/dW disagrees with finite differences (worst rel err {worst:.1e})"

# %% [markdown]
# ### Why gradient checks use float64
#
# Sweep the step $h$ and measure the error of the central difference for one entry, in
# float32 and float64. Large $h$: truncation error $\propto h^2$. Small $h$: the two forward
# values agree in almost all digits and rounding error $\propto \varepsilon/h$ takes over
# ($\varepsilon \approx 1.2\cdot10^{-7}$ in float32, $2.2\cdot10^{-16}$ in float64).

# %%
def L_of_dtype(W_array, dtype):
    with tinymoe.no_grad():
        out = F.tanh(tinymoe.tensor(X_np.astype(dtype)) @ tinymoe.tensor(W_array.astype(dtype)))
        return float(((out * out).sum() / N).item())


exact = W.grad[1, 2]                                 # the float64 backprop value
steps = np.logspace(-1, -12, 23 if not FAST else 12)
errors = {}
for dtype in (np.float32, np.float64):
    errs = []
    for hh in steps:
        Wp, Wm = W_np.copy(), W_np.copy()
        Wp[1, 2] += hh
        Wm[1, 2] -= hh
        est = (L_of_dtype(Wp, dtype) - L_of_dtype(Wm, dtype)) / (2 * hh)
        errs.append(max(abs(est - exact) / abs(exact), 1e-17))
    errors[np.dtype(dtype).name] = np.array(errs)
    best = steps[int(np.argmin(errs))]
    print(f"{np.dtype(dtype).name}: best h = {best:.0e}, best relative error = {min(errs):.1e}")

fig, ax = plt.subplots(figsize=(7, 4.5))
for name, errs in errors.items():
    ax.loglog(steps, errs, "o-", label=name)
trunc = (steps / steps[0]) ** 2 * errors["float64"][0]
ax.loglog(steps[trunc > 1e-13], trunc[trunc > 1e-13], "k:", label="slope 2 (truncation error)")
ax.invert_xaxis()
ax.set_xlabel("finite-difference step h")
ax.set_ylabel("relative error of (L(w+h) - L(w-h)) / 2h")
ax.set_title("Lesson 1: central differences need float64 for a tight check")
ax.legend()
show(fig, "01_finite_difference_step.png")

assert errors["float64"].min() < 1e-8, "float64 central differences never got within 1e-8: is the backprop value wrong?"
assert errors["float32"].min() > 1e2 * errors["float64"].min(), "float32 unexpectedly as accurate as float64"

# %% [markdown]
# ## 4. What the graph machinery does for you
#
# - **Iterative topological order.** Deep graphs are fine: a chain of 10,000 operations would
#   overflow Python's recursion limit (1,000) with a recursive depth-first search.
# - **Accumulation.** Gradients *add up* across `backward()` calls until you reset them
#   (`zero_grad()` or `.grad = None`), as in PyTorch: this is gradient accumulation.
# - **Freed buffers.** After `backward()` the saved activations are released; a second
#   `backward()` through the same graph raises, unless the first one passed `retain_graph=True`.
# - **`no_grad()`** records nothing: use it for evaluation and for optimizer updates.

# %%
n_ops = 10_000
t = tinymoe.tensor(1.0, requires_grad=True, dtype=np.float64)   # float64: no rounding drift
y = t
for _ in range(n_ops):
    y = y * 1.0001                                   # a chain of 10,000 multiplications
y.backward()
print(f"d(1.0001^{n_ops} t)/dt = {t.grad:.6f}, expected {1.0001 ** n_ops:.6f}")
assert abs(float(t.grad) - 1.0001 ** n_ops) < 1e-9 * 1.0001 ** n_ops, "gradient through a long chain is wrong"

v = tinymoe.tensor([1.0, 2.0], requires_grad=True)
(v * v).sum().backward()
(v * v).sum().backward()                             # second call: adds to .grad
print("accumulated grad of sum(v^2) twice:", v.grad, "(2 * 2v)")
assert np.allclose(v.grad, [4.0, 8.0]), f"expected accumulation to give [4, 8], got {v.grad}"

z = (v * 3.0).sum()
z.backward()
try:
    z.backward()
    raise AssertionError("a second backward through a freed graph should raise")
except RuntimeError as e:
    print("second backward ->", str(e)[:90], "...")

with tinymoe.no_grad():
    q = v * 2.0
print("inside no_grad: requires_grad =", q.requires_grad)

# %% [markdown]
# ## 5. Against PyTorch (optional)
#
# If PyTorch is installed, compute the matrix example with it and compare. tinymoe never
# needs PyTorch; the project's tests use it as an independent oracle in exactly this way.

# %%
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the comparison (nothing else needs it)")

if torch is not None:
    Wt = torch.tensor(W_np, requires_grad=True)
    lt = (torch.tanh(torch.tensor(X_np) @ Wt) ** 2).sum() / N
    lt.backward()
    diff = np.max(np.abs(Wt.grad.numpy() - W.grad))
    print(f"torch loss {lt.item():.12f}  tinymoe loss {loss64.item():.12f}  max |grad diff| {diff:.1e}")
    assert diff < 1e-12, f"tinymoe and torch gradients differ by {diff:.1e}"

# %% [markdown]
# ## Exercises
#
# 1. **Add `exp` and `relu` to `Value`** and check both with `finite_difference`.
#    *Hint:* the local derivatives are $e^x$ and $[x > 0]$; at $x=0$ a finite difference of
#    relu is 0.5 — choose a test point away from 0.
# 2. **Break the chain rule on purpose.** Replace `parent.grad += ...` by `parent.grad = ...`
#    in `backward`. Which self-check fails, and why does the neuron check still pass?
#    *Hint:* in the neuron, does any node feed more than one operation?
# 3. **Make a float32 check pass.** Using the sweep above, what step $h$ would you choose for a
#    float32 gradient check, and what tolerance? *Hint:* the rounding/truncation trade-off puts
#    the best $h$ near $\varepsilon^{1/3}$.
