"""Dataset-level metric accumulators: ``update`` per batch, ``compute`` once, ``merge`` across workers.

Each accumulator keeps sufficient statistics, not per-batch averages, so ``compute()`` returns the
metric over every valid pixel (or sample) of the dataset, whatever the batching:

- ``seg``: a ``C x C`` confusion matrix (rows: label, columns: prediction). IoU_c =
  TP / (TP + FP + FN); mIoU averages it over the classes that occur in labels or predictions
  (a class absent from both is undefined, not 0). Pixel accuracy = trace / total.
- ``depth``: sums of ``|p - t|``, ``|p - t| / t`` and counts of ``max(p/t, t/p) < 1.25^k``; a
  prediction ``<= 0`` lies outside every threshold.
- ``normal``: the angle between the normalised prediction and target, in degrees (float64). Mean
  and threshold percentages are exact; the median is exact while at most ``exact_limit`` valid
  pixels were seen (their angles are kept), then it comes from a histogram of
  ``bins_per_degree`` bins per degree, interpolated within the bin: error at most
  ``1 / bins_per_degree`` degrees with bounded memory (180k int64 counters by default).
- ``edge`` / ``keypoint``: mean absolute error; ``class``: top-1 accuracy; ``regress``: MSE.

Percentages are in percent (0-100), as in the AutoMTL tables. With nothing valid seen, every
value is NaN. State lives on the CPU in float64/int64; each update reduces the batch on its own
device first, so only a few numbers (or the histogram) cross to the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from mtc.tasks.losses import apply_mask, match_target


class _Kind(Protocol):
    """What the loss metric needs of a task kind (:class:`mtc.tasks.kinds.TaskKind`)."""

    @property
    def name(self) -> str: ...

    def loss_terms(self, pred: Any, target: Any, *, mask: Any = None) -> tuple[Any, Any]: ...

__all__ = [
    "AccuracyMetric",
    "DepthMetric",
    "L1Metric",
    "LossMetric",
    "MSEMetric",
    "Metric",
    "NormalMetric",
    "SegMetric",
]

_NAN = float("nan")


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else _NAN


class Metric:
    """Base accumulator.

    Subclasses implement ``update(pred, target, mask=None)``, ``compute() -> dict[str, float]``,
    ``reset()`` and ``merge(other)`` (adds ``other``'s statistics into ``self`` and returns it).
    """

    #: keys of :meth:`compute`
    names: tuple[str, ...] = ()

    def update(
        self, pred: torch.Tensor, target: torch.Tensor | None, mask: torch.Tensor | None = None
    ) -> None:
        raise NotImplementedError  # pragma: no cover

    def compute(self) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover

    def reset(self) -> None:
        raise NotImplementedError  # pragma: no cover

    def merge(self, other: Metric) -> Metric:
        raise NotImplementedError  # pragma: no cover

    def _check_merge(self, other: Metric) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.compute()})"


class _SumMetric(Metric):
    """Metrics that are ratios of float64 sums; subclasses fill ``self.sums`` in ``update``."""

    fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.fields, 0.0)

    def merge(self, other: Metric) -> Metric:
        self._check_merge(other)
        assert isinstance(other, _SumMetric)
        for k in self.fields:
            self.sums[k] += other.sums[k]
        return self

    def _add(self, **values: torch.Tensor) -> None:
        # One transfer for all the batch's sums, not one synchronisation per field.
        host = torch.stack([v.detach().to(torch.float64) for v in values.values()]).cpu().tolist()
        for k, v in zip(values, host, strict=True):
            self.sums[k] += v


class SegMetric(Metric):
    """mIoU and pixel accuracy from a confusion matrix summed over the dataset.

    Args:
        num_classes: C.
        ignore_index: label of unlabelled pixels.
    """

    names = ("miou", "pixel_acc")

    def __init__(self, num_classes: int, *, ignore_index: int = 255) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        """Add a batch: ``pred`` logits ``(N, C, H, W)`` or labels ``(N, H, W)``; labels ``(N, H, W)``."""
        if target is None:
            return
        c = self.num_classes
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        labels = pred.argmax(dim=1) if pred.dim() == target.dim() + 1 else pred
        if labels.shape != target.shape:
            raise ValueError(
                f"predictions {tuple(labels.shape)} and labels {tuple(target.shape)} differ in shape"
            )
        target = target.to(labels.device).long()
        valid = apply_mask(target != self.ignore_index, mask)
        t, p = target[valid], labels[valid].long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
            raise ValueError(f"labels must lie in [0, {c}) or equal ignore_index {self.ignore_index}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= c):
            raise ValueError(f"predicted labels must lie in [0, {c})")
        self.confusion += torch.bincount(t * c + p, minlength=c * c).reshape(c, c).cpu()

    def merge(self, other):
        self._check_merge(other)
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class into {self.num_classes}-class metric")
        self.confusion += other.confusion
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU in [0, 1] (NaN for a class absent from labels and predictions)."""
        cm = self.confusion.double().numpy()
        tp = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)

    def compute(self):
        total = float(self.confusion.sum())
        iou = self.iou()
        miou = 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else _NAN
        return {"miou": miou, "pixel_acc": _pct(float(self.confusion.diagonal().sum()), total)}


class DepthMetric(_SumMetric):
    """Absolute and relative error and δ thresholds over pixels with a positive, finite target."""

    names = ("abs_err", "rel_err", "delta1", "delta2", "delta3")
    fields = ("n", "abs", "rel", "d1", "d2", "d3")

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        if target is None:
            return
        target = match_target(pred, target.to(pred.device))
        valid = apply_mask(torch.isfinite(target) & (target > 0), mask)
        p, t = pred[valid].double(), target[valid].double()
        err = (p - t).abs()
        # A non-positive prediction has no ratio to the target: outside every threshold.
        ratio = torch.where(p > 0, torch.maximum(p / t, t / p.clamp_min(1e-300)), math.inf)
        self._add(
            n=valid.sum(),
            abs=err.sum(),
            rel=(err / t).sum(),
            d1=(ratio < 1.25).sum(),
            d2=(ratio < 1.25**2).sum(),
            d3=(ratio < 1.25**3).sum(),
        )

    def compute(self):
        s, n = self.sums, self.sums["n"]
        return {
            "abs_err": s["abs"] / n if n else _NAN,
            "rel_err": s["rel"] / n if n else _NAN,
            "delta1": _pct(s["d1"], n),
            "delta2": _pct(s["d2"], n),
            "delta3": _pct(s["d3"], n),
        }


class NormalMetric(Metric):
    """Mean and median angle error (degrees) and % of pixels within 11.25°, 22.5° and 30°.

    Args:
        eps: target vectors no longer than this are missing.
        exact_limit: keep every angle (for an exact median) up to this many valid pixels.
        bins_per_degree: histogram resolution used beyond ``exact_limit``.
    """

    names = ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30")
    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(
        self, *, eps: float = 1e-6, exact_limit: int = 4_000_000, bins_per_degree: int = 1000
    ) -> None:
        self.eps = eps
        self.exact_limit = int(exact_limit)
        self.bins_per_degree = int(bins_per_degree)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.angle_sum = 0.0
        self.within = [0] * len(self.THRESHOLDS)
        self.hist = torch.zeros(180 * self.bins_per_degree, dtype=torch.int64)
        self.angles: list[torch.Tensor] | None = []

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        """Add a batch of predictions and targets ``(N, 3, H, W)`` (prediction need not be unit)."""
        if target is None:
            return
        from mtc.tasks.losses import normal_valid

        target = match_target(pred, target.to(pred.device))
        valid = apply_mask(normal_valid(target, self.eps), mask)[:, 0]
        p = F.normalize(pred.double(), dim=1, eps=1e-12).movedim(1, -1)[valid]
        t = target.double().movedim(1, -1)[valid]
        t = t / torch.linalg.vector_norm(t, dim=-1, keepdim=True)
        angle = torch.rad2deg(torch.acos((p * t).sum(-1).clamp(-1.0, 1.0)))
        self._add(angle)

    def _add(self, angle: torch.Tensor) -> None:
        self.n += angle.numel()
        self.angle_sum += float(angle.sum())
        for i, thr in enumerate(self.THRESHOLDS):
            self.within[i] += int((angle < thr).sum())
        nb = self.hist.numel()
        idx = (angle * self.bins_per_degree).long().clamp(0, nb - 1)
        self.hist += torch.bincount(idx, minlength=nb).cpu()
        if self.angles is not None:
            if self.n <= self.exact_limit:
                self.angles.append(angle.cpu())
            else:
                self.angles = None  # too many to keep: the histogram takes over

    def merge(self, other):
        self._check_merge(other)
        if other.bins_per_degree != self.bins_per_degree:
            raise ValueError("cannot merge normal metrics with different histogram resolutions")
        self.n += other.n
        self.angle_sum += other.angle_sum
        self.within = [a + b for a, b in zip(self.within, other.within, strict=True)]
        self.hist += other.hist
        if self.angles is not None and other.angles is not None and self.n <= self.exact_limit:
            self.angles = self.angles + other.angles
        else:
            self.angles = None
        return self

    @property
    def exact(self) -> bool:
        """Whether :meth:`compute` gives the exact median (all angles were kept)."""
        return self.angles is not None

    def _hist_quantile(self, rank: int) -> float:
        """The ``rank``-th smallest angle (1-based), interpolated within its histogram bin."""
        cum = torch.cumsum(self.hist, 0)
        k = int(torch.searchsorted(cum, torch.tensor(rank, dtype=torch.int64)))
        before = int(cum[k - 1]) if k > 0 else 0
        count = int(self.hist[k])
        return (k + (rank - before - 0.5) / count) / self.bins_per_degree

    def median(self) -> float:
        if self.n == 0:
            return _NAN
        if self.angles is not None:
            return float(np.median(torch.cat(self.angles).numpy()))
        lo, hi = (self.n + 1) // 2, self.n // 2 + 1
        return 0.5 * (self._hist_quantile(lo) + self._hist_quantile(hi))

    def compute(self):
        out = {
            "mean_angle": self.angle_sum / self.n if self.n else _NAN,
            "median_angle": self.median(),
        }
        for thr, c in zip(self.THRESHOLDS, self.within, strict=True):
            out[f"within_{thr:g}"] = _pct(c, self.n)
        return out


class L1Metric(_SumMetric):
    """Mean absolute error over the elements ``valid(target)`` accepts (default: finite)."""

    names = ("l1",)
    fields = ("n", "abs")

    def __init__(self, valid: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.valid = valid or torch.isfinite
        super().__init__()

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        if target is None:
            return
        target = match_target(pred, target.to(pred.device))
        ok = apply_mask(self.valid(target), mask)
        self._add(n=ok.sum(), abs=(pred[ok].double() - target[ok].double()).abs().sum())

    def compute(self):
        n = self.sums["n"]
        return {"l1": self.sums["abs"] / n if n else _NAN}


class MSEMetric(_SumMetric):
    """Mean squared error over finite target elements."""

    names = ("mse",)
    fields = ("n", "sq")

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        if target is None:
            return
        target = match_target(pred, target.to(pred.device))
        ok = apply_mask(torch.isfinite(target), mask)
        d = pred[ok].double() - target[ok].double()
        self._add(n=ok.sum(), sq=(d * d).sum())

    def compute(self):
        n = self.sums["n"]
        return {"mse": self.sums["sq"] / n if n else _NAN}


class AccuracyMetric(_SumMetric):
    """Top-1 accuracy (%) over samples with a label ``>= 0``."""

    names = ("top1",)
    fields = ("n", "correct")

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        if target is None:
            return
        target = target.reshape(-1).to(pred.device).long()
        labels = pred.argmax(dim=1) if pred.dim() == 2 else pred.reshape(-1).long()
        valid = apply_mask(target >= 0, mask)
        self._add(n=valid.sum(), correct=(labels[valid] == target[valid]).sum())

    def compute(self):
        return {"top1": _pct(self.sums["correct"], self.sums["n"])}


class LossMetric(_SumMetric):
    """The kind's loss averaged over every valid element of the dataset (``{"loss": value}``)."""

    names = ("loss",)
    fields = ("n", "total")

    def __init__(self, kind: _Kind) -> None:
        self.kind = kind
        super().__init__()

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        if target is None:
            return
        total, count = self.kind.loss_terms(pred, target.to(pred.device), mask=mask)
        self._add(n=count, total=total.double())

    def merge(self, other):
        if isinstance(other, LossMetric) and other.kind.name != self.kind.name:
            raise ValueError(f"cannot merge a {other.kind.name} loss into a {self.kind.name} loss")
        return super().merge(other)

    def compute(self):
        n = self.sums["n"]
        return {"loss": self.sums["total"] / n if n else _NAN}
