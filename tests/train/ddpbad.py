"""A `--data` plug-in for the torchrun tests: sample 11 of the training set (past the samples mtc checks up front) cannot be read."""

from __future__ import annotations

from tinydata import Tiny


class Bad(Tiny):
    def __getitem__(self, i: int):
        if i == 11:
            raise OSError("disk gone")
        return super().__getitem__(i)


def factory(tasks, input_shape, seed, n: int = 16):
    return Bad(n, seed, input_shape), Tiny(8, seed + 1, input_shape)
