# %% [markdown]
# # Lesson 7 — Load balancing: the auxiliary loss and the router z-loss
#
# **What you will learn**
# - the load-balance loss $L_{aux} = E\sum_i f_i P_i$ (Switch Transformer eq. 4-6, top-$k$
#   form): what $f$ and $P$ are, why it equals $k$ at perfect balance and $E$ at full collapse,
#   and how its gradient pushes tokens away from busy experts;
# - the router z-loss $L_z = \frac1N\sum_n \mathrm{logsumexp}(z_n)^2$ (ST-MoE), which keeps the
#   router logits small;
# - an experiment: a small MoE layer trained **without** the aux loss collapses onto 2 of its 8
#   experts; switching the loss on spreads the load again, and a layer trained with it from
#   the start uses all experts and fits the task best.

# %%
import numpy as np

from _lesson import FAST, plt, show

import tinymoe
from tinymoe import backend as B
from tinymoe import routing
from tinymoe.config import get_preset
from tinymoe.nn.moe import MoE
from tinymoe.optim import configure_optimizers
from tinymoe.train import TrainConfig

# %% [markdown]
# ## 1. The load-balance loss
#
# In a group of $G$ tokens with router probabilities $p_n \in \mathbb R^E$ and top-$k$ sets
# $\mathcal T_n$:
#
# $$f_i = \frac1G \sum_n [\,i \in \mathcal T_n\,] \quad(\textstyle\sum_i f_i = k),\qquad
# P_i = \frac1G\sum_n p_{n,i} \quad(\textstyle\sum_i P_i = 1),\qquad
# L_{aux} = E \sum_{i=1}^{E} f_i P_i .$$
#
# $f$ counts *choices* (before capacity) and is not differentiable; $P$ is. At perfect balance
# $f_i = k/E$, $P_i = 1/E$, so $L_{aux} = E\cdot E\cdot \frac kE\cdot\frac1E = k$. If every token
# picks the same $k$ experts, $f_i = 1$ for those and $\sum_{i\in\mathcal T} P_i \approx 1$, so
# $L_{aux} \approx E$. Its gradient, $\partial L_{aux}/\partial p_{n,i} = E f_i / G$, is largest
# for the busiest experts: it lowers their probability for *every* token, so some tokens
# switch to less busy experts. OpenMoE weights it by 0.01.
#
# (Switch / GShard / DeepSpeed with top-2 count only first choices in $f$, which gives 1 at
# balance; OpenMoE and tinymoe use the top-$k$ form above.)

# %%
E, k, G = 8, 2, 512
n = np.arange(G)
z_bal = np.full((G, E), -8.0, dtype=np.float32)              # [G, E]
z_bal[n, n % E], z_bal[n, (n + 1) % E] = 2.0, 1.0            # perfectly balanced choices
z_col = np.full((G, E), -8.0, dtype=np.float32)
z_col[:, 3], z_col[:, 6] = 2.0, 1.9                          # every token picks experts 3 and 6
z_rand = np.random.default_rng(0).normal(size=(G, E)).astype(np.float32) * 0.02   # like a fresh router
for name, z in (("balanced", z_bal), ("random init", z_rand), ("collapsed", z_col)):
    r = routing.route(z, k, capacity_factor=None)
    print(f"{name:>12}: L_aux = {r.aux_loss:.3f}   f = {np.round(r.f[0], 3)}")
aux_bal = routing.route(z_bal, k, None).aux_loss
aux_col = routing.route(z_col, k, None).aux_loss
assert abs(aux_bal - k) < 1e-5, f"L_aux at perfect balance should be k = {k}, got {aux_bal:.4f}"
assert abs(aux_col - E) < 0.01 * E, f"L_aux of a full collapse onto k experts should be about E = {E}, got {aux_col:.3f}"

# %% [markdown]
# ## 2. The router z-loss
#
# $$L_z = \frac1N\sum_n \Big(\log\sum_{i} e^{z_{n,i}}\Big)^2, \qquad
# \frac{\partial L_z}{\partial z_n} = \frac2N\,\mathrm{logsumexp}(z_n)\; p_n .$$
#
# It penalises large logits (ST-MoE, Zoph et al. 2022): the router softmax then works in a
# range where rounding errors are small (important in bfloat16) and probabilities do not
# saturate. OpenMoE weights it by $10^{-4}$. It does not care about balance.
#
# ## 3. The experiment: a layer that collapses
#
# One MoE layer ($d = 32$, $E = 8$ SwiGLU experts of width 16, top-2, dropless so that only the
# router decides) learns a regression task with 8 kinds of inputs, each with its own target map
# (a mixture of 8 random two-layer networks): 8 experts could each specialise on one kind.
# The inputs share a large common component $\mu$, as hidden states of language models do.
#
# The training loss is the one `OpenMoE.forward` uses (lesson 8):
# $L = L_{task} + c_{aux} L_{aux} + c_z L_z$. Three runs with the same data and initial weights:
# - **no aux**: $c_{aux} = 0$ for the whole run;
# - **aux switched on**: $c_{aux} = 0$ first, then $0.01$;
# - **aux from the start**: $c_{aux} = 0.01$ throughout.

# %%
d, K = 32, 8
data_rng = np.random.default_rng(1)
mu = data_rng.normal(size=d) * 3.0                           # the shared component
centers = data_rng.normal(size=(K, d))                       # one centre per kind of input
A = data_rng.normal(size=(K, d, 32)) / np.sqrt(d)            # per-kind target maps
Bt = data_rng.normal(size=(K, 32, d)) / np.sqrt(32)


def make_batch(r, n_tok=256):
    kind = r.integers(0, K, size=n_tok)                                           # [N]
    x = mu + centers[kind] + 0.5 * r.normal(size=(n_tok, d))                      # [N, d]
    h = np.tanh(np.einsum("nd,ndh->nh", x, A[kind]))                              # [N, 32]
    y = np.einsum("nh,nhd->nd", h, Bt[kind])                                      # [N, d]
    return x[None].astype(np.float32), y[None].astype(np.float32)                 # [1, N, d] each


def train(phases, seed=0, z_coef=0.0, lr=3e-3):
    """phases: list of (steps, aux_coef). Returns per-step history (a dict of arrays)."""
    cfg = get_preset("toy", d_model=d, n_experts=E, top_k=k, d_ff=16, capacity_factor=None)
    moe = MoE(cfg, rng=B.default_rng(seed))
    opt = configure_optimizers(moe, TrainConfig(optimizer="adamw", lr=lr, weight_decay=0.0,
                                                adam_beta1=0.9, adam_beta2=0.999))
    r = np.random.default_rng(2)                             # same batches for every run
    hist = {"mse": [], "aux": [], "z": [], "share": [], "max_logit": [], "gap": [], "outside": []}
    for steps, aux_coef in phases:
        for _ in range(steps):
            x, y = make_batch(r)
            out, aux, zl, st = moe(tinymoe.tensor(x))         # [1, N, d], [], [], stats
            mse = ((out - y) ** 2).mean()
            loss = mse + aux * aux_coef + zl * z_coef
            opt.zero_grad()
            loss.backward()
            opt.step()
            logp = np.sort(np.log(B.to_numpy(st.probs)), axis=1)[:, ::-1]               # [N, E], best first
            hist["gap"].append(float((logp[:, k - 1] - logp[:, k]).mean()))             # last chosen vs best unchosen
            hist["outside"].append(float(1 - np.exp(logp[:, :k]).sum(1).mean()))       # probability not on the top-k
            load = B.to_numpy(st.load_before)
            hist["mse"].append(mse.item())
            hist["aux"].append(st.aux_loss)
            hist["z"].append(st.z_loss)
            hist["share"].append(load / load.sum())
            hist["max_logit"].append(float(np.abs(B.to_numpy(st.lse)).max()))
    return {key: np.array(v) for key, v in hist.items()}


n1, n2 = 300, 500
runs = {
    "no aux": train([(n1 + n2, 0.0)]),
    "aux switched on": train([(n1, 0.0), (n2, 0.01)]),
    "aux from the start": train([(n1 + n2, 0.01)]),
}


def used(share_row, threshold=0.02):
    return int((share_row > threshold).sum())


for name, h in runs.items():
    tail = slice(-50, None)
    print(f"{name:>18}: after {n1} steps {used(h['share'][n1 - 1])} experts used, L_aux {h['aux'][n1 - 1]:.2f}; "
          f"at the end {used(h['share'][-1])} used, L_aux {h['aux'][-1]:.2f}, task MSE {h['mse'][tail].mean():.4f}")

h0, h1, h2 = runs["no aux"], runs["aux switched on"], runs["aux from the start"]
assert used(h0["share"][-1]) <= 3 and h0["aux"][-1] > 0.7 * E, (
    f"without the aux loss the router should collapse onto few experts; it uses {used(h0['share'][-1])} "
    f"(L_aux {h0['aux'][-1]:.2f})")
assert used(h1["share"][-1]) >= E - 2 and h1["aux"][-1] < 2.6, (
    f"after switching the aux loss on the load should spread again; {used(h1['share'][-1])} experts used, "
    f"L_aux {h1['aux'][-1]:.2f}")
assert h2["mse"][-50:].mean() < h0["mse"][-50:].mean(), "the balanced layer should fit the 8-kind task better"

# %% [markdown]
# ### Why the load stays collapsed for a while after the switch
#
# Look at the aux gradient on the logits of one token (lesson 5's softmax backward with
# $\partial L_{aux}/\partial p_i = c f_i$, $c = E/G$). In a collapse onto two experts, $f_i = 1$
# for the two busy experts and 0 for the others, so with $q = $ the probability the token puts
# *outside* the two busy experts:
#
# $$\frac{\partial L_{aux}}{\partial z_i} = p_i\,c\,(f_i - \textstyle\sum_j f_j p_j)
# = \begin{cases} c\,p_i\, q & \text{busy expert}\\ -c\,p_i\,(1-q) & \text{idle expert}\end{cases}$$
#
# A saturated router has $q \approx 0$ and $p_i \approx 0$ for every idle expert, so the
# aux loss, although it is near its maximum $E$, pushes the logits hardly at all. Only as
# the idle experts' logits creep up does the push grow; then the choices flip quickly. The
# run's own numbers:

# %%
t_rec = next((t for t in range(n1, n1 + n2) if used(h1["share"][t]) >= E - 2), None)
q0, gap0 = h1["outside"][n1 - 1], h1["gap"][n1 - 1]
print(f"at the switch (step {n1}): probability outside the top-{k} q = {q0:.2e}; the last chosen expert "
      f"leads the best idle one by {gap0:.2f} nats (a factor {np.exp(gap0):,.0f} in p)")
assert t_rec is not None, "the load never spread after the switch"
for t in (n1 + (t_rec - n1) // 4, n1 + (t_rec - n1) // 2, n1 + 3 * (t_rec - n1) // 4, t_rec):
    print(f"  step {t + 1:4d} (+{t + 1 - n1:3d}): gap {h1['gap'][t]:5.2f} nats, q {h1['outside'][t]:.2e}, "
          f"{used(h1['share'][t])} experts used, L_aux {h1['aux'][t]:.2f}")
print(f"the load spread to >= {E - 2} experts {t_rec + 1 - n1} updates after the aux loss was switched on")

# %% [markdown]
# And the z-loss at step 0: a fresh router has logits close to 0, and $\mathrm{logsumexp}$ of
# $E$ zeros is $\ln E$, not 0. So $L_z$ starts near $(\ln E)^2$, a bit above it because
# $\mathrm{logsumexp}(z) \ge \ln E + \bar z$ and grows with the spread of the logits
# ($\approx \ln E + \bar z + \mathrm{var}(z)/2$ for small logits).

# %%
z_start = h0["z"][0]
print(f"L_z at step 0: {z_start:.3f}; (ln E)^2 = (ln {E})^2 = {np.log(E) ** 2:.3f}")
assert np.log(E) ** 2 <= z_start < 1.5 * np.log(E) ** 2, f"L_z at init ({z_start:.3f}) should be just above (ln E)^2"

# %% [markdown]
# ### Picture: collapse and recovery

# %%
def smooth(a, w=20):
    return np.convolve(a, np.ones(w) / w, mode="valid")


steps_axis = np.arange(n1 + n2)
fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
shares = h1["share"].T                                       # [E, steps]
axes[0].stackplot(steps_axis, shares, labels=[f"expert {i}" for i in range(E)])
axes[0].axvline(n1, color="k", ls="--")
axes[0].text(n1 + 5, 0.95, "aux loss on", fontsize=9, va="top")
axes[0].set_xlim(0, n1 + n2 - 1)
axes[0].set_ylim(0, 1)
axes[0].set_xlabel("training step")
axes[0].set_ylabel("share of the top-2 assignments")
axes[0].set_title("run 'aux switched on': load per expert")
axes[0].legend(fontsize=6, loc="lower right", ncol=2)

for name, h in runs.items():
    axes[1].plot(steps_axis, h["aux"], label=name)
axes[1].axhline(k, color="0.5", ls=":", label=f"perfect balance (= k = {k})")
axes[1].axhline(E, color="0.5", ls="--", label=f"full collapse (= E = {E})")
axes[1].set_xlabel("training step")
axes[1].set_ylabel("L_aux = E sum_i f_i P_i")
axes[1].set_title("load-balance loss")
axes[1].legend(fontsize=7)

for name, h in runs.items():
    axes[2].plot(np.arange(smooth(h["mse"]).size) + 10, smooth(h["mse"]), label=name)
axes[2].set_ylim(0, 0.12)
axes[2].set_xlabel("training step")
axes[2].set_ylabel("task MSE (moving mean over 20 steps)")
axes[2].set_title("task loss: the balanced layer learns the 8 kinds best")
axes[2].legend(fontsize=7)
fig.suptitle(f"Lesson 7: without the aux loss the router collapses onto {used(h0['share'][-1])} of {E} experts")
show(fig, "07_collapse.png")

# %% [markdown]
# ## 4. What the z-loss does
#
# Same layer, aux loss on from the start, with and without a (deliberately strong) z-loss
# weight of $10^{-2}$. Watch $L_z$ (the mean squared log-partition of the router).

# %%
z_steps = 300 if FAST else 600
z_runs = {c: train([(z_steps, 0.01)], z_coef=c) for c in (0.0, 1e-2)}
for c, h in z_runs.items():
    print(f"z coef {c:g}: final L_z {h['z'][-1]:.3f}, largest |logsumexp| {h['max_logit'][-1]:.2f}, "
          f"task MSE {h['mse'][-50:].mean():.4f}")
assert z_runs[1e-2]["z"][-1] < z_runs[0.0]["z"][-1], "the z-loss should keep the router's log-partition smaller"

# %% [markdown]
# The z-loss drives $\mathrm{logsumexp}(z_n)$ towards 0, i.e. $z_{n,i} \approx \log p_{n,i}$: the
# logits stay in a small range without changing the probabilities (softmax ignores a shift).
# The task loss is almost the same; with OpenMoE's weight $10^{-4}$ the effect is gentler and
# only matters once logits would otherwise grow large over a long training run.

# %%
fig, ax = plt.subplots(figsize=(7, 4.3))
for c, h in z_runs.items():
    ax.plot(h["z"], label=f"z-loss weight {c:g}")
ax.set_xlabel("training step")
ax.set_ylabel("L_z = mean logsumexp(z)^2")
ax.set_title("Lesson 7: the router z-loss pins logsumexp(z) near 0")
ax.legend()
show(fig, "07_zloss.png")

# %% [markdown]
# ## Exercises
#
# 1. **Why does it collapse?** Re-run the "no aux" case with `mu = 0` (no shared component).
#    Does it still collapse? *Hint:* with a shared $\mu$, the router logits $z = (\mu + \dots) W_r$
#    share the term $\mu W_r$, so one gradient step moves *all* tokens towards the same experts.
# 2. **How strong?** Try $c_{aux} \in \{10^{-3}, 10^{-2}, 10^{-1}, 1\}$ from the start. Plot the
#    final task MSE and $L_{aux}$. Where does balancing start to hurt the task?
# 3. **Capacity as a balancer.** Set `capacity_factor=1.25` (OpenMoE's training value) and no
#    aux loss. Do the drops prevent collapse, or do the two favourite experts just drop most of
#    their tokens? *Hint:* look at `st.dropped_fraction` and the task MSE.
