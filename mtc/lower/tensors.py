"""Conversions between ONNX element types, numpy build-time values and torch tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from mtc.ir import memory

_IR_TO_TORCH: dict[ir.DataType, torch.dtype] = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT64: torch.int64,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.UINT16: torch.uint16,
    ir.DataType.UINT32: torch.uint32,
    ir.DataType.UINT64: torch.uint64,
    ir.DataType.BOOL: torch.bool,
    ir.DataType.COMPLEX64: torch.complex64,
    ir.DataType.COMPLEX128: torch.complex128,
}


def torch_dtype(dtype: ir.DataType | int | None) -> torch.dtype | None:
    """The torch dtype of an ONNX element type, ``None`` if torch has no equivalent."""
    if dtype is None:
        return None
    return _IR_TO_TORCH.get(ir.DataType(dtype))


def to_torch(value: Any) -> Any:
    """A build-time value (numpy array, or list of them) as a fresh torch tensor."""
    if isinstance(value, list | tuple):
        return [to_torch(v) for v in value]
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError(f"torch has no tensor type for {arr.dtype} values")
    if arr.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits as torch's
        return torch.from_numpy(np.array(arr.view(np.uint16), copy=True)).view(torch.bfloat16)
    # np.array copies: initializer arrays may be read-only views of the model's buffers.
    return torch.from_numpy(memory.copy(arr))


def to_numpy(value: Any) -> Any:
    """A tensor (or list of them) as numpy, bfloat16 as ml_dtypes' bfloat16."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().resolve_conj()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if isinstance(value, list | tuple):
        return [to_numpy(v) for v in value]
    return np.asarray(value)
