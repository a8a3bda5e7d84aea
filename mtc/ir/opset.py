"""Convert a model to mtc's one target opset of the default ONNX domain."""

from __future__ import annotations

import onnx
import onnx.version_converter
import onnx_ir as ir

from mtc.errors import MtcError

#: Every model is converted to this opset at import (ONNX 18: Resize with `axes`, Split with
#: `num_outputs`, Reduce* with axes as an input).
TARGET_OPSET = 18
MIN_OPSET = 17
MIN_INPUT_OPSET = 11


def opset_of(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def convert_opset(model: ir.Model, target: int = TARGET_OPSET, *, file: str | None = None) -> ir.Model:
    """Return ``model`` with its default-domain opset set to ``target`` (converting ops as needed)."""
    if target < MIN_OPSET:
        raise MtcError(f"--opset {target} is too old: mtc targets opset {MIN_OPSET} or newer", file=file)
    current = opset_of(model)
    if current == target:
        return model
    if current < MIN_INPUT_OPSET:
        raise MtcError(f"opset {current} is too old: mtc imports opset {MIN_INPUT_OPSET} or newer", file=file)
    try:
        proto = onnx.version_converter.convert_version(ir.to_proto(model), target)
    except Exception as e:  # the converter raises bare RuntimeErrors with C++ messages
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MtcError(f"cannot convert from opset {current} to {target}: {msg}", file=file) from None
    return ir.from_proto(proto)
