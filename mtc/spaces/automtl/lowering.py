"""AutoMTL's modes of a lowered supergraph.

- ``warmup``: every VCN outputs the average of its three options for every task (AutoMTL's
  pre-train stage), so all weights are trained.
- ``gumbel``: every VCN mixes its options with Gumbel-softmax weights from the policy logits, at
  temperature ``tau``; ``hard=True`` gives straight-through one-hot samples.
- ``fixed``: a discrete policy, bound by ``specialize`` (unchosen options cost nothing and
  identical task streams run once).

The modes live in :class:`AutoMtlControls`, the module's ``controls``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import torch
import torch.nn.functional as F

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.lower.controls import Controls
from mtc.lower.module import GraphModule
from mtc.lower.supergraph import check_mode, choice_parameters, lower_fixed, lower_search
from mtc.spaces.automtl.policy import Policy, is_vcn

MODES = ("warmup", "gumbel", "fixed")


@dataclass
class AutoMtlControls(Controls):
    """The AutoMTL modes (module docstring). ``weights`` keeps the last sample per VCN."""

    mode: str = "warmup"
    tau: float = 5.0
    hard: bool = False
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    vcns: frozenset[str] = frozenset()
    _order: list[str] = field(default_factory=list)
    _logits: list[torch.Tensor] | None = None
    _sampled: dict[int, torch.Tensor] | None = None

    def bind(self, module: GraphModule) -> None:
        super().bind(module)
        inits = module.named_initializers()
        # The gates' execution order (as v1 sampled them), so a seed draws the same noise.
        gates = {f"{n}.gate": n for n in self.vcns}
        self._order = [gates[name] for name in module.step_names() if name in gates and f"{gates[name]}.policy" in inits]
        self._logits = [inits[f"{n}.policy"] for n in self._order]
        self._index = {n: i for i, n in enumerate(self._order)}

    def begin_step(self) -> None:
        self._sampled = None

    def gate_weights(self, choice: str, logits: torch.Tensor | None, tasks: int, options: int) -> torch.Tensor | None:
        if self.mode == "warmup" or choice not in self.vcns:
            return None
        if self.mode != "gumbel":
            raise RuntimeError(f"mode '{self.mode}' needs a specialised module: use lower_supergraph(mode='fixed')")
        if self._sampled is None:
            # One Gumbel-softmax call per forward pass for all VCNs of one option count (many tiny
            # calls per gate cost more than the mixing itself on small nets).
            assert self._logits is not None
            self._sampled = {}
            for k in sorted({t.shape[-1] for t in self._logits}):
                idx = [i for i, t in enumerate(self._logits) if t.shape[-1] == k]
                draw = F.gumbel_softmax(torch.stack([self._logits[i] for i in idx]), tau=self.tau, hard=self.hard,
                                        dim=-1)
                for j, i in enumerate(idx):
                    self._sampled[i] = draw[j]
        w = self._sampled[self._index[choice]]
        self.weights[choice] = w.detach()
        return w

    def state(self) -> dict[str, Any]:
        return {"mode": self.mode, "tau": self.tau, "hard": self.hard}

    def load_state(self, state: dict[str, Any]) -> None:
        self.mode, self.tau, self.hard = str(state["mode"]), float(state["tau"]), bool(state["hard"])


def controls_of(module: GraphModule) -> AutoMtlControls:
    c = module.controls
    if not isinstance(c, AutoMtlControls):
        raise MtcError("the module was not lowered in an AutoMTL search mode")
    return c


def set_mode(module: GraphModule, mode: str, *, tau: float | None = None, hard: bool | None = None) -> None:
    """Switch a lowered supergraph between ``warmup`` and ``gumbel`` (``fixed`` is built separately)."""
    if mode not in ("warmup", "gumbel"):
        raise MtcError(f"mode '{mode}' cannot be switched to at run time (expected warmup or gumbel)")
    st = controls_of(module)
    st.mode = mode
    if tau is not None:
        st.tau = float(tau)
    if hard is not None:
        st.hard = bool(hard)


def lower_supergraph(
    model: ir.Model,
    *,
    mode: str = "warmup",
    policy: Policy | None = None,
    tau: float = 5.0,
    hard: bool = False,
    device: torch.device | str | None = None,
    batch_copies: bool = True,
) -> GraphModule:
    """Lower an AutoMTL supergraph in ``mode``; ``fixed`` needs ``policy`` and specialises a clone.

    In the search modes, ``batch_copies`` runs each VCN's task-specific copies (and down-sampling
    skips) as one grouped convolution instead of one convolution per task.
    """
    sg.check_format(model)
    check_mode(mode, MODES)
    if mode == "fixed":
        if policy is None:
            raise MtcError("mode 'fixed' needs a policy")
        policy.validate(model)
        return lower_fixed(model, policy.to_plan(), device=device)
    vcns = frozenset(c.name for c in sg.choices_of(model, "op") if is_vcn(c))
    controls = AutoMtlControls(mode=mode, tau=tau, hard=hard, vcns=vcns)
    return lower_search(model, controls, device=device, batch_copies=batch_copies)


def policy_parameters(module: GraphModule) -> dict[str, torch.nn.Parameter]:
    """The policy logits of every VCN, by VCN name (``{vcn}.policy`` initializers)."""
    c = module.controls
    params = choice_parameters(module)
    if isinstance(c, AutoMtlControls):
        return {k: v for k, v in params.items() if k in c.vcns}
    return params
