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
    skip: str  # "identity" or "downsample"
    params: int  # parameters of the shared unit
    macs: int  # MACs of the shared unit for one stream
    skip_params: int = 0  # per task
    skip_macs: int = 0  # per task
    copies: dict[str, list[str]] = field(default_factory=dict)  # task -> copy node names


def is_supergraph(model: ir.Model) -> bool:
    return model.metadata_props.get(FORMAT_KEY) == FORMAT


def tasks_of(model: ir.Model) -> list[TaskSpec]:
    raw = model.metadata_props.get(TASKS_KEY)
    if raw is None:
        raise MtcError("the model has no tasks (compile it with mtc compile --tasks ...)")
    return [TaskSpec(**t) for t in json.loads(raw)]


def set_tasks(model: ir.Model, tasks: list[TaskSpec]) -> None:
    model.metadata_props[TASKS_KEY] = json.dumps([asdict(t) for t in tasks])


def vcns_of(model: ir.Model) -> list[VcnRecord]:
    raw = model.metadata_props.get(VCNS_KEY)
    return [VcnRecord(**r) for r in json.loads(raw)] if raw else []


def set_vcns(model: ir.Model, vcns: list[VcnRecord]) -> None:
    model.metadata_props[VCNS_KEY] = json.dumps([asdict(v) for v in vcns], separators=(",", ":"))


def options_of(model: ir.Model) -> dict[str, Any]:
    raw = model.metadata_props.get(OPTIONS_KEY)
    return json.loads(raw) if raw else {}
