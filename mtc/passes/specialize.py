"""The ``specialize`` pass: bind a fixed policy, leaving a plain multi-task network.

Each stacked activation holds one block of rows per *group* of tasks whose streams are identical,
instead of one block per task, so identical streams are computed once and a shared operator runs
once on the groups of the tasks that chose it::

    before: input ─ Fork ─ x[T streams] ─ conv3 ─ y.shared ─ TaskSlice(t) ─┐
                                   └─ TaskSlice(t) ─ conv3@t ──────────────┼─ Gate(policy) ─ y
                                   └─ TaskSlice(t) ─ conv3@t.skip ─────────┘
    after (seg, depth share conv3; normal takes its copy):
            input ─ x[1 group: seg+depth+normal] ─ conv3 ─ y.shared[seg+depth] ─┐
                     └─ Regroup ─ conv3@normal ───────────────────────────────┴─ Concat ─ y[2 groups]

Options nobody chose disappear with their weights (dead-code removal), as do the policy logits.
``ai.mtc::Regroup(x) [groups=G, index=[...]]`` gathers blocks of rows of a G-group tensor.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.passes.base import Pass, PassResult
from mtc.passes.canonicalize import remove_dead
from mtc.passes.manager import register_pass

SPECIALIZED_KEY = "mtc.policy"
Groups = list[frozenset[str]]


def _refine(parts: list[Groups], order: list[str]) -> Groups:
    """The coarsest partition finer than every input's, in task order."""
    key: dict[str, tuple[int, ...]] = {t: tuple(next(i for i, g in enumerate(p) if t in g) for p in parts)
                                       for t in order if all(any(t in g for g in p) for p in parts)}
    out: dict[tuple[int, ...], set[str]] = {}
    for t in order:
        if t in key:
            out.setdefault(key[t], set()).add(t)
    return [frozenset(g) for g in out.values()]


@register_pass
class Specialize(Pass):
    """Rewrite the supergraph for one fixed policy into a grouped-stream multi-task network."""

    name = "specialize"
    options = ("policy",)

    def __init__(self, *, policy: sg.Policy) -> None:
        self.policy = policy

    def requires(self, model: ir.Model) -> None:
        if not sg.is_supergraph(model):
            raise MtcError("not a supergraph (compile it first)", pass_name=self.name)
        if SPECIALIZED_KEY in model.metadata_props:
            raise MtcError("the supergraph is already specialised to a policy", pass_name=self.name)
        self.policy.validate(model)

    def __repr__(self) -> str:
        return f"Specialize(policy=<{len(self.policy.choices)} VCNs>)"

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        order = [t.name for t in sg.tasks_of(model) or []]
        records = {r.gate: r for r in sg.vcns_of(model)}
        unit_heads = {r.nodes[0]: r for r in sg.vcns_of(model)}
        groups: dict[int, Groups] = {}
        counter = [0]

        def regroup(x: ir.Value, index: list[int], before: ir.Node) -> ir.Value:
            src = groups[id(x)]
            if index == list(range(len(src))):
                return x
            counter[0] += 1
            n = ir.node("Regroup", [x], domain=sg.DOMAIN, name=f"{x.name}.regroup{counter[0]}",
                        attributes={"groups": ir.AttrInt64("groups", len(src)),
                                    "index": ir.AttrInt64s("index", index)})
            out = n.outputs[0]
            out.name = n.name
            if x.dtype is not None:
                out.dtype = x.dtype
            out.shape = x.shape
            g.insert_before(before, n)
            groups[id(out)] = [src[i] for i in index]
            return out

        for node in list(g):
            assert node.name is not None  # onnx_ir names every node a graph holds
            if node.domain == sg.DOMAIN:
                if node.op_type == "Fork":
                    x = node.inputs[0]
                    assert x is not None  # the vcn pass forks the graph input
                    groups[id(x)] = [frozenset(order)]
                    node.outputs[0].replace_all_uses_with(x)
                    g.remove(node, safe=True)
                elif node.op_type == "Gate":
                    self._gate(g, node, records[node.name], order, groups)
                continue  # TaskSlice and CopyOf: handled after the sweep
            stacked = [i for i, v in enumerate(node.inputs) if v is not None and id(v) in groups]
            if not stacked:
                continue
            rec = unit_heads.get(node.name)
            restrict: set[str] | None = None
            if rec is not None:
                # The shared unit runs only on the groups holding a task that chose it, and its
                # output stands for those tasks only.
                restrict = {t for t, c in self.policy.choices[rec.name].items() if c == 0}
                x = node.inputs[0]
                assert x is not None  # a VCN's head reads its activation first (vcn._units)
                sel = [i for i, grp in enumerate(groups[id(x)]) if grp & restrict]
                if sel:
                    node.replace_input_with(0, regroup(x, sel, node))
            parts = [groups[id(node.inputs[i])] for i in stacked]
            target = _refine(parts, order)
            for i in stacked:
                v = node.inputs[i]
                assert v is not None  # a stacked input, or the Regroup that replaced it
                src = groups[id(v)]
                if src != target:
                    idx = [next(k for k, s in enumerate(src) if grp <= s) for grp in target]
                    node.replace_input_with(i, regroup(v, idx, node))
                    groups[id(node.inputs[i])] = target
            if restrict is not None:
                target = [grp & restrict for grp in target if grp & restrict] or target
            for out in node.outputs:
                groups[id(out)] = target

        remove_dead(model)
        for node in list(g):
            if node.domain == sg.DOMAIN and node.op_type == "TaskSlice":
                x = node.inputs[0]
                assert x is not None  # the vcn pass slices a stacked tensor
                task = node.attributes["task"].as_string()
                src = groups[id(x)]
                pos = next(i for i, grp in enumerate(src) if task in grp)
                new = regroup(x, [pos], node)
                node.outputs[0].replace_all_uses_with(new, replace_graph_outputs=True)
                g.remove(node, safe=True)
        remove_dead(model)
        model.metadata_props[SPECIALIZED_KEY] = json.dumps(self.policy.to_json(), separators=(",", ":"))
        return PassResult(model, True)

    def _gate(self, g: ir.Graph, gate: ir.Node, rec: sg.VcnRecord, order: list[str],
              groups: dict[int, Groups]) -> None:
        T = len(order)
        choice = self.policy.choices[rec.name]
        parts: list[ir.Value] = []
        part_groups: Groups = []
        seen_sources: set[int] = set()
        for i, t in enumerate(order):
            v = gate.inputs[choice[t] * T + i]
            assert v is not None  # the vcn pass gives a Gate every option of every task
            p = v.producer()
            if (
                p is not None
                and p.domain == sg.DOMAIN
                and p.op_type == "TaskSlice"
                and (src := p.inputs[0]) is not None
                and id(src) in groups
            ):
                # A slice of a stacked tensor: take the stacked tensor once, all its groups chose it.
                if id(src) not in seen_sources:
                    seen_sources.add(id(src))
                    parts.append(src)
                    part_groups.extend(groups[id(src)])
            else:
                parts.append(v)
                part_groups.append(frozenset({t}))
        out = gate.outputs[0]
        if len(parts) == 1:
            new = parts[0]
        else:
            assert gate.name is not None  # onnx_ir names every node a graph holds
            cat = ir.node("Concat", parts, name=gate.name.replace(".gate", ".merge"),
                          attributes={"axis": ir.AttrInt64("axis", 0)})
            cat.metadata_props[sg.MERGE_KEY] = rec.name
            new = cat.outputs[0]
            if out.dtype is not None:
                new.dtype = out.dtype
            new.shape = out.shape
            g.insert_before(gate, cat)
        groups[id(new)] = part_groups
        name = out.name
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        g.remove(gate, safe=True)
        producer = new.producer()
        if producer is not None and producer.op_type == "Concat":
            new.name = name
