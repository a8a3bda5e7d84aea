"""Heads as IR subgraphs: structure, names, checker, shapes, and onnxruntime vs a PyTorch reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, run_ort

from mtc.errors import MtcError
from mtc.ir.io import load, save
from mtc.ir.shapes import infer_shapes, static_dims
from mtc.ir.verify import verify
from mtc.tasks.heads import TASK_KEY, build_head
from mtc.tasks.spec import TaskSpec, parse_tasks

H, W = 16, 20


def _backbone(opset: int = 18, *, hw=(H, W)) -> tuple[ir.Model, ir.Value]:
    """x (N, 3, H, W) -> Conv 3x3 stride 2 -> Relu: an (N, 8, H/2, W/2) feature map."""
    rng = np.random.default_rng(123)
    x = ir.Value(name="x", shape=ir.Shape(["N", 3, *hw]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(
        name="conv.weight", const_value=ir.tensor(rng.standard_normal((8, 3, 3, 3)).astype(np.float32))
    )
    conv = ir.node(
        "Conv", [x, w], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, name="conv"
    )
    relu = ir.node("Relu", conv.outputs, name="relu")
    conv.outputs[0].name, relu.outputs[0].name = "conv", "feat"
    g = ir.Graph([x], [], nodes=[conv, relu], initializers=[w], opset_imports={"": opset}, name="tiny")
    model = ir.Model(g, ir_version=10)
    infer_shapes(model)
    return model, relu.outputs[0]


def _attach(tasks: str, *, opset: int = 18, hw=(H, W), **kw) -> tuple[ir.Model, dict[str, ir.Value]]:
    model, feat = _backbone(opset, hw=hw)
    outs = {}
    for t in parse_tasks(tasks):
        y = build_head(model.graph, feat, t, input_hw=hw, opset=opset, **kw)
        model.graph.outputs.append(y)
        outs[t.name] = y
    return model, outs


def _weights(model: ir.Model) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.const_value.numpy().copy()) for k, v in model.graph.initializers.items()}


def _reference(model: ir.Model, x: np.ndarray, task: TaskSpec, *, rates=(6, 12, 18, 24), hw=(H, W)):
    """The head computed directly with F.conv2d / F.interpolate from the model's initializers."""
    wt = _weights(model)
    feat = F.relu(F.conv2d(torch.from_numpy(x), wt["conv.weight"], stride=2, padding=1))
    p = f"head@{task.name}"
    if task.kind in ("class", "regress"):
        pooled = feat.mean(dim=(2, 3))
        return F.linear(pooled, wt[f"{p}/fc.weight"], wt[f"{p}/fc.bias"]).numpy()
    out = None
    for r in rates:
        q = f"{p}/aspp{r}"
        y = F.relu(F.conv2d(feat, wt[f"{q}/conv1.weight"], wt[f"{q}/conv1.bias"], padding=r, dilation=r))
        y = F.relu(F.conv2d(y, wt[f"{q}/conv2.weight"], wt[f"{q}/conv2.bias"]))
        y = F.conv2d(y, wt[f"{q}/conv3.weight"], wt[f"{q}/conv3.bias"])
        out = y if out is None else out + y
    return F.interpolate(out, size=hw, mode="bilinear", align_corners=False).numpy()


def test_heads_check_infer_and_match_pytorch():
    tasks = "seg:seg:5,depth,class:class:4,regress:regress:2"
    model, outs = _attach(tasks, width=16)
    verify(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    declared = {name: static_dims(v) for name, v in outs.items()}
    infer_shapes(model)
    for name, v in outs.items():
        assert static_dims(v) == declared[name], name
    assert static_dims(outs["seg"]) == (1, 5, H, W)  # dense: at input resolution (batch symbolic)
    assert static_dims(outs["depth"]) == (1, 1, H, W)
    assert static_dims(outs["class"]) == (1, 4)
    assert static_dims(outs["regress"]) == (1, 2)

    x = np.random.default_rng(7).standard_normal((2, 3, H, W)).astype(np.float32)
    got = dict(zip(outs, run_ort(model, {"x": x}), strict=True))
    for t in parse_tasks(tasks):
        ref = _reference(model, x, t)
        assert got[t.name].shape == ref.shape
        assert rel_err(got[t.name], ref) <= 1e-5, t.name


def test_structure_names_metadata_and_init():
    model, outs = _attach("seg:seg:5", width=16, rates=(2, 4))
    nodes = [n for n in model.graph if n.name.startswith("head@")]
    names = [n.name for n in nodes]
    assert names == [
        "head@seg/aspp2/conv1", "head@seg/aspp2/relu1", "head@seg/aspp2/conv2", "head@seg/aspp2/relu2",
        "head@seg/aspp2/conv3",
        "head@seg/aspp4/conv1", "head@seg/aspp4/relu1", "head@seg/aspp4/conv2", "head@seg/aspp4/relu2",
        "head@seg/aspp4/conv3",
        "head@seg/add1", "head@seg/resize",
    ]  # fmt: skip
    for n in nodes:
        assert n.metadata_props["mtc.origin"] == "head@seg" and n.metadata_props[TASK_KEY] == "seg"
    conv1 = nodes[5]
    assert list(conv1.attributes["dilations"].as_ints()) == [4, 4]
    assert list(conv1.attributes["pads"].as_ints()) == [4] * 4
    resize = nodes[-1]
    assert resize.attributes["coordinate_transformation_mode"].as_string() == "half_pixel"
    assert outs["seg"].name == "seg" and outs["seg"].producer() is resize
    init = model.graph.initializers
    w = init["head@seg/aspp2/conv1.weight"].const_value.numpy()
    assert w.shape == (16, 8, 3, 3) and w.dtype == np.float32
    assert init["head@seg/aspp2/conv1.bias"].const_value.numpy().tolist() == [0.0] * 16
    # Kaiming (uniform), fan_out mode: std = sqrt(2 / (16 * 9)).
    assert w.std() == pytest.approx(np.sqrt(2 / (16 * 9)), rel=0.15)


def test_initialisation_is_reproducible_and_per_task(tmp_path):
    a, _ = _attach("seg:seg:5,sem:seg:5", width=8, seed=3)
    b, _ = _attach("seg:seg:5,sem:seg:5", width=8, seed=3)
    c, _ = _attach("seg:seg:5", width=8, seed=4)
    # Weights are drawn lazily, each from its own seed: reading them in another order changes nothing.
    for v in reversed(list(b.graph.initializers.values())):
        v.const_value.numpy()
    pa, pb = save(a, tmp_path / "a.onnx"), save(b, tmp_path / "b.onnx")
    assert pa.read_bytes() == pb.read_bytes()
    back = load(pa)
    x = np.random.default_rng(0).standard_normal((1, 3, H, W)).astype(np.float32)
    assert np.array_equal(run_ort(back, {"x": x})[0], run_ort(a, {"x": x})[0])
    assert back.graph.node("head@sem/resize").metadata_props[TASK_KEY] == "sem"
    wa = a.graph.initializers
    k = "aspp6/conv1.weight"
    assert not np.array_equal(
        wa[f"head@seg/{k}"].const_value.numpy(), wa[f"head@sem/{k}"].const_value.numpy()
    )
    assert not np.array_equal(
        wa[f"head@seg/{k}"].const_value.numpy(), c.graph.initializers[f"head@seg/{k}"].const_value.numpy()
    )


def test_opset17_resize_and_dropout_and_same_resolution():
    # Opset 17 has no Resize axes: sizes come from Shape + Concat; dropout is identity at inference.
    model, outs = _attach("depth,normal", opset=17, width=8, rates=(1, 3), dropout=0.5)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert any(n.op_type == "Dropout" for n in model.graph)
    x = np.random.default_rng(1).standard_normal((1, 3, H, W)).astype(np.float32)
    got = run_ort(model, {"x": x})
    for t, y in zip(parse_tasks("depth,normal"), got, strict=True):
        assert rel_err(y, _reference(model, x, t, rates=(1, 3))) <= 1e-5

    # A feature map already at input resolution needs no Resize: the last Add is the output.
    model, feat = _backbone()
    y = build_head(
        model.graph, feat, TaskSpec("edge", "edge", 1), input_hw=(H // 2, W // 2), width=4, rates=(1, 2)
    )
    assert y.name == "edge" and y.producer().op_type == "Add"


def test_bad_features_and_name_clashes():
    model, feat = _backbone()
    conv_out = model.graph.node("conv").outputs[0]
    pooled = ir.node("GlobalAveragePool", [feat], name="gap")
    flat = ir.node("Flatten", pooled.outputs, {"axis": 1}, name="flat")
    model.graph.extend([pooled, flat])
    infer_shapes(model)
    vec = flat.outputs[0]
    with pytest.raises(
        MtcError, match="^task 'seg' \\(seg\\) cannot attach to tensor .*needs an \\(N, C, H, W\\)"
    ):
        build_head(model.graph, vec, TaskSpec("seg", "seg", 13), input_hw=(H, W))
    # A global head takes the pooled vector as is.
    y = build_head(model.graph, vec, TaskSpec("cls", "class", 3), input_hw=(H, W))
    assert y.producer().op_type == "Gemm" and static_dims(y) == (1, 3)
    # The task name is taken by a tensor already: the head fails late, and leaves the graph as it was.
    before = (len(model.graph), len(model.graph.initializers), len(conv_out.uses()))
    with pytest.raises(MtcError, match="already has a tensor named 'conv'; rename the task"):
        build_head(model.graph, conv_out, TaskSpec("conv", "depth", 1), input_hw=(H, W), width=4)
    assert (len(model.graph), len(model.graph.initializers), len(conv_out.uses())) == before
    unknown = ir.Value(name="mystery")
    with pytest.raises(MtcError, match="shape is unknown"):
        build_head(model.graph, unknown, TaskSpec("d2", "depth", 1), input_hw=(H, W))
    with pytest.raises(MtcError, match="needs 3 channels"):
        build_head(model.graph, feat, TaskSpec("n", "normal", 4), input_hw=(H, W))
    with pytest.raises(ValueError, match="rates"):
        build_head(model.graph, feat, TaskSpec("d3", "depth", 1), input_hw=(H, W), rates=(6, 6))


def test_heads_lower_to_pytorch_and_train():
    module = pytest.importorskip("mtc.lower.module")
    model, outs = _attach("seg:seg:5,depth,class:class:4", width=8, dropout=0.5)
    x = np.random.default_rng(7).standard_normal((2, 3, H, W)).astype(np.float32)
    ref = run_ort(model, {"x": x})
    m = module.lower(model).eval()
    with torch.no_grad():
        got = m(torch.from_numpy(x))
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g.numpy(), r) <= 1e-5
    m.train()
    sum(o.pow(2).mean() for o in m(torch.from_numpy(x))).backward()
    assert all(p.grad is not None for p in m.parameters())
