"""Task losses that skip missing labels (collation of targets is :mod:`mtc.tasks.batch`).

Every ``*_loss_terms`` function returns ``(sum of per-element losses over valid elements, number of
valid elements)``; :meth:`mtc.tasks.kinds.TaskKind.loss` divides them. Keeping the two apart lets
the loss metric accumulate the exact dataset-level mean. Invalid elements are replaced by a
harmless value *before* any arithmetic, so NaN targets never reach the gradient (``0 * NaN`` is
NaN, so masking afterwards would not be enough).

``mask`` (optional, bool, True = use) is per sample ``(N,)`` or per pixel ``(N, H, W)``; it is
combined with the kind's own missing-label rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "class_loss_terms",
    "l1_loss_terms",
    "mse_loss_terms",
    "normal_loss_terms",
    "normal_valid",
    "seg_loss_terms",
    "zero_loss",
]

Terms = tuple[torch.Tensor, torch.Tensor]


def zero_loss(pred: torch.Tensor) -> torch.Tensor:
    """A scalar zero that depends on ``pred`` (so ``backward()`` works and gives zero gradients)."""
    return pred.sum() * 0.0


def apply_mask(valid: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``valid & mask`` with a per-sample or per-pixel ``mask`` broadcast to ``valid``'s shape."""
    if mask is None:
        return valid
    m = mask.to(device=valid.device, dtype=torch.bool)
    if m.dim() == 1 and valid.dim() > 1:
        m = m.view(-1, *([1] * (valid.dim() - 1)))  # one flag per sample
    elif m.dim() == valid.dim() - 1 and valid.dim() == 4:
        m = m.unsqueeze(1)  # (N, H, W) pixel mask against (N, C, H, W)
    if m.shape[0] != valid.shape[0]:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit targets of shape {tuple(valid.shape)}"
        )
    return valid & m


def match_target(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` reshaped to ``pred``'s shape: ``(N, H, W)`` -> ``(N, 1, H, W)``, ``(N,)`` -> ``(N, 1)``."""
    if target.dim() == pred.dim() - 1 and pred.shape[1] == 1:
        target = target.unsqueeze(1)
    if target.shape != pred.shape:
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not match prediction {tuple(pred.shape)}"
        )
    return target


def _count(valid: torch.Tensor) -> torch.Tensor:
    return valid.sum()


def seg_loss_terms(
    pred: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255, mask: torch.Tensor | None = None
) -> Terms:
    """Cross-entropy of logits ``(N, C, H, W)`` against labels ``(N, H, W)`` (or ``(N, 1, H, W)``).

    Pixels labelled ``ignore_index`` are missing. Other labels must lie in ``[0, C)``.
    """
    if target.dim() == pred.dim() and target.shape[1] == 1:
        target = target[:, 0]
    target = target.long()
    valid = apply_mask(target != ignore_index, mask)
    per = F.cross_entropy(pred, torch.where(valid, target, 0), reduction="none")
    return torch.where(valid, per, 0.0).sum(), _count(valid)


def l1_loss_terms(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    valid: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> Terms:
    """L1 over the elements ``valid(target)`` accepts (default: finite targets)."""
    target = match_target(pred, target).to(pred.dtype)
    ok = valid(target) if valid is not None else torch.isfinite(target)
    ok = apply_mask(ok, mask)
    diff = (pred - torch.where(ok, target, 0.0)).abs()
    return torch.where(ok, diff, 0.0).sum(), _count(ok)


def mse_loss_terms(pred: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None) -> Terms:
    """Squared error over finite target elements, for ``(N, C)`` (or ``(N,)`` when C is 1)."""
    target = match_target(pred, target).to(pred.dtype)
    ok = apply_mask(torch.isfinite(target), mask)
    diff = pred - torch.where(ok, target, 0.0)
    return torch.where(ok, diff * diff, 0.0).sum(), _count(ok)


def normal_valid(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-pixel validity ``(N, 1, ...)`` of normal targets ``(N, 3, ...)``."""
    finite = torch.isfinite(target).all(dim=1, keepdim=True)
    t = torch.where(finite, target, 0.0)
    return finite & (torch.linalg.vector_norm(t, dim=1, keepdim=True) > eps)


def normal_loss_terms(
    pred: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-6, mask: torch.Tensor | None = None
) -> Terms:
    """``1 - cos(pred, target)`` per pixel, the prediction L2-normalised over channels."""
    target = match_target(pred, target).to(pred.dtype)
    ok = apply_mask(normal_valid(target, eps), mask)
    # Missing pixels get a unit target so the division below stays finite.
    unit = torch.zeros_like(target)
    unit[:, :1] = 1.0
    t = torch.where(ok, target, unit)
    t = t / torch.linalg.vector_norm(t, dim=1, keepdim=True)
    cos = (F.normalize(pred, dim=1, eps=1e-12) * t).sum(dim=1, keepdim=True)
    return torch.where(ok, 1.0 - cos, 0.0).sum(), _count(ok)


def class_loss_terms(pred: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None) -> Terms:
    """Cross-entropy of logits ``(N, C)`` against labels ``(N,)``; negative labels are missing."""
    target = target.reshape(-1).long()
    valid = apply_mask(target >= 0, mask)
    per = F.cross_entropy(pred, torch.where(valid, target, 0), reduction="none")
    return torch.where(valid, per, 0.0).sum(), _count(valid)
