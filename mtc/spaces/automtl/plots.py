"""Plots of a search: the policy heat-map (AutoMTL Fig. 5/7) and the task-correlation matrix."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtc.spaces.automtl.policy import OPTIONS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_policy(path: Path, logits: Mapping[str, torch.Tensor], tasks: list[str]) -> None:
    """One row of cells per task and option, one column per VCN: brighter = more probable."""
    plt = _plt()
    pis = np.stack([F.softmax(x.detach().float(), -1).numpy() for x in logits.values()], axis=1)  # [T, L, 3]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(6, 0.3 * pis.shape[1]), 1.2 * len(tasks) + 0.6),
                             squeeze=False)
    for i, t in enumerate(tasks):
        ax = axes[i][0]
        ax.imshow(pis[i].T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(3), list(OPTIONS))
        ax.set_ylabel(t)
        ax.set_xticks([])
    axes[-1][0].set_xlabel("VCN (input → output)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_correlation(path: Path, corr: np.ndarray, tasks: list[str]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 1.5, 1.2 * len(tasks) + 1))
    im = ax.imshow(corr, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", color="w" if corr[i, j] < 0.6 else "k")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
