"""Parameter counts and multiply-accumulates (MACs) per node and per model.

Conventions (see docs/ir.md):
- MACs are for one sample: a symbolic batch dimension counts as 1 (a static batch counts as given).
- Conv: output elements x (C_in / groups) x prod(kernel); dilation spreads taps but adds none.
- ConvTranspose: input elements x (C_out / groups) x prod(kernel).
- Gemm / MatMul: M x K x N per batch element.
- Normalisation (BatchNormalization, InstanceNormalization, LayerNormalization,
  GroupNormalization): one MAC per output element, the scale-and-shift an inference-form norm
  computes (statistics are folded into it); so a VCN that is a norm alone has a cost to skip.
- Bias additions, pooling, activations and other elementwise ops count as zero MACs.
- Parameters are the trainable float initializers a node reads: weights, biases, norm scale and
  shift; BatchNormalization running statistics are buffers, Clip bounds, Resize scales and Pad
  values are configuration, and rank-0 floats are literals, so none of those count. An initializer read
  by several nodes is counted once in the model total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from mtc.ir.shapes import static_dims

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
NORM_OPS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
# Inputs that are state or configuration, not parameters.
_NON_PARAM_INPUTS = {"BatchNormalization": {3, 4}, "Clip": {1, 2}, "Resize": {1, 2, 3}, "Pad": {1, 2, 3}}


@dataclass(frozen=True)
class NodeCost:
    name: str
    op: str
    params: int
    macs: int


def param_inputs(node: ir.Node) -> list[ir.Value]:
    """The initializers a node reads that are trainable parameters."""
    skip = _NON_PARAM_INPUTS.get(node.op_type, set())
    out = []
    for i, v in enumerate(node.inputs):
        if v is None or i in skip or not v.is_initializer():
            continue
        t = v.const_value
        # Rank-0 floats are literals an exporter lifted (``x * 0.5``), not learned weights.
        if t is None or t.dtype not in _FLOAT or len(t.shape) == 0:
            continue
        out.append(v)
    return out


def _numel(v: ir.Value) -> int:
    t = v.const_value
    if t is not None:
        return math.prod(t.shape.numpy())  # a tensor's shape is always static
    s = static_dims(v)
    return math.prod(s) if s else 0


def _static_dims(v: ir.Value | None) -> tuple[int, ...] | None:
    """``static_dims`` of an optional input: an absent one has no known shape."""
    return static_dims(v) if v is not None else None


def node_macs(node: ir.Node) -> int:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return 0
    if op in ("Conv", "ConvTranspose"):
        w = node.inputs[1]
        ws = _static_dims(w)
        if w is not None and w.const_value is not None:
            ws = tuple(w.const_value.shape.numpy())
        # The weight shape already divides by the group count: (C_out, C_in/group, k...).
        if ws is None:
            return 0
        kernel = math.prod(ws[2:])
        if op == "Conv":
            y = static_dims(node.outputs[0])
            if y is None:
                return 0
            cin_per_group = ws[1]
            return math.prod(y) * cin_per_group * kernel
        x = _static_dims(node.inputs[0])
        if x is None:
            return 0
        cout_per_group = ws[1]  # ConvTranspose weight is (C_in, C_out / group, k...)
        return math.prod(x) * cout_per_group * kernel
    if op == "Gemm":
        a = _static_dims(node.inputs[0])
        b = _static_dims(node.inputs[1])
        if a is None or b is None:
            return 0
        trans_a = node.attributes["transA"].as_int() if "transA" in node.attributes else 0
        m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
        trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        n = b[0] if trans_b else b[1]
        return m * k * n
    if op in NORM_OPS:
        y = static_dims(node.outputs[0])
        return math.prod(y) if y is not None else 0
    if op == "MatMul":
        a = _static_dims(node.inputs[0])
        y = static_dims(node.outputs[0])
        if a is None or y is None or not a:
            return 0
        k = a[-1]
        return math.prod(y) * k
    return 0


def node_cost(node: ir.Node) -> NodeCost:
    return NodeCost(node.name or "", node.op_type, sum(_numel(v) for v in param_inputs(node)), node_macs(node))


def model_cost(model: ir.Model) -> tuple[int, int, list[NodeCost]]:
    """Total parameters (shared initializers once), total MACs, and the per-node costs."""
    seen: set[int] = set()
    params = 0
    costs = []
    for node in model.graph:
        for v in param_inputs(node):
            if id(v) not in seen:
                seen.add(id(v))
                params += _numel(v)
        costs.append(node_cost(node))
    return params, sum(c.macs for c in costs), costs


def human(n: float, digits: int = 3) -> str:
    """A count with an SI suffix (``27.3K``, ``4.96M``): how reports and the CLI print params and MACs."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{int(n)}" if not unit and float(n).is_integer() else f"{n:.{digits}g}{unit}"
        n /= 1000
    return f"{n:.{digits}g}P"
