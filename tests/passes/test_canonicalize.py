"""canonicalize: names, no-op and dead-code removal, folding, shapes; idempotent, numerics kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from conftest import parse, run_ort

from mtc.ir.shapes import dims
from mtc.passes.canonicalize import Canonicalize
from mtc.passes.manager import PassManager, resolve

# Anonymous nodes, an Identity and a Dropout in the middle, shape arithmetic feeding a Reshape,
# a dead branch, and an Identity producing the graph output.
MESSY = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N,2,4,4] x) => (float[N,32] y) <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, float ratio = {0.5},
                                          int64[1] zero = {0}, int64[1] m1 = {-1}> {
  c = Conv (x, w)
  i = Identity (c)
  d = Dropout (i, ratio)
  r = Relu (d)
  unused = Neg (r)
  s = Shape (r)
  n = Gather <axis = 0> (s, zero)
  t = Concat <axis = 0> (n, m1)
  flat = Reshape (r, t)
  y = Identity (flat)
}
"""


def _run(model: ir.Model, **kw) -> tuple[ir.Model, bool]:
    res = PassManager([Canonicalize(**kw)]).run(model)  # verifies after the pass
    return res.model, res.modified


def _feeds(shape=(2, 2, 4, 4)) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def test_canonicalize_cleans_up_and_keeps_numerics():
    before = run_ort(parse(MESSY), _feeds())[0]
    model, modified = _run(parse(MESSY))
    assert modified
    ops = [n.op_type for n in model.graph]
    assert ops == ["Conv", "Relu", "Reshape"], ops
    assert all(n.name for n in model.graph)
    # The graph output keeps its name (the Reshape's value took it over) and every value has a shape.
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert list(model.graph)[-1].outputs[0] is model.graph.outputs[0]
    assert all(dims(o) is not None for n in model.graph for o in n.outputs)
    assert dims(model.graph.outputs[0]) == ("N", 32)
    # Unread initializers (the Dropout ratio, folded shape constants) are gone.
    assert "ratio" not in model.graph.initializers and "zero" not in model.graph.initializers
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    np.testing.assert_array_equal(run_ort(model, _feeds())[0], before)


def test_second_run_is_a_no_op():
    model, _ = _run(parse(MESSY))
    text = ir.to_onnx_text(model)
    model, modified = _run(model)
    assert not modified
    assert ir.to_onnx_text(model) == text


def test_shapes_alone_count_as_a_change_once():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N,3,8,8] x) => (float[N,3,8,8] y) {
      [a] h = Relu (x)
      [b] y = Sigmoid (h)
    }
    """
    model = parse(text)
    assert model.graph.node(0).outputs[0].shape is None
    model, modified = _run(model)
    assert modified  # a shape was added, nothing else
    assert dims(model.graph.node(0).outputs[0]) == ("N", 3, 8, 8)
    assert [n.name for n in model.graph] == ["a", "b"]
    _, modified = _run(model)
    assert not modified


def test_identity_between_graph_input_and_output_stays():
    # The output must be produced by a node and must not alias the input: the Identity is needed.
    model = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N,3] x) => (float[N,3] y, float[N,3] z) {
      y = Identity (x)
      a = Relu (x)
      z = Identity (a)
      w = Identity (a)
      u = Neg (w)
    }
    """)
    model, modified = _run(model)
    assert modified
    assert [n.op_type for n in model.graph] == ["Identity", "Relu"]
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    feeds = {"x": np.array([[-1.0, 0.0, 2.0]], dtype=np.float32)}
    y, z = run_ort(model, feeds)
    np.testing.assert_array_equal(y, feeds["x"])
    np.testing.assert_array_equal(z, np.maximum(feeds["x"], 0))


def test_dropout_kept_when_asked_or_when_it_is_not_a_no_op():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N,4] x) => (float[N,4] y, bool[N,4] mask) <float ratio = {0.5}> {
      a, mask = Dropout (x, ratio)
      b = Dropout (a, ratio)
      y = Relu (b)
    }
    """
    model, modified = _run(parse(text))
    assert modified
    # The first Dropout's mask is an output: it stays; the second is an inference no-op.
    assert [n.op_type for n in model.graph] == ["Dropout", "Relu"]
    model, modified = _run(parse(text), keep_dropout=True)
    assert [n.op_type for n in model.graph] == ["Dropout", "Dropout", "Relu"]


def test_registered_and_repr():
    (p,) = resolve("canonicalize", {"canonicalize": {"keep_dropout": True}})
    assert isinstance(p, Canonicalize)
    assert repr(p) == "Canonicalize(keep_dropout=True)"
    assert repr(Canonicalize()) == "Canonicalize(keep_dropout=False)"


def test_made_up_symbols_do_not_count_as_changes():
    # Data-dependent shapes get symbols like unk__0 that shape inference renumbers on every run.
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N,3,8,8] x, int64[2] s) => (y, z) {
      a = Reshape (x, s)
      y = Relu (a)
      k = NonZero (x)
      z = Transpose (k)
    }
    """
    model, modified = _run(parse(text))
    assert modified
    first = ir.to_onnx_text(model)
    model, modified = _run(model)
    assert not modified and ir.to_onnx_text(model) == first


def test_shape_inference_only_when_something_changed_or_is_missing(monkeypatch):
    import mtc.passes.canonicalize as canon

    calls = []
    real = canon.infer_shapes
    monkeypatch.setattr(canon, "infer_shapes", lambda m, **kw: calls.append(1) or real(m, **kw))
    model, _ = _run(parse(MESSY))
    assert calls  # anonymous shapes and no-ops: inferred
    calls.clear()
    _run(model)
    assert not calls  # every shape known, nothing removed: the protobuf round trip is skipped
    node = next(iter(model.graph))
    node.outputs[0].shape = None
    model, modified = _run(model)
    assert calls and modified and dims(node.outputs[0]) is not None
