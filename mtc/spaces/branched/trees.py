"""Trees of task groups and the exact search for the best one under a budget (Vandenhende et al., 3.2).

A *tree* over N tasks and D locations is a sequence of partitions ``P_1, ..., P_D`` of the tasks,
each refining the one before: the tasks of one group of ``P_d`` share block ``d`` (the part of the
encoder that ends at location ``d``), and a group can only split further down. Its clustering cost
is the paper's

    C_cluster = Σ_d mean_{G ∈ P_d} max_{i, j ∈ G} (1 − A[d, i, j])

(a singleton costs 0), and its size is ``const + Σ_d |P_d| · s_d`` for a block size ``s_d`` (one
copy's parameters or MACs) and the part outside the blocks (``const``: the heads).

:func:`best_tree` finds the cheapest tree within a budget exactly, by a dynamic program over the
refinement lattice: the state after level ``d`` is (``P_d``, size used so far); the cost of the
levels after ``d`` depends only on ``P_d``, and the size constraint only on the size used, so
keeping the cheapest partial tree per state (and the number of partial trees reaching it) is
exact. A state that cannot be completed within the budget (every later level has at least
``|P_d|`` groups) is dropped at once. Nothing here is brute force over assignments: for 7 tasks and
6 locations (about 6 million trees) it takes a fraction of a second.

Partitions are tuples of bitmasks (bit ``i`` = task ``i``), sorted by their lowest task.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mtc.errors import MtcError

Partition = tuple[int, ...]
#: The largest task count the exact enumeration accepts (Bell(8) = 4,140 partitions per level; 8 tasks and 6 locations take a few seconds).
MAX_TASKS = 8


# ------------------------------------------------------------------------------------ partitions
def _partitions_of(mask: int) -> list[Partition]:
    """Every partition of the set bits of ``mask`` (blocks sorted by their lowest bit)."""
    if mask == 0:
        return [()]
    low = mask & -mask
    rest = mask ^ low
    out: list[Partition] = []
    # The block holding the lowest element is `low` plus any subset of the rest.
    sub = rest
    while True:
        block = low | sub
        for p in _partitions_of(rest ^ sub):
            out.append(tuple(sorted((block, *p), key=lambda b: b & -b)))
        if sub == 0:
            break
        sub = (sub - 1) & rest
    return out


@lru_cache(maxsize=16)
def partitions(n: int) -> tuple[Partition, ...]:
    """Every partition of ``n`` tasks, in a fixed order (the Bell number of them)."""
    return tuple(sorted(_partitions_of((1 << n) - 1), key=lambda p: (len(p), p)))


def refines(fine: Partition, coarse: Partition) -> bool:
    """Every group of ``fine`` lies inside one group of ``coarse``."""
    return all(any(b & c == b for c in coarse) for b in fine)


def members(block: int) -> list[int]:
    return [i for i in range(block.bit_length()) if block >> i & 1]


def to_groups(p: Partition, names: Sequence[str]) -> list[list[str]]:
    return [[names[i] for i in members(b)] for b in p]


def from_groups(groups: Sequence[Sequence[str]], names: Sequence[str]) -> Partition:
    index = {n: i for i, n in enumerate(names)}
    return tuple(sorted((sum(1 << index[t] for t in g) for g in groups), key=lambda b: b & -b))


def is_tree(levels: Sequence[Partition]) -> bool:
    return all(refines(b, a) for a, b in zip(levels, levels[1:], strict=False))


def make_tree(levels: Sequence[Partition]) -> list[Partition]:
    """The tree closest to arbitrary per-level partitions: each level intersected with the one above
    (BMTAS: a group that split cannot merge again deeper down)."""
    out: list[Partition] = []
    for p in levels:
        if out:
            p = tuple(sorted({a & b for a in p for b in out[-1] if a & b}, key=lambda b: b & -b))
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------ cost
def dissimilarity(affinity: np.ndarray) -> np.ndarray:
    """``1 − A`` with a zero diagonal (the paper's task dissimilarity)."""
    d = 1.0 - np.asarray(affinity, dtype=np.float64)
    for m in d.reshape(-1, d.shape[-2], d.shape[-1]):
        np.fill_diagonal(m, 0.0)
    return d


def block_max(diss: np.ndarray) -> np.ndarray:
    """``[D, 2^N]``: the largest dissimilarity within each subset of tasks at each level."""
    D, n, _ = diss.shape
    out = np.zeros((D, 1 << n))
    for mask in range(1, 1 << n):
        low = (mask & -mask).bit_length() - 1
        rest = mask & (mask - 1)
        if rest:
            # max over pairs = max(max over pairs in `rest`, max from `low` to `rest`)
            out[:, mask] = np.maximum(out[:, rest], diss[:, low, members(rest)].max(axis=1))
    return out


def partition_cost(diss_d: np.ndarray, p: Partition) -> float:
    """Mean over the groups of ``p`` of the largest dissimilarity inside each (the paper's C^l)."""
    total = 0.0
    for b in p:
        m = members(b)
        total += max((diss_d[i, j] for i in m for j in m), default=0.0)
    return total / len(p)


def tree_cost(affinity: np.ndarray, levels: Sequence[Partition]) -> float:
    diss = dissimilarity(affinity)
    return float(sum(partition_cost(diss[d], p) for d, p in enumerate(levels)))


def tree_size(levels: Sequence[Partition], sizes: Sequence[int], const: int) -> int:
    return int(const + sum(len(p) * int(s) for p, s in zip(levels, sizes, strict=True)))


# -------------------------------------------------------------------------------------- the search
@dataclass
class SearchResult:
    """The cheapest tree within the budget and what the search saw.

    Attributes:
        levels: the tree (one partition per location), or None when no tree fits.
        cost: its ``C_cluster``.
        size: its size (``const + Σ |P_d| s_d``).
        feasible: the number of trees within the budget (exact).
        total: the number of trees of these tasks and locations (no budget).
        states: partial trees the dynamic program kept (its work).
        seconds: wall time of the search.
    """

    levels: list[Partition] | None
    cost: float
    size: int
    feasible: int
    total: int
    states: int
    seconds: float


class _Lattice:
    """The partitions of N tasks, their group counts and refinements (CSR), built once per N."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.parts = partitions(n)
        self.index = {p: i for i, p in enumerate(self.parts)}
        self.blocks = np.array([len(p) for p in self.parts], dtype=np.int64)
        sub = {}
        children: list[list[int]] = []
        for p in self.parts:
            acc: list[tuple[int, ...]] = [()]
            for b in p:
                if b not in sub:
                    sub[b] = _partitions_of(b)
                acc = [a + q for a in acc for q in sub[b]]
            children.append(sorted(self.index[tuple(sorted(a, key=lambda x: x & -x))] for a in acc))
        self.offsets = np.zeros(len(self.parts) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([len(c) for c in children])
        self.children = np.array([c for cs in children for c in cs], dtype=np.int64)
        self.degree = np.diff(self.offsets)

    def costs(self, diss: np.ndarray) -> np.ndarray:
        """``[D, P]``: every partition's cost at every level."""
        bm = block_max(diss)
        out = np.zeros((diss.shape[0], len(self.parts)))
        for i, p in enumerate(self.parts):
            out[:, i] = bm[:, list(p)].sum(axis=1) / len(p)
        return out

    def count_all(self, levels: int) -> int:
        """The number of trees over ``levels`` locations (chains of refinements), no budget."""
        cnt = np.ones(len(self.parts), dtype=np.int64)
        for _ in range(levels - 1):
            # every partition refines itself, so no list of children is empty
            cnt = np.add.reduceat(cnt[self.children], self.offsets[:-1])
        return int(cnt.sum())


@lru_cache(maxsize=8)
def _lattice(n: int) -> _Lattice:
    return _Lattice(n)


def best_tree(affinity: np.ndarray, sizes: Sequence[int], budget: float, const: int = 0) -> SearchResult:
    """The tree of least ``C_cluster`` whose size is at most ``budget`` (exact; module docstring).

    Ties are broken by the smaller size, then by the order of :func:`partitions`, so the answer is
    deterministic.

    Args:
        affinity: ``[D, N, N]`` task affinities (symmetric, diagonal 1).
        sizes: ``s_d``, the size of one copy of block ``d`` (integers: parameters or MACs).
        budget: the largest allowed size (same unit, ``const`` included).
        const: the size outside the blocks (the heads).

    Raises:
        MtcError: more than :data:`MAX_TASKS` tasks, or shapes that do not agree.
    """
    t0 = time.perf_counter()
    A = np.asarray(affinity, dtype=np.float64)
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise MtcError(f"affinities must be [D, N, N], got shape {A.shape}")
    D, n, _ = A.shape
    if len(sizes) != D:
        raise MtcError(f"{len(sizes)} block sizes for {D} locations")
    if n > MAX_TASKS:
        raise MtcError(f"{n} tasks: the exact tree search handles at most {MAX_TASKS}")
    lat = _lattice(n)
    cost = lat.costs(dissimilarity(A))
    s = np.array([int(v) for v in sizes], dtype=np.int64)
    after = np.concatenate([np.cumsum(s[::-1])[::-1][1:], [0]])  # Σ_{e>d} s_e
    room = math.floor(budget - const) if math.isfinite(budget) else int(np.iinfo(np.int64).max // 4)

    # Level 1: every partition that leaves room for the rest of the tree.
    part = np.arange(len(lat.parts), dtype=np.int64)
    used = lat.blocks * s[0]
    keep = used + lat.blocks * after[0] <= room
    part, used = part[keep], used[keep]
    c = cost[0, part]
    count = np.ones(len(part), dtype=np.int64)
    history = [(part, used, np.full(len(part), -1, dtype=np.int64))]
    states = len(part)
    for d in range(1, D):
        if len(part) == 0:
            break
        deg = lat.degree[part]
        rep = np.repeat(np.arange(len(part)), deg)
        # position of each expansion within its parent's list of children
        local = np.arange(len(rep)) - np.repeat(np.cumsum(deg) - deg, deg)
        child = lat.children[lat.offsets[part[rep]] + local]
        u = used[rep] + lat.blocks[child] * s[d]
        ok = u + lat.blocks[child] * after[d] <= room
        rep, child, u = rep[ok], child[ok], u[ok]
        cc = c[rep] + cost[d, child]
        # one state per (partition, size used): the cheapest partial tree and how many reach it
        order = np.lexsort((rep, cc, u, child))
        child, u, cc, rep = child[order], u[order], cc[order], rep[order]
        cnt = count[rep]
        first = np.ones(len(child), dtype=bool)
        first[1:] = (child[1:] != child[:-1]) | (u[1:] != u[:-1])
        starts = np.flatnonzero(first)
        count = np.add.reduceat(cnt, starts) if len(starts) else np.zeros(0, dtype=np.int64)
        part, used, c = child[starts], u[starts], cc[starts]
        history.append((part, used, rep[starts]))
        states += len(part)
    feasible = int(count.sum()) if len(part) and len(history) == D else 0
    total = lat.count_all(D)
    if feasible == 0:
        return SearchResult(None, math.inf, 0, 0, total, states, time.perf_counter() - t0)
    best = int(np.lexsort((part, used, c))[0])
    levels: list[Partition] = []
    i = best
    for d in range(D - 1, -1, -1):
        p, _, parent = history[d]
        levels.append(lat.parts[int(p[i])])
        i = int(parent[i])
    levels.reverse()
    return SearchResult(levels, float(c[best]), int(const + used[best]), feasible, total, states,
                        time.perf_counter() - t0)


def random_tree(n: int, blocks: Sequence[int], rng: np.random.Generator) -> list[Partition]:
    """A tree drawn uniformly among the trees with ``blocks[d]`` groups at level ``d`` (the same
    size as any tree of those group counts), by counting completions (exact, no rejection).

    Raises:
        MtcError: no tree has these group counts (they must not decrease and lie in 1..n).
    """
    lat = _lattice(n)
    D = len(blocks)
    kids = [lat.children[lat.offsets[i]:lat.offsets[i + 1]].tolist() for i in range(len(lat.parts))]
    # ways[d][p]: completions of a tree whose level d is partition p
    ways = [[0] * len(lat.parts) for _ in range(D)]
    for p in range(len(lat.parts)):
        ways[D - 1][p] = int(lat.blocks[p] == blocks[D - 1])
    for d in range(D - 2, -1, -1):
        for p in range(len(lat.parts)):
            if lat.blocks[p] == blocks[d]:
                ways[d][p] = sum(ways[d + 1][q] for q in kids[p])
    out: list[Partition] = []
    cands = list(range(len(lat.parts)))
    for d in range(D):
        w = np.array([ways[d][p] for p in cands], dtype=np.float64)
        if w.sum() == 0:
            raise MtcError(f"no tree has {list(blocks)} groups per location")
        p = cands[int(rng.choice(len(cands), p=w / w.sum()))]
        out.append(lat.parts[p])
        cands = kids[p]
    return out


def random_trees(n: int, blocks: Sequence[int], count: int, rng: np.random.Generator,
                 exclude: Sequence[Sequence[Partition]] = ()) -> list[list[Partition]]:
    """``count`` trees drawn as :func:`random_tree` draws one, each different from the others and
    from ``exclude`` (the chosen tree) while such trees remain: a uniform draw without replacement.
    When fewer trees of these group counts exist than asked for, the rest repeat.

    Raises:
        MtcError: no tree has these group counts.
    """
    seen = {tuple(tuple(p) for p in t) for t in exclude}
    out: list[list[Partition]] = []
    for _ in range(count):
        tree = random_tree(n, blocks, rng)
        for _attempt in range(500):  # rejection: cheap next to the training each tree gets
            if tuple(tree) not in seen:
                break
            tree = random_tree(n, blocks, rng)
        seen.add(tuple(tree))
        out.append(tree)
    return out
