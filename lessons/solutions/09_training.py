# %% [markdown]
# # Solutions to lesson 9 — training
#
# Each exercise of `lessons/09_training.py`, worked and checked. The runs use lesson 9's
# shared configuration (`mini`, 300 updates; in fast mode `toy`, 30 updates on a small cut of
# the corpus), so the comparisons are against the model lesson 9 trained; with the same seed,
# every run sees the same batches. The answers are computed from the runs' own numbers.

# %%
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # lessons/: the _lesson plumbing
import numpy as np

from _lesson import FAST, OUT, ROOT, shared_run, shared_run_configs

from tinymoe.checkpoint import load_checkpoint
from tinymoe.train import train

model_cfg, train_cfg = shared_run_configs()


def last_eval(run_dir):
    """The last held-out evaluation of a run folder's log.jsonl: {domain: nats/byte, 'mean': ...}."""
    events = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    ev = [e for e in events if e["event"] == "eval"][-1]["eval"]
    return {name: v["nats_per_byte"] for name, v in ev.items()}


def train_events(run_dir):
    events = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "train"]


adamw_dir = Path(shared_run(progress=False)).parent                     # lesson 9's run (trained now if absent)
adamw = last_eval(adamw_dir)
print(f"lesson 9's run (AdamW, cosine): held-out {adamw['mean']:.3f} nats/byte")

# %% [markdown]
# ## Exercise 1 — Adafactor, OpenMoE style
#
# Same model, data and number of updates; Adafactor with the inverse-square-root schedule
# ($\eta_t = 0.01\cdot\sqrt{100}/\sqrt{\max(t, 100)}$: 0.01 for 100 updates, then decaying).

# %%
ada_cfg = train_cfg.replace(optimizer="adafactor", schedule="inverse_sqrt", lr=0.01, warmup=100,
                            out_dir=str(OUT / "s09_adafactor"), overwrite=True, snapshot_every=0, save_every=0)
ada = train(model_cfg, ada_cfg, progress=False)
diff = ada.eval["mean"]["nats_per_byte"] - adamw["mean"]
print(f"Adafactor: held-out {ada.eval['mean']['nats_per_byte']:.3f} nats/byte vs AdamW {adamw['mean']:.3f}: "
      f"Adafactor is {'worse' if diff > 0 else 'better'} by {abs(diff):.3f} nats/byte after {train_cfg.steps} updates")
assert ada.status == "done" and ada.eval["mean"]["nats_per_byte"] < math.log(model_cfg.vocab_size), \
    "the Adafactor run should learn something (held-out loss below ln V)"

# %% [markdown]
# ## Exercise 2 — top-1, and dropless
#
# With OpenMoE's capacity formula the drops at perfect balance are $\max(0, 1 - \mathrm{cf}/k)$:
# 37.5 % for top-2, **0** for top-1 (cf 1.25 > k = 1), so a top-1 run drops only what its
# imbalance causes. Dropless (`capacity_factor=None`) never drops; the busiest expert's share
# is then free to grow, since capacity no longer clips it.

# %%
runs = {"top-2, cf 1.25 (lesson 9)": adamw_dir}
for name, overrides in (("top-1, cf 1.25", dict(top_k=1)), ("top-2, dropless", dict(capacity_factor=None))):
    out_dir = OUT / f"s09_{'top1' if 'top-1' in name else 'dropless'}"
    r = train(model_cfg.replace(**overrides), train_cfg.replace(out_dir=str(out_dir), overwrite=True,
                                                                snapshot_every=0, save_every=0), progress=False)
    assert r.status == "done", r.message
    runs[name] = out_dir
summary = {}
for name, run_dir in runs.items():
    tr = train_events(run_dir)
    tail = tr[len(tr) // 2:]                                           # the second half of the run
    summary[name] = (np.mean([e["dropped"] for e in tail]), np.mean([e["busiest"] for e in tail]),
                     last_eval(run_dir)["mean"])
    print(f"{name:>26}: drop {summary[name][0]:6.1%}  busiest {summary[name][1]:6.1%}  "
          f"held-out {summary[name][2]:.3f} nats/byte   (second half of the run)")
assert summary["top-2, dropless"][0] == 0, "a dropless run must drop nothing"
assert summary["top-1, cf 1.25"][0] < summary["top-2, cf 1.25 (lesson 9)"][0], \
    "top-1 with cf 1.25 has no 1 - cf/k floor; in this run it should drop less than top-2"

# %% [markdown]
# ## Exercise 3 — a longer run from the command line
#
# The exercise's commands are `python -m tinymoe train` (the default: `mini`, 1200 updates,
# into `runs/mini`) and `python -m tinymoe generate runs/mini --prompt "def "`. Here the run
# goes into the lesson output folder; in fast mode it is the fast configuration with twice the
# updates of lesson 9's fast run. "How much better" is measured on held-out text (the samples
# are printed for reading).

# %%
cli_dir = OUT / "s09_cli"
if FAST:
    args = ["--config", "toy", "--steps", str(2 * train_cfg.steps), "--batch-size", str(train_cfg.batch_size),
            "--seq-len", str(train_cfg.seq_len), "--max-chars", str(train_cfg.max_chars), "--lr", str(train_cfg.lr),
            "--warmup", str(train_cfg.warmup), "--eval-every", "0", "--eval-batches", str(train_cfg.eval_batches),
            "--snapshot-every", "0", "--save-every", "0"]
else:
    args = []                                                          # the default run: mini, 1200 updates
cmd = [sys.executable, "-m", "tinymoe", "train", *args, "--out", str(cli_dir), "--overwrite", "--quiet"]
print("$ python", " ".join(cmd[1:]), flush=True)
subprocess.run(cmd, check=True, cwd=ROOT)
longer = last_eval(cli_dir)
steps_long = load_checkpoint(cli_dir / "checkpoint.npz").step
for ckpt_dir, label in ((adamw_dir, f"{train_cfg.steps} updates"), (cli_dir, f"{steps_long} updates")):
    sample = subprocess.run([sys.executable, "-m", "tinymoe", "generate", str(ckpt_dir), "--prompt", "def ",
                             "--max-new-tokens", "60", "--temperature", "0.8", "--top-k", "40", "--seed", "0"],
                            check=True, cwd=ROOT, capture_output=True, text=True).stdout
    print(f"--- {label}:\n{sample}")
print(f"held-out: {adamw['mean']:.3f} nats/byte after {train_cfg.steps} updates, {longer['mean']:.3f} after "
      f"{steps_long} ({adamw['mean'] - longer['mean']:+.3f})")
assert steps_long > train_cfg.steps and longer["mean"] < adamw["mean"], "the longer run should reach a lower held-out loss"
