"""ONNX and PyTorch front ends: exports from both PyTorch exporters import clean and keep numerics."""

from __future__ import annotations

import contextlib
import io as _io
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import BACKBONES, parse, rel_err, run_ort

from mtc import zoo
from mtc.errors import MtcError
from mtc.frontends import import_model, parse_input_shape
from mtc.ir.verify import verify

SHAPE_OPS = {"Shape", "Size", "Constant", "CastLike", "ConstantOfShape", "Range"}


def _shape_inputs_are_constant(model: ir.Model) -> bool:
    for n in model.graph:
        idx = {"Reshape": [1], "Resize": [1, 2, 3], "Slice": [1, 2, 3, 4], "Expand": [1], "Tile": [1]}.get(n.op_type, [])
        for i in idx:
            if i < len(n.inputs) and n.inputs[i] is not None and n.inputs[i].const_value is None:
                return False
    return True


def _export(name: str, path, dynamo: bool) -> None:
    model = zoo.build(name)
    x = torch.randn(*((2,) + zoo.REFERENCE[name][1][1:]))
    with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("N")},))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "N"}})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", sorted(zoo.REFERENCE))
def test_exported_nets_import_clean_and_keep_numerics(tmp_path, name, dynamo):
    path = tmp_path / f"{name}.onnx"
    _export(name, path, dynamo)
    model = import_model(path)
    verify(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    ops = Counter(n.op_type for n in model.graph)
    # Shape arithmetic is folded away: none of it survives import.
    assert not (set(ops) & SHAPE_OPS), ops
    assert _shape_inputs_are_constant(model)
    assert all(n.name for n in model.graph)
    (inp,) = model.graph.inputs
    assert not isinstance(list(inp.shape)[0], int)  # symbolic batch kept
    x = np.random.default_rng(1).standard_normal((3,) + zoo.REFERENCE[name][1][1:]).astype(np.float32)
    before = run_ort(onnx.load(str(path)), {onnx.load(str(path)).graph.input[0].name: x})
    after = run_ort(model, {inp.name: x})
    for a, b in zip(after, before, strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) <= 1e-5


def test_pytorch_frontend_both_exporters_agree_with_module():
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = zoo.build("tiny_mobilenetv2")(torch.from_numpy(x)).numpy()
    for exporter in ("dynamo", "torchscript"):
        m = import_model("mtc.zoo:tiny_mobilenetv2", input_shape=(1, 3, 64, 64), exporter=exporter)
        ops = Counter(n.op_type for n in m.graph)
        assert ops["BatchNormalization"] == ops["Conv"] - 4  # BN kept for training (SE convs have none)
        out = run_ort(m, {m.graph.inputs[0].name: x})[0]
        assert rel_err(out, ref) <= 1e-5


def test_bundled_onnx_backbones_are_canonical():
    for p in sorted(BACKBONES.glob("*.onnx")):
        m = import_model(p)
        verify(m)
        assert Counter(n.op_type for n in m.graph)["BatchNormalization"] > 0


def test_symbolic_spatial_dims_need_input_shape(tmp_path):
    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,3,H,W] x) => (float[N,3,H,W] y) { y = Relu (x) }""")
    p = tmp_path / "sym.onnx"
    onnx.save(ir.to_proto(m), p)
    with pytest.raises(MtcError, match=r"sym.onnx: input 'x' has symbolic dimension 'H' at axis 2.*--input-shape"):
        import_model(p)
    out = import_model(p, input_shape=(1, 3, 16, 16))
    # the symbolic batch stays symbolic; the sample shape is fixed
    assert [d if isinstance(d, int) else d.value for d in out.graph.outputs[0].shape] == ["N", 3, 16, 16]
    with pytest.raises(MtcError, match="rank 3 but input 'x' has rank 4"):
        import_model(p, input_shape=(1, 3, 16))
    with pytest.raises(MtcError, match="dimension 1 is 4 but input 'x'.*has 3 channels"):
        import_model(p, input_shape=(1, 4, 16, 16))


def test_input_shape_too_small_names_the_node(tmp_path):
    m = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1,3,16,16] x) => (float[1,3,?,?] y)
    <float[3,3,5,5] w = {""" + ",".join(["0.1"] * 225) + """}> { y = Conv (x, w) }""")
    p = tmp_path / "small.onnx"
    onnx.save(ir.to_proto(m), p)
    with pytest.raises(MtcError, match="small.onnx"):
        import_model(p, input_shape=(1, 3, 3, 3))


def test_old_opset_is_converted(tmp_path):
    m = parse("""
    <ir_version: 7, opset_import: ["" : 11]>
    g (float[1,4,6,6] x) => (float[1,4,3,3] y) {
      a = Relu (x)
      y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)
    }""")
    p = tmp_path / "old.onnx"
    onnx.save(ir.to_proto(m), p)
    out = import_model(p)
    assert out.opset_imports[""] == 18
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(m, {"x": x})[0])


def test_too_old_opset_is_refused(tmp_path):
    m = parse("""<ir_version: 4, opset_import: ["" : 9]> g (float[1,4] x) => (float[1,4] y) { y = Relu (x) }""")
    p = tmp_path / "ancient.onnx"
    onnx.save(ir.to_proto(m), p)
    with pytest.raises(MtcError, match="ancient.onnx: opset 9 is too old"):
        import_model(p)


def test_fold_reshape_and_resize_with_symbolic_batch(tmp_path):
    # x.view(x.size(0), -1) and interpolate(size=x.shape[2:] * 2) written by hand.
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,2,4,4] x) => (float[N,128] y)
    <int64[1] zero = {0}, int64[1] two = {2}, int64[1] four = {4}, int64[1] minus1 = {-1}, int64[2] k2 = {2, 2}>
    {
      s = Shape (x)
      nc = Slice (s, zero, two)
      hw = Slice (s, two, four)
      hw2 = Mul (hw, k2)
      sz = Concat <axis = 0> (nc, hw2)
      up = Resize <mode = "nearest"> (x, , , sz)
      s2 = Shape (up)
      n = Gather <axis = 0> (s2, zero)
      tgt = Concat <axis = 0> (n, minus1)
      y = Reshape (up, tgt)
    }""")
    p = tmp_path / "dyn.onnx"
    onnx.save(ir.to_proto(m), p)
    out = import_model(p)
    ops = [n.op_type for n in out.graph]
    assert ops == ["Resize", "Reshape"]
    resize, reshape = list(out.graph)
    assert list(resize.attributes["axes"].value) == [2, 3]
    assert resize.inputs[3].const_value.numpy().tolist() == [8, 8]
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, -1]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 2, 4, 4)).astype(np.float32)
        np.testing.assert_array_equal(run_ort(out, {"x": x})[0], run_ort(m, {"x": x})[0])


@pytest.mark.parametrize("text,match", [
    ("1,3,a,4", "dimension 2 'a' is not a positive integer"),
    ("1,0,4,4", "dimension 1 is 0"),
    ("", "expected comma-separated"),
])
def test_parse_input_shape_errors(text, match):
    with pytest.raises(MtcError, match=match):
        parse_input_shape(text)


def test_parse_input_shape_ok():
    assert parse_input_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_input_shape("N,3,8,8") == ("N", 3, 8, 8)


@pytest.mark.parametrize("spec,match", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("mtc.zoo:nope", "module 'mtc.zoo' has no attribute 'nope'"),
    ("mtc.zoo:REFERENCE", "factory raised|expected a torch.nn.Module"),
])
def test_pytorch_factory_errors(spec, match):
    with pytest.raises(MtcError, match=match):
        import_model(spec, input_shape=(1, 3, 32, 32))


def test_pytorch_needs_input_shape():
    with pytest.raises(MtcError, match="--input-shape is required"):
        import_model("mtc.zoo:tiny_resnet")
