"""Newell et al.'s partitioning parameterisation (section 3.1) and a mask solver (numpy only).

``P ∈ [0, 1]^{N×N}``: the diagonal is each task's fraction of a layer's channels, an off-diagonal
entry the pairwise overlap, as a position between the least and the most overlap two tasks of
those sizes can have. Eq. 1-3 map it to the overlap fractions ``P̃``::

    D = diag(P) 1ᵀ                                   (1)
    P_min = max(0, D + Dᵀ - J)                       (2)
    P_max = min(D, Dᵀ)                               (3)
    P̃ = P ⊙ I + (P ⊙ (P_max - P_min) + P_min) ⊙ (J - I)

A binary mask ``M ∈ {0, 1}^{C×N}`` (channel × task) realises ``P̃`` when ``(1/C) MᵀM ≈ P̃``:
:func:`solve_masks` finds one by a greedy construction and a local search over single flips and
within-task swaps (the paper: "a mask M can quickly be derived that satisfies P̃ with a median
error under one percent").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mtc.errors import MtcError

__all__ = ["as_matrix", "check_p", "mask_error", "mean_use", "random_p", "remap", "solve_masks", "symmetric"]


def check_p(p: Any, tasks: int, *, what: str = "P") -> np.ndarray:
    """``p`` as a float ``[N, N]`` array.

    Raises:
        MtcError: not a square matrix of the task count, not symmetric, or an entry outside [0, 1].
    """
    try:
        a = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise MtcError(f"{what} must be a {tasks}x{tasks} matrix of numbers") from None
    if a.ndim != 2 or a.shape != (tasks, tasks):
        shape = "x".join(str(d) for d in a.shape) or "a scalar"
        raise MtcError(f"{what} must be square in the task count ({tasks}x{tasks}), got {shape}")
    if not np.isfinite(a).all() or (a < 0).any() or (a > 1).any():
        i, j = np.argwhere(~((a >= 0) & (a <= 1)))[0]
        raise MtcError(f"{what} must lie in [0, 1]: entry ({i}, {j}) is {a[i, j]:g}")
    if not np.allclose(a, a.T):
        i, j = np.argwhere(~np.isclose(a, a.T))[0]
        raise MtcError(f"{what} must be symmetric: entries ({i}, {j}) and ({j}, {i}) differ")
    return a


def as_matrix(text: str, tasks: int, *, what: str = "P") -> np.ndarray:
    """A matrix from JSON text (``[[1, 0.5], [0.5, 1]]``) or ``;``-separated rows of numbers."""
    import json

    t = text.strip()
    try:
        rows: Any = json.loads(t) if t.startswith("[") else [[float(x) for x in r.replace(",", " ").split()]
                                                             for r in t.split(";") if r.strip()]
    except (ValueError, json.JSONDecodeError):
        raise MtcError(f"{what}: expected a JSON matrix or rows separated by ';', got '{text}'") from None
    if rows and any(not isinstance(r, list) or len(r) != len(rows[0]) for r in rows):
        raise MtcError(f"{what} must be square in the task count ({tasks}x{tasks}): rows differ in length")
    return check_p(rows, tasks, what=what)


def symmetric(p: np.ndarray) -> np.ndarray:
    """The upper triangle (with the diagonal) mirrored onto the lower one."""
    u = np.triu(p)
    return u + np.triu(p, 1).T


def remap(p: np.ndarray) -> np.ndarray:
    """Eq. 1-3: ``P̃``, the overlap fractions ``P`` stands for (module docstring)."""
    p = np.asarray(p, dtype=np.float64)
    n = p.shape[0]
    eye, ones = np.eye(n), np.ones((n, n))
    d = np.diag(p)[:, None] @ np.ones((1, n))  # (1)
    p_min = np.maximum(0.0, d + d.T - ones)  # (2)
    p_max = np.minimum(d, d.T)  # (3)
    return p * eye + (p * (p_max - p_min) + p_min) * (ones - eye)


def mean_use(p: np.ndarray) -> float:
    """The mean channel use per task: the mean of P's diagonal."""
    return float(np.mean(np.diag(p)))


def random_p(tasks: int, rng: np.random.Generator, *, use: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """A symmetric P with entries uniform in [0, 1] (Newell et al.'s random sampling); its diagonal
    uniform in ``use`` (a range of channel use per task)."""
    p = symmetric(rng.random((tasks, tasks)))
    lo, hi = use
    p[np.diag_indices(tasks)] = lo + (hi - lo) * rng.random(tasks)
    return p


def _gram(m: np.ndarray) -> np.ndarray:
    return m.T.astype(np.int64) @ m.astype(np.int64)


def _flip_gain(m: np.ndarray, e: np.ndarray) -> np.ndarray:
    """ΔE of flipping each ``M[c, i]``, E = Σ_{i<=j} (MᵀM - T)²_ij and e = MᵀM - T."""
    s = 1 - 2 * m.astype(np.float64)  # +1: 0 -> 1, -1: 1 -> 0
    e_off = e - np.diag(np.diag(e))
    a = m.astype(np.float64) @ e_off  # a[c, i] = Σ_{j != i} M[c, j] e_ij
    others = m.sum(1, keepdims=True) - m  # tasks other than i that use channel c
    return 2 * s * (np.diag(e)[None, :] + a) + 1 + others


def solve_masks(p_tilde: np.ndarray, channels: int, *, seed: int | Sequence[int] = 0,
                max_iters: int = 2000) -> np.ndarray:
    """A binary ``[C, N]`` mask whose ``(1/C) MᵀM`` approximates ``p_tilde`` (module docstring).

    Every task keeps at least one channel. The result is a pure function of the arguments.
    """
    pt = np.asarray(p_tilde, dtype=np.float64)
    n = pt.shape[0]
    c = int(channels)
    target = pt * c
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.rint(np.diag(target)).astype(np.int64), 1, c)
    m = np.zeros((c, n), dtype=np.int8)
    # Greedy construction: task by task, each next channel is the one whose overlaps with the tasks
    # placed so far bring the pairwise counts closest to their targets (random tie-break).
    for i in rng.permutation(n):
        placed = [j for j in range(n) if m[:, j].any()]
        for _ in range(int(sizes[i])):
            g = _gram(m)
            free = m[:, i] == 0
            gain = np.zeros(c)
            for j in placed:
                gain += m[:, j] * (2 * (g[i, j] - target[i, j]) + 1)
            gain = np.where(free, gain + 1e-6 * rng.random(c), np.inf)
            m[int(np.argmin(gain)), i] = 1
    # Local search: the best single flip or within-task swap while one lowers the error.
    for _ in range(max_iters):
        e = _gram(m) - target
        flip = _flip_gain(m, e)
        flip[(m == 1) & (m.sum(0) == 1)[None, :]] = np.inf  # never leave a task without a channel
        flip_best = float(flip.min())
        swap_best, swap_move = 0.0, None
        for i in range(n):
            on = np.flatnonzero(m[:, i] == 1)
            off = np.flatnonzero(m[:, i] == 0)
            if not len(on) or not len(off):
                continue
            others = np.delete(m, i, axis=1).astype(np.float64)
            shared = others[on] @ others[off].T  # tasks using both channels, besides i
            delta = flip[on, i][:, None] + flip[off, i][None, :] - 2 - 2 * shared
            k = int(np.argmin(delta))
            if delta.flat[k] < swap_best - 1e-9:
                swap_best = float(delta.flat[k])
                swap_move = (i, int(on[k // len(off)]), int(off[k % len(off)]))
        if flip_best >= -1e-9 and swap_move is None:
            break
        if swap_move is not None and swap_best <= flip_best:
            i, a, b = swap_move
            m[a, i], m[b, i] = 0, 1
        else:
            cc, i = np.unravel_index(int(np.argmin(flip)), flip.shape)
            m[cc, i] ^= 1
    return m


def mask_error(m: np.ndarray, p_tilde: np.ndarray) -> float:
    """Mean absolute error of ``(1/C) MᵀM`` against ``P̃`` over the upper triangle (diagonal included)."""
    c = m.shape[0]
    diff = np.abs(_gram(m) / c - np.asarray(p_tilde, dtype=np.float64))
    return float(diff[np.triu_indices(diff.shape[0])].mean())
