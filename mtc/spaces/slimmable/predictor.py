"""The MTL accuracy predictor R (Algorithm 3): width vector -> predicted loss per task.

An MLP ``Linear(L, 100) - ReLU - Linear(100, 100) - ReLU - Linear(100, 50) - ReLU`` with one
``Linear(50, 1)`` head per task, input the width ratios of every choice (encoder, then decoders),
trained with the L1 loss (Adam, lr 1e-3, batch 16, 150 epochs in the paper) on measured
sub-networks. Targets are standardised per task (mean and standard deviation of the training
sub-networks, stored with the weights) so that tasks whose losses differ in scale train alike; the
predictions are returned in loss units.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtc.errors import MtcError

WEIGHTS = "predictor.safetensors"
META = "predictor.json"


class AccuracyPredictor(nn.Module):
    """Algorithm 3's network (module docstring)."""

    def __init__(self, inputs: int, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.model = nn.Sequential(nn.Linear(inputs, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                                   nn.Linear(100, 50), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(50, 1) for t in self.tasks})

    def forward(self, widths: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.model(widths)
        return {t: self.heads[t](feats).squeeze(-1) for t in self.tasks}


class Predictor:
    """A trained :class:`AccuracyPredictor` with its target scaling (predictions in loss units)."""

    def __init__(self, net: AccuracyPredictor, mean: np.ndarray, std: np.ndarray) -> None:
        self.net = net.eval()
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)

    @property
    def tasks(self) -> list[str]:
        return self.net.tasks

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Predicted losses ``[n, tasks]`` for width vectors ``x`` ``[n, inputs]``."""
        out = self.net(torch.as_tensor(np.asarray(x, dtype=np.float32)))
        z = torch.stack([out[t] for t in self.tasks], dim=-1).double().numpy()
        return z * self.std + self.mean

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        from mtc.ir.io import atomic_write

        tmp = folder / (WEIGHTS + ".tmp")
        save_file({k: v.detach().contiguous() for k, v in self.net.state_dict().items()}, str(tmp))
        tmp.replace(folder / WEIGHTS)
        meta = {"inputs": self.net.model[0].in_features, "tasks": self.tasks, "mean": self.mean.tolist(),
                "std": self.std.tolist(), **extra}
        with atomic_write(folder / META) as f:
            json.dump(meta, f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, folder: Path) -> tuple[Predictor, dict[str, Any]]:
        """The predictor a search wrote into a run directory.

        Raises:
            MtcError: the run has no predictor (the search did not finish), or it is unreadable.
        """
        from safetensors.torch import load_file

        w, m = folder / WEIGHTS, folder / META
        if not w.exists() or not m.exists():
            raise MtcError(f"the run has no accuracy predictor ({WEIGHTS}): run mtc search to its end first",
                           file=str(folder))
        try:
            meta = json.loads(m.read_text())
            net = AccuracyPredictor(int(meta["inputs"]), list(meta["tasks"]))
            net.load_state_dict(load_file(str(w)))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise MtcError(f"cannot read the accuracy predictor: {e}", file=str(w)) from None
        return cls(net, np.array(meta["mean"]), np.array(meta["std"])), meta


def train_predictor(x: np.ndarray, y: np.ndarray, tasks: list[str], *, epochs: int = 150, lr: float = 1e-3,
                    batch_size: int = 16, seed: int = 0) -> tuple[Predictor, list[float]]:
    """Fit Algorithm 3's MLP with the L1 loss on width vectors ``x`` and task losses ``y`` ``[n, tasks]``.

    Returns:
        the predictor and the mean training L1 (standardised units) per epoch.
    """
    if len(x) < 2:
        raise MtcError("the predictor needs at least two measured sub-networks")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = AccuracyPredictor(x.shape[1], tasks)
    mean, std = y.mean(0), y.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor((y - mean) / std, dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    curve: list[float] = []
    net.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 100-wide MLP on 16 rows: threads cost more than they save
    try:
        _epochs(net, opt, xt, yt, tasks, epochs, batch_size, gen, curve)
    finally:
        torch.set_num_threads(threads)
    return Predictor(net, mean, std), curve


def _epochs(net: AccuracyPredictor, opt: torch.optim.Optimizer, xt: torch.Tensor, yt: torch.Tensor,
            tasks: list[str], epochs: int, batch_size: int, gen: torch.Generator, curve: list[float]) -> None:
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            out = net(xt[idx])
            loss = torch.stack([nn.functional.l1_loss(out[t], yt[idx, j]) for j, t in enumerate(tasks)]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        curve.append(total / len(xt) / len(tasks))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)
