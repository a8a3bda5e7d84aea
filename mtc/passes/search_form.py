"""Search-time rewrites: the form of a supergraph that trains fast (the file keeps the simple form).

Three passes, run in this order by :func:`mtc.lower.supergraph.lower_search` on a clone:

- ``unstack-slices``: the T ``TaskSlice`` nodes of one stacked tensor become one ``Unstack``
  (views whose backward is one stack, not T scatters into zeros).
- ``batch-task-copies``: an option whose T per-task inputs are identical ``Conv [+
  BatchNormalization]`` chains on one tensor's Unstack outputs becomes one ``TaskConv`` (a grouped
  convolution over all tasks, per-task BN statistics); identical row-independent parameter-free
  chains (strided ``Slice``, channel ``Gather``) run once on the stacked tensor.
- ``stack-gate-inputs``: a Gate option whose T inputs are exactly one stacked tensor's Unstack
  outputs reads the stacked tensor itself (its ``stacked`` attribute says which options do), so
  no per-task restacking happens.

Every pass is linear in the graph's size: node positions are computed once, not looked up.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from mtc.ir import supergraph as sg
from mtc.passes.base import Pass, PassResult
from mtc.passes.canonicalize import remove_dead
from mtc.passes.manager import register_pass
from mtc.passes.streams import is_mtc


def _positions(g: ir.Graph) -> dict[int, int]:
    return {id(n): i for i, n in enumerate(g)}


def _through_identity(v: ir.Value | None) -> ir.Value | None:
    p = v.producer() if v is not None else None
    return p.inputs[0] if p is not None and p.op_type == "Identity" and p.domain == "" else v


def _unstacked_source(values: list[ir.Value | None]) -> ir.Value | None:
    """The stacked tensor when ``values`` are exactly its Unstack outputs in task order."""
    producer = values[0].producer() if values and values[0] is not None else None
    if producer is None or not is_mtc(producer, "Unstack"):
        return None
    if len(values) != len(producer.outputs):
        return None
    if any(v is None or v.producer() is not producer or v.index() != i for i, v in enumerate(values)):
        return None
    return producer.inputs[0]


def _gate_layout(gate: ir.Node) -> tuple[int, list[bool], list[int]]:
    """Tasks, the stacked flag per option and each option's first input index."""
    T = len(gate.attributes["tasks"].as_strings())
    K = len(gate.attributes["options"].as_strings())
    st = gate.attributes.get("stacked")
    stacked = [bool(s) for s in st.as_ints()] if st is not None else [False] * K
    starts, i = [], 0
    for s in stacked:
        starts.append(i)
        i += 1 if s else T
    return T, stacked, starts


def _unstack(g: ir.Graph, src: ir.Value, after: ir.Node, t: int) -> list[ir.Value]:
    u = ir.node("Unstack", [src], domain=sg.DOMAIN, name=f"{src.name}.unstack",
                attributes={"tasks": ir.AttrInt64("tasks", t)}, num_outputs=t)
    for i, o in enumerate(u.outputs):
        o.name = f"{src.name}.unstack_{i}"
        if src.dtype is not None:
            o.dtype = src.dtype
    g.insert_after(after, u)
    return list(u.outputs)


@register_pass
class UnstackSlices(Pass):
    """All T task slices of one stacked tensor as one ``Unstack``."""

    name = "unstack-slices"

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        pos = _positions(g)
        slices: dict[int, dict[int, ir.Node]] = {}
        sources: dict[int, ir.Value] = {}
        for n in g:
            if is_mtc(n, "TaskSlice"):
                src = n.inputs[0]
                assert src is not None
                slices.setdefault(id(src), {})[n.attributes["index"].as_int()] = n
                sources[id(src)] = src
        changed = False
        for key, by_index in slices.items():
            first = next(iter(by_index.values()))
            t = first.attributes["tasks"].as_int()
            if sorted(by_index) != list(range(t)):
                continue
            src = sources[key]
            u = ir.node("Unstack", [src], domain=sg.DOMAIN, name=f"{src.name}.unstack",
                        attributes={"tasks": ir.AttrInt64("tasks", t)}, num_outputs=t)
            g.insert_before(min(by_index.values(), key=lambda n: pos[id(n)]), u)
            for i in range(t):
                old = by_index[i].outputs[0]
                new = u.outputs[i]
                new.name, new.shape = old.name, old.shape
                if old.dtype is not None:
                    new.dtype = old.dtype
                old.name = None
                old.replace_all_uses_with(new)
                g.remove(by_index[i], safe=True)
            changed = True
        return PassResult(model, changed)


def _batch_convs(g: ir.Graph, outs: list[ir.Value | None], pos: dict[int, int]) -> ir.Value | None:
    """T per-task ``Conv [+ BatchNormalization]`` chains on one tensor's Unstack outputs as one
    ``TaskConv``; returns its stacked output, or None when the chains do not match."""
    chains: list[tuple[ir.Node, ir.Node | None]] = []
    for v in outs:
        last = v.producer() if v is not None else None
        if last is None:
            return None
        bn = last if last.op_type == "BatchNormalization" and last.domain == "" else None
        conv = bn.inputs[0].producer() if bn is not None and bn.inputs[0] is not None else last
        if conv is None or conv.op_type != "Conv" or conv.domain != "" or len(conv.inputs) != 2:
            return None
        if bn is not None and (len(bn.outputs) != 1 or len(bn.inputs) != 5):
            return None
        chains.append((conv, bn))
    src = _unstacked_source([c.inputs[0] for c, _ in chains])
    if src is None or src.shape is None or len(src.shape) != 4:
        return None
    ref_conv, ref_bn = chains[0]

    def attrs_of(n: ir.Node | None) -> dict[str, Any]:
        return {} if n is None else {k: a.value for k, a in n.attributes.items()}

    ca, ba = attrs_of(ref_conv), attrs_of(ref_bn)
    for conv, bn in chains:
        if attrs_of(conv) != ca or attrs_of(bn) != ba or (bn is None) != (ref_bn is None):
            return None
        if any(len(list(o.uses())) != 1 for o in conv.outputs):
            return None
    if str(ca.get("auto_pad", "NOTSET")) != "NOTSET":
        return None
    pads = [int(p) for p in ca.get("pads", [0, 0, 0, 0])]
    if pads[:2] != pads[2:]:
        return None
    t = len(chains)
    inputs: list[ir.Value | None] = [src, *(c.inputs[1] for c, _ in chains)]
    attributes: dict[str, Any] = {
        "tasks": ir.AttrInt64("tasks", t),
        "group": ir.AttrInt64("group", int(ca.get("group", 1))),
        "strides": ir.AttrInt64s("strides", [int(x) for x in ca.get("strides", [1, 1])]),
        "pads": ir.AttrInt64s("pads", pads[:2]),
        "dilations": ir.AttrInt64s("dilations", [int(x) for x in ca.get("dilations", [1, 1])]),
        "has_bn": ir.AttrInt64("has_bn", int(ref_bn is not None)),
    }
    if ref_bn is not None:
        if int(ba.get("training_mode", 0)):
            return None
        for k in range(1, 5):
            inputs += [bn.inputs[k] for _, bn in chains if bn is not None]
        attributes["epsilon"] = ir.AttrFloat32("epsilon", float(ba.get("epsilon", 1e-5)))
        attributes["momentum"] = ir.AttrFloat32("momentum", float(ba.get("momentum", 0.9)))
    last = max((c[1] or c[0] for c in chains), key=lambda n: pos.get(id(n), -1))
    node = ir.node("TaskConv", inputs, domain=sg.DOMAIN, name=f"{ref_conv.name}.batched", attributes=attributes)
    out = node.outputs[0]
    out.name = f"{ref_conv.name}.batched"
    if src.dtype is not None:
        out.dtype = src.dtype
    g.insert_after(last, node)
    return out


def _row_independent(node: ir.Node) -> bool:
    """A stateless node that treats every row (axis 0) alike, with constant side inputs: it may
    run once on a stacked tensor instead of once per task."""
    if node.domain != "" or len(node.outputs) != 1 or node.op_type not in ("Identity", "Slice", "Gather"):
        return False
    if any(v is None or v.const_value is None for v in node.inputs[1:]):
        return False
    if node.op_type == "Gather":
        return node.attributes["axis"].as_int() > 0 if "axis" in node.attributes else False
    if node.op_type == "Slice":
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        return axes is not None and axes.const_value is not None and bool((axes.const_value.numpy() > 0).all())
    return True


def _batch_stateless(g: ir.Graph, outs: list[ir.Value | None], pos: dict[int, int]) -> ir.Value | None:
    """T identical row-independent chains on one tensor's Unstack outputs (parameter-free skips)
    as one chain on the stacked tensor; returns its output, or None when they do not match."""
    chains: list[list[ir.Node]] = []
    for v in outs:
        chain: list[ir.Node] = []
        p = v.producer() if v is not None else None
        while p is not None and _row_independent(p):
            chain.insert(0, p)
            p = p.inputs[0].producer() if p.inputs[0] is not None else None
        if not chain:
            return None
        chains.append(chain)

    def sig(n: ir.Node) -> tuple[Any, ...]:
        return (n.op_type, tuple(sorted((k, str(a.value)) for k, a in n.attributes.items())),
                tuple(id(v) for v in n.inputs[1:]))

    ref = chains[0]
    if any([sig(n) for n in c] != [sig(n) for n in ref] for c in chains[1:]):
        return None
    src = _unstacked_source([c[0].inputs[0] for c in chains])
    if src is None:
        return None
    cur = src
    last = max((c[-1] for c in chains), key=lambda n: pos.get(id(n), -1))
    for n in ref:
        c = ir.node(n.op_type, [cur, *n.inputs[1:]], name=f"{n.name}.stacked", attributes=dict(n.attributes))
        out = c.outputs[0]
        out.name = c.name
        if src.dtype is not None:
            out.dtype = src.dtype
        g.insert_after(last, c)
        last, cur = c, out
    return cur


@register_pass
class BatchTaskCopies(Pass):
    """Per-task copies of an option as one batched computation on the stacked tensor."""

    name = "batch-task-copies"

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        pos = _positions(g)
        changed = False
        for gate in [n for n in g if is_mtc(n, "Gate")]:
            T, stacked, starts = _gate_layout(gate)
            for k, is_stacked in enumerate(stacked):
                if is_stacked:
                    continue
                ins = list(gate.inputs[starts[k]:starts[k] + T])
                if _unstacked_source([_through_identity(v) for v in ins]) is not None:
                    continue  # already one tensor's slices (an identity skip): stack-gate-inputs reads it
                src = _batch_stateless(g, ins, pos) or _batch_convs(g, ins, pos)
                if src is None:
                    continue
                producer = src.producer()
                assert producer is not None
                for i, v in enumerate(_unstack(g, src, producer, T)):
                    gate.replace_input_with(starts[k] + i, v)
                changed = True
        if changed:
            remove_dead(model)
        return PassResult(model, changed)


@register_pass
class StackGateInputs(Pass):
    """Gate options whose inputs are one stacked tensor's Unstack outputs read that tensor."""

    name = "stack-gate-inputs"

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        changed = False
        for gate in [n for n in g if is_mtc(n, "Gate")]:
            T, stacked, starts = _gate_layout(gate)
            K = len(stacked)
            inputs: list[ir.Value | None] = []
            flags: list[int] = []
            hit = False
            for k in range(K):
                if stacked[k]:
                    inputs.append(gate.inputs[starts[k]])
                    flags.append(1)
                    continue
                ins = list(gate.inputs[starts[k]:starts[k] + T])
                src = _unstacked_source([_through_identity(v) for v in ins])
                if src is None:
                    inputs.extend(ins)
                    flags.append(0)
                else:
                    inputs.append(src)
                    flags.append(1)
                    hit = True
            if not hit:
                continue
            n_opts = starts[-1] + (1 if stacked[-1] else T)
            inputs.extend(gate.inputs[n_opts:])  # the logits, if any
            attrs = dict(gate.attributes)
            attrs["stacked"] = ir.AttrInt64s("stacked", flags)
            new_gate = ir.node("Gate", inputs, domain=sg.DOMAIN, name=gate.name, attributes=attrs)
            new_gate.metadata_props.update(gate.metadata_props)
            out = gate.outputs[0]
            new_out = new_gate.outputs[0]
            g.insert_before(gate, new_gate)
            name = out.name
            out.name = None
            new_out.name, new_out.shape = name, out.shape
            if out.dtype is not None:
                new_out.dtype = out.dtype
            out.replace_all_uses_with(new_out, replace_graph_outputs=True)
            gate.name = None
            g.remove(gate, safe=True)
            changed = True
        if changed:
            remove_dead(model)
        return PassResult(model, changed)
