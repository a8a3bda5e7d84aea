"""Figures of the allocation space (matplotlib, optional): the binary task embeddings (the paper's
Fig. 5) and their pairwise cosine similarity (Fig. 6)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_embeddings(path: Path, emb: np.ndarray, tasks: Sequence[str], sites: Sequence[str],
                    components: Sequence[int]) -> None:
    """Rows: tasks; columns: the components of every site; yellow: allocated (Fig. 5)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * emb.shape[1] + 2), max(2.0, 0.35 * len(tasks) + 1)))
    ax.imshow(emb, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(tasks)), list(tasks))
    edges = np.cumsum(components)[:-1]
    for e in edges:
        ax.axvline(e - 0.5, color="white", lw=1)
    centers = np.cumsum(components) - np.asarray(components) / 2 - 0.5
    ax.set_xticks(centers, [s if len(s) < 18 else "…" + s[-16:] for s in sites], rotation=30, ha="right", fontsize=7)
    ax.set_title("binary allocation per task (task embeddings)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_similarity(path: Path, sim: np.ndarray, tasks: Sequence[str]) -> None:
    """Pairwise cosine similarity of the task embeddings (Fig. 6)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(3.5, 0.4 * len(tasks) + 2), max(3.0, 0.4 * len(tasks) + 1.5)))
    im = ax.imshow(sim, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(tasks)), list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), list(tasks))
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("cosine similarity of task embeddings")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
