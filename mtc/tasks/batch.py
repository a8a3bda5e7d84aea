"""Collation of ``(image, {task: target})`` samples into batches (missing targets filled per kind)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtc.tasks.kinds import TaskKind, get_kind
from mtc.tasks.spec import TaskSpec


def collate_targets(targets: Sequence[Any], kind: TaskKind) -> torch.Tensor | None:
    """Stack per-sample targets, filling samples without one (``None``) with missing values.

    Args:
        targets: one target per sample (tensor, array or number), or None.
        kind: the task's kind (decides the missing value and the dtype).

    Returns:
        The batch of targets, or None when no sample has a target.
    """
    present = [torch.as_tensor(t) for t in targets if t is not None]
    if not present:
        return None
    shape = present[0].shape
    for t in present:
        if t.shape != shape:
            raise ValueError(f"targets of one batch differ in shape: {tuple(shape)} and {tuple(t.shape)}")
    dtype = torch.long if kind.integer_targets else torch.float32
    if len(present) == len(targets) and all(t.dtype == present[0].dtype for t in present):
        return torch.stack(present).to(dtype)  # every sample labelled: one conversion, not one per sample
    filler = kind.missing_target(shape).to(dtype)
    out = [filler if t is None else torch.as_tensor(t).to(dtype) for t in targets]
    return torch.stack(out)


def collate_batch(
    samples: Sequence[tuple[Any, Mapping[str, Any]]], tasks: Sequence[TaskSpec]
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Collate ``(image, {task: target})`` samples; a task absent from a sample is missing there.

    Returns:
        Stacked images and, per task name, the collated targets (None if no sample has one).
    """
    images = torch.stack([torch.as_tensor(img) for img, _ in samples])
    out: dict[str, torch.Tensor | None] = {}
    for t in tasks:
        out[t.name] = collate_targets([tg.get(t.name) for _, tg in samples], get_kind(t.kind))
    return images, out
