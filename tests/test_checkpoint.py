"""Checkpoints: round trip, atomic writes, and clear refusals of truncated, edited,
mismatched or foreign files."""
from __future__ import annotations

import io
import json

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
