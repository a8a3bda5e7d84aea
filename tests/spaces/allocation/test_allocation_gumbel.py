"""The Gumbel-Matrix pieces (Maziarz et al., Sec. III) against independent recomputations: the
temperature schedule, straight-through sampling (hard forward, the softmax relaxation's gradient
backward, checked against torch's own soft Gumbel-softmax under the same noise), the
maximum-likelihood allocation at inference and zeros for a task allocated nothing, p_init, the
budget penalty and e_c in numpy, the allocation logits' own learning rate, plans of allocations and
the task embeddings' cosine similarity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from channelnets import Builder

from mtc.ir import supergraph as sg

TASKS = "a:class:3,b:class:3,c:class:3"


def _model(components: str = "4", sites: str = "relu2"):
    from mtc.spaces import compile_supergraph

    b = Builder(seed=1)
    h = b.op("Relu", b.conv("x", 2, 8, k=3, name="conv1"), name="relu1")
    h = b.op("Relu", b.conv(h, 8, 8, k=3, name="conv2"), name="relu2")
    m = b.model({"x": ["N", 2, 6, 6]}, [h])
    compile_supergraph(m, tasks=TASKS, head_width=8, space="allocation", sites=sites, components=components,
                       feature="relu2")
    return m


def test_temperature_schedule_of_the_authors_code():
    from mtc.spaces.allocation.search import temperature

    assert temperature(0) == 50.0
    assert temperature(99) == pytest.approx(5.0)
    assert temperature(9999) == pytest.approx(0.5)
    assert temperature(10**6) == 0.5
    assert temperature(3, tau0=2.0, tau_min=0.1) == pytest.approx(1.0)


def test_straight_through_forward_is_hard_and_backward_is_the_softmax_relaxation():
    from mtc.spaces.allocation.lowering import controls_of, search_network

    module = search_network(_model(), p_init=0.5)
    ctl = controls_of(module)
    ctl.tau = 0.7
    site = next(iter(ctl.logits))
    logits = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(11)
    a = ctl.allocation(site, logits, True)
    (w * a).sum().backward()
    g_st = logits.grad.clone()
    ref = logits.detach().clone().requires_grad_(True)
    torch.manual_seed(11)
    soft = F.gumbel_softmax(ref, tau=0.7, hard=False, dim=-1)[..., 0]
    (w * soft).sum().backward()
    assert set(a.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a.detach(), (soft.detach() > 0.5).float())  # the argmax of the same noisy logits
    torch.testing.assert_close(g_st, ref.grad)


def test_inference_uses_the_ml_allocation_and_an_empty_task_gets_zeros():
    from mtc.spaces.allocation.lowering import LOGITS, controls_of, ml_allocation, search_network

    model = _model()
    module = search_network(model, p_init=0.5)
    ctl = controls_of(module)
    site = sg.choices_of(model, "mask")[0].name
    p = torch.tensor([[0.9, 0.2, 0.7, 0.4], [0.1, 0.1, 0.1, 0.1], [0.6, 0.6, 0.6, 0.6]])
    with torch.no_grad():
        module.named_initializers()[site + LOGITS].copy_(torch.stack([p.log(), (1 - p).log()], -1))
    assert ml_allocation(ctl)[site] == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    module.eval()
    x1, x2 = torch.randn(2, 2, 6, 6), 3 * torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        o1, o2 = module(x1), module(x2)
    bias = module.named_initializers()["head@b/fc.bias"]
    # task b uses no component: its feature is zero, its head returns its bias for every input
    torch.testing.assert_close(o1[1], bias.expand(2, -1))
    torch.testing.assert_close(o2[1], bias.expand(2, -1))
    assert not torch.allclose(o1[0], o2[0])
    # the same as the fixed plan of that allocation, lowered generically
    from mtc.lower.supergraph import lower_fixed
    from mtc.spaces.allocation import plan_from_allocation

    alloc = ml_allocation(ctl)
    plan = plan_from_allocation(model, alloc)
    # a plan keeps one component for an empty task (b): compare the other tasks
    fixed = lower_fixed(model, plan).eval()
    own = fixed.named_initializers()
    fixed.load_ir_state({k: v for k, v in module.named_initializers().items() if k in own}, strict=False)
    with torch.no_grad():
        f1 = fixed(x1)
    torch.testing.assert_close(f1[0], o1[0])
    torch.testing.assert_close(f1[2], o1[2])


def test_p_init_budget_penalty_and_learning_rates():
    from mtc.spaces.allocation import Allocation
    from mtc.spaces.allocation.lowering import controls_of, search_network
    from mtc.spaces.allocation.options import GUMBEL_OPTIONS
    from mtc.spaces.allocation.search import GumbelMatrix, budget_penalty

    model = _model()
    module = search_network(model, p_init=0.8)
    ctl = controls_of(module)
    np.testing.assert_allclose(ctl.probabilities()[next(iter(ctl.logits))].numpy(), 0.8, rtol=1e-6)
    logits = {k: torch.randn_like(v) for k, v in ctl.logits.items()}
    with torch.no_grad():
        for k, v in logits.items():
            ctl.logits[k].copy_(v)
    l0 = np.concatenate([v[..., 0].numpy().ravel() for v in logits.values()])
    l1 = np.concatenate([v[..., 1].numpy().ravel() for v in logits.values()])
    e_c = np.mean(1 / (1 + np.exp(l1 - l0)))
    assert float(ctl.expected_fraction()) == pytest.approx(e_c, rel=1e-6)
    assert float(budget_penalty(torch.tensor(0.9), 0.75, 2.0)) == pytest.approx(0.3)
    assert float(budget_penalty(torch.tensor(0.6), 0.75, 2.0)) == 0.0
    opts = {o.name: o.default for o in GUMBEL_OPTIONS}
    for rule, want in (("fixed", 6e-3), ("tasks", 3 * 3e-4)):
        s = GumbelMatrix(Allocation(), model, {**opts, "alloc_lr_rule": rule})
        s.tasks, s.sites = sg.task_names(model), list(ctl.logits)
        specs = {o.name: o for o in s.optimizers(module)}
        assert specs["allocation"].lr == pytest.approx(want) and specs["weights"].lr == 3e-4
        assert set(specs["allocation"].params) == {k + ".alloc" for k in ctl.logits}
        assert not set(specs["allocation"].params) & set(specs["weights"].params)


def test_plans_of_allocations_and_embeddings():
    from mtc.spaces.allocation import plan_from_allocation
    from mtc.spaces.allocation.lowering import cosine_similarity, task_embeddings

    model = _model(components="3")
    c = sg.choices_of(model, "mask")[0]
    assert c.info["components"] == [[0, 3], [3, 6], [6, 8]]  # 8 channels in 3 blocks
    plan = plan_from_allocation(model, {c.name: [[1, 0, 1], [0, 0, 0], [0, 1, 0]]},
                                probabilities={c.name: [[0.9, 0.1, 0.8], [0.2, 0.4, 0.3], [0.1, 0.9, 0.1]]})
    assert plan.masks[c.name] == {"a": [0, 1, 2, 6, 7], "b": [3, 4, 5], "c": [3, 4, 5]}
    assert plan.info["active_fraction"] == pytest.approx(4 / 9)  # b keeps its most probable component
    emb = task_embeddings({"s": [[1, 0, 1], [0, 1, 0]], "t": [[1, 1], [0, 1]]}, ["s", "t"])
    assert emb.tolist() == [[1, 0, 1, 1, 1], [0, 1, 0, 0, 1]]
    sim = cosine_similarity(np.vstack([emb, np.zeros(5)]))
    assert sim[0, 1] == pytest.approx(1 / (2 * math.sqrt(2)))
    assert sim[0, 0] == pytest.approx(1.0) and sim[2].tolist() == [0, 0, 0]
