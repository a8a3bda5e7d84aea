"""Seeding torch's generators in a training loop."""

from __future__ import annotations

import torch


def seed_torch(seed: int) -> None:
    """What ``torch.manual_seed`` does for the generators that exist: the CPU one, and CUDA's once it
    is initialised.

    ``torch.manual_seed`` also queues a lazy seed for every accelerator backend (CUDA, XPU, MTIA)
    that is not initialised, and each queued call records a formatted stack trace: about 0.1 ms a
    call at a shallow stack, 0.9 ms inside a test runner, a sizeable share of a small model's
    training step. A backend that is not initialised has no generator to seed yet, and mtc draws
    on the training device only, which is initialised before the loop starts.
    """
    torch.default_generator.manual_seed(int(seed))
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(int(seed))
