"""attach-heads, and canonicalize -> cut-at-feature -> attach-heads as a pipeline (incl. a property test)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import BACKBONES, parse, run_ort
from graphtext import Net
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtc.errors import MtcError
from mtc.ir.cuts import branch_points
from mtc.ir.shapes import dims
from mtc.passes.canonicalize import Canonicalize
from mtc.passes.feature import FEATURE_KEY, CutAtFeature, find_feature
from mtc.passes.heads import TASKS_KEY, AttachHeads, tasks_of
from mtc.passes.manager import PassManager, resolve
from mtc.tasks.heads import TASK_KEY
from mtc.tasks.spec import TaskSpec, parse_tasks

TASKS = "seg:seg:3,depth,cls:class:4"


def _backbone() -> Net:
    net = Net(hw=(16, 12))
    net.conv(4, stride=2)
    net.relu()
    net.res()
    net.conv(6, stride=2)
    net.relu()
    net.gap()
    net.flatten()
    net.gemm(5)
    return net


def _compile(model: ir.Model, tasks=TASKS, *, feature: str | None = None, **kw) -> tuple[ir.Model, list]:
    kw.setdefault("width", 4)
    kw.setdefault("rates", (1, 2))
    pm = PassManager([Canonicalize(), CutAtFeature(feature=feature), AttachHeads(tasks=tasks, **kw)])
    res = pm.run(model)
    return res.model, res.records


def _check_runs(model: ir.Model, feeds: dict[str, np.ndarray], tasks: list[TaskSpec]) -> list[np.ndarray]:
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    outs = run_ort(model, feeds)
    x = next(iter(feeds.values()))
    for t, y in zip(tasks, outs, strict=True):
        dense = t.kind not in ("class", "regress")
        want = (x.shape[0], t.channels, *x.shape[2:]) if dense else (x.shape[0], t.channels)
        assert y.shape == want, (t, y.shape)
        assert np.isfinite(y).all()
    return outs


def test_heads_become_the_outputs_in_task_order():
    net = _backbone()
    text = net.text()
    model, records = _compile(parse(text))
    assert [r.modified for r in records] == [True, True, True]
    tasks = parse_tasks(TASKS)
    assert [v.name for v in model.graph.outputs] == ["seg", "depth", "cls"]
    assert [dims(v) for v in model.graph.outputs] == [("N", 3, 16, 12), ("N", 1, 16, 12), ("N", 4)]
    assert json.loads(model.metadata_props[TASKS_KEY]) == [
        {"name": "seg", "kind": "seg", "channels": 3},
        {"name": "depth", "kind": "depth", "channels": 1},
        {"name": "cls", "kind": "class", "channels": 4},
    ]
    assert tasks_of(model) == tasks
    feat = model.metadata_props[FEATURE_KEY]
    heads = [n for n in model.graph if n.metadata_props.get(TASK_KEY)]
    assert {n.metadata_props[TASK_KEY] for n in heads} == {"seg", "depth", "cls"}
    assert all(n.name.startswith(f"head@{n.metadata_props[TASK_KEY]}/") for n in heads)
    # The backbone is untouched: its feature, read out of the supergraph, equals the original tensor.
    feeds = net.feeds()
    _check_runs(model, feeds, tasks)
    model.graph.outputs.append(next(o for n in model.graph for o in n.outputs if o.name == feat))
    original = parse(text)
    original.graph.outputs.append(next(o for n in original.graph for o in n.outputs if o.name == feat))
    np.testing.assert_array_equal(run_ort(model, feeds)[-1], run_ort(original, feeds)[-1])


def test_rerun_with_the_same_tasks_is_a_no_op_and_other_tasks_are_refused():
    model, _ = _compile(parse(_backbone().text()))
    text = ir.to_onnx_text(model)
    # The whole pipeline again: every pass finds its work done.
    again, records = _compile(model)
    assert [r.modified for r in records] == [False, False, False]
    assert ir.to_onnx_text(again) == text
    with pytest.raises(MtcError, match=r"pass attach-heads: --tasks seg,normal: the graph already has heads "
                                       r"\(seg:3,depth,cls:class:4\)"):
        PassManager([AttachHeads(tasks="seg,normal")]).run(model)
    # Cutting elsewhere once heads are attached would orphan them.
    with pytest.raises(MtcError, match="already has task heads .* not on --feature 'x'"):
        PassManager([CutAtFeature(feature="x")]).run(model)


def test_tasks_as_specs_or_string_and_repr():
    a = AttachHeads(tasks=TASKS)
    b = AttachHeads(tasks=parse_tasks(TASKS))
    assert repr(a) == repr(b)
    assert repr(a).startswith("AttachHeads(tasks=[TaskSpec(name='seg', kind='seg', channels=3), ")
    assert repr(a).endswith("width=256, rates=(6, 12, 18, 24), seed=0)")
    (p,) = resolve("attach-heads", {"attach-heads": {"tasks": "seg", "width": 8}})
    assert isinstance(p, AttachHeads) and p.width == 8
    with pytest.raises(MtcError, match="duplicate task name 'seg'"):
        AttachHeads(tasks=[TaskSpec("seg", "seg", 3), TaskSpec("seg", "depth", 1)])
    with pytest.raises(MtcError, match="--tasks: unknown kind"):
        AttachHeads(tasks="a:b")
    with pytest.raises(MtcError, match="width must be a positive integer"):
        AttachHeads(tasks="seg", width=0)
    with pytest.raises(MtcError, match="rates must be distinct positive integers"):
        AttachHeads(tasks="seg", rates=(6, 6))


def test_dense_task_on_a_flat_feature():
    net = _backbone()
    flat = next(name for name in net.shapes if name.startswith("flat"))
    with pytest.raises(MtcError) as e:
        _compile(parse(net.text()), "cls:class:4,seg:seg:3", feature=flat)
    assert str(e.value) == (
        f"pass attach-heads: node '{flat}' (Flatten): task 'seg' (seg) is dense and needs an (N, C, H, W) "
        f"feature map, but --feature '{flat}' has shape [N,6]; choose a spatial tensor with --feature"
    )
    # A global task reads the flat tensor directly.
    model, _ = _compile(parse(net.text()), "cls:class:4", feature=flat)
    assert [n.op_type for n in model.graph if n.metadata_props.get(TASK_KEY)] == ["Gemm"]
    _check_runs(model, net.feeds(), parse_tasks("cls:class:4"))


def test_needs_a_cut_backbone():
    net = _backbone()
    feat = next(name for name in net.shapes if name.startswith("relu"))
    model = parse(net.text([net.cur, feat]))
    with pytest.raises(MtcError, match=r"pass attach-heads: expected exactly one graph output, the feature map, "
                                       r"but the graph has 2 .*run cut-at-feature first"):
        PassManager([AttachHeads(tasks="seg")]).run(model)


def test_task_name_taken_by_the_backbone_leaves_the_graph_alone():
    net = Net()
    net.conv(4)
    relu = net.relu()
    text = net.text().replace(relu, "seg")
    model = parse(text)
    PassManager([Canonicalize(), CutAtFeature()]).run(model)
    n = model.graph.num_nodes()
    with pytest.raises(MtcError, match="--tasks: task 'seg': the backbone already has a tensor or node named 'seg'"):
        PassManager([AttachHeads(tasks="depth,seg")]).run(model)
    assert model.graph.num_nodes() == n and list(model.graph.outputs)[0].name == "seg"


def test_dense_heads_need_a_static_input_resolution():
    net = Net()
    net.conv(4)
    net.relu()
    text = net.text().replace("float[N,3,8,8] x", "float[N,3,H,W] x").replace("float[N,4,8,8]", "float[N,4,H,W]")
    with pytest.raises(MtcError, match=r"task 'seg' \(seg\) is dense .*static H, W \(inputs: 'x' \[N,3,H,W\]\); "
                                       r"pass --input-shape$"):
        _compile(parse(text), "seg,cls:class:2")
    model, _ = _compile(parse(text), "cls:class:2")
    assert [v.name for v in model.graph.outputs] == ["cls"]


def test_tiny_resnet_compiles_and_runs():
    from mtc.frontends import import_model

    model, records = _compile(import_model(str(BACKBONES / "tiny_resnet.onnx")), "seg,depth,normal,cls:class:5", width=8)
    assert model.metadata_props[FEATURE_KEY] == "layers.7/relu_1"
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)}
    _check_runs(model, feeds, parse_tasks("seg,depth,normal,cls:class:5"))


# ---------------------------------------------------------------------------- property test
@st.composite
def backbones(draw) -> tuple[Net, str]:
    """A random chain of conv / residual / pooling / squeeze-excite blocks with a random tail."""
    hw = draw(st.sampled_from([(8, 8), (12, 8), (16, 16)]))
    net = Net(c=draw(st.integers(1, 3)), hw=hw, seed=draw(st.integers(0, 2**16)))
    net.conv(draw(st.integers(2, 5)))
    net.relu()
    for block in draw(st.lists(st.sampled_from(["conv", "down", "res", "pool", "se"]), min_size=1, max_size=5)):
        small = min(net.shape[2:]) < 4  # keep the map at least 2x2 so the pooling is global
        if block == "conv":
            net.conv(draw(st.integers(2, 5)))
            net.relu()
        elif block == "down" and not small:
            net.conv(draw(st.integers(2, 5)), stride=2)
            net.relu()
        elif block == "pool" and not small:
            net.maxpool()
        elif block == "res":
            net.res()
        elif block == "se":
            net.se()
    feat = net.cur
    tail = draw(st.sampled_from(["gap", "reducemean", "avgpool", "vgg", "fcn", "none"]))
    if tail in ("gap", "reducemean", "avgpool"):
        {"gap": net.gap, "reducemean": net.reducemean, "avgpool": net.avgpool_full}[tail]()
        net.flatten()
        net.gemm(3)
    elif tail == "vgg":
        net.flatten()
        net.gemm(3)
    elif tail == "fcn":
        feat = net.conv(2, k=1)
    return net, feat


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(backbones())
def test_random_backbones_compile_verify_and_run(case):
    net, expected = case
    text = net.text()
    model = PassManager([Canonicalize()]).run(parse(text)).model
    feat = find_feature(model)
    assert feat.name == expected
    assert len(dims(feat)) == 4 and feat.name in branch_points(model, include_ends=True)
    tasks = parse_tasks("seg:seg:3,cls:class:2,depth")
    out, records = _compile(parse(text), tasks)  # the manager runs the verifier after each pass
    assert [v.name for v in out.graph.outputs] == ["seg", "cls", "depth"]
    _check_runs(out, net.feeds(), tasks)
