"""The supergraph format: constants, metadata and queries (see docs/supergraph.md).

A supergraph is a valid ONNX model. Its custom constructs are nodes in domain ``ai.mtc``:

- ``Fork``: the input replicated into one stream per task, stacked along the batch axis
  (task-major: rows ``[i*N, (i+1)*N)`` belong to task ``i``). Every activation downstream of it
  is such a stacked tensor, so ops without parameters run once on all streams.
- ``TaskSlice``: one task's stream (``N`` rows) of a stacked tensor.
- ``CopyOf``: a task-specific copy of a shared initializer. It is not stored: the lowering makes a
  new parameter initialised from the source (so a 5-task supergraph is barely larger than the
  backbone).
- ``Gate``: a virtual computation node's choice. Inputs: the shared option, the task-specific
  option and the skip option per task, then the policy logits; output: the stacked stream of
  every task's selected (or mixed) option.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.tasks.spec import TaskSpec

DOMAIN = "ai.mtc"
DOMAIN_VERSION = 1
FORMAT = "mtc.supergraph/1"

FORMAT_KEY = "mtc.format"
TASKS_KEY = "mtc.tasks"
VCNS_KEY = "mtc.vcns"
FEATURE_KEY = "mtc.feature"
OPTIONS_KEY = "mtc.options"
#: Node metadata on the Concat that ``specialize`` puts where a Gate was: the VCN's name. Export
#: reads it to know the Concat joins stream groups (not data), so it must never be renamed away.
MERGE_KEY = "mtc.merge"

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


def is_supergraph(model: ir.Model) -> bool:
    return model.metadata_props.get(FORMAT_KEY) == FORMAT


def tasks_json(tasks: Sequence[TaskSpec]) -> str:
    """The ``mtc.tasks`` metadata: ``[{"name": .., "kind": .., "channels": ..}, ...]`` in task order."""
    return json.dumps([{"name": t.name, "kind": t.kind, "channels": t.channels} for t in tasks])


def tasks_of(model: ir.Model) -> list[TaskSpec] | None:
    """The tasks recorded in ``model.metadata_props["mtc.tasks"]``, or None if there are none."""
    text = model.metadata_props.get(TASKS_KEY)
    if text is None:
        return None
    try:
        return [TaskSpec(str(d["name"]), str(d["kind"]), int(d["channels"])) for d in json.loads(text)]
    except (ValueError, TypeError, KeyError) as e:
        raise MtcError(f"metadata '{TASKS_KEY}' is not a task list ({type(e).__name__}: {e})") from None


def set_tasks(model: ir.Model, tasks: Sequence[TaskSpec]) -> None:
    model.metadata_props[TASKS_KEY] = tasks_json(tasks)


def vcns_of(model: ir.Model) -> list[VcnRecord]:
    raw = model.metadata_props.get(VCNS_KEY)
    return [VcnRecord(**r) for r in json.loads(raw)] if raw else []


def set_vcns(model: ir.Model, vcns: list[VcnRecord]) -> None:
    model.metadata_props[VCNS_KEY] = json.dumps([asdict(v) for v in vcns], separators=(",", ":"))


def options_of(model: ir.Model) -> dict[str, Any]:
    raw = model.metadata_props.get(OPTIONS_KEY)
    return json.loads(raw) if raw else {}


def summarize_supergraph(model: ir.Model) -> dict[str, Any]:
    """Tasks, VCNs, search-space size, parameters per part and MACs at the sharing extremes.

    MACs are per sample. "All shared" runs one backbone stream plus every head; "all specific"
    runs one backbone copy per task plus every head (the two ends of the AutoMTL search space).
    """
    import math

    from mtc.ir.cost import node_cost
    from mtc.tasks.heads import TASK_KEY, head_prefix

    tasks = tasks_of(model) or []
    vcns = vcns_of(model)
    names = [t.name for t in tasks]
    head_params = dict.fromkeys(names, 0)
    head_macs = dict.fromkeys(names, 0)
    shared_params = shared_macs = 0
    seen: set[int] = set()
    from mtc.ir.cost import param_inputs

    for n in model.graph:
        if n.domain == DOMAIN:
            continue
        task = n.metadata_props.get(TASK_KEY)
        c = node_cost(n)
        fresh = 0
        for v in param_inputs(n):
            if id(v) not in seen:
                seen.add(id(v))
                t = v.const_value
                assert t is not None  # param_inputs only returns initializers that hold a tensor
                fresh += math.prod(t.shape.numpy())
        if task is None:
            shared_params += fresh
            shared_macs += c.macs
        else:
            assert n.name is not None  # verify() guarantees every node is named
            if not n.name.startswith(head_prefix(task) + "/"):
                continue
            head_params[task] += fresh
            head_macs[task] += c.macs
    specific = sum(v.params for v in vcns) * len(tasks)
    skip = sum(v.skip_params for v in vcns) * len(tasks)
    points = len(vcns) * len(tasks)
    return {
        "tasks": [asdict(t) for t in tasks],
        "vcns": len(vcns),
        "search_space": {"choices": points, "log10_size": round(points * math.log10(3), 2) if points else 0.0},
        "params": {"shared": shared_params, "specific": specific, "skip": skip,
                   "heads": sum(head_params.values()), "heads_per_task": head_params},
        "macs": {
            "per_task": {t: {"all_shared": shared_macs + head_macs[t], "all_specific": shared_macs + head_macs[t]}
                         for t in names},
            "total": {"all_shared": shared_macs + sum(head_macs.values()),
                      "all_specific": len(tasks) * shared_macs + sum(head_macs.values())},
        },
        "options": options_of(model),
    }


@dataclass
class Policy:
    """A discrete sharing policy: for every VCN and task, the option index (0 shared, 1 specific, 2 skip)."""

    choices: dict[str, dict[str, int]]

    @classmethod
    def uniform(cls, model: ir.Model, option: int | str) -> Policy:
        idx = OPTIONS.index(option) if isinstance(option, str) else int(option)
        tasks = [t.name for t in tasks_of(model) or []]
        return cls({v.name: dict.fromkeys(tasks, idx) for v in vcns_of(model)})

    @classmethod
    def random(cls, model: ir.Model, seed: int = 0, p: Sequence[float] = (1 / 3, 1 / 3, 1 / 3)) -> Policy:
        import numpy as np

        rng = np.random.default_rng(seed)
        tasks = [t.name for t in tasks_of(model) or []]
        return cls({v.name: {t: int(rng.choice(3, p=list(p))) for t in tasks} for v in vcns_of(model)})

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

    def validate(self, model: ir.Model, *, source: str | None = None) -> None:
        """The policy names exactly the supergraph's VCNs and tasks, with options 0..2."""
        tasks = [t.name for t in tasks_of(model) or []]
        vcns = [v.name for v in vcns_of(model)]
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
