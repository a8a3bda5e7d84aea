"""The ``specialize`` pass: bind a plan, leaving a plain multi-task network (the specialised form).

Each stacked activation holds one block of rows per *group* of tasks whose streams are identical,
instead of one block per task, so identical streams are computed once and an option shared by
several tasks runs once on the groups of the tasks that chose it::

    before: input ─ Fork ─ x[T streams] ─ conv3 ─ y.shared ─ TaskSlice(t) ─┐
                                   └─ TaskSlice(t) ─ conv3@t ──────────────┼─ Gate(plan) ─ y
                                   └─ TaskSlice(t) ─ conv3@t.skip ─────────┘
    after (seg, depth share conv3; normal takes its copy):
            input ─ x[1 group: seg+depth+normal] ─ conv3 ─ y.shared[seg+depth] ─┐
                     └─ Regroup ─ conv3@normal ───────────────────────────────┴─ Concat ─ y[2 groups]

- An op choice (``Gate``) becomes the ``Concat`` of the chosen options' group tensors (or the one
  tensor, when a single group continues). A stacked option (a shared operator, a branch's copy of
  a block) runs only on the groups holding a task that chose it (``Regroup`` at its entry nodes).
- A ``Mask`` or ``Width`` becomes a ``Mul`` by a constant 0/1 channel mask per class of tasks with
  the same kept channels (identical masks keep their tasks on one stream); the mask is written
  where a later step (export's channel pruning) can remove the zeroed channels physically.

Options nobody chose disappear with their weights (dead-code removal), as do the logits.
``ai.mtc::Regroup(x) [groups=G, index=[...]]`` gathers blocks of rows of a G-group tensor.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import ALL_TASKS, Plan
from mtc.passes.base import Pass, PassResult
from mtc.passes.canonicalize import remove_dead
from mtc.passes.manager import register_pass

SPECIALIZED_KEY = sg.PLAN_KEY
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


def kept_channels(plan: Plan, choice: sg.ChoicePoint, tasks: list[str]) -> dict[str, list[int]]:
    """Per task, the channels a mask or width choice keeps under ``plan``."""
    if choice.kind == "mask":
        return {t: list(plan.masks[choice.name][t]) for t in tasks}
    per = plan.widths[choice.name]
    return {t: list(range(per[ALL_TASKS] if ALL_TASKS in per else per[t])) for t in tasks}


@register_pass
class Specialize(Pass):
    """Rewrite the supergraph for one plan into a grouped-stream multi-task network.

    Args:
        plan: a :class:`mtc.ir.plan.Plan`, or an object with ``to_plan()`` (a space's own view,
            such as AutoMTL's ``Policy``).
    """

    name = "specialize"
    options = ("plan",)

    def __init__(self, *, plan: object) -> None:
        to_plan = getattr(plan, "to_plan", None)
        self.plan: Plan = to_plan() if callable(to_plan) else plan  # type: ignore[assignment]

    def requires(self, model: ir.Model) -> None:
        sg.check_format(model)
        if SPECIALIZED_KEY in model.metadata_props:
            raise MtcError("the supergraph is already specialised to a plan", pass_name=self.name)
        self.plan.validate(model)

    def __repr__(self) -> str:
        return f"Specialize(plan=<{self.plan.space}: {len(self.plan.ops)} op choices>)"

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        order = sg.task_names(model)
        choices = {c.node: c for c in sg.choices_of(model)}
        # Stacked options' entry nodes: restricted to the tasks that chose the option.
        entries: dict[str, tuple[sg.ChoicePoint, sg.OptionRecord]] = {}
        for c in choices.values():
            for o in c.options:
                if o.scope == sg.STACKED:
                    for e in o.entry:
                        entries[e] = (c, o)
        # Which inputs of an entry node read the choice's input: fixed now, by name, because the
        # sweep below replaces values (a merged Gate output keeps its option's name).
        entry_inputs: dict[str, list[int]] = {}
        for n in g:
            if n.name in entries:
                c = entries[n.name][0]
                entry_inputs[n.name] = [i for i, v in enumerate(n.inputs) if v is not None and v.name == c.input]
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
                    assert x is not None  # streams fork the graph input
                    groups[id(x)] = [frozenset(order)]
                    node.outputs[0].replace_all_uses_with(x)
                    g.remove(node, safe=True)
                elif node.op_type == "Gate":
                    self._gate(g, node, choices[node.name], order, groups, regroup)
                elif node.op_type == "Stack":
                    self._merge_tasks(g, node, list(node.inputs), node.name, order, groups, regroup)
                elif node.op_type in ("Mask", "Width"):
                    self._mask(g, node, choices[node.name], order, groups, regroup)
                elif node.op_type not in ("TaskSlice", "CopyOf"):
                    raise MtcError("this ai.mtc op has no specialised form: its space must rewrite it first",
                                   node=node.name, op=node.op_type, pass_name=self.name)
                continue  # TaskSlice and CopyOf: handled after the sweep
            stacked = [i for i, v in enumerate(node.inputs) if v is not None and id(v) in groups]
            if not stacked:
                continue
            entry = entries.get(node.name)
            choosers: frozenset[str] | None = None
            if entry is not None:
                # The option runs only on the groups holding a task that chose it, and its
                # outputs stand for those tasks only.
                c, o = entry
                choosers = frozenset(t for t, name in self.plan.ops[c.name].items() if name == o.name)
                for i in entry_inputs.get(node.name, []):
                    v = node.inputs[i]
                    if v is None or id(v) not in groups:
                        continue
                    sel = [k for k, grp in enumerate(groups[id(v)]) if grp & choosers]
                    if sel:
                        node.replace_input_with(i, regroup(v, sel, node))
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
            if choosers is not None:
                target = [grp & choosers for grp in target if grp & choosers] or target
            for out in node.outputs:
                groups[id(out)] = target

        remove_dead(model)
        for node in list(g):
            if node.domain == sg.DOMAIN and node.op_type == "TaskSlice":
                x = node.inputs[0]
                assert x is not None  # a slice of a stacked tensor
                task = node.attributes["task"].as_string()
                src = groups[id(x)]
                pos = next(i for i, grp in enumerate(src) if task in grp)
                new = regroup(x, [pos], node)
                node.outputs[0].replace_all_uses_with(new, replace_graph_outputs=True)
                g.remove(node, safe=True)
        remove_dead(model)
        model.metadata_props[SPECIALIZED_KEY] = json.dumps(self.plan.to_json(), separators=(",", ":"))
        return PassResult(model, True)

    def _gate(self, g: ir.Graph, gate: ir.Node, c: sg.ChoicePoint, order: list[str],
              groups: dict[int, Groups], regroup: Any) -> None:
        T = len(order)
        choice = self.plan.ops[c.name]
        names = c.option_names
        chosen = [gate.inputs[names.index(choice[t]) * T + i] for i, t in enumerate(order)]
        self._merge_tasks(g, gate, chosen, c.name, order, groups, regroup)

    def _merge_tasks(self, g: ir.Graph, node: ir.Node, chosen: list[ir.Value | None], choice: str,
                     order: list[str], groups: dict[int, Groups], regroup: Any) -> None:
        """``node``'s output as the streams of ``chosen`` (one value per task, in task order).

        A task's value that is a slice of a stacked tensor is taken from that tensor's groups: the
        tensor enters once, with the groups that hold a task picking it (labelled with those tasks
        only), so identical streams stay one.
        """
        pickers: dict[int, set[str]] = {}
        sources: dict[int, ir.Value] = {}
        for v, t in zip(chosen, order, strict=True):
            assert v is not None  # every task has a value
            src = self._stacked_source(v, groups)
            if src is not None:
                pickers.setdefault(id(src), set()).add(t)
                sources[id(src)] = src
        parts: list[ir.Value] = []
        part_groups: Groups = []
        seen: set[int] = set()
        for v, t in zip(chosen, order, strict=True):
            assert v is not None
            src = self._stacked_source(v, groups)
            if src is None:
                parts.append(v)
                part_groups.append(frozenset({t}))
                continue
            if id(src) in seen:
                continue
            seen.add(id(src))
            who = pickers[id(src)]
            sel = [k for k, grp in enumerate(groups[id(src)]) if grp & who]
            picked = regroup(src, sel, node)
            parts.append(picked)
            part_groups.extend(grp & who for grp in groups[id(picked)])
        self._merge(g, node, parts, part_groups, choice, groups)

    @staticmethod
    def _stacked_source(v: ir.Value, groups: dict[int, Groups]) -> ir.Value | None:
        p = v.producer()
        if p is not None and p.domain == sg.DOMAIN and p.op_type == "TaskSlice":
            src = p.inputs[0]
            if src is not None and id(src) in groups:
                return src
        return None

    def _merge(self, g: ir.Graph, node: ir.Node, parts: list[ir.Value], part_groups: Groups, choice: str,
               groups: dict[int, Groups]) -> None:
        """Replace ``node``'s output by the row-concatenation of ``parts`` (a merge Concat)."""
        out = node.outputs[0]
        if len(parts) == 1:
            new = parts[0]
        else:
            assert node.name is not None  # onnx_ir names every node a graph holds
            base = node.name[: -len(".gate")] if node.name.endswith(".gate") else node.name
            cat = ir.node("Concat", parts, name=f"{base}.merge", attributes={"axis": ir.AttrInt64("axis", 0)})
            cat.metadata_props[sg.MERGE_KEY] = choice
            new = cat.outputs[0]
            if out.dtype is not None:
                new.dtype = out.dtype
            new.shape = out.shape
            g.insert_before(node, cat)
        groups[id(new)] = part_groups
        name = out.name
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        g.remove(node, safe=True)
        producer = new.producer()
        if producer is not None and (producer.op_type == "Concat" or sg.MERGE_KEY + ".mask" in producer.metadata_props):
            new.name = name

    def _mask(self, g: ir.Graph, node: ir.Node, c: sg.ChoicePoint, order: list[str], groups: dict[int, Groups],
              regroup: Any) -> None:
        x = node.inputs[0]
        assert x is not None
        if id(x) not in groups:
            # A single-stream site (inside a task's head): one width for that stream.
            kept = kept_channels(self.plan, c, order)
            mask = kept[next(iter(kept))]
            new = self._mul(g, node, x, mask, c)
            name = node.outputs[0].name
            node.outputs[0].replace_all_uses_with(new, replace_graph_outputs=True)
            g.remove(node, safe=True)
            new.name = name
            return
        kept = kept_channels(self.plan, c, order)
        classes: dict[tuple[int, ...], frozenset[str]] = {}
        for t in order:
            key = tuple(kept[t])
            classes[key] = classes.get(key, frozenset()) | {t}
        src = groups[id(x)]
        parts: list[ir.Value] = []
        part_groups: Groups = []
        for key, members in classes.items():
            sel = [k for k, grp in enumerate(src) if grp & members]
            xin = regroup(x, sel, node) if len(classes) > 1 else x
            label = [grp & members for grp in groups[id(xin)] if grp & members]
            if len(key) == c.channels and len(classes) == 1:
                y = xin  # nothing masked: the stream passes through
            elif len(key) == c.channels:
                # Nothing masked for these tasks, but their rows need a value of their own label.
                ident = ir.node("Identity", [xin], name=f"{node.name}.{len(parts)}.pass")
                y = ident.outputs[0]
                y.name = ident.name
                if xin.dtype is not None:
                    y.dtype = xin.dtype
                y.shape = xin.shape
                g.insert_before(node, ident)
            else:
                y = self._mul(g, node, xin, list(key), c, suffix=f"{len(parts)}" if len(classes) > 1 else "")
            parts.append(y)
            part_groups.extend(label)
        self._merge(g, node, parts, part_groups, c.name, groups)

    @staticmethod
    def _mul(g: ir.Graph, node: ir.Node, x: ir.Value, keep: list[int], c: sg.ChoicePoint,
             suffix: str = "") -> ir.Value:
        """``x * m`` with a constant 0/1 mask over axis ``c.axis`` that keeps channels ``keep``."""
        rank = len(x.shape) if x.shape is not None else 4
        shape = [1] * rank
        axis = c.axis if c.axis >= 0 else rank + c.axis
        shape[axis] = c.channels
        m = np.zeros(c.channels, np.float32)
        m[keep] = 1.0
        assert node.name is not None
        base = node.name + (f".{suffix}" if suffix else "")
        # A Constant node, not an initializer: float initializers are trainable weights to the
        # lowering, and a mask must not train.
        keep_node = ir.node("Constant", [], name=f"{base}.keep",
                            attributes={"value": ir.AttrTensor("value", ir.tensor(m.reshape(shape), name=f"{base}.keep"))})
        const = keep_node.outputs[0]
        const.name = f"{base}.keep"
        const.dtype = ir.DataType.FLOAT
        const.shape = ir.Shape(shape)
        g.insert_before(node, keep_node)
        mul = ir.node("Mul", [x, const], name=f"{base}.apply")
        mul.metadata_props[sg.MERGE_KEY + ".mask"] = c.name
        out = mul.outputs[0]
        out.name = f"{base}.out"
        if x.dtype is not None:
            out.dtype = x.dtype
        out.shape = x.shape
        g.insert_before(node, mul)
        return out
