"""mtc: a multi-task compiler over ONNX graphs."""

from __future__ import annotations

__version__ = "0.1.0"
