"""The branched space's supergraph: candidate locations, the blocks between them, and tree plans.

Locations are cut points of the backbone (``mtc.ir.cuts.branch_points``): tensors every path from
the input to the heads passes through, so the graph can split into branches there. The last
location is always the feature the heads attach to, so the blocks cover the whole encoder:
block ``d`` runs from location ``d-1`` (the graph input for ``d = 1``) to location ``d``. The pass
``branched-blocks`` gives every block one copy per task (the generic ``block-choices`` pass:
``copy0`` is the original nodes, ``copyk`` a ``CopyOf`` clone) with zero ``[T, T]`` logits. A tree
is the plan in which the tasks of one group of ``P_d`` pick the same copy of block ``d``; the
group's copy is numbered by its first task (``copy{i}`` for a group whose first task is task
``i``), so the all-separate tree gives task ``i`` copy ``i``.

Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.cuts import branch_points
from mtc.ir.plan import Plan
from mtc.ir.shapes import static_dims
from mtc.passes.base import Pass, PassResult
from mtc.passes.choices import BlockChoices
from mtc.spaces.branched.trees import Partition, from_groups, is_tree, members

SPACE = "branched"
VERSION = 1
STAGES = "stages"


# ------------------------------------------------------------------------------------- locations
def parse_locations(text: str) -> str:
    """``--locations``: ``stages``, a count ``N >= 1`` or tensor names ``T1,T2,...`` (checked
    against the graph when it is compiled)."""
    t = text.strip()
    if t == STAGES:
        return t
    if re.fullmatch(r"[+-]?\d+", t):
        if int(t) < 1:
            raise ValueError(f"{t}: at least one location is needed")
        return str(int(t))
    names = [n.strip() for n in t.split(",")]
    if not t or any(not n for n in names):
        raise ValueError(f"'{text}': expected 'stages', a count or comma-separated tensor names")
    return ",".join(names)


def candidates(model: ir.Model) -> list[str]:
    """The cut points a branch may start after, from the input to the feature (inclusive)."""
    feature = model.metadata_props.get(sg.FEATURE_KEY)
    points = branch_points(model)
    if feature in points:
        points = points[: points.index(feature) + 1]
    return points


def _values(model: ir.Model) -> dict[str, ir.Value]:
    out = {str(v.name): v for v in model.graph.inputs}
    out.update({str(o.name): o for n in model.graph for o in n.outputs})
    return out


def stage_ends(model: ir.Model, points: Sequence[str]) -> list[str]:
    """The last cut point of every run of equal spatial size (where the resolution changes next),
    and the feature: the paper's "after every ResNet block"."""
    values = _values(model)
    out: list[str] = []
    for i, p in enumerate(points):
        dims = static_dims(values[p])
        nxt = static_dims(values[points[i + 1]]) if i + 1 < len(points) else None
        if i + 1 == len(points) or (dims is not None and nxt is not None and dims[2:] != nxt[2:]):
            out.append(p)
    return out


def resolve_locations(model: ir.Model, spec: str) -> list[str]:
    """The locations ``spec`` names in ``model`` (a backbone with heads), in graph order, ending at
    the feature.

    Raises:
        MtcError: a name that is no tensor or no cut point (naming the nearest cut points), a count
            out of range, or a backbone without cut points.
    """
    spec = parse_locations(spec)
    points = candidates(model)
    if not points:
        raise MtcError("the backbone has no cut point before the heads: nothing to branch at", pass_name=PASS)
    if spec == STAGES:
        return stage_ends(model, points)
    if spec.isdigit():
        n = int(spec)
        if n > len(points):
            raise MtcError(f"--locations {n}: the backbone has {len(points)} cut points up to the feature "
                           f"('{points[-1]}')", pass_name=PASS)
        # evenly spread, the last one at the feature
        return [points[round((k + 1) * len(points) / n) - 1] for k in range(n)]
    names = spec.split(",")
    values = _values(model)
    order = {str(o.name): i for i, n in enumerate(model.graph) for o in n.outputs}
    for v in model.graph.inputs:
        order[str(v.name)] = -1
    for name in names:
        if name in points:
            continue
        if name not in values:
            near = difflib.get_close_matches(name, points, n=3, cutoff=0.4) or points[:3]
            raise MtcError(f"--locations: no tensor named '{name}' in the backbone (cut points near that name: "
                           f"{', '.join(near)})", pass_name=PASS)
        pos = order.get(name, -1)
        before = [p for p in points if order[p] < pos]
        after = [p for p in points if order[p] > pos]
        near = ([before[-1]] if before else []) + ([after[0]] if after else [])
        raise MtcError(f"--locations: '{name}' is not a cut point (a branch cannot start there: other paths "
                       f"bypass it); the nearest cut points are {', '.join(near) or 'none'}", pass_name=PASS)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MtcError(f"--locations: '{dup}' is named twice", pass_name=PASS)
    chosen = sorted(names, key=lambda n: points.index(n))
    if chosen[-1] != points[-1]:
        chosen.append(points[-1])  # the blocks cover the encoder: the feature always ends the last one
    return chosen


PASS = "branched-blocks"


class BranchedBlocks(Pass):
    """Locations from ``--locations``, then one copy of every block per task (``block-choices``)."""

    name = PASS
    options = ("locations",)

    def __init__(self, *, locations: str = STAGES) -> None:
        self.locations = locations

    def requires(self, model: ir.Model) -> None:
        tasks = sg.task_names(model)
        if len(tasks) < 2:
            raise MtcError(f"the branched space needs at least two tasks, got {len(tasks)} "
                           f"({', '.join(tasks) or 'none'}): a tree of one task is the single-task model",
                           pass_name=self.name)

    def call(self, model: ir.Model) -> PassResult:
        locs = resolve_locations(model, self.locations)
        T = len(sg.task_names(model))
        BlockChoices(boundaries=[str(model.graph.inputs[0].name), *locs], copies=T, logits=True, space=SPACE,
                     space_options={"locations": self.locations})(model)
        return PassResult(model, True)


# ------------------------------------------------------------------------------------ the blocks
@dataclass
class Blocks:
    """What the strategies need to know of a branched supergraph.

    Attributes:
        tasks: task names in stream order.
        choices: the op choice of every block, from the input to the feature.
        locations: the tensor each block ends at.
        params, macs: one copy of each block (MACs per sample).
        const_params, const_macs: the network outside the blocks (the heads).
    """

    tasks: list[str]
    choices: list[str]
    locations: list[str]
    params: list[int]
    macs: list[int]
    const_params: int
    const_macs: int

    def sizes(self, unit: str) -> list[int]:
        return list(self.params if unit == "params" else self.macs)

    def const(self, unit: str) -> int:
        return self.const_params if unit == "params" else self.const_macs

    def shared_size(self, unit: str) -> int:
        """The hard-shared model: one copy of every block."""
        return self.const(unit) + sum(self.sizes(unit))

    def separate_size(self, unit: str) -> int:
        """The single-task models together: one copy of every block per task."""
        return self.const(unit) + len(self.tasks) * sum(self.sizes(unit))

    def size(self, levels: Sequence[Partition], unit: str) -> int:
        return self.const(unit) + sum(len(p) * s for p, s in zip(levels, self.sizes(unit), strict=True))


def branched_choices(model: ir.Model) -> list[sg.ChoicePoint]:
    return [c for c in sg.choices_of(model, "op") if c.info.get("space") == SPACE]


def blocks_of(model: ir.Model) -> Blocks:
    """The blocks of a supergraph compiled with ``--space branched``.

    Raises:
        MtcError: the supergraph has no branched blocks.
    """
    from mtc.ir.cost import model_cost
    from mtc.ir.plan import reference_plan
    from mtc.spaces import bind_plan

    cs = branched_choices(model)
    if not cs:
        raise MtcError("the supergraph has no branched blocks (compile it with --space branched)")
    params = [c.options[0].params for c in cs]
    macs = [c.options[0].macs for c in cs]
    shared_params, shared_macs, _ = model_cost(bind_plan(model, reference_plan(model, SPACE)))
    return Blocks(sg.task_names(model), [c.name for c in cs], [c.output for c in cs], params, macs,
                  shared_params - sum(params), shared_macs - sum(macs))


# ------------------------------------------------------------------------------------ tree plans
def tree_to_plan(levels: Sequence[Partition], blocks: Blocks, info: dict[str, Any] | None = None) -> Plan:
    """The plan of a tree: each group's tasks pick the copy numbered by the group's first task."""
    ops: dict[str, dict[str, str]] = {}
    for choice, p in zip(blocks.choices, levels, strict=True):
        per: dict[str, str] = {}
        for b in p:
            m = members(b)
            for i in m:
                per[blocks.tasks[i]] = f"copy{m[0]}"
        ops[choice] = {t: per[t] for t in blocks.tasks}
    return Plan(space=SPACE, version=VERSION, ops=ops, info=dict(info or {}))


def plan_levels(plan: Plan, blocks: Blocks) -> list[Partition]:
    """The partition of the tasks at every block: tasks on the same copy form a group."""
    out = []
    for choice in blocks.choices:
        groups: dict[str, list[str]] = {}
        for t in blocks.tasks:
            groups.setdefault(plan.ops[choice][t], []).append(t)
        out.append(from_groups(list(groups.values()), blocks.tasks))
    return out


def check_tree(plan: Plan, blocks: Blocks, *, source: str | None = None) -> None:
    """A branched plan must be a tree: tasks that share a copy shared one at every block above.

    Raises:
        MtcError: naming the block and the two tasks that merge again after splitting.
    """
    levels = plan_levels(plan, blocks)
    if is_tree(levels):
        return
    for d in range(1, len(levels)):
        for b in levels[d]:
            m = members(b)
            for i in m:
                for j in m:
                    if not any((c >> i & 1) and (c >> j & 1) for c in levels[d - 1]):
                        ti, tj = blocks.tasks[i], blocks.tasks[j]
                        raise MtcError(f"plan is not a tree: at {blocks.choices[d]} tasks '{ti}' and '{tj}' share "
                                       f"{plan.ops[blocks.choices[d]][ti]} but took different copies at "
                                       f"{blocks.choices[d - 1]} (a group can only split further down)", file=source)


def format_tree(levels: Sequence[Partition], blocks: Blocks) -> str:
    """The tree as text: one line per block, its location and its groups."""
    width = max(len(f"{c} ({loc})") for c, loc in zip(blocks.choices, blocks.locations, strict=True))
    lines = []
    for c, loc, p in zip(blocks.choices, blocks.locations, levels, strict=True):
        groups = "  ".join("{" + " ".join(blocks.tasks[i] for i in members(b)) + "}" for b in p)
        lines.append(f"{(c + ' (' + loc + ')'):<{width}}  {groups}")
    return "\n".join(lines)


def levels_json(levels: Sequence[Partition], tasks: Sequence[str]) -> list[list[list[str]]]:
    return [[[tasks[i] for i in members(b)] for b in p] for p in levels]


def parse_budget(text: str) -> str:
    """``--budget``: a size (``250000``, ``2.5e5``) or a multiple of the hard-shared model (``1.5x``)."""
    t = text.strip().lower()
    num = t[:-1] if t.endswith("x") else t
    try:
        v = float(num)
    except ValueError:
        raise ValueError(f"'{text}': expected a number or a multiple of the hard-shared model such as 1.5x") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"'{text}': a budget must be a positive finite number")
    return t


def parse_budgets(text: str) -> str:
    """``--budgets a,b,c``: budgets as for ``--budget``, comma-separated (may be empty)."""
    if not text.strip():
        return ""
    return ",".join(parse_budget(b) for b in text.split(","))


def budget_value(text: str, blocks: Blocks, unit: str) -> float:
    """A budget in ``unit``: absolute, or relative to the hard-shared model (``1.5x``)."""
    t = parse_budget(text)
    return float(t[:-1]) * blocks.shared_size(unit) if t.endswith("x") else float(t)


def check_budget(text: str, blocks: Blocks, unit: str, flag: str = "--budget") -> float:
    """The budget's value, refused when no tree fits it or when it exceeds the single-task models.

    Raises:
        MtcError: below the hard-shared model or above the single-task models (saying the limits).
    """
    v = budget_value(text, blocks, unit)
    lo, hi = blocks.shared_size(unit), blocks.separate_size(unit)
    what = "parameters" if unit == "params" else "MACs"
    limits = f"limits: {lo:,} {what} (hard-shared, 1x) to {hi:,} (the {len(blocks.tasks)} single-task models, " \
             f"{hi / lo:.2f}x)"
    if v < lo:
        raise MtcError(f"{flag} {text}: {v:,.0f} {what} is below the hard-shared model's size ({limits})")
    if v > hi:
        raise MtcError(f"{flag} {text}: {v:,.0f} {what} is above the single-task models' size ({limits})")
    return v
