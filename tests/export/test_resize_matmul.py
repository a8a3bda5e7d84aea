"""Linear Resize as MatMuls, run in onnxruntime against the ONNX reference's Resize (and torch)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from mtc.export.resize import COORDINATES, plan, resize_as_matmul
from mtc.lower.resize import axis_matrix, resize_attrs

OPSET = 19  # half_pixel_symmetric is opset 19


def resize_model(shape, *, axes=None, sizes=None, scales=None, runtime_sizes=False, **attrs) -> onnx.ModelProto:
    inits, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    names = ["x", "", "", ""]
    if scales is not None:
        inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [len(scales)], scales))
        names[2] = "scales"
    if sizes is not None:
        if runtime_sizes:
            inputs.append(helper.make_tensor_value_info("sizes", TensorProto.INT64, [len(sizes)]))
        else:
            inits.append(helper.make_tensor("sizes", TensorProto.INT64, [len(sizes)], sizes))
        names[3] = "sizes"
    while names[-1] == "":
        names.pop()
    if axes is not None:
        attrs["axes"] = axes
    node = helper.make_node("Resize", names, ["y"], name="up", **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(shape))],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def rewritten(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    m = ir.from_proto(proto)
    n = resize_as_matmul(m)
    out = ir.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    return out, n


def linear_matrix(n_in: int, n_out: int, scale: float, coord: str) -> np.ndarray:
    attrs = {"mode": "linear", "coordinate_transformation_mode": coord}
    return axis_matrix(resize_attrs(lambda name, default: attrs.get(name, default)), n_in, n_out, scale)


def test_half_pixel_by_hand():
    # [1, 2] -> 4 samples at -0.25, 0.25, 0.75, 1.25: clamped to the edges outside [0, 1]
    np.testing.assert_allclose(linear_matrix(2, 4, 2.0, "half_pixel") @ [1.0, 2.0], [1.0, 1.25, 1.75, 2.0])
    np.testing.assert_allclose(linear_matrix(3, 5, 5 / 3, "align_corners") @ [0.0, 1.0, 4.0], [0, 0.5, 1, 2.5, 4])
    np.testing.assert_allclose(linear_matrix(4, 2, 0.5, "asymmetric") @ [1.0, 2, 3, 4], [1.0, 3.0])


def test_matches_torch_bilinear():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
    proto = resize_model([2, 3, 5, 7], axes=[2, 3], sizes=[11, 16], mode="linear")
    new, n = rewritten(proto)
    assert n == 1 and [nd.op_type for nd in new.graph.node] == ["MatMul", "MatMul"]
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(11, 16), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(run_ort(new, {"x": x})[0], ref.numpy(), atol=1e-6)


@st.composite
def resize_cases(draw):
    rank = draw(st.sampled_from([3, 4]))
    shape = [draw(st.integers(1, 2)), draw(st.integers(1, 3))] + [draw(st.integers(1, 9)) for _ in range(rank - 2)]
    which = draw(st.sampled_from(["last", "both", "second"] if rank == 4 else ["last"]))
    resized = {"last": [rank - 1], "both": [rank - 2, rank - 1], "second": [rank - 2]}[which]
    form = draw(st.sampled_from(["axes", "negative_axes", "all_axes"]))
    axes = resized if form == "axes" else [a - rank for a in resized] if form == "negative_axes" else None
    coord = draw(st.sampled_from(COORDINATES))
    kw = {"mode": "linear", "coordinate_transformation_mode": coord}
    if draw(st.booleans()):
        outs = {a: draw(st.integers(1, 17)) for a in resized}
        sizes = [outs.get(a, shape[a]) for a in range(rank)] if axes is None else [outs[a] for a in resized]
        return shape, dict(axes=axes, sizes=sizes, **kw)
    per = {a: draw(st.sampled_from([0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 8.0])) for a in resized}
    if any(int(shape[a] * s) < 1 for a, s in per.items()):
        per = {a: max(s, 1.0) for a, s in per.items()}
    scales = [per.get(a, 1.0) for a in range(rank)] if axes is None else [per[a] for a in resized]
    return shape, dict(axes=axes, scales=scales, **kw)


@settings(max_examples=150, deadline=None)
@given(case=resize_cases(), seed=st.integers(0, 2**16))
def test_rewrite_matches_the_onnx_reference(case, seed):
    shape, kw = case
    proto = resize_model(shape, **kw)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    new, n = rewritten(proto)
    got = run_ort(new, {"x": x})[0]
    if n:
        # The oracle is the ONNX reference: the lowering (whose plans the matrices are) follows it;
        # onnxruntime's Resize departs from it where a scale gives a fractional output width
        # (align_corners, pytorch_half_pixel), using the integer size there. The reference cannot
        # read negative axes, so it gets the same node with them made positive.
        positive = dict(kw, axes=None if kw["axes"] is None else [a % len(shape) for a in kw["axes"]])
        want = ReferenceEvaluator(resize_model(shape, **positive)).run(None, {"x": x})[0]
    else:  # left alone: the same graph
        want = run_ort(proto, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    # Left alone: nothing resized, or a size kept under a scale other than 1 (onnxruntime copies there,
    # the spec interpolates).
    kept = [a for a in range(len(shape)) if want.shape[a] == shape[a]]
    axes = [a % len(shape) for a in kw["axes"] or range(len(shape))]
    scales = dict(zip(axes, kw["scales"], strict=True)) if "scales" in kw else {}
    odd = any(scales.get(a, 1.0) != 1.0 for a in kept)
    assert n == (0 if want.shape == x.shape or odd else 1)
    assert all(nd.op_type == "MatMul" for nd in new.graph.node) or n == 0


@pytest.mark.parametrize("shape,kw", [
    ([1, 2, 4, 4], dict(axes=[2, 3], sizes=[8, 8], mode="cubic")),
    ([1, 2, 4, 4], dict(axes=[2, 3], sizes=[8, 8], mode="nearest")),
    ([1, 2, 4, 4], dict(axes=[2, 3], sizes=[8, 8])),  # default mode: nearest
    ([1, 2, 8, 8], dict(axes=[2, 3], sizes=[4, 4], mode="linear", antialias=1)),
    ([1, 2, 4, 4], dict(axes=[2, 3], sizes=[8, 8], mode="linear", coordinate_transformation_mode="tf_crop_and_resize")),
    ([1, 2, 4, 4], dict(axes=[1, 2, 3], sizes=[4, 8, 8], mode="linear")),  # the channel axis
    ([1, 2, 4, 4], dict(axes=[2, 3], sizes=[8, 8], mode="linear", runtime_sizes=True)),
    ([1, 2, 4, 4], dict(axes=[2, 3], sizes=[8, 4], mode="linear", keep_aspect_ratio_policy="not_larger")),
    (["N", 2, "H", 4], dict(axes=[2, 3], sizes=[8, 8], mode="linear")),  # unknown input height
])
def test_other_resizes_are_left_alone(shape, kw):
    m = ir.from_proto(resize_model(shape, **kw))
    assert plan(next(iter(m.graph))) is None
    assert resize_as_matmul(m) == 0 and [n.op_type for n in m.graph] == ["Resize"]


def test_symbolic_batch_keeps_name_output_and_origin():
    proto = resize_model(["N", 3, 4, 4], axes=[2, 3], sizes=[8, 8], mode="linear")
    m = ir.from_proto(proto)
    node = next(iter(m.graph))
    node.metadata_props["mtc.origin"] = "decoder/up"
    assert resize_as_matmul(m) == 1
    assert [n.name for n in m.graph] == ["up/H", "up/W"]
    assert all(n.metadata_props["mtc.origin"] == "decoder/up" for n in m.graph)
    assert m.graph.outputs[0].name == "y" and "scales" not in m.graph.initializers
    x = np.random.default_rng(1).standard_normal((5, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(ir.to_proto(m), {"x": x})[0], run_ort(proto, {"x": x})[0], atol=1e-6)
