"""Branch points, the verifier, name fixing and load/save on hand-written graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import parse, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st

from mtc.errors import MtcError
from mtc.ir import io
from mtc.ir.cuts import branch_points
from mtc.ir.names import fix_names
from mtc.ir.verify import verify

RESIDUAL = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N,4,8,8] x) => (float[N,4,8,8] y)
<float[4,4,1,1] w1 = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1},
 float[4,4,1,1] w2 = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1},
 float[4,4,1,1] w3 = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}>
{
  a = Conv (x, w1)
  b = Relu (a)
  c = Conv (b, w2)
  d = Conv (c, w3)
  e = Add (b, d)
  f = Relu (e)
  y = Sigmoid (f)
}
"""


def test_branch_points_skip_the_residual_interior():
    m = parse(RESIDUAL)
    # c and d are bypassed by the skip connection b -> e; everything else is on every path.
    assert branch_points(m) == ["a", "b", "e", "f"]
    assert branch_points(m, include_ends=True) == ["x", "a", "b", "e", "f", "y"]


def test_branch_points_two_parallel_paths():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1,4] x) => (float[1,4] y) {
      a = Relu (x)
      b = Sigmoid (a)
      c = Tanh (a)
      y = Add (b, c)
    }""")
    assert branch_points(m) == ["a"]


def test_verify_accepts_good_graph():
    m = parse(RESIDUAL)
    with pytest.raises(MtcError, match="Conv node has no name"):
        verify(m)
    fix_names(m)
    verify(m)


def test_verify_rejects_duplicate_node_names():
    m = parse(RESIDUAL)
    nodes = list(m.graph)
    nodes[0].name = "same"
    nodes[1].name = "same"
    with pytest.raises(MtcError, match="node 'same'.*not unique"):
        verify(m, pass_name="test-pass")


def test_verify_rejects_use_before_definition():
    m = parse(RESIDUAL)
    fix_names(m)
    nodes = list(m.graph)
    m.graph.remove(nodes[1])
    m.graph.append(nodes[1])  # Relu now comes after its users
    with pytest.raises(MtcError, match="used before it is defined"):
        verify(m, pass_name="test-pass")


def test_verify_rejects_dead_nodes_and_undefined_outputs():
    m = parse(RESIDUAL)
    fix_names(m)
    relu = list(m.graph)[1]
    extra = ir.node("Neg", [relu.outputs[0]], name="orphan")
    m.graph.insert_after(relu, extra)
    with pytest.raises(MtcError, match="node 'orphan'.*dead node"):
        verify(m)
    verify(m, allow_dead=True)
    m.graph.remove(extra)
    m.graph.outputs.append(ir.Value(name="ghost"))
    with pytest.raises(MtcError, match="graph output 'ghost' is not produced"):
        verify(m)


def test_verify_error_names_the_pass():
    m = parse(RESIDUAL)
    list(m.graph)[0].name = ""
    with pytest.raises(MtcError) as e:
        verify(m, pass_name="my-pass")
    assert "pass my-pass" in str(e.value) and "\n" not in str(e.value)


def test_fix_names_fills_and_dedupes():
    m = parse(RESIDUAL)
    nodes = list(m.graph)
    for n in nodes:
        n.name = ""
    nodes[2].name = "keep"
    assert fix_names(m)
    names = [n.name for n in m.graph]
    assert len(set(names)) == len(names)
    assert names[2] == "keep"
    assert names[0] == "conv_0" and names[1] == "relu_0"
    verify(m)
    assert not fix_names(m)  # idempotent


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["", "a", "b", "relu_0", "conv_0"]), min_size=7, max_size=7))
def test_fix_names_property(names):
    m = parse(RESIDUAL)
    for n, name in zip(m.graph, names, strict=True):
        n.name = name
    fix_names(m)
    verify(m)
    final = [n.name for n in m.graph]
    assert all(final) and len(set(final)) == len(final)
    # A name that was unique and non-empty survives unchanged.
    for before, after in zip(names, final, strict=True):
        if before and names.count(before) == 1:
            assert after == before


def test_save_load_roundtrip_and_external_data(tmp_path):
    m = parse(RESIDUAL)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref = run_ort(m, {"x": x})[0]
    p = io.save(m, tmp_path / "m.onnx")
    assert run_ort(io.load(p), {"x": x})[0].tolist() == ref.tolist()
    p2 = io.save(m, tmp_path / "ext" / "m.onnx", external_data=True)
    assert (tmp_path / "ext" / "m.onnx.data").exists()
    back = io.load(p2)
    np.testing.assert_array_equal(run_ort(back, {"x": x})[0], ref)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ext", "m.onnx"]  # no temp files left


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    m = parse(RESIDUAL)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(OSError):
        io.save(m, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    (b"this is not onnx at all", "not a valid ONNX file"),
])
def test_load_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(MtcError, match=match) as e:
        io.load(p)
    assert "bad.onnx" in str(e.value)


def test_load_truncated(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(ir.to_proto(parse(RESIDUAL)), good)
    data = good.read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(MtcError, match="trunc.onnx"):
        io.load(bad)


def test_input_dims_fills_the_batch_and_names_what_is_missing():
    from mtc.ir.shapes import input_dims

    m = parse("""<ir_version: 8, opset_import: ["" : 18]>
g (float[N,3,8,8] x, float[N,3,H,8] y, float z) => (float[N,3,8,8] a) { a = Relu (x) }""")
    x, y, z = m.graph.inputs
    assert input_dims(x, 4, "hint") == (4, 3, 8, 8)
    with pytest.raises(MtcError, match=r"input 'y' has symbolic dimension 'H' at axis 2: pass --input"):
        input_dims(y, 4, "pass --input")
    z.shape = None
    with pytest.raises(MtcError, match=r"input 'z' has no shape: hint"):
        input_dims(z, 4, "hint")
