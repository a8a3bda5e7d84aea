"""Generic passes that insert choice points of format 2 at given places (docs/supergraph.md).

Spaces decide *where* (their paper's sites and defaults) and call these; the passes only build:

- ``block-choices``: the blocks between consecutive cut points become op choices whose options
  are copies of the block run on the stacked streams (``copy0`` is the original; tasks that pick
  the same copy share it). A tree of branches is a plan whose partitions refine with depth.
- ``task-masks``: per-task channel masks (``ai.mtc::Mask``) on given tensors.
- ``widths``: width choices (``ai.mtc::Width``) on given tensors, one for all tasks or per task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.cost import node_cost
from mtc.ir.names import TASK_KEY
from mtc.ir.shapes import static_dims
from mtc.passes.base import Pass, PassResult
from mtc.passes.manager import register_pass
from mtc.passes.streams import Streams, is_mtc, node_name, subgraph_between

MANUAL = "manual"


def _value(model: ir.Model, name: str, pass_name: str) -> ir.Value:
    g = model.graph
    for v in g.inputs:
        if v.name == name:
            return v
    for n in g:
        for o in n.outputs:
            if o.name == name:
                return o
    raise MtcError(f"no tensor named '{name}'", pass_name=pass_name)


def stacked_values(model: ir.Model) -> set[int]:
    """``id`` of every value that holds all task streams (downstream of Fork, not of a TaskSlice)."""
    out: set[int] = set()
    for n in model.graph:  # topological order
        if is_mtc(n, "Fork") or is_mtc(n, "Gate") or is_mtc(n, "Stack"):
            out.add(id(n.outputs[0]))  # (a Gate and a Stack restack per-task values)
            continue
        if is_mtc(n, "TaskSlice") or TASK_KEY in n.metadata_props:
            continue
        if any(v is not None and id(v) in out for v in n.inputs):
            out.update(id(o) for o in n.outputs)
    return out


@register_pass
class BlockChoices(Pass):
    """Give every block between consecutive ``boundaries`` ``copies`` copies to choose from per task.

    Args:
        boundaries: tensor names ``b0, b1, ..., bD``: block ``d`` is the subgraph from ``b(d-1)``
            to ``bd`` (each ``b(d-1)`` must dominate ``bd``: a cut point). ``b0`` may be the graph
            input. Names refer to the backbone before any rewrite.
        copies: options per block (``copy0`` is the original nodes, the others ``CopyOf`` clones).
        logits: give each Gate ``[T, copies]`` zero logits (for a gradient-based strategy).
        space: the space recorded in the choice points.
        space_options: more of the space's compile options to record in ``mtc.space`` (JSON scalars).
    """

    name = "block-choices"
    options = ("boundaries", "copies", "logits", "space")

    def __init__(self, *, boundaries: Sequence[str], copies: int, logits: bool = True, space: str = MANUAL,
                 space_options: dict[str, Any] | None = None) -> None:
        self.boundaries = list(boundaries)
        self.copies = int(copies)
        self.logits = logits
        self.space = space
        self.space_options = dict(space_options or {})

    def requires(self, model: ir.Model) -> None:
        if not sg.task_names(model):
            raise MtcError("no tasks: run attach-heads first", pass_name=self.name)
        if len(self.boundaries) < 2:
            raise MtcError("at least two boundaries (one block) are needed", pass_name=self.name)
        if self.copies < 1:
            raise MtcError(f"copies must be >= 1, got {self.copies}", pass_name=self.name)

    def call(self, model: ir.Model) -> PassResult:
        s = Streams(model, pass_name=self.name)
        bounds = [_value(model, b, self.name) for b in self.boundaries]
        blocks = [subgraph_between(model, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        s.ensure_streams()
        fork_out = next(n.outputs[0] for n in model.graph if is_mtc(n, "Fork"))
        records = []
        current: dict[int, ir.Value] = {}  # a boundary already rewritten -> the Gate output that replaced it
        for d, (nodes, x, y) in enumerate(zip(blocks, bounds, bounds[1:], strict=False), start=1):
            xin = fork_out if x.is_graph_input() else current.get(id(x), x)
            rec = self._block(s, model, nodes, xin, y, d)
            current[id(y)] = next(n for n in model.graph if n.name == rec.node).outputs[0]
            records.append(rec)
        model.graph.sort()
        sg.add_choices(model, records)
        sg.set_space(model, self.space, 1, {"block_copies": self.copies, **self.space_options})
        return PassResult(model, True)

    def _block(self, s: Streams, model: ir.Model, nodes: list[ir.Node], x: ir.Value, y: ir.Value,
               depth: int) -> sg.ChoicePoint:
        assert x.name is not None and y.name is not None
        name = f"block{depth}"
        uses = s.uses_of(y)
        was_output = y.is_graph_output()
        y_name = y.name
        params = sum(node_cost(n).params for n in nodes)
        macs = sum(node_cost(n).macs for n in nodes)
        entry = [node_name(n) for n in nodes if any(v is x for v in n.inputs)]
        outs: list[ir.Value] = [y]
        options = [sg.OptionRecord("copy0", sg.STACKED, [node_name(n) for n in nodes], entry=entry,
                                   params=params, macs=macs)]
        for k in range(1, self.copies):
            mapping, names = s.clone(nodes, {id(x): x}, f"copy{k}", None)
            outs.append(mapping[id(y)])
            options.append(sg.OptionRecord(f"copy{k}", sg.STACKED, names,
                                           entry=[f"{e}@copy{k}" for e in entry], params=params, macs=macs))
        y.name = f"{y_name}.copy0"
        values = [[s.slice(o, t) for t in s.tasks] for o in outs]
        gate = s.gate(name, [o.name for o in options], values, y, y_name, depth=depth, logits=self.logits)
        s.redirect(y, gate.outputs[0], uses, was_output)
        return sg.ChoicePoint(kind="op", name=name, node=node_name(gate), input=x.name, output=y_name,
                              depth=depth, options=options, logits=f"{name}.policy" if self.logits else None,
                              info={"space": self.space})


class _ChannelChoices(Pass):
    """Shared by ``task-masks`` and ``widths``: one choice node on each site tensor."""

    op = ""
    kind = ""
    options: tuple[str, ...] = ("sites", "axis", "space")

    def __init__(self, *, sites: Sequence[str], axis: int = 1, space: str = MANUAL) -> None:
        self.sites = list(sites)
        self.axis = axis
        self.space = space

    def requires(self, model: ir.Model) -> None:
        if not sg.task_names(model):
            raise MtcError("no tasks: run attach-heads first", pass_name=self.name)
        if not self.sites:
            raise MtcError("no sites given", pass_name=self.name)

    def call(self, model: ir.Model) -> PassResult:
        s = Streams(model, pass_name=self.name)
        values = [_value(model, v, self.name) for v in self.sites]
        s.ensure_streams()
        stacked = stacked_values(model)
        records = []
        for v in values:
            dims = static_dims(v)
            if dims is None:
                raise MtcError(f"site '{v.name}' needs a static shape", pass_name=self.name)
            axis = self.axis if self.axis >= 0 else len(dims) + self.axis
            records.append(self._site(s, v, id(v) in stacked, dims[axis], axis))
        model.graph.sort()
        sg.add_choices(model, records)
        sg.set_space(model, self.space, 1, {})
        return PassResult(model, True)

    def _site(self, s: Streams, v: ir.Value, stacked: bool, channels: int, axis: int) -> sg.ChoicePoint:
        raise NotImplementedError


@register_pass
class TaskMasks(_ChannelChoices):
    """A per-task channel mask on every site (``Mask(x, mask[T, C])``, ones initially)."""

    name = "task-masks"

    def _site(self, s: Streams, v: ir.Value, stacked: bool, channels: int, axis: int) -> sg.ChoicePoint:
        if not stacked:
            raise MtcError(f"site '{v.name}' is not on the task streams (a head's tensor?): per-task masks need "
                           "a tensor all tasks compute", pass_name=self.name)
        assert v.name is not None
        name = v.name
        uses = s.uses_of(v)
        was_output = v.is_graph_output()
        mask = s.init(f"{name}.mask", np.ones((len(s.tasks), channels), np.float32))
        n = ir.node("Mask", [v, mask], domain=sg.DOMAIN, name=f"{name}.mask",
                    attributes={"choice": ir.AttrString("choice", name), "axis": ir.AttrInt64("axis", axis),
                                "tasks": ir.AttrInt64("tasks", len(s.tasks))})
        s.finish(n, f"{name}.masked", v)
        s.redirect(v, n.outputs[0], uses, was_output)
        return sg.ChoicePoint(kind="mask", name=name, node=node_name(n), input=name, output=f"{name}.masked",
                              axis=axis, channels=channels, info={"space": self.space})


@register_pass
class Widths(_ChannelChoices):
    """A width choice on every site: a prefix of the channels is kept (``Width(x)``).

    Args:
        per_task: one width per task on task-stream sites (otherwise one for all); sites inside a
            task's head are one stream and always have one width.
        widths: the allowed channel counts per site, as fractions of its channels (empty: any).
    """

    name = "widths"
    options = ("sites", "axis", "space", "per_task", "widths")

    def __init__(self, *, sites: Sequence[str], axis: int = 1, space: str = MANUAL, per_task: bool = False,
                 widths: Sequence[float] = ()) -> None:
        super().__init__(sites=sites, axis=axis, space=space)
        self.per_task = per_task
        self.widths = list(widths)

    def _site(self, s: Streams, v: ir.Value, stacked: bool, channels: int, axis: int) -> sg.ChoicePoint:
        assert v.name is not None
        name = v.name
        uses = s.uses_of(v)
        was_output = v.is_graph_output()
        per_task = self.per_task and stacked
        blocks = len(s.tasks) if per_task else 1
        n = ir.node("Width", [v], domain=sg.DOMAIN, name=f"{name}.width",
                    attributes={"choice": ir.AttrString("choice", name), "axis": ir.AttrInt64("axis", axis),
                                "channels": ir.AttrInt64("channels", channels),
                                "blocks": ir.AttrInt64("blocks", blocks)})
        s.finish(n, f"{name}.slim", v)
        s.redirect(v, n.outputs[0], uses, was_output)
        allowed = sorted({max(1, round(w * channels)) for w in self.widths})
        return sg.ChoicePoint(kind="width", name=name, node=node_name(n), input=name, output=f"{name}.slim",
                              axis=axis, channels=channels, per_task=per_task, widths=allowed,
                              info={"space": self.space})
