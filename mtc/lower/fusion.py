"""Exact multi-node kernels: patterns the lowering runs as one PyTorch call.

Exporters spell some single PyTorch ops as several ONNX nodes: ``F.gelu`` becomes
``Div, Erf, Add, Mul, Mul`` and ``nn.Linear`` on a 3-d or 4-d input becomes ``MatMul, Add``. Running
them node by node costs extra kernels and autograd nodes per step. Here such groups are recognised
(with their constants checked) and lowered to the PyTorch op they came from, which computes the same
function in train and eval mode. Only groups whose intermediate values nothing else reads are fused;
the model itself is not modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from mtc.lower.registry import BuildNode, Kernel


@dataclass
class NodeView:
    """A node as the lowering sees it: an IR node, or a fused group standing for several.

    Attributes:
        node: the IR node (for a fused group: its last node, which names it).
        inputs: input values (``None`` for omitted optional inputs).
        outputs: output values.
        op_type: op type (for a fused group, e.g. ``Gelu``).
        builder: for a fused group, its builder (bypasses the registry).
        fused: op types of the nodes in a fused group.
    """

    node: ir.Node
    inputs: list[ir.Value | None]
    outputs: list[ir.Value]
    op_type: str
    builder: Any = None
    fused: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, node: ir.Node) -> NodeView:
        return cls(node, list(node.inputs), list(node.outputs), node.op_type)

    @property
    def label(self) -> str:
        return f"{self.op_type}, fused: {'+'.join(self.fused)}" if self.fused else self.op_type


def _scalar(v: ir.Value | None) -> float | None:
    """The value of a one-element constant (initializer or Constant node), else ``None``."""
    if v is None:
        return None
    t = v.const_value
    if t is None:
        p = v.producer()
        if p is None or p.op_type != "Constant" or "value" not in p.attributes:
            return None
        t = p.attributes["value"].value
    arr = np.asarray(t.numpy())
    if arr.size != 1 or arr.dtype.kind != "f":
        return None
    return float(arr.reshape(-1)[0])


def _close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-6)


class _Graph:
    def __init__(self, nodes: list[ir.Node], graph: ir.Graph) -> None:
        self.outputs = set(graph.outputs)
        self.index = {id(n): i for i, n in enumerate(nodes)}

    def sole_user(self, v: ir.Value) -> ir.Node | None:
        """The only node reading ``v`` (once), if ``v`` is not also a graph output."""
        if v in self.outputs:
            return None
        uses = list(v.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        return node if id(node) in self.index else None

    def producer(self, v: ir.Value | None, op: str) -> ir.Node | None:
        if v is None:
            return None
        p = v.producer()
        if p is None or p.op_type != op or p.domain not in ("", "ai.onnx") or id(p) not in self.index:
            return None
        return p


def _other(node: ir.Node, v: ir.Value) -> ir.Value | None:
    ins = list(node.inputs)
    if len(ins) != 2:
        return None
    return ins[1] if ins[0] is v else ins[0] if ins[1] is v else None


def _match_gelu(g: _Graph, erf: ir.Node) -> tuple[list[ir.Node], ir.Value, ir.Value] | None:
    """``x * 0.5 * (1 + erf(x / sqrt 2))`` in any association -> ``(nodes, x, y)``."""
    scaled = erf.inputs[0]
    pre = g.producer(scaled, "Div")
    if pre is not None and _close(_scalar(pre.inputs[1]), math.sqrt(2.0)):
        x = pre.inputs[0]
    else:
        pre = g.producer(scaled, "Mul")
        if pre is None:
            return None
        x = None
        for a, b in ((0, 1), (1, 0)):
            if _close(_scalar(pre.inputs[b]), math.sqrt(0.5)):
                x = pre.inputs[a]
        if x is None:
            return None
    if scaled is None or x is None or g.sole_user(scaled) is not erf:
        return None
    add = g.sole_user(erf.outputs[0])
    if add is None or add.op_type != "Add" or not _close(_scalar(_other(add, erf.outputs[0])), 1.0):
        return None
    # The product x * 0.5 * (1 + erf) in any of its associations.
    mul = g.sole_user(add.outputs[0])
    if mul is None or mul.op_type != "Mul":
        return None
    other = _other(mul, add.outputs[0])
    half = g.producer(other, "Mul")
    if half is not None and other is not None and g.sole_user(other) is mul and x in list(half.inputs) \
            and _close(_scalar(_other(half, x)), 0.5):  # (x * 0.5) * (1 + erf)
        return [pre, erf, add, half, mul], x, mul.outputs[0]  # type: ignore[return-value]
    last = g.sole_user(mul.outputs[0])
    if last is None or last.op_type != "Mul":
        return None
    rest = _other(last, mul.outputs[0])
    if (other is x and _close(_scalar(rest), 0.5)) or (_close(_scalar(other), 0.5) and rest is x):
        return [pre, erf, add, mul, last], x, last.outputs[0]  # type: ignore[return-value]
    return None


def _build_gelu(node: BuildNode) -> Kernel:
    return F.gelu


def _match_linear(g: _Graph, mm: ir.Node) -> tuple[list[ir.Node], list[ir.Value], ir.Value] | None:
    """``MatMul(x, W) + b`` with W a 2-d initializer and b a vector initializer -> ``linear``."""
    x, w = mm.inputs[0], mm.inputs[1]
    group = [mm]
    transposed = g.producer(w, "Transpose")
    if transposed is not None and w is not None and g.sole_user(w) is mm:
        perm = transposed.attributes.get("perm")
        if perm is None or list(perm.value) == [1, 0]:
            group.insert(0, transposed)
            w = transposed.inputs[0]
    if w is None or w.const_value is None or len(w.const_value.shape) != 2 or w.const_value.dtype.numpy().kind != "f":
        return None
    add = g.sole_user(mm.outputs[0])
    if add is None or add.op_type != "Add":
        return None
    b = _other(add, mm.outputs[0])
    if b is None or b.const_value is None or len(b.const_value.shape) > 1:
        return None
    n_out = w.const_value.shape[0 if len(group) == 2 else 1]
    if b.const_value.size not in (1, n_out):
        return None
    return [*group, add], [x, w, b], add.outputs[0]  # type: ignore[list-item]


def _build_linear(node: BuildNode) -> Kernel:
    node.weight(1, 2)
    return F.linear


def _build_linear_t(node: BuildNode) -> Kernel:
    node.weight(1, 2)

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # F.linear wants [out, in]; this ONNX weight is [in, out]: the transposed view costs nothing.
        return F.linear(x, w.t(), b)

    return linear


def fuse(nodes: list[ir.Node], graph: ir.Graph) -> list[NodeView]:
    """Node views in execution order, with fusable groups replaced by one view each."""
    g = _Graph(nodes, graph)
    replaced: dict[int, NodeView | None] = {}  # id(node) -> view at its last node, None elsewhere
    for n in nodes:
        if id(n) in replaced or n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type == "Erf":
            m = _match_gelu(g, n)
            if m is not None and not any(id(k) in replaced for k in m[0]):
                group, x, y = m
                view = NodeView(group[-1], [x], [y], "Gelu", _build_gelu, [k.op_type for k in group])
                _claim(replaced, group, view, g)
        elif n.op_type == "MatMul":
            m2 = _match_linear(g, n)
            if m2 is not None and not any(id(k) in replaced for k in m2[0]):
                group, ins, y = m2
                build = _build_linear if group[0].op_type == "Transpose" else _build_linear_t
                view = NodeView(group[-1], list(ins), [y], "Linear", build, [k.op_type for k in group])
                _claim(replaced, group, view, g)
    out: list[NodeView] = []
    for n in nodes:
        if id(n) not in replaced:
            out.append(NodeView.of(n))
        elif replaced[id(n)] is not None:
            out.append(replaced[id(n)])  # type: ignore[arg-type]
    return out


def _claim(replaced: dict[int, NodeView | None], group: list[ir.Node], view: NodeView, g: _Graph) -> None:
    # The fused view runs where the group's last node ran: all its inputs are ready by then.
    last = max(group, key=lambda k: g.index[id(k)])
    view.node = last
    for k in group:
        replaced[id(k)] = view if k is last else None
