"""Channel dependency groups: which channels of an ONNX graph must be kept or removed together.

Vocabulary (docs/channels.md has the per-op rules as a table):

- A *slot* is one axis of one activation that carries channels: a Conv's output axis 1, a MatMul's
  last axis, the flattened axis of a ``Flatten`` that a Gemm reads.
- Every position of a slot is labelled with a *node* (an integer). Nodes are created where channels
  are created: a producer's output channels (Conv, ConvTranspose, Gemm, MatMul with a constant
  weight), a graph input, an op without a rule. Ops that keep channels apart (activations,
  BatchNormalization, pooling, Transpose, Concat, Slice, Flatten, ...) pass the labels along
  without creating or joining any, so most of the graph costs one numpy indexing per value.
- Ops that tie channels (a residual Add, a squeeze-excite Mul, a grouped conv) join nodes.
  Connected nodes form a *unit*: one channel that stays or goes as a whole, wherever it appears.
- The units one producer creates together form a *group*, split where a Slice, Split or Gather
  selects part of them (ranges), and joined where units are tied. A group's channels (its units,
  numbered 0..size-1 in the order of the first producer) can be kept in any subset.
- A group is *prunable* unless it touches something that cannot lose channels: a graph input or
  output, an op without a rule, or an op that mixes the channel axis without weights (a
  LayerNormalization over channels, Softmax over channels, a reduction over channels, a Reshape
  that splits channels). The reason names the node. An op without a rule never gives a wrong
  answer, only an unprunable group.

The contract the rules keep: for a kept subset of every group's units, deleting the other
channels from every producer and consumer of the group computes exactly what the original graph
computes with the removed channels' consumer weights set to zero.

:func:`analyze` returns a :class:`Channels` result; nothing is written into the model. Unions use
a vectorised connected-components pass over all node pairs at once, so the analysis is linear in
the graph size (a few milliseconds for a ResNet-34).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.ir.shapes import dims

__all__ = ["Channels", "Group", "Member", "Port", "analyze", "describe_map"]

_DEFAULT_DOMAINS = ("", "ai.onnx")

#: Elementwise ops of one tensor input: channels pass through unchanged (extra inputs are scalars
#: or, for CastLike, a type donor).
UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "CastLike", "Ceil", "Celu",
    "Clip", "Cos", "Cosh", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round",
    "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh",
    "ThresholdedRelu",
})
#: Elementwise ops of several inputs with multidirectional (numpy) broadcasting.
ELEMENTWISE = frozenset({
    "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub",
    "Sum", "Where", "Xor",
})
#: Pooling: spatial axes are mixed, the channel axis (1) is not.
POOL = frozenset({"AveragePool", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "LpPool", "MaxPool"})
#: Reductions over ``axes`` (and ArgMax/ArgMin over ``axis``).
REDUCE = frozenset({
    "ArgMax", "ArgMin", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
})
#: Normalisations over one axis (``axis``): the axis is mixed, the others are not.
ALONG_AXIS = frozenset({"Hardmax", "LogSoftmax", "LpNormalization", "Softmax"})
#: Producers: ops whose output channels come from the rows of a constant weight.
PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


# --- results --------------------------------------------------------------------------------------


def describe_map(positions: np.ndarray, units: np.ndarray, size: int) -> str:
    """A short description of which positions of an axis hold which units of a group.

    ``all`` (the whole axis, in order), ``a:b`` (positions a..b-1 hold units 0.. in order, e.g. an
    offset inside a Concat), ``a:b blocks of k`` (unit u at k consecutive positions, as after a
    Flatten of ``[C,H,W]``), ``a:b stride n`` (unit u every n positions, as after a Flatten of a
    channels-last ``[H,W,C]``); a suffix ``<- units i:j`` when the positions hold units other than
    0..; ``map`` for anything else.
    """
    n = len(positions)
    if n == 0:
        return "none"
    p0, p1 = int(positions[0]), int(positions[-1]) + 1
    contiguous = p1 - p0 == n and bool(np.all(np.diff(positions) == 1))
    uniq = np.unique(units)
    u0 = int(uniq[0])
    dense = int(uniq[-1]) - u0 + 1 == len(uniq)
    suffix = "" if u0 == 0 and dense else (f" <- units {u0}:{int(uniq[-1]) + 1}" if dense else "")
    if not contiguous or not dense:
        return "map"
    k = n // len(uniq)
    rel = units - u0
    if k == 1 and np.array_equal(rel, np.arange(n)):
        return ("all" if p0 == 0 and n == size and not suffix else f"{p0}:{p1}") + suffix
    if k * len(uniq) == n:
        if np.array_equal(rel, np.repeat(np.arange(len(uniq)), k)):
            return f"{p0}:{p1} blocks of {k}{suffix}"
        if np.array_equal(rel, np.tile(np.arange(len(uniq)), k)):
            return f"{p0}:{p1} stride {len(uniq)}{suffix}"
    return "map"


@dataclass(frozen=True, eq=False)
class Member:
    """One axis of one activation holding some of a group's channels.

    Attributes:
        value: the activation's name.
        axis: the axis.
        size: the axis's length (all groups together).
        positions: the positions along the axis that hold this group's channels, ascending.
        units: for each of those positions, the group channel (unit) it holds.
    """

    value: str
    axis: int
    size: int
    positions: np.ndarray
    units: np.ndarray

    @property
    def map(self) -> str:
        return describe_map(self.positions, self.units, self.size)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "axis": self.axis, "size": self.size, "map": self.map}
        if out["map"] == "map":
            out["positions"] = self.positions.tolist()
            out["units"] = self.units.tolist()
        return out


@dataclass(frozen=True, eq=False)
class Port(Member):
    """A producer's output or a consumer's input as seen by a group (a :class:`Member` plus its node).

    Attributes:
        node: the node's name.
        op: its op type.
        index: the output index (producers) or input index (consumers) of ``value`` on the node.
    """

    node: str = ""
    op: str = ""
    index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, **super().to_json()}


@dataclass(eq=False)
class Group:
    """Channels that are kept or removed together.

    Attributes:
        id: index in :attr:`Channels.groups` (groups are numbered in graph order).
        name: a readable, unique name: the first producer's node name (with a range when a
            Slice/Split cuts that producer's channels into several groups), else the first
            member's value name.
        size: the number of channels (units).
        members: every activation axis holding some of the channels.
        producers: the nodes whose output channels these are (weights sliced on the output axis).
        consumers: the nodes that read these channels through weights (sliced on the input axis).
        reasons: why the group cannot be pruned, each naming a node or value; empty if it can.
    """

    id: int
    name: str
    size: int
    members: tuple[Member, ...]
    producers: tuple[Port, ...]
    consumers: tuple[Port, ...]
    reasons: tuple[str, ...]

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str | None:
        """The first reason the group is not prunable (None if it is)."""
        return self.reasons[0] if self.reasons else None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "prunable": self.prunable,
                "reason": self.reason, "producers": [p.to_json() for p in self.producers],
                "consumers": [c.to_json() for c in self.consumers], "members": [m.to_json() for m in self.members]}


class Channels:
    """The channel dependency groups of one model (the result of :func:`analyze`).

    Besides the groups, it keeps, for every slot, which unit each position holds, so a keep-set
    per group turns into a kept-position mask per axis (:meth:`position_mask`): that is all a
    pruner, a mask inserter or a width chooser needs.
    """

    def __init__(self, groups: list[Group], slot_units: dict[tuple[str, int], np.ndarray],
                 unit_group: np.ndarray, unit_index: np.ndarray, group_units: list[np.ndarray],
                 touches: dict[str, set[int]], seconds: float) -> None:
        self.groups: tuple[Group, ...] = tuple(groups)
        #: (value, axis) -> global unit id per position
        self.slot_units = slot_units
        #: global unit id -> group id / index within its group
        self.unit_group = unit_group
        self.unit_index = unit_index
        #: group id -> its global unit ids, in unit order
        self.group_units = group_units
        #: node name -> ids of the groups whose members it reads or writes
        self.touches = touches
        #: wall time of the analysis
        self.seconds = seconds
        self._by_name = {g.name: g for g in self.groups}
        self._by_value: dict[str, dict[int, np.ndarray]] = {}
        for (v, a), u in slot_units.items():
            self._by_value.setdefault(v, {})[a] = u

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def find(self, key: int | str) -> Group | None:
        """The group named ``key`` or with id ``key`` (an int or a string of digits), else None."""
        if isinstance(key, str):
            if key in self._by_name:
                return self._by_name[key]
            if not key.strip().isdigit():
                return None
            key = int(key)
        return self.groups[key] if 0 <= key < len(self.groups) else None

    def slots_of(self, value: str) -> dict[int, np.ndarray]:
        """``{axis: global unit id per position}`` of a value's channel axes."""
        return self._by_value.get(value, {})

    def unit_mask(self, keep: Mapping[int, Sequence[int] | np.ndarray]) -> np.ndarray:
        """Kept flag per global unit for ``keep`` (group id -> kept unit indices; others whole)."""
        kept = np.ones(len(self.unit_group), dtype=bool)
        for gid, idx in keep.items():
            units = self.group_units[gid]
            kept[units] = False
            kept[units[np.asarray(idx, dtype=np.int64)]] = True
        return kept

    def position_mask(self, value: str, axis: int, unit_mask: np.ndarray) -> np.ndarray | None:
        """Kept flag per position of ``value``'s ``axis``; None when that axis is not a slot."""
        u = self._by_value.get(value, {}).get(axis)
        return None if u is None else unit_mask[u]

    def to_json(self) -> dict[str, Any]:
        return {"groups": [g.to_json() for g in self.groups], "count": len(self.groups),
                "prunable": sum(g.prunable for g in self.groups),
                "channels": int(sum(g.size for g in self.groups)),
                "prunable_channels": int(sum(g.size for g in self.groups if g.prunable))}

    def format(self) -> str:
        """A plain-text table: id, name, size, producers, consumers, members, prunable or why not."""
        rows = [("id", "group", "size", "producers", "consumers", "members", "prunable")]
        for g in self.groups:
            prods = ", ".join(p.node for p in g.producers[:3]) + (f" +{len(g.producers) - 3}" if len(g.producers) > 3 else "")
            rows.append((str(g.id), g.name, str(g.size), prods or "-", str(len(g.consumers)), str(len(g.members)),
                         "yes" if g.prunable else f"no: {g.reason}"))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=True)) + "  " + r[6] for r in rows]
        n_pr = sum(g.prunable for g in self.groups)
        ch = sum(g.size for g in self.groups if g.prunable)
        lines.append(f"{len(self.groups)} groups, {n_pr} prunable ({ch} of {sum(g.size for g in self.groups)} "
                     "channels)")
        return "\n".join(lines)


# --- the analysis ----------------------------------------------------------------------------------


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.is_graph_input():
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _static(d: Sequence[int | str | None], axes: Sequence[int]) -> bool:
    return all(isinstance(d[a], int) for a in axes)


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` vertices joined by edges ``a[i] - b[i]``: the smallest
    vertex of each component, per vertex (hooking and pointer jumping, all vectorised)."""
    lab = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return lab
    while True:
        la, lb = lab[a], lab[b]
        if np.array_equal(la, lb):
            return lab
        lo = np.minimum(la, lb)
        np.minimum.at(lab, la, lo)
        np.minimum.at(lab, lb, lo)
        while True:
            nxt = lab[lab]
            if np.array_equal(nxt, lab):
                break
            lab = nxt


def _reshape_map(src: Sequence[int | str | None], dst: Sequence[int | str | None],
                 axis: int) -> tuple[int, np.ndarray] | None:
    """Where a reshape from ``src`` to ``dst`` dims sends axis ``axis``: ``(out_axis, index)`` with
    ``index[p]`` the input position along ``axis`` that output position ``p`` of ``out_axis``
    holds; None if the axis is split or the dims cannot be matched.

    Dims are matched in blocks of equal products (size-1 dims ignored); the axis must end up in
    a block with a single output dim: alone (a pure rename) or merged with its neighbours (a
    Flatten: blocks of ``H*W`` per channel, or channels-minor strides).
    """
    if src[axis] == 1:
        return None
    sym_src = [d for d in src if not isinstance(d, int)]
    fresh = [d for d in dst if not isinstance(d, int) and d not in sym_src]
    if len(fresh) == 1 and len(sym_src) == 1 and sym_src[0] is not None:
        # Shape inference names (or leaves unknown) a -1 next to a symbolic batch; when the static
        # dims account for everything else, it is the batch.
        static_src = math.prod(d for d in src if isinstance(d, int))
        static_dst = math.prod(d for d in dst if isinstance(d, int))
        if static_src == static_dst:
            dst = [sym_src[0] if d == fresh[0] else d for d in dst]
    ins = [k for k, d in enumerate(src) if d != 1]
    outs = [k for k, d in enumerate(dst) if d != 1]

    def size(d: int | str | None) -> int | None:
        return d if isinstance(d, int) else None

    p = q = 0
    while p < len(ins) and q < len(outs):
        i0, j0 = p, q
        pi, po = size(src[ins[p]]), size(dst[outs[q]])
        if pi is None or po is None:
            # A symbolic dim (the batch) only matches the same symbol, alone.
            if src[ins[p]] != dst[outs[q]] or src[ins[p]] is None:
                return None
            p, q = p + 1, q + 1
        else:
            while pi != po:
                if pi < po:
                    p += 1
                    nxt = size(src[ins[p]]) if p < len(ins) else None
                    if nxt is None:
                        return None
                    pi *= nxt
                else:
                    q += 1
                    nxt = size(dst[outs[q]]) if q < len(outs) else None
                    if nxt is None:
                        return None
                    po *= nxt
            p, q = p + 1, q + 1
        block_in, block_out = ins[i0:p], outs[j0:q]
        if axis in block_in:
            if len(block_out) != 1:
                return None
            sizes = {k: size(src[k]) or 1 for k in block_in}
            inner = math.prod(v for k, v in sizes.items() if k > axis)
            total = math.prod(sizes.values())
            return block_out[0], (np.arange(total, dtype=np.int64) // inner) % sizes[axis]
    return None


class _Walker:
    """One pass over the graph in order, labelling slot positions with nodes (see module docstring)."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.n = 0
        self.roots: list[tuple[int, int]] = []
        self.slots: dict[ir.Value, dict[int, np.ndarray]] = {}
        self.tie_a: list[np.ndarray] = []
        self.tie_b: list[np.ndarray] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.selections: list[tuple[np.ndarray, np.ndarray]] = []
        self.ports: list[tuple[str, ir.Node, int, ir.Value, int, np.ndarray]] = []
        #: sequence value -> (split axis, its pieces' nodes on that axis, the input's slots on other axes)
        self.sequences: dict[ir.Value, tuple[int, list[np.ndarray], dict[int, np.ndarray]]] = {}
        #: why a value carries no tracked channels (the first block upstream), for later diagnostics
        self.why: dict[ir.Value, str] = {}
        self._blocked_here: str | None = None
        self.rules: dict[str, Callable[[ir.Node], None]] = {
            "Conv": self.conv, "ConvTranspose": self.conv, "Gemm": self.gemm, "MatMul": self.matmul,
            "BatchNormalization": self.batchnorm, "InstanceNormalization": self.instancenorm,
            "LayerNormalization": self.layernorm, "GroupNormalization": self.groupnorm,
            "LRN": self.lrn, "MeanVarianceNormalization": self.mvn, "Concat": self.concat, "Split": self.split,
            "Slice": self.slice, "Gather": self.gather, "Transpose": self.transpose, "Reshape": self.reshape,
            "Flatten": self.reshape, "Squeeze": self.reshape, "Unsqueeze": self.reshape, "Expand": self.expand,
            "Tile": self.tile, "Resize": self.resize, "Pad": self.pad, "Shape": self.shape, "Size": self.size,
            "SplitToSequence": self.split_to_sequence, "SequenceAt": self.sequence_at,
        }
        for op in UNARY:
            self.rules[op] = self.unary
        for op in ELEMENTWISE:
            self.rules[op] = self.elementwise
        for op in POOL:
            self.rules[op] = self.pool
        for op in REDUCE:
            self.rules[op] = self.reduce
        for op in ALONG_AXIS:
            self.rules[op] = self.along_axis

    # -- bookkeeping --

    def new(self, size: int, reason: str | None = None) -> np.ndarray:
        nodes = np.arange(self.n, self.n + size, dtype=np.int64)
        self.roots.append((self.n, size))
        self.n += size
        if reason is not None:
            self.blocks.append((nodes, reason))
        return nodes

    def get(self, v: ir.Value | None, axis: int) -> np.ndarray | None:
        return None if v is None else self.slots.get(v, {}).get(axis)

    def all(self, v: ir.Value | None) -> dict[int, np.ndarray]:
        return {} if v is None else self.slots.get(v, {})

    def put(self, v: ir.Value, axis: int, nodes: np.ndarray) -> None:
        self.slots.setdefault(v, {})[axis] = nodes

    def need(self, v: ir.Value, axis: int, size: int) -> np.ndarray:
        """``v``'s slot on ``axis``; a new unprunable one when channels there were not tracked."""
        s = self.get(v, axis)
        if s is not None:
            return s
        if _const(v) is not None:
            return self.new(size, f"constant '{v.name}' holds channels")
        p = v.producer()
        if p is None:
            reason = f"graph input '{v.name}'"
        elif v in self.why:
            reason = f"'{v.name}' axis {axis} is not tracked: {self.why[v]}"
        else:
            reason = f"'{v.name}' axis {axis} comes from node '{p.name}' ({p.op_type}), which creates no channels there"
        nodes = self.new(size, reason)
        self.put(v, axis, nodes)
        return nodes

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        if a is not b and not np.array_equal(a, b):
            self.tie_a.append(a)
            self.tie_b.append(b)

    def block(self, nodes: np.ndarray, reason: str) -> None:
        self.blocks.append((nodes, reason))
        if self._blocked_here is None:
            self._blocked_here = reason

    def block_all(self, v: ir.Value | None, reason: str) -> None:
        for s in self.all(v).values():
            self.block(s, reason)

    def select(self, nodes: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``nodes[positions]``, remembering the selection so that groups split at its edges."""
        if len(positions) != len(nodes) or not np.array_equal(positions, np.arange(len(nodes))):
            self.selections.append((nodes, positions))
        return nodes[positions]

    def port(self, role: str, node: ir.Node, index: int, v: ir.Value, axis: int, nodes: np.ndarray) -> None:
        self.ports.append((role, node, index, v, axis, nodes))

    def alias(self, src: ir.Value | None, dst: ir.Value) -> None:
        for a, s in self.all(src).items():
            self.put(dst, a, s)

    @staticmethod
    def who(node: ir.Node) -> str:
        return f"node '{node.name}' ({node.op_type})"

    # -- the walk --

    def run(self) -> None:
        for v in self.graph.inputs:
            d = dims(v)
            if d is not None and len(d) >= 2 and isinstance(d[1], int):
                self.new_input(v, d[1])
        for node in self.graph:
            self.visit(node)
        for v in self.graph.outputs:
            self.block_all(v, f"graph output '{v.name}'")

    def new_input(self, v: ir.Value, size: int) -> None:
        self.put(v, 1, self.new(size, f"graph input '{v.name}'"))

    def visit(self, node: ir.Node) -> None:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            reason = f"{self.who(node)} has subgraphs"
            for v in self._captured(node):
                self.block_all(v, reason)
            self.unknown(node, reason)
            return
        if node.domain not in _DEFAULT_DOMAINS:
            self.unknown(node, f"node '{node.name}' ({node.domain}.{node.op_type}) has no channel rule")
            return
        rule = self.rules.get(node.op_type)
        self._blocked_here = None
        if rule is None:
            self.unknown(node)
        else:
            rule(node)
        # Remember why outputs lost their channels, so a later tie names the real cause.
        why = self._blocked_here or next((self.why[v] for v in node.inputs if v is not None and v in self.why), None)
        if why is not None:
            for out in node.outputs:
                if out not in self.slots:
                    self.why[out] = why

    def _captured(self, node: ir.Node) -> list[ir.Value]:
        out: list[ir.Value] = []
        for a in node.attributes.values():
            graphs = [a.value] if a.type == ir.AttributeType.GRAPH else list(a.value or [])
            for sub in graphs:
                for n in ir.traversal.RecursiveGraphIterator(sub):
                    out.extend(v for v in n.inputs if v is not None and v in self.slots)
        return out

    def unsupported(self, node: ir.Node) -> str:
        """The reason for a node whose rule does not cover its form (unknown shapes, computed
        parameters or attributes the rule needs as constants)."""
        return f"{self.who(node)} has unknown shapes or computed parameters"

    def unknown(self, node: ir.Node, reason: str | None = None) -> None:
        reason = reason or f"{self.who(node)} has no channel rule"
        for v in node.inputs:
            self.block_all(v, reason)

    def _out_dims(self, node: ir.Node, i: int = 0) -> tuple[int | str | None, ...] | None:
        return dims(node.outputs[i]) if len(node.outputs) > i else None

    # -- rules --

    def unary(self, node: ir.Node) -> None:
        x = node.inputs[0] if node.inputs else None
        for out in node.outputs:
            self.alias(x, out)

    def elementwise(self, node: ir.Node) -> None:
        out = node.outputs[0]
        od = dims(out)
        operands = [v for v in node.inputs if v is not None]
        shapes = [dims(v) for v in operands]
        if od is None or any(s is None for s in shapes):
            if any(self.all(v) for v in operands):
                self.unknown(node, f"{self.who(node)} has an operand or output of unknown shape")
            return
        r = len(od)
        consts = [_const(v) is not None for v in operands]
        for a in range(r):
            full: list[ir.Value] = []
            tracked = False
            for v, d, c in zip(operands, shapes, consts, strict=True):
                assert d is not None
                k = a - (r - len(d))
                if k < 0:
                    continue
                s = None if c else self.get(v, k)
                if d[k] == od[a]:
                    if not c:
                        full.append(v)
                        tracked |= s is not None
                elif s is not None:
                    self.block(s, f"'{v.name}' is broadcast over axis {k} by {self.who(node)}")
            if not tracked:
                continue
            size = od[a]
            if not isinstance(size, int):
                for v in full:
                    self.block_all(v, f"{self.who(node)} has a symbolic size on a channel axis")
                continue
            first = None
            for v in full:
                k = a - (r - len(dims(v) or ()))
                s = self.need(v, k, size)
                if first is None:
                    first = s
                else:
                    self.tie(first, s)
            assert first is not None
            self.put(out, a, first)

    def conv(self, node: ir.Node) -> None:
        transpose = node.op_type == "ConvTranspose"
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        W = _const(w)
        xd = dims(x) if x is not None else None
        if x is None or W is None or (b is not None and _const(b) is None) or xd is None or len(xd) < 3:
            self.unknown(node, f"{self.who(node)} has computed weights or an unknown input shape")
            return
        for a, s in self.all(x).items():
            if a != 1:
                self.block(s, f"{self.who(node)} mixes axis {a} of '{x.name}'")
        groups = int(_attr(node, "group", 1))
        cin = xd[1]
        if not isinstance(cin, int):
            self.unknown(node, f"{self.who(node)} has an input of unknown channel count")
            return
        cout = W.shape[1] * groups if transpose else W.shape[0]
        y = node.outputs[0]
        if groups == 1:
            # Channel counts do not matter here: a 1-channel conv with group=1 is an ordinary one.
            t = self.get(x, 1)
            if t is not None:
                self.port("consumer", node, 0, x, 1, t)
            o = self.new(cout)
        else:
            cin_g, cout_g = cin // groups, cout // groups
            s = self.need(x, 1, cin)
            self.port("consumer", node, 0, x, 1, s)
            if cin_g == 1:
                gn = s  # depthwise: output block g reads input channel g only
            else:
                gn = self.new(groups)  # one unit per conv group: whole groups are kept or removed
                self.tie(s, np.repeat(gn, cin_g))
            o = np.repeat(gn, cout_g) if cout_g > 1 else gn
        self.put(y, 1, o)
        self.port("producer", node, 0, y, 1, o)

    def gemm(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        B = _const(b)
        if a is None or B is None or _const(a) is not None or (c is not None and _const(c) is None) or B.ndim != 2:
            self.unknown(node, f"{self.who(node)} has no constant weight B")
            return
        ta, tb = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
        k_axis = 0 if ta else 1
        y = node.outputs[0]
        s = self.get(a, k_axis)
        if s is not None:
            self.port("consumer", node, 0, a, k_axis, s)
        s = self.get(a, 1 - k_axis)
        if s is not None:
            self.put(y, 0, s)
        o = self.new(B.shape[0] if tb else B.shape[1])
        self.put(y, 1, o)
        self.port("producer", node, 0, y, 1, o)

    def matmul(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        A, B = _const(a), _const(b)
        y = node.outputs[0]
        if a is not None and b is not None and A is None and B is not None and B.ndim == 2:
            r = len(dims(a) or ())
            if r < 2:
                self.unknown(node, self.unsupported(node))
                return
            for ax, s in self.all(a).items():
                if ax == r - 1:
                    self.port("consumer", node, 0, a, ax, s)
                else:
                    self.put(y, ax, s)
            o = self.new(B.shape[1])
            self.put(y, r - 1, o)
            self.port("producer", node, 0, y, r - 1, o)
        elif a is not None and b is not None and B is None and A is not None and A.ndim == 2:
            r = len(dims(b) or ())
            if r < 2:
                self.unknown(node, self.unsupported(node))
                return
            for ax, s in self.all(b).items():
                if ax == r - 2:
                    self.port("consumer", node, 1, b, ax, s)
                else:
                    self.put(y, ax, s)
            o = self.new(A.shape[0])
            self.put(y, r - 2, o)
            self.port("producer", node, 0, y, r - 2, o)
        else:
            self.unknown(node, f"{self.who(node)} multiplies two computed tensors")

    def _params_const(self, node: ir.Node, first: int = 1) -> bool:
        return all(v is None or _const(v) is not None for v in node.inputs[first:])

    def _extra_outputs_used(self, node: ir.Node) -> bool:
        return any(o.uses() or o.is_graph_output() for o in node.outputs[1:])

    def batchnorm(self, node: ir.Node) -> None:
        if not self._params_const(node) or self._extra_outputs_used(node):
            self.unknown(node, f"{self.who(node)} has computed parameters or training outputs")
            return
        self.alias(node.inputs[0], node.outputs[0])

    def instancenorm(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if not self._params_const(node):
            self.unknown(node, self.unsupported(node))
            return
        for a, s in self.all(x).items():
            if a >= 2:
                self.block(s, f"{self.who(node)} takes statistics over axis {a}")
            else:
                self.put(node.outputs[0], a, s)

    def _mixes(self, node: ir.Node, axes: set[int], what: str) -> None:
        x = node.inputs[0]
        for a, s in self.all(x).items():
            if a in axes:
                self.block(s, f"{self.who(node)} {what} axis {a} of '{x.name if x is not None else ''}'")
            else:
                for out in node.outputs[:1]:
                    self.put(out, a, s)

    def _rank(self, v: ir.Value | None) -> int | None:
        d = dims(v) if v is not None else None
        return None if d is None else len(d)

    def layernorm(self, node: ir.Node) -> None:
        r = self._rank(node.inputs[0])
        if r is None or not self._params_const(node) or self._extra_outputs_used(node):
            self.unknown(node, self.unsupported(node))
            return
        axis = int(_attr(node, "axis", -1)) % r
        # Its mean and variance read every channel on these axes: removing one changes the others.
        self._mixes(node, set(range(axis, r)), "normalises over")

    def groupnorm(self, node: ir.Node) -> None:
        r = self._rank(node.inputs[0])
        if r is None:
            self.unknown(node, self.unsupported(node))
            return
        self._mixes(node, set(range(1, r)), "normalises groups of channels over")

    def lrn(self, node: ir.Node) -> None:
        self._mixes(node, {1}, "mixes neighbouring channels on")

    def mvn(self, node: ir.Node) -> None:
        r = self._rank(node.inputs[0])
        if r is None:
            self.unknown(node, self.unsupported(node))
            return
        axes = {int(a) % r for a in _attr(node, "axes", [0, 2, 3])}
        self._mixes(node, axes, "normalises over")

    def along_axis(self, node: ir.Node) -> None:
        r = self._rank(node.inputs[0])
        if r is None:
            self.unknown(node, self.unsupported(node))
            return
        self._mixes(node, {int(_attr(node, "axis", -1)) % r}, "normalises over")

    def pool(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if self._extra_outputs_used(node):
            # MaxPool's indices are flat offsets that count channels.
            self.unknown(node, f"{self.who(node)} returns indices")
            return
        for a, s in self.all(x).items():
            if a >= 2:
                self.block(s, f"{self.who(node)} pools over axis {a}")
            else:
                self.put(node.outputs[0], a, s)

    def reduce(self, node: ir.Node) -> None:
        x = node.inputs[0]
        r = self._rank(x)
        if r is None:
            self.unknown(node, self.unsupported(node))
            return
        keep = bool(_attr(node, "keepdims", 1))
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = {int(_attr(node, "axis", 0)) % r}
        else:
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                arr = _const(node.inputs[1])
                if arr is None:
                    self.unknown(node, f"{self.who(node)} has computed axes")
                    return
                listed = [int(a) for a in arr.reshape(-1)]
            else:
                listed = [int(a) for a in _attr(node, "axes", [])]
            if not listed:
                if _attr(node, "noop_with_empty_axes", 0):
                    self.alias(x, node.outputs[0])
                    return
                listed = list(range(r))
            axes = {a % r for a in listed}
        for a, s in self.all(x).items():
            if a in axes:
                self.block(s, f"{self.who(node)} reduces over axis {a} of '{x.name if x is not None else ''}'")
            else:
                self.put(node.outputs[0], a if keep else a - sum(1 for b in axes if b < a), s)

    def concat(self, node: ir.Node) -> None:
        out = node.outputs[0]
        od = dims(out)
        ins = [v for v in node.inputs if v is not None]
        if od is None or any(dims(v) is None for v in ins):
            if any(self.all(v) for v in ins):
                self.unknown(node, f"{self.who(node)} has an input of unknown shape")
            return
        r = len(od)
        axis = int(_attr(node, "axis", 1)) % r
        for a in range(r):
            if not any(self.get(v, a) is not None for v in ins):
                continue
            sizes = [n if isinstance(n, int) else -1 for n in ((dims(v) or ())[a] for v in ins)]
            if min(sizes) < 0:
                for v in ins:
                    s = self.get(v, a)
                    if s is not None:
                        self.block(s, f"{self.who(node)} has an input of symbolic size on axis {a}")
                continue
            if a == axis:
                self.put(out, a, np.concatenate([self.need(v, a, n) for v, n in zip(ins, sizes, strict=True)]))
                continue
            size = sizes[0]
            first = None
            for v in ins:
                s = self.need(v, a, size)
                if first is None:
                    first = s
                else:
                    self.tie(first, s)
            assert first is not None
            self.put(out, a, first)

    def split(self, node: ir.Node) -> None:
        x = node.inputs[0]
        d = dims(x) if x is not None else None
        if x is None or d is None:
            self.unknown(node, self.unsupported(node))
            return
        axis = int(_attr(node, "axis", 0)) % len(d)
        s = self.get(x, axis)
        sizes: list[int] | None = None
        if s is not None:
            n = len(s)
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                arr = _const(node.inputs[1])
                sizes = None if arr is None else [int(v) for v in arr.reshape(-1)]
            elif "split" in node.attributes:
                sizes = [int(v) for v in _attr(node, "split", [])]
            else:
                k = len(node.outputs)
                step = -(-n // k)
                sizes = [min(step, n - i * step) for i in range(k)]
            if sizes is None or sum(sizes) != n or len(sizes) != len(node.outputs):
                self.unknown(node, f"{self.who(node)} has computed split sizes")
                return
        off = 0
        for i, out in enumerate(node.outputs):
            for a, t in self.all(x).items():
                if a == axis:
                    assert sizes is not None
                    self.put(out, a, self.select(t, np.arange(off, off + sizes[i], dtype=np.int64)))
                else:
                    self.put(out, a, t)
            if sizes is not None:
                off += sizes[i]

    def split_to_sequence(self, node: ir.Node) -> None:
        """A Split into a sequence (PyTorch's ``chunk``/``split`` through the dynamo exporter) whose
        pieces are read back by ``SequenceAt`` at constant positions: the same as Split."""
        x = node.inputs[0]
        d = dims(x) if x is not None else None
        if x is None or d is None or not self.all(x):
            return
        axis = int(_attr(node, "axis", 0)) % len(d)
        seq = node.outputs[0]
        readers = [u.node for u in seq.uses()]
        if seq.is_graph_output() or any(r.op_type != "SequenceAt" or len(r.inputs) < 2 or _const(r.inputs[1]) is None
                                        for r in readers):
            self.unknown(node, f"{self.who(node)} makes a sequence read other than by SequenceAt at fixed positions")
            return
        n = d[axis]
        arr = _const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if not isinstance(n, int) or (arr is None and len(node.inputs) > 1 and node.inputs[1] is not None):
            self.unknown(node, f"{self.who(node)} has computed split sizes")
            return
        if arr is None:
            if not int(_attr(node, "keepdims", 1)) and self.get(x, axis) is not None:
                self.unknown(node, f"{self.who(node)} removes the split axis")
                return
            sizes = [1] * n
        elif arr.ndim == 0:
            k = int(arr)
            sizes = [min(k, n - i) for i in range(0, n, k)]
        else:
            sizes = [int(v) for v in arr.reshape(-1)]
        if sum(sizes) != n:
            self.unknown(node, f"{self.who(node)} has split sizes that do not add up")
            return
        pieces: list[np.ndarray] = []
        s = self.get(x, axis)
        off = 0
        for k in sizes:
            if s is not None:
                pieces.append(self.select(s, np.arange(off, off + k, dtype=np.int64)))
            off += k
        self.sequences[seq] = (axis, pieces, {a: t for a, t in self.all(x).items() if a != axis})

    def sequence_at(self, node: ir.Node) -> None:
        seq, pos = node.inputs[0], _const(node.inputs[1]) if len(node.inputs) > 1 else None
        if seq is None or seq not in self.sequences or pos is None:
            return
        axis, pieces, others = self.sequences[seq]
        out = node.outputs[0]
        if pieces:
            self.put(out, axis, pieces[int(pos) % len(pieces)])
        for a, t in others.items():
            self.put(out, a, t)

    def slice(self, node: ir.Node) -> None:
        x = node.inputs[0]
        d = dims(x) if x is not None else None
        if x is None or d is None or not self.all(x):
            return
        given = [node.inputs[i] if len(node.inputs) > i else None for i in range(1, 5)]
        arrs = [_const(v) if v is not None else None for v in given]
        starts, ends = arrs[0], arrs[1]
        if starts is None or ends is None or any(v is not None and a is None for v, a in zip(given, arrs, strict=True)):
            self.unknown(node, f"{self.who(node)} has computed bounds")
            return
        r = len(d)
        axes = [int(a) % r for a in (arrs[2].reshape(-1) if arrs[2] is not None else range(len(starts)))]
        steps = [int(v) for v in arrs[3].reshape(-1)] if arrs[3] is not None else [1] * len(axes)
        ranges = {a: (int(st), int(en), sp) for a, st, en, sp in
                  zip(axes, starts.reshape(-1), ends.reshape(-1), steps, strict=True)}
        y = node.outputs[0]
        for a, s in self.all(x).items():
            if a in ranges:
                st, en, sp = ranges[a]
                pos = np.arange(*slice(st, en, sp).indices(len(s)), dtype=np.int64)
                self.put(y, a, self.select(s, pos))
            else:
                self.put(y, a, s)

    def gather(self, node: ir.Node) -> None:
        x, ind = node.inputs[0], node.inputs[1]
        r = self._rank(x)
        if x is None or ind is None or r is None or not self.all(x):
            return
        axis = int(_attr(node, "axis", 0)) % r
        idx = _const(ind)
        ir_rank = idx.ndim if idx is not None else self._rank(ind)
        y = node.outputs[0]
        for a, s in self.all(x).items():
            if a == axis:
                if idx is None or idx.ndim != 1:
                    self.block(s, f"{self.who(node)} gathers on axis {a} with computed or multi-dimensional indices")
                    continue
                pos = np.where(idx < 0, idx + len(s), idx).astype(np.int64)
                self.put(y, a, self.select(s, pos))
            elif ir_rank is None:
                self.block(s, f"{self.who(node)} has indices of unknown rank")
            else:
                self.put(y, a if a < axis else a + ir_rank - 1, s)

    def transpose(self, node: ir.Node) -> None:
        x = node.inputs[0]
        r = self._rank(x)
        if r is None:
            self.unknown(node, self.unsupported(node))
            return
        perm = [int(p) for p in _attr(node, "perm", list(range(r))[::-1])]
        for a, s in self.all(x).items():
            self.put(node.outputs[0], perm.index(a), s)

    def reshape(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or not self.all(x):
            return
        if node.op_type == "Reshape" and _const(node.inputs[1]) is None:
            self.unknown(node, f"{self.who(node)} has a computed shape")
            return
        src, dst = dims(x), self._out_dims(node)
        if src is None or dst is None:
            self.unknown(node, f"{self.who(node)} has an unknown input or output shape")
            return
        for a, s in self.all(x).items():
            m = _reshape_map(src, dst, a)
            if m is None:
                self.block(s, f"{self.who(node)} splits or mixes axis {a} of '{x.name}' with other axes")
            else:
                b, index = m
                self.put(node.outputs[0], b, s[index])

    def expand(self, node: ir.Node) -> None:
        x = node.inputs[0]
        src, dst = dims(x) if x is not None else None, self._out_dims(node)
        if not self.all(x):
            return
        if src is None or dst is None or _const(node.inputs[1]) is None:
            self.unknown(node, self.unsupported(node))
            return
        for a, s in self.all(x).items():
            b = a + len(dst) - len(src)
            if src[a] != dst[b]:
                self.block(s, f"{self.who(node)} broadcasts axis {a}")
            else:
                self.put(node.outputs[0], b, s)

    def tile(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if not self.all(x):
            return
        reps = _const(node.inputs[1])
        if reps is None:
            self.unknown(node, self.unsupported(node))
            return
        for a, s in self.all(x).items():
            if int(reps.reshape(-1)[a]) != 1:
                self.block(s, f"{self.who(node)} repeats axis {a}")
            else:
                self.put(node.outputs[0], a, s)

    def resize(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if not self.all(x):
            return
        src, dst = dims(x) if x is not None else None, self._out_dims(node)
        cfg = [node.inputs[i] if len(node.inputs) > i else None for i in (1, 2, 3)]
        if src is None or dst is None or any(v is not None and _const(v) is None for v in cfg):
            self.unknown(node, f"{self.who(node)} has computed scales or sizes, or unknown shapes")
            return
        r = len(src)
        axes = [int(a) % r for a in _attr(node, "axes", list(range(r)))]
        scales = _const(cfg[1]) if cfg[1] is not None else None
        crop = _attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
        for a, s in self.all(x).items():
            scale = 1.0
            if scales is not None and scales.size and a in axes:
                scale = float(scales.reshape(-1)[axes.index(a)])
            if src[a] != dst[a] or scale != 1.0 or (crop and a in axes):
                self.block(s, f"{self.who(node)} resizes axis {a}")
            else:
                self.put(node.outputs[0], a, s)

    def pad(self, node: ir.Node) -> None:
        x = node.inputs[0]
        r = self._rank(x)
        if not self.all(x):
            return
        pads = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        ax_v = node.inputs[3] if len(node.inputs) > 3 else None
        ax = _const(ax_v) if ax_v is not None else None
        if r is None or pads is None or (ax_v is not None and ax is None):
            self.unknown(node, f"{self.who(node)} has computed pads")
            return
        axes = [int(a) % r for a in ax.reshape(-1)] if ax is not None else list(range(r))
        p = [int(v) for v in pads.reshape(-1)]
        for a, s in self.all(x).items():
            if a in axes and (p[axes.index(a)] != 0 or p[len(axes) + axes.index(a)] != 0):
                self.block(s, f"{self.who(node)} pads axis {a}")
            else:
                self.put(node.outputs[0], a, s)

    def shape(self, node: ir.Node) -> None:
        x = node.inputs[0]
        r = self._rank(x) or 0
        start, end = int(_attr(node, "start", 0)), int(_attr(node, "end", r))
        read = range(r)[slice(start, end)]
        for a, s in self.all(x).items():
            if a in read:
                self.block(s, f"{self.who(node)} reads the size of axis {a}")

    def size(self, node: ir.Node) -> None:
        self.block_all(node.inputs[0], f"{self.who(node)} reads the element count")


def _cut_points(n: int, selections: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per node, whether a group boundary falls right before it: a selection takes one of two
    consecutive nodes of a slot and not the other (the edge of a Slice range, a Split piece)."""
    cut = np.zeros(n, dtype=bool)
    for nodes, pos in selections:
        inside = np.zeros(n, dtype=np.int8)
        inside[nodes[pos]] = 2
        rest = np.ones(len(nodes), dtype=bool)
        rest[pos] = False
        state = inside.copy()
        np.bitwise_or.at(state, nodes[rest], 1)
        present = np.zeros(n, dtype=bool)
        present[nodes] = True
        cut[1:] |= present[:-1] & present[1:] & (state[:-1] != state[1:])
    return cut


def analyze(model: ir.Model) -> Channels:
    """The channel dependency groups of ``model`` (shapes must be inferred; the model is not changed)."""
    t0 = time.perf_counter()
    w = _Walker(model)
    w.run()
    n = w.n
    a = np.concatenate(w.tie_a) if w.tie_a else np.zeros(0, np.int64)
    b = np.concatenate(w.tie_b) if w.tie_b else np.zeros(0, np.int64)
    lab = _components(n, a, b)
    reps, unit_of_node = np.unique(lab, return_inverse=True)
    # Segments: the channels one root created together, cut at selection edges.
    start = np.zeros(n, dtype=bool)
    for s, size in w.roots:
        if size:
            start[s] = True
    start |= _cut_points(n, w.selections)
    seg = np.cumsum(start) - 1
    n_seg = int(seg[-1]) + 1 if n else 0
    glab = _components(n_seg, seg, seg[lab])
    group_rep = glab[seg[reps]]  # per unit: smallest segment of its group (graph order)
    _, unit_group = np.unique(group_rep, return_inverse=True)
    n_groups = int(unit_group.max()) + 1 if len(unit_group) else 0
    order = np.lexsort((np.arange(len(reps)), unit_group))
    counts = np.bincount(unit_group, minlength=n_groups)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    unit_index = np.empty(len(reps), dtype=np.int64)
    unit_index[order] = np.arange(len(reps)) - offsets[unit_group[order]]
    group_units = [order[offsets[g]:offsets[g + 1]] for g in range(n_groups)]

    reasons: list[list[str]] = [[] for _ in range(n_groups)]
    for nodes, reason in w.blocks:
        for g in np.unique(unit_group[unit_of_node[nodes]]):
            if reason not in reasons[g] and len(reasons[g]) < 8:
                reasons[g].append(reason)

    def split(v: ir.Value, axis: int, nodes: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        units = unit_of_node[nodes]
        grp = unit_group[units]
        for g in np.unique(grp):
            pos = np.flatnonzero(grp == g)
            yield int(g), pos, unit_index[units[pos]]

    members: list[list[Member]] = [[] for _ in range(n_groups)]
    slot_units: dict[tuple[str, int], np.ndarray] = {}
    touches: dict[str, set[int]] = {}
    for v, per_axis in w.slots.items():
        name = v.name or f"<anonymous {id(v)}>"
        for axis, nodes in sorted(per_axis.items()):
            slot_units[(name, axis)] = unit_of_node[nodes]
            for g, pos, units in split(v, axis, nodes):
                members[g].append(Member(name, axis, len(nodes), pos, units))
                for user in [v.producer(), *(u.node for u in v.uses())]:
                    if user is not None and user.name:
                        touches.setdefault(user.name, set()).add(g)
    producers: list[list[Port]] = [[] for _ in range(n_groups)]
    consumers: list[list[Port]] = [[] for _ in range(n_groups)]
    for role, node, index, v, axis, nodes in w.ports:
        for g, pos, units in split(v, axis, nodes):
            port = Port(v.name or "", axis, len(nodes), pos, units, node=node.name or "", op=node.op_type, index=index)
            (producers if role == "producer" else consumers)[g].append(port)

    groups: list[Group] = []
    taken: set[str] = set()
    for g in range(n_groups):
        if producers[g]:
            p = producers[g][0]
            name = p.node
            if len(p.positions) != p.size:
                name += f"[{int(p.positions[0])}:{int(p.positions[-1]) + 1}]"
        elif members[g]:
            name = members[g][0].value
        else:
            name = f"group{g}"
        base, k = name, 1
        while name in taken:
            k += 1
            name = f"{base}#{k}"
        taken.add(name)
        groups.append(Group(g, name, int(counts[g]), tuple(members[g]), tuple(producers[g]), tuple(consumers[g]),
                            tuple(reasons[g])))
    return Channels(groups, slot_units, unit_group, unit_index, group_units, touches, time.perf_counter() - t0)
