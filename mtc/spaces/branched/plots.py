"""Figures of the branched space: the tree (the paper's Fig. 2) and the affinities (its Fig. 4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtc.spaces.branched.trees import Partition, members


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def leaf_order(levels: Sequence[Partition], n: int) -> list[int]:
    """Tasks ordered so that every group of every level is contiguous (a depth-first order)."""
    def key(i: int) -> tuple[int, ...]:
        return tuple(next(k for k, b in enumerate(p) if b >> i & 1) for p in levels)

    return sorted(range(n), key=lambda i: (key(i), i))


def plot_tree(path: str | Path, levels: Sequence[Partition], tasks: Sequence[str], locations: Sequence[str],
              title: str = "") -> None:
    """Locations down, branches across, tasks at the leaves: one node per group and block, an edge
    from each group to the groups it splits into."""
    plt = _pyplot()
    n, D = len(tasks), len(levels)
    order = leaf_order(levels, n)
    x_of = {t: k for k, t in enumerate(order)}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * n + 2.5), 1.1 * (D + 2)))
    pos: list[dict[int, tuple[float, float]]] = []
    for d, p in enumerate(levels):
        pos.append({b: (float(np.mean([x_of[i] for i in members(b)])), float(-d)) for b in p})
    root = (float(np.mean(range(n))), 1.0)
    ax.plot(*root, "o", color="black", ms=6)
    ax.text(root[0], root[1] + 0.25, "input", ha="center", fontsize=9)
    for d in range(D):
        for b, (x, y) in pos[d].items():
            parent = root if d == 0 else next(v for c, v in pos[d - 1].items() if c & b == b)
            ax.plot([parent[0], x], [parent[1], y], "-", color="#4477aa", lw=2)
            ax.plot(x, y, "s", color="#4477aa", ms=9)
    leaf_y = -D + 0.2
    for i, t in enumerate(tasks):
        b = next(c for c in levels[-1] if c >> i & 1)
        x, y = pos[-1][b]
        ax.plot([x, x_of[i]], [y, leaf_y], ":", color="grey", lw=1)
        ax.text(x_of[i], leaf_y - 0.15, t, ha="center", va="top", fontsize=10, fontweight="bold")
    ax.set_yticks([-d for d in range(D)])
    ax.set_yticklabels([f"block {d + 1}\n{loc}" for d, loc in enumerate(locations)], fontsize=8)
    ax.set_xticks([])
    ax.set_xlim(-0.8, n - 0.2)
    ax.set_ylim(leaf_y - 0.8, 1.6)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_affinity(path: str | Path, A: np.ndarray, tasks: Sequence[str], locations: Sequence[str],
                  title: str = "task affinity (RSA)") -> None:
    """One heat map per location, side by side (or ``A`` of one location alone)."""
    plt = _pyplot()
    A = np.asarray(A)
    if A.ndim == 2:
        A = A[None]
    D, n = A.shape[0], len(tasks)
    fig, axes = plt.subplots(1, D, figsize=(2.6 * D + 1.2, 2.9), squeeze=False)
    im = None
    for d in range(D):
        ax = axes[0][d]
        im = ax.imshow(A[d], vmin=-1 if A.min() < 0 else 0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(tasks, rotation=45, fontsize=8)
        ax.set_yticklabels(tasks, fontsize=8)
        ax.set_title(locations[d] if d < len(locations) else f"location {d + 1}", fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{A[d, i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if A[d, i, j] < 0.6 else "black")
    assert im is not None
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
