"""Structural verifier run after every pass: the invariants every mtc graph keeps."""

from __future__ import annotations

from typing import NoReturn

import onnx_ir as ir

from mtc.ir.names import node_error


def verify(model: ir.Model, *, pass_name: str | None = None, allow_dead: bool = False) -> None:
    """Check the graph's invariants; raise :class:`MtcError` naming the first violation.

    Checks: unique node names; unique value names; one producer per value; every input defined
    before use (graph input, initializer or an earlier node's output); graph outputs defined; no
    dead node (all outputs unused and not graph outputs) unless ``allow_dead``.
    """
    g = model.graph

    def fail(msg: str, node: ir.Node | None = None) -> NoReturn:
        raise node_error(msg, node, pass_name=pass_name)

    defined: set[int] = set()
    names: dict[str, str] = {}

    def define(v: ir.Value, what: str, node: ir.Node | None = None) -> None:
        if not v.name:
            fail(f"{what} has an anonymous value", node)
        if v.name in names:
            fail(f"value '{v.name}' is defined twice ({names[v.name]} and {what})", node)
        names[v.name] = what
        defined.add(id(v))

    for v in g.inputs:
        define(v, f"graph input '{v.name}'")
    for name, v in g.initializers.items():
        if id(v) in defined:
            continue  # an initializer may also be listed as a graph input (old IR versions)
        if name != v.name:
            fail(f"initializer registered as '{name}' is named '{v.name}'")
        define(v, f"initializer '{name}'")

    node_names: set[str] = set()
    graph_outputs = {id(v) for v in g.outputs}
    for node in g:
        if not node.name:
            fail(f"a {node.op_type} node has no name")
        if node.name in node_names:
            fail("node name is not unique", node)
        node_names.add(node.name)
        for i, inp in enumerate(node.inputs):
            if inp is None:
                continue
            if id(inp) not in defined:
                producer = inp.producer()
                where = f" (it is produced later by '{producer.name}')" if producer is not None else ""
                fail(f"input {i} '{inp.name}' is used before it is defined{where}", node)
        for out in node.outputs:
            if out.producer() is not node:
                fail(f"output '{out.name}' has another producer", node)
            define(out, f"node '{node.name}'", node)
        if not allow_dead and node.outputs and all(
            not o.uses() and id(o) not in graph_outputs for o in node.outputs
        ):
            fail("dead node: none of its outputs is used or a graph output", node)
    for v in g.outputs:
        if id(v) not in defined:
            fail(f"graph output '{v.name}' is not produced by any node")
