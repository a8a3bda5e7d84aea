"""Pieces the built-in generators share: lazy seeded datasets, partial labels, task checks."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mtc.errors import MtcError
from mtc.tasks.spec import TaskSpec

__all__ = [
    "TRAIN",
    "VAL",
    "GeneratedDataset",
    "PartialLabels",
    "check_fraction",
    "fixed_samples",
    "check_positive",
    "rng",
    "to_channels",
    "wrap_partial",
]

#: stream words of the two splits: sample i of split s is drawn from ``rng(seed, s, i)``
TRAIN, VAL = 0, 1
Sample = tuple[torch.Tensor, dict[str, torch.Tensor]]


def rng(seed: int, *words: int) -> np.random.Generator:
    """A NumPy generator for ``(seed, *words)``: independent streams, any int seed (negatives too)."""
    return np.random.default_rng([int(seed) % (1 << 64), *(int(w) % (1 << 64) for w in words)])


def name_word(name: str) -> int:
    """A stable int for a name (``hash()`` is salted per process)."""
    return zlib.crc32(name.encode())


class GeneratedDataset(Dataset):
    """A map-style dataset whose sample ``i`` is ``make(i)``, computed on access.

    Nothing is stored unless ``cache`` is set, so memory stays small whatever ``n``; ``make``
    must be a pure function of the index (the generators seed a NumPy generator with
    ``(seed, split, i)``), which makes every sample reproducible in any access order.

    Args:
        n: number of samples.
        make: ``index -> (image, {task: target})``.
        cache: keep samples once made (trades memory for the generation time of later epochs).
    """

    #: sample ``i`` is the same whenever it is read (:func:`fixed_samples`)
    fixed_samples = True

    def __init__(self, n: int, make: Callable[[int], Sample], *, cache: bool = False) -> None:
        self.n = int(n)
        self.make = make
        self._cache: dict[int, Sample] | None = {} if cache else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        i = int(index)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"sample {index} out of range for a dataset of {self.n}")
        if self._cache is None:
            return self.make(i)
        if i not in self._cache:
            self._cache[i] = self.make(i)
        image, targets = self._cache[i]
        return image, dict(targets)  # a fresh dict: callers (PartialLabels) may drop keys


class PartialLabels(Dataset):
    """Drops each task's target on a seeded random share of samples (partial-label training).

    Whether sample ``i`` keeps task ``t``'s target is drawn from ``rng(seed, crc32(t), i)``, so it
    does not depend on the task list's order or on which other tasks are present.

    Args:
        dataset: the dataset to wrap.
        fraction: probability that a target is kept, in [0, 1].
        seed: seed of the draws.
        tasks: the task names to thin out (default: all).
    """

    def __init__(self, dataset: Dataset, fraction: float, seed: int, tasks: Iterable[str] | None = None) -> None:
        self.dataset = dataset
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.tasks = None if tasks is None else frozenset(tasks)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def keeps(self, task: str, index: int) -> bool:
        """Whether sample ``index`` keeps ``task``'s target."""
        if self.tasks is not None and task not in self.tasks:
            return True
        return bool(rng(self.seed, 0x9A27, name_word(task), index).random() < self.fraction)

    def __getitem__(self, index: int) -> Sample:
        image, targets = self.dataset[index]
        i = int(index) % len(self)
        return image, {k: v for k, v in targets.items() if self.keeps(k, i)}


def fixed_samples(dataset: Any) -> bool:
    """Whether sample ``i`` of ``dataset`` is the same whenever it is read, so that checking it once
    is enough (the trainer then checks each sample on its first read only).

    True for :class:`GeneratedDataset` (its ``make`` is a pure function of the index), for
    :class:`PartialLabels` and ``torch.utils.data.Subset`` over such a dataset, and for a plug-in's
    dataset whose class sets ``fixed_samples = True``; anything else (random augmentation, data read
    from a changing source) is checked on every read.
    """
    ds = dataset
    while isinstance(ds, PartialLabels | torch.utils.data.Subset):
        ds = ds.dataset
    return getattr(type(ds), "fixed_samples", False) is True


def check_fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise MtcError(f"option {name} must lie in [0, 1], got {value}")
    return float(value)


def check_positive(name: str, value: int) -> int:
    if value <= 0:
        raise MtcError(f"option {name} must be positive, got {value}")
    return int(value)


def wrap_partial(
    train: Dataset, tasks: Sequence[TaskSpec], seed: int, label_fraction: float, partial_tasks: str
) -> Dataset:
    """``train`` wrapped in :class:`PartialLabels` when ``label_fraction < 1`` (the options of every built-in).

    ``partial_tasks`` is a comma-separated list of task names (empty: all tasks).
    """
    check_fraction("label_fraction", label_fraction)
    names = [s.strip() for s in partial_tasks.split(",") if s.strip()]
    known = {t.name for t in tasks}
    bad = [n for n in names if n not in known]
    if bad:
        raise MtcError(f"option partial_tasks names task '{bad[0]}', which is not in --tasks ({', '.join(known)})")
    if label_fraction >= 1.0:
        return train
    return PartialLabels(train, label_fraction, seed, names or None)


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """``(3, H, W)`` colour to ``channels``: as is for 3, luminance for 1, else R, G, B repeated."""
    if channels == 3:
        return rgb
    if channels == 1:
        return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]
    return rgb[np.arange(channels) % 3]


def as_sample(image: np.ndarray, targets: dict[str, Any]) -> Sample:
    """NumPy arrays to tensors (float32 images; targets keep their dtype)."""
    img = torch.from_numpy(np.array(image, dtype=np.float32, order="C"))
    # np.array keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    return img, {k: torch.from_numpy(np.array(v, order="C")) for k, v in targets.items()}
