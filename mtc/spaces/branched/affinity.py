"""Representation similarity analysis (Vandenhende et al., 3.1; after Dwivedi and Roig).

For task ``t`` and location ``d``, each of K held-out images gives a feature vector (the location's
activation, flattened). The representation dissimilarity matrix is

    RDM^t_d[k, l] = 1 − pearson(f_k, f_l)            (K × K, zero diagonal)

and the affinity of tasks ``i`` and ``j`` at ``d`` is the Spearman correlation of the upper
triangles of their RDMs, ``A[d, i, j] = r_s(triu(RDM^i_d), triu(RDM^j_d))`` (D × N × N, diagonal 1).

Degenerate inputs get defined values instead of NaN: an image whose features are constant has
correlation 0 with every other image (dissimilarity 1), and an RDM whose upper triangle is
constant has Spearman correlation 0 with any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rdm(features: np.ndarray) -> np.ndarray:
    """``1 − Pearson correlation`` between the rows of ``features`` (``[K, ...]``, flattened per row)."""
    f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    f = f - f.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(f, axis=1)
    safe = np.where(norm > 0, norm, 1.0)
    z = f / safe[:, None]
    corr = np.clip(z @ z.T, -1.0, 1.0)
    corr[norm == 0, :] = 0.0
    corr[:, norm == 0] = 0.0
    out = 1.0 - corr
    np.fill_diagonal(out, 0.0)
    return out


def upper(m: np.ndarray) -> np.ndarray:
    """The strict upper triangle of a square matrix, row by row."""
    i, j = np.triu_indices(m.shape[0], k=1)
    return m[i, j]


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's coefficient needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    s = x[order]
    r = np.empty(len(x))
    # runs of equal values share the mean of their positions
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        r[order[a:b]] = (a + b + 1) / 2.0
    return r


def spearman_matrix(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Spearman correlations between every pair of vectors (diagonal 1)."""
    rk = np.stack([ranks(v) for v in vectors])
    rk = rk - rk.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(rk, axis=1)
    safe = np.where(norm > 0, norm, 1.0)
    z = rk / safe[:, None]
    out = np.clip(z @ z.T, -1.0, 1.0)
    out[norm == 0, :] = 0.0
    out[:, norm == 0] = 0.0
    np.fill_diagonal(out, 1.0)
    return out


def affinities(features: Sequence[Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The affinity tensor from features ``features[d][t]`` (``[K, ...]`` per location and task).

    Returns:
        ``A`` (``[D, N, N]``) and the RDMs (``[D, N, K, K]``).
    """
    rdms = np.stack([np.stack([rdm(f) for f in per_task]) for per_task in features])
    A = np.stack([spearman_matrix([upper(r) for r in per_d]) for per_d in rdms])
    return A, rdms
