"""Each loss weighting recomputed from its paper's equations with hand-written numpy gradients on a
small problem; PCGrad's projection on constructed conflicting gradients; the last shared layer
found in a lowered graph against a graph walk; trainer runs with every weighting resume exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import BACKBONES

from mtc.tasks.spec import TaskSpec
from mtc.train.weighting import (
    DWA,
    GradNorm,
    PCGrad,
    Uncertainty,
    UpdateInfo,
    last_shared,
    make_weighting,
    pcgrad,
)

TASKS = [TaskSpec("a", "regress", 1), TaskSpec("b", "class", 2)]


def _info(module, params, *, key="s/x", step=0, epoch=0, seed=0):
    return UpdateInfo(key=key, step=step, epoch=epoch, params=list(params), module=module, seed=seed)


class Lin(torch.nn.Module):
    """Shared ``W`` (2x3), heads ``ha``/``hb`` (1x2): ``L_t = (h_t W x_t - y_t)²``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
        self.ha = torch.nn.Parameter(torch.randn(1, 2, generator=g, dtype=torch.float64))
        self.hb = torch.nn.Parameter(torch.randn(1, 2, generator=g, dtype=torch.float64))

    def losses(self, xa, ya, xb, yb):
        la = ((self.ha @ self.W @ torch.as_tensor(xa)).squeeze() - ya) ** 2
        lb = ((self.hb @ self.W @ torch.as_tensor(xb)).squeeze() - yb) ** 2
        return {"a": la, "b": lb}


def _np_grads(m: Lin, x, y, head: str):
    """∇_W, ∇_h of (h W x - y)² by hand."""
    W, h = m.W.detach().numpy(), getattr(m, head).detach().numpy()
    e = float((h @ W @ x)[0]) - y
    return 2 * e * h.T @ x[None, :], 2 * e * (W @ x)[None, :], e * e


XA, YA, XB, YB = np.array([1.0, -2.0, 0.5]), 0.3, np.array([0.2, 1.0, -1.0]), -1.2


def test_uncertainty_follows_kendall_eq7():
    m = Lin()
    w = make_weighting("uncertainty", TASKS, {"a": 1.0, "b": 1.0})
    assert isinstance(w, Uncertainty)
    sa, sb = 0.4, -0.7
    with torch.no_grad():
        w.params["log_var/a"].fill_(sa)
        w.params["log_var/b"].fill_(sb)
    out = w.backward(m.losses(XA, YA, XB, YB), None, _info(m, m.parameters()))
    gWa, gha, la = _np_grads(m, XA, YA, "ha")
    gWb, ghb, lb = _np_grads(m, XB, YB, "hb")
    # regression: ½e^{-s}L + ½s (= L/2σ² + log σ); classification: e^{-s}L + ½s (= L/σ² + log σ)
    np.testing.assert_allclose(m.W.grad.numpy(), 0.5 * math.exp(-sa) * gWa + math.exp(-sb) * gWb, rtol=1e-6)
    np.testing.assert_allclose(m.ha.grad.numpy(), 0.5 * math.exp(-sa) * gha, rtol=1e-6)
    np.testing.assert_allclose(m.hb.grad.numpy(), math.exp(-sb) * ghb, rtol=1e-6)
    assert float(w.params["log_var/a"].grad) == pytest.approx(-0.5 * math.exp(-sa) * la + 0.5, rel=1e-5)
    assert float(w.params["log_var/b"].grad) == pytest.approx(-math.exp(-sb) * lb + 0.5, rel=1e-5)
    assert out["weighting"] == pytest.approx({"a": 0.5 * math.exp(-sa), "b": math.exp(-sb)})


def test_dwa_follows_liu_eq7_over_data_epochs():
    m = Lin()
    w = make_weighting("dwa", TASKS, {"a": 1.0, "b": 3.0})
    assert isinstance(w, DWA) and w.temperature == 2.0
    rng = np.random.default_rng(1)
    per_epoch = [rng.uniform(0.5, 2.0, size=(3, 2)) for _ in range(4)]  # 4 epochs of 3 steps, 2 tasks
    means = [e.mean(0) for e in per_epoch]
    for epoch, rows in enumerate(per_epoch):
        for step, (la, lb) in enumerate(rows):
            m.zero_grad()
            t = torch.ones((), dtype=torch.float64, requires_grad=True)
            out = w.backward({"a": t * la, "b": t * lb}, None, _info(m, [], step=epoch * 3 + step, epoch=epoch))
            if epoch < 2:
                expect = np.ones(2)
            else:
                r = means[epoch - 1] / means[epoch - 2]
                expect = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
            # (the epoch means are accumulated from the float32 losses)
            np.testing.assert_allclose([out["weighting"]["a"], out["weighting"]["b"]], expect, rtol=1e-6)
            # the loss backpropagated is Σ λ_k w_k L_k
            assert float(t.grad) == pytest.approx(1.0 * expect[0] * la + 3.0 * expect[1] * lb, rel=1e-6)


def test_gradnorm_follows_chen_on_the_last_shared_layer():
    m = Lin()
    w = make_weighting("gradnorm", TASKS, {"a": 1.0, "b": 1.0})
    assert isinstance(w, GradNorm) and w.alpha == 1.5
    # step 0 fixes L(0)
    w.backward(m.losses(XA, YA, XB, YB), None, _info(m, m.parameters()))
    assert w.layer == "W"  # shared by both losses; ha/hb are not
    _, _, la0 = _np_grads(m, XA, YA, "ha")
    _, _, lb0 = _np_grads(m, XB, YB, "hb")
    # move the network and the weights, then check one step by hand
    with torch.no_grad():
        m.W.add_(0.1)
        w.params["w/a"].fill_(1.3)
        w.params["w/b"].fill_(0.7)
    m.zero_grad()
    w.zero_grad()
    w.backward(m.losses(XA, YA, XB, YB), None, _info(m, m.parameters(), step=1))
    gWa, gha, la = _np_grads(m, XA, YA, "ha")
    gWb, ghb, lb = _np_grads(m, XB, YB, "hb")
    wv = np.array([1.3, 0.7])
    n = np.array([np.linalg.norm(gWa), np.linalg.norm(gWb)])
    G = wv * n
    lt = np.array([la / la0, lb / lb0])
    target = G.mean() * (lt / lt.mean()) ** 1.5
    np.testing.assert_allclose([float(w.params["w/a"].grad), float(w.params["w/b"].grad)],
                               np.sign(G - target) * n, rtol=1e-5)
    # the network trains on Σ w_i L_i (w held constant there)
    np.testing.assert_allclose(m.W.grad.numpy(), 1.3 * gWa + 0.7 * gWb, rtol=1e-6)
    np.testing.assert_allclose(m.ha.grad.numpy(), 1.3 * gha, rtol=1e-6)
    w.step()
    assert float(w.params["w/a"].detach() + w.params["w/b"].detach()) == pytest.approx(2.0)  # Σ w_i = T


def test_last_shared_is_the_last_layer_before_the_heads_in_a_lowered_graph():
    import onnx_ir as ir

    from mtc.frontends import import_model
    from mtc.lower.module import lower
    from mtc.passes.pipeline import prepare_multitask

    m = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    prepare_multitask(m, tasks="a:regress:1,b:class:2", head_width=8)
    module = lower(m)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outs = module(x)
    losses = {"a": outs[0].pow(2).mean(), "b": outs[1].pow(2).mean()}
    found = last_shared(module, losses)
    # oracle: a graph walk; the weights (>= 2 dims) read by nodes that are ancestors of every output,
    # the last of them in topological order
    graph = m.graph
    order = {n: i for i, n in enumerate(graph)}

    def ancestors(v: ir.Value) -> set[ir.Node]:
        seen: set[ir.Node] = set()
        todo = [v.producer()]
        while todo:
            n = todo.pop()
            if n is None or n in seen:
                continue
            seen.add(n)
            todo.extend(i.producer() for i in n.inputs if i is not None)
        return seen

    common = set.intersection(*(ancestors(o) for o in graph.outputs))
    weights = {name for name, v in graph.initializers.items()
               if v.const_value is not None and len(v.const_value.shape) >= 2}
    cands = [(order[n], i.name) for n in common for i in n.inputs if i is not None and i.name in weights]
    assert found == max(cands)[1]
    assert not found.startswith("head")


def test_pcgrad_projection_on_conflicting_gradients():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1·g2 = -1 < 0: g1' = g1 - (g1·g2)/|g2|² g2 = (0.5, 0.5); g2' = g2 - (g2·g1)/|g1|² g1 = (0, 1)
    out = pcgrad([g1, g2], lambda i: [1 - i])
    np.testing.assert_allclose(out.numpy(), [0.5, 1.5])
    # no conflict: plain sum
    np.testing.assert_allclose(pcgrad([g1, torch.tensor([1.0, 2.0])], lambda i: [1 - i]).numpy(), [2.0, 2.0])
    # three tasks: the result depends on the order; recompute Algorithm 1 in numpy
    rng = np.random.default_rng(3)
    gs = [rng.normal(size=5) for _ in range(3)]
    gs[1] = -gs[0] + 0.3 * rng.normal(size=5)
    orders = {0: [2, 1], 1: [0, 2], 2: [1, 0]}

    def np_pc(i):
        pc = gs[i].copy()
        for j in orders[i]:
            d = pc @ gs[j]
            if d < 0:
                pc = pc - d / (gs[j] @ gs[j]) * gs[j]
        return pc

    out = pcgrad([torch.tensor(g) for g in gs], lambda i: orders[i])
    np.testing.assert_allclose(out.numpy(), sum(np_pc(i) for i in range(3)), rtol=1e-10)


def test_pcgrad_weighting_projects_only_shared_parameters():
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # shared
    own = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # task a's alone
    unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # no loss reaches it
    mod = torch.nn.Module()
    mod.theta, mod.own, mod.unused = theta, own, unused
    g1, g2, ga = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([-3.0, 2.0])
    losses = {"a": (g1.double() * theta).sum() + (ga.double() * own).sum(), "b": (g2.double() * theta).sum()}
    w = make_weighting("pcgrad", TASKS, {"a": 1.0, "b": 1.0})
    assert isinstance(w, PCGrad)
    out = w.backward(losses, None, _info(mod, [theta, own, unused]))
    assert unused.grad is None  # as after backward(): an optimiser skips it
    np.testing.assert_allclose(theta.grad.numpy(), [0.5, 1.5])
    np.testing.assert_allclose(own.grad.numpy(), ga.numpy())  # task-specific: its own gradient, unprojected
    assert out["pcgrad_conflicts"] == 1


def test_unknown_weighting_and_bad_constants():
    from mtc.errors import MtcError

    with pytest.raises(MtcError, match="unknown --weighting 'nope'"):
        make_weighting("nope", TASKS, {})
    with pytest.raises(MtcError, match="dwa-temperature"):
        make_weighting("dwa", TASKS, {}, dwa_temperature=0)
