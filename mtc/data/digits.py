"""``digits``: classification tasks on scikit-learn's bundled 8x8 digits (1797 images, offline).

Each image (values 0..16, scaled to [0, 1]) is upsampled bilinearly to the backbone's ``(H, W)``
and repeated over its ``C`` channels. The task *name* picks the target; every task is of kind
``class`` and needs at least the listed channels:

=========  ========  ==========================================================================
name       classes   target
=========  ========  ==========================================================================
digit      10        the digit
parity     2         digit mod 2 (1 = odd)
ge5        2         1 when the digit is >= 5
rotated    4         k, when the input shows the digit rotated by k·90° counter-clockwise
=========  ========  ==========================================================================

``rotated`` is self-supervised rotation prediction (Gidaris et al., 2018): related to the digit
tasks (it needs the digit's shape) but different (it asks for the orientation, not the identity).
All tasks of a sample share one input, so when the task list has ``rotated`` (or ``rotate=true``)
every input is rotated by a seeded random ``k`` in ``0..rotations-1`` and the other tasks must
recognise rotated digits; without it inputs are upright. ``rotations=2`` gives the binary variant
(upright or rotated by 90°).

A task named ``NAME_k`` (``k`` digits, e.g. ``digit_2``, ``rotated_2``) is a copy of task ``NAME``:
the same targets on the same inputs. Two copies of the digit task and two of the rotated one are
mtc's counterpart of the Gumbel-Matrix paper's 4-MNISTs (tasks that should share with their copy).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtc.data.common import GeneratedDataset, check_fraction, rng, wrap_partial
from mtc.errors import MtcError
from mtc.tasks.spec import TaskSpec

__all__ = ["DIGIT_TASKS", "make_digits"]

#: task name -> (classes needed, label function of (digit, k))
DIGIT_TASKS = {
    "digit": 10,
    "parity": 2,
    "ge5": 2,
    "rotated": 4,
}


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    images.setflags(write=False)
    labels = d.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


_COPY = re.compile(r"(.+)_[0-9]+")


def base_task(name: str) -> str:
    """The task a name stands for: ``NAME`` itself, or ``NAME`` for a copy named ``NAME_k``."""
    if name in DIGIT_TASKS:
        return name
    m = _COPY.fullmatch(name)
    return m.group(1) if m is not None and m.group(1) in DIGIT_TASKS else name


def _label(name: str, digit: int, k: int) -> int:
    if name == "digit":
        return digit
    if name == "parity":
        return digit % 2
    if name == "ge5":
        return int(digit >= 5)
    return k  # rotated


#: Splits of at most this many output pixels keep their resized images (64x64: ~30 MB for all 1797).
_CACHE_PIXELS = 1797 * 64 * 64


def make_digits(
    tasks: list[TaskSpec],
    input_shape: tuple[int, int, int],
    seed: int,
    *,
    val_fraction: float = 0.2,
    rotate: bool | None = None,
    rotations: int = 4,
    label_fraction: float = 1.0,
    partial_tasks: str = "",
) -> tuple[Dataset, Dataset]:
    """Train and val sets of digit tasks.

    Args:
        tasks: tasks of kind ``class`` named ``digit``, ``parity``, ``ge5`` or ``rotated``, or
            ``NAME_k`` for a copy of ``NAME``.
        input_shape: ``(C, H, W)`` of the backbone.
        seed: seeds the train/val split and the rotations.
        val_fraction: share of the 1797 images held out for validation (a seeded permutation).
        rotate: rotate inputs (default: when a ``rotated`` task is present).
        rotations: number of orientations, 2 (0°, 90°) or 4 (0°, 90°, 180°, 270°).
        label_fraction: share of training samples that keep each task's target.
        partial_tasks: comma-separated tasks ``label_fraction`` applies to (default: all).
    """
    for t in tasks:
        if base_task(t.name) not in DIGIT_TASKS:
            raise MtcError(f"digits has no task '{t.name}' (known: {', '.join(DIGIT_TASKS)}); NAME_k names a copy "
                           "of task NAME")
        if t.kind != "class":
            raise MtcError(f"digits task '{t.name}' must be of kind class, got {t.kind}")
    if rotations not in (2, 4):
        raise MtcError(f"option rotations must be 2 or 4, got {rotations}")
    for t in tasks:
        need = rotations if base_task(t.name) == "rotated" else DIGIT_TASKS[base_task(t.name)]
        if t.channels < need:
            raise MtcError(f"digits task '{t.name}' has {need} classes; it needs at least {need} channels, got {t.channels}")
    check_fraction("val_fraction", val_fraction)
    images, labels = _load()
    n = len(labels)
    n_val = round(val_fraction * n)
    if not 0 < n_val < n:
        raise MtcError(f"option val_fraction={val_fraction} leaves an empty split of the {n} digits")
    perm = rng(seed, 0xD161).permutation(n)
    parts = (np.sort(perm[n_val:]), np.sort(perm[:n_val]))
    if rotate is None:
        rotate = any(base_task(t.name) == "rotated" for t in tasks)
    # One rotation per image (not per split or task list order), so it is part of the image's identity.
    ks = rng(seed, 0x0907).integers(0, rotations, n) if rotate else np.zeros(n, dtype=np.int64)
    c, h, w = input_shape
    names = [(t.name, base_task(t.name)) for t in tasks]

    def resized(j: np.ndarray) -> torch.Tensor:
        """Images ``j``, rotated and resized to ``(h, w)``: ``(len(j), 1, h, w)``."""
        img = torch.from_numpy(np.stack([np.rot90(images[i], int(ks[i])) for i in j]))
        # align_corners=False: pixel centres map like an image resize (as PIL/OpenCV do).
        return F.interpolate(img[:, None], size=(h, w), mode="bilinear", align_corners=False)

    def maker(index: np.ndarray):
        # Small inputs are resized once per split (a training step reads every image many times);
        # interpolation treats each image alone, so the values are those of a per-read resize.
        cache = resized(index) if len(index) * h * w <= _CACHE_PIXELS else None
        # Every task's label of every image of the split, made once (a tensor per read was a
        # seventh of a small model's training step).
        split = {name: torch.tensor([_label(base, int(labels[j]), int(ks[j])) for j in index], dtype=torch.int64)
                 for name, base in names}

        def make(i: int):
            j = int(index[i])
            up = cache[i] if cache is not None else resized(np.array([j]))[0]
            image = up.expand(c, h, w).clone()
            return image, {name: split[name][i].clone() for name, _ in names}

        return make

    train = GeneratedDataset(len(parts[0]), maker(parts[0]))
    val = GeneratedDataset(len(parts[1]), maker(parts[1]))
    # Which sklearn images each split holds (tests compare labels against sklearn's).
    train.source_index, val.source_index = parts  # type: ignore[attr-defined]
    train.rotation = val.rotation = ks  # type: ignore[attr-defined]
    return wrap_partial(train, tasks, seed, label_fraction, partial_tasks), val
