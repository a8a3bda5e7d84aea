"""Export: pruned per-task ONNX and a fused multi-task ONNX, verified against the lowering."""

from __future__ import annotations

from mtc.export.api import (
    Exported,
    VerificationError,
    export_graphs,
    load_run,
    load_source,
    plan_outputs,
    read_weights,
    verify,
    verify_against,
    write_verified,
)

__all__ = ["Exported", "VerificationError", "export_graphs", "load_run", "load_source", "plan_outputs",
           "read_weights", "verify", "verify_against", "write_verified"]
