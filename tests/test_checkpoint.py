"""Checkpoints: round trip, atomic writes, and clear refusals of truncated, edited,
mismatched or foreign files."""
from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest

from tinymoe.checkpoint import (FORMAT_VERSION, CheckpointError, atomic_write_bytes,
                                load_checkpoint, load_model, save_checkpoint)
from tinymoe.config import get_preset
from tinymoe.data import BatchSampler
from tinymoe.nn.model import OpenMoE
from tinymoe.optim import Adafactor, AdamW
from tinymoe.tokenizer import BPETokenizer, ByteTokenizer


def _stepped(opt_cls, cfg, seed=0):
    """A toy model and optimizer after one real update (so optimizer state exists)."""
    model = OpenMoE(cfg, seed=seed)
    opt = opt_cls(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(1)
    x = rng.integers(0, cfg.vocab_size, (2, 8))
    out = model(x, targets=np.roll(x, -1, axis=1))
    out.loss.backward()
    opt.step()
    return model, opt


def _save(path, cfg=None, opt_cls=AdamW, tokenizer=None, **kw):
    cfg = cfg or get_preset("toy")
    model, opt = _stepped(opt_cls, cfg)
    sampler = BatchSampler({"a": np.arange(100) % 7}, 2, 8, seed=3)
    sampler.next()
    args = dict(model_config=cfg, model_state=model.state_dict(),
                tokenizer=tokenizer or ByteTokenizer(), step=7, train_config={"steps": 9},
                optimizer_state=opt.state_dict(), sampler_state=sampler.state_dict(),
                rng_state={"route_rng": np.random.default_rng(5).bit_generator.state},
                extra={"note": "x"})
    args.update(kw)
    save_checkpoint(path, **args)
    return model, opt, sampler


@pytest.mark.parametrize("opt_cls", [AdamW, Adafactor])
def test_round_trip(tmp_path, opt_cls):
    path = tmp_path / "c.npz"
    model, opt, sampler = _save(path, opt_cls=opt_cls)
    ck = load_checkpoint(path)
    assert ck.step == 7 and ck.train_config == {"steps": 9} and ck.extra == {"note": "x"}
    assert ck.model_config == get_preset("toy")
    for k, v in model.state_dict().items():
        assert np.array_equal(ck.model_state[k], v) and ck.model_state[k].dtype == v.dtype
    # the optimizer and sampler continue exactly
    opt2 = opt_cls(OpenMoE(get_preset("toy"), seed=9).parameters(), lr=1e-3)
    opt2.load_state_dict(ck.optimizer_state)
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert np.array_equal(np.asarray(opt2.state_dict()["state"][i][k]), np.asarray(v))
    s2 = BatchSampler({"a": np.arange(100) % 7}, 2, 8, seed=3)
    s2.load_state_dict(ck.sampler_state)
    assert np.array_equal(s2.next().x, sampler.next().x)
    g = np.random.default_rng(0)
    g.bit_generator.state = ck.rng_state["route_rng"]
    assert g.random() == np.random.default_rng(5).random()
    # a run folder resolves to its checkpoint.npz
    (tmp_path / "run").mkdir()
    _save(tmp_path / "run" / "checkpoint.npz")
    assert load_checkpoint(tmp_path / "run").step == 7


def test_load_model_and_bpe_tokenizer(tmp_path):
    tok = BPETokenizer.train("abab abab cdcd " * 20, 262)
    cfg = get_preset("toy", vocab_size=tok.vocab_size)
    model, _, _ = _save(tmp_path / "c.npz", cfg=cfg, tokenizer=tok)
    m2, tok2, cfg2 = load_model(tmp_path / "c.npz")
    assert cfg2 == cfg and not m2.training
    assert tok2.to_dict() == tok.to_dict()
    x = np.array([[1, 2, 3, 4]])
    model.eval()
    assert np.array_equal(m2(x).logits.data, model(x).logits.data)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "c.npz"
    _save(path)
    before = path.read_bytes()

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(path, failing)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]   # no temp file left


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_and_truncated(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "nope.npz")
    assert "not found" in _one_line(e)
    path = tmp_path / "c.npz"
    _save(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 20):
        (tmp_path / "t.npz").write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / "t.npz")
        assert "truncated or corrupt" in _one_line(e)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "text.npz")


def _entries(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _rewrite(path, entries):
    buf = io.BytesIO()
    np.savez(buf, **entries)
    path.write_bytes(buf.getvalue())


def test_hand_edited_weight_or_meta_is_refused(tmp_path):
    path = tmp_path / "c.npz"
    _save(path)
    e = _entries(path)
    e["model/norm_f.weight"] = e["model/norm_f.weight"] * 2          # a weight edited
    _rewrite(path, e)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "checksum mismatch" in _one_line(err)

    _save(path)
    e = _entries(path)
    meta = json.loads(e["__meta__"].tobytes())
    meta["step"] = 1000                                              # the JSON edited
    e["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    _rewrite(path, e)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "checksum mismatch" in _one_line(err)

    _save(path)
    e = _entries(path)
    del e["model/norm_f.weight"]                                     # an array removed
    _rewrite(path, e)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_config_mismatch_and_version(tmp_path):
    model = OpenMoE(get_preset("toy"))
    state = model.state_dict()
    with pytest.raises(CheckpointError) as err:     # weights of toy saved as d_ff=96
        save_checkpoint(tmp_path / "a.npz", model_config=get_preset("toy", d_ff=96),
                        model_state=state, tokenizer=ByteTokenizer(), step=0)
        load_checkpoint(tmp_path / "a.npz")
    assert "do not match the config" in _one_line(err) and "ffn" in str(err.value)
    with pytest.raises(CheckpointError) as err:     # one more expert in the config
        save_checkpoint(tmp_path / "b.npz", model_config=get_preset("toy", n_experts=5),
                        model_state=state, tokenizer=ByteTokenizer(), step=0)
        load_checkpoint(tmp_path / "b.npz")
    assert "router" in _one_line(err) or "experts" in str(err.value)
    with pytest.raises(CheckpointError) as err:     # float32 weights, float64 config
        save_checkpoint(tmp_path / "c.npz", model_config=get_preset("toy", dtype="float64"),
                        model_state=state, tokenizer=ByteTokenizer(), step=0)
        load_checkpoint(tmp_path / "c.npz")
    assert "float64" in _one_line(err)

    # a checkpoint from a newer format version (the version is checked before the checksum)
    _save(tmp_path / "v.npz")
    e = _entries(tmp_path / "v.npz")
    meta = json.loads(e["__meta__"].tobytes())
    meta["version"] = FORMAT_VERSION + 1
    e["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    _rewrite(tmp_path / "v.npz", e)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "v.npz")
    assert "version" in _one_line(err) and "newer" in str(err.value)


# ---------------------------------------------------------------------------- reading guarantees
def _fuzz_module():
    """``scripts/fuzz_checkpoint.py`` (its region map, small checkpoint and classifier)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_checkpoint.py"
    spec = importlib.util.spec_from_file_location("fuzz_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sample_positions(where, per_region, seed):
    """``per_region[r]`` byte positions drawn (without replacement) from each region r."""
    rng = np.random.default_rng(seed)
    picked = []
    for region, n in per_region.items():
        idx = [i for i, r in enumerate(where) if r == region]
        assert idx, f"region {region} not found in the file"
        picked += rng.choice(idx, size=min(n, len(idx)), replace=False).tolist()
    return sorted(picked)


def test_flipped_bytes_are_refused_in_one_line_or_load_verified(tmp_path):
    """One byte flipped (two masks) at positions sampled from every structural region of
    a real checkpoint: each load (as ``generate`` does it) is either a one-line
    CheckpointError naming the file, or succeeds with weights equal to the original's."""
    fz = _fuzz_module()
    src = fz.small_checkpoint(tmp_path / "checkpoint.npz")
    data = src.read_bytes()
    where = fz.regions(data)
    ref = fz.reference(src)
    positions = _sample_positions(where, {"local header": 70, "npy header": 90,
                                          "central directory": 70, "meta JSON": 20,
                                          "array data": 20}, seed=0)
    target = tmp_path / "damaged.npz"
    seen = {}
    for i in positions:
        for mask in (0x01, 0xFF):
            damaged = bytearray(data)
            damaged[i] ^= mask
            target.write_bytes(damaged)
            outcome, detail = fz.classify(target, ref)
            assert outcome in ("refused", "loaded"), f"byte {i} ({where[i]}) ^ {mask:#x}: {detail}"
            seen.setdefault(where[i], set()).add(outcome)
    assert set(seen) == {"local header", "npy header", "central directory", "meta JSON",
                         "array data"}
    assert all("refused" in s for s in seen.values())
    assert seen["array data"] == {"refused"} and seen["meta JSON"] == {"refused"}


def test_flipped_bytes_of_a_routing_snapshot(tmp_path):
    """read_npz on any npz the trainer writes (a routing snapshot, no checksum of its own):
    a flipped byte gives a one-line CheckpointError or exactly the original arrays (the
    zip CRC-32 covers every member's header and data)."""
    from tinymoe.checkpoint import read_npz
    from tinymoe.runfolder import save_snapshot

    fz = _fuzz_module()
    model = OpenMoE(get_preset("toy", d_model=8, n_heads=2, d_ff=16, max_seq_len=16), seed=0)
    tokens = np.random.default_rng(0).integers(0, 258, (2, 8))
    src = tmp_path / "step_5.npz"
    save_snapshot(src, model, 5, tokens, np.array([0, 1]), ["prose", "code"])
    data = src.read_bytes()
    ref = read_npz(src)
    assert set(ref) >= {"step", "tokens", "expert_index", "kept", "domain_names"}
    where = fz.regions(data)
    # every byte of the shapes in the npy headers (a digit flipped down must not give a
    # shorter array), a sample of the rest
    shapes = set()
    for m in re.finditer(rb"'shape': \([^)]*\)", data):
        shapes |= set(range(m.start(), m.end()))
    assert len(shapes) > 9 * 10 and all(where[i] == "npy header" for i in shapes)
    positions = sorted(shapes | set(_sample_positions(
        where, {"local header": 40, "npy header": 40, "central directory": 50,
                "array data": 20}, seed=1)))
    target = tmp_path / "damaged.npz"
    for i in positions:
        for mask in (0x01, 0xFF):
            damaged = bytearray(data)
            damaged[i] ^= mask
            target.write_bytes(damaged)
            try:
                got = read_npz(target, kind="routing snapshot")
            except CheckpointError as e:
                assert "\n" not in str(e) and str(target) in str(e)
                continue
            assert got.keys() == ref.keys(), f"byte {i} ({where[i]}) ^ {mask:#x}"
            for k in ref:
                assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), \
                    f"byte {i} ({where[i]}) ^ {mask:#x}: {k} differs"


def test_shape_in_npy_header_must_match_the_entry(tmp_path):
    """A header that claims fewer elements than the entry holds is refused (NumPy's own
    reader would return the shorter array without reading to the CRC)."""
    from tinymoe.checkpoint import read_npz

    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.int64).reshape(3, 4))
    npy = buf.getvalue().replace(b"(3, 4)", b"(2, 4)")
    import zipfile
    with zipfile.ZipFile(tmp_path / "s.npz", "w") as zf:
        zf.writestr("a.npy", npy)
    with pytest.raises(CheckpointError) as e:
        read_npz(tmp_path / "s.npz")
    assert "declares 64 bytes" in _one_line(e)


def _not_a_checkpoint_files(tmp_path):
    """Files that are not tinymoe checkpoints, each with a word of why."""
    import zipfile
    from pathlib import Path

    files = {"readme": Path(__file__).resolve().parents[1] / "README.md"}
    files["empty"] = tmp_path / "empty.npz"
    files["empty"].write_bytes(b"")
    files["png"] = tmp_path / "x.png"
    files["png"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(30))
    files["folder"] = tmp_path / "run"
    files["folder"].mkdir()
    files["npy"] = tmp_path / "a.npy"
    np.save(files["npy"], np.arange(4))
    files["npz"] = tmp_path / "plain.npz"
    np.savez(files["npz"], a=np.arange(4))
    files["objects"] = tmp_path / "obj.npz"
    np.savez(files["objects"], a=np.array([{"x": 1}], dtype=object))
    files["zip"] = tmp_path / "notes.zip"
    with zipfile.ZipFile(files["zip"], "w") as zf:
        zf.writestr("notes.txt", "hello")
    if hasattr(os, "mkfifo"):        # opening a FIFO would wait for a writer forever
        files["fifo"] = tmp_path / "pipe.npz"
        os.mkfifo(files["fifo"])
    return files


def test_files_that_are_not_checkpoints_say_so_in_one_line(tmp_path, capsys):
    from tinymoe.__main__ import main

    for kind, path in _not_a_checkpoint_files(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            load_model(path)
        msg = _one_line(e)
        assert "not a tinymoe checkpoint" in msg and str(path) in msg, (kind, msg)
        assert "pickle" not in msg.replace("pickled Python objects", ""), (kind, msg)
        capsys.readouterr()
        assert main(["generate", str(path), "--max-new-tokens", "1"]) == 2, kind
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a tinymoe checkpoint" in err, (kind, err)
        assert "allow_pickle" not in err, (kind, err)


def _rewrite_signed(src, dst, change):
    """Copy checkpoint ``src`` to ``dst`` after ``change(meta, arrays)`` edits it in place,
    with a fresh, valid checksum (what a buggy writer, not a damaged disk, would produce)."""
    from tinymoe.checkpoint import _digest

    e = _entries(src)
    meta = json.loads(e.pop("__meta__").tobytes())
    e.pop("__checksum__")
    change(meta, e)
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    e["__meta__"] = np.frombuffer(meta_bytes, np.uint8)
    e["__checksum__"] = np.frombuffer(_digest(meta_bytes, {k: v for k, v in e.items()
                                                           if k != "__meta__"}).encode(), np.uint8)
    _rewrite(dst, e)
    return dst


def test_non_finite_weights_are_refused_for_sampling_analysis_and_resume(tmp_path, capsys):
    from tinymoe.__main__ import main

    _save(tmp_path / "good.npz")

    def nan_weight(meta, e):
        w = e["model/norm_f.weight"].copy()
        w[3] = np.nan
        e["model/norm_f.weight"] = w

    bad = _rewrite_signed(tmp_path / "good.npz", tmp_path / "nan.npz", nan_weight)
    with pytest.raises(CheckpointError) as err:
        load_model(bad)
    msg = _one_line(err)
    assert str(bad) in msg and "norm_f.weight" in msg and "1 non-finite" in msg
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    assert load_checkpoint(bad, require_finite=False).step == 7      # still inspectable
    for argv in (["generate", str(bad), "--max-new-tokens", "3"],
                 ["analyze", str(bad), "--out", str(tmp_path / "an")],
                 ["train", "--resume", str(bad), "--out", str(tmp_path / "r"), "--quiet"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        assert out.err.count("\n") == 1 and "non-finite" in out.err, (argv, out.err)
        assert "Warning" not in out.err and "nan" not in out.out.lower(), argv

    from tinymoe.train import TrainConfig, train
    with pytest.raises(CheckpointError, match="non-finite"):     # the library call refuses too
        train(None, TrainConfig(resume=str(bad), out_dir=str(tmp_path / "r2")), progress=False)

    def inf_moment(meta, e):
        name = next(k for k in sorted(e) if k.startswith("optim/") and e[k].dtype.kind == "f")
        e[name] = np.full_like(e[name], np.inf)

    bad = _rewrite_signed(tmp_path / "good.npz", tmp_path / "inf.npz", inf_moment)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "optim/" in _one_line(err) and "non-finite" in str(err.value)


@pytest.mark.parametrize("change", [
    lambda m, e: m.update(arrays=[]),
    lambda m, e: m.update(optimizer={"state_steps": {"x": 1}, "lr": 1e-3}),
    lambda m, e: m.update(model_config=[1, 2]),
    lambda m, e: m.update(step=True),
    lambda m, e: m.update(tokenizer={"type": "bpe", "merges": "ab"}),
    lambda m, e: m.update(sampler_state=3),
], ids=["arrays", "optimizer", "model_config", "step", "tokenizer", "sampler"])
def test_signed_but_malformed_metadata_is_one_line(tmp_path, change):
    """Metadata of the wrong shape under a valid checksum: CheckpointError, no traceback."""
    _save(tmp_path / "good.npz")
    bad = _rewrite_signed(tmp_path / "good.npz", tmp_path / "bad.npz", change)
    with pytest.raises(CheckpointError) as err:
        load_model(bad)
    assert str(bad) in _one_line(err)


def test_error_lines_escape_control_characters(tmp_path):
    """A newline in a path (or in a damaged entry name) cannot split the one-line error."""
    folder = tmp_path / "run\nx"
    folder.mkdir()
    _save(folder / "checkpoint.npz")
    data = (folder / "checkpoint.npz").read_bytes()
    (folder / "checkpoint.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "run\\nx" in _one_line(e) and "truncated or corrupt" in str(e.value)


def test_read_npz_reads_any_plain_npz(tmp_path):
    """read_npz equals np.load on intact files of every kind NumPy writes: streamed (data
    descriptors), compressed, Fortran order, empty, strings, booleans."""
    from tinymoe.checkpoint import read_npz

    class Stream(io.RawIOBase):          # not seekable: zipfile writes data descriptors
        def __init__(self):
            self.buf = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.buf += b
            return len(b)

    arrays = {"f": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "e": np.zeros((0, 3)),
              "u": np.array(["ab", "c"]), "b": np.array([True, False]), "s": np.int64(7)}
    stream = Stream()
    np.savez(stream, **arrays)
    (tmp_path / "stream.npz").write_bytes(bytes(stream.buf))
    np.savez_compressed(tmp_path / "z.npz", **arrays)
    np.savez(tmp_path / "p.npz", **arrays)
    for name in ("stream.npz", "z.npz", "p.npz"):
        got = read_npz(tmp_path / name)
        assert got.keys() == arrays.keys(), name
        for k, v in arrays.items():
            assert got[k].dtype == np.asarray(v).dtype and np.array_equal(got[k], v), (name, k)
