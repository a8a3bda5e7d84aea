"""Where the widths go (pass ``slimmable-widths``) and how a plan binds them (pass ``bind-widths``).

A width choice covers one prunable channel dependency group (``mtc.ir.channels``): groups tied by the
analysis (a residual stage, a depthwise conv and its input) are one choice, so they share one
ratio. The groups whose producers are all in the backbone are the *encoder*, shared by every task;
the groups made inside one task's head are that task's *decoder*.

The supernet must compute exactly what the physically slimmed network computes. By the analysis'
contract, removing a group's channels equals zeroing them where the group's *consumers* (the
weighted nodes that read it) read them. So every value a consumer reads gets a ``Slim`` node that
keeps a prefix of each group's channels on it and zeroes the rest; other readers (a residual Add)
see the zeros too. One node may cover several groups at their offsets: DenseNet's pre-activation
``Concat → BatchNorm → Relu → Conv`` reads all earlier layers' groups in one tensor, and zeroing them
before the BatchNorm would not do (its shift makes zeros non-zero again).

``ai.mtc.slimmable::Slim(x)`` attributes: ``axis``; ``choices`` (the width choices it covers);
``sizes`` (their groups' sizes); ``position_choice`` and ``position_unit`` (per position of the axis:
the index into ``choices`` of the group it holds, -1 for a group without a width, and the channel's
index in its group); ``feature`` (1 on the encoder feature the heads read: the tensor CI-KD
distills). A position is kept when its channel index is below its choice's kept count.

Binding a plan (``bind-widths``, run by :func:`mtc.spaces.bind_plan` before ``specialize``) turns
every ``Slim`` into a ``Mul`` by a constant 0/1 vector, written as ``specialize`` writes bound
widths (node metadata ``mtc.merge.mask``), or removes it where nothing is zeroed. Export then
removes the zeroed channels physically (``mtc.export.slim``, through the pruning API).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.channels import Channels, analyze
from mtc.ir.names import TASK_KEY
from mtc.ir.plan import ALL_TASKS, Plan
from mtc.passes.base import Pass, PassResult
from mtc.passes.manager import register_pass
from mtc.passes.prune import width_count
from mtc.spaces.slimmable.config import DECODER, ENCODER
from mtc.spaces.slimmable.options import SPACE, VERSION

DOMAIN = "ai.mtc.slimmable"
DOMAIN_VERSION = 1
OP = "Slim"
MASK_KEY = sg.MERGE_KEY + ".mask"


def _values(g: ir.Graph) -> dict[str, ir.Value]:
    out = {v.name: v for v in g.inputs if v.name}
    for n in g:
        for o in n.outputs:
            if o.name:
                out[o.name] = o
    return out


def group_parts(model: ir.Model, ch: Channels) -> dict[int, tuple[str, str | None]]:
    """``group id -> (part, task)`` for every prunable group the space gives a width: ``encoder``
    when no producer is in a head, ``decoder`` of a task when every producer is in that task's head
    (groups made by several heads, if any, get no width)."""
    task_of = {n.name: n.metadata_props.get(TASK_KEY) for n in model.graph}
    out: dict[int, tuple[str, str | None]] = {}
    for g in ch.prunable:
        owners = {task_of.get(p.node) for p in g.producers}
        if not g.producers or len(owners) != 1:
            continue
        t = owners.pop()
        out[g.id] = (ENCODER, None) if t is None else (DECODER, t)
    return out


@register_pass
class SlimmableWidths(Pass):
    """Give every prunable group of the encoder and of each decoder a width choice (module docstring).

    Args:
        ratios: the width list ω.
        round_to: kept counts are multiples of this.
    """

    name = "slimmable-widths"
    options = ("ratios", "round_to")

    def __init__(self, *, ratios: Sequence[float], round_to: int = 1) -> None:
        self.ratios = tuple(float(r) for r in ratios)
        self.round_to = int(round_to)

    def requires(self, model: ir.Model) -> None:
        if not sg.task_names(model):
            raise MtcError("no tasks: run attach-heads first", pass_name=self.name)
        if any(n.domain == DOMAIN for n in model.graph):
            raise MtcError("the graph already has slimmable widths", pass_name=self.name)
        if any(n.domain == sg.DOMAIN and n.op_type == "Fork" for n in model.graph):
            raise MtcError("the slimmable space shares the encoder on one stream: compile it alone (no other space's "
                           "task streams)", pass_name=self.name)
        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios):
            raise MtcError("the width list must hold ratios in (0, 1]", pass_name=self.name)
        if self.round_to < 1:
            raise MtcError(f"--round-to {self.round_to}: must be at least 1", pass_name=self.name)

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        ch = analyze(model)
        parts = group_parts(model, ch)
        chosen: dict[int, sg.ChoicePoint] = {}
        for gid, (part, task) in parts.items():
            grp = ch.groups[gid]
            counts = [width_count(grp.size, r, self.round_to) for r in self.ratios]
            if len(set(counts)) < 2:
                continue  # one count only: nothing to choose
            chosen[gid] = sg.ChoicePoint(
                kind="width", name=grp.name, node="", input="", output="", axis=1, channels=grp.size,
                group=sorted({m.value for m in grp.members}), per_task=False, widths=sorted(set(counts)),
                info={"space": SPACE, "part": part, "task": task, "counts": counts, "sites": []})
        feature = model.metadata_props.get(sg.FEATURE_KEY)
        sites: dict[tuple[str, int], None] = {}
        for gid in chosen:
            for p in ch.groups[gid].consumers:
                sites[(p.value, p.axis)] = None
        values = _values(g)
        if feature is not None and feature in values and not any(v == feature for v, _ in sites):
            sites[(feature, 1)] = None
        names = {n.name for n in g}
        sg.mark_supergraph(model)
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        for value, axis in sites:
            x = values[value]
            units = ch.slots_of(value).get(axis)
            if units is None:
                units = np.zeros(0, np.int64)
            groups = ch.unit_group[units] if len(units) else np.zeros(0, np.int64)
            present = [int(gid) for gid in dict.fromkeys(groups.tolist()) if int(gid) in chosen]
            index = {gid: i for i, gid in enumerate(present)}
            pos_choice = [index.get(int(gid), -1) for gid in groups.tolist()]
            pos_unit = ch.unit_index[units].tolist() if len(units) else []
            name = f"{value}.slim"
            k = 1
            while name in names:
                k += 1
                name = f"{value}.slim{k}"
            names.add(name)
            uses = [(u, i) for u, i in x.uses()]
            node = ir.node(OP, [x], domain=DOMAIN, name=name, attributes={
                "axis": ir.AttrInt64("axis", axis),
                "choices": ir.AttrStrings("choices", [chosen[gid].name for gid in present]),
                "sizes": ir.AttrInt64s("sizes", [chosen[gid].channels for gid in present]),
                "position_choice": ir.AttrInt64s("position_choice", pos_choice),
                "position_unit": ir.AttrInt64s("position_unit", [int(u) for u in pos_unit]),
                "feature": ir.AttrInt64("feature", int(value == feature))})
            out = node.outputs[0]
            out.name = name
            if x.dtype is not None:
                out.dtype = x.dtype
            out.shape = x.shape
            g.append(node)
            for user, i in uses:
                user.replace_input_with(i, out)
            for gid in present:
                rec = chosen[gid]
                rec.info["sites"].append(name)
                if not rec.node:
                    rec.node, rec.input, rec.output, rec.axis = name, value, name, axis
        g.sort()
        records = [chosen[gid] for gid in sorted(chosen)]
        sg.add_choices(model, records)
        sg.set_space(model, SPACE, VERSION, {"width_list": list(self.ratios), "round_to": self.round_to})
        return PassResult(model, True)


def site_mask(node: ir.Node, counts: dict[str, int]) -> np.ndarray:
    """The 0/1 vector a ``Slim`` node multiplies by when each choice keeps ``counts[choice]``."""
    choices = list(node.attributes["choices"].as_strings())
    pc = np.asarray(node.attributes["position_choice"].as_ints(), dtype=np.int64)
    pu = np.asarray(node.attributes["position_unit"].as_ints(), dtype=np.int64)
    limit = np.array([counts[c] for c in choices] + [np.iinfo(np.int64).max], dtype=np.int64)
    return (pu < limit[pc]).astype(np.float32)  # -1 picks the last entry: always kept


@register_pass
class BindWidths(Pass):
    """Replace every ``Slim`` node by a ``Mul`` with the plan's constant 0/1 vector (module docstring)."""

    name = "bind-widths"
    options = ("plan",)

    def __init__(self, *, plan: Plan) -> None:
        self.plan = plan

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        counts: dict[str, int] = {}
        for c in sg.choices_of(model, "width"):
            if c.info.get("space") == SPACE:
                per = self.plan.widths.get(c.name, {})
                counts[c.name] = int(per.get(ALL_TASKS, c.channels))
        modified = False
        for node in list(g):
            if node.domain != DOMAIN or node.op_type != OP:
                continue
            modified = True
            x, out = node.inputs[0], node.outputs[0]
            assert x is not None
            mask = site_mask(node, counts)
            name = out.name
            if mask.all():
                out.replace_all_uses_with(x, replace_graph_outputs=True)
                g.remove(node, safe=True)
                continue
            rank = len(x.shape) if x.shape is not None else 4
            axis = node.attributes["axis"].as_int()
            shape = [1] * rank
            shape[axis if axis >= 0 else rank + axis] = len(mask)
            assert node.name is not None
            keep = ir.node("Constant", [], name=f"{node.name}.keep", attributes={
                "value": ir.AttrTensor("value", ir.tensor(mask.reshape(shape), name=f"{node.name}.keep"))})
            kv = keep.outputs[0]
            kv.name = f"{node.name}.keep"
            kv.dtype = ir.DataType.FLOAT
            kv.shape = ir.Shape(shape)
            mul = ir.node("Mul", [x, kv], name=f"{node.name}.apply")
            mul.metadata_props[MASK_KEY] = ",".join(node.attributes["choices"].as_strings())
            y = mul.outputs[0]
            if x.dtype is not None:
                y.dtype = x.dtype
            y.shape = x.shape
            g.insert_before(node, [keep, mul])
            out.replace_all_uses_with(y, replace_graph_outputs=True)
            g.remove(node, safe=True)
            y.name = name
        model.opset_imports.pop(DOMAIN, None)
        return PassResult(model, modified)


def space_info(model: ir.Model) -> dict[str, Any]:
    """The slimmable entry of ``mtc.space`` (its options), or an empty dict."""
    for s in sg.space_of(model).get("spaces", []):
        if s.get("name") == SPACE:
            return dict(s)
    return {}


def feature_site(model: ir.Model) -> str | None:
    """The ``Slim`` node on the encoder feature (what CI-KD distills), if any."""
    for n in model.graph:
        if n.domain == DOMAIN and n.op_type == OP and n.attributes["feature"].as_int():
            return n.name
    return None


def describe(model: ir.Model) -> dict[str, Any]:
    """Counts for ``mtc inspect`` and ``mtc check``: choices per part, sites, ratios."""
    choices = [c for c in sg.choices_of(model, "width") if c.info.get("space") == SPACE]
    per_task: dict[str, int] = {}
    for c in choices:
        if c.info.get("part") == DECODER:
            per_task[str(c.info.get("task"))] = per_task.get(str(c.info.get("task")), 0) + 1
    sites = sum(1 for n in model.graph if n.domain == DOMAIN)
    info = space_info(model).get("options", {})
    return {"width_choices": {"encoder": sum(1 for c in choices if c.info.get("part") == ENCODER),
                              "decoders": dict(sorted(per_task.items()))},
            "sites": sites, "width_list": json.loads(json.dumps(info.get("width_list", []))),
            "round_to": int(info.get("round_to", 1))}
