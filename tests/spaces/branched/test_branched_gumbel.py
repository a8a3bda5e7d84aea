"""The gumbel strategy's pieces: the closed-form expected cost against the enumeration of all T^T
assignments (issue 13, "Done when" 3), the temperature schedule and the derived tree."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mtc.spaces.branched.gumbel import derive_levels, expected_copies, linear_tau, resource_loss
from mtc.spaces.branched.trees import is_tree


def _enumerated(p: np.ndarray) -> float:
    """E[number of distinct copies picked] by summing over every assignment of tasks to copies."""
    T, K = p.shape
    total = 0.0
    for a in itertools.product(range(K), repeat=T):
        prob = np.prod([p[i, a[i]] for i in range(T)])
        total += prob * len(set(a))
    return total


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_expected_copies_equals_the_enumeration_of_all_assignments(T):
    rng = np.random.default_rng(T)
    for _ in range(5):
        logits = rng.normal(scale=2.0, size=(T, T))
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        got = float(expected_copies(torch.tensor(p, dtype=torch.float64)))
        assert got == pytest.approx(_enumerated(p), abs=1e-12)


def test_resource_loss_weights_each_block_by_its_cost_and_has_gradients():
    rng = np.random.default_rng(0)
    logits = [torch.tensor(rng.normal(size=(3, 3)), requires_grad=True) for _ in range(2)]
    costs = [0.25, 0.75]
    r = resource_loss(logits, costs)
    want = sum(c * _enumerated(torch.softmax(x, -1).detach().numpy()) for x, c in zip(logits, costs, strict=True))
    assert float(r.detach()) == pytest.approx(want, abs=1e-10)
    r.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in logits)
    # zero logits: every task uniform over T copies, E = T (1 - (1 - 1/T)^T)
    z = resource_loss([torch.zeros(4, 4)], [1.0])
    assert float(z) == pytest.approx(4 * (1 - 0.75 ** 4))


def test_temperature_falls_linearly_from_tau0_to_tau_min():
    tau = linear_tau(5.0, 0.1, 50)
    assert tau(0) == 5.0 and tau(49) == pytest.approx(0.1) and tau(100) == pytest.approx(0.1)
    assert tau(24) - tau(25) == pytest.approx((5.0 - 0.1) / 49)


def test_derived_levels_are_a_tree():
    # block 1: a,b | c,d; block 2 (argmax): a,c | b,d -> made a tree: every task alone
    l1 = torch.tensor([[5.0, 0, 0, 0], [5, 0, 0, 0], [0, 5, 0, 0], [0, 5, 0, 0]])
    l2 = torch.tensor([[0, 0, 5.0, 0], [0, 0, 0, 5], [0, 0, 5, 0], [0, 0, 0, 5]])
    levels = derive_levels([l1, l2], 4)
    assert levels == [(0b0011, 0b1100), (0b0001, 0b0010, 0b0100, 0b1000)] and is_tree(levels)
