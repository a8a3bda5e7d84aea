"""The generic part of the compile pipeline: backbone -> backbone with one head per task.

A space's passes follow (``mtc.spaces.compile_supergraph``); without them the result is the plain
multi-task network every task shares completely (the hard-shared baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from mtc.passes.manager import PassManager, PipelineResult, resolve

GENERIC_PIPELINE = ("canonicalize", "cut-at-feature", "attach-heads")


def prepare_options(*, tasks: str | Sequence[Any], feature: str | None = None, head_width: int = 256,
                    seed: int = 0) -> dict[str, dict[str, Any]]:
    """The options of the generic passes, keyed by pass name (for :func:`resolve`)."""
    return {
        "cut-at-feature": {"feature": feature},
        "attach-heads": {"tasks": tasks, "width": head_width, "seed": seed},
    }


def prepare_multitask(model: ir.Model, *, tasks: str | Sequence[Any], feature: str | None = None,
                      head_width: int = 256, seed: int = 0) -> PipelineResult:
    """Canonicalise ``model``, cut it at its feature and attach one head per task (in place)."""
    opts = prepare_options(tasks=tasks, feature=feature, head_width=head_width, seed=seed)
    return PassManager(resolve(list(GENERIC_PIPELINE), opts)).run(model)
