"""The two ways to lower a supergraph (the ``ai.mtc`` kernels are in :mod:`mtc.lower.mtc_ops`).

- :func:`lower_search`: the search form. The search-time passes (``unstack-slices``,
  ``batch-task-copies``, ``stack-gate-inputs``) rewrite a clone, and the kernels ask the module's
  :class:`~mtc.lower.controls.Controls` how to mix each op choice's options, which channels each
  task keeps and how wide each width choice is.
- :func:`lower_fixed`: a plan bound by the ``specialize`` pass, so unchosen options cost nothing
  and identical task streams run once.

Stacked activations hold one block of ``N`` rows per task (or per group of identical streams after
``specialize``), so ops without parameters and shared operators run once on all streams.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
import torch

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.lower.controls import Controls
from mtc.lower.module import GraphModule, lower

#: The passes that turn a supergraph into its search form (docs/passes.md).
SEARCH_PASSES = ("unstack-slices", "batch-task-copies", "stack-gate-inputs")


def lower_search(model: ir.Model, controls: Controls | None = None, *, device: torch.device | str | None = None,
                 batch_copies: bool = True) -> GraphModule:
    """The search form of a supergraph (a clone is rewritten; ``model`` is not modified).

    Args:
        model: the supergraph.
        controls: what drives its choice nodes (default: neutral :class:`Controls`).
        device: where the module goes.
        batch_copies: run each op choice's per-task copies (and down-sampling skips) as one grouped
            convolution instead of one convolution per task.
    """
    from mtc.ir.names import gc_paused
    from mtc.passes.manager import PassManager, resolve

    sg.check_format(model)
    with gc_paused():
        m = model.clone()
        names = [p for p in SEARCH_PASSES if batch_copies or p != "batch-task-copies"]
        PassManager(resolve(names), verify_each=False).run(m)
        return lower(m, device=device, controls=controls, owned=True)


def lower_fixed(model: ir.Model, plan: Any, *, device: torch.device | str | None = None) -> GraphModule:
    """The network of one plan: ``specialize`` on a clone, then the plain lowering.

    Args:
        model: the supergraph (not modified).
        plan: a :class:`mtc.ir.plan.Plan` or an object with ``to_plan()``.

    Raises:
        MtcError: the plan does not match the supergraph (naming the choice point).
    """
    from mtc.ir.names import gc_paused
    from mtc.passes.specialize import Specialize

    sg.check_format(model)
    with gc_paused():
        m = model.clone()
        Specialize(plan=plan)(m)
        return lower(m, device=device, owned=True)


def choice_parameters(module: GraphModule) -> dict[str, torch.nn.Parameter]:
    """The logits of every op choice that has them, by choice name (``{choice}.policy``)."""
    out = {}
    for name, t in module.named_initializers().items():
        if name.endswith(".policy") and isinstance(t, torch.nn.Parameter):
            out[name[: -len(".policy")]] = t
    return out


def check_mode(mode: str, modes: tuple[str, ...]) -> None:
    if mode not in modes:
        raise MtcError(f"unknown mode '{mode}' (expected one of {', '.join(modes)})")
