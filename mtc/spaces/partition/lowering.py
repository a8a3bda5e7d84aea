"""Kernels and controls of the partition space's training form (:mod:`mtc.spaces.partition.training`).

:class:`PartitionControls` holds each site's forward masks ``m_f`` and backward masks ``m_b`` as
``[T, C]`` tensors; :meth:`PartitionControls.set_plan` swaps in another candidate's masks, so one
lowered network evaluates many plans without lowering again. :func:`training_network` is the
space's :meth:`~mtc.spaces.Space.train_network`: the training form driven by a plan, with the
frozen layers' parameters off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir
import torch

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.lower.controls import Controls, PlanControls
from mtc.lower.module import GraphModule
from mtc.lower.registry import BuildNode, Kernel, register_op
from mtc.lower.supergraph import lower_search
from mtc.spaces.partition.training import DOMAIN, training_form

SPACE = "partition"


class PartitionControls(Controls):
    """Forward and backward masks per site, ``[T, C]`` float tensors (ones: every channel).

    Args:
        choices: the space's mask choice points.
        tasks: the task names in stream order.
    """

    def __init__(self, choices: Sequence[sg.ChoicePoint], tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.sizes = {c.name: c.channels for c in choices}
        self.forward = {c.name: torch.ones(len(self.tasks), c.channels) for c in choices}
        self.backward = {c.name: torch.ones(len(self.tasks), c.channels) for c in choices}

    def _table(self, masks: Mapping[str, Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        out = {}
        for name, size in self.sizes.items():
            m = torch.zeros(len(self.tasks), size)
            for i, t in enumerate(self.tasks):
                m[i, list(masks[name][t])] = 1.0
            out[name] = m
        return out

    def set_masks(self, forward: Mapping[str, Mapping[str, Sequence[int]]],
                  backward: Mapping[str, Mapping[str, Sequence[int]]] | None = None) -> None:
        """Use these kept channels (site -> task -> indices); backward ones default to the forward ones."""
        device = next(iter(self.forward.values())).device if self.forward else "cpu"
        self.forward = {k: v.to(device) for k, v in self._table(forward).items()}
        table = self._table(backward) if backward is not None else self.forward
        self.backward = {k: (v * self.forward[k]).to(device) for k, v in table.items()}

    def set_plan(self, plan: Plan, others: Sequence[sg.ChoicePoint] = ()) -> None:
        """Use ``plan``'s masks (and its backward masks, ``info["backward"]``); the choice points of
        other spaces composed with this one (``others``) follow the plan too."""
        mine = {k: v for k, v in plan.masks.items() if k in self.sizes}
        back = plan.info.get("backward")
        self.set_masks(mine, {k: v for k, v in back.items() if k in self.sizes} if back else None)
        self._others = PlanControls(plan, list(others), self.tasks) if others else None

    def gate_weights(self, choice: str, logits: torch.Tensor | None, tasks: int, options: int) -> torch.Tensor | None:
        o = getattr(self, "_others", None)
        return o.gate_weights(choice, logits, tasks, options) if o is not None else None

    def width(self, choice: str, channels: int, blocks: int) -> list[int] | None:
        o = getattr(self, "_others", None)
        return o.width(choice, channels, blocks) if o is not None else None

    def forward_mask(self, choice: str) -> torch.Tensor:
        return self.forward[choice]

    def backward_mask(self, choice: str) -> torch.Tensor:
        return self.backward[choice]

    def mask(self, choice: str, mask: torch.Tensor) -> torch.Tensor:
        m = self.forward.get(choice)
        if m is not None:
            return m.to(mask.device)
        o = getattr(self, "_others", None)
        return o.mask(choice, mask) if o is not None else mask

    def to(self, device: torch.device | str) -> PartitionControls:
        self.forward = {k: v.to(device) for k, v in self.forward.items()}
        self.backward = {k: v.to(device) for k, v in self.backward.items()}
        return self


def _controls(node: BuildNode) -> Any:
    c = getattr(node.module, "controls", None)
    if not hasattr(c, "forward_mask"):
        raise node.error("partition masks need the space's controls (mtc.spaces.partition.lowering."
                         "PartitionControls)")
    return c


def _blocks(x: torch.Tensor, m: torch.Tensor, tasks: int, axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as ``[T, N, ...]`` and ``m`` ``[T, C]`` shaped to broadcast over it on ``axis``."""
    xs = x.view(tasks, -1, *x.shape[1:])
    shape = [tasks] + [1] * (xs.dim() - 1)
    shape[axis + 1] = m.shape[1]
    return xs, m.to(x.dtype).view(shape)


@register_op("TaskMask", domain=DOMAIN, foldable=False, shape_probe=False)
def _task_mask(node: BuildNode) -> Kernel:
    choice, T, axis = str(node.attr("choice")), int(node.attr("tasks")), int(node.attr("axis", 1))
    controls = _controls(node)

    def task_mask(x: torch.Tensor) -> torch.Tensor:
        xs, m = _blocks(x, controls.forward_mask(choice), T, axis)
        return (xs * m).reshape(x.shape)

    return task_mask


@register_op("RowMask", domain=DOMAIN, foldable=False, shape_probe=False)
def _row_mask(node: BuildNode) -> Kernel:
    choice, T = str(node.attr("choice")), int(node.attr("tasks"))
    controls = _controls(node)

    def row_mask(x: torch.Tensor) -> torch.Tensor:
        xs, m = _blocks(x, controls.backward_mask(choice), T)
        return (xs * m).reshape(x.shape)

    return row_mask


@register_op("Blend", domain=DOMAIN, foldable=False, shape_probe=False)
def _blend(node: BuildNode) -> Kernel:
    """Per stream, the backward-mask channels from ``a`` and the others from ``b`` (equal values)."""
    choice, T = str(node.attr("choice")), int(node.attr("tasks"))
    controls = _controls(node)

    def blend(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        xa, m = _blocks(a, controls.backward_mask(choice), T)
        xb = b.view_as(xa)
        return (xa * m + xb * (1 - m)).reshape(a.shape)

    return blend


@register_op("ParamMask", domain=DOMAIN, foldable=False, shape_probe=False)
def _param_mask(node: BuildNode) -> Kernel:
    """``p ⊙ r + sg(p) ⊙ (1 - r)``: ``r`` the task's backward mask along ``axis`` (blocks of equal size
    per channel when the axis is longer, e.g. after a Flatten)."""
    choice, task, axis = str(node.attr("choice")), int(node.attr("task")), int(node.attr("axis", 0))
    node.weight(0)
    controls = _controls(node)

    def param_mask(p: torch.Tensor) -> torch.Tensor:
        r = controls.backward_mask(choice)[task].to(p.dtype)
        size = p.shape[axis]
        if size != r.numel():
            r = r.repeat_interleave(size // r.numel())
        shape = [1] * p.dim()
        shape[axis] = size
        r = r.view(shape)
        return p * r + p.detach() * (1 - r)

    return param_mask


@register_op("StopGrad", domain=DOMAIN, foldable=False, shape_probe=False)
def _stop_grad(node: BuildNode) -> Kernel:
    node.weight(0)
    return lambda w: w.detach()


def partition_choices(model: ir.Model) -> list[sg.ChoicePoint]:
    return [c for c in sg.choices_of(model, "mask") if c.info.get("space") == SPACE]


def has_backward(plan: Plan) -> bool:
    """Whether the plan's backward masks differ from its forward masks anywhere."""
    back = plan.info.get("backward") or {}
    return any(sorted(back[c][t]) != sorted(plan.masks[c][t]) for c in back for t in back[c])


def search_network(model: ir.Model, *, backward: bool, device: str | torch.device | None = None,
                   frozen: Sequence[str] = ()) -> GraphModule:
    """The training form lowered with :class:`PartitionControls` (all channels until set)."""
    controls = PartitionControls(partition_choices(model), sg.task_names(model))
    module = lower_search(training_form(model, SPACE, backward=backward), controls, device=device)
    if device is not None:
        controls.to(device)
    freeze(module, frozen)
    return module


def freeze(module: GraphModule, names: Sequence[str]) -> None:
    """Turn off the gradients of these parameters (IR names)."""
    own = module.named_initializers()
    for n in names:
        t = own.get(n)
        if isinstance(t, torch.nn.Parameter):
            t.requires_grad_(False)


def training_network(model: ir.Model, plan: Plan, *, frozen: Sequence[str],
                     device: str | torch.device | None = None) -> GraphModule:
    """The network that trains ``plan`` with its backward masks and frozen layers."""
    module = search_network(model, backward=has_backward(plan), device=device, frozen=frozen)
    ctl = module.controls
    if not isinstance(ctl, PartitionControls):  # pragma: no cover - built above
        raise MtcError("internal: the partition network lost its controls")
    ctl.set_plan(plan, [c for c in sg.choices_of(model) if c.name not in ctl.sizes])
    if device is not None:
        ctl.to(device)
    return module
