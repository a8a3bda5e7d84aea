"""Plans: the discrete decision for every choice point of a supergraph (docs/supergraph.md).

A plan is one JSON document::

    {"format": "mtc.plan/1", "space": "automtl", "version": 1,
     "ops":    {"conv3": {"seg": "shared", "depth": "skip"}, ...},      # op choice -> task -> option
     "masks":  {"layer3/relu": {"seg": [0, 1, 5], "depth": [2, 3]}},    # mask choice -> task -> kept channels
     "widths": {"layer2/relu": {"*": 48}, "head@seg/relu": {"seg": 96}}, # width choice -> "*" or task -> channels
     "info":   {...}}                                                    # free: what the strategy reports

``ops``, ``masks`` and ``widths`` must cover exactly the supergraph's choice points of their kind;
:meth:`Plan.validate` says which choice point is wrong in one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg

PLAN_FORMAT = "mtc.plan/1"
ALL_TASKS = "*"


@dataclass
class Plan:
    """A decision for every choice point (see the module docstring)."""

    space: str
    version: int = 1
    ops: dict[str, dict[str, str]] = field(default_factory=dict)
    masks: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    widths: dict[str, dict[str, int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    # --- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": PLAN_FORMAT, "space": self.space, "version": self.version}
        for key in ("ops", "masks", "widths"):
            val = getattr(self, key)
            if val:
                out[key] = val
        if self.info:
            out["info"] = self.info
        return out

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None) -> Plan:
        """Read a plan document (the module docstring's form).

        Raises:
            MtcError: not a plan, or a field of the wrong type (naming it).
        """
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise MtcError(f"not a plan: expected a JSON object with \"format\": \"{PLAN_FORMAT}\"", file=source)
        space = data.get("space")
        if not isinstance(space, str) or not space:
            raise MtcError("not a plan: 'space' must name a search space", file=source)
        version = data.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise MtcError(f"not a plan: 'version' must be an integer, got {version!r}", file=source)

        def table(key: str, leaf: Any) -> dict[str, dict[str, Any]]:
            raw = data.get(key, {})
            if not isinstance(raw, Mapping):
                raise MtcError(f"plan field '{key}' must map choice points to tasks", file=source)
            out: dict[str, dict[str, Any]] = {}
            for cp, per in raw.items():
                if not isinstance(per, Mapping):
                    raise MtcError(f"plan '{key}' of choice point '{cp}' must map tasks to decisions", file=source)
                out[str(cp)] = {}
                for t, v in per.items():
                    ok, val = leaf(v)
                    if not ok:
                        raise MtcError(f"plan '{key}' of choice point '{cp}', task '{t}': {val}", file=source)
                    out[str(cp)][str(t)] = val
            return out

        def option(v: Any) -> tuple[bool, Any]:
            return (True, v) if isinstance(v, str) else (False, f"expected an option name, got {v!r}")

        def indices(v: Any) -> tuple[bool, Any]:
            if isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                return True, [int(i) for i in v]
            return False, f"expected a list of channel indices, got {v!r}"

        def count(v: Any) -> tuple[bool, Any]:
            if isinstance(v, int) and not isinstance(v, bool):
                return True, int(v)
            return False, f"expected a channel count, got {v!r}"

        info = data.get("info", {})
        return cls(space=space, version=version, ops=table("ops", option), masks=table("masks", indices),
                   widths=table("widths", count), info=dict(info) if isinstance(info, Mapping) else {})

    # --- validation ------------------------------------------------------------------------------
    def validate(self, model: ir.Model, *, source: str | None = None) -> None:
        """The plan decides exactly the supergraph's choice points, for its tasks, within range.

        Raises:
            MtcError: one line naming the choice point (and task) that does not fit.
        """
        tasks = sg.task_names(model)
        choices = sg.choices_of(model)

        def fail(msg: str) -> MtcError:
            return MtcError(f"plan does not match the supergraph: {msg}", file=source)

        tables: tuple[tuple[str, dict[str, dict[str, Any]]], ...] = (
            ("op", self.ops), ("mask", self.masks), ("width", self.widths))
        for kind, table in tables:
            mine = [c for c in choices if c.kind == kind]
            names = {c.name for c in mine}
            missing = [c.name for c in mine if c.name not in table]
            extra = [n for n in table if n not in names]
            if missing:
                raise fail(f"no decision for {kind} choice '{missing[0]}' ({len(mine)} {kind} choices expected)")
            if extra:
                other = next((c.kind for c in choices if c.name == extra[0]), None)
                why = f"it is a {other} choice" if other else "no such choice point"
                raise fail(f"unknown {kind} choice '{extra[0]}' ({why})")
            for c in mine:
                per = table[c.name]
                if kind == "width" and not c.per_task:
                    if set(per) != {ALL_TASKS}:
                        raise fail(f"width choice '{c.name}' is one for all tasks: give {{\"{ALL_TASKS}\": N}}")
                elif sorted(per) != sorted(tasks):
                    raise fail(f"{kind} choice '{c.name}' names tasks {sorted(per)}, the supergraph has {sorted(tasks)}")
                for t, v in per.items():
                    if kind == "op":
                        self._check_option(c, t, v, fail)
                    elif kind == "mask":
                        if not v or sorted(set(v)) != v or v[0] < 0 or v[-1] >= c.channels:
                            raise fail(f"mask choice '{c.name}', task '{t}': the kept channels must be distinct, "
                                       f"sorted and in 0..{c.channels - 1}, at least one")
                    elif not 1 <= v <= c.channels or (c.widths and v not in c.widths):
                        allowed = f"one of {c.widths}" if c.widths else f"1..{c.channels}"
                        raise fail(f"width choice '{c.name}', task '{t}': {v} channels, expected {allowed}")

    @staticmethod
    def _check_option(c: sg.ChoicePoint, task: str, name: str, fail: Any) -> None:
        names = c.option_names
        if name not in names:
            raise fail(f"op choice '{c.name}', task '{task}': option '{name}' is not one of {', '.join(names)}")
        o = c.option(name)
        if o.tasks is not None and task not in o.tasks:
            raise fail(f"op choice '{c.name}', task '{task}': option '{name}' serves only {', '.join(o.tasks)}")


def read_plan_file(path: str | os.PathLike[str]) -> Any:
    """The JSON document of a plan file (parsed, not yet validated).

    Raises:
        MtcError: the file is missing or not JSON.
    """
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MtcError(f"cannot read the plan: {e}", file=str(p)) from None


def reference_plan(model: ir.Model, space: str = "reference") -> Plan:
    """The plan that computes the backbone with every task's head: the first option of every op
    choice (the shared operator, the original block), every channel at every mask and width."""
    tasks = sg.task_names(model)
    plan = Plan(space=space)
    for c in sg.choices_of(model):
        if c.kind == "op":
            plan.ops[c.name] = dict.fromkeys(tasks, c.options[0].name)
        elif c.kind == "mask":
            plan.masks[c.name] = {t: list(range(c.channels)) for t in tasks}
        else:
            full = max(c.widths) if c.widths else c.channels
            plan.widths[c.name] = dict.fromkeys(tasks, full) if c.per_task else {ALL_TASKS: full}
    return plan
