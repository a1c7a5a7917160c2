"""Second oracle for the router's slot assignment: :func:`tinymoe.routing.assign_slots`
(sort-based counting) against :func:`tinymoe.routing.assign_slots_reference` (the one-hot
cumsum over the k-major queue, as flaxformer writes it), for every slot priority, several
groups, and capacities that drop."""
from __future__ import annotations

import numpy as np
import pytest

from tinymoe import routing


def _choices(n_groups, g, k, n_experts, seed):
    """Distinct top-k experts per token, skewed towards expert 0 so that capacity drops."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.linspace(3.0, 0.5, n_experts), size=(n_groups, g))      # [ng, G, E]
    order = np.argsort(-p, axis=-1, kind="stable")[..., :k]                      # [ng, G, k]
    return order.astype(np.int64), np.take_along_axis(p, order, axis=-1)


@pytest.mark.parametrize("priority", ["position", "probability", "random"])
@pytest.mark.parametrize("k,capacity", [(1, 3), (2, 4), (2, 100), (3, 2)])
def test_assign_slots_matches_reference(priority, k, capacity):
    n_groups, g, n_experts = 3, 24, 6
    expert_index, prob = _choices(n_groups, g, k, n_experts, seed=k * 10 + capacity)
    order = routing.priority_order(prob, priority, rng=np.random.default_rng(5))  # [ng, k, G]
    slot, kept = routing.assign_slots(expert_index, prob, capacity, order=order, n_experts=n_experts)
    ref_slot, ref_kept = routing.assign_slots_reference(expert_index, capacity, n_experts, order)
    np.testing.assert_array_equal(slot, ref_slot)
    np.testing.assert_array_equal(kept, ref_kept)
    if capacity < g:
        assert not kept.all(), "the skewed choices must overflow the capacity"
    if priority == "position":                                   # order=None is token order
        np.testing.assert_array_equal(routing.assign_slots_reference(expert_index, capacity, n_experts)[0],
                                      ref_slot)


def test_assign_slots_reference_by_hand():
    """One group, G = 4 tokens, k = 2, C = 2: the queue is the rank-0 choices of tokens
    0..3 (experts 0 0 1 0), then the rank-1 choices (1 1 0 1)."""
    expert_index = np.array([[[0, 1], [0, 1], [1, 0], [0, 1]]])               # [1, 4, 2]
    slot, kept = routing.assign_slots_reference(expert_index, capacity=2, n_experts=2)
    # expert 0: token 0 (slot 0), token 1 (1), token 3 (2, dropped), token 2 rank 1 (3, dropped)
    # expert 1: token 2 (0), then rank 1 of tokens 0, 1, 3 (1, 2, 3)
    np.testing.assert_array_equal(slot[0], [[0, 1], [1, -1], [0, -1], [-1, -1]])
    np.testing.assert_array_equal(kept[0], [[True, True], [True, False], [True, False], [False, False]])
