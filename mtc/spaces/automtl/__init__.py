"""The AutoMTL space (Zhang et al., docs/search.md): per operator and task, the shared operator, the
task's own copy, or a skip; searched by Gumbel-softmax over the options with Eq. 3's regulariser.

Its pass is ``vcn`` (:mod:`mtc.spaces.automtl.vcn`), its plan view :class:`Policy`, its lowering modes
``warmup``/``gumbel``/``fixed`` (:mod:`mtc.spaces.automtl.lowering`), its strategy ``gumbel``
(:mod:`mtc.spaces.automtl.search`). This module imports no torch: the lowering and the search
load when first used.
"""

from __future__ import annotations

import importlib
from collections import Counter
from typing import Any

import onnx_ir as ir

from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.passes.base import Pass
from mtc.spaces import Option, Space, register_space, register_strategy
from mtc.spaces.automtl.options import STRATEGY_OPTIONS
from mtc.spaces.automtl.policy import (
    OPTIONS,
    SPACE,
    VERSION,
    Policy,
    VcnRecord,
    read_policy_document,
    vcns_of,
)
from mtc.spaces.automtl.vcn import Vcn

__all__ = ["OPTIONS", "AutoMtl", "AutoMtlControls", "Policy", "VcnRecord", "lower_supergraph", "policy_parameters",
           "set_mode", "vcns_of"]

_LAZY = {"AutoMtlControls": "lowering", "lower_supergraph": "lowering", "policy_parameters": "lowering",
         "set_mode": "lowering", "controls_of": "lowering"}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'mtc.spaces.automtl' has no attribute '{name}'")
    return getattr(importlib.import_module(f"mtc.spaces.automtl.{mod}"), name)


@register_space
class AutoMtl(Space):
    """AutoMTL's per-operator sharing (see the module docstring)."""

    name = SPACE
    version = VERSION
    help = "AutoMTL: per operator and task, the shared op, a task-specific copy or a skip"
    compile_options = (
        Option("per_task_norm", False, "AutoMTL's per-task normalisation in every option (docs/supergraph.md)"),
    )
    default_strategy = "gumbel"

    def passes(self, model: ir.Model, options: dict[str, Any], *, seed: int) -> list[Pass]:
        return [Vcn(per_task_norm=bool(options["per_task_norm"]), seed=seed)]

    def read_plan(self, data: Any, model: ir.Model, *, source: str | None = None) -> Plan:
        return read_policy_document(data, model, source=source)

    def snapshot(self, model: ir.Model) -> dict[str, Any]:
        vcns = vcns_of(model)
        op_of = {n.name: n.op_type for n in model.graph}
        tasks = sg.task_names(model)
        return {
            "vcns": {
                "count": len(vcns),
                "choices": len(vcns) * len(tasks),
                "skips": dict(sorted(Counter(v.skip for v in vcns).items())),
                # A unit is the weighted op and the norm chosen with it, e.g. "Conv+BatchNormalization".
                "units": dict(sorted(Counter("+".join(op_of.get(x, "?") for x in v.nodes) for v in vcns).items())),
            },
            "params": {"specific": sum(v.params for v in vcns) * len(tasks),
                       "skip": sum(v.skip_params for v in vcns) * len(tasks)},
        }

    def summary(self, model: ir.Model) -> dict[str, Any]:
        snap = self.snapshot(model)
        return {"vcns": snap["vcns"]["count"], "skips": snap["vcns"]["skips"], "units": snap["vcns"]["units"],
                "params_specific": snap["params"]["specific"], "params_skip": snap["params"]["skip"],
                # units that keep only shared/specific: no skip can produce their output
                "without_skip": [{"vcn": v.name, "why": v.no_skip} for v in vcns_of(model) if v.options < 3]}


register_strategy(AutoMtl, "gumbel", "AutoMTL: pre-train, then weights and policy alternately (Gumbel-softmax, "
                  "Eq. 3)", STRATEGY_OPTIONS, "mtc.spaces.automtl.search:GumbelSearch")
