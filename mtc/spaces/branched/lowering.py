"""The branched space's search form: its controls, and the activations at the locations.

Modes of :class:`BranchedControls` (what every block's Gate does):

- ``own``: task ``i`` runs copy ``i`` of every block, so the search form is ``T`` single-task
  networks side by side (BMTAS's warm-up; the RSA strategy reads the single-task models'
  activations this way);
- ``gumbel``: per task and block, soft Gumbel-softmax weights over the ``T`` copies from the block's
  ``[T, T]`` logits at temperature ``tau`` (BMTAS's search); ``hard`` gives straight-through
  one-hot samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.lower.controls import Controls
from mtc.lower.module import GraphModule
from mtc.lower.supergraph import lower_search
from mtc.spaces.branched.blocks import branched_choices

MODES = ("own", "gumbel")


@dataclass
class BranchedControls(Controls):
    """The modes of the module docstring; ``sampled`` keeps the last weights per block."""

    mode: str = "own"
    tau: float = 5.0
    hard: bool = False
    choices: tuple[str, ...] = ()
    sampled: dict[str, torch.Tensor] = field(default_factory=dict)
    _logits: list[torch.Tensor] = field(default_factory=list)
    _draw: torch.Tensor | None = None

    def bind(self, module: GraphModule) -> None:
        super().bind(module)
        inits = module.named_initializers()
        self._logits = [inits[f"{c}.policy"] for c in self.choices if f"{c}.policy" in inits]
        self._index = {c: i for i, c in enumerate(self.choices)}

    def begin_step(self) -> None:
        self._draw = None

    def gate_weights(self, choice: str, logits: torch.Tensor | None, tasks: int, options: int) -> torch.Tensor | None:
        if choice not in self._index:
            return None
        if self.mode == "own":
            dev = logits.device if logits is not None else None
            return torch.eye(tasks, options, device=dev)
        if self.mode != "gumbel":
            raise MtcError(f"unknown mode '{self.mode}' (expected one of {', '.join(MODES)})")
        if self._draw is None:
            # one draw per forward pass for every block (many tiny calls cost more than the mixing)
            self._draw = F.gumbel_softmax(torch.stack(self._logits), tau=self.tau, hard=self.hard, dim=-1)
        w = self._draw[self._index[choice]]
        self.sampled[choice] = w.detach()
        return w

    def state(self) -> dict[str, Any]:
        return {"mode": self.mode, "tau": self.tau, "hard": self.hard}

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.mode, self.tau, self.hard = str(state["mode"]), float(state["tau"]), bool(state["hard"])


def lower_branched(model: ir.Model, *, mode: str = "own", tau: float = 5.0, hard: bool = False,
                   device: torch.device | str | None = None) -> GraphModule:
    """The search form of a branched supergraph, driven by :class:`BranchedControls`."""
    if mode not in MODES:
        raise MtcError(f"unknown mode '{mode}' (expected one of {', '.join(MODES)})")
    names = tuple(c.name for c in branched_choices(model))
    return lower_search(model, BranchedControls(mode=mode, tau=tau, hard=hard, choices=names), device=device)


def location_features(model: ir.Model, weights: dict[str, torch.Tensor], images: torch.Tensor, *,
                      device: str = "cpu", batch_size: int = 32) -> list[list[np.ndarray]]:
    """Every task's activations at every location (``[D][T]`` arrays of ``[K, C·H·W]``), each task
    through its own copy of every block (mode ``own``), in eval mode.

    Args:
        model: the branched supergraph.
        weights: tensors by IR name; copy ``i`` of each block holds task ``i``'s single-task encoder.
        images: ``[K, C, H, W]``.
    """
    m = model.clone()
    locs = [c.output for c in branched_choices(m)]
    values = {str(o.name): o for n in m.graph for o in n.outputs}
    for loc in locs:
        m.graph.outputs.append(values[loc])
    module = lower_branched(m, mode="own", device=device)
    own = module.named_initializers()
    module.load_ir_state({k: v for k, v in weights.items() if k in own}, strict=False)
    module.eval()
    T = len(sg.task_names(model))
    D = len(locs)
    out: list[list[list[np.ndarray]]] = [[[] for _ in range(T)] for _ in range(D)]
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size].to(device)
            feats = module(x)[-D:]
            for d, f in enumerate(feats):
                per = f.reshape(T, x.shape[0], -1).float().cpu().numpy()
                for t in range(T):
                    out[d][t].append(per[t])
    return [[np.concatenate(chunks) for chunks in per_d] for per_d in out]
