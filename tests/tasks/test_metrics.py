"""Metric accumulators against hand computations; Δt against the AutoMTL paper's own tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtc.errors import MtcError
from mtc.tasks.kinds import KINDS, delta_t, get_kind, relative_performance
from mtc.tasks.metrics import NormalMetric, SegMetric

NAN = math.nan


def test_miou_and_pixel_acc_on_a_2x2_image_by_hand():
    # labels [[0, 1], [1, 1]], predictions [[0, 0], [1, 1]]:
    # IoU_0 = 1 / (1 + 1 + 0) = 1/2, IoU_1 = 2 / (2 + 0 + 1) = 2/3; pixel acc 3/4.
    m = get_kind("seg").metric(2)
    logits = torch.tensor([[[[5.0, 5.0], [0.0, 0.0]], [[0.0, 0.0], [5.0, 5.0]]]])
    m.update(logits, torch.tensor([[[0, 1], [1, 1]]]))
    out = m.compute()
    assert out["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert out["pixel_acc"] == pytest.approx(75.0)


def test_miou_ignores_unlabelled_pixels_and_absent_classes():
    m = SegMetric(3, ignore_index=255)
    pred = torch.tensor([[[0, 1], [1, 0]]])  # labels are accepted as predictions too
    m.update(pred, torch.tensor([[[0, 1], [255, 255]]]))
    # Class 2 occurs nowhere: undefined, not a 0 that drags the mean down.
    assert m.compute() == {"miou": pytest.approx(100.0), "pixel_acc": pytest.approx(100.0)}
    with pytest.raises(ValueError, match="labels must lie in"):
        m.update(pred, torch.tensor([[[0, 7], [0, 0]]]))


def test_seg_metric_is_dataset_level_and_mergeable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 5, 5, generator=g)
    labels = torch.randint(0, 4, (6, 5, 5), generator=g)
    labels[2, :2] = 255
    whole = SegMetric(4)
    whole.update(logits, labels)
    a, b = SegMetric(4), SegMetric(4)
    a.update(logits[:1], labels[:1])
    b.update(logits[1:], labels[1:])
    assert a.merge(b).compute() == pytest.approx(whole.compute())
    # Reference: per-class IoU from flattened arrays.
    p, t = logits.argmax(1).flatten().numpy(), labels.flatten().numpy()
    keep = t != 255
    p, t = p[keep], t[keep]
    ious = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum() for c in range(4)]
    assert whole.compute()["miou"] == pytest.approx(100 * np.mean(ious))


def test_depth_errors_and_delta_thresholds_by_hand():
    m = get_kind("depth").metric()
    pred = torch.tensor([1.0, 2.0, 3.0, 0.55, 5.0, 7.0, -1.0]).view(1, 1, 1, 7)
    target = torch.tensor([1.0, 1.5, 2.0, 1.0, 0.0, NAN, 2.0]).view(1, 1, 1, 7)
    m.update(pred, target)
    # Valid: the first four and the last (target 2, prediction -1: outside every threshold).
    # ratios 1, 4/3, 1.5, 1/0.55 = 1.818, inf -> delta1 1/5, delta2 (< 1.5625) 3/5, delta3 (< 1.953) 4/5
    errs = [0.0, 0.5, 1.0, 0.45, 3.0]
    rels = [0.0, 0.5 / 1.5, 0.5, 0.45, 1.5]
    out = m.compute()
    assert out["abs_err"] == pytest.approx(np.mean(errs))
    assert out["rel_err"] == pytest.approx(np.mean(rels))
    assert (out["delta1"], out["delta2"], out["delta3"]) == pytest.approx((20.0, 60.0, 80.0))


def _normals_at(angles_deg):
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    pred = torch.stack([torch.sin(a), torch.zeros_like(a), torch.cos(a)]).view(1, 3, 1, -1)
    target = torch.zeros_like(pred)
    target[:, 2] = 1.0
    return pred.float() * 3.0, target.float()  # predictions need not be unit length


def test_normal_angles_by_hand():
    pred, target = _normals_at([5.0, 10.0, 20.0, 40.0])
    target = torch.cat([target, torch.zeros(1, 3, 1, 1)], dim=3)  # a zero-length target: missing
    pred = torch.cat([pred, torch.ones(1, 3, 1, 1)], dim=3)
    m = get_kind("normal").metric()
    m.update(pred, target)
    out = m.compute()
    assert m.exact
    assert out["mean_angle"] == pytest.approx(18.75, abs=1e-3)
    assert out["median_angle"] == pytest.approx(15.0, abs=1e-3)
    assert out["within_11.25"] == pytest.approx(50.0)
    assert out["within_22.5"] == pytest.approx(75.0)
    assert out["within_30"] == pytest.approx(75.0)


def test_median_angle_from_the_histogram_beyond_the_exact_limit():
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 60, size=4001)
    exact = NormalMetric()
    approx = NormalMetric(exact_limit=1000, bins_per_degree=1000)
    for chunk in np.array_split(angles, 7):
        pred, target = _normals_at(chunk.tolist())
        exact.update(pred.double(), target.double())
        approx.update(pred.double(), target.double())
    assert exact.exact and not approx.exact
    assert exact.compute()["median_angle"] == pytest.approx(float(np.median(angles)), abs=1e-6)
    assert abs(approx.compute()["median_angle"] - float(np.median(angles))) <= 1e-3
    assert approx.compute()["mean_angle"] == pytest.approx(exact.compute()["mean_angle"])
    # Merging two halves gives the whole.
    a, b = NormalMetric(), NormalMetric()
    pa, ta = _normals_at(angles[:2000].tolist())
    pb, tb = _normals_at(angles[2000:].tolist())
    a.update(pa.double(), ta.double())
    b.update(pb.double(), tb.double())
    assert a.merge(b).compute() == pytest.approx(exact.compute())


def test_l1_accuracy_mse_and_loss_metrics():
    m = get_kind("edge").metric()
    m.update(torch.tensor([[[[1.0, 2.0, 0.0]]]]), torch.tensor([[[[0.5, NAN, 0.0]]]]))
    assert m.compute() == {"l1": pytest.approx(0.25)}
    acc = get_kind("class").metric(3)
    acc.update(
        torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]]), torch.tensor([0, 2, 2, -1])
    )
    assert acc.compute() == {"top1": pytest.approx(200 / 3)}
    mse = get_kind("regress").metric()
    mse.update(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0.0, NAN, 1.0]))
    assert mse.compute() == {"mse": pytest.approx(2.5)}
    # The loss metric is the dataset-level mean of the loss, whatever the batching.
    kind = get_kind("depth")
    lm = kind.loss_metric()
    pred, target = torch.rand(4, 1, 3, 3), torch.rand(4, 1, 3, 3)
    target[0] = NAN
    lm.update(pred[:2], target[:2])
    lm.update(pred[2:], target[2:])
    assert lm.compute()["loss"] == pytest.approx(kind.loss(pred, target).item(), rel=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_empty_metrics_are_nan_and_names_match(kind):
    k = get_kind(kind)
    m = k.metric(k.default_channels)
    out = m.compute()
    assert tuple(out) == tuple(mi.name for mi in k.metrics) == m.names
    assert all(math.isnan(v) for v in out.values())
    m.update(torch.zeros(1, k.default_channels), None)  # a batch without targets changes nothing


# --- Δt: AutoMTL Eq. 5, checked against the paper's Tables 2/3 (CityScapes) and 7/5 (Taskonomy) --

_STL_SEG = {"miou": 36.5, "pixel_acc": 73.8}
_STL_DEPTH = {"abs_err": 0.026, "rel_err": 0.38, "delta1": 57.5, "delta2": 76.9, "delta3": 87.0}
# model: (seg metrics, depth metrics, published Δt1, Δt2, Δt)
_TABLE2 = {
    "multi-task": ((42.7, 68.1), (0.026, 0.39, 58.8, 80.5, 89.9), (4.6, 1.5, 3.1)),
    "cross-stitch": ((40.3, 74.3), (0.017, 0.34, 70.0, 86.3, 93.1), (5.5, 17.2, 11.4)),
    "mtan": ((40.8, 74.3), (0.017, 0.36, 71.0, 86.3, 92.8), (6.2, 16.4, 11.3)),
    "adashare": ((40.6, 74.7), (0.018, 0.37, 71.4, 86.8, 93.1), (6.2, 15.5, 10.9)),
    "automtl": ((42.8, 74.8), (0.018, 0.33, 70.0, 86.6, 93.4), (9.3, 17.1, 13.2)),
}


@pytest.mark.parametrize("model", sorted(_TABLE2))
def test_delta_t_reproduces_the_paper(model):
    seg, depth, (dt1, dt2, dt) = _TABLE2[model]
    r1 = relative_performance(dict(zip(_STL_SEG, seg, strict=True)), _STL_SEG, "seg")
    r2 = relative_performance(dict(zip(_STL_DEPTH, depth, strict=True)), _STL_DEPTH, "depth")
    # The tables round to one decimal (and their inputs to 2-3 digits).
    assert r1 == pytest.approx(dt1, abs=0.06)
    assert r2 == pytest.approx(dt2, abs=0.06)
    assert delta_t([r1, r2]) == pytest.approx(dt, abs=0.06)


def test_delta_t_by_hand_and_taskonomy_losses():
    # One higher-is-better metric up 10 %, one lower-is-better metric up (worse) 20 %: (10 - 20) / 2.
    r = relative_performance({"miou": 55.0, "pixel_acc": 80.0}, {"miou": 50.0, "pixel_acc": 100.0}, "seg")
    assert r == pytest.approx((10.0 - 20.0) / 2)
    assert relative_performance(
        {"abs_err": 1.2}, {"abs_err": 1.0}, "depth", keys=["abs_err"]
    ) == pytest.approx(-20)
    # Tiny-Taskonomy scores tasks by their loss (Table 7 -> Table 5, AutoMTL row).
    assert relative_performance({"loss": 0.558}, {"loss": 0.575}, "seg", keys=["loss"]) == pytest.approx(
        3.0, abs=0.05
    )
    assert relative_performance({"l1": 0.191}, {"l1": 0.197}, "keypoint") == pytest.approx(3.0, abs=0.05)
    assert relative_performance({"l1": 0.197}, {"l1": 0.212}, "edge") == pytest.approx(7.1, abs=0.05)
    assert delta_t([1.0, 2.0, 6.0]) == pytest.approx(3.0)


def test_delta_t_errors():
    with pytest.raises(MtcError, match="lack 'pixel_acc'"):
        relative_performance({"miou": 1.0}, _STL_SEG, "seg")
    with pytest.raises(MtcError, match="baseline 'miou' is 0.0"):
        relative_performance({"miou": 1.0}, {"miou": 0.0}, "seg", keys=["miou"])
    with pytest.raises(MtcError, match="no metric 'top5'"):
        relative_performance({}, {}, "class", keys=["top5"])
    with pytest.raises(MtcError, match="unknown task kind"):
        relative_performance({}, {}, "nope")
    with pytest.raises(MtcError):
        delta_t([])


def test_kind_registry_options():
    assert get_kind("seg", ignore_index=0).ignore_index == 0
    assert get_kind("seg").ignore_index == 255
    with pytest.raises(MtcError, match="has no option colour"):
        get_kind("seg", colour=1)
    for name, k in KINDS.items():
        assert k.name == name
        assert k.channels_problem(k.default_channels) is None
        assert all(k.higher_is_better(m.name) == m.higher_is_better for m in k.metrics)
