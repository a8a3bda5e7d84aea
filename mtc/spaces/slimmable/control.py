"""Controllability measures (no torch): preferences drawn as CDMA draws them, the hypervolume of the
sub-networks' task losses, and the reference point.

HV (Zitzler & Thiele) of a set of points in task-loss space (lower is better) is the volume they
dominate up to a reference point; computed with ``moocore``. The paper follows CDMA: 20 preferences
from a Dirichlet distribution (α = 0.2 on NYUD-v2 and PASCAL-Context), reference points [4, 4, 4]
(NYUD-v2) and [3, ...] (PASCAL-Context).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtc.errors import MtcError


def dirichlet_preferences(tasks: int, n: int, alpha: float, seed: int) -> np.ndarray:
    """``n`` preferences ``[n, tasks]`` from a symmetric Dirichlet(α) (rows sum to 1)."""
    if tasks == 1:
        return np.ones((n, 1))
    return np.random.default_rng([seed, 0xD1]).dirichlet([alpha] * tasks, size=n)


def hypervolume(points: np.ndarray, ref: Sequence[float]) -> float:
    """HV of ``points`` ``[n, d]`` (minimised) up to ``ref``; points beyond ``ref`` add nothing."""
    import moocore

    p = np.asarray(points, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(r):
        raise MtcError(f"hypervolume: points of dimension {p.shape[-1]} against a reference point of {len(r)}")
    p = p[np.all(p < r, axis=1)]
    if len(p) == 0:
        return 0.0
    return float(moocore.hypervolume(p, ref=r))


def auto_reference(losses: np.ndarray, factor: float = 1.1) -> list[float]:
    """``factor`` times the largest loss of each task among ``losses`` ``[n, tasks]``."""
    return [float(factor * v) for v in np.asarray(losses, dtype=np.float64).max(axis=0)]


def resolve_budget(text: str, largest: int) -> float:
    """A budget of the HV figures: ``50%`` of the largest sub-network, or a MAC count."""
    from mtc.spaces.slimmable.options import parse_macs

    t = text.strip()
    if t.endswith("%"):
        return float(t[:-1]) / 100.0 * largest
    return parse_macs(t)
