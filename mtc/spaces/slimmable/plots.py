"""Figures of an ECMT search: task losses across preferences (the paper's Fig. 4), the marginal
effect of each task's preference (Fig. 7), and the predictor on held-out sub-networks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_controllability(path: Path, report: dict[str, Any], tasks: list[str]) -> None:
    """Per task (columns) and budget (rows): each drawn preference's τ_i against the measured loss of
    task i of the searched sub-network (ECMT) and of a random encoder; HV in the row title."""
    plt = _plt()
    budgets = report["budgets"]
    fig, axes = plt.subplots(len(budgets), len(tasks), figsize=(3.2 * len(tasks), 2.6 * len(budgets)),
                             squeeze=False)
    for bi, b in enumerate(budgets):
        for ti, t in enumerate(tasks):
            ax = axes[bi][ti]
            tau = np.array([r["preference"][ti] for r in b["rows"]])
            order = np.argsort(tau)
            for key, style in (("ecmt", "o-"), ("random", "x--")):
                loss = np.array([r[key]["losses"][ti] for r in b["rows"]])
                ax.plot(tau[order], loss[order], style, ms=3, lw=1, label=key)
            ax.set_xlabel(f"preference τ_{t}")
            if ti == 0:
                ax.set_ylabel(f"{b['budget']} ({b['macs'] / 1e6:.3g} MMAC)\nloss")
            ax.set_title(f"{t}: HV {b['hv']:.4g} (random {b['hv_random']:.4g})", fontsize=8)
            if bi == 0 and ti == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_marginal(path: Path, report: dict[str, Any], tasks: list[str]) -> None:
    """Per task: its primary metric against its own preference (the others random), for the largest
    and the smallest encoder and for Algorithm 2's encoder at the first budget; Spearman ρ in the legend."""
    plt = _plt()
    sweep = report["sweep"]
    levels = np.array(sweep["levels"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 2.8), squeeze=False)
    for ti, t in enumerate(tasks):
        ax = axes[0][ti]
        e = sweep["tasks"][t]
        for name in ("largest", "smallest", "searched"):
            rho = e[name]["spearman_metric"]
            label = f"{name} (ρ={rho:.2f})" if rho == rho else name
            ax.plot(levels, e[name]["mean_metric"], "o-", ms=3, lw=1, label=label)
        ax.set_xlabel(f"preference τ_{t}")
        ax.set_ylabel(f"{t} {e['metric']} ({'↑' if e['higher_is_better'] else '↓'})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_predictor(path: Path, predicted: np.ndarray, measured: np.ndarray, tasks: list[str],
                   rank: dict[str, float]) -> None:
    """Predicted against measured loss of the held-out sub-networks, one panel per task."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.0 * len(tasks), 2.8), squeeze=False)
    for ti, t in enumerate(tasks):
        ax = axes[0][ti]
        ax.scatter(measured[:, ti], predicted[:, ti], s=8)
        lo = float(min(measured[:, ti].min(), predicted[:, ti].min()))
        hi = float(max(measured[:, ti].max(), predicted[:, ti].max()))
        ax.plot([lo, hi], [lo, hi], "k:", lw=1)
        ax.set_xlabel(f"{t} loss, measured")
        ax.set_ylabel("predicted")
        ax.set_title(f"Spearman {rank[t]:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
