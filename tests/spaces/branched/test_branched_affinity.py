"""RDMs and affinities against an independent recomputation (issue 13, "Done when" 1): numpy's
``corrcoef`` for the RDMs and ``scipy.stats.spearmanr`` for the affinities, on fixed features."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from mtc.spaces.branched.affinity import affinities, ranks, rdm, spearman_matrix, upper


def _features(seed: int, tasks: int = 3, locations: int = 2, k: int = 12):
    rng = np.random.default_rng(seed)
    shapes = [(k, 4, 3, 3), (k, 6)]
    # task 1 is task 0 plus a little noise (related), task 2 is unrelated
    out = []
    for d in range(locations):
        base = rng.normal(size=shapes[d])
        per = [base, base + 0.3 * rng.normal(size=shapes[d])] + [rng.normal(size=shapes[d]) for _ in range(tasks - 2)]
        out.append(per)
    return out


def test_rdm_is_one_minus_numpy_corrcoef():
    feats = _features(0)
    for per in feats:
        for f in per:
            want = 1.0 - np.corrcoef(f.reshape(len(f), -1))
            np.testing.assert_allclose(rdm(f), want, atol=1e-12)
            assert np.allclose(np.diag(rdm(f)), 0)


def test_affinity_is_scipy_spearman_of_the_upper_triangles():
    feats = _features(1)
    A, rdms = affinities(feats)
    assert A.shape == (2, 3, 3) and rdms.shape == (2, 3, 12, 12)
    iu = np.triu_indices(12, k=1)
    for d, per in enumerate(feats):
        R = [1.0 - np.corrcoef(f.reshape(len(f), -1)) for f in per]
        for i in range(3):
            assert A[d, i, i] == 1.0
            for j in range(3):
                if i != j:
                    want = spearmanr(R[i][iu], R[j][iu]).statistic
                    assert A[d, i, j] == pytest.approx(want, abs=1e-10)
        assert A[d, 0, 1] > A[d, 0, 2] and A[d, 0, 1] > A[d, 1, 2]  # the related pair


def test_ties_get_average_ranks_like_scipy():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, 50).astype(float)
    y = rng.integers(0, 3, 50).astype(float)
    from scipy.stats import rankdata

    np.testing.assert_allclose(ranks(x), rankdata(x))
    assert spearman_matrix([x, y])[0, 1] == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_degenerate_features_give_defined_values():
    f = np.random.default_rng(3).normal(size=(5, 7))
    f[2] = 1.0  # a constant feature vector: no correlation with anything
    r = rdm(f)
    assert np.isfinite(r).all() and np.allclose(r[2, [0, 1, 3, 4]], 1.0) and r[2, 2] == 0
    flat = np.zeros(10)
    m = spearman_matrix([flat, np.arange(10.0)])
    assert m[0, 1] == 0 and m[0, 0] == 1 and np.isfinite(m).all()
    assert upper(np.arange(9.0).reshape(3, 3)).tolist() == [1, 2, 5]
