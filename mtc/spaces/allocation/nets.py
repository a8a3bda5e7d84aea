"""The small networks of the Gumbel-Matrix paper's controlled experiments, as PyTorch factories
(``mtc compile mtc.spaces.allocation.nets:NAME --input-shape ...``).

- :func:`relatedness_net` (after Appendix A3): a 3-layer MLP (64, 64 and 16 units, ReLU) written as
  1x1 convolutions over the input ``(128, 1, 1)`` (``relatedness`` tiles ``x`` into it); with 4
  components per layer, a task's path is 4 of 16 blocks of units (the paper's A3 network has one
  layer of 4 independent 3-layer components; here every layer is modular, as in its 4-MNISTs net).
- :func:`digits_net` (Appendix B, 4-MNISTs): three modular layers of 4 components of 4 filters,
  5x5 then 3x3 then 3x3 convolutions without padding, ReLU, 2x2 average pooling after the first two;
  for the ``digits`` data at ``(1, 24, 24)`` the last layer's map is 2x2. :func:`digits_mlp` is a
  CPU-sized stand-in for the 8x8 digits as they are.
"""

from __future__ import annotations

import torch
from torch import nn


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class RelatednessNet(nn.Module):
    """Appendix A3's network as three modular layers (see the module docstring)."""

    def __init__(self, inputs: int = 128, hidden: int = 64, out: int = 16) -> None:
        super().__init__()
        self.l1 = nn.Conv2d(inputs, hidden, 1)
        self.l2 = nn.Conv2d(hidden, hidden, 1)
        self.l3 = nn.Conv2d(hidden, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x))))))


class DigitsNet(nn.Module):
    """Appendix B's network (see the module docstring)."""

    def __init__(self, channels: int = 1, width: int = 16, padded: bool = False, last: int = 3) -> None:
        super().__init__()
        k1 = 3 if padded else 5
        self.c1 = nn.Conv2d(channels, width, k1, padding=k1 // 2 if padded else 0)
        self.c2 = nn.Conv2d(width, width, 3, padding=int(padded))
        self.c3 = nn.Conv2d(width, width, last)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.c1(x)))
        x = self.pool(torch.relu(self.c2(x)))
        return torch.relu(self.c3(x))


def relatedness_net(seed: int = 0) -> nn.Module:
    """Appendix A3's network, weights seeded."""
    _seeded(seed)
    return RelatednessNet()


def digits_net(seed: int = 0) -> nn.Module:
    """Appendix B's network for one-channel inputs, weights seeded."""
    _seeded(seed)
    return DigitsNet()


class DigitsMLP(nn.Module):
    """Three modular layers over the whole 8x8 image: an 8x8 convolution (a dense layer), then two
    1x1 convolutions; ReLU after each."""

    def __init__(self, width: int = 128, out: int = 64) -> None:
        super().__init__()
        self.l1 = nn.Conv2d(1, width, 8)
        self.l2 = nn.Conv2d(width, width, 1)
        self.l3 = nn.Conv2d(width, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x))))))


def digits_mlp(seed: int = 0) -> nn.Module:
    """A CPU-sized stand-in for Appendix B's network on the 8x8 digits as they are (``(1, 8, 8)``):
    :class:`DigitsMLP` (128, 128 and 64 units), which learns them in a few hundred steps."""
    _seeded(seed)
    return DigitsMLP()
