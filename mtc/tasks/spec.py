"""The task list: ``--tasks name[:kind][:channels],...``.

Forms of one item:

- ``seg``: a name that is also a kind takes that kind and its default channels;
- ``seg:40``: the same with 40 channels;
- ``sem:seg``: task ``sem`` of kind ``seg`` with the default channels;
- ``sem:seg:40``: everything explicit.

Task names end up in node and tensor names (``conv3@seg``, ``head@seg/aspp6/conv1``), so they
must be identifiers (``[A-Za-z_][A-Za-z0-9_]*``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mtc.errors import MtcError
from mtc.tasks.kinds import KINDS, kind_names

__all__ = ["MAX_CHANNELS", "TaskSpec", "format_tasks", "parse_tasks", "set_tasks", "tasks_of"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIGITS = re.compile(r"[0-9]+")
#: A sanity bound: ONNX and PyTorch take larger channel counts, but no task has them (docs/errors.md).
MAX_CHANNELS = 1 << 16
_ARG = "--tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, its kind (a key of :data:`mtc.tasks.kinds.KINDS`) and output channels."""

    name: str
    kind: str
    channels: int

    def __str__(self) -> str:
        return format_tasks([self])


def _fail(msg: str, item: str | None = None) -> MtcError:
    where = f" in '{item}'" if item is not None else ""
    return MtcError(f"{_ARG}: {msg}{where}")


def _channels(text: str, item: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise _fail(f"channels must be a positive integer, got '{text}'", item)
    value = int(text)
    if value <= 0:
        raise _fail(f"channels must be a positive integer, got '{text}'", item)
    if value > MAX_CHANNELS:
        raise _fail(f"channels {value} is too large", item)
    return value


def _parse_item(item: str) -> TaskSpec:
    parts = [p.strip() for p in item.split(":")]
    if len(parts) > 3:
        raise _fail("expected name[:kind][:channels]", item)
    name = parts[0]
    if not name:
        raise _fail("empty task name", item)
    if not _IDENT.fullmatch(name):
        raise _fail(f"task name '{name}' is not an identifier ([A-Za-z_][A-Za-z0-9_]*)", item)
    kind: str | None = None
    channels: int | None = None
    if len(parts) == 2:
        # ``name:40``: a second part that cannot be a kind (kinds are identifiers) is a channel count.
        if _IDENT.fullmatch(parts[1]):
            kind = parts[1]
        else:
            channels = _channels(parts[1], item)
    elif len(parts) == 3:
        kind = parts[1]
        if not kind:
            raise _fail("empty kind", item)
        channels = _channels(parts[2], item)
    if kind is None:
        if name not in KINDS:
            raise _fail(
                f"task '{name}' is not a kind; write {name}:KIND (kinds: {', '.join(kind_names())})", item
            )
        kind = name
    if kind not in KINDS:
        raise _fail(f"unknown kind '{kind}' (known: {', '.join(kind_names())})", item)
    k = KINDS[kind]
    if channels is None:
        channels = k.default_channels
    problem = k.channels_problem(channels)
    if problem:
        raise _fail(problem, item)
    return TaskSpec(name, kind, channels)


def parse_tasks(text: str) -> list[TaskSpec]:
    """Parse a comma-separated task list.

    Args:
        text: e.g. ``"seg,depth"`` or ``"seg:seg:13,depth:depth:1,normal:normal:3"``.

    Returns:
        The tasks, in order.

    Raises:
        MtcError: one line naming ``--tasks`` and the offending item: empty list or item, a
            name that is not an identifier or (bare) not a kind, an unknown kind, a duplicate
            name, channels that are not a positive integer or do not suit the kind.
    """
    if not isinstance(text, str):
        raise _fail(f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise _fail("no tasks given (expected e.g. seg,depth)")
    tasks: list[TaskSpec] = []
    seen: set[str] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise _fail(f"empty item in '{text.strip()}'")
        spec = _parse_item(item)
        if spec.name in seen:
            raise _fail(f"duplicate task name '{spec.name}'", item)
        seen.add(spec.name)
        tasks.append(spec)
    return tasks


def format_tasks(tasks: Iterable[TaskSpec]) -> str:
    """The shortest spec that :func:`parse_tasks` reads back as ``tasks``."""
    out = []
    for t in tasks:
        k = KINDS.get(t.kind)
        default = k is not None and t.channels == k.default_channels
        if t.name == t.kind:
            out.append(t.name if default else f"{t.name}:{t.channels}")
        else:
            out.append(f"{t.name}:{t.kind}" if default else f"{t.name}:{t.kind}:{t.channels}")
    return ",".join(out)


def tasks_of(model: Any) -> list[TaskSpec] | None:
    """The tasks recorded in a model's ``mtc.tasks`` metadata, in order, or None if there are none."""
    from mtc.ir.supergraph import task_records

    recs = task_records(model)
    return None if recs is None else [TaskSpec(d["name"], d["kind"], d["channels"]) for d in recs]


def set_tasks(model: Any, tasks: Iterable[TaskSpec]) -> None:
    from mtc.ir.supergraph import TASKS_KEY, tasks_json

    model.metadata_props[TASKS_KEY] = tasks_json(list(tasks))
