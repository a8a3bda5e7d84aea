"""The cost model F(ζ): MACs of a sub-network, exactly as mtc counts them on its sliced graph (no torch).

:mod:`mtc.ir.cost` counts a node's MACs from its shapes: a Conv's output elements times its input
channels per group times its kernel, a Gemm's ``m·k·n``, a MatMul's output elements times its inner
size, a norm's output elements. Slicing a group to a prefix of ``k`` channels changes exactly the
sizes of the axes that hold its channels, by a number of positions fixed by ``k`` (a Concat offset
holds ``k`` of them, a Flatten block ``k·H·W``). So each node's MACs is a product of a constant and
the kept sizes of at most a few slots, and the model evaluates every node that way for a
configuration, in about a millisecond, with integer arithmetic: it equals ``model_cost`` of the
physically sliced graph (the tests check it against the exported ONNX files).

The graph it counts may differ from the supergraph's (the fused model ``mtc export`` writes, with
Resize as MatMuls): the width groups are found on it through the values both graphs name alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir.channels import Channels, analyze
from mtc.ir.cost import NORM_OPS, model_cost, node_macs
from mtc.ir.shapes import static_dims
from mtc.spaces.slimmable.config import WidthSpace

_CHANNEL_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", *NORM_OPS}


class CostModel:
    """MACs per sample of ``graph`` sliced to a configuration of ``space`` (module docstring).

    Args:
        graph: the plain graph to count (the supergraph bound at full width, or an exported model).
        space: the width choices.
        reference: the graph whose channel analysis named the width groups (the supergraph bound at
            full width); default ``graph``.
        reference_channels: its analysis, when already computed.

    Raises:
        MtcError: a width group that cannot be found on ``graph``, or a node whose MACs the model
            does not reproduce at full width.
    """

    def __init__(self, graph: ir.Model, space: WidthSpace, *, reference: ir.Model | None = None,
                 reference_channels: Channels | None = None) -> None:
        self.space = space
        ref = reference if reference is not None else graph
        ref_ch = reference_channels if reference_channels is not None else analyze(ref)
        ch = ref_ch if ref is graph else analyze(graph)
        # Every unit (channel) of `graph` that belongs to a width group: (choice index, channel index).
        n_units = len(ch.unit_group)
        unit_choice = np.full(n_units, -1, dtype=np.int64)
        unit_index = np.zeros(n_units, dtype=np.int64)
        for i, c in enumerate(space.choices):
            grp = ref_ch.find(c.name)
            if grp is None or grp.size != c.channels:
                raise MtcError(f"cost model: width group '{c.name}' is not in the reference graph")
            found = False
            for m in grp.members:
                units = ch.slots_of(m.value).get(m.axis)
                if units is None or len(units) != m.size:
                    continue
                u = units[m.positions]
                unit_choice[u] = i
                unit_index[u] = m.units
                found = True
            if not found:
                raise MtcError(f"cost model: width group '{c.name}' has no tensor in the counted graph")
        self._unit_choice = unit_choice
        self._unit_index = unit_index
        self._ch = ch
        self._slots: dict[tuple[str, int], int] = {}
        #: per slot: (positions of no width group, [(choice index, kept positions per count)])
        self._slot_terms: list[tuple[int, list[tuple[int, np.ndarray]]]] = []
        #: per node with MACs: (constant factor, slot ids multiplied in)
        self._terms: list[tuple[int, tuple[int, ...]]] = []
        self._constant = 0
        for node in graph.graph:
            self._add_node(node)
        full = self.macs(space.full())
        truth = model_cost(graph)[1]
        if full != truth:
            raise MtcError(f"cost model: {full} MACs at full width, the graph has {truth} (an op the model does "
                           "not follow)")

    # --- building -------------------------------------------------------------------------------
    def _slot(self, v: ir.Value | None, axis: int) -> int | None:
        """The slot id of ``v``'s ``axis`` if a width group's channels lie on it, else None."""
        if v is None or v.name is None:
            return None
        key = (v.name, axis)
        if key in self._slots:
            return self._slots[key]
        units = self._ch.slots_of(v.name).get(axis)
        if units is None:
            return None
        choice = self._unit_choice[units]
        if not (choice >= 0).any():
            return None
        fixed = int((choice < 0).sum())
        parts = []
        for c in np.unique(choice[choice >= 0]).tolist():
            idx = self._unit_index[units[choice == c]]
            size = self.space.choices[c].channels
            kept = np.searchsorted(np.sort(idx), np.arange(size + 1), side="left")  # positions with index < k
            parts.append((int(c), kept.astype(np.int64)))
        sid = len(self._slot_terms)
        self._slot_terms.append((fixed, parts))
        self._slots[key] = sid
        return sid

    def _dims(self, v: ir.Value | None) -> tuple[int, list[int]] | None:
        """``(product of the axes no width touches, slot ids of the others)``, or None if not static."""
        if v is None:
            return None
        d = static_dims(v)
        if d is None:
            return None
        const, slots = 1, []
        for a, n in enumerate(d):
            s = self._slot(v, a)
            if s is None:
                const *= n
            else:
                slots.append(s)
        return const, slots

    def _add_node(self, node: ir.Node) -> None:
        base = node_macs(node)
        if base == 0:
            return
        op = node.op_type
        if op not in _CHANNEL_OPS or node.domain not in ("", "ai.onnx"):
            self._constant += base
            return
        y = node.outputs[0]
        x = node.inputs[0]
        if op in ("Conv", "ConvTranspose"):
            w = node.inputs[1]
            assert w is not None
            ws = static_dims(w) if w.const_value is None else tuple(w.const_value.shape.numpy())
            assert ws is not None  # node_macs counted it
            group = int(node.attributes["group"].as_int()) if "group" in node.attributes else 1
            outer = self._dims(y if op == "Conv" else x)
            assert outer is not None
            const, slots = outer[0] * math.prod(ws[2:]), list(outer[1])
            inner_v, inner_axis = (x, 1) if op == "Conv" else (y, 1)
            s = self._slot(inner_v, inner_axis) if group == 1 else None
            if s is None:
                const *= ws[1]
            else:
                slots.append(s)
            self._terms.append((const, tuple(slots)))
        elif op == "Gemm":
            a = self._dims(x)
            trans_a = node.attributes["transA"].as_int() if "transA" in node.attributes else 0
            d = static_dims(x) if x is not None else None
            assert a is not None and d is not None
            # m·k from A (both of its axes), n from the output's axis 1
            out_n = self._slot(y, 1)
            yd = static_dims(y)
            assert yd is not None
            del trans_a  # A's two axes are m and k in either order
            const, slots = a[0], list(a[1])
            if out_n is None:
                const *= yd[1]
            else:
                slots.append(out_n)
            self._terms.append((const, tuple(slots)))
        elif op in NORM_OPS:
            o = self._dims(y)
            assert o is not None
            self._terms.append((o[0], tuple(o[1])))
        else:  # MatMul: output elements times A's last axis
            o = self._dims(y)
            d = static_dims(x) if x is not None else None
            assert o is not None and d is not None
            k = self._slot(x, len(d) - 1)
            if k is None:
                self._terms.append((o[0] * d[-1], tuple(o[1])))
            else:
                self._terms.append((o[0], (*o[1], k)))

    # --- evaluation -----------------------------------------------------------------------------
    def slot_sizes(self, counts: Sequence[int]) -> list[int]:
        out = []
        for fixed, parts in self._slot_terms:
            n = fixed
            for c, kept in parts:
                n += int(kept[counts[c]])
            out.append(n)
        return out

    def macs_of_counts(self, counts: Sequence[int]) -> int:
        """MACs when choice ``i`` keeps ``counts[i]`` channels."""
        sizes = self.slot_sizes(counts)
        total = self._constant
        for const, slots in self._terms:
            v = const
            for s in slots:
                v *= sizes[s]
            total += v
        return int(total)

    def macs(self, config: np.ndarray) -> int:
        """MACs of the sub-network of ``config`` (ratio indices per choice)."""
        counts = [c.counts[int(k)] for c, k in zip(self.space.choices, config, strict=True)]
        return self.macs_of_counts(counts)
