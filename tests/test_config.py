"""Tests for tinymoe.config: validation, presets, (de)serialisation, parameter counting.

Expected counts are written out by hand from the shapes in docs/openmoe-facts.md (§1, §4, §13),
never taken from the code under test.
"""
from __future__ import annotations

import json
import time

import pytest

from tinymoe import routing
from tinymoe.config import (CAPACITY_MODES, PRESETS, SLOT_PRIORITIES, ModelConfig, capacity,
                            count_parameters, get_preset, memory_bytes, parameter_shapes,
                            parse_overrides)
from tinymoe.params_table import format_params_table, params_command

TOY = dict(vocab_size=258, d_model=64, n_layers=2, n_heads=4, d_ff=128, n_experts=4,
           top_k=2, moe_every=2, max_seq_len=64)


def make(**overrides) -> ModelConfig:
    return ModelConfig(**{**TOY, **overrides})


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(d_model=-64), "d_model"),
    (dict(n_layers=0), "n_layers"),
    (dict(n_heads=0), "n_heads"),
    (dict(d_ff=0), "d_ff"),
    (dict(n_experts=0, top_k=0), "n_experts"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(d_ff_expert=0), "d_ff_expert"),
    (dict(d_head=-2), "d_head"),
    (dict(top_k=5), "top_k=5 > n_experts=4"),
    (dict(top_k=0), "top_k=0"),
    (dict(d_model=66), "d_model=66"),          # 66 % 4 != 0
    (dict(d_model=60, n_heads=4), "head_dim=15"),  # 60 / 4 = 15 is odd
    (dict(d_head=7), "head_dim=7"),
    (dict(capacity_factor=-0.5), "capacity_factor=-0.5"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor=-1.0"),
    (dict(moe_every=0), "moe_every=0"),
    (dict(min_capacity=-1), "min_capacity=-1"),
    (dict(capacity_mode="tutel"), "capacity_mode='tutel'"),
    (dict(slot_priority="fifo"), "slot_priority='fifo'"),
    (dict(dtype="float16"), "dtype='float16'"),
    (dict(group_size=0), "group_size=0"),
    (dict(group_size=-4), "group_size=-4"),
    (dict(aux_loss_coef=-0.01), "aux_loss_coef=-0.01"),
    (dict(z_loss_coef=-1e-4), "z_loss_coef=-0.0001"),
    (dict(rope_base=0.0), "rope_base"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(init_std=-0.1), "init_std"),
    (dict(d_model=64.0), "d_model=64.0"),      # float where an int is needed
    (dict(n_layers=True), "n_layers=True"),    # bool is not an int here
    (dict(shared_ffn="yes"), "shared_ffn='yes'"),
    (dict(capacity_factor="1.25"), "capacity_factor='1.25'"),
    (dict(capacity_factor=float("nan")), "capacity_factor=nan"),
    (dict(ffn_kind="geglu"), "ffn_kind='geglu'"),
    (dict(init="xavier"), "init='xavier'"),
    (dict(logit_z_loss_coef=-1e-4), "logit_z_loss_coef=-0.0001"),
])
def test_validation_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError) as info:
        make(**overrides)
    msg = str(info.value)
    assert field in msg, msg
    assert "\n" not in msg


def test_valid_edge_values():
    assert make(capacity_factor=0).capacity_factor == 0.0     # dropless
    assert make(capacity_factor=None).capacity_factor is None  # dropless
    assert make(eval_capacity_factor=None).eval_capacity_factor is None
    assert isinstance(make(aux_loss_coef=0).aux_loss_coef, float)  # int -> float
    assert make(min_capacity=0).min_capacity == 0
    assert make(top_k=4).top_k == 4                             # k == E is allowed
    # d_head lifts the divisibility rule: 3 heads of 16 on d_model 64
    cfg = make(n_heads=3, d_head=16)
    assert cfg.head_dim == 16 and cfg.attn_dim == 48


def test_replace_validates_and_keeps_original():
    cfg = make()
    new = cfg.replace(top_k=1, capacity_factor=2.0)
    assert (new.top_k, new.capacity_factor) == (1, 2.0)
    assert (cfg.top_k, cfg.capacity_factor) == (2, 1.25)
    with pytest.raises(ValueError, match="top_k=8 > n_experts=4"):
        cfg.replace(top_k=8)


def test_unknown_keys_suggest_close_matches():
    with pytest.raises(ValueError) as info:
        make().replace(topk=1)
    msg = str(info.value)
    assert "'topk'" in msg and "'top_k'" in msg and "\n" not in msg
    d = make().to_dict()
    d["capacity_factr"] = 1.0
    d["n_expert"] = 4
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dict(d)
    msg = str(info.value)
    assert "'capacity_factr'" in msg and "'capacity_factor'" in msg
    assert "'n_expert'" in msg and "'n_experts'" in msg
    with pytest.raises(ValueError, match="unknown config key"):
        get_preset("toy", d_modle=32)
    with pytest.raises(ValueError, match="zzz"):
        make().replace(zzz=1)


def test_from_dict_missing_key():
    d = make().to_dict()
    del d["d_model"]
    with pytest.raises(ValueError, match="missing config key.*d_model"):
        ModelConfig.from_dict(d)


def test_to_dict_from_dict_round_trip_through_json():
    for name, cfg in PRESETS.items():
        d = json.loads(json.dumps(cfg.to_dict()))
        again = ModelConfig.from_dict(d)
        assert again == cfg, name
        assert again is not cfg


# ---------------------------------------------------------------------- layout helpers
def test_moe_layers():
    assert get_preset("openmoe-base").moe_layers == [3, 7, 11]
    assert get_preset("openmoe-8b").moe_layers == [5, 11, 17, 23]
    assert get_preset("openmoe-34b").moe_layers == list(range(3, 32, 4))
    assert make(moe_every=1).moe_layers == [0, 1]
    assert make(moe_every=3).moe_layers == []  # dense model
    cfg = get_preset("openmoe-base")
    assert [cfg.is_moe_block(i) for i in range(12)] == [i in (3, 7, 11) for i in range(12)]
    with pytest.raises(IndexError):
        cfg.is_moe_block(12)


def test_head_dim_and_expert_ff():
    assert get_preset("openmoe-base").head_dim == 64
    cfg = get_preset("openmoe-8b")
    assert cfg.head_dim == 128 and cfg.n_heads * cfg.head_dim == 3072 != cfg.d_model
    assert make().expert_ff == 128
    assert make(d_ff_expert=32).expert_ff == 32


def test_capacity_formulas():
    base = get_preset("openmoe-base")
    assert base.capacity(4096) == 320            # round(1.25 * 4096 / 16), docs/openmoe-facts.md §7
    assert base.capacity(4096, training=False) == 512   # round(2.0 * 4096 / 16)
    assert base.capacity(8) == 4                 # min_capacity wins
    assert base.replace(capacity_mode="k_scaled").capacity(4096) == 640  # ceil(2*1.25*4096/16)
    assert base.replace(capacity_mode="k_scaled").capacity(100) == 16    # ceil(15.625)
    assert base.replace(capacity_factor=0).capacity(4096) == 4096          # dropless: C = G
    assert base.replace(eval_capacity_factor=None).capacity(4096, training=False) == 4096
    assert base.replace(capacity_factor=0).is_dropless() and not base.is_dropless(training=False)
    # round half to even like jnp.round: 1.25 * 40 / 16 = 3.125 -> 3 then min 0; 2.5 -> 2
    assert base.replace(min_capacity=0).capacity(40) == 3
    assert base.replace(min_capacity=0, capacity_factor=1.0).capacity(40) == 2


def test_routing_vocabulary_and_capacity_have_one_definition():
    """config owns the vocabulary and the formula; routing uses the same objects, and a
    config's capacity is the routing formula at its fields (dropless: C = G in both)."""
    assert routing.capacity is capacity
    assert routing.SLOT_PRIORITIES is SLOT_PRIORITIES and routing.CAPACITY_MODES is CAPACITY_MODES
    for mode in CAPACITY_MODES:
        for cf in (None, 0, 0.5, 1.25, 2.0):
            cfg = get_preset("openmoe-base", capacity_mode=mode, capacity_factor=cf)
            for g in (8, 100, 4096):
                assert cfg.capacity(g) == capacity(g, 16, 2, cf, 4, mode)


# ---------------------------------------------------------------------- presets
def test_presets_valid_and_documented_sizes():
    assert set(PRESETS) >= {"toy", "mini", "small", "openmoe-base", "openmoe-8b",
                            "openmoe-34b"}
    for name in PRESETS:
        cfg = get_preset(name)
        cfg.validate()
        assert cfg.describe().count("\n") == 0
    toy = get_preset("toy")
    assert (toy.vocab_size, toy.d_model, toy.n_layers, toy.n_experts, toy.top_k) == \
        (258, 64, 2, 4, 2)
    mini = get_preset("mini")
    assert (mini.vocab_size, mini.d_model, mini.n_layers, mini.n_heads, mini.d_ff,
            mini.n_experts, mini.top_k, mini.moe_every, mini.max_seq_len) == \
        (258, 128, 4, 4, 256, 8, 2, 2, 128)
    assert mini.shared_ffn


def test_get_preset_copies_and_errors():
    a = get_preset("toy")
    a.top_k = 1  # mutate the copy
    assert PRESETS["toy"].top_k == 2
    assert get_preset("openmoe_base") == PRESETS["openmoe-base"]
    assert get_preset("toy", top_k=1).top_k == 1
    with pytest.raises(ValueError) as info:
        get_preset("huge")
    assert "toy" in str(info.value) and "openmoe-34b" in str(info.value)


# ---------------------------------------------------------------------- shapes and counts
def test_parameter_shapes_names_toy():
    shapes = parameter_shapes(get_preset("toy"))
    d, V, E, f = 64, 258, 4, 128
    expected = {"tok_emb.weight": (V, d)}
    for i in range(2):
        b = f"blocks.{i}"
        expected[f"{b}.attn_norm.weight"] = (d,)
        for w in ("wq", "wk", "wv"):
            expected[f"{b}.attn.{w}.weight"] = (d, d)
        expected[f"{b}.attn.wo.weight"] = (d, d)
        expected[f"{b}.ffn_norm.weight"] = (d,)
    for w, s in (("w_gate", (d, f)), ("w_up", (d, f)), ("w_down", (f, d))):
        expected[f"blocks.0.ffn.{w}.weight"] = s
        expected[f"blocks.1.shared_ffn.{w}.weight"] = s
    expected["blocks.1.moe.router.weight"] = (d, E)
    expected["blocks.1.moe.experts.w_gate"] = (E, d, f)
    expected["blocks.1.moe.experts.w_up"] = (E, d, f)
    expected["blocks.1.moe.experts.w_down"] = (E, f, d)
    expected["blocks.1.shared_norm.weight"] = (d,)
    expected["norm_f.weight"] = (d,)
    assert shapes == expected

    untied = parameter_shapes(get_preset("toy", tie_embeddings=False, shared_ffn=False))
    assert untied["lm_head.weight"] == (d, V)
    assert not any("shared" in k for k in untied)


def test_parameter_shapes_8b_attention_width():
    shapes = parameter_shapes(get_preset("openmoe-8b"))
    assert shapes["blocks.0.attn.wq.weight"] == (2048, 3072)
    assert shapes["blocks.0.attn.wo.weight"] == (3072, 2048)
    assert shapes["blocks.5.moe.experts.w_down"] == (32, 8192, 2048)
    assert "blocks.4.moe.router.weight" not in shapes


def test_count_toy_by_hand():
    c = count_parameters(get_preset("toy"))
    d, V, E, f = 64, 258, 4, 128
    ffn = 3 * d * f
    assert c["embedding"] == V * d
    assert c["lm_head"] == 0
    assert c["attention"] == 2 * 4 * d * d
    assert c["dense_ffn"] == ffn
    assert c["experts"] == E * ffn
    assert c["shared_ffn"] == ffn
    assert c["routers"] == d * E
    assert c["norms"] == (2 * 2 + 1 + 1) * d
    total = V * d + 8 * d * d + ffn * (1 + E + 1) + d * E + 6 * d
    assert c["total"] == total == 197_376
    assert c["active"] == total - (E - 2) * ffn
    assert c["total_blocks_only"] == total - V * d - d
    assert c["active_blocks_only"] == c["active"] - V * d - d


def test_mini_is_about_2_3m():
    d, V, f = 128, 258, 256
    ffn = 3 * d * f
    by_hand = V * d + 4 * 4 * d * d + 2 * ffn + 2 * (8 * ffn + ffn) + 2 * d * 8 \
        + (4 * 2 + 2 + 1) * d
    assert count_parameters(get_preset("mini"))["total"] == by_hand
    assert 2.2e6 < by_hand < 2.4e6


def test_openmoe_base_paper_count():
    # docs/openmoe-facts.md §13: paper dims (ff 3072, 3 matrices per SwiGLU) + one tied
    # embedding. FFNs: 9 dense + 3 x (1 shared + 16 experts) = 60 in total, 18 active.
    d, V, ff = 768, 256_384, 3072
    emb = V * d                        # 196,902,912
    attn = 12 * 4 * d * d              # 12 blocks x (q, k, v, o), 12 heads x 64 = 768
    ffn = 3 * d * ff                   # 7,077,888 per SwiGLU
    paper_total = emb + attn + 60 * ffn
    paper_active = emb + attn + 18 * ffn
    assert abs(paper_total - 649.9e6) / 649.9e6 < 1e-3
    assert abs(paper_active - 352.6e6) / 352.6e6 < 1e-3

    c = count_parameters(get_preset("openmoe-base"))
    assert abs(c["total"] - 649.9e6) / 649.9e6 < 0.005
    assert abs(c["active"] - 352.6e6) / 352.6e6 < 0.005
    # exactly: the paper formula plus routers (3 x d x 16) and norms (2 per block, 3 shared,
    # 1 final)
    extra = 3 * d * 16 + (12 * 2 + 3 + 1) * d
    assert c["total"] == paper_total + extra
    assert c["active"] == paper_active + extra
    assert c["embedding"] == emb and c["lm_head"] == 0
    assert c["experts"] == 3 * 16 * ffn


def test_openmoe_base_code_count_by_the_original_rule():
    """openmoe-base-code follows the original code (docs/openmoe-facts.md §1, §4, §13):
    FFN width 2048 with 4 d ff weights per FFN (wi_0 [d, 2ff], wi_1 [d, ff], wo [ff, d]),
    9 dense + 3 x (1 shared + 16 experts) = 60 FFNs (18 active), attention 4 d^2 per block,
    an untied head, 3 routers d x 16 and 2 norms per block + 3 shared + 1 final."""
    d, V, ff = 768, 256_384, 2048
    attn, ffn = 12 * 4 * d * d, 4 * d * ff                 # ffn = 6,291,456
    assert (attn + 60 * ffn, attn + 18 * ffn) == (405_798_912, 141_557_760)   # facts §13
    extra = 3 * d * 16 + (12 * 2 + 3 + 1) * d
    cfg = get_preset("openmoe-base-code")
    assert (cfg.ffn_kind, cfg.tie_embeddings, cfg.d_ff, cfg.init, cfg.logit_z_loss_coef) == \
        ("openmoe", False, 2048, "openmoe", 1e-4)
    c = count_parameters(cfg)
    assert c["total"] == 2 * V * d + attn + 60 * ffn + extra == 799_663_104
    assert c["active"] == 2 * V * d + attn + 18 * ffn + extra == 535_421_952
    assert c["experts"] == 3 * 16 * ffn and c["lm_head"] == V * d
    # the paper's Table 11 active counts: 142M without embedding, 339M with one
    assert round((attn + 18 * ffn) / 1e6) == 142 and round((V * d + attn + 18 * ffn) / 1e6) == 338
    text = params_command("openmoe-base-code", {})
    assert "141,557,760" in text and "338,460,672" in text and "paper Table 11" in text
    assert "4*d*ff per FFN" in text
    shapes = parameter_shapes(cfg)
    assert shapes["blocks.0.ffn.wi_0.weight"] == (d, 2 * ff)
    assert shapes["blocks.3.moe.experts.wi_0"] == (16, d, 2 * ff)
    assert shapes["blocks.3.moe.experts.wo"] == (16, ff, d)
    assert shapes["blocks.3.shared_ffn.wi_1.weight"] == (d, ff)


def test_openmoe_34b_router_z_loss_and_group_size():
    """OM-xl:25-26 (docs/openmoe-facts.md §1, §8): router z-loss 1e-3, GROUP_SIZE 8192."""
    cfg = get_preset("openmoe-34b")
    assert (cfg.z_loss_coef, cfg.group_size) == (1e-3, 8192)
    assert cfg.capacity(8192) == 320                       # round(1.25 x 8192 / 32)
    for name in ("toy", "mini", "small", "openmoe-base", "openmoe-8b"):   # unchanged presets
        p = get_preset(name)
        assert (p.ffn_kind, p.init, p.logit_z_loss_coef, p.z_loss_coef) == ("swiglu", "normal", 0.0, 1e-4)


def test_big_presets_count_instantly():
    t0 = time.perf_counter()
    c8 = count_parameters(get_preset("openmoe-8b"))
    c34 = count_parameters(get_preset("openmoe-34b"))
    format_params_table(get_preset("openmoe-34b"))
    assert time.perf_counter() - t0 < 1.0
    # 34B by hand: 32 blocks, attention 3 x d x 3072 + 3072 x d, 8 MoE blocks of 32 experts
    d, V, A, ff = 3072, 256_384, 24 * 128, 12288
    ffn = 3 * d * ff
    total = V * d + 32 * 4 * d * A + 24 * ffn + 8 * (32 * ffn + ffn) + 8 * d * 32 \
        + (32 * 2 + 8 + 1) * d
    assert c34["total"] == total
    assert 30e9 < c34["total"] < 40e9
    assert c34["active"] == total - 8 * 30 * ffn
    assert 5e9 < c8["total"] < 12e9


def test_memory_bytes():
    cfg = get_preset("toy")
    m = memory_bytes(cfg)
    assert m["weights"] == 197_376 * 4 == m["grads"]
    assert m["adamw"] == 2 * m["weights"]
    # Adafactor factored second moment, by hand (rows + cols per matrix, vectors in full):
    # emb 258+64; block 0: 2 norms 128, q/k/v/o 4*128, ffn 3*192;
    # block 1: 3 norms 192, q/k/v/o 512, router 64+4, experts 3*4*(64+128), shared 3*192;
    # final norm 64.
    n = (258 + 64) + (128 + 512 + 576) + (192 + 512 + 68 + 2304 + 576) + 64
    assert m["adafactor"] == 4 * n
    assert memory_bytes(cfg, "float64")["weights"] == 197_376 * 8
    assert memory_bytes(cfg.replace(dtype="float64"))["weights"] == 197_376 * 8
    with pytest.raises(ValueError, match="dtype"):
        memory_bytes(cfg, "bfloat16")


# ---------------------------------------------------------------------- table and CLI glue
def test_params_table_openmoe_base():
    text = params_command("openmoe-base", {})
    assert "649,946,112" in text          # = paper 649.9M + routers + norms
    assert "active" in text and "top-2 of 16 experts" in text
    assert "GiB" in text and "Adafactor" in text and "AdamW" in text
    assert "blocks only" in text


def test_params_command_string_overrides():
    text = params_command("toy", {"top_k": "1", "capacity_factor": "none",
                                  "tie_embeddings": "false"})
    assert "top-1" in text and "LM head" in text and "dropless" in text
    with pytest.raises(ValueError, match="top_k"):
        params_command("toy", {"top_k": "two"})
    with pytest.raises(ValueError, match="did you mean 'top_k'"):
        params_command("toy", {"topk": "1"})


def test_parse_overrides():
    assert parse_overrides(["top_k=1", "capacity_factor=none", "renormalize=yes",
                            "slot_priority=random", "aux_loss_coef=0"]) == \
        {"top_k": 1, "capacity_factor": None, "renormalize": True,
         "slot_priority": "random", "aux_loss_coef": 0.0}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["top_k"])
    with pytest.raises(ValueError, match="renormalize"):
        parse_overrides(["renormalize=maybe"])
