"""``scenes``: ray-cast indoor rooms with related dense labels, the offline stand-in for NYUv2.

Each sample is a random room seen by a pinhole camera (horizontal field of view ``fov``) tilted
down at a random pitch, with small yaw and roll: a floor (checkered texture), side and back walls,
a ceiling, flat decals on them (rug, painting, window, door) and objects standing on the floor
(spheres, rotated boxes of three proportions, cylinders of two). Every pixel's ray is intersected
analytically with every surface and the nearest hit wins (a z-buffer), so all targets come from
one piece of geometry and agree with each other the way NYUv2's do:

- ``seg``: the class of the visible surface (:data:`CLASSES`, 13 like NYUv2-13); ``clutter``
  objects are unlabelled (255, the ``seg`` kind's ignore index). With fewer than 13 channels the
  classes from ``channels - 1`` on merge into the last one.
- ``depth``: z-depth in metres along the camera's optical axis (> 0 everywhere: the room is
  closed), ``(1, H, W)``.
- ``normal``: the visible surface's unit normal in camera coordinates (x right, y down, z
  forward), facing the camera; analytic for planes, spheres, box faces, cylinder sides and caps.
- ``edge``: 1.0 on both pixels of every 4-neighbour pair that lies on different surfaces (object,
  plane, decal, or box face / cylinder cap), else 0.0: occlusion boundaries (depth jumps), creases
  (normal jumps) and label boundaries, ``(1, H, W)``.
- ``keypoint``: a heat map, the maximum of Gaussians (``kp_sigma``) at the visible keypoints: sphere
  centres, box corners, cylinder top centres and the room's back corners, ``(1, H, W)`` in [0, 1].
- ``class``: the number of visible objects (covering at least ``max(2, 0.1%)`` of the pixels,
  clutter included), capped at ``channels - 1``.
- ``regress``: the mean depth of the image, ``(1,)``.

The image is Lambertian shading of per-class albedo (jittered per instance) under a random
directional light plus ambient, attenuated with distance, with Gaussian pixel noise, in [0, 1];
RGB for 3 input channels, luminance for 1, R, G, B repeated otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from mtc.data.common import (
    TRAIN,
    VAL,
    GeneratedDataset,
    as_sample,
    check_positive,
    rng,
    to_channels,
    wrap_partial,
)
from mtc.errors import MtcError
from mtc.tasks.kinds import get_kind
from mtc.tasks.spec import TaskSpec

__all__ = ["CLASSES", "Scene", "make_scenes", "render_scene"]

CLASSES = (
    "floor", "wall", "ceiling",                      # planes
    "rug", "painting", "window", "door",             # decals on the planes
    "ball", "crate", "cabinet", "table",             # sphere and three box shapes
    "barrel", "pillar",                              # two cylinder shapes
)  # fmt: skip
FLOOR, WALL, CEILING, RUG, PAINTING, WINDOW, DOOR, BALL, CRATE, CABINET, TABLE, BARREL, PILLAR = range(13)
OBJECT_CLASSES = (BALL, CRATE, CABINET, TABLE, BARREL, PILLAR)
IGNORE = 255  # the seg kind's default ignore_index: clutter is unlabelled
_ALBEDO = np.array(
    [
        (0.60, 0.45, 0.30),  # floor: wood
        (0.80, 0.78, 0.72),  # wall
        (0.93, 0.93, 0.93),  # ceiling
        (0.65, 0.15, 0.15),  # rug
        (0.20, 0.35, 0.70),  # painting
        (0.70, 0.88, 0.98),  # window
        (0.40, 0.25, 0.12),  # door
        (0.95, 0.55, 0.10),  # ball
        (0.75, 0.62, 0.35),  # crate
        (0.35, 0.35, 0.42),  # cabinet
        (0.25, 0.55, 0.30),  # table
        (0.55, 0.20, 0.50),  # barrel
        (0.88, 0.86, 0.60),  # pillar
    ]
)
_DENSE_ONE_CHANNEL = ("depth", "edge", "keypoint")


@dataclass
class Scene:
    """The per-pixel buffers of one rendered scene (``H, W`` arrays unless noted)."""

    rgb: np.ndarray  # (3, H, W) float32 in [0, 1]
    label: np.ndarray  # int64 class index, or IGNORE
    depth: np.ndarray  # float32 > 0
    normal: np.ndarray  # (3, H, W) float32 unit, camera frame
    surface: np.ndarray  # int64 surface id (object/plane/decal and face)
    edge: np.ndarray  # float32 0/1
    keypoint: np.ndarray  # float32 in [0, 1]
    visible_objects: int
    keypoints: list[tuple[float, float]] = field(default_factory=list)  # (u, v) pixel coordinates


class _Buffers:
    """Z-buffer over the flattened pixels: nearest hit's t, normal (world), class, albedo, surface."""

    def __init__(self, n: int) -> None:
        self.t = np.full(n, np.inf)
        self.normal = np.zeros((3, n))
        self.label = np.zeros(n, dtype=np.int64)
        self.albedo = np.zeros((3, n))
        self.surface = np.full(n, -1, dtype=np.int64)

    def hit(self, t: np.ndarray, normal: np.ndarray, label: int, albedo: np.ndarray, surface: np.ndarray | int) -> None:
        win = t < self.t
        if not win.any():
            return
        self.t[win] = t[win]
        self.normal[:, win] = normal[:, win] if normal.ndim == 2 else normal[:, None]
        self.label[win] = label
        self.albedo[:, win] = albedo[:, None]
        self.surface[win] = surface[win] if isinstance(surface, np.ndarray) else surface


def _rot_y(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _albedo(g: np.random.Generator, cls: int) -> np.ndarray:
    base = _ALBEDO[cls] if cls != IGNORE else np.full(3, g.uniform(0.3, 0.8))
    return np.clip(base * g.uniform(0.85, 1.15) + g.uniform(-0.04, 0.04, 3), 0.02, 1.0)


def _plane_t(o: np.ndarray, d: np.ndarray, n: np.ndarray, k: float) -> np.ndarray:
    """Ray parameter of plane ``n·p = k`` (``n`` facing the camera); inf where it is not hit."""
    den = n @ d
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (k - n @ o) / den
    return np.where((den < -1e-12) & (t > 1e-9), t, np.inf)


def _sphere_t(o: np.ndarray, d: np.ndarray, c: np.ndarray, r: float) -> np.ndarray:
    oc = o - c
    a = (d * d).sum(0)
    b = oc @ d
    disc = b * b - a * (oc @ oc - r * r)
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > 1e-9), t, np.inf)


def _box_hit(o: np.ndarray, d: np.ndarray, c: np.ndarray, half: np.ndarray, rot: np.ndarray):
    """Slab test in the box frame: ray parameter (inf on a miss), world normal, face index 0..5."""
    ol = rot.T @ (o - c)
    dl = rot.T @ d
    safe = np.where(np.abs(dl) < 1e-12, 1e-12, dl)  # a ray parallel to a slab misses it or stays in it
    t1 = (-half[:, None] - ol[:, None]) / safe
    t2 = (half[:, None] - ol[:, None]) / safe
    near = np.minimum(t1, t2)
    far = np.maximum(t1, t2)
    axis = near.argmax(0)
    tn = near.max(0)
    tf = far.min(0)
    t = np.where((tn <= tf) & (tn > 1e-9), tn, np.inf)  # the camera is outside every box
    cols = np.arange(d.shape[1])
    nl = np.zeros_like(d)
    nl[axis, cols] = -np.sign(dl[axis, cols])
    face = axis * 2 + (dl[axis, cols] > 0)
    return t, rot @ nl, face


def _cylinder_hit(o: np.ndarray, d: np.ndarray, cx: float, cz: float, r: float, h: float):
    """Vertical cylinder on the floor (y in [0, h]): ray parameter, world normal, face (0 side, 1 cap)."""
    ox, oz = o[0] - cx, o[2] - cz
    a = d[0] ** 2 + d[2] ** 2
    b = 2.0 * (ox * d[0] + oz * d[2])
    cc = ox * ox + oz * oz - r * r
    disc = b * b - 4.0 * a * cc
    with np.errstate(invalid="ignore", divide="ignore"):
        ts = (-b - np.sqrt(disc)) / (2.0 * a)
    ys = o[1] + ts * d[1]
    ts = np.where((disc >= 0) & (ts > 1e-9) & (ys >= 0) & (ys <= h), ts, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = (h - o[1]) / d[1]
    px, pz = o[0] + tc * d[0] - cx, o[2] + tc * d[2] - cz
    tc = np.where((d[1] < 0) & (tc > 1e-9) & (px * px + pz * pz <= r * r), tc, np.inf)  # cap seen from above
    cap = tc < ts
    t = np.where(cap, tc, ts)
    p = o[:, None] + _finite_or_zero(t) * d
    side_n = np.stack([(p[0] - cx) / r, np.zeros_like(t), (p[2] - cz) / r])
    normal = np.where(cap, np.array([0.0, 1.0, 0.0])[:, None], side_n)
    return t, normal, cap.astype(np.int64)


@dataclass
class _Options:
    fov: float
    min_objects: int
    max_objects: int
    clutter: float
    noise: float
    kp_sigma: float


def render_scene(g: np.random.Generator, h: int, w: int, opt: _Options) -> Scene:
    """Draw a random room from ``g`` and ray-cast it at ``h x w``."""
    # --- camera: world y up; the camera looks along +z, pitched down ---------------------------
    cam = np.array([g.uniform(-0.4, 0.4), g.uniform(1.2, 1.7), 0.0])
    pitch, yaw, roll = np.radians(g.uniform(5, 25)), np.radians(g.uniform(-15, 15)), np.radians(g.uniform(-3, 3))
    fw = np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    right = _unit(np.cross(np.array([0.0, 1.0, 0.0]), fw))
    down = np.cross(right, fw)
    right, down = (
        math.cos(roll) * right + math.sin(roll) * down,
        -math.sin(roll) * right + math.cos(roll) * down,
    )
    f = 0.5 * w / math.tan(math.radians(opt.fov) / 2)
    u = (np.arange(w) + 0.5 - w / 2) / f
    v = (np.arange(h) + 0.5 - h / 2) / f
    uu, vv = np.meshgrid(u, v)
    # Unnormalised rays with unit forward component: the ray parameter t is the z-depth.
    d = right[:, None] * uu.ravel() + down[:, None] * vv.ravel() + fw[:, None]
    n_pix = h * w
    buf = _Buffers(n_pix)

    # --- room: planes with normals pointing inwards (towards the camera) -----------------------
    xl, xr = g.uniform(1.8, 3.5), g.uniform(1.8, 3.5)
    zb, hc = g.uniform(4.5, 8.0), g.uniform(2.6, 3.2)
    planes = [  # (normal, offset k of n·p = k, class, surface id)
        (np.array([0.0, 1.0, 0.0]), 0.0, FLOOR, 0),
        (np.array([0.0, -1.0, 0.0]), -hc, CEILING, 1),
        (np.array([0.0, 0.0, -1.0]), -zb, WALL, 2),
        (np.array([1.0, 0.0, 0.0]), -xl, WALL, 3),
        (np.array([-1.0, 0.0, 0.0]), -xr, WALL, 4),
    ]
    for n, k, cls, sid in planes:
        buf.hit(_plane_t(cam, d, n, k), n, cls, _albedo(g, cls), sid)

    # --- objects standing on the floor ---------------------------------------------------------
    half_fov = math.radians(opt.fov) / 2
    n_obj = int(g.integers(opt.min_objects, opt.max_objects + 1))
    # (world point, surface id of the object it lies inside, or -1 for points on surfaces)
    keypoints: list[tuple[np.ndarray, int]] = []
    for j in range(n_obj):
        sid = 16 * (j + 1)  # room for per-face ids
        cls = int(g.choice(OBJECT_CLASSES))
        label = IGNORE if g.random() < opt.clutter else cls
        albedo = _albedo(g, label)
        ang = yaw + g.uniform(-0.8, 0.8) * half_fov
        dist = g.uniform(1.5, max(1.6, zb - 1.0))
        x = float(np.clip(cam[0] + dist * math.sin(ang), -xl + 0.5, xr - 0.5))
        z = float(np.clip(dist * math.cos(ang), 1.2, zb - 0.5))
        if cls == BALL:
            r = g.uniform(0.15, 0.45)
            c = np.array([x, r, z])
            t = _sphere_t(cam, d, c, r)
            buf.hit(t, (cam[:, None] + _finite_or_zero(t) * d - c[:, None]) / r, label, albedo, sid)
            keypoints.append((c, sid))
        elif cls in (CRATE, CABINET, TABLE):
            if cls == CRATE:
                s = g.uniform(0.2, 0.4)
                half = np.array([s, s, s]) * g.uniform(0.9, 1.1, 3)
            elif cls == CABINET:
                half = np.array([g.uniform(0.25, 0.45), g.uniform(0.6, 1.0), g.uniform(0.2, 0.35)])
            else:
                half = np.array([g.uniform(0.4, 0.7), g.uniform(0.2, 0.4), g.uniform(0.3, 0.5)])
            rot = _rot_y(g.uniform(0.0, math.pi / 2))
            c = np.array([x, half[1], z])
            t, normal, face = _box_hit(cam, d, c, half, rot)
            buf.hit(t, normal, label, albedo, sid + face)
            for sx in (-1, 1):
                for sz in (-1, 1):
                    for sy in (-1, 1):
                        keypoints.append((c + rot @ (half * np.array([sx, sy, sz])), -1))
        else:  # BARREL, PILLAR
            if cls == BARREL:
                r, hh = g.uniform(0.2, 0.35), g.uniform(0.5, 1.0)
            else:
                r, hh = g.uniform(0.08, 0.15), g.uniform(1.5, hc)
            t, normal, face = _cylinder_hit(cam, d, x, z, r, hh)
            buf.hit(t, normal, label, albedo, sid + face)
            keypoints.append((np.array([x, hh, z]), -1))

    # --- decals: re-label (and re-colour) parts of the visible planes ---------------------------
    p = cam[:, None] + buf.t * d  # every pixel hits the room, so t is finite
    decal_sid = 8
    if g.random() < 0.6:  # rug on the floor
        rx, rz = g.uniform(-xl + 1, xr - 1), g.uniform(2.0, zb - 1.0)
        m = (buf.surface == 0) & (np.abs(p[0] - rx) < g.uniform(0.5, 1.0)) & (np.abs(p[2] - rz) < g.uniform(0.4, 0.9))
        _decal(buf, m, RUG, _albedo(g, RUG), decal_sid)
    decal_sid += 1
    for _ in range(int(g.integers(0, 3))):  # paintings on the back wall
        px, py = g.uniform(-xl + 0.6, xr - 0.6), g.uniform(1.2, min(2.2, hc - 0.4))
        m = (buf.surface == 2) & (np.abs(p[0] - px) < g.uniform(0.3, 0.6)) & (np.abs(p[1] - py) < g.uniform(0.25, 0.4))
        _decal(buf, m, PAINTING, _albedo(g, PAINTING), decal_sid)
        decal_sid += 1
    if g.random() < 0.6:  # window on a side wall
        wall = int(g.integers(3, 5))
        wz, wy = g.uniform(1.5, zb - 1.0), g.uniform(1.3, min(2.0, hc - 0.5))
        m = (buf.surface == wall) & (np.abs(p[2] - wz) < g.uniform(0.4, 0.8)) & (np.abs(p[1] - wy) < g.uniform(0.35, 0.5))
        _decal(buf, m, WINDOW, _albedo(g, WINDOW), decal_sid)
    decal_sid += 1
    if g.random() < 0.5:  # door on the back wall, reaching the floor
        dx, dh = g.uniform(-xl + 0.6, xr - 0.6), g.uniform(1.9, 2.2)
        m = (buf.surface == 2) & (np.abs(p[0] - dx) < g.uniform(0.4, 0.5)) & (p[1] < dh)
        _decal(buf, m, DOOR, _albedo(g, DOOR), decal_sid)
    for corner in ((-xl, 0.0, zb), (xr, 0.0, zb), (-xl, hc, zb), (xr, hc, zb)):
        keypoints.append((np.array(corner), -1))

    # --- shading ------------------------------------------------------------------------------
    albedo = buf.albedo
    floor = buf.label == FLOOR
    checker = (np.floor(p[0] / 0.5) + np.floor(p[2] / 0.5)) % 2  # perspective cue on the floor
    albedo[:, floor] *= np.where(checker[floor] > 0, 1.1, 0.9)
    light = _unit(np.array([g.uniform(-0.6, 0.6), 1.0, g.uniform(-0.8, 0.2)]))
    ambient = g.uniform(0.25, 0.4)
    shade = ambient + (1.0 - ambient) * np.clip(light @ buf.normal, 0.0, None)
    rgb = albedo * shade * np.exp(-0.04 * buf.t) + g.normal(0.0, opt.noise, (3, n_pix))
    rgb = np.clip(rgb, 0.0, 1.0)

    # --- targets ------------------------------------------------------------------------------
    depth = buf.t.reshape(h, w)
    surface = buf.surface.reshape(h, w)
    basis = np.stack([right, down, fw])  # world -> camera
    normal = basis @ buf.normal
    normal /= np.linalg.norm(normal, axis=0, keepdims=True)
    edge = np.zeros((h, w), dtype=bool)
    dv = surface[1:, :] != surface[:-1, :]
    dh = surface[:, 1:] != surface[:, :-1]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    owner = surface // 16
    counts = np.bincount(owner.ravel(), minlength=n_obj + 1)[1:]
    visible = int((counts >= max(2, n_pix // 1000)).sum())
    heat, kp_uv = _heatmap(keypoints, cam, right, down, fw, f, depth, owner, opt.kp_sigma * h)
    return Scene(
        rgb=rgb.reshape(3, h, w).astype(np.float32),
        label=buf.label.reshape(h, w),
        depth=depth.astype(np.float32),
        normal=normal.reshape(3, h, w).astype(np.float32),
        surface=surface,
        edge=edge.astype(np.float32),
        keypoint=heat,
        visible_objects=visible,
        keypoints=kp_uv,
    )


def _finite_or_zero(t: np.ndarray) -> np.ndarray:
    """``t`` with misses (inf) set to 0, so normals computed at every pixel stay finite."""
    return np.where(np.isfinite(t), t, 0.0)


def _decal(buf: _Buffers, mask: np.ndarray, cls: int, albedo: np.ndarray, sid: int) -> None:
    buf.label[mask] = cls
    buf.albedo[:, mask] = albedo[:, None]
    buf.surface[mask] = sid


def _heatmap(keypoints, cam, right, down, fw, f, depth, owner, sigma):
    """Gaussians at the visible keypoints.

    A point on a surface (corner, cap centre) is visible when nothing lies clearly in front of it
    (3% + 2 cm); a point inside an object (sphere centre) when that object covers its pixel.
    """
    h, w = depth.shape
    heat = np.zeros((h, w))
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    uv = []
    for point, inside in keypoints:
        rel = point - cam
        z = rel @ fw
        if z <= 1e-6:
            continue
        u = f * (rel @ right) / z + w / 2
        v = f * (rel @ down) / z + h / 2
        if not (0 <= u < w and 0 <= v < h):
            continue
        iu, iv = int(u), int(v)
        # A sphere's centre is inside it: it counts as seen when the sphere covers its pixel.
        if depth[iv, iu] < z * 0.97 - 0.02 and not (inside >= 0 and owner[iv, iu] == inside // 16):
            continue
        uv.append((float(u), float(v)))
        heat = np.maximum(heat, np.exp(-((xx - u) ** 2 + (yy - v) ** 2) / (2.0 * sigma * sigma)))
    return heat.astype(np.float32), uv


def _check_tasks(tasks: list[TaskSpec]) -> None:
    for t in tasks:
        get_kind(t.kind)  # unknown kinds fail here with the known list
        if t.kind in _DENSE_ONE_CHANNEL + ("regress",) and t.channels != 1:
            raise MtcError(f"scenes gives task '{t.name}' ({t.kind}) 1 channel, the task has {t.channels}")
        if t.kind not in ("seg", "normal", "class", "regress") + _DENSE_ONE_CHANNEL:
            raise MtcError(f"scenes has no target for task '{t.name}' of kind {t.kind}")


def scene_targets(scene: Scene, tasks: list[TaskSpec]) -> dict[str, np.ndarray]:
    """The targets of ``tasks`` from a rendered scene (see the module docstring)."""
    out: dict[str, np.ndarray] = {}
    for t in tasks:
        if t.kind == "seg":
            lab = scene.label
            if t.channels < len(CLASSES):  # merge the classes that do not fit into the last channel
                lab = np.where(lab == IGNORE, IGNORE, np.minimum(lab, t.channels - 1))
            out[t.name] = lab.astype(np.int64)
        elif t.kind == "depth":
            out[t.name] = scene.depth[None]
        elif t.kind == "normal":
            out[t.name] = scene.normal
        elif t.kind == "edge":
            out[t.name] = scene.edge[None]
        elif t.kind == "keypoint":
            out[t.name] = scene.keypoint[None]
        elif t.kind == "class":
            out[t.name] = np.array(min(scene.visible_objects, t.channels - 1), dtype=np.int64)
        elif t.kind == "regress":
            out[t.name] = np.array([scene.depth.mean()], dtype=np.float32)
    return out


def make_scenes(
    tasks: list[TaskSpec],
    input_shape: tuple[int, int, int],
    seed: int,
    *,
    n_train: int = 1000,
    n_val: int = 200,
    min_objects: int = 1,
    max_objects: int = 5,
    clutter: float = 0.1,
    noise: float = 0.02,
    fov: float = 60.0,
    kp_sigma: float = 0.03,
    cache: bool = False,
    label_fraction: float = 1.0,
    partial_tasks: str = "",
) -> tuple[Dataset, Dataset]:
    """Train and val sets of rendered rooms at the backbone's resolution.

    Args:
        tasks: tasks of kinds seg, depth, normal, edge, keypoint, class or regress (the kind
            picks the target; depth, edge, keypoint and regress have 1 channel).
        input_shape: ``(C, H, W)``: scenes are rendered at ``H x W``.
        seed: sample ``i`` of split s is drawn from ``np.random.default_rng([seed, s, i])``.
        n_train, n_val: samples per split.
        min_objects, max_objects: objects per room (uniform).
        clutter: probability that an object is unlabelled clutter (seg 255).
        noise: standard deviation of the Gaussian pixel noise.
        fov: horizontal field of view, degrees.
        kp_sigma: keypoint Gaussian width as a fraction of the image height.
        cache: keep rendered samples in memory (faster epochs after the first, more memory).
        label_fraction: share of training samples that keep each task's target.
        partial_tasks: comma-separated tasks ``label_fraction`` applies to (default: all).
    """
    _check_tasks(tasks)
    check_positive("n_train", n_train)
    check_positive("n_val", n_val)
    if not 0 <= min_objects <= max_objects:
        raise MtcError(f"options need 0 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if not 0.0 <= clutter <= 1.0:
        raise MtcError(f"option clutter must lie in [0, 1], got {clutter}")
    if noise < 0 or not 10.0 <= fov <= 120.0 or kp_sigma <= 0:
        raise MtcError(f"options need noise >= 0, 10 <= fov <= 120, kp_sigma > 0; got {noise}, {fov}, {kp_sigma}")
    c, h, w = input_shape
    opt = _Options(fov, min_objects, max_objects, clutter, noise, kp_sigma)
    tasks = list(tasks)

    def maker(split: int):
        def make(i: int):
            scene = render_scene(rng(seed, split, i), h, w, opt)
            return as_sample(to_channels(scene.rgb, c), scene_targets(scene, tasks))

        return make

    train = GeneratedDataset(n_train, maker(TRAIN), cache=cache)
    val = GeneratedDataset(n_val, maker(VAL), cache=cache)
    return wrap_partial(train, tasks, seed, label_fraction, partial_tasks), val
