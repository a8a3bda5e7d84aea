"""Export: pruned per-task ONNX and a fused multi-task ONNX, verified against the lowering."""

from __future__ import annotations

from mtc.export.api import (
    Exported,
    VerificationError,
    export_graphs,
    load_run,
    verify,
    verify_against,
    write_verified,
)

__all__ = ["Exported", "VerificationError", "export_graphs", "load_run", "verify", "verify_against",
           "write_verified"]
