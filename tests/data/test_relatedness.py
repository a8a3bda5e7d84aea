"""``relatedness``: the Gumbel-Matrix appendix A1 generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtc.data import load_data
from mtc.errors import MtcError
from mtc.tasks.spec import parse_tasks

TASKS = parse_tasks("y1:regress,y2:regress")
SHAPE = (1, 8, 16)  # C*H*W = 128 = the paper's d


def _targets(ds, n):
    return np.array([[ds[i][1]["y1"].item(), ds[i][1]["y2"].item()] for i in range(n)])


def test_formats_and_paper_formula():
    train, val = load_data("relatedness?rho=0.3&n_train=5&n_val=3", TASKS, SHAPE, 1)
    p = val.problem
    assert np.allclose([p.u1 @ p.u1, p.u2 @ p.u2, p.u1 @ p.u2], [1, 1, 0], atol=1e-12)
    assert np.allclose(p.w1, p.u1) and np.allclose(p.w2, 0.3 * p.u1 + math.sqrt(1 - 0.09) * p.u2)
    assert np.allclose(p.alphas, np.arange(1, 7)) and np.allclose(p.betas, np.arange(6) ** 2)
    x, t = train[0]
    assert x.dtype == torch.float32 and x.shape == SHAPE
    assert t["y1"].shape == (1,) and t["y1"].dtype == torch.float32
    # y = wᵀx + Σ sin(α_k wᵀx + β_k) + ε, with |ε| small (std 0.1)
    xv = x.double().flatten().numpy()
    s = xv @ p.w1
    y1 = s + np.sin(np.arange(1, 7) * s + np.arange(6) ** 2).sum()
    assert abs(t["y1"].item() - y1) < 0.5
    # noise_var=0 reproduces the formula exactly
    train0, val0 = load_data("relatedness?rho=0.3&n_train=5&n_val=3&noise_var=0", TASKS, SHAPE, 1)
    x0, t0 = train0[0]
    assert torch.equal(x0, x)
    assert t0["y1"].item() == pytest.approx(float(np.float32(y1)), abs=1e-5)
    assert t0["y2"].item() == pytest.approx(float(val0.problem.clean(xv)[1]), abs=1e-5)


def test_rho_one_makes_the_weights_equal_and_m_zero_linear():
    _, val = load_data("relatedness?rho=1&c=2.5", TASKS, SHAPE, 0)
    assert np.allclose(val.problem.w1, val.problem.w2) and np.isclose(np.linalg.norm(val.problem.w1), 2.5)
    _, val = load_data("relatedness?m=0&noise_var=0&n_val=3", TASKS, SHAPE, 0)
    x, t = val[2]
    assert t["y1"].item() == pytest.approx(float(x.double().flatten() @ torch.from_numpy(val.problem.w1)), abs=1e-5)


def test_correlation_grows_with_rho():
    corr = []
    for rho in (0.0, 0.5, 1.0):
        train, _ = load_data(f"relatedness?rho={rho}&n_train=600", TASKS, SHAPE, 0)
        corr.append(np.corrcoef(_targets(train, 600).T)[0, 1])
    assert abs(corr[0]) < 0.15 and corr[0] < corr[1] < corr[2] and corr[2] > 0.95, corr


def test_smaller_d_is_tiled_and_deterministic():
    train, _ = load_data("relatedness?d=32&n_train=4", TASKS, (2, 8, 8), 5)
    x, _ = train[3]
    flat = x.flatten()
    assert torch.equal(flat[:32], flat[32:64]) and torch.equal(flat[:32], flat[96:])
    again, _ = load_data("relatedness?d=32&n_train=4", TASKS, (2, 8, 8), 5)
    assert torch.equal(again[3][0], x) and torch.equal(again[3][1]["y2"], train[3][1]["y2"])
    other, _ = load_data("relatedness?d=32&n_train=4", TASKS, (2, 8, 8), 6)
    assert not torch.equal(other[3][0], x)
    full, _ = load_data("relatedness?d=0&n_train=1", TASKS, (2, 8, 8), 5)
    assert full[0][0].flatten().unique().numel() == 128


@pytest.mark.parametrize(
    "tasks,spec,needle",
    [
        ("y1:regress", "relatedness", "exactly two tasks"),
        ("y1:regress,y2:regress,y3:regress", "relatedness", "y3 (regress:1)"),
        ("y1:regress,c:class", "relatedness", "c (class:10)"),
        ("y1:regress:2,y2:regress", "relatedness", "y1 (regress:2)"),
        ("y1:regress,y2:regress", "relatedness?rho=1.5", "rho must lie in [0, 1]"),
        ("y1:regress,y2:regress", "relatedness?d=200", "d=200 exceeds the input size"),
        ("y1:regress,y2:regress", "relatedness?alphas=1,2", "needs m = 6 values"),
    ],
)
def test_errors(tasks, spec, needle):
    with pytest.raises(MtcError) as e:
        load_data(spec, parse_tasks(tasks), SHAPE, 0)
    assert needle in str(e.value) and str(e.value).startswith(f"--data '{spec}'"), str(e.value)
