"""The slimmable supernet in PyTorch: the ``Slim`` kernel, the controls that set its widths, and
BatchNorm recalibration for one sub-network.

The supernet runs at full size; each ``Slim`` node multiplies its tensor by the 0/1 vector of the
current widths (:class:`SlimControls`, set per sub-network by the sandwich rule). On the encoder
feature it also hands the tensor to the controls, which CI-KD reads.

BatchNorm keeps no statistics while the supernet trains (Yu & Huang's universally slimmable
networks, which the paper follows): the statistics are recalibrated for the chosen sub-network
afterwards, on training batches, without touching a weight (:func:`recalibrate`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from mtc.errors import MtcError
from mtc.lower.controls import Controls
from mtc.lower.module import GraphModule
from mtc.lower.registry import BuildNode, Kernel, register_op
from mtc.lower.supergraph import lower_search
from mtc.spaces.slimmable.config import WidthSpace
from mtc.spaces.slimmable.sites import DOMAIN, OP


@dataclass
class SlimControls(Controls):
    """Widths by choice name (a choice not named is at full width) and the captured feature.

    Attributes:
        counts: kept channels per width choice.
        capture: hand the feature tensor to :attr:`feature` on each forward pass.
        feature: ``(tensor, kept channels)`` of the last forward pass when capturing.
    """

    counts: dict[str, int] = field(default_factory=dict)
    capture: bool = False
    feature: tuple[torch.Tensor, torch.Tensor] | None = None

    def width(self, choice: str, channels: int, blocks: int) -> list[int] | None:
        n = self.counts.get(choice)
        return None if n is None else [n] * blocks

    def observe(self, x: torch.Tensor, kept: torch.Tensor) -> None:
        if self.capture:
            self.feature = (x, kept)

    def set(self, space: WidthSpace, config: np.ndarray) -> None:
        """Switch the module to the sub-network of ``config``."""
        self.counts = space.counts(config)


@register_op(OP, domain=DOMAIN, foldable=False, shape_probe=False)
def _slim(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis", 1))
    choices = [str(c) for c in node.attr("choices", [])]
    sizes = [int(s) for s in node.attr("sizes", [])]
    pc = torch.tensor([int(v) for v in node.attr("position_choice", [])], dtype=torch.long)
    pu = torch.tensor([int(v) for v in node.attr("position_unit", [])], dtype=torch.long)
    feature = bool(node.attr("feature", 0))
    c = getattr(node.module, "controls", None)
    controls = c if isinstance(c, Controls) else Controls()
    big = torch.iinfo(torch.long).max
    cache: dict[tuple[Any, ...], torch.Tensor | None] = {}

    def mask_for(x: torch.Tensor) -> torch.Tensor | None:
        counts = []
        for name, size in zip(choices, sizes, strict=True):
            w = controls.width(name, size, 1)
            counts.append(size if w is None else int(w[0]))
        key = (tuple(counts), x.device, x.dtype, x.dim())
        if key not in cache:
            if all(n >= s for n, s in zip(counts, sizes, strict=True)):
                cache[key] = None
            else:
                limit = torch.tensor([*counts, big], dtype=torch.long)
                keep = (pu < limit[pc]).to(device=x.device, dtype=x.dtype)
                shape = [1] * x.dim()
                shape[axis] = len(keep)
                cache[key] = keep.view(shape)
            if len(cache) > 64:  # widths change every step: keep the cache small
                cache.pop(next(iter(cache)))
        return cache[key]

    def slim(x: torch.Tensor) -> torch.Tensor:
        m = mask_for(x)
        y = x if m is None else x * m
        if feature and hasattr(controls, "observe"):
            kept = m.sum() if m is not None else torch.tensor(float(x.shape[axis]), device=x.device)
            controls.observe(y, kept)
        return y

    return slim


def lower_supernet(model: ir.Model, *, device: torch.device | str | None = None) -> GraphModule:
    """The supernet of a slimmable supergraph, driven by a fresh :class:`SlimControls`."""
    return lower_search(model, SlimControls(), device=device)


def controls_of(module: GraphModule) -> SlimControls:
    c = module.controls
    if not isinstance(c, SlimControls):
        raise MtcError("the module was not lowered as a slimmable supernet (lower_supernet)")
    return c


# --------------------------------------------------------------------------------------- BatchNorm
@dataclass(frozen=True)
class NormStats:
    """One BatchNormalization node's running statistics as the lowering holds them."""

    mean: str
    var: str
    momentum: float  # torch's: the weight of the new batch


def norm_stats(model: ir.Model) -> list[NormStats]:
    """The running statistics of every BatchNormalization (inference form) of ``model``."""
    out = []
    for n in model.graph:
        if n.op_type != "BatchNormalization" or n.domain not in ("", "ai.onnx"):
            continue
        if "training_mode" in n.attributes and n.attributes["training_mode"].as_int():
            continue
        mean, var = n.inputs[3], n.inputs[4]
        if mean is None or var is None or mean.name is None or var.name is None:
            continue
        m = float(n.attributes["momentum"].as_float()) if "momentum" in n.attributes else 0.9
        out.append(NormStats(mean.name, var.name, 1.0 - m))
    return out


@torch.no_grad()
def recalibrate(module: GraphModule, stats: list[NormStats], batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm's running statistics to the average of its batch statistics over
    ``batches``, the module as it is configured (one sub-network); weights are not touched.

    Each batch runs in training mode from zeroed buffers: the lowering's kernel then leaves
    ``momentum · batch statistic`` in them (torch's update), from which the statistic is read back.
    The result is the cumulative (equal-weight) average over the batches, as universally
    slimmable networks and once-for-all recalibrate.

    Returns:
        the number of batches used.

    Raises:
        MtcError: no batch, or a BatchNorm whose momentum leaves its statistics frozen.
    """
    inits = module.named_initializers()
    bufs = [(inits[s.mean], inits[s.var], s.momentum) for s in stats if s.mean in inits and s.var in inits]
    if any(m <= 0 for _, _, m in bufs):
        raise MtcError("a BatchNormalization has momentum 1: its statistics cannot be recalibrated")
    sums = [(torch.zeros_like(a, dtype=torch.float64), torch.zeros_like(b, dtype=torch.float64)) for a, b, _ in bufs]
    was = module.training
    module.train()
    n = 0
    try:
        for x in batches:
            for mean, var, _ in bufs:
                mean.zero_()
                var.zero_()
            module(x)
            for (mean, var, m), (sm, sv) in zip(bufs, sums, strict=True):
                sm += mean.double() / m
                sv += var.double() / m
            n += 1
    finally:
        module.train(was)
    if n == 0:
        raise MtcError("BatchNorm recalibration needs at least one batch")
    for (mean, var, _), (sm, sv) in zip(bufs, sums, strict=True):
        mean.copy_((sm / n).to(mean.dtype))
        var.copy_((sv / n).to(var.dtype))
    return n


def calibration_batches(dataset: Any, tasks: list[Any], *, batches: int, batch_size: int, seed: int,
                        device: str = "cpu") -> list[torch.Tensor]:
    """``batches`` training images batches (seeded, without replacement while the data lasts)."""
    from mtc.tasks.batch import collate_batch

    n = len(dataset)
    if n == 0:
        raise MtcError("the training data set is empty: nothing to recalibrate BatchNorm on")
    rng = np.random.default_rng([seed, 0xBA7C])
    bs = min(batch_size, n)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-batches * bs // n))])
    out = []
    for b in range(batches):
        idx = order[b * bs:(b + 1) * bs]
        images, _ = collate_batch([dataset[int(i)] for i in idx], tasks)
        out.append(images.to(device))
    return out
