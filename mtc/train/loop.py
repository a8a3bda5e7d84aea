"""Training-loop pieces shared by search, post-train and baselines.

Batches are a pure function of (seed, stream, step): a resumed run draws exactly the batches and
Gumbel noise an uninterrupted run would, so it ends in the same state.
"""

from __future__ import annotations

import itertools
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
    data set (``spec``), the sample's index in it and the task. Samples of a data set whose samples
    do not change between reads (:func:`mtc.data.common.fixed_samples`: the built-in generators)
    are checked on their first read only: the check was a fifth of a small model's step.
    """

    def __init__(self, dataset: Any, tasks: Sequence[TaskSpec], batch_size: int, seed: int, tag: str, *,
                 spec: str | None = None, shape: tuple[int, ...] | None = None, workers: int = 0,
                 shard: tuple[int, int] = (0, 1)) -> None:
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
        if workers < 0:
            raise MtcError(f"--workers must be >= 0, got {workers}")
        self.workers = workers
        rank, size = shard
        if self.batch_size % size:
            raise MtcError(f"--batch-size {self.batch_size} does not split over {size} processes: give a multiple "
                           f"of {size} (it is the global batch; each process reads its share)")
        self.shard = (rank, size)
        from mtc.data.common import fixed_samples

        #: per sample, whether it has passed the check (None: check every read)
        self._checked = np.zeros(n, dtype=bool) if shape is not None and fixed_samples(dataset) else None
        self._stream: Any = None  # the worker processes' iterator over consecutive steps
        self._next = -1  # the step it yields next

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
        if self.shape is not None and not (self._checked is not None and self._checked[i]):
            found = sample_problem(s, self.by_name, self.shape, other_tasks=True)
            if found is not None:
                msg, task = found
                raise MtcError(f"{self.where(i)}: " + (f"task '{task}': {msg}" if task else msg))
            if self._checked is not None:
                self._checked[i] = True
        return s

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one data epoch: every sample read once (the remainder is dropped)."""
        return max(1, len(self.dataset) // self.batch_size)

    def epoch(self, step: int) -> int:
        """The data epoch step ``step`` reads from."""
        return step // self.steps_per_epoch

    def indices(self, step: int) -> np.ndarray:
        # Each epoch is a fresh permutation; step s reads its slice of the epoch's permutation.
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, self.tag, epoch]).permutation(len(self.dataset))
        return perm[k * self.batch_size:(k + 1) * self.batch_size]

    def shard_indices(self, step: int) -> np.ndarray:
        """This process's rows of batch ``step``: all of them in one process."""
        idx = self.indices(step)
        rank, size = self.shard
        if size == 1:
            return idx
        per = len(idx) // size
        return idx[rank * per:(rank + 1) * per]

    def batch(self, step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """Batch ``step``: the same tensors whether read here or prepared by worker processes."""
        if self.workers > 0:
            images, targets = self._from_workers(step)
        else:
            images, targets = self.host_batch(step)
        return images.to(device), {k: (v.to(device) if v is not None else None) for k, v in targets.items()}

    def _from_workers(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        # Workers prepare consecutive steps ahead of the trainer (a torch DataLoader over step
        # numbers); a step out of sequence (a resume, a new stage) starts them again from it.
        if self._stream is None or step != self._next:
            self.close()
            loader = torch.utils.data.DataLoader(_Steps(self), batch_size=None, sampler=_From(step),
                                                 num_workers=self.workers, collate_fn=_keep)
            self._stream = iter(loader)
        out = next(self._stream)
        self._next = step + 1
        if isinstance(out, MtcError):
            self.close()
            raise out
        return out

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._stream is not None:
            shutdown = getattr(self._stream, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._stream = None
            self._next = -1

    def host_batch(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """Batch ``step`` on the CPU, read and collated in this process."""
        idx = [int(i) for i in self.shard_indices(step)]
        samples = [self.sample(i) for i in idx]
        try:
            images, targets = collate_batch(samples, self.tasks)
        except (ValueError, TypeError, RuntimeError) as e:
            raise MtcError(f"{self.where(idx[0])}: the batch of step {step} does not collate ({e})") from None
        return images, targets

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


class _Steps(torch.utils.data.Dataset):
    """Step number -> that step's batch (or the MtcError that reading it raised, to re-raise as one
    line in the trainer's process)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def __getitem__(self, step: int) -> Any:
        try:
            return self.batcher.host_batch(step)
        except MtcError as e:
            return MtcError(str(e))


class _From(torch.utils.data.Sampler[int]):
    """Steps ``start``, ``start + 1``, ... (the trainer stops reading when its stage ends)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Any:
        return itertools.count(self.start)


def _keep(x: Any) -> Any:
    return x


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


def amp_dtype(amp: bool | str | None) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` value: None (off), bfloat16 (``True``/``bf16``), float16 (``fp16``)."""
    if not amp:
        return None
    if amp is True or amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise MtcError(f"--amp {amp!r}: expected bf16 or fp16")


def autocast_forward(module: torch.nn.Module, images: torch.Tensor, amp: bool | str | None) -> Any:
    """The forward pass, under autocast with ``--amp`` (bfloat16, or float16 on CUDA with a gradient
    scaler) on the images' device; the outputs come back in float32, so losses and metrics are
    computed in float32."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return module(images)
    with torch.autocast(device_type=images.device.type, dtype=dtype):
        outs = module(images)
    return tuple(o.float() if o.is_floating_point() else o for o in outs)
