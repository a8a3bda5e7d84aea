"""AutoMTL's view of format 2: VCN records and the discrete policy (its plan).

A VCN is an op choice with the options ``shared``, ``specific`` and ``skip`` (in the order of the
policy logits: AutoMTL's P = 0, 1, 2). :class:`Policy` holds the option index per VCN and task and
converts to and from the generic :class:`mtc.ir.plan.Plan`; ``policy.json`` of v1 (``{"policy":
{vcn: {task: option}}}``) is read as such a plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan

SPACE = "automtl"
VERSION = 1
#: the three options of a VCN, in the order of the policy logits (AutoMTL: P = 0, 1, 2)
OPTIONS = ("shared", "specific", "skip")


@dataclass
class VcnRecord:
    """One virtual computation node: a weighted operator and the normalisation that follows it."""

    name: str
    depth: int  # 1-based position among VCNs in topological order (l in AutoMTL Eq. 3)
    nodes: list[str]  # the shared unit's nodes
    input: str
    output: str
    gate: str
    policy: str  # initializer holding the [tasks, 3] logits
    skip: str  # "identity", "downsample" (1x1 conv + BN) or "select" (strided slice + channel gather)
    params: int  # parameters of the shared unit
    macs: int  # MACs of the shared unit for one stream
    skip_params: int = 0  # per task
    skip_macs: int = 0  # per task
    copies: dict[str, list[str]] = field(default_factory=dict)  # task -> copy node names
    options: int = 3  # 2 when no skip can match the unit's output (skip == "none")
    no_skip: str = ""  # why, then


def is_vcn(c: sg.ChoicePoint) -> bool:
    return c.kind == "op" and c.info.get("space") == SPACE


def vcns_of(model: ir.Model) -> list[VcnRecord]:
    """The VCNs of an AutoMTL supergraph, in topological order (depths 1..L)."""
    out = []
    vcns = [c for c in sg.choices_of(model, "op") if is_vcn(c)]
    for depth, c in enumerate(vcns, start=1):
        shared, specific = c.option("shared"), c.option("specific")
        skip = c.option("skip") if "skip" in c.option_names else None
        copies = {t: list(v) for t, v in dict(specific.nodes).items()}  # type: ignore[arg-type]
        for t, v in shared.info.get("task_nodes", {}).items():
            copies.setdefault(t, []).extend(v)
        out.append(VcnRecord(
            name=c.name, depth=depth, nodes=list(c.info.get("unit", shared.nodes)), input=c.input, output=c.output,
            gate=c.node, policy=c.logits or f"{c.name}.policy",
            skip=str(skip.info.get("skip", "identity")) if skip is not None else "none",
            params=shared.params, macs=shared.macs, skip_params=skip.params if skip else 0,
            skip_macs=skip.macs if skip else 0, copies=copies, options=len(c.options),
            no_skip=str(c.info.get("no_skip", ""))))
    return out


@dataclass
class Policy:
    """A discrete sharing policy: for every VCN and task, the option index (0 shared, 1 specific, 2 skip)."""

    choices: dict[str, dict[str, int]]

    @classmethod
    def uniform(cls, model: ir.Model, option: int | str) -> Policy:
        """Every task and VCN on one option. Raises MtcError for ``skip`` when a VCN has none."""
        idx = OPTIONS.index(option) if isinstance(option, str) else int(option)
        tasks = sg.task_names(model)
        vcns = vcns_of(model)
        lacking = [v for v in vcns if idx >= v.options]
        if lacking:
            raise MtcError(f"VCN '{lacking[0].name}' has no option '{OPTIONS[idx]}' ({lacking[0].no_skip})")
        return cls({v.name: dict.fromkeys(tasks, idx) for v in vcns})

    @classmethod
    def random(cls, model: ir.Model, seed: int = 0, p: Sequence[float] = (1 / 3, 1 / 3, 1 / 3)) -> Policy:
        """Options drawn with probabilities ``p`` (renormalised over a VCN's options)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        tasks = sg.task_names(model)
        out = {}
        for v in vcns_of(model):
            q = np.asarray(p[:v.options], dtype=np.float64)
            out[v.name] = {t: int(rng.choice(v.options, p=q / q.sum())) for t in tasks}
        return cls(out)

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str | None = None) -> Policy:
        """Read ``{"vcn": {"task": "shared" | "specific" | "skip" | 0 | 1 | 2}}``."""
        out: dict[str, dict[str, int]] = {}
        try:
            for vcn, per_task in data.items():
                out[vcn] = {t: OPTIONS.index(c) if isinstance(c, str) else int(c) for t, c in per_task.items()}
        except (ValueError, AttributeError, TypeError) as e:
            raise MtcError(f"not a policy: {e} (expected {{vcn: {{task: shared|specific|skip}}}})",
                           file=source) from None
        return cls(out)

    def to_json(self) -> dict[str, dict[str, str]]:
        return {v: {t: OPTIONS[c] for t, c in per.items()} for v, per in self.choices.items()}

    def to_plan(self, info: dict[str, Any] | None = None) -> Plan:
        bad = [(v, t, c) for v, per in self.choices.items() for t, c in per.items() if c not in (0, 1, 2)]
        if bad:
            v, t, c = bad[0]
            raise MtcError(f"policy for VCN '{v}', task '{t}': option {c} is not 0, 1 or 2")
        return Plan(space=SPACE, version=VERSION, ops=self.to_json(), info=dict(info or {}))

    @classmethod
    def from_plan(cls, plan: Plan) -> Policy:
        return cls({v: {t: OPTIONS.index(o) for t, o in per.items()} for v, per in plan.ops.items()})

    def validate(self, model: ir.Model, *, source: str | None = None) -> None:
        """The policy names exactly the supergraph's VCNs and tasks, with options 0..2."""
        tasks = sg.task_names(model)
        records = {v.name: v for v in vcns_of(model)}
        vcns = list(records)
        missing = [v for v in vcns if v not in self.choices]
        extra = [v for v in self.choices if v not in set(vcns)]
        if missing or extra:
            what = f"missing VCN '{missing[0]}'" if missing else f"unknown VCN '{extra[0]}'"
            raise MtcError(f"policy does not match the supergraph: {what} ({len(vcns)} VCNs expected)", file=source)
        for v, per in self.choices.items():
            if sorted(per) != sorted(tasks):
                raise MtcError(f"policy for VCN '{v}' names tasks {sorted(per)}, the supergraph has {sorted(tasks)}",
                               file=source)
            bad = [t for t, c in per.items() if c not in (0, 1, 2)]
            if bad:
                raise MtcError(f"policy for VCN '{v}', task '{bad[0]}': option {per[bad[0]]} is not 0, 1 or 2",
                               file=source)
            no = [t for t, c in per.items() if c >= records[v].options]
            if no:
                raise MtcError(f"policy for VCN '{v}', task '{no[0]}': the VCN has no skip ({records[v].no_skip})",
                               file=source)


def read_policy_document(data: Any, model: ir.Model, *, source: str | None = None) -> Plan:
    """A plan from a format-2 plan document or a v1 ``policy.json`` (``{"policy": {...}}`` or the bare
    ``{vcn: {task: option}}``)."""
    if isinstance(data, dict) and "format" in data:
        return Plan.from_json(data, source=source)
    if not isinstance(data, dict):
        raise MtcError("not a plan or policy: expected a JSON object", file=source)
    pol = Policy.from_json(data.get("policy", data), source=source)
    pol.validate(model, source=source)
    return pol.to_plan()
