"""A `--data` plug-in that goes bad on purpose (tests of what bad data does to a run)."""

from __future__ import annotations

import sys

import torch


class Bad(torch.utils.data.Dataset):
    """Two tasks (a: regress 1, b: class 2) on random 32x32 images; sample ``after`` and later (or
    every sample once ``calls`` have been served) carry the fault ``fault``: ``label`` (b out of
    range), ``shape`` (a's target of the wrong shape), ``nan`` (a NaN image), ``raise`` (reading it
    raises)."""

    def __init__(self, n: int, seed: int, fault: str, after: int, claim: int = 0, calls: int = -1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.fault, self.after, self.claim, self.calls = fault, after, claim, calls
        self.served = 0

    def __len__(self) -> int:
        return self.claim or len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        a, b = x.mean().view(1) * 10, torch.tensor(int(x[0].mean() > 0))
        self.served += 1
        if i >= self.after or 0 <= self.calls < self.served:
            if self.fault == "label":
                b = torch.tensor(7)
            elif self.fault == "shape":
                a = torch.zeros(3)
            elif self.fault == "nan":
                x = torch.full_like(x, float("nan"))
            elif self.fault == "raise":
                raise RuntimeError("disk gone")
        return x, {"a": a, "b": b}


def factory(tasks, input_shape, seed, fault: str = "none", after: int = 10**9, n: int = 32, claim: int = 0,
            explode: str = "", calls: int = -1):
    if explode == "raise":
        raise ValueError("the plug-in is broken")
    if explode == "exit":
        sys.exit(3)
    return Bad(n, seed, fault, after, claim, calls), Bad(16, seed + 1, "none", 10**9)
