"""Training-loop pieces shared by search, post-train and baselines.

Batches are a pure function of (seed, stream, step): a resumed run draws exactly the batches and
Gumbel noise an uninterrupted run would, so it ends in the same state.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mtc.errors import MtcError
from mtc.tasks.batch import collate_batch
from mtc.tasks.kinds import get_kind
from mtc.tasks.spec import TaskSpec


class Batcher:
    """Deterministic batches from a map-style dataset: step s of stream ``tag`` under ``seed``.

    Every sample is checked as it is read (structure, image shape, each task's target shape and
    labels): bad data that shows up after the first batches stops the run with one line naming the
    data set (``spec``), the sample's index in it and the task.
    """

    def __init__(self, dataset: Any, tasks: Sequence[TaskSpec], batch_size: int, seed: int, tag: str, *,
                 spec: str | None = None, shape: tuple[int, ...] | None = None) -> None:
        from mtc.data.registry import MAX_SAMPLES

        n = len(dataset)
        if n == 0:
            raise MtcError(f"the {tag} data set is empty", file="--data")
        if n > MAX_SAMPLES:
            raise MtcError(f"the {tag} data set claims {n} samples; at most {MAX_SAMPLES:,} are supported",
                           file="--data")
        self.dataset = dataset
        self.tasks = list(tasks)
        self.by_name = {t.name: t for t in self.tasks}
        self.batch_size = min(batch_size, n)
        self.seed = seed
        self.name = tag
        self.tag = zlib.crc32(tag.encode())
        self.spec = spec
        self.shape = shape

    def source_index(self, i: int) -> int:
        """The index of sample ``i`` in the data set the plug-in returned (through subsets)."""
        ds, j = self.dataset, i
        while hasattr(ds, "indices") and hasattr(ds, "dataset"):
            j = int(ds.indices[j])
            ds = ds.dataset
        return j

    def where(self, i: int) -> str:
        spec = f"--data '{self.spec}': " if self.spec else "--data: "
        return f"{spec}sample {self.source_index(i)} (stream '{self.name}')"

    def sample(self, i: int) -> Any:
        from mtc.data.registry import sample_problem

        try:
            s = self.dataset[i]
        except Exception as e:
            raise MtcError(f"{self.where(i)} cannot be read ({type(e).__name__}: {e})") from None
        if self.shape is not None:
            found = sample_problem(s, self.by_name, self.shape, other_tasks=True)
            if found is not None:
                msg, task = found
                raise MtcError(f"{self.where(i)}: " + (f"task '{task}': {msg}" if task else msg))
        return s

    def indices(self, step: int) -> np.ndarray:
        # Each epoch is a fresh permutation; step s reads its slice of the epoch's permutation.
        per_epoch = max(1, len(self.dataset) // self.batch_size)
        epoch, k = divmod(step, per_epoch)
        perm = np.random.default_rng([self.seed, self.tag, epoch]).permutation(len(self.dataset))
        return perm[k * self.batch_size:(k + 1) * self.batch_size]

    def batch(self, step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        idx = [int(i) for i in self.indices(step)]
        samples = [self.sample(i) for i in idx]
        try:
            images, targets = collate_batch(samples, self.tasks)
        except (ValueError, TypeError, RuntimeError) as e:
            raise MtcError(f"{self.where(idx[0])}: the batch of step {step} does not collate ({e})") from None
        return images.to(device), {k: (v.to(device) if v is not None else None) for k, v in targets.items()}

    def non_finite(self, step: int) -> str | None:
        """The first sample of batch ``step`` whose image or a target holds NaN or Inf, if any."""
        for i in (int(i) for i in self.indices(step)):
            image, targets = self.dataset[i]
            if not torch.isfinite(torch.as_tensor(image, dtype=torch.float32)).all():
                return f"{self.where(i)}: its image holds NaN or Inf"
            for name, t in targets.items():
                if t is not None and torch.as_tensor(t).is_floating_point() \
                        and not torch.isfinite(torch.as_tensor(t)).all():
                    return f"{self.where(i)}: task '{name}': its target holds NaN or Inf"
        return None


def step_seed(seed: int, stage: str, step: int) -> int:
    """The torch seed of one step (Gumbel noise, dropout)."""
    return int(np.random.default_rng([seed, zlib.crc32(stage.encode()), step]).integers(0, 2**62))


def task_losses(outputs: Sequence[torch.Tensor], targets: dict[str, torch.Tensor | None],
                tasks: Sequence[TaskSpec]) -> dict[str, torch.Tensor]:
    return {t.name: get_kind(t.kind).loss(out, targets.get(t.name)) for t, out in zip(tasks, outputs, strict=True)}


def check_finite(losses: dict[str, torch.Tensor], stage: str, step: int, *, resumable: bool = True) -> None:
    """A NaN or Inf loss stops the run, naming the task and iteration."""
    for name, v in losses.items():
        if not torch.isfinite(v.detach()).all():
            advice = ("the last good checkpoint is kept (lower the learning rate, check the data, then --resume)"
                      if resumable else "no checkpoint was written yet (lower the learning rate or check the data)")
            raise MtcError(f"loss of task '{name}' is {float(v.detach())} at {stage} iteration {step}: stopping; "
                           + advice)


@torch.no_grad()
def evaluate(module: torch.nn.Module, dataset: Any, tasks: Sequence[TaskSpec], *, batch_size: int = 16,
             device: torch.device | str = "cpu", max_batches: int | None = None) -> dict[str, dict[str, float]]:
    """Every task's dataset-level metrics (and mean loss) on ``dataset``, in eval mode."""
    was = module.training
    module.eval()
    kinds = {t.name: get_kind(t.kind) for t in tasks}
    metrics = {t.name: kinds[t.name].metric(t.channels) for t in tasks}
    losses = {t.name: kinds[t.name].loss_metric() for t in tasks}
    n = len(dataset)
    batches = range(0, n, batch_size)
    for b, start in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        images, targets = collate_batch([dataset[i] for i in range(start, min(n, start + batch_size))], tasks)
        outs = module(images.to(device))
        for t, out in zip(tasks, outs, strict=True):
            tgt = targets.get(t.name)
            if tgt is None:
                continue
            metrics[t.name].update(out.cpu(), tgt)
            losses[t.name].update(out.cpu(), tgt)
    module.train(was)
    return {t: {**metrics[t].compute(), **losses[t].compute()} for t in metrics}


def count_parameters(module: torch.nn.Module, exclude: Sequence[torch.Tensor] = ()) -> int:
    """Trainable parameters of ``module``, leaving out ``exclude`` (e.g. policy logits)."""
    skip = {id(t) for t in exclude}
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


def autocast_forward(module: torch.nn.Module, images: torch.Tensor, amp: bool) -> Any:
    """The forward pass, under bfloat16 autocast on CUDA with ``--amp`` (bf16 needs no loss scaling)."""
    if not amp:
        return module(images)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        outs = module(images)
    return tuple(o.float() for o in outs)
