"""Task kinds: what a task predicts, how it is trained and how it is scored.

A kind owns its head shape (dense or global), its default channel count, its loss, its metrics
and the direction of each metric (for the relative performance Δt of AutoMTL, Eq. 5). Kinds are
frozen dataclasses whose fields are the kind's options (e.g. the ignore index of ``seg``);
:func:`get_kind` returns the registered default or a copy with options replaced.

This module does not import torch at import time, so parsing ``--tasks`` stays fast; losses
(:mod:`mtc.tasks.losses`) and metrics (:mod:`mtc.tasks.metrics`) are imported when first used.

Missing labels (every loss and metric skips them; ``mask`` can mark more):

============  ===============================================================================
kind          a pixel / sample is missing when
============  ===============================================================================
seg           its label equals ``ignore_index`` (255 by default)
depth         its target is NaN/inf or ``<= 0`` (no depth reading, as in NYUv2 practice)
normal        any component is NaN/inf, or the target vector has zero length (``<= eps``)
edge          its target is NaN/inf
keypoint      its target is NaN/inf
class         its label is negative (``-1``)
regress       its target element is NaN/inf
============  ===============================================================================

A whole sample without a target is filled with the missing value by
:func:`mtc.tasks.losses.collate_targets`; a batch without any target for a task is ``None``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mtc.errors import MtcError

if TYPE_CHECKING:
    import torch

    from mtc.tasks.metrics import Metric

__all__ = [
    "KINDS",
    "ClassKind",
    "DepthKind",
    "EdgeKind",
    "KeypointKind",
    "MetricInfo",
    "NormalKind",
    "RegressKind",
    "SegKind",
    "TaskKind",
    "delta_t",
    "get_kind",
    "kind_names",
    "register_kind",
    "relative_performance",
]


@dataclass(frozen=True)
class MetricInfo:
    """A metric a kind reports.

    Attributes:
        name: key in the dict returned by ``Metric.compute()``.
        higher_is_better: direction, used by Δt (``s_j`` of Eq. 5 is 1 when this is False).
        unit: ``"%"``, ``"deg"`` or ``""`` (same unit as the target).
    """

    name: str
    higher_is_better: bool
    unit: str = ""


#: The loss averaged over the dataset, usable as a metric by every kind (lower is better). AutoMTL
#: scores Tiny-Taskonomy tasks this way ("the task-specific loss ... as the performance measurement").
LOSS_METRIC = MetricInfo("loss", False)


@dataclass(frozen=True)
class TaskKind:
    """Base class of task kinds. Subclasses set the class variables and may add option fields."""

    name: ClassVar[str]
    #: channels of the head's output when the spec gives none
    default_channels: ClassVar[int]
    #: a pixel-wise output at input resolution (ASPP head) rather than one vector per sample
    dense: ClassVar[bool]
    metrics: ClassVar[tuple[MetricInfo, ...]]
    #: the loss, in words (docs and ``mtc inspect``)
    loss_name: ClassVar[str]
    #: when a pixel or sample counts as missing, in words
    missing: ClassVar[str]
    min_channels: ClassVar[int] = 1
    #: the only channel count that makes sense, if any (normals are 3-vectors)
    fixed_channels: ClassVar[int | None] = None
    #: targets are integer labels (``torch.long``) rather than floats
    integer_targets: ClassVar[bool] = False

    # --- channels ---------------------------------------------------------------------------

    def channels_problem(self, channels: int) -> str | None:
        """Why ``channels`` does not suit this kind, or None when it does."""
        if self.fixed_channels is not None and channels != self.fixed_channels:
            return f"kind {self.name} needs {self.fixed_channels} channels, got {channels}"
        if channels < self.min_channels:
            return f"kind {self.name} needs at least {self.min_channels} channels, got {channels}"
        return None

    # --- metrics ----------------------------------------------------------------------------

    def metric_info(self, name: str) -> MetricInfo:
        """The :class:`MetricInfo` called ``name`` (``"loss"`` included)."""
        for m in (*self.metrics, LOSS_METRIC):
            if m.name == name:
                return m
        known = ", ".join(m.name for m in (*self.metrics, LOSS_METRIC))
        raise MtcError(f"kind {self.name} has no metric '{name}' (known: {known})")

    def higher_is_better(self, metric: str) -> bool:
        return self.metric_info(metric).higher_is_better

    def metric(self, channels: int | None = None) -> Metric:  # pragma: no cover - abstract
        """A fresh accumulator of this kind's metrics for a head with ``channels`` outputs."""
        raise NotImplementedError

    def loss_metric(self) -> Metric:
        """An accumulator of the dataset-level mean loss, reported as ``{"loss": value}``."""
        from mtc.tasks.metrics import LossMetric

        return LossMetric(self)

    # --- loss and missing labels ------------------------------------------------------------

    def loss_terms(
        self, pred: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """Sum of the per-element losses over valid elements, and the number of valid elements."""
        raise NotImplementedError

    def loss(
        self, pred: torch.Tensor, target: torch.Tensor | None, *, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean loss over the valid pixels (dense) or samples (global) of the batch.

        Args:
            pred: the head's output, ``(N, C, H, W)`` or ``(N, C)``.
            target: labels or targets (see the kind); ``None`` when no sample has one.
            mask: optional bool tensor, True = use; per sample ``(N,)`` or per pixel ``(N, H, W)``.

        Returns:
            A scalar. With no valid element it is a zero that still depends on ``pred``, so a
            training step on such a batch runs (and changes nothing).
        """
        from mtc.tasks.losses import zero_loss

        if target is None:
            return zero_loss(pred)
        total, count = self.loss_terms(pred, target, mask=mask)
        # Dividing by max(count, 1) gives the exact mean, and 0 when nothing is valid, without a
        # host-device synchronisation to test for the empty case.
        return total / count.clamp_min(1).to(total.dtype)

    def valid(self, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Bool tensor: which elements of ``target`` are labelled."""
        raise NotImplementedError

    def missing_target(self, shape: Sequence[int], *, device: Any = None) -> torch.Tensor:
        """A target of ``shape`` in which every element is missing (to collate unlabelled samples)."""
        import torch

        return torch.full(tuple(shape), math.nan, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class SegKind(TaskKind):
    """Semantic segmentation: per-pixel class logits ``(N, C, H, W)``; labels ``(N, H, W)`` int.

    Attributes:
        ignore_index: the label of unlabelled pixels.
    """

    ignore_index: int = 255

    name: ClassVar[str] = "seg"
    default_channels: ClassVar[int] = 13  # NYUv2-13
    dense: ClassVar[bool] = True
    min_channels: ClassVar[int] = 2
    integer_targets: ClassVar[bool] = True
    loss_name: ClassVar[str] = "pixel-wise cross-entropy"
    missing: ClassVar[str] = "label == ignore_index (255)"
    metrics: ClassVar[tuple[MetricInfo, ...]] = (
        MetricInfo("miou", True, "%"),
        MetricInfo("pixel_acc", True, "%"),
    )

    def loss_terms(self, pred, target, *, mask=None):
        from mtc.tasks.losses import seg_loss_terms

        return seg_loss_terms(pred, target, ignore_index=self.ignore_index, mask=mask)

    def valid(self, target):
        return target != self.ignore_index

    def metric(self, channels=None):
        from mtc.tasks.metrics import SegMetric

        return SegMetric(channels or self.default_channels, ignore_index=self.ignore_index)

    def missing_target(self, shape, *, device=None):
        import torch

        return torch.full(tuple(shape), self.ignore_index, dtype=torch.long, device=device)


@dataclass(frozen=True)
class DepthKind(TaskKind):
    """Depth: ``(N, 1, H, W)`` predictions and targets (``(N, H, W)`` targets are accepted)."""

    name: ClassVar[str] = "depth"
    default_channels: ClassVar[int] = 1
    dense: ClassVar[bool] = True
    loss_name: ClassVar[str] = "L1"
    missing: ClassVar[str] = "target NaN/inf or <= 0"
    metrics: ClassVar[tuple[MetricInfo, ...]] = (
        MetricInfo("abs_err", False),
        MetricInfo("rel_err", False),
        MetricInfo("delta1", True, "%"),
        MetricInfo("delta2", True, "%"),
        MetricInfo("delta3", True, "%"),
    )

    def loss_terms(self, pred, target, *, mask=None):
        from mtc.tasks.losses import l1_loss_terms

        return l1_loss_terms(pred, target, valid=self.valid, mask=mask)

    def valid(self, target):
        import torch

        return torch.isfinite(target) & (target > 0)

    def metric(self, channels=None):
        from mtc.tasks.metrics import DepthMetric

        return DepthMetric()


@dataclass(frozen=True)
class NormalKind(TaskKind):
    """Surface normals: ``(N, 3, H, W)``; the prediction is L2-normalised before loss and metrics.

    Attributes:
        eps: a target vector no longer than this is missing.
        exact_limit: the median angle is exact while at most this many valid pixels were seen;
            beyond, it comes from a histogram of ``bins_per_degree`` bins per degree.
        bins_per_degree: resolution of that histogram (1000: median within 0.001°).
    """

    eps: float = 1e-6
    exact_limit: int = 4_000_000
    bins_per_degree: int = 1000

    name: ClassVar[str] = "normal"
    default_channels: ClassVar[int] = 3
    fixed_channels: ClassVar[int | None] = 3
    dense: ClassVar[bool] = True
    loss_name: ClassVar[str] = "1 - cosine similarity"
    missing: ClassVar[str] = "any component NaN/inf, or a zero-length target vector"
    metrics: ClassVar[tuple[MetricInfo, ...]] = (
        MetricInfo("mean_angle", False, "deg"),
        MetricInfo("median_angle", False, "deg"),
        MetricInfo("within_11.25", True, "%"),
        MetricInfo("within_22.5", True, "%"),
        MetricInfo("within_30", True, "%"),
    )

    def loss_terms(self, pred, target, *, mask=None):
        from mtc.tasks.losses import normal_loss_terms

        return normal_loss_terms(pred, target, eps=self.eps, mask=mask)

    def valid(self, target):
        """Per pixel ``(N, 1, H, W)``: all components finite and a non-zero vector."""
        from mtc.tasks.losses import normal_valid

        return normal_valid(target, self.eps)

    def metric(self, channels=None):
        from mtc.tasks.metrics import NormalMetric

        return NormalMetric(eps=self.eps, exact_limit=self.exact_limit, bins_per_degree=self.bins_per_degree)


@dataclass(frozen=True)
class _L1DenseKind(TaskKind):
    """Taskonomy-style dense regression scored by its L1 error."""

    default_channels: ClassVar[int] = 1
    dense: ClassVar[bool] = True
    loss_name: ClassVar[str] = "L1"
    missing: ClassVar[str] = "target NaN/inf"
    metrics: ClassVar[tuple[MetricInfo, ...]] = (MetricInfo("l1", False),)

    def loss_terms(self, pred, target, *, mask=None):
        from mtc.tasks.losses import l1_loss_terms

        return l1_loss_terms(pred, target, valid=self.valid, mask=mask)

    def valid(self, target):
        import torch

        return torch.isfinite(target)

    def metric(self, channels=None):
        from mtc.tasks.metrics import L1Metric

        return L1Metric(self.valid)


@dataclass(frozen=True)
class EdgeKind(_L1DenseKind):
    """Edge maps (Taskonomy ``edge_texture``): ``(N, 1, H, W)``."""

    name: ClassVar[str] = "edge"


@dataclass(frozen=True)
class KeypointKind(_L1DenseKind):
    """Keypoint heat maps (Taskonomy ``keypoints2d``): ``(N, 1, H, W)``."""

    name: ClassVar[str] = "keypoint"


@dataclass(frozen=True)
class ClassKind(TaskKind):
    """Image classification: logits ``(N, C)``; labels ``(N,)`` int, negative = missing."""

    name: ClassVar[str] = "class"
    default_channels: ClassVar[int] = 10
    dense: ClassVar[bool] = False
    min_channels: ClassVar[int] = 2
    integer_targets: ClassVar[bool] = True
    loss_name: ClassVar[str] = "cross-entropy"
    missing: ClassVar[str] = "label < 0"
    metrics: ClassVar[tuple[MetricInfo, ...]] = (MetricInfo("top1", True, "%"),)

    def loss_terms(self, pred, target, *, mask=None):
        from mtc.tasks.losses import class_loss_terms

        return class_loss_terms(pred, target, mask=mask)

    def valid(self, target):
        return target >= 0

    def metric(self, channels=None):
        from mtc.tasks.metrics import AccuracyMetric

        return AccuracyMetric()

    def missing_target(self, shape, *, device=None):
        import torch

        return torch.full(tuple(shape), -1, dtype=torch.long, device=device)


@dataclass(frozen=True)
class RegressKind(TaskKind):
    """Vector regression: ``(N, C)`` predictions and targets (``(N,)`` when C is 1)."""

    name: ClassVar[str] = "regress"
    default_channels: ClassVar[int] = 1
    dense: ClassVar[bool] = False
    loss_name: ClassVar[str] = "MSE"
    missing: ClassVar[str] = "target element NaN/inf"
    metrics: ClassVar[tuple[MetricInfo, ...]] = (MetricInfo("mse", False),)

    def loss_terms(self, pred, target, *, mask=None):
        from mtc.tasks.losses import mse_loss_terms

        return mse_loss_terms(pred, target, mask=mask)

    def valid(self, target):
        import torch

        return torch.isfinite(target)

    def metric(self, channels=None):
        from mtc.tasks.metrics import MSEMetric

        return MSEMetric()


#: name -> the kind with default options
KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
    """Make ``kind`` available to ``--tasks`` under ``kind.name`` (replacing one of that name)."""
    KINDS[kind.name] = kind
    return kind


for _k in (SegKind(), DepthKind(), NormalKind(), EdgeKind(), KeypointKind(), ClassKind(), RegressKind()):
    register_kind(_k)


def kind_names() -> list[str]:
    """The registered kinds, sorted."""
    return sorted(KINDS)


def get_kind(name: str | TaskKind, **options: Any) -> TaskKind:
    """The kind called ``name``, with ``options`` (its dataclass fields) replaced.

    Raises:
        MtcError: unknown kind or option.
    """
    if isinstance(name, TaskKind):
        kind = name
    else:
        if name not in KINDS:
            raise MtcError(f"unknown task kind '{name}' (known: {', '.join(kind_names())})")
        kind = KINDS[name]
    if not options:
        return kind
    fields = {f.name for f in dataclasses.fields(kind)}
    bad = sorted(set(options) - fields)
    if bad:
        raise MtcError(
            f"task kind {kind.name} has no option {', '.join(bad)} (options: {', '.join(sorted(fields)) or 'none'})"
        )
    return dataclasses.replace(kind, **options)


# --- relative performance (AutoMTL Eq. 5) ------------------------------------------------------


def relative_performance(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    kind: str | TaskKind,
    *,
    keys: Sequence[str] | None = None,
) -> float:
    """Δt_i of one task against its single-task baseline, in percent (AutoMTL Eq. 5).

    ``Δt_i = 1/|M| Σ_j (-1)^{s_j} (M_A,j - M_STL,j) / M_STL,j × 100``, where ``s_j`` is 1 for a
    lower-is-better metric, so a positive Δt_i is an improvement.

    Args:
        metrics: the method's metrics (as returned by ``Metric.compute()``).
        baseline: the single-task baseline's metrics.
        kind: the task's kind (gives each metric's direction).
        keys: the metrics to average; default: all of the kind's metrics (``loss`` excluded).

    Raises:
        MtcError: a metric is missing from either dict, or the baseline value is 0 or not finite.
    """
    k = get_kind(kind)
    names = list(keys) if keys is not None else [m.name for m in k.metrics]
    if not names:
        raise MtcError("relative performance needs at least one metric")
    total = 0.0
    for name in names:
        info = k.metric_info(name)
        for where, d in (("metrics", metrics), ("baseline", baseline)):
            if name not in d:
                raise MtcError(f"relative performance: {where} lack '{name}' (kind {k.name})")
        a, b = float(metrics[name]), float(baseline[name])
        if b == 0.0 or not math.isfinite(b):
            raise MtcError(f"relative performance: baseline '{name}' is {b}; it must be finite and non-zero")
        sign = 1.0 if info.higher_is_better else -1.0
        total += sign * (a - b) / b * 100.0
    return total / len(names)


def delta_t(values: Sequence[float]) -> float:
    """Δt: the average of the per-task relative performances Δt_i (AutoMTL, after Eq. 5)."""
    vals = list(values)
    if not vals:
        raise MtcError("Δt needs at least one task")
    return sum(vals) / len(vals)
