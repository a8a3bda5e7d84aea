"""AutoMTL search pieces against the paper's equations, computed independently in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtc.errors import MtcError
from mtc.spaces.automtl.search import (
    TauSchedule,
    derive_policy,
    policy_json,
    policy_regularizer,
    sample_policy,
    sharing_fraction,
    task_correlation,
)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_regularizer_matches_eq3():
    rng = np.random.default_rng(0)
    raw = {f"v{d}": rng.standard_normal((3, 3)).astype(np.float32) for d in range(1, 5)}
    depths = {f"v{d}": d for d in range(1, 5)}
    logits = {k: torch.tensor(v, requires_grad=True) for k, v in raw.items()}
    got = policy_regularizer(logits, depths)
    L = 4
    want = 0.0
    for k, x in raw.items():
        p = _softmax(x)
        sp = np.log1p(np.exp(p[:, 1] - p[:, 0])) + np.log1p(np.exp(p[:, 2] - p[:, 0]))
        want += (L - depths[k]) / L * sp.sum()
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    assert torch.all(logits["v4"].grad == 0)  # depth L has weight 0
    assert torch.any(logits["v1"].grad != 0)
    # descending the regulariser raises the shared option's probability
    with torch.no_grad():
        before = torch.softmax(logits["v1"], -1)[:, 0].clone()
        logits["v1"] -= 1.0 * logits["v1"].grad
        assert torch.all(torch.softmax(logits["v1"], -1)[:, 0] > before)


def test_regularizer_needs_vcns():
    with pytest.raises(MtcError):
        policy_regularizer({}, {})


def test_tau_schedule():
    s = TauSchedule(tau0=5.0, steps=100)
    assert s(0) == 5.0
    assert s(100) == pytest.approx(0.5, rel=1e-6)
    assert s(10_000) == 0.1
    assert TauSchedule(decay=0.5, tau_min=0.0)(3) == pytest.approx(0.625)


def test_derive_sample_and_correlation():
    tasks = ["a", "b", "c"]
    logits = {
        "v1": torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0]]),
        "v2": torch.tensor([[0, 5.0, 0], [0, 5.0, 0], [5.0, 0, 0]]),
    }
    pol = derive_policy(logits, tasks)
    assert pol.choices == {"v1": {"a": 0, "b": 0, "c": 2}, "v2": {"a": 1, "b": 1, "c": 0}}
    assert sharing_fraction(pol, "a", "b") == 0.5
    corr = task_correlation(logits, tasks)
    assert corr.shape == (3, 3)
    np.testing.assert_allclose(np.diag(corr), 1.0, rtol=1e-6)
    np.testing.assert_allclose(corr, corr.T, rtol=1e-6)
    assert corr[0, 1] == pytest.approx(1.0) and corr[0, 2] < 0.2
    draws = [sample_policy(logits, tasks, torch.Generator().manual_seed(s)) for s in range(20)]
    agree = np.mean([d.choices == pol.choices for d in draws])
    assert agree > 0.8  # peaked distributions sample their mode almost always
    js = policy_json(logits, tasks, pol)
    assert js["tasks"]["c"]["v1"]["chosen"] == "skip"
    assert sum(js["tasks"]["a"]["v2"]["pi"]) == pytest.approx(1.0, abs=1e-5)


def test_lambda_reg_scales_with_the_budget():
    from mtc.spaces.automtl.search import PAPER_POLICY_STEPS, SearchOptions

    # the paper's budget uses Table 1's value; shorter searches get the same total pull
    assert SearchOptions(policy_steps=PAPER_POLICY_STEPS).effective_lambda_reg() == pytest.approx(1e-3)
    assert SearchOptions(policy_steps=400).effective_lambda_reg() == pytest.approx(1e-2)
    assert SearchOptions(policy_steps=400, lambda_reg=0.0).effective_lambda_reg() == 0.0
    assert SearchOptions(policy_steps=400, lambda_reg_scaling="none").effective_lambda_reg() == 1e-3
    with pytest.raises(MtcError, match="scaling"):
        SearchOptions(lambda_reg_scaling="linear")
    with pytest.raises(MtcError, match=">= 0"):
        SearchOptions(lambda_reg=-1.0)
