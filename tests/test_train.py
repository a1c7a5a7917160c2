"""The training loop: step-by-step against a torch twin (AdamW, Adafactor, gradient
accumulation), exact resume, NaN stop, Ctrl-C, logs, eval in nats per byte."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tinymoe.checkpoint import load_checkpoint
from tinymoe.config import get_preset
from tinymoe.data import BatchSampler, builtin_corpus, encode_corpus
from tinymoe.nn.model import OpenMoE
from tinymoe.tokenizer import ByteTokenizer, BPETokenizer
from tinymoe.train import TrainConfig, evaluate, train

from tests.oracle.torch_adafactor import TorchAdafactor
from tests.oracle.torch_model import twin_model

REPO = Path(__file__).resolve().parents[1]
MAX_CHARS = 6000


def toy(**kw):
    return get_preset("toy", **kw)


def tcfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(steps=4, batch_size=2, seq_len=16, warmup=1, eval_every=0, eval_batches=1,
                save_every=0, log_every=1, snapshot_every=0, max_chars=MAX_CHARS,
                out_dir=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def _lr(step, cfg):
    """Warmup + cosine written out from its definition (not imported)."""
    w, T = min(cfg.warmup, cfg.steps), cfg.steps
    if step < w:
        return cfg.lr * (step + 1) / (w + 1)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * (step - w) / (T - w)))


def _twin_losses(model_cfg, cfg, n_steps, optimizer):
    """Train the torch twin on the batches the trainer draws; return its loss per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny tensors: threads only add overhead
    try:
        return _twin_losses_1(model_cfg, cfg, n_steps, optimizer)
    finally:
        torch.set_num_threads(threads)


def _twin_losses_1(model_cfg, cfg, n_steps, optimizer):
    init = OpenMoE(model_cfg, seed=cfg.seed).state_dict()
    p = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    decay = [t for t in p.values() if t.dim() >= 2]
    no_decay = [t for t in p.values() if t.dim() < 2]
    if optimizer == "adamw":
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8)
    else:
        refs = [TorchAdafactor(decay, lr=cfg.lr, weight_decay=cfg.weight_decay),
                TorchAdafactor(no_decay, lr=cfg.lr, weight_decay=0.0)]
    train_tok, _ = encode_corpus(builtin_corpus(max_chars=cfg.max_chars), ByteTokenizer())
    sampler = BatchSampler(train_tok, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    losses = []
    for step in range(n_steps):
        lr = _lr(step, cfg)
        total = 0.0
        for _ in range(cfg.grad_accum):
            b = sampler.next()
            out = twin_model(model_cfg, p, torch.tensor(b.x), torch.tensor(b.y))
            (out["loss"] / cfg.grad_accum).backward()
            total += out["loss"].item()
        losses.append(total / cfg.grad_accum)
        torch.nn.utils.clip_grad_norm_(list(p.values()), cfg.grad_clip)
        if optimizer == "adamw":
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad()
        else:
            for ref in refs:
                ref.lr = lr
                ref.step([t.grad for t in ref.params])
            for t in p.values():
                t.grad = None
    return np.array(losses)


@pytest.mark.parametrize("optimizer,steps,accum", [("adamw", 20, 1), ("adamw", 4, 2),
                                                   ("adafactor", 8, 1)])
def test_losses_match_torch_twin(tmp_path, optimizer, steps, accum):
    # Adafactor: d_model 128 so the embedding and expert matrices are stored factored.
    extra = dict(d_model=128, d_ff=128, n_heads=4) if optimizer == "adafactor" else {}
    model_cfg = toy(dtype="float64", **extra)
    cfg = tcfg(tmp_path, steps=steps, warmup=3, lr=3e-3, min_lr=3e-4, grad_accum=accum,
               optimizer=optimizer, grad_clip=0.5, log_every=100)
    ours = np.array(train(model_cfg, cfg, progress=False).losses)
    theirs = _twin_losses(model_cfg, cfg, steps, optimizer)
    rel = np.abs(ours - theirs) / np.abs(theirs)
    assert ours.shape == theirs.shape
    assert rel.max() <= 1e-8, (f"first losses ours {ours[:4]} torch {theirs[:4]}; "
                               f"max rel diff {rel.max():.3e} at step {rel.argmax() + 1}")
    if optimizer == "adamw":
        assert ours[-1] < ours[0]


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_is_bitwise_exact(tmp_path, optimizer):
    model_cfg = toy(slot_priority="random")            # the routing RNG must resume too
    straight = train(model_cfg, tcfg(tmp_path, "straight", optimizer=optimizer), progress=False)
    first = train(model_cfg, tcfg(tmp_path, "split", optimizer=optimizer, stop_at=2),
                  progress=False)
    assert first.status == "stopped" and first.step == 2 and "--resume" in first.message
    second = train(None, tcfg(tmp_path, "split", optimizer=optimizer, resume=first.checkpoint),
                   progress=False)
    assert second.status == "done" and second.step == 4
    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(second.checkpoint)
    for k, v in a.model_state.items():
        assert np.array_equal(v, b.model_state[k]), f"{k} differs after resume"
    for i, s in a.optimizer_state["state"].items():
        for k, v in s.items():
            assert np.array_equal(v, b.optimizer_state["state"][i][k]), f"optimizer {i}.{k}"
    assert a.sampler_state == b.sampler_state
    assert straight.losses[2:] == second.losses


def test_resume_refuses_changed_settings(tmp_path):
    first = train(toy(), tcfg(tmp_path, stop_at=2), progress=False)
    with pytest.raises(Exception, match="batch_size=3 .checkpoint: 2."):
        train(None, tcfg(tmp_path, batch_size=3, resume=first.checkpoint), progress=False)
    with pytest.raises(Exception, match="model config mismatch: n_experts=2"):
        train(toy(n_experts=2), tcfg(tmp_path, resume=first.checkpoint), progress=False)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train(toy(), tcfg(tmp_path), progress=False)


def _poison(at_step):
    def hook(step, model):
        if step == at_step:
            p = next(iter(model.parameters()))
            p.data[0, 0] = np.nan
    return hook


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tcfg(tmp_path, steps=8, save_every=2)
    # weights poisoned after update 3: the loss of update 4 is NaN
    res = train(toy(), cfg, progress=False, on_step=_poison(3))
    assert res.status == "nan"
    assert "loss is nan at step 4" in res.message and "step 2" in res.message
    assert "\n" not in res.message
    ck = load_checkpoint(res.checkpoint)
    assert ck.step == 2
    assert all(np.isfinite(v).all() for v in ck.model_state.values())
    events = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end" and events[-1]["status"] == "nan"


def test_nonfinite_weights_are_never_saved(tmp_path):
    # poisoned right before a save: the save is refused and step 2's checkpoint stays
    res = train(toy(), tcfg(tmp_path, steps=8, save_every=2), progress=False,
                on_step=_poison(4))
    assert res.status == "nan" and "non-finite" in res.message
    assert load_checkpoint(res.checkpoint).step == 2


def test_huge_lr_stops_cleanly(tmp_path):
    # a good checkpoint first, then a session at lr 1e12 that saves after every update:
    # whatever it saves (or keeps) must be finite, unconditionally
    good = train(toy(), tcfg(tmp_path, steps=2, weight_decay=0.0), progress=False)
    res = train(None, tcfg(tmp_path, steps=30, lr=1e12, min_lr=0.0, grad_clip=0.0,
                           weight_decay=0.0, save_every=1, resume=good.checkpoint),
                progress=False)
    assert res.status == "nan", res.message
    assert res.checkpoint is not None
    ck = load_checkpoint(res.checkpoint)
    assert _finite_state(ck)
    assert f"(step {ck.step}) is kept" in res.message


def test_logs_curves_snapshots(tmp_path):
    cfg = tcfg(tmp_path, steps=4, eval_every=2, snapshot_every=2, save_every=2, log_every=2)
    res = train(toy(), cfg, progress=False)
    run = tmp_path / "run"
    events = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    tr = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in tr] == [2, 4]
    for key in ("loss", "ce", "aux", "z", "lr", "tokens_per_s", "dropped", "busiest"):
        assert key in tr[0] and math.isfinite(tr[0][key])
    ev = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in ev] == [2, 4]
    assert set(ev[0]["eval"]) == {"prose", "code", "arith", "mean"}
    assert (run / "curves.png").stat().st_size > 1000
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["step_0.npz", "step_2.npz", "step_4.npz"]
    with np.load(run / "snapshots" / "step_4.npz") as z:
        L = len(toy().moe_layers)
        assert z["top1"].shape == (L,) + z["tokens"].shape
        assert z["top1"].max() < toy().n_experts and int(z["step"]) == 4
    assert res.eval["mean"]["ce"] == pytest.approx(
        np.mean([res.eval[d]["ce"] for d in ("prose", "code", "arith")]))


def test_dense_model_trains_with_snapshots_on(tmp_path):
    """A dense model (no MoE block) under the default snapshot setting trains and writes
    no routing snapshot (there is no routing to record); it used to stop at step 0."""
    cfg = tcfg(tmp_path, steps=2, snapshot_every=1, save_every=2)
    res = train(toy(moe_every=3, n_experts=1, top_k=1), cfg, progress=False)
    assert res.status == "done", res.message
    snaps = tmp_path / "run" / "snapshots"
    assert not snaps.exists() or not list(snaps.glob("*.npz"))


def test_eval_nats_per_byte_with_bpe():
    text = "the cat sat on the mat; the dog sat on the log. " * 40
    tok = BPETokenizer.train(text, 300)
    cfg = toy(vocab_size=tok.vocab_size)
    model = OpenMoE(cfg)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    lengths = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)])
    res = evaluate(model, {"x": ids}, batch_size=2, seq_len=16, max_batches=None,
                   byte_lengths=lengths)["x"]
    n_windows = (ids.size - 1) // 16
    targets = np.concatenate([ids[j * 16 + 1: j * 16 + 17] for j in range(n_windows)])
    n_bytes = len(tok.decode(targets).encode())
    assert res["tokens"] == targets.size and res["bytes"] == n_bytes
    assert res["nats_per_byte"] == pytest.approx(res["ce"] * targets.size / n_bytes, rel=1e-12)
    assert n_bytes > targets.size          # BPE tokens hold several bytes


def _finite_state(ck):
    arrays = list(ck.model_state.values()) + [
        v for st in ck.optimizer_state["state"].values() for k, v in st.items() if k != "step"]
    return all(np.isfinite(a).all() for a in arrays)


def test_exploded_weights_never_replace_the_last_good_checkpoint(tmp_path):
    # issue 11 item 3: lr 1e9 makes the weights huge but finite before the loss is NaN;
    # such a state used to be saved over the good checkpoint (and resuming hit NaN at once)
    first = train(toy(), tcfg(tmp_path, steps=6), progress=False)
    assert first.status == "done"
    res = train(None, tcfg(tmp_path, steps=20, save_every=1, lr=1e9, min_lr=0.0,
                           resume=first.checkpoint), progress=False)
    assert res.status == "nan", res.message
    ck = load_checkpoint(res.checkpoint)
    assert f"the last good checkpoint (step {ck.step}) is kept" in res.message, res.message
    assert _finite_state(ck)
    # the kept checkpoint really is good: resuming it with a sane rate trains on
    again = train(None, tcfg(tmp_path, steps=ck.step + 2, resume=res.checkpoint),
                  progress=False)
    assert again.status == "done", again.message
    assert all(math.isfinite(x) for x in again.losses)


def test_one_run_per_folder(tmp_path):
    from tinymoe.runfolder import LOCK_NAME, RunFolder, RunFolderBusy

    run = tmp_path / "run"
    run.mkdir()
    with RunFolder.open(run):                     # as if another run were training here
        with pytest.raises(RunFolderBusy, match=f"in use by another training run .pid {os.getpid()} on host"):
            train(toy(), tcfg(tmp_path), progress=False)
    assert not (run / LOCK_NAME).exists()         # released (and removed) at exit
    # a lock file left by a dead process is taken over, with a note
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run / LOCK_NAME).write_text(json.dumps({"pid": int(dead), "host": "elsewhere"}))
    with RunFolder.open(run) as rf:
        assert any(f"left by pid {dead}" in n for n in rf.notes), rf.notes
    res = train(toy(), tcfg(tmp_path), progress=False)
    assert res.status == "done" and not (run / LOCK_NAME).exists()


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    from tinymoe.checkpoint import temp_writer_pid

    run = tmp_path / "run"
    first = train(toy(), tcfg(tmp_path, stop_at=2), progress=False)
    # a writer killed in the middle of a save (os._exit: no cleanup, like kill -9)
    code = ("import os, sys; from tinymoe.checkpoint import atomic_write_bytes; "
            "atomic_write_bytes(sys.argv[1], lambda f: (f.write(b'x' * 1000), os._exit(9)))")
    for target in (run / "checkpoint.npz", run / "snapshots" / "step_2.npz"):
        p = subprocess.run([sys.executable, "-c", code, str(target)], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.returncode == 9
    left = [q for q in run.rglob("*.tmp")]
    assert len(left) == 2 and all(temp_writer_pid(q.name) is not None for q in left)
    alive = run / f".checkpoint.npz.{os.getpid()}.0123abcd.tmp"   # a live writer's: kept
    alive.write_bytes(b"y")
    res = train(None, tcfg(tmp_path, resume=first.checkpoint), progress=False)
    assert res.status == "done"
    assert sorted(run.rglob("*.tmp")) == [alive]


def test_full_disk_names_the_file_and_is_logged(tmp_path, monkeypatch):
    import errno
    from tinymoe.runfolder import RunFolderError

    real = np.savez
    calls = []

    def savez(f, **arrays):                      # the second checkpoint hits a full disk
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    run = tmp_path / "run"
    with pytest.raises(RunFolderError) as e:
        train(toy(), tcfg(tmp_path, steps=6, save_every=2), progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"could not write {run / 'checkpoint.npz'}: No space left on device" in msg
    assert "the last good checkpoint (step 2) is kept" in msg
    monkeypatch.setattr(np, "savez", real)
    assert load_checkpoint(run).step == 2
    assert not list(run.glob("*.tmp"))
    end = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["status"] == "error" and end["message"] == msg


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        train(toy(), tcfg(tmp_path, steps=2, snapshot_every=1, eval_every=1), progress=False)
    finally:
        os.umask(old)
    run = tmp_path / "run"
    files = [run / "checkpoint.npz", run / "curves.png", run / "log.jsonl",
             *(run / "snapshots").iterdir()]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o640)}, modes


def test_resume_of_a_finished_run_and_schedule_notice(tmp_path, capsys):
    done = train(toy(), tcfg(tmp_path, steps=3), progress=False)
    with pytest.raises(ValueError, match="has finished at step 3 .--steps 3.; to train it further "
                                         "resume with --steps M"):
        train(None, tcfg(tmp_path, steps=3, resume=done.checkpoint), progress=False)
    with pytest.raises(ValueError, match="--stop-at 2: the checkpoint .* is already at step 3"):
        train(None, tcfg(tmp_path, steps=6, stop_at=2, resume=done.checkpoint), progress=False)
    capsys.readouterr()
    train(None, tcfg(tmp_path, steps=5, stop_at=4, resume=done.checkpoint), progress=False)
    err = capsys.readouterr().err
    assert "note: resuming with steps 3 -> 5 changes the learning-rate schedule" in err, err
    train(None, tcfg(tmp_path, steps=5, resume=done.checkpoint), progress=False)
    assert "schedule" not in capsys.readouterr().err     # same --steps: no notice


def test_evaluating_restores_mode_and_grad():
    from tinymoe.autograd import is_grad_enabled

    model = OpenMoE(toy())
    model.blocks[0].train(False)                 # a mixed state is restored as it was
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError):
        with model.evaluating():
            assert not any(m.training for m in model.modules()) and not is_grad_enabled()
            raise RuntimeError
    assert [m.training for m in model.modules()] == before and is_grad_enabled()


def test_interrupt_mid_step_resumes_exactly(tmp_path, monkeypatch):
    # Ctrl-C after update 3 drew its batch: the checkpoint is step 2 with the data
    # position *before* update 3's batch, so resuming gives the straight run bit for bit
    straight = train(toy(), tcfg(tmp_path, "straight"), progress=False)
    real, calls = BatchSampler.next, []

    def next_batch(self):
        batch = real(self)                       # the data position has moved on
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return batch

    monkeypatch.setattr(BatchSampler, "next", next_batch)
    first = train(toy(), tcfg(tmp_path, "split"), progress=False)
    monkeypatch.setattr(BatchSampler, "next", real)
    assert first.status == "interrupted" and first.step == 2, first.message
    assert "checkpoint saved" in first.message
    second = train(None, tcfg(tmp_path, "split", resume=first.checkpoint), progress=False)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(second.checkpoint)
    for k, v in a.model_state.items():
        assert np.array_equal(v, b.model_state[k]), k


def test_interrupt_during_the_weight_update_saves_nothing(tmp_path, monkeypatch):
    from tinymoe.optim import AdamW

    real = AdamW.step

    def step(self):
        real(self)
        if self.steps == 3:                      # as if Ctrl-C came before the last weight
            raise KeyboardInterrupt

    monkeypatch.setattr(AdamW, "step", step)
    res = train(toy(), tcfg(tmp_path, save_every=1), progress=False)
    assert res.status == "interrupted" and res.step == 2
    assert res.message.startswith("interrupted during the weight update of step 3")
    assert load_checkpoint(res.checkpoint).step == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_loadable_checkpoint(tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinymoe", "train", "--config", "toy", "--steps", "100000",
           "--batch-size", "2", "--seq-len", "16", "--max-chars", str(MAX_CHARS),
           "--save-every", "3", "--eval-every", "0", "--snapshot-every", "0",
           "--eval-batches", "1", "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "checkpoint.npz").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint within 60 s"
        time.sleep(0.05)
    assert (out / "train.lock").exists()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "--resume" in stderr
    ck = load_checkpoint(out)
    assert ck.step >= 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "train.lock").exists()
