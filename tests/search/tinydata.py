"""A tiny `--data` plug-in for the search/train tests: two learnable tasks on random images."""

from __future__ import annotations

import torch


class Tiny(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int, shape, label_fraction: float = 1.0, nan_after: int = -1,
                 extra_task: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, *shape, generator=g)
        self.a = self.x.mean((1, 2, 3)).unsqueeze(-1) * 10
        self.b = (self.x[:, 0].mean((1, 2)) > 0).long()
        self.keep_b = torch.rand(n, generator=g) < label_fraction
        self.nan_after = nan_after
        self.calls = 0
        self.extra_task = extra_task

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.calls += 1
        x = self.x[i]
        if 0 <= self.nan_after < self.calls:
            x = torch.full_like(x, float("nan"))
        targets = {"a": self.a[i]}
        if self.keep_b[i]:
            targets["b"] = self.b[i]
        if self.extra_task:
            targets["zzz"] = self.a[i]
        return x, targets


def factory(tasks, input_shape, seed, n: int = 32, label_fraction: float = 1.0, nan_after: int = -1,
            extra_task: bool = False):
    return (Tiny(n, seed, input_shape, label_fraction, nan_after, extra_task),
            Tiny(16, seed + 1, input_shape, label_fraction))
