"""Interleaved timing: several steps measured round-robin, so drift in the machine's speed
(thermal, other load) hits them alike. Used by the deployment report and the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["time_interleaved"]


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 15,
                     sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (order alternating each round).

    Args:
        fns: name -> a zero-argument step to time.
        warmup: untimed rounds first (allocator, caches, lazy init).
        repeats: timed rounds (at least 5 for a meaningful median).
        sync: called after each step before the clock stops (``torch.cuda.synchronize``).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    if sync:
        sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            if sync:
                sync()
            times[n].append(time.perf_counter() - t0)
    return times
