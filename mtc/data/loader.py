"""Deterministic batching of ``(image, {task: target})`` datasets, and the train1/train2 split."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from mtc.errors import MtcError
from mtc.tasks.batch import collate_batch
from mtc.tasks.spec import TaskSpec

__all__ = ["EpochSampler", "make_loader", "split"]


class EpochSampler(Sampler[int]):
    """Sample order that is a function of ``(seed, epoch)`` only.

    Each pass over the sampler uses the current epoch and then advances it, so successive epochs
    differ while a resumed run that calls :meth:`set_epoch` sees exactly the order an
    uninterrupted run saw (a shared ``torch.Generator`` would depend on how many draws came before).

    Args:
        n: dataset length.
        shuffle: random order (else ``0..n-1``).
        seed: base seed of the permutations.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int) -> None:
        self.n = int(n)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use ``epoch``'s order."""
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch)]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


class _Collate:
    """``collate_batch`` for a fixed task list, with float32 images (a class, so it pickles)."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self.tasks = list(tasks)

    def __call__(self, samples: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        images, targets = collate_batch(samples, self.tasks)
        if images.dtype != torch.float32:
            images = images.float()
        return images, targets


def make_loader(
    dataset: Dataset,
    tasks: Sequence[TaskSpec],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process DataLoader whose batches are ``(images, {task: targets or None})``.

    Targets are collated by :func:`mtc.tasks.losses.collate_batch`: a sample without a task's
    target gets the kind's missing value, and a batch in which no sample has one gets ``None``.
    The order depends only on ``seed`` and the epoch (see :class:`EpochSampler`, reachable as
    ``loader.sampler``); ``num_workers=0`` keeps generation in this process and deterministic.

    Args:
        dataset: map-style dataset of ``(image, {task: target})``.
        tasks: the task list; every task gets a key in each batch's target dict.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch.
        seed: seed of the order.
        drop_last: drop the last incomplete batch.
    """
    if batch_size <= 0:
        raise MtcError(f"batch size must be positive, got {batch_size}")
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=0,
        collate_fn=_Collate(tasks),
        generator=torch.Generator().manual_seed(int(seed)),
    )


def split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """Split a dataset at random into two disjoint parts (AutoMTL's train1 / train2).

    Args:
        dataset: the training set.
        fraction: share of samples in the first part, in (0, 1); rounded, and each part keeps at
            least one sample.
        seed: seed of the permutation.

    Returns:
        ``(first, second)``: ``Subset``s whose indices (ascending) partition the dataset.

    Raises:
        MtcError: ``fraction`` outside (0, 1) or fewer than two samples.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if not 0.0 < fraction < 1.0:
        raise MtcError(f"split fraction must lie in (0, 1), got {fraction}")
    if n < 2:
        raise MtcError(f"cannot split a dataset of {n} sample(s) into two non-empty parts")
    k = min(max(round(fraction * n), 1), n - 1)
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5917]).permutation(n)
    return Subset(dataset, np.sort(perm[:k]).tolist()), Subset(dataset, np.sort(perm[k:]).tolist())
