"""Convert a model to mtc's one target opset of the default ONNX domain."""

from __future__ import annotations

import onnx
import onnx.version_converter
import onnx_ir as ir

from mtc.errors import MtcError

#: Every model is converted to this opset at import (ONNX 18: Resize with `axes`, Split with
#: `num_outputs`, Reduce* with axes as an input).
TARGET_OPSET = 18
MIN_OPSET = 17
MIN_INPUT_OPSET = 11


def opset_of(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def convert_opset(model: ir.Model, target: int = TARGET_OPSET, *, file: str | None = None) -> ir.Model:
    """Return ``model`` with its default-domain opset set to ``target`` (converting ops as needed)."""
    if target < MIN_OPSET:
        raise MtcError(f"--opset {target} is too old: mtc targets opset {MIN_OPSET} or newer", file=file)
    current = opset_of(model)
    if current == target:
        return model
    if current < MIN_INPUT_OPSET:
        raise MtcError(f"opset {current} is too old: mtc imports opset {MIN_INPUT_OPSET} or newer", file=file)
    if current > target:
        _decompose_newer_ops(model)
    try:
        proto = onnx.version_converter.convert_version(ir.to_proto(model), target)
    except Exception as e:  # the converter raises bare RuntimeErrors with C++ messages
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MtcError(f"cannot convert from opset {current} to {target}: {msg}", file=file) from None
    return ir.from_proto(proto)


def _decompose_newer_ops(model: ir.Model) -> None:
    """Rewrite ops that exist only above opset 18 into older primitives, so down-conversion works.

    ``Gelu`` (opset 20; the dynamo exporter emits it for ``F.gelu``) becomes its defining formula:
    ``0.5 x (1 + erf(x / sqrt 2))``, or the tanh approximation when ``approximate="tanh"``.
    """
    for node in list(model.graph):
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            _decompose_gelu(model.graph, node)


def _decompose_gelu(g: ir.Graph, node: ir.Node) -> None:
    import numpy as np

    x = node.inputs[0]
    if x is None:
        raise MtcError("Gelu has no input X", node=node.name, op=node.op_type)
    approx = node.attributes["approximate"].as_string() if "approximate" in node.attributes else "none"
    dt = x.dtype.numpy() if x.dtype is not None else np.float32

    def c(val: float, tag: str) -> ir.Value:
        name = f"{node.name}/{tag}"
        v = ir.Value(name=name, const_value=ir.tensor(np.array(val, dtype=dt), name=name))
        g.register_initializer(v)
        return v

    def op(op_type: str, *inputs: ir.Value, tag: str) -> ir.Value:
        n = ir.node(op_type, list(inputs), name=f"{node.name}/{tag}")
        n.metadata_props.update(node.metadata_props)
        g.insert_before(node, n)
        return n.outputs[0]

    if approx == "tanh":
        x3 = op("Mul", x, op("Mul", x, x, tag="x2"), tag="x3")
        inner = op("Add", x, op("Mul", x3, c(0.044715, "k"), tag="kx3"), tag="inner")
        core = op("Tanh", op("Mul", inner, c(float(np.sqrt(2 / np.pi)), "s"), tag="scaled"), tag="tanh")
    else:
        core = op("Erf", op("Div", x, c(float(np.sqrt(2.0)), "sqrt2"), tag="div"), tag="erf")
    one_plus = op("Add", core, c(1.0, "one"), tag="add")
    half_x = op("Mul", x, c(0.5, "half"), tag="half_x")
    out = op("Mul", half_x, one_plus, tag="mul")
    node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
    g.remove(node, safe=True)
