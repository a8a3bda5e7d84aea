"""Candidate branch points: tensors that every path from the inputs to the outputs passes through.

They are the dominators of a virtual sink in the dataflow graph of values (networkx), i.e. the
places where a tree-shaped multi-task model can split into per-task branches.
"""

from __future__ import annotations

import networkx as nx
import onnx_ir as ir

_SOURCE = "__mtc_source__"
_SINK = "__mtc_sink__"


def dataflow_graph(model: ir.Model) -> nx.DiGraph:
    """A DiGraph over value names: an edge a -> b when a node reads a and writes b.

    Initializers and constants are left out: they do not carry activations.
    """
    g = nx.DiGraph()
    init = set(model.graph.initializers)
    for v in model.graph.inputs:
        if v.name not in init:
            g.add_edge(_SOURCE, v.name)
    for node in model.graph:
        ins = [v.name for v in node.inputs if v is not None and v.name not in init and v.const_value is None]
        for out in node.outputs:
            if not ins:
                continue
            for i in ins:
                g.add_edge(i, out.name)
    for v in model.graph.outputs:
        if v.name in g:
            g.add_edge(v.name, _SINK)
    return g


def branch_points(model: ir.Model, *, include_ends: bool = False) -> list[str]:
    """Names of the cut-point tensors, from input to output.

    Args:
        model: the model.
        include_ends: also list graph inputs and outputs (trivial cut points).
    """
    g = dataflow_graph(model)
    if _SINK not in g or _SOURCE not in g:
        return []
    idom = nx.immediate_dominators(g, _SOURCE)
    if _SINK not in idom:
        return []
    chain = []
    v = idom[_SINK]
    while v != _SOURCE:
        chain.append(v)
        v = idom[v]
    chain.reverse()
    if include_ends:
        return chain
    ends = {v.name for v in model.graph.inputs} | {v.name for v in model.graph.outputs}
    return [c for c in chain if c not in ends]
