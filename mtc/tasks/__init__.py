"""Tasks: the ``--tasks`` spec, task kinds (loss, metrics, Δt) and heads built as IR subgraphs.

``mtc.tasks`` itself imports neither torch nor onnx_ir: import :mod:`mtc.tasks.spec`,
:mod:`mtc.tasks.kinds`, :mod:`mtc.tasks.heads`, :mod:`mtc.tasks.losses` or
:mod:`mtc.tasks.metrics` for what you need, or use the names re-exported here (loaded on first
access).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TaskSpec": "spec",
    "parse_tasks": "spec",
    "format_tasks": "spec",
    "KINDS": "kinds",
    "TaskKind": "kinds",
    "MetricInfo": "kinds",
    "get_kind": "kinds",
    "kind_names": "kinds",
    "register_kind": "kinds",
    "relative_performance": "kinds",
    "delta_t": "kinds",
    "build_head": "heads",
    "head_prefix": "heads",
    "TASK_KEY": "heads",
    "collate_targets": "batch",
    "collate_batch": "batch",
    "Metric": "metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mtc.tasks' has no attribute '{name}'")
    return getattr(importlib.import_module(f"mtc.tasks.{module}"), name)
