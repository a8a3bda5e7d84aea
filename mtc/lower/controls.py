"""Run-time inputs of the ``ai.mtc`` kernels that a search strategy drives.

A lowered supergraph's ``Gate``, ``Mask`` and ``Width`` kernels ask the module's :class:`Controls`
at every step how to mix options, which channels each task keeps and how wide each site is. The
base class gives the neutral answers (the mean of a gate's options, the mask initializers as they
are, full width); a space's strategy subclasses it (Gumbel-softmax sampling, sandwich widths,
sampled allocations) and passes an instance to the lowering. Nothing is hidden on the module:
``module.controls`` is this object.
"""

from __future__ import annotations

from typing import Any

import torch


class Controls:
    """Neutral controls (see the module docstring); subclass to drive a search."""

    module: Any = None

    def bind(self, module: Any) -> None:
        """Called once the module is built (its parameters exist from here on)."""
        self.module = module

    def begin_step(self) -> None:
        """Called at the start of every forward pass (draw this step's samples here)."""

    def gate_weights(self, choice: str, logits: torch.Tensor | None, tasks: int, options: int) -> torch.Tensor | None:
        """The ``[tasks, options]`` mixing weights of op choice ``choice``; None: the plain mean."""
        return None

    def mask(self, choice: str, mask: torch.Tensor) -> torch.Tensor:
        """The ``[tasks, C]`` channel mask of mask choice ``choice`` (default: its initializer)."""
        return mask

    def width(self, choice: str, channels: int, blocks: int) -> list[int] | None:
        """Channels kept per block (one block, or one per task) at width choice ``choice``; None: all."""
        return None

    def state(self) -> dict[str, Any]:
        """JSON-able state to checkpoint (e.g. a temperature)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`."""


class PlanControls(Controls):
    """A plan run in the search form: one-hot gate weights, the plan's masks and widths.

    The search form then computes what the plan's specialised network computes (in eval mode),
    which makes it an oracle for ``specialize`` and a way to evaluate a candidate plan without
    lowering it again.

    Args:
        plan: a :class:`mtc.ir.plan.Plan` (duck-typed: ``ops``, ``masks``, ``widths``).
        choices: the supergraph's choice points (``mtc.ir.supergraph.choices_of``).
        tasks: the task names in stream order.
    """

    def __init__(self, plan: Any, choices: list[Any], tasks: list[str]) -> None:
        self.tasks = list(tasks)
        self.onehot: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.widths: dict[str, list[int]] = {}
        for c in choices:
            if c.kind == "op":
                names = c.option_names
                w = torch.zeros(len(tasks), len(names))
                for i, t in enumerate(tasks):
                    w[i, names.index(plan.ops[c.name][t])] = 1.0
                self.onehot[c.name] = w
            elif c.kind == "mask":
                m = torch.zeros(len(tasks), c.channels)
                for i, t in enumerate(tasks):
                    m[i, plan.masks[c.name][t]] = 1.0
                self.masks[c.name] = m
            else:
                per = plan.widths[c.name]
                self.widths[c.name] = [per["*"]] if "*" in per else [per[t] for t in tasks]

    def gate_weights(self, choice: str, logits: torch.Tensor | None, tasks: int, options: int) -> torch.Tensor | None:
        w = self.onehot[choice]
        return w.to(logits.device) if logits is not None else w

    def mask(self, choice: str, mask: torch.Tensor) -> torch.Tensor:
        return self.masks[choice].to(mask.device)

    def width(self, choice: str, channels: int, blocks: int) -> list[int] | None:
        ws = self.widths[choice]
        return ws * blocks if len(ws) == 1 and blocks > 1 else ws
