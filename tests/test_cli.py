"""``python -m tinymoe``: help, a tiny train + generate round trip, and one-line errors
(exit status 2, no traceback) for bad flags, bad values, bad data and bad checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinymoe.checkpoint import save_checkpoint
from tinymoe.config import get_preset
from tinymoe.nn.model import OpenMoE
from tinymoe.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TINYMOE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "tinymoe", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


class InProcess:
    """``main(argv)`` run in this process (fast), with its exit status and output."""

    def __init__(self, capsys, *args):
        from tinymoe.__main__ import main  # noqa: PLC0415

        try:
            self.returncode = main([str(a) for a in args])
        except SystemExit as e:           # argparse errors and --help
            self.returncode = e.code
        captured = capsys.readouterr()
        self.stdout, self.stderr = captured.out, captured.err


def one_line_error(p, code=2, match=None):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    assert len(lines) == 1, p.stderr
    if match is not None:
        assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "checkpoint.npz"
    cfg = get_preset("toy")
    save_checkpoint(path, model_config=cfg, model_state=OpenMoE(cfg).state_dict(),
                    tokenizer=ByteTokenizer(), step=0)
    return path


def test_help(capsys):
    p = run("--help")
    assert p.returncode == 0 and "usage" in p.stdout, p.stderr
    for cmd in (["generate"], ["params"], ["train"]):
        p = InProcess(capsys, *cmd, "--help")
        assert p.returncode == 0 and "usage" in p.stdout, p.stderr
    for flag in ("--n-experts", "--top-k", "--capacity-factor", "--slot-priority", "--d-model",
                 "--batch-size", "--lr", "--resume", "--out", "--device", "--optimizer", "--threads"):
        assert flag in p.stdout


def test_bad_flags_and_values(tmp_path, capsys):
    one_line_error(run("train", "--bogus"), match="unrecognized arguments: --bogus")

    def cli(*args):
        return InProcess(capsys, *args)

    one_line_error(cli("train", "--top-k", "x"), match="top_k='x' must be an integer")
    one_line_error(cli("train", "--steps", "1.5"), match="steps='1.5' must be an integer")
    one_line_error(cli("train", "--config", "toy", "--out", ""), match="out_dir='' is empty")
    one_line_error(cli("train", "--config", "toy", "--top-k", "9"), match="top_k=9 > n_experts=4")
    one_line_error(cli("train", "--config", "nope"), match="unknown preset")
    one_line_error(cli("train", "--config", "toy", "--d-model", "30", "--out", tmp_path),
                   match="d_model=30 is not divisible by n_heads=4")
    one_line_error(cli("train", "--config", "toy", "--schedule", "linear", "--out", tmp_path),
                   match="schedule='linear'")
    one_line_error(cli("train", "--config", "toy", "--capacity-factor", "-1", "--out", tmp_path),
                   match="capacity_factor=-1.0 < 0")
    one_line_error(cli("train", "--config", "toy", "--seq-len", "100", "--out", tmp_path,
                       "--max-chars", "3000"), match="seq_len=100 > the model's max_seq_len=64")
    one_line_error(cli("train", "--threads", "0"), match="0 must be >= 1")
    one_line_error(cli("generate", "x.npz", "--threads", "two"), match="invalid int value: 'two'")
    one_line_error(cli("frobnicate"))
    assert not any(tmp_path.iterdir())        # nothing written by a failed start


def test_bad_data(tmp_path):
    one_line_error(run("train", "--config", "toy", "--data", tmp_path / "missing.txt",
                       "--out", tmp_path / "o"), match="data path not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(run("train", "--config", "toy", "--data", empty, "--out", tmp_path / "o"),
                   match="empty")
    assert not (tmp_path / "o" / "checkpoint.npz").exists()


def test_generate_errors(ckpt, tmp_path, capsys):
    one_line_error(run("generate", ckpt, "--prompt-ids", "1,2,999"),
                   match="token id 999 is out of range for vocab_size=258")
    one_line_error(InProcess(capsys, "generate", ckpt, "--top-p", "2"), match="top_p")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(ckpt.read_bytes()[:500])
    one_line_error(InProcess(capsys, "generate", bad), match="truncated or corrupt")
    one_line_error(InProcess(capsys, "generate", tmp_path / "none.npz"),
                   match="checkpoint not found")


def test_train_then_generate(tmp_path):
    out = tmp_path / "run"
    p = run("train", "--config", "toy", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
            "--max-chars", "5000", "--eval-batches", "1", "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr
    assert "held-out" in p.stdout and "Traceback" not in p.stderr
    assert (out / "checkpoint.npz").exists() and (out / "log.jsonl").exists()
    g = run("generate", out, "--prompt", "def ", "--max-new-tokens", "12", "--seed", "3",
            "--temperature", "0.8", "--top-k", "50", "--top-p", "0.95")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("def ")
    g2 = run("generate", out, "--prompt", "def ", "--max-new-tokens", "12", "--seed", "3",
             "--temperature", "0.8", "--top-k", "50", "--top-p", "0.95", "--threads", "1")
    assert g2.stdout == g.stdout
    # resuming with a changed batch size is refused in one line; a second fresh run too
    one_line_error(run("train", "--resume", out, "--batch-size", "3", "--quiet"),
                   match="cannot resume with changed batch_size=3")
    one_line_error(run("train", "--config", "toy", "--out", out, "--quiet"),
                   match="already holds a checkpoint")


def test_params(capsys):
    p = InProcess(capsys, "params", "--config", "toy", "n_experts=8", "--top-k", "1")
    assert p.returncode == 0, p.stderr
    assert "8E top-1" in p.stdout
    one_line_error(InProcess(capsys, "params", "--config", "toy", "n_expert=8"),
                   match="unknown config key")


@pytest.mark.parametrize("cmd", ["analyze", "bench"])
def test_optional_commands(cmd):
    p = run(cmd, "--help")
    if p.returncode == 0:
        assert "usage" in p.stdout
    else:
        one_line_error(p, code=1, match="not available")


def test_nan_run_ends_with_one_error_line(tmp_path, capsys):
    p = InProcess(capsys, "train", "--config", "toy", "--lr", "1e12", "--min-lr", "0",
                  "--grad-clip", "0", "--weight-decay", "0", "--steps", "30", "--batch-size", "2",
                  "--seq-len", "16", "--max-chars", "5000", "--eval-batches", "1",
                  "--out", tmp_path, "--quiet")
    one_line_error(p, code=1, match="at step")
    assert p.stderr.startswith("error: ") and ("nan" in p.stderr or "inf" in p.stderr)


def test_help_comes_from_field_docstrings_and_lists_choices(capsys):
    from dataclasses import fields

    from tinymoe.config import ModelConfig, preset_names
    from tinymoe.flags import field_docs
    from tinymoe.train import OPTIMIZERS, SCHEDULES, TOKENIZERS, TrainConfig

    p = InProcess(capsys, "train", "--help")
    text = " ".join(p.stdout.split())              # argparse wraps lines
    text = text.replace("- ", "-")                 # ... also after a hyphen ("openmoe- base")
    for cls in (TrainConfig, ModelConfig):
        docs = field_docs(cls)
        for f in fields(cls):
            assert f.name in docs, f"{cls.__name__}.{f.name} has no field docstring"
            if f.name not in ("out_dir", "resume", "device", "overwrite"):
                flag = "--" + f.name.replace("_", "-")
                assert f"{flag} " in text and docs[f.name][:40] in text, flag
    for names in (preset_names(), SCHEDULES, OPTIMIZERS, TOKENIZERS,
                  ("position", "probability", "random")):
        assert "one of: " + ", ".join(names) in text, names


def test_flag_types_follow_the_annotations():
    import argparse
    from dataclasses import dataclass

    from tinymoe.flags import add_dataclass_flags

    @dataclass
    class Demo:
        flag: bool = False
        "a switch"
        rate: float | None = None
        "a rate"
        names: tuple[str, ...] = ()
        "some names"
        count: int | None = None
        "a count"

    p = argparse.ArgumentParser()
    add_dataclass_flags(p, Demo, "d__")
    a = p.parse_args(["--flag", "yes", "--rate", "none", "--names", "a, b,", "--count", "3"])
    assert (a.d__flag, a.d__rate, a.d__names, a.d__count) == (True, None, ("a", "b"), 3)
    a = p.parse_args(["--flag", "off", "--rate", "0.5"])
    assert (a.d__flag, a.d__rate, a.d__names) == (False, 0.5, None)
    assert "a rate" in p.format_help()

    @dataclass
    class Bad:
        mapping: dict = None
        "no flag type for this"

    with pytest.raises(TypeError, match="mapping"):
        add_dataclass_flags(argparse.ArgumentParser(), Bad, "b__")


def test_second_run_in_a_folder_and_full_disk_are_one_line_errors(tmp_path, capsys, monkeypatch):
    import errno

    import numpy as np

    from tinymoe.runfolder import RunFolder

    out = tmp_path / "run"
    out.mkdir()
    args = ("train", "--config", "toy", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--max-chars", "5000", "--eval-batches", "1", "--save-every", "2", "--snapshot-every", "0",
            "--out", out,
            "--quiet")
    with RunFolder.open(out):
        one_line_error(InProcess(capsys, *args),
                       match=f"in use by another training run (pid {os.getpid()} on host")
    real, calls = np.savez, []

    def savez(f, **arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    one_line_error(InProcess(capsys, *args),
                   match=f"could not write {out / 'checkpoint.npz'}: No space left on device "
                         "[ENOSPC]; the last good checkpoint (step 2) is kept")
