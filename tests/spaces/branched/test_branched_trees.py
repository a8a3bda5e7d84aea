"""The exact tree search against brute force (issue 13, "Done when" 2).

The oracle enumerates every tree explicitly: every sequence of partitions (from its own
restricted-growth-string generator, sets of frozensets) in which each level refines the one before,
costs it with the paper's formula in plain Python and filters by the budget. For every task count
2-5 and location count 1-4 and several budgets, the dynamic program returns the same optimum and
the same number of feasible trees. A 7-task, 6-location case runs in seconds.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from mtc.spaces.branched import trees as T


def _set_partitions(n: int) -> list[frozenset[frozenset[int]]]:
    """Every partition of range(n), from restricted growth strings (label i <= 1 + max of earlier)."""
    out = []

    def grow(prefix: list[int]) -> None:
        if len(prefix) == n:
            groups: dict[int, set[int]] = {}
            for i, g in enumerate(prefix):
                groups.setdefault(g, set()).add(i)
            out.append(frozenset(frozenset(s) for s in groups.values()))
            return
        for g in range(max(prefix, default=-1) + 2):
            grow(prefix + [g])

    grow([])
    return out


def _refines(fine, coarse) -> bool:
    return all(any(b <= c for c in coarse) for b in fine)


def _brute_trees(n: int, levels: int):
    parts = _set_partitions(n)
    chains = [[p] for p in parts]
    for _ in range(levels - 1):
        chains = [c + [q] for c in chains for q in parts if _refines(q, c[-1])]
    return chains


def _cost(A: np.ndarray, tree) -> float:
    total = 0.0
    for d, p in enumerate(tree):
        per = []
        for g in p:
            per.append(max([1.0 - A[d, i, j] for i in g for j in g if i != j], default=0.0))
        total += sum(per) / len(per)
    return total


def _random_affinity(rng: np.random.Generator, levels: int, n: int) -> np.ndarray:
    A = rng.uniform(-0.5, 1.0, (levels, n, n))
    A = (A + A.transpose(0, 2, 1)) / 2
    for d in range(levels):
        np.fill_diagonal(A[d], 1.0)
    return A


def _as_sets(levels) -> list[frozenset[frozenset[int]]]:
    return [frozenset(frozenset(T.members(b)) for b in p) for p in levels]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_the_dynamic_program_equals_brute_force(n, levels):
    rng = np.random.default_rng(100 * n + levels)
    A = _random_affinity(rng, levels, n)
    sizes = rng.integers(5, 60, levels).tolist()
    const = 7
    chains = _brute_trees(n, levels)
    assert T.best_tree(A, sizes, math.inf, const).total == len(chains)
    costs = [_cost(A, c) for c in chains]
    size = [const + sum(len(p) * s for p, s in zip(c, sizes, strict=True)) for c in chains]
    lo, hi = const + sum(sizes), const + n * sum(sizes)
    budgets = sorted({lo, hi, (lo + hi) // 2, lo + min(sizes), *rng.integers(lo, hi + 1, 3).tolist()})
    for budget in budgets:
        feasible = [i for i in range(len(chains)) if size[i] <= budget]
        res = T.best_tree(A, sizes, budget, const)
        assert res.feasible == len(feasible), budget
        best = min(costs[i] for i in feasible)
        assert res.cost == pytest.approx(best, abs=1e-12)
        assert res.levels is not None and T.is_tree(res.levels)
        assert res.size <= budget and res.size == const + sum(len(p) * s for p, s in zip(res.levels, sizes, strict=True))
        assert _cost(A, _as_sets(res.levels)) == pytest.approx(best, abs=1e-12)
        # a unique optimum is the same tree; ties go to the smaller one
        tied = [i for i in feasible if abs(costs[i] - best) < 1e-12]
        assert res.size == min(size[i] for i in tied)
        if len(tied) == 1:
            assert _as_sets(res.levels) == chains[tied[0]]


def test_below_the_hard_shared_size_no_tree_fits():
    A = _random_affinity(np.random.default_rng(0), 2, 3)
    res = T.best_tree(A, [10, 20], 10 + 20 - 1, 0)
    assert res.levels is None and res.feasible == 0 and res.total == 12


def test_seven_tasks_six_locations_in_seconds():
    rng = np.random.default_rng(7)
    A = _random_affinity(rng, 6, 7)
    sizes = rng.integers(100, 10_000, 6).tolist()
    t0 = time.perf_counter()
    res = T.best_tree(A, sizes, 2.5 * sum(sizes), 0)
    assert time.perf_counter() - t0 < 10
    assert res.total == 5_995_892 and 0 < res.feasible < res.total  # chains of refinements of 7 tasks
    assert res.levels is not None and T.is_tree(res.levels) and res.size <= 2.5 * sum(sizes)
    assert T.tree_cost(A, res.levels) == pytest.approx(res.cost)


def test_partition_counts_are_bell_numbers_and_refinement_lists_are_complete():
    assert [len(T.partitions(n)) for n in range(1, 8)] == [1, 2, 5, 15, 52, 203, 877]
    lat = T._lattice(4)
    for i, p in enumerate(lat.parts):
        kids = {lat.parts[j] for j in lat.children[lat.offsets[i]:lat.offsets[i + 1]]}
        assert kids == {q for q in lat.parts if T.refines(q, p)}


def test_make_tree_intersects_each_level_with_the_one_above():
    a, b, c, d = 1, 2, 4, 8
    levels = [(a | b, c | d), (a | c, b | d), (a | b | c | d,)]
    assert T.make_tree(levels) == [(a | b, c | d), (a, b, c, d), (a, b, c, d)]
    assert T.is_tree(T.make_tree(levels))


def test_random_trees_have_the_group_counts_and_are_uniform():
    rng = np.random.default_rng(3)
    counts = [1, 2, 3]
    want = [c for c in _brute_trees(4, 3) if [len(p) for p in c] == counts]
    seen: dict[tuple, int] = {}
    for _ in range(1500):
        t = T.random_tree(4, counts, rng)
        assert [len(p) for p in t] == counts and T.is_tree(t)
        key = tuple(_as_sets(t))
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == {tuple(c) for c in want}
    # uniform: every one of the trees drawn about equally often (chi-square, loose)
    expected = 1500 / len(want)
    chi2 = sum((v - expected) ** 2 / expected for v in seen.values())
    assert chi2 < 3 * len(want), chi2


def test_random_trees_are_distinct_and_not_the_excluded_tree_while_others_remain():
    counts = [1, 1, 2]  # 4 tasks: the 7 partitions into two groups at the last level
    want = {tuple(c) for c in _brute_trees(4, 3) if [len(p) for p in c] == counts}
    assert len(want) == 7
    chosen = T.random_tree(4, counts, np.random.default_rng(0))
    for seed in range(20):
        drawn = T.random_trees(4, counts, 3, np.random.default_rng(seed), exclude=[chosen])
        keys = [tuple(_as_sets(t)) for t in drawn]
        assert len(set(keys)) == 3 and tuple(_as_sets(chosen)) not in keys and set(keys) <= want
    # more than exist: the six others first, then repeats
    drawn = T.random_trees(4, counts, 8, np.random.default_rng(1), exclude=[chosen])
    keys = [tuple(_as_sets(t)) for t in drawn]
    assert set(keys[:6]) == want - {tuple(_as_sets(chosen))} and set(keys[6:]) <= want

def test_brute_force_oracle_counts_match_known_values():
    # chains of length 2 in the partition lattice: 3, 12, 60, 358 for 2..5 elements (OEIS A000258)
    assert [len(_brute_trees(n, 2)) for n in (2, 3, 4, 5)] == [3, 12, 60, 358]
    assert len(list(itertools.chain(_set_partitions(5)))) == 52
