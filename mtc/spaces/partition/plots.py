"""The partition space's figure (matplotlib, optional): Newell et al.'s Fig. 5, proxy score against
mean channel use, random samples in grey and the ES samples over them coloured by step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_samples(path: Path, samples: Sequence[dict[str, Any]], *, best: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    rnd = [s for s in samples if s["kind"] == "random"]
    es = [s for s in samples if s["kind"] == "es"]
    if rnd:
        ax.scatter([s["mean_use"] for s in rnd], [s["score"] for s in rnd], s=14, c="0.6", label="random P")
    if es:
        sc = ax.scatter([s["mean_use"] for s in es], [s["score"] for s in es], s=14,
                        c=[s["step"] for s in es], cmap="viridis", label="ES samples")
        fig.colorbar(sc, ax=ax, label="ES step")
    for s in samples:
        if s["index"] == best:
            ax.scatter([s["mean_use"]], [s["score"]], s=80, marker="*", c="red", label="best (plan)")
    ax.set_xlabel("mean channel use (mean of diag P)")
    ax.set_ylabel("proxy score")
    ax.set_title("partitionings: proxy score vs channel use")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
