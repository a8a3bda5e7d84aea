"""Data: the ``--data`` plug-in interface and the built-in generators.

- :func:`load_data` turns a spec (``scenes?n_train=500``, ``pkg.module:factory?key=value``) into
  checked ``(train, val)`` datasets of ``(image, {task: target})`` samples;
- :func:`make_loader` batches them deterministically, filling missing targets;
- :func:`split` cuts the training set into AutoMTL's disjoint train1 / train2;
- built-ins: ``scenes`` (:mod:`mtc.data.scenes`), ``relatedness`` (:mod:`mtc.data.relatedness`),
  ``digits`` (:mod:`mtc.data.digits`). See ``docs/data.md``.

Importing this package does not import torch; the loader and generators do, when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtc.data.registry import (
    BUILTINS,
    DataSpec,
    builtin_names,
    load_data,
    parse_data_spec,
    parse_value,
    register_data,
    resolve_data_factory,
)

_LAZY = {
    "make_loader": "loader",
    "split": "loader",
    "EpochSampler": "loader",
    "GeneratedDataset": "common",
    "PartialLabels": "common",
}

__all__ = [
    "BUILTINS",
    "DataSpec",
    "EpochSampler",
    "GeneratedDataset",
    "PartialLabels",
    "builtin_names",
    "load_data",
    "make_loader",
    "parse_data_spec",
    "parse_value",
    "register_data",
    "resolve_data_factory",
    "split",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mtc.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"mtc.data.{module}"), name)
