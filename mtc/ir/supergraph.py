"""The supergraph format 2 (``mtc.supergraph/2``): constants, choice points and queries.

A supergraph is a valid ONNX model (docs/supergraph.md) encoding a backbone, one head per task and
a search space. Its custom constructs are nodes in domain ``ai.mtc``:

- ``Fork``: the input replicated into one stream per task, stacked along the batch axis
  (task-major: rows ``[i*N, (i+1)*N)`` belong to task ``i``). Ops without parameters downstream
  run once on all streams.
- ``TaskSlice``: one task's stream (``N`` rows) of a stacked tensor.
- ``CopyOf``: a copy of a shared initializer owned by one task or by one option of a choice; not
  stored: a reader makes a new tensor initialised from the source.
- ``Gate``: an *op choice*: per task, one of ``K`` options (the shared operator, a copy, a skip, a
  branch's copy of a block), restacked. Inputs option-major (option ``k``, task ``i`` at
  ``k*T + i``), then optionally the ``[T, K]`` logits of a gradient-based strategy.
- ``Mask``: per-task channel masks over a channel dependency group: ``(x, mask[T, C])``.
- ``Width``: a width choice over a channel dependency group (a prefix of the channels is kept),
  one for all tasks or one per task.

A *choice point* is one of these decisions, recorded in ``metadata_props["mtc.choices"]`` (JSON,
:class:`ChoicePoint`); a *plan* (:mod:`mtc.ir.plan`) decides every choice point. What a search space
adds beyond that (its name, version and compile options) is ``metadata_props["mtc.space"]``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx_ir as ir

from mtc.errors import MtcError

DOMAIN = "ai.mtc"
DOMAIN_VERSION = 2
FORMAT = "mtc.supergraph/2"
#: Formats of earlier releases: recognised only to say what to do with them.
OLD_FORMATS = ("mtc.supergraph/1",)

FORMAT_KEY = "mtc.format"
TASKS_KEY = "mtc.tasks"
FEATURE_KEY = "mtc.feature"
CHOICES_KEY = "mtc.choices"
SPACE_KEY = "mtc.space"
#: Node metadata on the Concat that ``specialize`` puts where a Gate or Mask was: the choice's name.
#: Export reads it to know the Concat joins stream groups (not data), so it must never be renamed away.
MERGE_KEY = "mtc.merge"
#: Model metadata of a graph specialised to a plan: the plan's JSON.
PLAN_KEY = "mtc.plan"

#: Option scopes: an option computed once on the stacked tensor (it may serve any task that picks
#: it), or one subgraph per task on that task's slice.
STACKED = "stacked"
PER_TASK = "task"

CHOICE_KINDS = ("op", "mask", "width")


@dataclass
class OptionRecord:
    """One option of an op choice.

    Attributes:
        name: unique within its choice (``shared``, ``specific``, ``skip``, ``copy1``, ...).
        scope: :data:`STACKED` (``nodes`` is a list run on the stacked input) or :data:`PER_TASK`
            (``nodes`` maps each task to the nodes of its own subgraph on its slice).
        nodes: the option's nodes (see ``scope``).
        entry: for a stacked option, the nodes that read the choice's input (where ``specialize``
            restricts the option to the tasks that pick it).
        params: parameters of one instance of the option (per task for a per-task option).
        macs: MACs of one instance for one sample.
        tasks: the tasks that may pick it (None: every task).
        info: space-specific facts (AutoMTL's skip kind, say), JSON scalars only.
    """

    name: str
    scope: str
    nodes: list[str] | dict[str, list[str]]
    entry: list[str] = field(default_factory=list)
    params: int = 0
    macs: int = 0
    tasks: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChoicePoint:
    """A decision the search makes, as recorded in ``mtc.choices``.

    Common attributes: ``kind`` (``op``, ``mask`` or ``width``), ``name`` (unique), ``node`` (the
    ``Gate``, ``Mask`` or ``Width`` node), ``input`` / ``output`` (stacked tensors), ``depth``
    (1-based position among the graph's choices of its kind, in topological order).

    Op choices: ``options`` (:class:`OptionRecord`), ``logits`` (the ``[T, K]`` initializer, or
    None). Mask and width choices: ``channels`` (C on ``axis``), ``group`` (the channel group it
    covers, when known: the tensors that must keep the same channels), ``per_task`` (width: one
    width per task rather than one for all), ``widths`` (width: the allowed channel counts).
    """

    kind: str
    name: str
    node: str
    input: str
    output: str
    depth: int = 0
    options: list[OptionRecord] = field(default_factory=list)
    logits: str | None = None
    axis: int = 1
    channels: int = 0
    group: list[str] = field(default_factory=list)
    per_task: bool = True
    widths: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str) -> OptionRecord:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

    @property
    def option_names(self) -> list[str]:
        return [o.name for o in self.options]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        # Fields that do not apply to the kind stay out, so the metadata reads like the docs.
        if self.kind == "op":
            for k in ("axis", "channels", "group", "per_task", "widths"):
                d.pop(k)
        else:
            d.pop("options")
            d.pop("logits")
            if self.kind == "mask":
                d.pop("widths")
                d.pop("per_task")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChoicePoint:
        d = dict(d)
        d["options"] = [OptionRecord(**o) for o in d.get("options", [])]
        return cls(**d)


def format_of(model: ir.Model) -> str | None:
    return model.metadata_props.get(FORMAT_KEY)


def is_supergraph(model: ir.Model) -> bool:
    return format_of(model) == FORMAT


def check_format(model: ir.Model, *, file: str | None = None) -> None:
    """Refuse a supergraph of an older format with a line that says what to do.

    Raises:
        MtcError: ``model`` is a supergraph of a format this release no longer reads, or not a
            supergraph at all.
    """
    fmt = format_of(model)
    if fmt in OLD_FORMATS:
        raise MtcError(f"a supergraph of format {fmt}, which this mtc no longer reads: recompile the backbone "
                       "with mtc compile (format 2 records choice points and plans)", file=file)
    if fmt != FORMAT:
        raise MtcError("not a supergraph: compile the backbone first (mtc compile --tasks ...)", file=file)


# ------------------------------------------------------------------------------------------ tasks
def task_records(model: ir.Model) -> list[dict[str, Any]] | None:
    """``mtc.tasks``: ``[{"name", "kind", "channels"}, ...]`` in task order, or None."""
    text = model.metadata_props.get(TASKS_KEY)
    if text is None:
        return None
    try:
        raw = json.loads(text)
        return [{"name": str(d["name"]), "kind": str(d["kind"]), "channels": int(d["channels"])} for d in raw]
    except (ValueError, TypeError, KeyError) as e:
        raise MtcError(f"metadata '{TASKS_KEY}' is not a task list ({type(e).__name__}: {e})") from None


def task_names(model: ir.Model) -> list[str]:
    return [d["name"] for d in task_records(model) or []]


def tasks_json(tasks: Sequence[Any]) -> str:
    """The ``mtc.tasks`` metadata for objects with ``name``, ``kind`` and ``channels``."""
    return json.dumps([{"name": t.name, "kind": t.kind, "channels": t.channels} for t in tasks])


# ---------------------------------------------------------------------------------------- choices
def choices_of(model: ir.Model, kind: str | None = None) -> list[ChoicePoint]:
    """The choice points, in the order recorded (topological within each kind)."""
    raw = model.metadata_props.get(CHOICES_KEY)
    if not raw:
        return []
    try:
        out = [ChoicePoint.from_json(d) for d in json.loads(raw)]
    except (ValueError, TypeError, KeyError) as e:
        raise MtcError(f"metadata '{CHOICES_KEY}' is not a list of choice points ({type(e).__name__}: {e})") from None
    return [c for c in out if kind is None or c.kind == kind]


def set_choices(model: ir.Model, choices: Sequence[ChoicePoint]) -> None:
    names = [c.name for c in choices]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise MtcError(f"two choice points are named '{dup}'")
    model.metadata_props[CHOICES_KEY] = json.dumps([c.to_json() for c in choices], separators=(",", ":"))


def add_choices(model: ir.Model, new: Sequence[ChoicePoint]) -> None:
    """Append choice points (spaces compose: op choices and masks in one graph), renumbering depths."""
    allc = choices_of(model) + list(new)
    for kind in CHOICE_KINDS:
        for d, c in enumerate((c for c in allc if c.kind == kind), start=1):
            c.depth = d
    set_choices(model, allc)


def space_of(model: ir.Model) -> dict[str, Any]:
    """``mtc.space``: ``{"name", "version", "options"}`` of the space that compiled the graph
    (``"spaces"``: every space that inserted choice points, in order)."""
    raw = model.metadata_props.get(SPACE_KEY)
    return json.loads(raw) if raw else {}


def set_space(model: ir.Model, name: str, version: int, options: dict[str, Any]) -> None:
    """Record the space (``options`` must be JSON scalars). A second space adds to ``spaces``."""
    cur = space_of(model)
    spaces = list(cur.get("spaces", []))
    spaces.append({"name": name, "version": int(version), "options": options})
    head = spaces[0]
    model.metadata_props[SPACE_KEY] = json.dumps({**head, "spaces": spaces}, sort_keys=True)


def mark_supergraph(model: ir.Model) -> None:
    """Declare the format and the ``ai.mtc`` domain (idempotent)."""
    model.metadata_props[FORMAT_KEY] = FORMAT
    model.opset_imports[DOMAIN] = DOMAIN_VERSION


# -------------------------------------------------------------------------------------- summary
def summarize_supergraph(model: ir.Model) -> dict[str, Any]:
    """Tasks, choice points, search-space size, parameters per part and MACs per sample.

    Parameters: ``shared`` (the nodes every task can run: backbone, stacked options), ``options``
    (per-task copies and per-task options, for all tasks) and ``heads``. MACs: per task, the
    task's path when every op choice picks its first option (``first``: AutoMTL's all-shared) and
    its cheapest path (``cheapest``); in total, all tasks on one stream (``all_shared``) and one
    full path per task (``all_specific``).
    """
    import math

    from mtc.ir.cost import node_cost, param_inputs
    from mtc.ir.names import TASK_KEY, head_prefix

    tasks = task_names(model)
    choices = choices_of(model)
    ops = [c for c in choices if c.kind == "op"]
    head_params = dict.fromkeys(tasks, 0)
    head_macs = dict.fromkeys(tasks, 0)
    shared_params = trunk_macs = 0
    seen: set[int] = set()
    for n in model.graph:
        if n.domain == DOMAIN:
            continue
        task = n.metadata_props.get(TASK_KEY)
        name = n.name or ""
        is_head = task is not None and name.startswith(head_prefix(task) + "/")
        if task is not None and not is_head:
            continue  # a task's own option: counted from the records below
        fresh = 0
        for v in param_inputs(n):
            if id(v) not in seen:
                seen.add(id(v))
                t = v.const_value
                assert t is not None  # param_inputs only returns initializers that hold a tensor
                fresh += math.prod(t.shape.numpy())
        macs = node_cost(n).macs
        if is_head:
            assert task is not None
            head_params[task] += fresh
            head_macs[task] += macs
        else:
            shared_params += fresh
            trunk_macs += macs
    # Copies are CopyOf nodes, not initializers: options are counted from the records. The trunk
    # MACs above count each stacked option once; a task runs exactly one option per choice.
    option_params = first_delta = cheapest_delta = 0
    for c in ops:
        first = c.options[0]
        for o in c.options[1:]:
            option_params += o.params * (len(tasks) if o.scope == PER_TASK else 1)
        stacked_sum = sum(o.macs for o in c.options if o.scope == STACKED)
        first_delta += first.macs - stacked_sum
        cheapest_delta += min(o.macs for o in c.options) - stacked_sum
    points = sum(len(tasks) for _ in ops)
    log10 = sum(len(tasks) * math.log10(max(1, len(c.options))) for c in ops)
    per_task = {t: {"first": trunk_macs + first_delta + head_macs[t],
                    "cheapest": trunk_macs + cheapest_delta + head_macs[t]} for t in tasks}
    one_path = trunk_macs + first_delta
    return {
        "tasks": task_records(model) or [],
        "space": space_of(model),
        "choices": {k: sum(1 for c in choices if c.kind == k) for k in CHOICE_KINDS},
        "search_space": {"choices": points, "log10_size": round(log10, 2)},
        "params": {"shared": shared_params, "options": option_params, "heads": sum(head_params.values()),
                   "heads_per_task": head_params},
        "macs": {
            "per_task": per_task,
            "total": {"all_shared": one_path + sum(head_macs.values()),
                      "all_specific": len(tasks) * one_path + sum(head_macs.values())},
        },
    }
