"""Routing analysis: every measure on synthetic routing with a known answer, the plots,
the JSON, and a smoke run of the command on a tiny untrained checkpoint."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from tinymoe import analysis as A
from tinymoe import routing
from tinymoe.jsonio import json_ready


def _sd(p: float, n: int) -> float:
    """Standard deviation of a share estimated from n independent draws."""
    return math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------ specialization
def _tokens(n: int, vocab: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=n)
    pos = np.arange(n) % seq
    window = np.arange(n) // seq
    return rng, ids, pos, window % 2 == 0


def test_routing_by_token_id_is_fully_predictable_and_maximally_specialised():
    E, V = 8, 50
    rng, ids, pos, fit = _tokens(40_000, V, 64)
    table = rng.integers(0, E, size=V)              # each id has its own expert
    experts = table[ids]
    p = A.specialization_predictors(ids, pos, experts, E, fit)
    assert p["token_id"] == 1.0 and p["token_id_skill"] == 1.0
    assert p["token_id_coverage"] == 1.0
    assert p["chance"] == 1 / E
    # the paper's std measure: a one-hot distribution over E experts is the maximum
    one_hot_std = np.std(np.eye(E)[0])
    s = A.routing_std(ids, experts, E, min_count=16)
    assert s["mean_std"] == pytest.approx(one_hot_std, abs=1e-12)
    assert s["max_std"] == pytest.approx(one_hot_std, abs=1e-12)
    assert s["relative"] == pytest.approx(1.0)
    assert s["n_keys"] == V and s["token_share"] == 1.0
    # shuffling the experts across tokens destroys it
    sh = A.shuffled_routing_std(ids, experts, E, min_count=16)
    assert sh["mean_std"] < 0.3 * one_hot_std


def test_router_that_ignores_the_id_scores_chance():
    E, n = 8, 40_000
    rng, ids, pos, fit = _tokens(n, 50, 64, seed=1)
    experts = rng.integers(0, E, size=(n, 2))       # [N, k], the id plays no role
    p = A.specialization_predictors(ids, pos, experts, E, fit)
    tol = 4 * _sd(1 / E, int((~fit).sum()))
    assert abs(p["token_id"] - 1 / E) < tol, p
    assert abs(p["position"] - 1 / E) < tol, p
    assert p["sampling_sd"] == pytest.approx(_sd(1 / E, int((~fit).sum())))
    # std of ids with ~800 random draws each: only sampling noise, far below the maximum
    s = A.routing_std(ids, experts[:, 0], E, min_count=16)
    assert s["mean_std"] < 0.1 * s["max_std"]


def test_position_only_routing():
    E, n, T = 8, 32_768, 64
    rng, ids, pos, fit = _tokens(n, 300, T, seed=2)
    experts = (pos * 5 + 3) % E                     # a function of the position alone
    p = A.specialization_predictors(ids, pos, experts, E, fit)
    assert p["position"] == 1.0
    assert p["token_id"] < 1 / E + 4 * _sd(1 / E, int((~fit).sum())) + 0.05
    assert A.routing_std(pos, experts, E)["relative"] == pytest.approx(1.0)
    assert A.routing_std(ids, experts, E)["relative"] < 0.5


def test_majority_class_is_the_honest_baseline_for_unbalanced_routing():
    E, n = 4, 40_000
    rng, ids, pos, fit = _tokens(n, 20, 64, seed=3)
    experts = rng.choice(E, size=n, p=[0.6, 0.2, 0.1, 0.1])  # unbalanced, id-independent
    p = A.specialization_predictors(ids, pos, experts, E, fit)
    tol = 4 * _sd(0.6, int((~fit).sum()))
    assert abs(p["majority_class"] - 0.6) < tol
    assert abs(p["token_id"] - 0.6) < tol           # the id adds nothing beyond the majority
    assert abs(p["token_id_skill"]) < 3 * tol


def test_predictor_falls_back_to_most_used_expert_for_unseen_ids():
    fit_ids = np.array([1, 1, 2, 2, 2])
    fit_e = np.array([3, 3, 0, 0, 1])
    # id 9 never seen in the fit half: predicted as the fit half's most used expert (0)
    r = A.predictor_accuracy(fit_ids, fit_e, np.array([1, 2, 9, 9]), np.array([3, 0, 0, 2]), 4)
    assert r["accuracy"] == 0.75
    assert r["coverage"] == 0.5
    assert r["n_keys"] == 2


def test_majority_ties_go_to_lower_expert():
    uniq, maj = A.majority_expert(np.array([5, 5, 7]), np.array([2, 1, 3]), 4)
    assert uniq.tolist() == [5, 7] and maj.tolist() == [1, 3]


def test_std_measure_respects_min_count_and_top_k_maximum():
    E = 4
    ids = np.array([0] * 10 + [1] * 3)
    ex = np.array([2] * 10 + [0, 1, 2])
    s = A.routing_std(ids, ex, E, min_count=5)      # only id 0 qualifies (one-hot)
    assert s["n_keys"] == 1 and s["token_share"] == pytest.approx(10 / 13)
    assert s["mean_std"] == pytest.approx(np.std([0, 0, 1, 0]))
    # top-2: always the same two experts -> d = [0.5, 0.5, 0, 0], the top-2 maximum
    both = np.tile([1, 3], (10, 1))
    s2 = A.routing_std(np.zeros(10, int), both, E, min_count=5)
    assert s2["mean_std"] == pytest.approx(np.std([0.5, 0.5, 0, 0]))
    assert s2["relative"] == pytest.approx(1.0)
    empty = A.routing_std(ids, ex, E, min_count=100)
    assert empty["n_keys"] == 0 and math.isnan(empty["mean_std"])


def test_expert_share_by_domain():
    experts = np.array([[0, 1], [0, 2], [3, 1], [3, 3 - 1]])   # [N=4, k=2]
    domain = np.array([0, 0, 1, 1])
    share = A.expert_share_by_domain(experts, domain, n_experts=4, n_domains=3)
    np.testing.assert_allclose(share[0], [0.5, 0.25, 0.25, 0.0])
    np.testing.assert_allclose(share[1], [0.0, 0.25, 0.25, 0.5])
    assert np.isnan(share[2]).all()                 # a domain without tokens


def test_top_tokens_frequent_and_specific():
    # id 7 always -> expert 1 (10x); id 3 -> expert 1 (20x) and expert 0 (20x); id 5 -> 0 (60x)
    ids = np.array([7] * 10 + [3] * 40 + [5] * 60)
    ex = np.array([1] * 10 + [1] * 20 + [0] * 20 + [0] * 60)
    top = A.top_tokens_per_expert(ids, ex, n_experts=2, n_top=3, min_count=5)
    e1 = top[1]
    assert e1["n_tokens"] == 30
    assert [t["id"] for t in e1["frequent"]] == [3, 7]
    assert e1["frequent"][0]["share"] == pytest.approx(20 / 30)
    assert e1["specific"][0]["id"] == 7
    assert e1["specific"][0]["p"] == 1.0
    assert e1["specific"][0]["lift"] == pytest.approx(1.0 / (30 / 110))
    assert [t["id"] for t in top[0]["frequent"]] == [5, 3]


def test_token_label():
    from tinymoe.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    assert A.token_label(tok, ord(" ")) == "␣"
    assert A.token_label(tok, ord("\n")) == "\\n"
    assert A.token_label(tok, ord("a")) == "a"
    assert A.token_label(tok, 0xE2) == "\\xe2"
    assert A.token_label(tok, tok.bos_id) == "<bos>"


# ------------------------------------------------------------------ early routing
def test_identical_snapshot_agrees_fully_and_random_snapshot_at_chance():
    E, n = 8, 30_000
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 3000, size=n)
    final = rng.integers(0, E, size=3000)[ids]      # a function of the id
    same = A.majority_agreement(ids, final, final, E)
    assert same["ids"] == same["occurrences"] == same["tokens"] == 1.0
    rand = A.majority_agreement(ids, rng.integers(0, E, size=n), final, E)
    tol = 4 * _sd(1 / E, rand["n_ids"])
    assert abs(rand["ids"] - 1 / E) < tol, rand
    assert abs(rand["tokens"] - 1 / E) < 4 * _sd(1 / E, n)


def test_early_routing_over_snapshots():
    E, V, n = 4, 500, 20_000
    rng = np.random.default_rng(5)
    ids = rng.integers(0, V, size=n)
    table = rng.integers(0, E, size=V)
    snaps = []
    for step, frac in [(100, 1.0), (50, 0.5), (10, 0.9)]:   # unsorted on purpose
        t = table.copy()
        if step != 100:
            moved = rng.random(V) < frac              # these ids move to another expert
            t[moved] = (t[moved] + 1) % E
        snaps.append({"step": step, "token_ids": ids, "experts": {3: t[ids][:, None]}})
    out = A.early_routing(snaps, E)
    assert out["steps"] == [10, 50, 100] and out["final_step"] == 100
    (layer,) = out["layers"]
    assert layer["layer"] == 3
    assert layer["ids"][-1] == layer["occurrences"][-1] == 1.0
    assert abs(layer["ids"][0] - 0.1) < 4 * _sd(0.1, V)
    assert abs(layer["ids"][1] - 0.5) < 4 * _sd(0.5, V)
    assert layer["ids"][0] < layer["ids"][1] < layer["ids"][2]


def test_load_snapshots_reads_step_files(tmp_path):
    ids = np.arange(12) % 5
    for step in (20, 10):
        np.savez(tmp_path / f"step_{step}.npz", token_ids=ids.reshape(3, 4),
                 experts_1=(ids * step % 4).reshape(3, 4), experts_3=np.zeros((3, 4), int))
    (tmp_path / "notes.txt").write_text("not a snapshot")
    snaps = A.load_snapshots(tmp_path)
    assert [s["step"] for s in snaps] == [10, 20]
    assert sorted(snaps[0]["experts"]) == [1, 3]
    assert snaps[1]["experts"][1][:, 0].tolist() == (ids * 20 % 4).tolist()


# ------------------------------------------------------------------ drops
def _planted_late_overload(n_seqs: int, G: int, E: int, p: int) -> np.ndarray:
    """Logits [n_seqs*G, E]: before position p token t prefers expert t % E (balanced);
    from position p on every token prefers expert 0."""
    t = np.tile(np.arange(G), n_seqs)                  # [N]
    pref = np.where(t < p, t % E, 0)                   # [N]
    logits = np.zeros((t.size, E), dtype=np.float32)
    logits[np.arange(t.size), pref] = 5.0
    return logits


def test_planted_late_overload_drops_only_after_the_overload():
    n_seqs, G, E, p = 4, 64, 4, 40
    logits = _planted_late_overload(n_seqs, G, E, p)
    res = routing.route(logits, top_k=1, capacity_factor=1.0, group_size=G)
    pos = A.position_in_group(n_seqs, G, None)
    assert pos.tolist() == np.tile(np.arange(G), n_seqs).tolist()
    dropped_pos = pos[~res.kept[:, 0]]
    assert dropped_pos.size > 0 and dropped_pos.min() >= p
    curve = A.drop_by_position(res.kept, pos, G, n_bins=8)      # bins of 8 positions
    assert curve["bin_start"] == list(range(0, 64, 8)) and curve["bin_end"][-1] == 64
    assert all(r == 0 for r in curve["drop_rate"][: p // 8])
    # capacity 16; expert 0 gets 10 tokens before p, so 6 more after p: 24 - 6 = 18 dropped
    assert curve["overall"] == pytest.approx(18 / 64)
    assert curve["drop_rate"][-1] == 1.0
    q = A.drop_quarters(res.kept, pos, G)
    assert q["first_quarter"] == 0 and q["last_quarter"] == 1.0
    free = routing.route(logits, top_k=1, capacity_factor=0, group_size=G)  # dropless
    assert A.drop_by_position(free.kept, pos, G)["overall"] == 0.0
    # probability priority: late tokens growing surer with position keep their slots and
    # the drops move to the least sure (earliest) overloaded tokens
    late_sure = logits.copy()
    late = pos >= p
    late_sure[late, 0] = 5.0 + 0.1 * (pos[late] - p)
    prob = routing.route(late_sure, top_k=1, capacity_factor=1.0, group_size=G,
                         priority="probability")
    curve = A.drop_by_position(prob.kept, pos, G, n_bins=8)
    assert curve["overall"] == pytest.approx(18 / 64)
    assert curve["drop_rate"][-1] == 0.0 and curve["drop_rate"][-2] == 0.0


def test_position_in_group_with_group_size():
    assert A.position_in_group(2, 4, 8).tolist() == list(range(8))
    assert A.position_in_group(2, 4, 2).tolist() == [0, 1] * 4
    assert A.position_in_group(2, 4, 100).tolist() == list(range(8))   # one group of B*T


def test_drop_by_position_checks_inputs():
    with pytest.raises(ValueError, match="positions"):
        A.drop_by_position(np.ones((3, 1), bool), np.array([0, 1, 5]), 4)
    empty = A.drop_by_position(np.ones((2, 1), bool), np.array([0, 0]), 4, n_bins=4)
    assert empty["drop_rate"][0] == 0 and all(math.isnan(v) for v in empty["drop_rate"][1:])


# ------------------------------------------------------------------ model wrappers
def _toy_model(seed: int = 0, **overrides):
    from tinymoe.config import get_preset
    from tinymoe.nn.model import OpenMoE

    return OpenMoE(get_preset("toy", **overrides), seed=seed)


def test_collect_routing_matches_the_model_and_restores_settings():
    from tinymoe import no_grad

    model = _toy_model()
    cfg = model.cfg
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, size=(5, cfg.max_seq_len + 1))
    tr = A.collect_routing(model, windows, np.array([0, 1, 0, 1, 0]), batch_size=2,
                           domain_names=["a", "b"], eval_capacity_factor=1.25)
    assert cfg.eval_capacity_factor == 2.0 and model.cfg is cfg    # restored
    T = cfg.max_seq_len
    assert tr.n_tokens == 5 * T and tr.layers == cfg.moe_layers
    assert tr.group_len == T and tr.group_pos.max() == T - 1
    assert tr.domain.tolist() == np.repeat([0, 1, 0, 1, 0], T).tolist()
    model.eval()
    cfg.eval_capacity_factor = 1.25
    with no_grad():
        out = model(windows[:2, :-1], windows[:2, 1:])
    cfg.eval_capacity_factor = 2.0
    np.testing.assert_array_equal(tr.expert_index[0][: 2 * T], out.routing[0].expert_index)
    np.testing.assert_array_equal(tr.kept[0][: 2 * T], out.routing[0].kept)
    free = A.collect_routing(model, windows, None, batch_size=2, eval_capacity_factor=0.0)
    assert free.all_kept().all()
    # per-token CE: -log softmax(logits)[target], float64 from the model's logits
    with no_grad(), A.routing_settings(model, eval_capacity_factor=0.0):
        out0 = model(windows[:1, :-1], windows[:1, 1:])                   # dropless, as `free`
    z = np.asarray(out0.logits.data, dtype=np.float64)[0]                  # [T, V]
    ref = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(T), windows[0, 1:]]
    # float32 logits of a batch of 2 there, of 1 here: BLAS may sum in another order, so
    # agreement to float32 rounding over the d-long dot products (~ sqrt(d) * eps32 ~ 1e-6)
    np.testing.assert_allclose(free.token_ce[:T], ref, rtol=1e-5)
    assert free.token_ce.shape == (5 * T,)
    assert abs(free.token_ce.mean() - free.ce) < 1e-5 * free.ce      # float32 mean over 5T tokens
    with pytest.raises(ValueError, match="not a routing setting"):
        with A.routing_settings(model, d_model=3):
            pass


# ------------------------------------------------------------------ plots and report
def _id_router(n_windows: int, seq: int, E: int, noise: float, seed: int):
    """Tokens routed by a fixed id -> expert table, a ``noise`` share re-drawn at random."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 30, size=n_windows * seq)
    table = np.arange(30) % E
    ex = np.where(rng.random(ids.size) < noise, rng.integers(0, E, ids.size), table[ids])
    return ids, np.arange(ids.size) % seq, ex, np.arange(ids.size) // seq


def _synthetic_report():
    """A report whose sections hold real statistics of synthetic routing with known
    answers: a trained router that routes by id (10% noise) against an untrained one
    (70% noise); snapshots that agree with the final one on 40% / 60% / 97% of the
    probe tokens; drops from random routing (in_distribution) and from a router that
    crowds the end of each group (held_out_domain)."""
    from tinymoe.analysis import baselines as S

    E, G, k = 4, 32, 2
    ids_, pos_, ex_, win_ = _id_router(40, 32, E, 0.1, 0)
    st = S.specialization_statistics(ids_, pos_, ex_, E, win_, n_boot=200)
    ids_, pos_, ex_, win_ = _id_router(40, 32, E, 0.7, 1)
    ist = S.specialization_statistics(ids_, pos_, ex_, E, win_, n_boot=200)
    layer = {
        "layer": 1,
        "predictors": {"token_id": 0.8, "position": 0.3, "majority_class": 0.3, "chance": 0.25,
                       "sampling_sd": 0.01, "token_id_coverage": 1.0, "n_fit": 10, "n_score": 10},
        "statistics": st,
        "init": {"predictors": {"token_id": 0.6, "position": 0.3, "majority_class": 0.3,
                                "chance": 0.25, "sampling_sd": 0.01, "token_id_coverage": 1.0},
                 "statistics": ist,
                 "std_token_id": {"mean_std": 0.2, "n_keys": 3, "token_share": 1.0},
                 "std_position": {"mean_std": 0.05, "n_keys": 4, "token_share": 1.0}},
        "per_domain": {"a": {"token_id": 0.8, "position": 0.3, "majority_class": 0.3,
                             "n_score": 5}},
        "std": {k_: {"mean_std": v, "max_std": A.max_routing_std(E), "relative": v / 0.433,
                     "n_keys": 3, "token_share": 1.0}
                for k_, v in [("token_id", 0.3), ("token_id_shuffled", 0.05), ("position", 0.02),
                              ("position_shuffled", 0.02), ("token_id_topk", 0.2)]},
        "domain_share": [[0.4, 0.2, 0.2, 0.2], [0.1, 0.1, 0.1, 0.7]],
        "top_tokens": [{"expert": e, "n_tokens": 5, "frequent": [{"id": 97, "text": "a",
                                                                  "count": 3, "share": 0.6}],
                        "specific": [{"id": 97, "text": "a", "count": 3, "p": 1.0,
                                      "lift": 4.0}]} for e in range(E)],
    }
    # snapshots: 32 probe sequences of 16 tokens; step s agrees on a prefix of sequences
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 30, size=(32, 16))
    final = (ids % E).reshape(-1, 1)
    snaps = []
    for step, agree in ((0, 0.0), (1, 0.4), (2, 0.6), (4, 1.0)):
        ex = final.copy().reshape(32, 16)
        ex[int(round(agree * 32)):] = (ex[int(round(agree * 32)):] + 1) % E
        snaps.append({"step": step, "token_ids": ids.reshape(-1),
                      "experts": {1: ex.reshape(-1, 1)},
                      "sequence": np.repeat(np.arange(32), 16)})
    early = A.early_routing_report(snaps, E, loss_curve=[(0, 3.0), (2, 2.0), (4, 1.5)],
                                   n_boot=200, n_splits=10)

    def curve(kept, name, setting):
        pos = np.arange(kept.shape[0]) % G
        c = A.drop_by_position(kept, pos, G, 2)
        q = A.drop_quarters(kept, pos, G)
        st_ = S.drop_statistics(kept, pos, G, k, n_boot=200)
        return {**c, "first_quarter": q["first_quarter"], "last_quarter": q["last_quarter"],
                "first_choice": {"overall": 0.1, "first_quarter": 0.0, "last_quarter": 0.2},
                "ce": 2.0, "per_layer": [], "stats": st_, "n_groups": st_["n_units"],
                "baseline": S.random_drop_baseline(st_["n_units"], 1, G, E, k, 1.25,
                                                   n_boot=200, seed=5),
                "dataset": name, "setting": setting, "label": setting, "model": "main",
                "group_len": G}

    rnd = S.simulate_random_routing(64, G, E, k, 1.25, seed=1)[0]
    z = rng.standard_normal((64 * G, E))
    z[(np.arange(64 * G) % G >= G // 2) & (rng.random(64 * G) < 0.6), 0] += 6
    crowd = np.asarray(routing.route(z, k, 1.25, G).kept)
    curves = [curve(rnd, "in_distribution", s) for s in ("train_cf", "eval_cf")]
    curves += [curve(crowd, "held_out_domain", s) for s in ("train_cf", "eval_cf")]
    free = {**curves[0], "setting": "dropless", "label": "dropless"}
    free.pop("baseline")
    report = {
        "config": {"describe": "toy", "n_experts": E},
        "data": {"source": "synthetic", "domains": ["a", "b"], "excluded_in_training": ["b"],
                 "val_tokens": {"a": 10, "b": 10}},
        "specialization": {"n_tokens": 20, "n_experts": E, "top_k": 2, "min_count": 2,
                           "domains": ["a", "b"], "excluded": ["b"], "ce": 2.0,
                           "capacity_factor": 2.0, "layers": [layer]},
        "early_routing": {"available": True, "note": "", **early},
        "drops": {"n_positions": G, "n_bins": 2, "larger_cf": 4.0, "paper_group": None,
                  "datasets": [{"name": "in_distribution", "title": "in", "n_tokens": 64 * G},
                               {"name": "multi_turn", "title": "mt", "skipped": "no"},
                               {"name": "held_out_domain", "title": "held", "n_tokens": 64 * G}],
                  "curves": curves + [free], "effects": []},
    }
    report["summary"] = A._summary(report)
    report["findings"] = A.findings_table(report)
    return report


def test_summary_rules():
    rep = _synthetic_report()
    summ = rep["summary"]
    sp = summ["specialization"]
    assert sp["reproduced"] is True and sp["training_adds"] is True
    # first snapshot at >= 25% of 4 steps is step 1, where 40% of probe tokens agree
    er = summ["early_routing"]
    assert er["reproduced"] is False and er["step"] == 1
    assert er["agreement_tokens"][0]["estimate"] == 13 / 32      # round(0.4 * 32) sequences
    assert er["learned_since_first"] == [True]
    assert er["ceiling_occurrences"] == [1.0] and er["probe_ok"] == [True]
    only_ends = {**rep["early_routing"], "steps": [0, 4]}
    assert A._summary({**rep, "early_routing": only_ends})["early_routing"]["reproduced"] is None
    dt = summ["drop_towards_the_end"]
    # random routing rises towards the end too, but not more than the random baseline
    assert dt["reproduced_at_train_cf"] == ["held_out_domain"]
    assert dt["reproduced_at_eval_cf"] == ["held_out_domain"]
    rnd = dt["datasets"][0]["train_cf"]
    assert rnd["last_quarter"] > 1.5 * rnd["first_quarter"] and rnd["towards_end"] is False
    # the findings table: one row per (finding, measure, baseline)
    rows = rep["findings"]
    verdicts = {(r["finding"], r["baseline_name"]): r["verdict"] for r in rows
                if "train_cf" not in r["measure"]}
    assert verdicts[("context-independent specialization", "shuffled labels")] is True
    assert verdicts[("what training adds to specialization", "untrained router")] is True
    assert verdicts[("early routing learning", "ceiling (final vs itself)")] is False
    for r in rows:
        assert {"finding", "measure", "effect", "baseline_name", "baseline", "verdict",
                "rule"} <= set(r)


def test_early_routing_verdict_passes_when_routing_is_fixed_early():
    rep = _synthetic_report()
    layers = rep["early_routing"]["layers"]
    fixed = [{**L, "tokens_interval": [L["tokens_interval"][0]] + [
        {"estimate": 0.97, "low": 0.95, "high": 0.99, "level": 0.95}] * 2
        + [L["tokens_interval"][-1]]} for L in layers]
    summ = A._summary({**rep, "early_routing": {**rep["early_routing"], "layers": fixed}})
    assert summ["early_routing"]["reproduced"] is True
    unsure = [{**L, "tokens_interval": [L["tokens_interval"][0]] + [
        {"estimate": 0.9, "low": 0.85, "high": 0.95, "level": 0.95}] * 2
        + [L["tokens_interval"][-1]]} for L in layers]
    summ = A._summary({**rep, "early_routing": {**rep["early_routing"], "layers": unsure}})
    assert summ["early_routing"]["reproduced"] is None


def test_plots_write_png_files(tmp_path):
    rep = _synthetic_report()
    paths = [A.plot_specialization(rep["specialization"], tmp_path / "s.png"),
             A.plot_domain_share(rep["specialization"], tmp_path / "d.png"),
             A.plot_early_routing(rep["early_routing"], tmp_path / "e.png"),
             A.plot_drop_vs_position(rep["drops"], tmp_path / "sub" / "p.png")]
    for p in paths:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p


def test_report_text_comes_from_its_json():
    rep = _synthetic_report()
    text = A.format_report(rep)
    again = A.format_report(json.loads(json.dumps(json_ready(rep), allow_nan=False)))
    assert text == again
    assert "80.0%" in text and "REPRODUCED" in text and "NOT reproduced" in text
    assert "== Findings: effect against baseline" in text
    md = A.format_markdown(rep)
    assert md.count("\n| ") == len(rep["findings"]) + 1            # header + one row each
    assert "| PASS |" in md and "| fail |" in md
    assert A._json_ready is json_ready             # the name it had inside analysis.py


# ------------------------------------------------------------------ the command, end to end
def _toy_checkpoint(tmp_path, name: str = "run", seed: int = 0, **overrides):
    """A checkpoint of an untrained toy model (``seed``) in ``tmp_path/name``, routing
    snapshots in the trainer's format, and a data folder of three domains."""
    from tinymoe.checkpoint import save_checkpoint
    from tinymoe.tokenizer import ByteTokenizer

    model = _toy_model(seed, **overrides)
    run_dir = tmp_path / name
    save_checkpoint(run_dir / "checkpoint.npz", model_config=model.cfg,
                    model_state=model.state_dict(), tokenizer=ByteTokenizer(), step=30,
                    train_config={"exclude_domains": ["digits"], "data": None})
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "and"]
    (data / "words.txt").write_text(" ".join(rng.choice(words, 6000)) + "\n")
    (data / "code.txt").write_text("".join(f"x{i} = f(y[{i}])\n" for i in range(3000)))
    (data / "digits.txt").write_text("".join(f"{a}+{a}={2 * a}\n"
                                             for a in rng.integers(0, 999, 4000)))
    snaps = run_dir / "snapshots"
    snaps.mkdir()
    ids = rng.integers(0, 256, size=(4, 64))                       # probe batch [N, T]
    for step in (10, 20, 30):                                       # tinymoe.train's format
        first = (ids + (step < 30)) % model.cfg.n_experts          # [N, T]
        idx = np.stack([first, (first + 1) % model.cfg.n_experts], axis=-1)[None]  # [1, N, T, 2]
        np.savez(snaps / f"step_{step}.npz", step=np.int64(step), tokens=ids,
                 layers=np.array([1]), expert_index=idx.astype(np.int16),
                 top1=idx[..., 0].astype(np.int16), kept=np.ones(idx.shape, bool))
    return run_dir, data


def test_analyze_command_end_to_end(tmp_path, capsys):
    from tinymoe.data import load_corpus
    from tinymoe.tokenizer import ByteTokenizer

    run_dir, data = _toy_checkpoint(tmp_path)
    other_dir, _ = _toy_checkpoint(tmp_path, "other", seed=1)     # a different router
    parser = argparse.ArgumentParser()
    A.add_arguments(parser)
    args = parser.parse_args([str(run_dir), "--data", str(data), "--max-tokens", "1024",
                              "--drop-tokens", "512", "--min-count", "4", "--bins", "8",
                              "--compare", str(other_dir / "checkpoint.npz")])
    assert A.run(args) == 0
    printed = capsys.readouterr().out
    out = run_dir / "analysis"
    rep = json.loads((out / "analysis.json").read_text())
    for name in ("specialization", "domain_share", "early_routing", "drop_vs_position"):
        p = out / f"{name}.png"
        assert p.stat().st_size > 5000 and rep["figures"][name] == str(p)
    assert format_tail(printed) == A.format_report(rep)       # every printed number in the JSON
    assert rep["data"]["excluded_in_training"] == ["digits"]
    md = (out / "analysis.md").read_text()
    assert md == A.format_markdown(rep) and "| finding | measure |" in md
    names = [d["name"] for d in rep["drops"]["datasets"] if not d.get("skipped")]
    assert names == ["in_distribution", "multi_turn", "held_out_domain"]
    settings = {c["setting"] for c in rep["drops"]["curves"]}
    assert settings == {"train_cf", "eval_cf", "paper_group", "probability", "larger_cf",
                        "dropless", "compare_train_cf", "compare_eval_cf"}
    T = rep["config"]["seq_len"]
    for c in rep["drops"]["curves"]:
        # several sequences per group in the paper-like run (here all 8 windows of a batch)
        assert (c["group_len"] == 8 * T) == (c["setting"] == "paper_group"), c["setting"]
        assert ("baseline" in c) == (c["setting"] != "dropless"), c["setting"]
        if "baseline" in c:
            assert c["baseline"]["group_size"] == c["group_len"]
            assert c["baseline"]["n_units"] == c["stats"]["n_units"] == c["n_groups"]
    for ds in rep["drops"]["datasets"]:
        if not ds.get("skipped"):
            assert set(ds["ce_cost"]) == {"train_cf", "eval_cf", "paper_group"}
    assert [(e["dataset"], e["against"]) for e in rep["drops"]["effects"]] == [
        ("multi_turn", "in_distribution"), ("held_out_domain", "in_distribution"),
        ("held_out_domain", "multi_turn")]
    assert rep["findings"] and all(r["verdict"] in (True, False, None) for r in rep["findings"])
    by = {(c["dataset"], c["setting"]): c for c in rep["drops"]["curves"]}
    # the same analysis called directly on each model: the command's main curves come
    # from the main checkpoint, its compare curves from the --compare one
    kw = dict(excluded=["digits"], max_tokens=1024, drop_tokens=512, min_count=4, n_bins=8)
    corpus = load_corpus(data)
    direct = {name: {(c["dataset"], c["setting"]): c for c in json_ready(
        A.analyze(_toy_model(seed), ByteTokenizer(), corpus, **kw))["drops"]["curves"]}
        for name, seed in (("main", 0), ("other", 1))}
    for ds in names:
        assert by[(ds, "dropless")]["overall"] == 0.0
        assert by[(ds, "compare_eval_cf")]["label"].startswith("compare other model: ")
        for s in ("train_cf", "eval_cf"):
            main, comp = by[(ds, s)], by[(ds, "compare_" + s)]
            assert main["drop_rate"] == direct["main"][(ds, s)]["drop_rate"], (ds, s)
            assert main["ce"] == direct["main"][(ds, s)]["ce"], (ds, s)
            assert comp["drop_rate"] == direct["other"][(ds, s)]["drop_rate"], (ds, s)
            assert comp["ce"] == direct["other"][(ds, s)]["ce"], (ds, s)
            # a differently seeded router: other losses and other drops (both untrained
            # toy routers over-fill experts at cf 1.25 and 2.0, so there are drops to differ)
            assert main["overall"] > 0 and comp["overall"] > 0, (ds, s)
            assert comp["drop_rate"] != main["drop_rate"], (ds, s)
            assert comp["ce"] != main["ce"], (ds, s)
    er = rep["early_routing"]
    assert er["steps"] == [10, 20, 30]
    assert er["layers"][0]["tokens"] == [0.0, 0.0, 1.0]
    (layer,) = rep["specialization"]["layers"]
    assert "init" in layer
    # 1024 held-out tokens per domain = 16 windows of 64: probes of 4, 8, 16 windows
    assert [r["per_domain"] for r in layer["probe_ceiling"]] == [4, 8, 16]
    assert "smallest probe reaching a 95% ceiling" in printed


def format_tail(printed: str) -> str:
    """The report part of the command's output (between the progress lines and the path)."""
    body = printed.split("\n\n", 1)[1]
    return body.rsplit("\nnumbers: ", 1)[0]


def test_analyze_command_errors_are_one_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    A.add_arguments(parser)
    assert A.run(parser.parse_args([str(tmp_path / "missing")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    run_dir, data = _toy_checkpoint(tmp_path)
    assert A.run(parser.parse_args([str(run_dir), "--max-tokens", "0"])) == 2
    assert "--max-tokens=0" in capsys.readouterr().err


def test_token_windows_are_contiguous_and_disjoint():
    tokens = np.arange(1000)
    w = A.token_windows(tokens, seq_len=16, n_windows=5)
    assert w.shape == (5, 17)
    assert np.all(np.diff(w, axis=1) == 1), "each window is a contiguous run of tokens"
    starts = np.sort(w[:, 0])
    assert np.all(np.diff(starts) >= 17), f"windows overlap: starts {starts}"


def test_specialization_verdict_needs_both_baselines():
    rep = _synthetic_report()
    (layer,) = rep["specialization"]["layers"]
    iv = lambda lo, hi: {"estimate": (lo + hi) / 2, "low": lo, "high": hi, "level": 0.95}  # noqa: E731
    for shuffled, position, expected in [((0.52, 0.6), (0.2, 0.3), False),   # loads explain it
                                         ((0.2, 0.3), (0.52, 0.6), False),   # position explains it
                                         ((0.2, 0.3), (0.2, 0.3), True)]:
        st = {**layer["statistics"], "token_id": iv(0.5, 0.55), "shuffled": iv(*shuffled),
              "position": iv(*position)}
        spec = {**rep["specialization"], "layers": [{**layer, "statistics": st}]}
        assert A._summary({**rep, "specialization": spec})["specialization"]["reproduced"] \
            is expected, (shuffled, position)


def test_analyze_refuses_a_damaged_snapshot_in_one_line(tmp_path, capsys):
    """Issue 11: a corrupt routing snapshot used to end `analyze` in zipfile.BadZipFile."""
    run_dir, data = _toy_checkpoint(tmp_path)
    snap = sorted((run_dir / "snapshots").glob("step_*.npz"))[-1]
    raw = bytearray(snap.read_bytes())
    raw[-30] ^= 0xFF                                   # a byte of the zip central directory
    snap.write_bytes(bytes(raw[: len(raw) - 7]))       # ... and the end of the file cut off
    parser = argparse.ArgumentParser()
    A.add_arguments(parser)
    args = parser.parse_args([str(run_dir), "--data", str(data), "--max-tokens", "512",
                              "--drop-tokens", "256", "--min-count", "4", "--bins", "4"])
    assert A.run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(snap) in err[0] and "routing snapshot" in err[0], err


def test_analyze_an_expert_choice_model_says_what_its_numbers_mean(tmp_path, capsys):
    """Expert choice lists all E experts per token (k = E): the std measure has no spread
    (it used to divide by zero) and 'drops' are unpicked pairs; the command says so."""
    run_dir, data = _toy_checkpoint(tmp_path, router_type="expert_choice")
    parser = argparse.ArgumentParser()
    A.add_arguments(parser)
    args = parser.parse_args([str(run_dir), "--data", str(data), "--max-tokens", "512",
                              "--drop-tokens", "256", "--min-count", "4", "--bins", "4"])
    assert A.run(args) == 0
    captured = capsys.readouterr()
    assert "expert-choice router" in captured.out + captured.err


def test_collect_routing_of_a_random_priority_model_is_reproducible():
    """Slot priority "random" needs an rng: routing collection uses a fixed stream (it used
    to fail with "needs rng", so `analyze` could not read such a checkpoint)."""
    m = _toy_model(0, slot_priority="random", eval_capacity_factor=0.5)
    windows = np.random.default_rng(1).integers(0, 258, size=(8, 65))
    a = A.collect_routing(m, windows, batch_size=4)
    b = A.collect_routing(m, windows, batch_size=4)
    for ka, kb in zip(a.kept, b.kept):
        assert np.array_equal(ka, kb)
    assert any((~k).any() for k in a.kept)                     # drops, so the order mattered
