"""The two benchmarks of the Gumbel-Matrix paper the efficacy tests use, as the data generators
express them: ``relatedness`` with two pairs of tasks (Appendix A3) and ``digits`` with copies of
tasks (4-MNISTs)."""

from __future__ import annotations

import numpy as np
import torch

from mtc.data import load_data
from mtc.tasks.spec import parse_tasks


def test_relatedness_pairs_are_related_inside_and_orthogonal_across():
    tasks = parse_tasks("a1:regress,a2:regress,b1:regress,b2:regress")
    train, val = load_data("relatedness?rho=1&n_train=400&n_val=2", tasks, (1, 8, 16), 3)
    p = val.problem
    w = np.stack(p.ws)
    # cos(w_i, w_j): 1 inside a pair (rho = 1), 0 across pairs
    cos = w @ w.T / np.outer(np.linalg.norm(w, axis=1), np.linalg.norm(w, axis=1))
    np.testing.assert_allclose(cos, np.kron(np.eye(2), np.ones((2, 2))), atol=1e-12)
    # pair 0 is the two-task problem, unchanged
    two, two_val = load_data("relatedness?rho=1&n_train=400&n_val=2", parse_tasks("y1:regress,y2:regress"),
                             (1, 8, 16), 3)
    assert np.array_equal(two_val.problem.u1, p.u1) and np.array_equal(two_val.problem.u2, p.u2)
    x, t = train[5]
    x2, t2 = two[5]
    assert torch.equal(x, x2) and torch.equal(t["a1"], t2["y1"]) and torch.equal(t["a2"], t2["y2"])
    ys = np.array([[train[i][1][k].item() for k in ("a1", "a2", "b1", "b2")] for i in range(400)])
    c = np.corrcoef(ys.T)
    assert c[0, 1] > 0.95 and c[2, 3] > 0.95 and max(abs(c[0, 2]), abs(c[1, 3]), abs(c[0, 3])) < 0.2, c


def test_relatedness_rho_holds_inside_each_pair():
    tasks = parse_tasks("a1:regress,a2:regress,b1:regress,b2:regress")
    _, val = load_data("relatedness?rho=0.5&n_val=2", tasks, (1, 8, 16), 0)
    w = np.stack(val.problem.ws)
    assert np.isclose(w[0] @ w[1], 0.5) and np.isclose(w[2] @ w[3], 0.5) and abs(w[0] @ w[2]) < 1e-12


def test_digit_copies_have_the_same_targets():
    tasks = parse_tasks("digit:class,digit_2:class:10,rotated:class:4,rotated_2:class:4")
    train, val = load_data("digits", tasks, (1, 12, 12), 0)
    ref, _ = load_data("digits", parse_tasks("digit:class,rotated:class:4"), (1, 12, 12), 0)
    for i in (0, 7, 100):
        x, t = train[i]
        xr, tr = ref[i]
        assert torch.equal(x, xr)
        assert t["digit"] == t["digit_2"] == tr["digit"] and t["rotated"] == t["rotated_2"] == tr["rotated"]
