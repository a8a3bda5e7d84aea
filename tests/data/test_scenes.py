"""``scenes``: formats, determinism, and consistency of seg / depth / normal / edge / keypoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtc.data import load_data, make_loader
from mtc.data.common import rng
from mtc.data.scenes import BALL, BARREL, CLASSES, IGNORE, PILLAR, _Options, render_scene
from mtc.errors import MtcError
from mtc.tasks.kinds import get_kind
from mtc.tasks.spec import parse_tasks

ALL = parse_tasks("seg,depth,normal,edge,keypoint,n:class,md:regress")


def _scenes(spec="scenes?n_train=8&n_val=4", tasks=ALL, shape=(3, 32, 32), seed=0):
    return load_data(spec, tasks, shape, seed)


def _bytes(sample) -> bytes:
    img, t = sample
    return img.numpy().tobytes() + b"".join(k.encode() + t[k].numpy().tobytes() for k in sorted(t))


def test_formats_and_ranges():
    train, val = _scenes()
    assert (len(train), len(val)) == (8, 4)
    for i in range(4):
        img, t = train[i]
        assert img.dtype == torch.float32 and img.shape == (3, 32, 32)
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert set(t) == {k.name for k in ALL}
        assert t["seg"].dtype == torch.int64 and t["seg"].shape == (32, 32)
        labels = t["seg"][t["seg"] != IGNORE]
        assert labels.numel() and int(labels.max()) < 13
        assert t["depth"].dtype == torch.float32 and t["depth"].shape == (1, 32, 32)
        assert torch.isfinite(t["depth"]).all() and (t["depth"] > 0).all()
        assert t["normal"].shape == (3, 32, 32)
        assert torch.allclose(t["normal"].norm(dim=0), torch.ones(32, 32), atol=1e-5)
        assert t["edge"].shape == (1, 32, 32) and set(t["edge"].unique().tolist()) <= {0.0, 1.0}
        assert t["keypoint"].shape == (1, 32, 32) and 0 <= t["keypoint"].min() and t["keypoint"].max() <= 1
        assert t["n"].dtype == torch.int64 and t["n"].shape == () and 0 <= int(t["n"]) <= 5
        assert t["md"].shape == (1,) and t["md"].item() == pytest.approx(t["depth"].mean().item(), rel=1e-5)


def test_deterministic_by_seed_and_index():
    a_train, a_val = _scenes(seed=3)
    b_train, b_val = _scenes(seed=3)
    # same seed: same bytes, whatever the access order
    assert [_bytes(a_train[i]) for i in range(4)] == [_bytes(b_train[i]) for i in reversed(range(4))][::-1]
    assert _bytes(a_val[1]) == _bytes(b_val[1])
    c_train, _ = _scenes(seed=4)
    assert _bytes(a_train[0]) != _bytes(c_train[0])
    assert _bytes(a_train[0]) != _bytes(a_val[0])  # the splits are different streams
    cached, _ = _scenes("scenes?n_train=8&n_val=4&cache=true", seed=3)
    assert _bytes(cached[2]) == _bytes(cached[2]) == _bytes(a_train[2])


def _render(seed, h=48, w=48, **kw):
    opt = dict(fov=60.0, min_objects=1, max_objects=5, clutter=0.1, noise=0.02, kp_sigma=0.03)
    opt.update(kw)
    return render_scene(rng(seed, 0, 0), h, w, _Options(**opt))


def _rays(h, w, fov=60.0):
    f = 0.5 * w / math.tan(math.radians(fov) / 2)
    v, u = np.mgrid[0:h, 0:w] + 0.5
    return np.stack([(u - w / 2) / f, (v - h / 2) / f, np.ones((h, w))])


@pytest.mark.parametrize("seed", range(6))
def test_geometry_is_consistent(seed):
    s = _render(seed)
    h, w = s.depth.shape
    ray = _rays(h, w)
    n = s.normal.astype(np.float64)
    assert ((n * ray).sum(0) < 0).all()  # normals face the camera
    points = ray * s.depth  # camera-frame 3-D points
    curved = np.isin(s.label, [BALL, BARREL, PILLAR]) | (s.label == IGNORE)
    for axis in (0, 1):  # vertical and horizontal neighbours
        a = [slice(None), slice(None)]
        b = [slice(None), slice(None)]
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        same = s.surface[tuple(a)] == s.surface[tuple(b)]
        # a planar surface: the step between neighbours is perpendicular to the normal
        planar = same & ~curved[tuple(a)]
        step = points[(slice(None), *a)] - points[(slice(None), *b)]
        cos = np.abs((step * n[(slice(None), *a)]).sum(0)) / np.linalg.norm(step, axis=0)
        assert cos[planar].max() < 1e-3
        # edges: both pixels of a pair on different surfaces, and only there
        e = s.edge.astype(bool)
        diff = ~same
        assert e[tuple(a)][diff].all() and e[tuple(b)][diff].all()
        label_jump = s.label[tuple(a)] != s.label[tuple(b)]
        assert diff[label_jump].all()
        rel = np.abs(s.depth[tuple(a)] - s.depth[tuple(b)]) / np.minimum(s.depth[tuple(a)], s.depth[tuple(b)])
        assert e[tuple(a)][rel > 0.3].all()  # depth jumps lie on edges
    interior = ~s.edge.astype(bool)
    assert interior.any() and s.edge.any()
    # every keypoint is a peak of the heat map
    for u, v in s.keypoints:
        assert s.keypoint[int(v), int(u)] > 0.5


def test_seg_channels_clutter_and_ignore_index():
    tasks = parse_tasks("seg:seg:4,full:seg:13")
    train, _ = _scenes("scenes?n_train=6&n_val=1&clutter=1.0", tasks)
    saw_ignore = False
    for i in range(6):
        _, t = train[i]
        full, small = t["full"], t["seg"]
        # objects are all clutter: no object class, and their pixels are unlabelled
        assert not np.isin(full.numpy(), [CLASSES.index(c) for c in ("ball", "crate", "table")]).any()
        saw_ignore |= bool((full == IGNORE).any())
        assert torch.equal(small == IGNORE, full == IGNORE)
        lab = small[small != IGNORE]
        assert int(lab.max()) <= 3
        assert torch.equal(small[full < 3], full[full < 3])  # classes below channels - 1 stay
        assert (small[(full >= 3) & (full != IGNORE)] == 3).all()  # the rest merge into the last
    assert saw_ignore
    train, _ = _scenes("scenes?n_train=4&n_val=1&clutter=0", tasks)
    assert all(not (train[i][1]["full"] == IGNORE).any() for i in range(4))


def test_image_channels_follow_the_backbone():
    tasks = parse_tasks("depth")
    rgb, _ = _scenes(tasks=tasks, shape=(3, 16, 24))
    gray, _ = _scenes(tasks=tasks, shape=(1, 16, 24))
    four, _ = _scenes(tasks=tasks, shape=(4, 16, 24))
    x3, x1, x4 = rgb[0][0], gray[0][0], four[0][0]
    assert x1.shape == (1, 16, 24) and x4.shape == (4, 16, 24)
    assert torch.allclose(x1[0], 0.299 * x3[0] + 0.587 * x3[1] + 0.114 * x3[2], atol=1e-6)
    assert torch.equal(x4[3], x3[0]) and torch.equal(rgb[0][1]["depth"], four[0][1]["depth"])


def test_partial_labels_drop_train_targets_only():
    tasks = parse_tasks("seg,depth")
    train, val = _scenes("scenes?n_train=40&n_val=4&label_fraction=0.5&partial_tasks=seg", tasks, (3, 8, 8))
    has_seg = [("seg" in train[i][1]) for i in range(40)]
    assert 8 <= sum(has_seg) <= 32
    assert all("depth" in train[i][1] for i in range(40))
    assert all("seg" in val[i][1] for i in range(4))
    assert [("seg" in train[i][1]) for i in range(40)] == has_seg  # the same draw every time
    images, targets = next(iter(make_loader(train, tasks, 40, shuffle=False)))
    missing = torch.tensor([not h for h in has_seg])
    assert (targets["seg"][missing] == 255).all() and (targets["seg"][~missing] != 255).any()
    assert get_kind("seg").loss(torch.randn(40, 13, 8, 8), targets["seg"]).isfinite()


@pytest.mark.parametrize(
    "tasks,spec,needle",
    [
        ("d:depth:2", "scenes", "1 channel"),
        ("r:regress:3", "scenes", "1 channel"),
        ("seg", "scenes?min_objects=3&max_objects=1", "min_objects <= max_objects"),
        ("seg", "scenes?label_fraction=2", "label_fraction"),
        ("seg", "scenes?partial_tasks=depth", "partial_tasks names task 'depth'"),
        ("seg", "scenes?n_train=0", "n_train must be positive"),
    ],
)
def test_errors(tasks, spec, needle):
    with pytest.raises(MtcError) as e:
        load_data(spec, parse_tasks(tasks), (3, 8, 8), 0)
    assert needle in str(e.value) and str(e.value).startswith(f"--data '{spec}'")


def test_a_small_cnn_learns_seg_and_depth():
    """Learnable signal: 30 Adam steps of a tiny CNN cut the validation losses."""
    torch.manual_seed(0)
    tasks = parse_tasks("seg,depth")
    train, val = load_data("scenes?n_train=128&n_val=32", tasks, (3, 24, 24), 0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 24, 3, padding=2, dilation=2), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 24, 3, padding=4, dilation=4), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 14, 1),
    )  # fmt: skip
    seg, depth = get_kind("seg"), get_kind("depth")
    xv, tv = next(iter(make_loader(val, tasks, 32, shuffle=False)))

    def val_losses():
        with torch.no_grad():
            y = net(xv)
            return seg.loss(y[:, :13], tv["seg"]).item(), depth.loss(y[:, 13:], tv["depth"]).item()

    before = val_losses()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loader = make_loader(train, tasks, 16, seed=0)
    step = 0
    while step < 30:
        for x, t in loader:
            y = net(x)
            loss = seg.loss(y[:, :13], t["seg"]) + depth.loss(y[:, 13:], t["depth"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 30:
                break
    after = val_losses()
    assert after[0] < 0.6 * before[0] and after[1] < 0.6 * before[1], (before, after)
