"""Verdict rules on synthetic routing with known answers (tinymoe.analysis.baselines).

Cases that must NOT pass: balanced random routing is not drop-towards-the-end (its drops
rise towards the end of a group from the capacity formula and the slot order alone); a
router that depends only on the position is not token specialization. Cases that must
pass: a router that drops late tokens more than random routing does; a router that
routes by token id.
"""
from __future__ import annotations

import numpy as np
import pytest

from tinymoe import routing
from tinymoe.analysis import baselines as S

E, K, G = 8, 2, 128


# ------------------------------------------------------------------ the rule itself
def test_verdict_rule_is_interval_non_overlap():
    iv = lambda lo, hi: {"estimate": (lo + hi) / 2, "low": lo, "high": hi}  # noqa: E731
    assert S.verdict(iv(0.3, 0.4), iv(0.1, 0.29)) is True
    assert S.verdict(iv(0.3, 0.4), iv(0.1, 0.30)) is False          # touching: no
    assert S.verdict(iv(0.3, 0.4), iv(0.35, 0.5)) is False          # overlapping: no
    assert S.verdict(iv(0.1, 0.2), iv(0.3, 0.4), "less") is True
    assert S.verdict(iv(0.1, 0.2), iv(float("nan"), 0.4)) is None
    with pytest.raises(ValueError):
        S.verdict(iv(0, 1), iv(0, 1), "sideways")


def test_bootstrap_resamples_whole_units():
    # two units: one always 0, one always 1 -> every resample is 0, 1/2 or 1
    num, den = np.array([0.0, 10.0]), np.array([10.0, 10.0])
    est, smp = S.bootstrap_ratio(num, den, n_boot=400, seed=1)
    assert est == 0.5
    assert set(np.round(smp, 12)) <= {0.0, 0.5, 1.0} and len(set(np.round(smp, 12))) == 3
    iv = S.interval(smp, est)
    assert iv["low"] == 0.0 and iv["high"] == 1.0


# ------------------------------------------------------------------ the load-fluctuation formula
@pytest.mark.parametrize("cf", [1.25, 2.0])
def test_expected_drop_formula_matches_simulated_random_routing(cf):
    C = routing.capacity(G, E, K, cf)
    p = S.expected_drop_by_position(G, E, K, C)                           # [G, k]
    kept, pos = S.simulate_random_routing(3000, G, E, K, cf, seed=3)      # [N, k]
    sim = (~kept).reshape(3000, G, K).mean(axis=0)                        # [G, k]
    # each position's rate is a mean over 3000 independent groups
    sd = np.sqrt(np.clip(p * (1 - p), 1e-4, None) / 3000)
    assert np.all(np.abs(sim - p) < 5 * sd + 1e-9), np.abs(sim - p).max()
    # a first choice at position p < C always finds a slot (at most p earlier first choices)
    assert np.all(p[: C, 0] < 1e-12) and p[C, 0] > 0
    assert np.all(np.diff(p[:, 0]) >= -1e-12)        # rank 0: rises along the group


def test_expected_drop_formula_at_mini_shape_matches_the_issue_numbers():
    # random balanced routing at E=8, k=2, G=128: 16% -> 53% at cf 1.25, 0% -> 18% at cf 2
    s = S.expected_drop_summary(G, E, K, routing.capacity(G, E, K, 1.25))["all"]
    assert abs(s["first_quarter"] - 0.165) < 0.005 and abs(s["last_quarter"] - 0.529) < 0.005
    s = S.expected_drop_summary(G, E, K, routing.capacity(G, E, K, 2.0))["all"]
    assert s["first_quarter"] < 0.002 and abs(s["last_quarter"] - 0.179) < 0.005


# ------------------------------------------------------------------ drop-towards-the-end
def _stack_layers(kept_list):
    return np.concatenate(kept_list, axis=1)                              # [N, L*k]


@pytest.mark.parametrize("cf", [1.25, 2.0])
def test_random_routing_does_not_pass_drop_towards_the_end(cf):
    n_groups = 64
    kept = _stack_layers([S.simulate_random_routing(n_groups, G, E, K, cf, seed=10 + j)[0]
                          for j in range(2)])                              # 2 "layers"
    pos = np.arange(n_groups * G) % G
    eff = S.drop_statistics(kept, pos, G, K, n_boot=500, seed=0)
    base = S.random_drop_baseline(n_groups, 2, G, E, K, cf, n_boot=500, seed=99)
    # the naive rule of the old report passes it ...
    assert eff["all"]["last_quarter"]["estimate"] > 1.5 * eff["all"]["first_quarter"]["estimate"]
    # ... the baseline rule does not
    assert S.verdict(eff["all"]["gap"], base["all"]["gap"]) is False
    assert S.verdict(eff["all"]["overall"], base["all"]["overall"]) is False


def _late_overload_router(n_groups: int, cf: float, seed: int, share: float = 0.5):
    """Random logits, except that a ``share`` of the tokens in the second half of each
    group strongly prefer expert 0 (a router that crowds the end of a group)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_groups * G, E))
    pos = np.arange(n_groups * G) % G
    crowd = (pos >= G // 2) & (rng.random(n_groups * G) < share)
    z[crowd, 0] += 6.0
    r = routing.route(z, K, cf, G)
    return np.asarray(r.kept), pos


@pytest.mark.parametrize("cf", [1.25, 2.0])
def test_router_crowding_the_end_passes_drop_towards_the_end(cf):
    n_groups = 64
    kept = _stack_layers([_late_overload_router(n_groups, cf, seed=j)[0] for j in range(2)])
    pos = np.arange(n_groups * G) % G
    eff = S.drop_statistics(kept, pos, G, K, n_boot=500, seed=0)
    base = S.random_drop_baseline(n_groups, 2, G, E, K, cf, n_boot=500, seed=99)
    assert S.verdict(eff["all"]["gap"], base["all"]["gap"]) is True
    assert S.verdict(eff["rank0"]["last_quarter"], base["rank0"]["last_quarter"]) is True


def test_drop_statistics_splits_ranks_and_quarters():
    # 2 groups of 8 positions, k=2; rank-1 choices dropped in the last quarter only
    pos = np.tile(np.arange(8), 2)
    kept = np.ones((16, 2), bool)
    kept[pos >= 6, 1] = False
    st = S.drop_statistics(kept, pos, 8, 2, n_boot=50)
    assert st["rank0"]["overall"]["estimate"] == 0.0
    assert st["rank1"]["last_quarter"]["estimate"] == 1.0
    assert st["rank1"]["first_quarter"]["estimate"] == 0.0
    assert st["all"]["gap"]["estimate"] == 0.5 and st["all"]["overall"]["estimate"] == 2 / 16
    assert st["n_units"] == 2


def test_drop_difference_between_data_sets():
    pos = np.tile(np.arange(G), 32)
    a = {"kept": S.simulate_random_routing(32, G, E, K, 1.25, seed=1)[0], "group_pos": pos,
         "group_len": G}
    b = {"kept": S.simulate_random_routing(32, G, E, K, 2.0, seed=2)[0], "group_pos": pos,
         "group_len": G}
    d = S.drop_difference(a, b, "overall", n_boot=300)
    assert d["low"] > 0.25                      # cf 1.25 drops ~37.5%, cf 2.0 ~6%
    same = S.drop_difference(a, a, "overall", n_boot=300)
    assert same["low"] < 0 < same["high"]


def test_ce_cost_by_position_pairs_the_same_tokens():
    pos = np.tile(np.arange(16), 10)
    base = np.random.default_rng(0).random(160)
    with_drops = base + np.where(pos >= 12, 0.5, 0.0)                       # cost only at the end
    c = S.ce_cost_by_position(with_drops, base, pos, 16, n_bins=4, n_boot=200)
    assert [b["estimate"] for b in c["bins"]] == pytest.approx([0, 0, 0, 0.5])
    assert c["bins"][3]["low"] == pytest.approx(0.5)   # paired: no noise from the base CE
    assert c["overall"]["estimate"] == pytest.approx(0.125)


# ------------------------------------------------------------------ specialization
def _text(n_windows: int = 60, seq: int = 64, vocab: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=n_windows * seq)
    pos = np.arange(ids.size) % seq
    win = np.arange(ids.size) // seq
    return rng, ids, pos, win


def test_router_by_token_id_passes_specialization():
    rng, ids, pos, win = _text()
    table = rng.integers(0, E, size=40)
    experts = table[ids]
    experts = np.where(rng.random(ids.size) < 0.2, rng.integers(0, E, ids.size), experts)
    st = S.specialization_statistics(ids, pos, experts, E, win, n_boot=300)
    assert S.verdict(st["token_id"], st["shuffled"]) is True
    assert S.verdict(st["token_id"], st["position"]) is True


def test_router_by_position_does_not_pass_specialization():
    rng, ids, pos, win = _text()
    experts = (pos // 8) % E                                              # depends on position only
    st = S.specialization_statistics(ids, pos, experts, E, win, n_boot=300)
    assert S.verdict(st["token_id"], st["shuffled"]) is False
    assert st["position"]["estimate"] == 1.0
    assert S.verdict(st["position"], st["shuffled"]) is True              # position is what it uses


def test_random_router_does_not_pass_specialization():
    rng, ids, pos, win = _text(seed=5)
    experts = rng.integers(0, E, ids.size)
    st = S.specialization_statistics(ids, pos, experts, E, win, n_boot=300)
    assert S.verdict(st["token_id"], st["shuffled"]) is False


# ------------------------------------------------------------------ early routing
def test_split_half_ceiling_is_one_for_routing_by_id_and_low_for_noise():
    rng, ids, pos, win = _text(n_windows=16)
    by_id = rng.integers(0, E, size=40)[ids]
    c = S.split_half_agreement(ids, by_id, by_id, win, E, n_splits=20)
    assert c["occurrences"]["estimate"] == 1.0 and c["ids"]["estimate"] == 1.0
    noise = rng.integers(0, E, ids.size)
    c = S.split_half_agreement(ids, noise, noise, win, E, n_splits=20)
    assert c["occurrences"]["estimate"] < 0.5                             # majority of noise
    other = rng.integers(0, E, size=40)[ids]
    c = S.split_half_agreement(ids, other, by_id, win, E, n_splits=20)
    assert c["ids"]["estimate"] < 0.45                                    # unrelated: ~1/E


def test_token_agreement_interval():
    rng, ids, pos, win = _text(n_windows=16)
    a = rng.integers(0, E, ids.size)
    t = S.token_agreement(a, a, win, n_boot=100)
    assert t["estimate"] == 1.0 and t["low"] == 1.0
    b = np.where(win < 8, a, (a + 1) % E)                                 # half the sequences differ
    t = S.token_agreement(b, a, win, n_boot=300)
    assert t["estimate"] == 0.5 and t["low"] < 0.5 < t["high"]


def test_training_adds_nothing_when_the_untrained_router_routes_by_id_as_well():
    # the "untrained" router uses another id -> expert table with the same id dependence
    # (25% of tokens re-drawn at random): no verdict either way
    rng, ids, pos, win = _text(n_windows=120, seed=1)
    trained = np.where(rng.random(ids.size) < 0.25, rng.integers(0, E, ids.size),
                       (np.arange(40) % E)[ids])
    table = rng.permutation(np.arange(40) % E)
    untrained = np.where(rng.random(ids.size) < 0.25, rng.integers(0, E, ids.size), table[ids])
    a = S.specialization_statistics(ids, pos, trained, E, win, n_boot=300)
    b = S.specialization_statistics(ids, pos, untrained, E, win, n_boot=300, seed=1)
    assert S.verdict(a["skill"], b["skill"]) is False
    assert S.verdict(b["skill"], a["skill"]) is False
    # a router with a weaker id dependence (70% re-drawn) is beaten
    weak = np.where(rng.random(ids.size) < 0.7, rng.integers(0, E, ids.size), table[ids])
    c = S.specialization_statistics(ids, pos, weak, E, win, n_boot=300, seed=2)
    assert S.verdict(a["skill"], c["skill"]) is True
    assert S.verdict(c["token_id"], c["shuffled"]) is True      # still specialised, less so
    for st in (a, b, c):                      # the skill's interval is the skill's, around it
        sk, acc, sh = st["skill"], st["token_id"]["estimate"], st["shuffled"]["estimate"]
        assert sk["estimate"] == pytest.approx((acc - sh) / (1 - sh))
        assert sk["low"] < sk["estimate"] < sk["high"]


def test_random_baseline_interval_is_the_spread_of_data_sets_of_that_size():
    n_units, cf = 16, 1.25
    base = S.random_drop_baseline(n_units, 1, G, E, K, cf, n_boot=1000, seed=4)
    gaps = []
    for rep in range(150):                    # independent random data sets of n_units groups
        kept, pos = S.simulate_random_routing(n_units, G, E, K, cf, seed=1000 + rep)
        gaps.append(S.drop_statistics(kept, pos, G, K, n_boot=1)["all"]["gap"]["estimate"])
    sd_true = np.std(gaps)
    sd_base = (base["all"]["gap"]["high"] - base["all"]["gap"]["low"]) / (2 * 1.96)
    assert 0.7 < sd_base / sd_true < 1.4, (sd_base, sd_true)


def test_random_baseline_follows_the_slot_priority():
    pos_b = S.random_drop_baseline(32, 1, G, E, K, 1.25, priority="position", n_boot=200)
    prob_b = S.random_drop_baseline(32, 1, G, E, K, 1.25, priority="probability", n_boot=200)
    assert pos_b["all"]["gap"]["low"] > 0.3                   # position priority: drops pile up late
    assert abs(prob_b["all"]["gap"]["estimate"]) < 0.03      # probability priority: flat
    assert "expected" in pos_b and "expected" not in prob_b  # the formula is for position priority


def test_ceiling_grows_with_the_probe_and_is_one_without_noise():
    rng, ids, pos, win = _text(n_windows=128, seq=32, vocab=60, seed=3)
    dom = win % 2                                                         # two "domains"
    table = rng.integers(0, E, size=60)
    clean = S.ceiling_by_probe_size(ids, table[ids], win, dom, E, sizes=(4, 16, 64), n_splits=10)
    assert [r["per_domain"] for r in clean] == [4, 16, 64]
    assert all(r["ids"] == 1.0 and r["occurrences"] == 1.0 for r in clean)
    noisy = np.where(rng.random(ids.size) < 0.4, rng.integers(0, E, ids.size), table[ids])
    c = S.ceiling_by_probe_size(ids, noisy, win, dom, E, sizes=(4, 16, 64, 128), n_splits=10)
    assert [r["per_domain"] for r in c] == [4, 16, 64]                    # 128 > 64 per domain
    occ = [r["occurrences"] for r in c]
    assert occ[0] < occ[1] < occ[2] and occ[2] > 0.95 and occ[0] < 0.9
    assert c[0]["n_tokens"] == 2 * 4 * 32
