"""The allocation space (Maziarz et al., "Flexible Multi-task Networks by Learning Parameter
Allocation": the Gumbel-Matrix framework).

Each mask site's channels are split into components (K blocks along its dependency group, or the
parallel branches a Concat joins); per task and component a pair of complementary logits holds the
probability that the task uses the component. Training samples a binary allocation per step
(straight-through Gumbel-softmax) jointly with the weights; the plan is the maximum-likelihood
allocation, and each task's exported model keeps only its components' channels. The tasks' binary
allocations, concatenated, are their embeddings (the paper's Figs. 5 and 6).
docs/spaces/allocation.md has every option.

This module imports no torch: the kernels and the strategy load on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.passes.base import Pass
from mtc.spaces import Space, register_space, register_strategy
from mtc.spaces.allocation.options import COMPILE_OPTIONS, GUMBEL_OPTIONS
from mtc.spaces.partition.sites import MaskSites, Site, mask_choices, space_options

SPACE = "allocation"
VERSION = 1

__all__ = ["Allocation", "components_of", "plan_from_allocation"]


def _components(k: str) -> Any:
    def info(site: Site) -> dict[str, Any]:
        if k == "branches":
            return {"components": site.branches}
        n = int(k)
        if n > site.channels:
            raise MtcError(f"--components {n} is larger than site '{site.value}' (group '{site.group}': "
                           f"{site.channels} channels)")
        # K contiguous blocks along the group's channels, sizes differing by at most one.
        return {"components": [[int(b[0]), int(b[-1]) + 1] for b in np.array_split(np.arange(site.channels), n)]}

    return info


def components_of(choice: sg.ChoicePoint) -> list[list[int]]:
    """The channels of each component of a mask choice point (``[start, stop)`` ranges expanded)."""
    return [list(range(a, b)) for a, b in choice.info["components"]]


def plan_from_allocation(model: ir.Model, allocation: dict[str, list[list[int]]], *,
                         probabilities: dict[str, list[list[float]]] | None = None,
                         info: dict[str, Any] | None = None) -> Plan:
    """The plan of a binary allocation (site -> ``[T][K]`` 0/1): each task keeps its components'
    channels. A plan keeps at least one channel per task and site, so a task allocated nothing at a
    site keeps its most probable component there (the first, without ``probabilities``)."""
    tasks = sg.task_names(model)
    masks: dict[str, dict[str, list[int]]] = {}
    used: dict[str, list[list[int]]] = {}
    for c in mask_choices(model, SPACE):
        comps = components_of(c)
        a = [list(map(int, row)) for row in allocation[c.name]]
        per = {}
        for i, t in enumerate(tasks):
            row = a[i]
            if not any(row):
                probs = (probabilities or {}).get(c.name)
                best = int(np.argmax(probs[i])) if probs is not None else 0
                row = [int(j == best) for j in range(len(comps))]
            per[t] = sorted(ch for j, on in enumerate(row) if on for ch in comps[j])
            used.setdefault(c.name, []).append(row)
        masks[c.name] = per
    total = sum(len(r) for rows in used.values() for r in rows)
    active = sum(int(v) for rows in used.values() for r in rows for v in r) / max(1, total)
    return Plan(space=SPACE, version=VERSION, masks=masks,
                info={"allocation": used, "active_fraction": round(float(active), 6), **(info or {})})


@register_space
class Allocation(Space):
    """The Gumbel-Matrix framework (see the module docstring)."""

    name = SPACE
    version = VERSION
    help = "learned allocation (Gumbel-Matrix, Maziarz et al.): per task and channel component, a binary allocation"
    compile_options = COMPILE_OPTIONS
    default_strategy = "gumbel"

    def passes(self, model: ir.Model, options: dict[str, Any], *, seed: int) -> list[Pass]:
        k = str(options["components"])
        return [MaskSites(name="allocation-masks", sites=str(options["sites"]), alternate=False,
                          task_norm=bool(options["task_norm"]), space=SPACE, version=VERSION,
                          space_options={"sites": str(options["sites"]), "components": k},
                          info=_components(k), branches=k == "branches")]

    def snapshot(self, model: ir.Model) -> dict[str, Any]:
        cs = mask_choices(model, SPACE)
        return {"allocation": {"sites": [c.name for c in cs], "channels": [c.channels for c in cs],
                               "components": [len(c.info["components"]) for c in cs]}}

    def summary(self, model: ir.Model) -> dict[str, Any]:
        return {"sites": {c.name: {"channels": c.channels, "components": len(c.info["components"])}
                          for c in mask_choices(model, SPACE)},
                "task_norm": space_options(model, SPACE).get("task_norm")}

    def describe_plan(self, model: ir.Model, plan: Plan) -> str:
        tasks = sg.task_names(model)
        alloc = plan.info.get("allocation")
        lines = []
        for c in mask_choices(model, SPACE):
            if alloc and c.name in alloc:
                per = ", ".join(f"{t} {''.join(str(v) for v in alloc[c.name][i])}" for i, t in enumerate(tasks))
            else:
                per = ", ".join(f"{t} {len(plan.masks[c.name][t])}ch" for t in tasks)
            lines.append(f"  {c.name}: {per}")
        frac = plan.info.get("active_fraction")
        head = f"active allocations {frac:.3f}" if isinstance(frac, float) else "allocation per site"
        return head + "\n" + "\n".join(lines)


register_strategy(Allocation, "gumbel", "Gumbel-Matrix: binary allocations learned with the weights (straight-through "
                  "Gumbel-softmax), budget penalty", GUMBEL_OPTIONS, "mtc.spaces.allocation.search:GumbelMatrix")
