"""Several processes (``torchrun``): data parallel training on torch.distributed.

``torchrun --nproc-per-node N -m mtc search|train|baseline ...`` starts N processes; each finds its
rank in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins the process
group (``gloo`` on the CPU, ``nccl`` on CUDA, one GPU per local rank) and runs the same command:

- every rank reads its shard of the deterministic global batch of each step (rows
  ``[r·B/N, (r+1)·B/N)`` of the batch a single process reads; ``--batch-size`` is the global batch);
- the gradients of each update are averaged over the ranks (one all-reduce of the flattened
  gradients, after every forward pass of the update: :func:`average_gradients`) before the
  optimisers step, so every rank takes the same step and the parameters, search parameters
  included (policy, allocation and architecture logits), stay identical; the initial state is
  broadcast from rank 0;
- the torch seed of every step is the same on every rank, so Gumbel samples and sampled
  sub-networks agree;
- with ``--sync-bn`` batch normalisation in training normalises with the statistics of the global
  batch (:func:`sync_batch_norm`; without it, each rank uses its shard's);
- rank 0 alone writes into the run directory; every other rank works in a private copy of it
  (taken at start, so a resume reads the same checkpoint) that is removed when it ends.

Without torchrun (no ``WORLD_SIZE``), :func:`current` is a world of one and nothing changes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtc.errors import MtcError


@dataclass
class World:
    """This process's place among the ranks of a run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sync_bn: bool = False
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The torch device of this rank: its own GPU under torchrun on CUDA."""
        if self.size > 1 or self.backend is not None:
            if device == "cuda":
                return f"cuda:{self.local_rank}"
        return device

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over the ranks (``t`` itself in a world of one)."""
        if self.size == 1:
            return t
        out = t.detach().clone()
        torch.distributed.all_reduce(out)
        return out / self.size

    def record(self) -> dict[str, Any]:
        """What a run records of its world (nothing for one process: configs read as before)."""
        return {"world_size": self.size} if self.size > 1 else {}


_WORLD = World()


def current() -> World:
    """The world this process runs in."""
    return _WORLD


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise MtcError(f"the environment variable {name}={os.environ.get(name)!r} is not a number") from None


def start(device: str, *, sync_bn: bool = False) -> World:
    """Join the process group torchrun set up (once); a world of one without torchrun.

    Raises:
        MtcError: more processes per node than GPUs on a CUDA run; a process group that cannot start.
    """
    global _WORLD
    if _WORLD.backend is not None:
        return _WORLD
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        _WORLD = World(sync_bn=sync_bn)
        return _WORLD
    size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    cuda = device.startswith("cuda")
    if cuda:
        n = torch.cuda.device_count()
        if local_size > n:
            raise MtcError(f"--nproc-per-node {local_size} is more than the {n} CUDA device(s) of this node: "
                           "start at most one process per GPU")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    try:
        torch.distributed.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MtcError(f"cannot join the {backend} process group of rank {rank}/{size}: {first}") from None
    atexit.register(_finish)
    _WORLD = World(rank=rank, size=size, local_rank=local_rank, sync_bn=sync_bn, backend=backend)
    return _WORLD


def _finish() -> None:
    with contextlib.suppress(Exception):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def barrier() -> None:
    if _WORLD.size > 1:
        torch.distributed.barrier()


def private_run_dir(path: str) -> str:
    """The run directory this rank writes into: ``path`` on rank 0; on the others a private copy of
    it as it is now (all ranks wait until every copy is taken), removed at exit. Their standard
    output is silenced (rank 0 prints); errors still reach standard error."""
    w = _WORLD
    if w.size == 1:
        return path
    out = path
    if not w.main:
        tmp = Path(tempfile.mkdtemp(prefix=f"mtc-rank{w.rank}-"))
        atexit.register(shutil.rmtree, tmp, True)
        dst = tmp / Path(path).name
        src = Path(path)
        if src.exists():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
        out = str(dst)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    barrier()
    return out


def check_resume(recorded: int, *, source: str) -> None:
    """A run resumes with the world size it started with.

    Raises:
        MtcError: another world size.
    """
    if int(recorded) != _WORLD.size:
        def procs(n: int) -> str:
            return f"{n} process{'es' if n != 1 else ''}"

        how = f"torchrun --nproc-per-node {recorded} ..." if int(recorded) > 1 else "without torchrun"
        raise MtcError(f"the run was started with {procs(int(recorded))} and resumes only with as many "
                       f"({procs(_WORLD.size)} now): run it {how}", file=source)


def check_identical(tensors: Sequence[torch.Tensor], *, what: str) -> None:
    """Every rank holds rank 0's values of ``tensors`` (bitwise).

    Raises:
        MtcError: a rank whose values differ (naming it and ``what``).
    """
    if _WORLD.size == 1 or not tensors:
        return
    with torch.no_grad():
        mine = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        ref = mine.clone()
        torch.distributed.broadcast(ref, src=0)
        bad = torch.tensor([0 if torch.equal(mine, ref) else 1], device=mine.device)
        torch.distributed.all_reduce(bad)
    if int(bad) and not torch.equal(mine, ref):
        raise MtcError(f"rank {_WORLD.rank}'s {what} differ from rank 0's (a non-deterministic kernel?)")


def broadcast(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's."""
    if _WORLD.size == 1:
        return
    with torch.no_grad():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks (a parameter no rank has a gradient for
    keeps none, so an optimiser skips it as it would in one process)."""
    w = _WORLD
    if w.size == 1 or not params:
        return
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
    torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in live:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        torch.distributed.all_reduce(flat)
        flat /= w.size
        off = 0
        for p in group:
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n


class _AllReduce(torch.autograd.Function):
    """A differentiable sum over the ranks: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        torch.distributed.all_reduce(out)
        return out


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, differentiably."""
    return _AllReduce.apply(t)  # type: ignore[no-any-return]


def _sync_batch_norm(orig: Any) -> Any:
    def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                   momentum: float | None = 0.1, eps: float = 1e-5) -> torch.Tensor:
        if not training:
            return orig(input, running_mean, running_var, weight, bias, training, momentum, eps)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        torch.distributed.all_reduce(count)
        mean = all_reduce(x.sum(dims)) / count  # two passes: the variance without cancellation
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / count
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        m = 0.1 if momentum is None else momentum
        with torch.no_grad():
            n = float(count)
            if running_mean is not None:
                running_mean.mul_(1 - m).add_(m * mean.detach().to(running_mean.dtype))
            if running_var is not None:
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                running_var.mul_(1 - m).add_(m * unbiased.to(running_var.dtype))
        return y.to(input.dtype)

    return batch_norm


@contextlib.contextmanager
def sync_batch_norm(enabled: bool) -> Iterator[None]:
    """While active (and ``enabled`` in a world of several), batch normalisation in training mode
    uses the statistics of the global batch: ``torch.nn.functional.batch_norm``, which mtc's
    kernels call, is replaced by one whose sums are all-reduced (differentiably, with
    :func:`all_reduce`, so the gradients flow through the global statistics as in one process)."""
    if not enabled or _WORLD.size == 1:
        yield
        return
    f = torch.nn.functional
    orig = f.batch_norm
    f.batch_norm = _sync_batch_norm(orig)  # type: ignore[assignment]
    try:
        yield
    finally:
        f.batch_norm = orig  # type: ignore[assignment]
