"""Channel pruning: remove whole channels of dependency groups from the graph, for real.

The API is built for the channel-level search spaces as much as for ``mtc prune``:

- :class:`ChannelPlan` is a keep-set per group (group id -> kept channel indices, ascending);
  groups it does not name are kept whole. A plan is plain data (JSON round trip).
- :func:`apply_plan` is a pure function of (model, groups, plan): it returns a pruned copy and
  leaves the model alone, so a space can apply one plan per task to the same backbone.
- :func:`importance`, :func:`ratio_counts` and :func:`select` turn budgets into plans: channels
  scored l1 / l2 / random over the producers' output-channel weights, the top ones kept.
- :class:`PruneChannels` is the pass (``prune-channels``) that does the same in place.

Per node, the rewrite follows the rule :mod:`mtc.ir.channels` used for it: weights, biases and
norm parameters are sliced on every producer and consumer; grouped convolutions lose whole
groups (their ``group`` count follows, a depthwise conv stays depthwise); Gemm/MatMul weights
after a Flatten lose the blocks of the removed channels; Split sizes, Slice bounds, Gather
indices, Reshape targets, Resize sizes and Expand shapes are rewritten for the new widths;
Concat offsets follow by themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult

from mtc.errors import MtcError
from mtc.ir.channels import ELEMENTWISE, Channels, Group, analyze
from mtc.ir.names import unique
from mtc.ir.shapes import dims
from mtc.passes.base import Pass
from mtc.passes.manager import register_pass

__all__ = ["IMPORTANCE", "ChannelPlan", "PruneChannels", "apply_plan", "build_plan", "ignored_groups", "importance",
           "prune_in_place", "ratio_counts", "resolve_counts", "select", "validate_plan", "width_count",
           "width_plan"]

IMPORTANCE = ("l1", "l2", "random")
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min


@dataclass(frozen=True)
class ChannelPlan:
    """A keep-set per dependency group: ``keep[group id]`` = kept channel indices, ascending.

    Groups not in ``keep`` keep every channel. Indices are a group's unit numbers
    (:attr:`mtc.ir.channels.Group.size` of them); the pruned model keeps the channels in their
    original order.
    """

    keep: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def kept(self, channels: Channels) -> dict[str, int]:
        """Kept channel count per group name (every group, pruned or not)."""
        return {g.name: len(self.keep.get(g.id, range(g.size))) for g in channels}

    def removed(self, channels: Channels) -> int:
        """How many channels (units) the plan removes."""
        return sum(channels.groups[g].size - len(k) for g, k in self.keep.items())

    def to_json(self, channels: Channels | None = None) -> dict[str, Any]:
        """``{"keep": {group: [indices]}}``, groups by name when ``channels`` is given, else by id."""
        def key(g: int) -> str:
            return channels.groups[g].name if channels is not None else str(g)

        return {"keep": {key(g): list(k) for g, k in sorted(self.keep.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], channels: Channels) -> ChannelPlan:
        """Read :meth:`to_json`'s form (groups by name or id) and validate it against ``channels``."""
        keep: dict[int, tuple[int, ...]] = {}
        for key, idx in dict(data.get("keep", {})).items():
            g = channels.find(key)
            if g is None:
                raise MtcError(f"channel plan: no group '{key}'")
            keep[g.id] = tuple(int(i) for i in idx)
        plan = cls(keep)
        validate_plan(channels, plan)
        return plan


def validate_plan(channels: Channels, plan: ChannelPlan, *, model: ir.Model | None = None,
                  arg: str = "plan") -> None:
    """Check ``plan`` against the groups (and ``model``, when given, against the analysis).

    Raises:
        MtcError: an unknown group; indices not ascending, out of range or none; pruning an
            unprunable group; a keep-set that leaves some activation without channels (possible
            only where a Slice or Split holds part of a group); a model that does not match.
    """
    for gid, idx in plan.keep.items():
        if not 0 <= gid < len(channels.groups):
            raise MtcError(f"{arg}: no group {gid} (the model has {len(channels.groups)})")
        g = channels.groups[gid]
        arr = np.asarray(idx, dtype=np.int64)
        if arr.size == 0:
            raise MtcError(f"{arg}: group '{g.name}': keep at least 1 channel")
        if arr.min() < 0 or arr.max() >= g.size or np.any(np.diff(arr) <= 0):
            raise MtcError(f"{arg}: group '{g.name}': kept indices must be ascending, distinct and in 0..{g.size - 1}")
        if len(arr) < g.size and not g.prunable:
            raise MtcError(f"{arg}: group '{g.name}' is not prunable: {g.reason}")
        kept = np.zeros(g.size, dtype=bool)
        kept[arr] = True
        for m in g.members:
            if not kept[m.units].any():
                raise MtcError(f"{arg}: group '{g.name}': the keep-set leaves '{m.value}' (axis {m.axis}) no channel "
                               f"of this group; keep one of units {sorted(set(m.units.tolist()))[:8]}")
    if model is not None:
        _check_model(model, channels)


def _check_model(model: ir.Model, channels: Channels) -> None:
    values = _values(model.graph)
    for (name, axis), units in channels.slot_units.items():
        v = values.get(name)
        d = dims(v) if v is not None else None
        if d is None or axis >= len(d) or d[axis] != len(units):
            raise MtcError(f"the channel groups do not belong to this model: value '{name}' axis {axis} should "
                           f"have {len(units)} channels")


def _values(g: ir.Graph) -> dict[str, ir.Value]:
    out: dict[str, ir.Value] = {v.name: v for v in g.inputs if v.name}
    for node in g:
        for v in node.outputs:
            if v.name:
                out[v.name] = v
    return out


# --- budgets -> plans ------------------------------------------------------------------------------


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _dims(v: ir.Value | None) -> tuple[int | str | None, ...]:
    d = dims(v) if v is not None else None
    return d or ()


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _output_rows(node: ir.Node, positions: np.ndarray) -> np.ndarray | None:
    """The weights that make each output channel of a producer, one row per position."""
    op = node.op_type
    if op == "Conv":
        W = _const(node.inputs[1])
        return None if W is None else W.reshape(W.shape[0], -1)[positions]
    if op == "ConvTranspose":
        W = _const(node.inputs[1])
        if W is None:
            return None
        groups = int(_attr(node, "group", 1))
        cin_g, cout_g = W.shape[0] // groups, W.shape[1]
        rows = [W[(o // cout_g) * cin_g:(o // cout_g + 1) * cin_g, o % cout_g].reshape(-1) for o in positions]
        return np.stack(rows) if rows else np.zeros((0, 1), W.dtype)
    if op == "Gemm":
        B = _const(node.inputs[1])
        if B is None:
            return None
        return (B if int(_attr(node, "transB", 0)) else B.T)[positions]
    if op == "MatMul":
        B, A = _const(node.inputs[1]), _const(node.inputs[0])
        if B is not None and B.ndim == 2:
            return B.T[positions]
        if A is not None and A.ndim == 2:
            return A[positions]
    return None


def importance(model: ir.Model, channels: Channels, group: Group | int, method: str = "l1",
               seed: int = 0) -> np.ndarray:
    """A score per channel of ``group``: higher means more worth keeping.

    ``l1``: the sum over the group's producers of the L1 norm of the weights that make the
    channel; ``l2``: the square root of the summed squares; ``random``: uniform, seeded by
    ``(seed, group id)``. A group without producers scores zeros (l1, l2).
    """
    g = channels.groups[group] if isinstance(group, int) else group
    if method not in IMPORTANCE:
        raise MtcError(f"--importance: '{method}' is not one of {', '.join(IMPORTANCE)}")
    if method == "random":
        return np.random.default_rng([seed, g.id]).random(g.size)
    score = np.zeros(g.size, dtype=np.float64)
    nodes = {n.name: n for n in model.graph}
    for p in g.producers:
        node = nodes.get(p.node)
        rows = _output_rows(node, p.positions) if node is not None else None
        if rows is None:
            continue
        rows = rows.astype(np.float64)
        vals = np.abs(rows).sum(axis=1) if method == "l1" else (rows * rows).sum(axis=1)
        np.add.at(score, p.units, vals)
    return score if method == "l1" else np.sqrt(score)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def ratio_counts(channels: Channels, ratio: float, *, round_to: int = 1,
                 skip: Iterable[int] = ()) -> dict[int, int]:
    """Channels to keep per prunable group for removing a fraction ``ratio`` of each.

    A group of ``C`` channels keeps ``round(C * (1 - ratio))`` (halves round up), rounded to the
    nearest multiple of ``round_to``, and at least ``min(round_to, C)`` and at least 1: a group
    smaller than ``round_to`` is kept whole. Groups in ``skip`` and unprunable ones are left out
    (kept whole); so are groups the rule would leave whole.

    Raises:
        MtcError: ``ratio`` outside (0, 1) or ``round_to`` below 1.
    """
    if not 0.0 < ratio < 1.0:
        raise MtcError(f"--ratio {ratio:g}: must be in (0, 1), the fraction of each group's channels to remove")
    if round_to < 1:
        raise MtcError(f"--round-to {round_to}: must be at least 1")
    skipped = set(skip)
    out: dict[int, int] = {}
    for g in channels.prunable:
        if g.id in skipped:
            continue
        n = _round_half_up(g.size * (1.0 - ratio))
        if round_to > 1:
            n = round_to * _round_half_up(n / round_to)
        n = min(g.size, max(n, min(round_to, g.size), 1))
        if n < g.size:
            out[g.id] = n
    return out


def width_count(size: int, width: float, round_to: int = 1) -> int:
    """Channels a group of ``size`` keeps at width ``width`` (a fraction kept, not removed):
    ``round(size * width)`` (halves round up), rounded to the nearest multiple of ``round_to``, at
    least ``min(round_to, size)`` and 1. Slimmable widths and uniformly slimmed baselines use it."""
    n = _round_half_up(size * width)
    if round_to > 1:
        n = round_to * _round_half_up(n / round_to)
    return min(size, max(n, min(round_to, size), 1))


def width_plan(channels: Channels, width: float, *, round_to: int = 1) -> ChannelPlan:
    """Every prunable group slimmed to the prefix of :func:`width_count` channels (a uniformly
    slimmed network, as a slimmable supernet's uniform sub-network keeps them).

    Raises:
        MtcError: ``width`` outside (0, 1] or ``round_to`` below 1.
    """
    if not 0.0 < width <= 1.0:
        raise MtcError(f"--width {width:g}: must be in (0, 1], the fraction of each group's channels kept")
    if round_to < 1:
        raise MtcError(f"--round-to {round_to}: must be at least 1")
    keep = {}
    for g in channels.prunable:
        n = width_count(g.size, width, round_to)
        if n < g.size:
            keep[g.id] = tuple(range(n))
    return ChannelPlan(keep)


def resolve_counts(channels: Channels, keep: Mapping[Any, int], *, arg: str = "--keep") -> dict[int, int]:
    """``{group name or id: kept count}`` -> ``{group id: kept count}``, checked.

    Raises:
        MtcError: naming no group, zero or more channels than the group has, pruning an
            unprunable group.
    """
    out: dict[int, int] = {}
    for key, n in keep.items():
        g = channels.find(key)
        if g is None:
            raise MtcError(f"{arg}: no group '{key}' (list them with mtc inspect MODEL --channels)")
        if n < 1:
            raise MtcError(f"{arg}: group '{g.name}': keep at least 1 channel (got {n})")
        if n > g.size:
            raise MtcError(f"{arg}: group '{g.name}' has {g.size} channels, cannot keep {n}")
        if n < g.size and not g.prunable:
            raise MtcError(f"{arg}: group '{g.name}' is not prunable: {g.reason}")
        out[g.id] = n
    return out


def ignored_groups(channels: Channels, nodes: Iterable[str], model: ir.Model, *, arg: str = "--ignore") -> set[int]:
    """Ids of the groups that touch any of ``nodes`` (read or write one of their activations).

    Raises:
        MtcError: a name that is no node of ``model``.
    """
    names = {n.name for n in model.graph}
    out: set[int] = set()
    for n in nodes:
        if n not in names:
            raise MtcError(f"{arg}: no node '{n}' in the model")
        out |= channels.touches.get(n, set())
    return out


def select(model: ir.Model, channels: Channels, counts: Mapping[int, int], *, method: str = "l1",
           seed: int = 0) -> ChannelPlan:
    """Keep the ``counts[g]`` most important channels of each group ``g`` (ties: lower index).

    Where a Slice or Split holds only part of a group, the best channel there is kept as well
    if the top ones all lie elsewhere, so no activation is left empty (the count can then exceed
    ``counts[g]`` by the number of such pieces).
    """
    keep: dict[int, tuple[int, ...]] = {}
    for gid, n in sorted(counts.items()):
        g = channels.groups[gid]
        if n >= g.size:
            continue
        score = importance(model, channels, g, method, seed)
        order = np.argsort(-score, kind="stable")
        kept = np.zeros(g.size, dtype=bool)
        kept[order[:n]] = True
        for m in g.members:
            if not kept[m.units].any():
                kept[m.units[np.argmax(score[m.units])]] = True
        keep[gid] = tuple(int(i) for i in np.flatnonzero(kept))
    return ChannelPlan(keep)


# --- the rewrite -----------------------------------------------------------------------------------


class _Rewriter:
    """Rewrites one model in place for one unit mask (kept flag per unit of the analysis)."""

    def __init__(self, model: ir.Model, channels: Channels, unit_kept: np.ndarray) -> None:
        self.model = model
        self.g = model.graph
        self.ch = channels
        self.kept = unit_kept
        self.taken = set(self.g.initializers)
        self.nodes_taken = {n.name for n in self.g if n.name}

    def mask(self, v: ir.Value | None, axis: int) -> np.ndarray | None:
        """Kept positions of ``v`` on ``axis``; None when nothing is removed there."""
        if v is None or v.name is None:
            return None
        m = self.ch.position_mask(v.name, axis, self.kept)
        return None if m is None or m.all() else m

    def touched(self, node: ir.Node) -> bool:
        for v in (*node.inputs, *node.outputs):
            if v is not None and v.name is not None:
                for u in self.ch.slots_of(v.name).values():
                    if not self.kept[u].all():
                        return True
        return False

    def set_input(self, node: ir.Node, i: int, arr: np.ndarray) -> None:
        """Give input ``i`` of ``node`` the constant ``arr``: in place when only this node reads it."""
        old = node.inputs[i]
        assert old is not None
        name = old.name or f"{node.name}.in{i}"
        sole = old.is_initializer() and len(old.uses()) == 1 and not old.is_graph_output()
        if sole:
            old.const_value = ir.tensor(arr, name=name)
            old.shape = ir.Shape(arr.shape)
            return
        new_name = unique(f"{name}@{node.name}", self.taken)
        self.taken.add(new_name)
        val = ir.Value(name=new_name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                       const_value=ir.tensor(arr, name=new_name))
        self.g.register_initializer(val)
        node.replace_input_with(i, val)

    def run(self) -> None:
        rules = {
            "Conv": self.conv, "ConvTranspose": self.conv_transpose, "Gemm": self.gemm, "MatMul": self.matmul,
            "BatchNormalization": self.norm_params, "InstanceNormalization": self.norm_params,
            "Split": self.split, "SplitToSequence": self.split_to_sequence, "Slice": self.slice, "Gather": self.gather, "Reshape": self.reshape,
            "Expand": self.expand, "Resize": self.resize,
        }
        for op in ELEMENTWISE:
            rules[op] = self.elementwise
        for node in list(self.g):
            if not self.touched(node):
                continue
            rule = rules.get(node.op_type)
            if rule is not None:
                rule(node)
            # Every other op the analysis passes channels through needs no change: its output
            # shape follows from its inputs (activations, pooling, Concat, Transpose, Flatten, ...).
        self.update_shapes()
        self.drop_dead()

    # -- per-op rewrites --

    def conv(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        W = _const(node.inputs[1])
        assert W is not None
        m_in, m_out = self.mask(x, 1), self.mask(y, 1)
        groups = int(_attr(node, "group", 1))
        if groups == 1:
            if m_out is not None:
                W = W[m_out]
            if m_in is not None:
                W = W[:, m_in]
        elif m_out is not None:
            # Whole groups go (the analysis ties each group into one unit), so only rows change.
            cout_g = W.shape[0] // groups
            per_group = m_out.reshape(groups, cout_g)
            assert np.all(per_group.all(axis=1) | ~per_group.any(axis=1)), node.name
            W = W[m_out]
            node.attributes["group"] = ir.AttrInt64("group", int(per_group.all(axis=1).sum()))
        self.set_input(node, 1, W)
        if m_out is not None and len(node.inputs) > 2 and node.inputs[2] is not None:
            B = _const(node.inputs[2])
            assert B is not None
            self.set_input(node, 2, B[m_out])

    def conv_transpose(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        W = _const(node.inputs[1])
        assert W is not None
        m_in, m_out = self.mask(x, 1), self.mask(y, 1)
        groups = int(_attr(node, "group", 1))
        if groups == 1:
            if m_in is not None:
                W = W[m_in]
            if m_out is not None:
                W = W[:, m_out]
        elif m_in is not None:
            per_group = m_in.reshape(groups, W.shape[0] // groups)
            assert np.all(per_group.all(axis=1) | ~per_group.any(axis=1)), node.name
            W = W[m_in]
            node.attributes["group"] = ir.AttrInt64("group", int(per_group.all(axis=1).sum()))
        self.set_input(node, 1, W)
        if m_out is not None and len(node.inputs) > 2 and node.inputs[2] is not None:
            B = _const(node.inputs[2])
            assert B is not None
            self.set_input(node, 2, B[m_out])

    def gemm(self, node: ir.Node) -> None:
        a, y = node.inputs[0], node.outputs[0]
        B = _const(node.inputs[1])
        assert B is not None
        ta, tb = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
        m_k, m_n = self.mask(a, 0 if ta else 1), self.mask(y, 1)
        if tb:
            B = B[m_n] if m_n is not None else B
            B = B[:, m_k] if m_k is not None else B
        else:
            B = B[m_k] if m_k is not None else B
            B = B[:, m_n] if m_n is not None else B
        self.set_input(node, 1, B)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.broadcast_const(node, 2, y)

    def matmul(self, node: ir.Node) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        B = _const(b)
        r = len(_dims(y))
        if B is not None and B.ndim == 2 and _const(a) is None:
            m_k, m_n = self.mask(a, r - 1), self.mask(y, r - 1)
            B = B[m_k] if m_k is not None else B
            B = B[:, m_n] if m_n is not None else B
            self.set_input(node, 1, B)
            return
        A = _const(a)
        assert A is not None and A.ndim == 2, node.name
        m_k, m_m = self.mask(b, r - 2), self.mask(y, r - 2)
        A = A[:, m_k] if m_k is not None else A
        A = A[m_m] if m_m is not None else A
        self.set_input(node, 0, A)

    def norm_params(self, node: ir.Node) -> None:
        m = self.mask(node.inputs[0], 1)
        if m is None:
            return
        for i in range(1, len(node.inputs)):
            arr = _const(node.inputs[i])
            if arr is not None and arr.ndim >= 1 and arr.shape[0] == len(m):
                self.set_input(node, i, arr[m])

    def broadcast_const(self, node: ir.Node, i: int, out: ir.Value) -> None:
        """Slice constant input ``i`` wherever it lines up (numpy broadcasting) with a pruned axis of ``out``."""
        arr = _const(node.inputs[i])
        if arr is None:
            return
        r = len(dims(out) or ())
        changed = False
        for a in range(r):
            m = self.mask(out, a)
            k = a - (r - arr.ndim)
            if m is None or k < 0 or arr.shape[k] == 1:
                continue
            arr = np.compress(m, arr, axis=k)
            changed = True
        if changed:
            self.set_input(node, i, arr)

    def elementwise(self, node: ir.Node) -> None:
        for i, v in enumerate(node.inputs):
            if v is not None and _const(v) is not None:
                self.broadcast_const(node, i, node.outputs[0])

    def split(self, node: ir.Node) -> None:
        x = node.inputs[0]
        r = len(_dims(x))
        axis = int(_attr(node, "axis", 0)) % r
        m = self.mask(x, axis)
        if m is None:
            return
        sizes = [len(self.ch.slots_of(o.name or "").get(axis, ())) for o in node.outputs]
        offs = np.concatenate([[0], np.cumsum(sizes)])
        new = np.array([int(m[offs[i]:offs[i + 1]].sum()) for i in range(len(sizes))], dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            self.set_input(node, 1, new)
        else:
            val = self.new_const(f"{node.name}.split", new)
            while len(node.inputs) < 2:
                node.resize_inputs(len(node.inputs) + 1)
            node.replace_input_with(1, val)
        node.attributes.pop("num_outputs", None)
        node.attributes.pop("split", None)

    def split_to_sequence(self, node: ir.Node) -> None:
        x = node.inputs[0]
        axis = int(_attr(node, "axis", 0)) % len(_dims(x))
        m = self.mask(x, axis)
        if m is None:
            return
        arr = _const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        n = len(m)
        if arr is None:
            sizes = [1] * n
        elif arr.ndim == 0:
            sizes = [min(int(arr), n - i) for i in range(0, n, int(arr))]
        else:
            sizes = [int(v) for v in arr.reshape(-1)]
        offs = np.concatenate([[0], np.cumsum(sizes)])
        new = np.array([int(m[offs[i]:offs[i + 1]].sum()) for i in range(len(sizes))], dtype=np.int64)
        if arr is not None:
            self.set_input(node, 1, new)
        else:
            val = self.new_const(f"{node.name}.split", new)
            while len(node.inputs) < 2:
                node.resize_inputs(len(node.inputs) + 1)
            node.replace_input_with(1, val)

    def new_const(self, base: str, arr: np.ndarray) -> ir.Value:
        name = unique(base, self.taken)
        self.taken.add(name)
        val = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                       const_value=ir.tensor(arr, name=name))
        self.g.register_initializer(val)
        return val

    @staticmethod
    def _reindex(m_in: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """New input positions of the kept ones among ``pos`` (old input positions)."""
        rank = np.cumsum(m_in) - 1
        return rank[pos[m_in[pos]]]

    def slice(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        d = _dims(x)
        r = len(d)
        starts = _const(node.inputs[1])
        ends = _const(node.inputs[2])
        assert starts is not None and ends is not None
        axes_v = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps_v = _const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        axes = [int(a) % r for a in (axes_v.reshape(-1) if axes_v is not None else range(len(starts)))]
        st = [int(v) for v in starts.reshape(-1)]
        en = [int(v) for v in ends.reshape(-1)]
        sp = [int(v) for v in steps_v.reshape(-1)] if steps_v is not None else [1] * len(axes)
        gathers: list[tuple[int, np.ndarray]] = []
        changed = False
        for j, a in enumerate(axes):
            m_in = self.mask(x, a)
            if m_in is None:
                continue
            changed = True
            pos = np.arange(*slice(st[j], en[j], sp[j]).indices(len(m_in)), dtype=np.int64)
            new = self._reindex(m_in, pos)
            diffs = np.diff(new)
            if len(new) == 1:
                st[j], en[j], sp[j] = int(new[0]), int(new[0]) + 1, 1
            elif len(new) and np.all(diffs == diffs[0]) and diffs[0] != 0:
                step = int(diffs[0])
                end = int(new[-1]) + step
                st[j], en[j], sp[j] = int(new[0]), (end if end >= 0 else _INT64_MIN), step
            else:
                # Not a progression any more: keep the whole axis here and pick with a Gather.
                st[j], en[j], sp[j] = 0, _INT64_MAX, 1
                gathers.append((a, new))
        if not changed:
            return
        dt = starts.dtype
        self.set_input(node, 1, np.array(st, dtype=dt))
        self.set_input(node, 2, np.array(en, dtype=dt))
        axes_val = self.new_const(f"{node.name}.axes", np.array(axes, dtype=dt))
        steps_val = self.new_const(f"{node.name}.steps", np.array(sp, dtype=dt))
        while len(node.inputs) < 5:
            node.resize_inputs(len(node.inputs) + 1)
        node.replace_input_with(3, axes_val)
        node.replace_input_with(4, steps_val)
        for a, idx in gathers:
            self.insert_gather(node, y, a, idx)

    def insert_gather(self, node: ir.Node, y: ir.Value, axis: int, idx: np.ndarray) -> None:
        """Route ``y``'s users through ``Gather(y, idx, axis)``; the Gather's output takes ``y``'s name."""
        name = unique(f"{node.name}/gather", self.nodes_taken)
        self.nodes_taken.add(name)
        ind = self.new_const(f"{name}.indices", idx.astype(np.int64))
        gather = ir.Node("", "Gather", [None, ind], attributes=[ir.AttrInt64("axis", axis)], name=name,
                         metadata_props=dict(node.metadata_props))
        out = gather.outputs[0]
        if y.dtype is not None:
            out.dtype = y.dtype
        y.replace_all_uses_with(out)
        gather.replace_input_with(0, y)
        self.g.insert_after(node, gather)
        y_name = y.name
        y.name = unique(f"{y_name}/slice", set(_values(self.g)))
        out.name = y_name
        out.shape = y.shape
        y.shape = None

    def gather(self, node: ir.Node) -> None:
        x = node.inputs[0]
        r = len(_dims(x))
        axis = int(_attr(node, "axis", 0)) % r
        m_in = self.mask(x, axis)
        if m_in is None:
            return
        idx = _const(node.inputs[1])
        assert idx is not None and idx.ndim == 1
        pos = np.where(idx < 0, idx + len(m_in), idx).astype(np.int64)
        self.set_input(node, 1, self._reindex(m_in, pos).astype(idx.dtype))

    def _new_dims(self, v: ir.Value | None) -> list[int | str | None]:
        d = list(_dims(v))
        for a in range(len(d)):
            m = self.mask(v, a)
            if m is not None:
                d[a] = int(m.sum())
        return d

    def reshape(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = _const(node.inputs[1])
        assert shape is not None
        new_in, new_out = self._new_dims(x), self._new_dims(y)
        allowzero = int(_attr(node, "allowzero", 0))
        target = [int(s) for s in shape.reshape(-1)]
        for j, s in enumerate(target):
            if s == -1:
                continue
            if s == 0 and not allowzero:
                if j < len(new_in) and new_in[j] == new_out[j]:
                    continue
            if isinstance(new_out[j], int):
                target[j] = int(new_out[j])  # type: ignore[arg-type]
        self.set_input(node, 1, np.array(target, dtype=shape.dtype))

    def expand(self, node: ir.Node) -> None:
        x = node.inputs[0]
        shape = _const(node.inputs[1])
        assert shape is not None
        s = shape.reshape(-1).copy()
        rx, ry = len(_dims(x)), len(_dims(node.outputs[0]))
        for a in range(rx):
            if self.mask(x, a) is not None:
                k = a + ry - rx - (ry - len(s))
                if k >= 0 and s[k] > 1:
                    s[k] = 1  # broadcasting keeps x's (new) size
        self.set_input(node, 1, s)

    def resize(self, node: ir.Node) -> None:
        if len(node.inputs) < 4 or node.inputs[3] is None:
            return
        sizes = _const(node.inputs[3])
        if sizes is None or not sizes.size:
            return
        y = node.outputs[0]
        r = len(_dims(y))
        axes = [int(a) % r for a in _attr(node, "axes", list(range(r)))]
        new = sizes.reshape(-1).copy()
        for j, a in enumerate(axes):
            m = self.mask(y, a)
            if m is not None:
                new[j] = int(m.sum())
        self.set_input(node, 3, new)

    # -- afterwards --

    def update_shapes(self) -> None:
        values = _values(self.g)
        for (name, axis), units in self.ch.slot_units.items():
            v = values.get(name)
            if v is None or v.shape is None:
                continue
            m = self.kept[units]
            if m.all():
                continue
            d = list(v.shape)
            d[axis] = int(m.sum())
            v.shape = ir.Shape(d)

    def drop_dead(self) -> None:
        g = self.g
        for name in list(g.initializers):
            v = g.initializers[name]
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                del g.initializers[name]
        for node in list(g):
            if node.op_type == "Constant" and not any(o.uses() or o.is_graph_output() for o in node.outputs):
                g.remove(node, safe=True)


def prune_in_place(model: ir.Model, channels: Channels, plan: ChannelPlan) -> int:
    """Remove the channels ``plan`` drops from ``model`` itself; returns how many channels went.

    ``channels`` must be the analysis of ``model`` (:func:`mtc.ir.channels.analyze`).

    Raises:
        MtcError: the plan is invalid for the groups, or the groups are not this model's.
    """
    validate_plan(channels, plan, model=model)
    removed = plan.removed(channels)
    if removed == 0:
        return 0
    _Rewriter(model, channels, channels.unit_mask(plan.keep)).run()
    return removed


def apply_plan(model: ir.Model, channels: Channels, plan: ChannelPlan) -> ir.Model:
    """A pruned copy of ``model``: a pure function of (model, groups, plan); ``model`` is unchanged.

    Use one plan per task on the same model and groups to get one pruned model per task.
    """
    validate_plan(channels, plan, model=model)
    out = model.clone()
    if plan.removed(channels):
        _Rewriter(out, channels, channels.unit_mask(plan.keep)).run()
    return out


@register_pass
class PruneChannels(Pass):
    """Remove channels of dependency groups in place (``prune-channels``).

    Options (keyword-only): ``plan`` (a :class:`ChannelPlan` for this model's groups) or a
    budget: ``ratio`` (fraction of each prunable group to remove) and/or ``keep`` (group name or
    id -> kept count, overriding the ratio), with ``importance`` (l1, l2, random), ``round_to``,
    ``ignore`` (node names whose groups are left whole) and ``seed`` (random importance).
    """

    name = "prune-channels"
    options = ("plan", "ratio", "keep", "importance", "round_to", "ignore", "seed")

    def __init__(self, *, plan: ChannelPlan | None = None, ratio: float | None = None,
                 keep: Mapping[Any, int] | None = None, importance: str = "l1", round_to: int = 1,
                 ignore: Sequence[str] = (), seed: int = 0) -> None:
        super().__init__()
        self.plan = plan
        self.ratio = ratio
        self.keep = dict(keep or {})
        self.importance = importance
        self.round_to = round_to
        self.ignore = tuple(ignore)
        self.seed = seed
        #: the plan applied by the last call, and the groups it was made for
        self.applied: ChannelPlan | None = None
        self.channels: Channels | None = None

    def requires(self, model: ir.Model) -> None:
        if self.plan is None and self.ratio is None and not self.keep:
            raise MtcError("needs a plan, a ratio or keep counts", pass_name=self.name)
        if self.plan is not None and (self.ratio is not None or self.keep):
            raise MtcError("takes a plan or a budget (ratio, keep), not both", pass_name=self.name)
        if self.importance not in IMPORTANCE:
            raise MtcError(f"importance '{self.importance}' is not one of {', '.join(IMPORTANCE)}",
                           pass_name=self.name)

    def call(self, model: ir.Model) -> PassResult:
        channels = analyze(model)
        plan = self.plan if self.plan is not None else build_plan(
            model, channels, ratio=self.ratio, keep=self.keep, importance=self.importance,
            round_to=self.round_to, ignore=self.ignore, seed=self.seed)
        removed = prune_in_place(model, channels, plan)
        self.applied, self.channels = plan, channels
        return PassResult(model, modified=removed > 0)


def build_plan(model: ir.Model, channels: Channels, *, ratio: float | None = None,
               keep: Mapping[Any, int] | None = None, importance: str = "l1", round_to: int = 1,
               ignore: Sequence[str] = (), seed: int = 0) -> ChannelPlan:
    """The plan for a budget: ``ratio`` over every prunable group not touched by ``ignore``,
    ``keep`` counts for the groups they name (they win over the ratio), the most important
    channels kept (:func:`select`).

    Raises:
        MtcError: a bad ratio, round-to, keep entry or ignored node (named as the CLI option), or
            a ``keep`` entry for a group ``ignore`` leaves whole.
    """
    if ratio is None and not keep:
        raise MtcError("give --ratio R or --keep GROUP=N,...")
    if importance not in IMPORTANCE:
        raise MtcError(f"--importance: '{importance}' is not one of {', '.join(IMPORTANCE)}")
    skip = ignored_groups(channels, ignore, model)
    counts = ratio_counts(channels, ratio, round_to=round_to, skip=skip) if ratio is not None else {}
    if round_to < 1:
        raise MtcError(f"--round-to {round_to}: must be at least 1")
    for gid, n in resolve_counts(channels, keep or {}).items():
        if gid in skip and n < channels.groups[gid].size:
            raise MtcError(f"--keep: group '{channels.groups[gid].name}' touches a node --ignore leaves whole")
        counts[gid] = n
    return select(model, channels, counts, method=importance, seed=seed)

