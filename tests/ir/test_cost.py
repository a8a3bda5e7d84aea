"""MACs and parameter counts against hand-computed values."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import parse

from mtc.ir.cost import model_cost, node_cost
from mtc.ir.shapes import infer_shapes


def _w(name: str, *shape: int) -> str:
    n = int(np.prod(shape))
    return "float[" + ",".join(map(str, shape)) + f"] {name} = {{" + ",".join(["0.5"] * n) + "}"


def _model(body: str, inits: str, x: str = "float[N,8,10,10] x", y: str = "float[N,?,?,?] y") -> ir.Model:
    m = parse(f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g ({x}) => ({y})
    <{inits}>
    {{ {body} }}
    """)
    return infer_shapes(m)


def test_conv_grouped_dilated_strided():
    # 8 -> 12 channels, groups 4 (2 in-channels per group), 3x3 dilation 2, pad 2, stride 2: out 5x5.
    m = _model("y = Conv <group = 4, dilations = [2, 2], pads = [2, 2, 2, 2], strides = [2, 2]> (x, w, b)",
               f"{_w('w', 12, 2, 3, 3)}, {_w('b', 12)}")
    c = node_cost(next(iter(m.graph)))
    assert c.macs == 12 * 5 * 5 * 2 * 3 * 3  # out elems x cin/group x k
    assert c.params == 12 * 2 * 9 + 12


def test_depthwise_conv():
    m = _model("y = Conv <group = 8, pads = [1, 1, 1, 1]> (x, w)", f"{_w('w', 8, 1, 3, 3)}")
    assert node_cost(next(iter(m.graph))).macs == 8 * 10 * 10 * 9


def test_conv_transpose():
    # 8 -> 4 channels, k4 s2 p1: 10x10 -> 20x20; MACs = input elems x cout/group x k.
    m = _model("y = ConvTranspose <strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)", f"{_w('w', 8, 4, 4, 4)}")
    c = node_cost(next(iter(m.graph)))
    assert c.macs == 8 * 10 * 10 * 4 * 16
    assert c.params == 8 * 4 * 16


def test_gemm_and_matmul():
    m = _model("h = Gemm <transB = 1> (x, w, b)\n y = MatMul (h, v)", f"{_w('w', 6, 5)}, {_w('b', 6)}, {_w('v', 6, 3)}",
               x="float[4,5] x", y="float[4,3] y")
    a, b = (node_cost(n) for n in m.graph)
    assert a.macs == 4 * 5 * 6 and a.params == 36
    assert b.macs == 4 * 6 * 3 and b.params == 18


def test_batched_matmul():
    m = _model("y = MatMul (x, v)", f"{_w('v', 7, 3)}", x="float[2,5,7] x", y="float[2,5,3] y")
    assert node_cost(next(iter(m.graph))).macs == 2 * 5 * 7 * 3


def test_zero_mac_ops_and_buffers():
    m = _model(
        """a = BatchNormalization (x, s, b, mu, var)
           c = Relu (a)
           d = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (c)
           e = Clip (d, lo, hi)
           y = Add (e, e)""",
        f"{_w('s', 8)}, {_w('b', 8)}, {_w('mu', 8)}, {_w('var', 8)}, float lo = {{0.0}}, float hi = {{6.0}}",
    )
    params, macs, costs = model_cost(m)
    assert macs == 8 * 10 * 10  # the BN's scale-and-shift: one MAC per output element
    assert [c.macs for c in costs] == [800, 0, 0, 0, 0]
    assert params == 16  # BN scale and shift; running stats and clip bounds are not parameters
    assert [c.params for c in costs] == [16, 0, 0, 0, 0]


def test_shared_initializer_counted_once():
    m = _model("a = Conv (x, w)\n y = Conv (a, w)", f"{_w('w', 8, 8, 1, 1)}")
    params, macs, _ = model_cost(m)
    assert params == 64
    assert macs == 2 * 10 * 10 * 8 * 8


def test_symbolic_batch_counts_as_one():
    m = _model("y = Conv (x, w)", f"{_w('w', 4, 8, 1, 1)}", x="float[N,8,10,10] x")
    m2 = _model("y = Conv (x, w)", f"{_w('w', 4, 8, 1, 1)}", x="float[3,8,10,10] x")
    assert model_cost(m2)[1] == 3 * model_cost(m)[1]
