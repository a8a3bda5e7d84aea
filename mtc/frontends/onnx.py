"""ONNX front end: any model of opset 11 or newer."""

from __future__ import annotations

import os

import onnx_ir as ir

from mtc.ir import io


def load_onnx(path: str | os.PathLike[str]) -> ir.Model:
    """Read an ONNX file; initializers that old exporters also list as graph inputs are unlisted."""
    model = io.load(path)
    g = model.graph
    inits = set(g.initializers)
    for v in list(g.inputs):
        if v.name in inits:
            g.inputs.remove(v)
    return model
