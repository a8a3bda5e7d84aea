"""PyTorch lowering: an ONNX graph as a trainable ``nn.Module``, proven against onnxruntime.

``lower(model)`` builds a :class:`GraphModule`; ops come from the registry in
:mod:`mtc.lower.registry` (built-ins in :mod:`mtc.lower.ops`); ``mtc.lower.verify.verify`` compares
a lowering with onnxruntime.
"""

from __future__ import annotations

from mtc.lower.module import GraphModule, lower
from mtc.lower.registry import BuildNode, register_op, supported_ops

__all__ = ["BuildNode", "GraphModule", "lower", "register_op", "supported_ops"]
