"""Mask sites: where per-task channel masks go, on the channel dependency groups (docs/spaces/partition.md).

Shared by the ``partition`` and ``allocation`` spaces. A *site* is a prunable dependency group
(:mod:`mtc.ir.channels`) together with the one tensor its consumers read it through: the value
after the group's BatchNorm and activation (the *consumer-facing* value), from which every consumer
of the group (the weighted nodes reading its channels) is reached through ops that keep zeros
(activations with f(0) = 0, pooling, Resize, Flatten, Concat, Slice, ...). A mask there zeroes the
channels for every reader, so zeroing them is the same as removing them: export's channel slimming
cuts them out of the producers and consumers of each task's model.

A group has no such value when its consumers read it through different tensors, e.g. a residual
stream, which the blocks' ``Add`` nodes tie to the next stream: in a ResNet the sites are the inner
layers of the blocks. That is Newell et al.'s rule ("masks are applied after every other layer":
two half masks in a row would leave each task a quarter of the weights between them); in a plain
chain of layers, where every layer is a candidate, ``every_other`` keeps one in two.

:class:`MaskSites` (``partition-masks``, ``allocation-masks``) puts an ``ai.mtc::Mask`` on every
site's value and, with ``task_norm``, gives every task its own copy of the site's BatchNorm
(Newell et al.: separate batch normalization statistics per task).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.channels import Channels, Group, analyze
from mtc.ir.cuts import branch_points
from mtc.ir.names import TASK_KEY
from mtc.passes.base import Pass, PassResult
from mtc.passes.choices import stacked_values
from mtc.passes.streams import Streams, is_mtc, node_name

ALL = "all"
LAST_THIRD = "last-third"

#: Ops that map a zero channel of their data input to a zero channel of their output, channel by
#: channel (f(0) = 0 activations, pooling, resampling and data movement).
ZERO_KEEPING = frozenset({
    "Abs", "Celu", "Dropout", "Elu", "Erf", "Gelu", "HardSwish", "Identity", "LeakyRelu", "Mish", "Neg", "Relu",
    "Selu", "Sin", "Sinh", "Softsign", "Tanh", "ThresholdedRelu",
    "AveragePool", "Concat", "Flatten", "Gather", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "MaxPool",
    "Reshape", "Resize", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze",
})


@dataclass
class Site:
    """A mask site (see the module docstring).

    Attributes:
        group: the dependency group's name (``mtc inspect --channels``).
        value: the consumer-facing tensor the mask multiplies.
        channels: the group's size (C).
        norms: BatchNorm nodes between the group's producers and ``value`` (per-task copies).
        producers: nodes whose output channels the group owns.
        consumers: nodes that read the group's channels through weights.
        members: every tensor holding the group's channels.
    """

    group: str
    value: str
    channels: int
    norms: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    #: channel ranges ``[start, stop)`` of the parallel branches a Concat joins here (branch sites)
    branches: list[list[int]] = field(default_factory=list)


def _values(model: ir.Model) -> dict[str, ir.Value]:
    out: dict[str, ir.Value] = {}
    for v in model.graph.inputs:
        if v.name:
            out[v.name] = v
    for n in model.graph:
        for o in n.outputs:
            if o.name:
                out[o.name] = o
    return out


def _zero_keeping(node: ir.Node, index: int) -> bool:
    """Whether ``node`` keeps zeros of its input ``index`` channel by channel."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return False
    if op == "Clip":
        if index != 0:
            return False
        lo = node.inputs[1] if len(node.inputs) > 1 else None
        hi = node.inputs[2] if len(node.inputs) > 2 else None
        lo_v = float(lo.const_value.numpy().reshape(-1)[0]) if lo is not None and lo.const_value is not None else -math.inf
        hi_v = float(hi.const_value.numpy().reshape(-1)[0]) if hi is not None and hi.const_value is not None else math.inf
        return lo_v <= 0.0 <= hi_v
    if op == "Pad":
        mode = node.attributes.get("mode")
        value = node.inputs[2] if len(node.inputs) > 2 else None
        zero = value is None or (value.const_value is not None and not value.const_value.numpy().any())
        return index == 0 and (mode is None or mode.as_string() == "constant") and zero
    if op not in ZERO_KEEPING:
        return False
    return op == "Concat" or index == 0


def _member_values(group: Group) -> list[str]:
    return list(dict.fromkeys(m.value for m in group.members))


def consumer_facing(model: ir.Model, group: Group, *, values: dict[str, ir.Value] | None = None,
                    order: dict[str, int] | None = None) -> tuple[str | None, str]:
    """The group's consumer-facing tensor (see the module docstring), or None and why there is none."""
    values = values if values is not None else _values(model)
    if order is None:
        order = {node_name(n): i for i, n in enumerate(model.graph)}
    members = set(_member_values(group))
    reads = {(c.node, c.value) for c in group.consumers}
    if not reads:
        return None, "nothing reads its channels through weights"

    def position(name: str) -> int:
        p = values[name].producer()
        return order.get(node_name(p), -1) if p is not None else -1

    def closure(start: str) -> set[str]:
        seen = {start}
        stack = [start]
        while stack:
            v = values[stack.pop()]
            for user, idx in v.uses():
                if not _zero_keeping(user, idx):
                    continue
                for o in user.outputs:
                    if o.name in members and o.name not in seen:
                        seen.add(o.name)
                        stack.append(o.name)
        return seen

    candidates = sorted((m for m in members if m in values and any(
        mb.axis == 1 and mb.value == m and len(values[m].shape or ()) >= 2 for mb in group.members)), key=position)
    # The last tensor that still reaches every consumer: after the BatchNorm and the activation.
    for u in reversed(candidates):
        if not [r for r in reads if r[1] not in closure(u)]:
            return u, ""
    # Why not: a node that joins the group's tensors with other values (a residual Add), if any.
    for n in model.graph:
        if n.domain in ("", "ai.onnx") and n.op_type in ("Add", "Sub", "Sum", "Mul", "Max", "Min", "Mean") and sum(
                1 for v in n.inputs if v is not None and v.name in members) >= 1 and any(
                o.name in members for o in n.outputs) and sum(
                1 for v in n.inputs if v is not None and v.const_value is None) >= 2:
            return None, (f"its consumers read it through different tensors that '{node_name(n)}' ({n.op_type}) ties "
                          "together (a residual stream), so no one tensor reaches every consumer by ops that keep "
                          "zeros")
    n0, v0 = sorted(reads)[0]
    return None, (f"no one tensor of it reaches every consumer by ops that keep zeros ('{n0}' reads '{v0}')")


def _norms_before(model: ir.Model, group: Group, value: str, values: dict[str, ir.Value]) -> list[str]:
    """BatchNorm nodes of the group on the way from its producers to ``value`` (graph order)."""
    members = set(_member_values(group))
    producers = {p.node for p in group.producers}
    out: list[str] = []
    seen: set[str] = set()
    stack = [value]
    while stack:
        name = stack.pop()
        if name in seen or name not in values:
            continue
        seen.add(name)
        p = values[name].producer()
        if p is None or node_name(p) in producers:
            continue
        if p.op_type == "BatchNormalization" and p.domain in ("", "ai.onnx"):
            out.append(node_name(p))
        for v in p.inputs:
            if v is not None and v.name in members:
                stack.append(v.name)
    order = {node_name(n): i for i, n in enumerate(model.graph)}
    return sorted(out, key=lambda n: order[n])


def _site(model: ir.Model, group: Group, values: dict[str, ir.Value], order: dict[str, int]) -> tuple[Site | None, str]:
    if not group.prunable:
        return None, f"it is not prunable: {group.reason}"
    if not group.producers:
        return None, "no node produces its channels"
    nodes = {node_name(n): n for n in model.graph}
    heads = [p.node for p in group.producers if p.node in nodes and TASK_KEY in nodes[p.node].metadata_props]
    if heads:
        return None, f"it is made inside a task's head ('{heads[0]}'): per-task masks need a tensor all tasks compute"
    value, why = consumer_facing(model, group, values=values, order=order)
    if value is None:
        return None, why
    shape = values[value].shape
    mb = next(m for m in group.members if m.value == value and m.axis == 1)
    if shape is None or not isinstance(shape[1], int) or mb.size != group.size or not np.array_equal(
            mb.units, np.arange(group.size)):
        return None, (f"its tensor '{value}' holds its channels in blocks or mixed with others (a grouped or "
                      "depthwise convolution, a Concat): a mask there would not map one to one onto the group")
    return Site(group=group.name, value=value, channels=group.size,
                norms=_norms_before(model, group, value, values),
                producers=list(dict.fromkeys(p.node for p in group.producers)),
                consumers=list(dict.fromkeys(c.node for c in group.consumers)),
                members=_member_values(group)), ""


def candidate_sites(model: ir.Model, channels: Channels | None = None) -> list[Site]:
    """Every group of the backbone that can hold a mask, in graph order of the masked tensor."""
    channels = channels if channels is not None else analyze(model)
    values = _values(model)
    order = {node_name(n): i for i, n in enumerate(model.graph)}
    out = []
    for g in channels:
        site, _ = _site(model, g, values, order)
        if site is not None:
            out.append(site)
    pos = {name: order.get(node_name(v.producer()), -1) if v.producer() is not None else -1  # type: ignore[arg-type]
           for name, v in values.items()}
    return sorted(out, key=lambda s: pos[s.value])


def branch_sites(model: ir.Model, channels: Channels | None = None) -> tuple[list[Site], dict[str, str]]:
    """Sites where a Concat joins parallel branches (an Inception-style block): the mask sits on
    the Concat's output (or after the zero-keeping ops that follow it) and each branch's channels are
    one component. Returns the sites and, for every other Concat, why it is none."""
    channels = channels if channels is not None else analyze(model)
    values = _values(model)
    order = {node_name(n): i for i, n in enumerate(model.graph)}
    out: list[Site] = []
    why: dict[str, str] = {}
    for n in model.graph:
        if n.op_type != "Concat" or n.domain not in ("", "ai.onnx") or TASK_KEY in n.metadata_props:
            continue
        axis_attr = n.attributes.get("axis")
        y = n.outputs[0]
        rank = len(y.shape) if y.shape is not None else 0
        axis = axis_attr.as_int() if axis_attr is not None else 0
        if (axis + rank if axis < 0 else axis) != 1 or len(n.inputs) < 2:
            why[node_name(n)] = "it does not join channels (axis 1) of two or more branches"
            continue
        units = channels.slots_of(y.name or "").get(1)
        if units is None:
            why[node_name(n)] = "its channel axis is not one the analysis knows"
            continue
        groups = [channels.groups[i] for i in sorted({int(channels.unit_group[u]) for u in units})]
        bad = next((g for g in groups if not g.prunable), None)
        if bad is not None:
            why[node_name(n)] = f"group '{bad.name}' is not prunable: {bad.reason}"
            continue
        # The tensor the consumers of every branch group read: the Concat output or after it.
        value, reason = None, ""
        chain = [y]
        while True:
            users = list(chain[-1].uses())
            if len(users) == 1 and _zero_keeping(users[0][0], users[0][1]) and users[0][0].op_type != "Concat":
                chain.append(users[0][0].outputs[0])
            else:
                break
        for v in reversed(chain):
            ok = True
            for g in groups:
                reach: set[str] = set()
                stack: list[str] = [str(v.name)]
                while stack:
                    cur = stack.pop()
                    if cur in reach:
                        continue
                    reach.add(cur)
                    for user, idx in values[cur].uses():
                        if _zero_keeping(user, idx):
                            stack.extend(o.name for o in user.outputs if o.name)
                if any(c.value not in reach for c in g.consumers):
                    ok = False
                    c0 = next(c for c in g.consumers if c.value not in reach)
                    reason = f"'{c0.node}' reads branch group '{g.name}' through '{c0.value}', not through the Concat"
                    break
            if ok:
                value = v.name
                break
        if value is None:
            why[node_name(n)] = reason
            continue
        ranges, off = [], 0
        for x in n.inputs:
            c = int(x.shape[1]) if x is not None and x.shape is not None and isinstance(x.shape[1], int) else 0
            ranges.append([off, off + c])
            off += c
        norms = sorted({b for g in groups for b in _norms_before(model, g, value, values)}, key=lambda b: order[b])
        out.append(Site(group=node_name(n), value=str(value), channels=off, norms=norms,
                        producers=list(dict.fromkeys(p.node for g in groups for p in g.producers)),
                        consumers=list(dict.fromkeys(c.node for g in groups for c in g.consumers)),
                        members=list(dict.fromkeys(m for g in groups for m in _member_values(g))), branches=ranges))
    return out, why


def every_other(sites: Sequence[Site]) -> list[Site]:
    """Drop a site whose producers read an earlier kept site (masks after every other layer)."""
    kept: list[Site] = []
    read: set[str] = set()
    for s in sites:
        if any(p in read for p in s.producers):
            continue
        kept.append(s)
        read.update(s.consumers)
    return kept


def resolve_branch_sites(model: ir.Model, spec: str, *, channels: Channels | None = None,
                         flag: str = "--sites") -> list[Site]:
    """Branch sites (:func:`branch_sites`): ``all``, ``last-third`` or Concat node/output names."""
    sites, why = branch_sites(model, channels)
    spec = spec.strip()
    if spec in (ALL, LAST_THIRD):
        if not sites:
            detail = "; ".join(f"'{k}': {v}" for k, v in list(why.items())[:2])
            raise MtcError("--components branches: no Concat in the backbone joins parallel branches that can hold "
                           "per-task masks" + (f" ({detail})" if detail else ""))
        return sites[len(sites) - max(1, math.ceil(len(sites) / 3)):] if spec == LAST_THIRD else sites
    out = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        site = next((s for s in sites if name in (s.group, s.value)), None)
        if site is None:
            node = next((n for n in model.graph for o in n.outputs if name in (n.name, o.name)), None)
            reason = why.get(node_name(node)) if node is not None and node.op_type == "Concat" else None
            raise MtcError(f"{flag}: '{name}' is not a Concat of parallel branches that can hold per-task masks"
                           + (f": {reason}" if reason else " (--components branches)"))
        out.append(site)
    return out


def resolve_sites(model: ir.Model, spec: str, *, alternate: bool, channels: Channels | None = None,
                  flag: str = "--sites") -> list[Site]:
    """The sites ``spec`` names: ``all``, ``last-third`` (the last third of ``all``, at least one) or
    comma-separated group or tensor names.

    Args:
        alternate: apply :func:`every_other` to ``all`` and ``last-third``.

    Raises:
        MtcError: a name that is no group or tensor, a group that cannot hold a mask (saying why),
            or a backbone without any site.
    """
    channels = channels if channels is not None else analyze(model)
    spec = spec.strip()
    if spec in (ALL, LAST_THIRD):
        sites = candidate_sites(model, channels)
        if alternate:
            sites = every_other(sites)
        if not sites:
            raise MtcError(f"{flag}: the backbone has no channel group that can hold a per-task mask (a prunable "
                           "group read by its consumers through one tensor; see mtc inspect --channels)")
        if spec == LAST_THIRD:
            sites = sites[len(sites) - max(1, math.ceil(len(sites) / 3)):]
        return sites
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise MtcError(f"{flag}: expected all, last-third or group names, got '{spec}'")
    values = _values(model)
    order = {node_name(n): i for i, n in enumerate(model.graph)}
    out: list[Site] = []
    for name in names:
        g = channels.find(name)
        if g is None and name in values:
            slots = channels.slots_of(name)
            units = slots.get(1)
            if units is None or not len(units):
                raise MtcError(f"{flag}: tensor '{name}' has no channel axis the analysis knows")
            gids = sorted({int(channels.unit_group[u]) for u in units})
            if len(gids) > 1:
                raise MtcError(f"{flag}: tensor '{name}' holds channels of {len(gids)} groups "
                               f"({', '.join(channels.groups[i].name for i in gids)}): name one group")
            g = channels.groups[gids[0]]
        if g is None:
            known = ", ".join(s.group for s in candidate_sites(model, channels)) or "none"
            raise MtcError(f"{flag}: '{name}' is neither a channel group nor a tensor (groups that can hold a mask: "
                           f"{known})")
        site, why = _site(model, g, values, order)
        if site is None:
            raise MtcError(f"{flag}: group '{g.name}' cannot hold a per-task mask: {why}")
        if any(s.group == site.group for s in out):
            raise MtcError(f"{flag}: group '{g.name}' is named twice")
        out.append(site)
    return out


def entry_point(model: ir.Model, sites: Sequence[Site]) -> str:
    """The last cut point (a tensor every path passes) before the first site's producers: where the
    partitioned part of the network begins (the graph input when nothing earlier is one)."""
    order = {node_name(n): i for i, n in enumerate(model.graph)}
    values = _values(model)
    first = min(order[p] for s in sites for p in s.producers)
    best = model.graph.inputs[0].name or ""
    for c in branch_points(model, include_ends=True):
        v = values.get(c)
        if v is None:
            continue
        p = v.producer()
        if p is None:
            continue
        if order[node_name(p)] < first:
            best = c
    return best


class MaskSites(Pass):
    """Per-task masks on mask sites (see the module docstring).

    Args:
        sites: which sites (:func:`resolve_sites`).
        alternate: keep one site in two where consecutive layers are both sites.
        task_norm: per-task copies of each site's BatchNorm (``<bn>@<task>``).
        space: the space recorded in the choice points and ``mtc.space``.
        version: the space's version.
        space_options: the space's compile options, recorded in ``mtc.space`` (JSON scalars).
        info: per-site extra facts for the choice records (site value -> dict), or a callable of the
            :class:`Site` giving them.
    """

    options = ("sites", "alternate", "task_norm", "space")

    def __init__(self, *, name: str, sites: str, alternate: bool, task_norm: bool, space: str, version: int = 1,
                 space_options: dict[str, Any] | None = None, info: Any = None, branches: bool = False) -> None:
        self.name = name
        self.sites = sites
        self.branches = branches
        self.alternate = alternate
        self.task_norm = task_norm
        self.space = space
        self.version = version
        self.space_options = dict(space_options or {})
        self.info = info
        #: the sites of the last call
        self.resolved: list[Site] = []

    def requires(self, model: ir.Model) -> None:
        if not sg.task_names(model):
            raise MtcError("no tasks: run attach-heads first", pass_name=self.name)

    def call(self, model: ir.Model) -> PassResult:
        sites = (resolve_branch_sites(model, self.sites) if self.branches
                 else resolve_sites(model, self.sites, alternate=self.alternate))
        self.resolved = sites
        entry = entry_point(model, sites)
        s = Streams(model, pass_name=self.name)
        s.ensure_streams()
        stacked = stacked_values(model)
        values = _values(model)
        for site in sites:
            if id(values[site.value]) not in stacked:
                raise MtcError(f"site '{site.value}' is not on the task streams", pass_name=self.name)
        records = []
        copied: set[str] = set()
        for depth, site in enumerate(sites, start=1):
            if self.task_norm:
                for bn in site.norms:
                    if bn not in copied:
                        self._per_task_norm(s, model, bn)
                        copied.add(bn)
            records.append(self._mask(s, model, site, depth))
        model.graph.sort()
        sg.add_choices(model, records)
        sg.set_space(model, self.space, self.version,
                     {**self.space_options, "task_norm": self.task_norm, "entry": entry})
        return PassResult(model, True)

    def _per_task_norm(self, s: Streams, model: ir.Model, name: str) -> None:
        g = model.graph
        bn = next(n for n in g if n.name == name)
        x = bn.inputs[0]
        assert x is not None
        y = bn.outputs[0]
        y_name = y.name
        assert y_name is not None
        uses = s.uses_of(y)
        was_output = y.is_graph_output()
        outs = []
        for t in s.tasks:
            mapping, _ = s.clone([bn], {id(x): s.slice(x, t)}, t, t)
            outs.append(mapping[id(y)])
        y.name = f"{y_name}.shared"
        stack = ir.node("Stack", outs, domain=sg.DOMAIN, name=f"{name}.stack")
        s.finish(stack, y_name, y)
        s.redirect(y, stack.outputs[0], uses, was_output)
        g.remove(bn, safe=True)

    def _mask(self, s: Streams, model: ir.Model, site: Site, depth: int) -> sg.ChoicePoint:
        v = _values(model)[site.value]
        name = site.value
        uses = s.uses_of(v)
        was_output = v.is_graph_output()
        mask = s.init(f"{name}.mask", np.ones((len(s.tasks), site.channels), np.float32))
        n = ir.node("Mask", [v, mask], domain=sg.DOMAIN, name=f"{name}.mask",
                    attributes={"choice": ir.AttrString("choice", name), "axis": ir.AttrInt64("axis", 1),
                                "tasks": ir.AttrInt64("tasks", len(s.tasks))})
        s.finish(n, f"{name}.masked", v)
        s.redirect(v, n.outputs[0], uses, was_output)
        extra = self.info(site) if callable(self.info) else (self.info or {}).get(name, {})
        if site.branches:
            extra = {"branches": site.branches, **extra}
        info = {"space": self.space, "group": site.group, "producers": site.producers, "consumers": site.consumers,
                "norms": site.norms if self.task_norm else [], "batchnorms": site.norms, **extra}
        return sg.ChoicePoint(kind="mask", name=name, node=node_name(n), input=name, output=f"{name}.masked",
                              depth=depth, axis=1, channels=site.channels, group=site.members, info=info)


def mask_choices(model: ir.Model, space: str) -> list[sg.ChoicePoint]:
    """The mask choice points ``space`` inserted, in depth order."""
    return [c for c in sg.choices_of(model, "mask") if c.info.get("space") == space]


def space_options(model: ir.Model, space: str) -> dict[str, Any]:
    """The compile options ``space`` recorded in ``mtc.space``."""
    info = sg.space_of(model)
    for rec in info.get("spaces", [info] if info else []):
        if rec.get("name") == space:
            return dict(rec.get("options", {}))
    return {}


def is_head_node(node: ir.Node) -> bool:
    return TASK_KEY in node.metadata_props and not is_mtc(node)
