"""Losses: hand-computed values, PyTorch references, missing labels, and collation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtc.tasks.batch import collate_batch, collate_targets
from mtc.tasks.kinds import get_kind
from mtc.tasks.spec import parse_tasks

NAN = math.nan


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_seg_matches_torch_cross_entropy_with_ignore_index():
    g = _g()
    pred = torch.randn(2, 5, 6, 7, generator=g, requires_grad=True)
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    target[0, :3] = 255
    target[1, 2, 4] = 255
    ours = get_kind("seg").loss(pred, target)
    ref = F.cross_entropy(pred, target, ignore_index=255)
    assert torch.allclose(ours, ref, atol=1e-6)
    (g1,) = torch.autograd.grad(ours, pred)
    (g2,) = torch.autograd.grad(ref, pred)
    assert torch.allclose(g1, g2, atol=1e-7)


def test_seg_configurable_ignore_index_and_channel_dim_labels():
    g = _g(1)
    pred = torch.randn(1, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (1, 1, 4, 4), generator=g)
    target[0, 0, 0] = 0  # with ignore_index=0 these pixels are missing
    kind = get_kind("seg", ignore_index=0)
    assert torch.allclose(
        kind.loss(pred, target), F.cross_entropy(pred, target[:, 0], ignore_index=0), atol=1e-6
    )


def test_seg_by_hand():
    # Two pixels, two classes; the second is unlabelled. CE of logits (2, 0) for class 0.
    pred = torch.tensor([[[[2.0, 5.0]], [[0.0, -1.0]]]])
    target = torch.tensor([[[0, 255]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert get_kind("seg").loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_depth_l1_on_valid_pixels_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[1.5, NAN], [0.0, 2.0]]])  # (N, H, W) accepted; NaN and 0 are missing
    # Valid: |1 - 1.5| and |4 - 2| -> mean 1.25
    assert get_kind("depth").loss(pred, target).item() == pytest.approx(1.25)


def test_edge_keypoint_l1_match_torch_where_labelled():
    g = _g(2)
    pred = torch.randn(3, 1, 5, 5, generator=g)
    target = torch.rand(3, 1, 5, 5, generator=g)
    target[1, 0, 1:3] = NAN
    ok = torch.isfinite(target)
    ref = F.l1_loss(pred[ok], target[ok])
    for kind in ("edge", "keypoint"):
        assert torch.allclose(get_kind(kind).loss(pred, target), ref, atol=1e-6)
    # Zero is a valid edge/keypoint target (unlike depth).
    zero = torch.zeros(1, 1, 2, 2)
    assert get_kind("edge").loss(zero + 1, zero).item() == pytest.approx(1.0)


def test_normal_cosine_loss_by_hand_and_vs_torch():
    # Pixel 0: prediction (2, 0, 0) vs target (0, 0, 5): orthogonal -> loss 1.
    # Pixel 1: prediction (1, 1, 0) vs target (1, 0, 0): cos 45° -> loss 1 - 1/sqrt(2).
    # Pixel 2: zero-length target -> missing. Pixel 3: NaN target -> missing.
    pred = torch.tensor([[2.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).view(1, 3, 1, 4)
    target = torch.tensor([[0.0, 1.0, 0.0, NAN], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 1.0]]).view(1, 3, 1, 4)
    expected = (1.0 + 1.0 - 1 / math.sqrt(2)) / 2
    assert get_kind("normal").loss(pred, target).item() == pytest.approx(expected, rel=1e-6)

    g = _g(3)
    p = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    t = F.normalize(torch.randn(2, 3, 4, 4, generator=g), dim=1)
    ref = (1 - F.cosine_similarity(p, t, dim=1)).mean()
    ours = get_kind("normal").loss(p, t)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_class_and_regress_vs_torch():
    g = _g(4)
    logits = torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 3, -1, 2, 1, -1])
    ok = labels >= 0
    assert torch.allclose(
        get_kind("class").loss(logits, labels), F.cross_entropy(logits[ok], labels[ok]), atol=1e-6
    )
    pred = torch.randn(5, 2, generator=g)
    target = torch.randn(5, 2, generator=g)
    target[0, 1] = NAN
    target[3] = NAN
    fin = torch.isfinite(target)
    assert torch.allclose(
        get_kind("regress").loss(pred, target), F.mse_loss(pred[fin], target[fin]), atol=1e-6
    )
    # (N,) targets for a 1-channel head
    p1, t1 = torch.randn(4, 1, generator=g), torch.randn(4, generator=g)
    assert torch.allclose(get_kind("regress").loss(p1, t1), F.mse_loss(p1[:, 0], t1), atol=1e-6)


ALL_MISSING = {
    "seg": (torch.randn(2, 3, 4, 4), torch.full((2, 4, 4), 255)),
    "depth": (torch.randn(2, 1, 4, 4), torch.full((2, 1, 4, 4), NAN)),
    "normal": (torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)),
    "edge": (torch.randn(2, 1, 4, 4), torch.full((2, 1, 4, 4), NAN)),
    "keypoint": (torch.randn(2, 1, 4, 4), torch.full((2, 1, 4, 4), NAN)),
    "class": (torch.randn(2, 5), torch.tensor([-1, -1])),
    "regress": (torch.randn(2, 1), torch.full((2, 1), NAN)),
}


@pytest.mark.parametrize("kind", sorted(ALL_MISSING))
def test_all_missing_batch_is_zero_with_grad(kind):
    pred, target = ALL_MISSING[kind]
    pred = pred.clone().requires_grad_(True)
    for t in (target, None):
        loss = get_kind(kind).loss(pred, t)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        loss.backward()
        assert pred.grad is not None and torch.all(pred.grad == 0)
        pred.grad = None


@pytest.mark.parametrize("kind", sorted(ALL_MISSING))
def test_nan_targets_never_reach_gradients(kind):
    pred, target = ALL_MISSING[kind]
    pred = pred.clone().requires_grad_(True)
    target = target.clone()
    # Label one sample, leave the other missing.
    if kind == "seg":
        target[0] = 1
    elif kind == "class":
        target[0] = 1
    elif kind == "normal":
        target[0, 2] = 1.0
        target[1] = NAN
    else:
        target[0] = 0.5
    get_kind(kind).loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[1] == 0) and torch.any(pred.grad[0] != 0)


def test_sample_and_pixel_masks():
    g = _g(5)
    pred = torch.randn(3, 1, 4, 4, generator=g)
    target = torch.rand(3, 1, 4, 4, generator=g) + 0.5
    kind = get_kind("depth")
    per_sample = kind.loss(pred, target, mask=torch.tensor([True, False, True]))
    assert torch.allclose(per_sample, F.l1_loss(pred[[0, 2]], target[[0, 2]]), atol=1e-6)
    pixel = torch.zeros(3, 4, 4, dtype=torch.bool)
    pixel[1, 2, 3] = True
    assert torch.allclose(kind.loss(pred, target, mask=pixel), (pred[1, 0, 2, 3] - target[1, 0, 2, 3]).abs())
    with pytest.raises(ValueError, match="mask"):
        kind.loss(pred, target, mask=torch.ones(2, dtype=torch.bool))


def test_collate_fills_missing_samples():
    seg = collate_targets([torch.ones(2, 2, dtype=torch.long), None], get_kind("seg"))
    assert seg.dtype == torch.long and seg[1].eq(255).all() and seg[0].eq(1).all()
    depth = collate_targets([None, torch.ones(1, 2, 2)], get_kind("depth"))
    assert depth.dtype == torch.float32 and depth[0].isnan().all()
    assert collate_targets([None, None], get_kind("normal")) is None
    cls = collate_targets([3, None], get_kind("class"))
    assert cls.tolist() == [3, -1]
    with pytest.raises(ValueError, match="differ in shape"):
        collate_targets([torch.ones(2), torch.ones(3)], get_kind("regress"))

    tasks = parse_tasks("seg:seg:3,depth,class:class:4")
    samples = [
        (torch.zeros(3, 2, 2), {"seg": torch.zeros(2, 2, dtype=torch.long), "class": 2}),
        (torch.ones(3, 2, 2), {"seg": torch.ones(2, 2, dtype=torch.long)}),
    ]
    images, targets = collate_batch(samples, tasks)
    assert images.shape == (2, 3, 2, 2)
    assert targets["depth"] is None and targets["class"].tolist() == [2, -1]
    # A batch whose class labels are partly missing trains on the labelled sample only.
    logits = torch.randn(2, 4, requires_grad=True)
    loss = get_kind("class").loss(logits, targets["class"])
    assert torch.allclose(loss, F.cross_entropy(logits[:1], torch.tensor([2])))
