"""The branched space (Vandenhende et al., "Branched multi-task networks: deciding what layers to
share"; docs/spaces/branched.md): shallow blocks shared by all tasks, deeper blocks split into
branches of related tasks, a tree of task groups.

The candidate branch locations are cut points of the backbone (``--locations``); the pass
``branched-blocks`` (:mod:`mtc.spaces.branched.blocks`) gives every block between two locations one
copy per task. A plan is a tree: per block, the tasks of one group pick the same copy, and a group
can only split further down. Two strategies search it: ``rsa`` (the paper's Algorithm 1: task
affinities by RSA, then the cheapest tree within a budget, found exactly; :mod:`.rsa`) and
``gumbel`` (after BMTAS: Gumbel-softmax over each block's copies with a resource loss;
:mod:`.gumbel`). This module imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from mtc.ir.plan import Plan
from mtc.passes.base import Pass
from mtc.spaces import Space, register_space, register_strategy
from mtc.spaces.branched.blocks import (
    SPACE,
    VERSION,
    BranchedBlocks,
    blocks_of,
    branched_choices,
    check_tree,
    format_tree,
    plan_levels,
    tree_to_plan,
)
from mtc.spaces.branched.options import COMPILE_OPTIONS, GUMBEL_OPTIONS, RSA_OPTIONS

if TYPE_CHECKING:
    import torch

__all__ = ["Branched", "BranchedBlocks", "blocks_of", "plan_levels", "tree_to_plan"]


@register_space
class Branched(Space):
    """Tree-shaped sharing (see the module docstring)."""

    name = SPACE
    version = VERSION
    help = "branched networks: a tree of task groups over the blocks between cut points (Vandenhende et al.)"
    compile_options = COMPILE_OPTIONS
    default_strategy = "rsa"

    def passes(self, model: ir.Model, options: dict[str, Any], *, seed: int) -> list[Pass]:
        return [BranchedBlocks(locations=str(options["locations"]))]

    def check_plan(self, plan: Plan, model: ir.Model, *, source: str | None = None) -> None:
        if branched_choices(model):
            check_tree(plan, blocks_of(model), source=source)

    def snapshot(self, model: ir.Model) -> dict[str, Any]:
        cs = branched_choices(model)
        return {"blocks": {"count": len(cs), "locations": [c.output for c in cs],
                           "copies": [len(c.options) for c in cs],
                           "params": [c.options[0].params for c in cs], "macs": [c.options[0].macs for c in cs]}}

    def summary(self, model: ir.Model) -> dict[str, Any]:
        b = blocks_of(model)
        return {"locations": b.locations, "block_params": b.params, "block_macs": b.macs,
                "hard_shared_params": b.shared_size("params"), "single_task_params": b.separate_size("params")}

    def describe_plan(self, model: ir.Model, plan: Plan) -> str:
        b = blocks_of(model)
        levels = plan_levels(plan, b)
        lines = [format_tree(levels, b)]
        p, m = b.size(levels, "params"), b.size(levels, "macs")
        lines.append(f"size: {p:,} parameters ({p / b.shared_size('params'):.2f}x the hard-shared model), "
                     f"{m:,} MACs per sample ({m / b.shared_size('macs'):.2f}x)")
        info = plan.info
        if "trees_within_budget" in info:
            lines.append(f"cost {info['cost']:.4f}; {info['trees_within_budget']:,} trees within the budget "
                         f"{info['budget']} of {info['trees_total']:,} in all, searched exactly in "
                         f"{info['search_seconds']:.3f} s ({info['search_states']:,} partial trees)")
        return "\n".join(lines)

    def init_from_baselines(self, model: ir.Model, plan: Plan, baselines: str | Path) -> dict[str, torch.Tensor]:
        from mtc.spaces.branched.baselines import init_from_single, load_single_task

        single = load_single_task(model, baselines, heads=True, flag="--init-from-baselines")
        return init_from_single(model, plan, blocks_of(model), single)


register_strategy(Branched, "rsa", "Vandenhende et al.: RSA task affinities at the locations, the best tree within a "
                  "budget (exact)", RSA_OPTIONS, "mtc.spaces.branched.rsa:RsaSearch")
register_strategy(Branched, "gumbel", "BMTAS: Gumbel-softmax over each block's copies, closed-form resource loss",
                  GUMBEL_OPTIONS, "mtc.spaces.branched.gumbel:GumbelTreeSearch")
