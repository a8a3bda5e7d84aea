"""The compile pipeline: backbone + tasks -> supergraph."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from mtc.passes.manager import PassManager, PipelineResult, resolve

DEFAULT_PIPELINE = ("canonicalize", "cut-at-feature", "attach-heads", "vcn")


def compile_supergraph(
    model: ir.Model,
    *,
    tasks: str | Sequence[Any],
    feature: str | None = None,
    head_width: int = 256,
    per_task_norm: bool = False,
    seed: int = 0,
    passes: str | Sequence[str] = DEFAULT_PIPELINE,
    dump_dir: str | Path | None = None,
    dump_after: Sequence[str] = (),
) -> PipelineResult:
    """Run the compile pipeline on an imported backbone (in place) and return the pass records."""
    options: dict[str, dict[str, Any]] = {
        "cut-at-feature": {"feature": feature},
        "attach-heads": {"tasks": tasks, "width": head_width, "seed": seed},
        "vcn": {"per_task_norm": per_task_norm, "seed": seed},
    }
    pm = PassManager(resolve(passes, options), dump_dir=dump_dir, dump_after=dump_after)
    return pm.run(model)
