"""Physically remove the channels that masks and widths zero (what a task does not use).

``specialize`` writes every bound mask and width as a ``Mul`` by a constant 0/1 channel vector
(node metadata ``mtc.merge.mask``). In an exported graph, zeroing a channel equals removing it
when every *consumer* of its dependency group (the weighted nodes that read the group's channels,
``mtc.ir.channels``) reads that channel as zero. :func:`slim` finds, per group, the channels every
consumer reads as zeros and removes them from every producer and consumer with the pruning API
(``mtc.passes.prune.apply_plan``), then drops the masks that are left with nothing to zero. It is
exact by construction, and export verifies every file against the lowering anyway.

Which values are known zero is propagated in graph order: a Mul by a constant that is zero on some
channels zeroes them; ops that map zero to zero keep them (activations with f(0) = 0, pooling,
Resize, data movement: Concat, Slice, Gather, Transpose, Reshape, Flatten, Pad with zeros); an Add
is zero where all its inputs are; anything else (BatchNormalization adds its shift, a Conv makes
new channels) knows nothing. A mask that stands where its group's consumers also read unmasked
channels (a residual stage read before the mask) stays a Mul: the result is exact, only not smaller.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.ir import supergraph as sg
from mtc.ir.channels import Channels, analyze

MASK_KEY = sg.MERGE_KEY + ".mask"

#: Elementwise ops of one tensor with f(0) = 0 (channels pass through).
_ZERO_UNARY = frozenset({
    "Abs", "Asin", "Asinh", "Atan", "Atanh", "Celu", "Dropout", "Elu", "Erf", "Gelu", "HardSwish", "Identity",
    "LeakyRelu", "Mish", "Neg", "Relu", "Selu", "Sin", "Sinh", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
})
#: Ops that only move or pool values: a zero channel stays zero wherever it goes.
_ZERO_MOVE = frozenset({
    "AveragePool", "Concat", "Expand", "Flatten", "Gather", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
    "MaxPool", "Reshape", "Resize", "Slice", "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze",
})
#: Elementwise ops of several tensors that are zero where every input is.
_ZERO_ALL = frozenset({"Add", "Sub", "Sum", "Max", "Min", "Mean"})


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.is_graph_input():
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _units_of(ch: Channels, v: ir.Value) -> np.ndarray:
    """The global units a value's channel slots hold (all axes together)."""
    slots = ch.slots_of(v.name or "")
    return np.unique(np.concatenate(list(slots.values()))) if slots else np.zeros(0, np.int64)


def _clip_keeps_zero(node: ir.Node) -> bool:
    lo = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    hi = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    lo_v = float(lo.reshape(-1)[0]) if lo is not None and lo.size else -np.inf
    hi_v = float(hi.reshape(-1)[0]) if hi is not None and hi.size else np.inf
    return lo_v <= 0.0 <= hi_v


def _mul_const_zeros(ch: Channels, node: ir.Node, out: ir.Value) -> set[int]:
    """Units a Mul by a constant zeroes: those whose every position on the output's slot is 0."""
    zero: set[int] = set()
    for v in node.inputs:
        c = _const(v)
        if c is None or c.ndim == 0:
            continue
        for axis, units in ch.slots_of(out.name or "").items():
            rank = len(out.shape) if out.shape is not None else c.ndim
            ax = axis - (rank - c.ndim)
            if ax < 0 or c.shape[ax] != len(units) or any(d != 1 for i, d in enumerate(c.shape) if i != ax):
                continue
            flat = c.reshape(-1)
            zero_pos = flat == 0
            for u in np.unique(units):
                if bool(np.all(zero_pos[units == u])):
                    zero.add(int(u))
    return zero


def known_zero(model: ir.Model, ch: Channels) -> dict[str, set[int]]:
    """Per value name, the global channel units known to be zero (see the module docstring)."""
    zero: dict[str, set[int]] = {}
    for node in model.graph:  # topological order
        if node.domain not in ("", "ai.onnx"):
            continue
        ins = [v for v in node.inputs if v is not None and ch.slots_of(v.name or "")]
        in_zero = [zero.get(v.name or "", set()) for v in ins]
        op = node.op_type
        for out in node.outputs:
            if not ch.slots_of(out.name or ""):
                continue
            here = set(_units_of(ch, out).tolist())
            z: set[int] = set()
            if op == "Mul":
                for s in in_zero:
                    z |= s
                z |= _mul_const_zeros(ch, node, out)
            elif op in _ZERO_UNARY or (op == "Clip" and _clip_keeps_zero(node)) or op in _ZERO_MOVE:
                for s in in_zero:
                    z |= s
            elif op == "Div":
                if in_zero and ins and node.inputs[0] is ins[0]:
                    z = set(in_zero[0])
            elif op == "Pad":
                value = _const(node.inputs[2]) if len(node.inputs) > 2 else None
                mode = node.attributes["mode"].as_string() if "mode" in node.attributes else "constant"
                if mode == "constant" and (value is None or not value.size or float(value.reshape(-1)[0]) == 0.0):
                    for s in in_zero:
                        z |= s
            elif op in _ZERO_ALL:
                consts = [v for v in node.inputs if v is not None and v not in ins]
                if all((c := _const(v)) is not None and not np.any(c) for v in consts) and in_zero:
                    z = set.intersection(*in_zero)
            if z:
                zero[out.name or ""] = z & here
    return zero


def removable(model: ir.Model, ch: Channels | None = None) -> tuple[Channels, dict[int, tuple[int, ...]]]:
    """Per prunable group, the channels (unit indices) every consumer reads as zero."""
    ch = ch if ch is not None else analyze(model)
    zero = known_zero(model, ch)
    out: dict[int, tuple[int, ...]] = {}
    for g in ch.prunable:
        if not g.consumers:
            continue
        units = ch.group_units[g.id]
        common: set[int] | None = None
        for port in g.consumers:
            z = zero.get(port.value, set())
            common = z if common is None else common & z
            if not common:
                break
        if common:
            idx = tuple(sorted(int(ch.unit_index[u]) for u in common if ch.unit_group[u] == g.id))
            if idx and len(idx) < len(units):
                out[g.id] = idx
    return ch, out


def _drop_spent_masks(model: ir.Model) -> int:
    """Masks whose constant is all ones after slimming: the Mul goes."""
    n = 0
    g = model.graph
    for node in list(g):
        if node.op_type != "Mul" or MASK_KEY not in node.metadata_props:
            continue
        x, m = node.inputs[0], node.inputs[1]
        c = _const(m)
        if x is None or c is None or not np.all(c == 1):
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        out.replace_all_uses_with(x)
        g.remove(node, safe=True)
        n += 1
    from mtc.passes.canonicalize import remove_dead

    remove_dead(model)
    return n


def slim(model: ir.Model) -> tuple[ir.Model, dict[str, Any]]:
    """``model`` with every channel that all its group's consumers read as zero removed (a copy when
    anything is removed; ``model`` itself otherwise), and what was removed per group."""
    from mtc.passes.prune import ChannelPlan, apply_plan

    if not any(n.op_type == "Mul" and MASK_KEY in n.metadata_props for n in model.graph):
        return model, {"groups": {}, "removed": 0, "masks_dropped": 0}
    ch, drop = removable(model)
    if not drop:
        return model, {"groups": {}, "removed": 0, "masks_dropped": 0}
    keep = {gid: tuple(i for i in range(ch.groups[gid].size) if i not in set(idx)) for gid, idx in drop.items()}
    slimmed = apply_plan(model, ch, ChannelPlan(keep))
    dropped = _drop_spent_masks(slimmed)
    report = {"groups": {ch.groups[gid].name: {"channels": ch.groups[gid].size, "kept": len(k)}
                         for gid, k in keep.items()},
              "removed": sum(len(v) for v in drop.values()), "masks_dropped": dropped}
    return slimmed, report
