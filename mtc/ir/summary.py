"""The model summary behind ``mtc inspect`` (its JSON keys are documented in docs/inspect.md)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx_ir as ir

from mtc.ir.cost import model_cost
from mtc.ir.cuts import branch_points
from mtc.ir.names import origin
from mtc.ir.opset import opset_of
from mtc.ir.shapes import dims

SCHEMA_VERSION = 1


def _io(v: ir.Value) -> dict[str, Any]:
    d = dims(v)
    return {
        "name": v.name,
        "shape": list(d) if d is not None else None,
        "dtype": v.dtype.name.lower() if v.dtype is not None else None,
    }


def summarize(model: ir.Model, *, top: int = 10, source: str | None = None) -> dict[str, Any]:
    """A JSON-ready summary: interface, op histogram, parameters, MACs, heaviest nodes, cut points."""
    params, macs, costs = model_cost(model)
    nodes = list(model.graph)
    by_name = {n.name: n for n in nodes}
    heaviest = sorted(costs, key=lambda c: (-c.macs, -c.params, c.name))[:top]
    cuts = branch_points(model)
    hist = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in nodes)
    return {
        "schema": SCHEMA_VERSION,
        "source": source,
        "graph": model.graph.name,
        "opset": opset_of(model),
        "inputs": [_io(v) for v in model.graph.inputs],
        "outputs": [_io(v) for v in model.graph.outputs],
        "nodes": len(nodes),
        "ops": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
        "params": params,
        "macs": macs,
        "heaviest": [
            {"name": c.name, "op": c.op, "macs": c.macs, "params": c.params, "origin": origin(by_name[c.name])}
            for c in heaviest
        ],
        "branch_points": {"count": len(cuts), "names": cuts},
    }
