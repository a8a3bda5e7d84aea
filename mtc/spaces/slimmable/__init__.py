"""The slimmable space (ECMT, Aich et al., docs/spaces/slimmable.md): one multi-task supernet whose
shared encoder and task decoders have slimmable channel widths, trained once (sandwich rule with
CI-KD), then a sub-network for any compute budget and task preference (an accuracy predictor
guides an evolutionary search), exported as physically slimmed ONNX.

Every prunable channel dependency group gets a width choice (:mod:`.sites`); a plan keeps a prefix
of each group's channels. This module imports no torch: the lowering, the strategy and the export
hook load when first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from mtc.ir.plan import Plan
from mtc.passes.base import Pass
from mtc.spaces import ExportChoice, Space, register_space, register_strategy
from mtc.spaces.slimmable.config import WidthSpace
from mtc.spaces.slimmable.options import COMPILE_OPTIONS, EXPORT_OPTIONS, SPACE, STRATEGY_OPTIONS, VERSION
from mtc.spaces.slimmable.sites import BindWidths, SlimmableWidths, describe

__all__ = ["Slimmable", "WidthSpace"]


@register_space
class Slimmable(Space):
    """ECMT's controllable slimmable supernet (see the module docstring)."""

    name = SPACE
    version = VERSION
    help = "ECMT: slimmable encoder and decoder widths, one supernet for any budget and task preference"
    compile_options = COMPILE_OPTIONS
    export_options = EXPORT_OPTIONS
    default_strategy = "ecmt"

    def passes(self, model: ir.Model, options: dict[str, Any], *, seed: int) -> list[Pass]:
        return [SlimmableWidths(ratios=options["width_list"], round_to=int(options["round_to"]))]

    def bind_passes(self, model: ir.Model, plan: Plan) -> list[Pass]:
        return [BindWidths(plan=plan)]

    def snapshot(self, model: ir.Model) -> dict[str, Any]:
        d = describe(model)
        return {"width_choices": d["width_choices"], "sites": d["sites"],
                "width_list": [f"{r:g}" for r in d["width_list"]], "round_to": d["round_to"]}

    def summary(self, model: ir.Model) -> dict[str, Any]:
        return describe(model)

    def describe_plan(self, model: ir.Model, plan: Plan) -> str:
        from mtc.spaces.slimmable.cost import CostModel
        from mtc.spaces.slimmable.search import bound_full
        from mtc.spaces.slimmable.search import describe as describe_space

        space = WidthSpace.of(model)
        cost = CostModel(bound_full(model, space), space)
        cfg = space.from_plan(plan)
        return f"{describe_space(space, cost)}; the plan: {cost.macs(cfg):,} MACs"

    def export_choice(self, run: Any, model: ir.Model, options: dict[str, Any], *, device: str = "cpu",
                      deployed: Callable[[Plan], ir.Model] | None = None) -> ExportChoice:
        deploy = importlib.import_module("mtc.spaces.slimmable.deploy")
        return deploy.export_choice(run, model, options, device=device, deployed=deployed)  # type: ignore[no-any-return]


register_strategy(Slimmable, "ecmt", "ECMT: sandwich-rule training with CI-KD, accuracy predictor, HV over "
                  "preferences (Algorithms 1-3)", STRATEGY_OPTIONS, "mtc.spaces.slimmable.search:EcmtSearch")
