"""Export removes what a task's masks and widths zero: physically smaller per-task models (and a
fused model that keeps the union of the tasks' channels), exact against the lowering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BACKBONES

from mtc.export.api import export_graphs, verify
from mtc.frontends import import_model
from mtc.ir import supergraph as sg
from mtc.ir.cost import model_cost
from mtc.ir.plan import Plan
from mtc.passes.choices import TaskMasks, Widths
from mtc.passes.pipeline import prepare_multitask

INNER = ["layers.0/relu", "layers.2/relu", "layers.4/relu"]  # inside a basic block: conv2 alone reads it
CONV2 = {"layers.0/relu": "layers.0.conv2.0", "layers.2/relu": "layers.2.conv2.0", "layers.4/relu": "layers.4.conv2.0"}
CONV1 = {"layers.0/relu": "layers.0.conv1.0", "layers.2/relu": "layers.2.conv1.0", "layers.4/relu": "layers.4.conv1.0"}


def _model(tasks="a:regress:1,b:class:3,c:regress:2"):
    m = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    prepare_multitask(m, tasks=tasks, head_width=8)
    return m


def _random_masks(model, seed):
    rng = np.random.default_rng(seed)
    return {c.name: {t: sorted(rng.choice(c.channels, size=int(rng.integers(1, c.channels)), replace=False).tolist())
                     for t in sg.task_names(model)} for c in sg.choices_of(model, "mask")}


def _conv(m, name):
    return next(n for n in m.graph if n.op_type == "Conv" and n.name == name)


@pytest.mark.parametrize("seed", [0, 1])
def test_each_task_keeps_exactly_its_channels(seed):
    model = _model()
    TaskMasks(sites=INNER)(model)
    plan = Plan(space="manual", masks=_random_masks(model, seed))
    full = model_cost(export_graphs(model, Plan(space="manual", masks={
        c.name: {t: list(range(c.channels)) for t in "abc"} for c in sg.choices_of(model, "mask")}),
        fused=False).tasks["a"])[1]
    ex = export_graphs(model, plan)
    for t, m in ex.tasks.items():
        assert max(verify(m, ex.module).values()) <= 1e-4
        for site in INNER:
            kept = len(plan.masks[site][t])
            # the producer loses output channels and the consumer input channels, physically
            assert _conv(m, CONV1[site]).inputs[1].const_value.shape[0] == kept
            assert _conv(m, CONV2[site]).inputs[1].const_value.shape[1] == kept
        assert not [n for n in m.graph if n.op_type == "Mul" and n.name.endswith(".apply")]  # nothing left to zero
        assert model_cost(m)[1] < full
        info = json.loads(m.metadata_props["mtc.export"])
        assert info["slimmed"]["removed"] > 0
    assert ex.fused is not None
    assert max(verify(ex.fused, ex.module).values()) <= 1e-4


def test_fused_keeps_the_union_where_tasks_share_the_producer():
    model = _model("a:regress:1,b:regress:1")
    TaskMasks(sites=["layers.2/relu"])(model)
    plan = Plan(space="manual", masks={"layers.2/relu": {"a": list(range(0, 10)), "b": list(range(5, 12))}})
    ex = export_graphs(model, plan)
    assert ex.fused is not None
    # one stream up to the mask: the shared conv1 keeps the 12 channels a or b use, of 24
    assert _conv(ex.fused, CONV1["layers.2/relu"]).inputs[1].const_value.shape[0] == 12
    assert max(verify(ex.fused, ex.module).values()) <= 1e-4


def test_a_mask_whose_group_is_read_unmasked_stays_a_mul():
    """At a residual stage's output the next block reads the channels before the mask too (its
    skip connection): removing them would change the result, so the mask stays, exactly."""
    model = _model("a:regress:1,b:regress:1")
    TaskMasks(sites=["layers.3/relu_1"])(model)
    plan = Plan(space="manual", masks={"layers.3/relu_1": {"a": [0, 1, 2], "b": list(range(24))}})
    ex = export_graphs(model, plan, fused=False)
    m = ex.tasks["a"]
    assert [n for n in m.graph if n.op_type == "Mul" and n.name.endswith(".apply")]
    assert max(verify(m, ex.module).values()) <= 1e-4


def test_widths_export_a_narrower_network():
    model = _model("a:regress:1,b:class:3")
    Widths(sites=["layers.2/relu", "layers.4/relu"], per_task=True)(model)
    plan = Plan(space="manual", widths={"layers.2/relu": {"a": 6, "b": 24}, "layers.4/relu": {"a": 8, "b": 16}})
    ex = export_graphs(model, plan)
    a, b = ex.tasks["a"], ex.tasks["b"]
    assert _conv(a, "layers.2.conv2.0").inputs[1].const_value.shape[1] == 6
    assert _conv(b, "layers.2.conv2.0").inputs[1].const_value.shape[1] == 24
    assert _conv(a, "layers.4.conv2.0").inputs[1].const_value.shape[1] == 8
    for m in (a, b, ex.fused):
        assert m is not None and max(verify(m, ex.module).values()) <= 1e-4
