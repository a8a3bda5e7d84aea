"""Strategy ``gumbel``: a gradient-based tree search after BMTAS (Bruggemann et al., "Automated search
for resource-efficient branched multi-task networks").

Every block has ``T`` copies; per task and block a Gumbel-softmax over the copies (``[T, T]``
logits per block, zero-initialised, soft samples) mixes their outputs. The weights (Adam, 1e-3)
train on 80 % of the training data, the logits (Adam, 1e-2) on the other 20 %, after a warm-up in
which every task runs its own copy; the temperature falls linearly from 5 to 0.1. The logits' loss
adds the resource loss

    L_res = λ · Σ_d (s_d / Σ_e s_e) · Σ_j (1 − Π_i (1 − p_dij)),      p_di = softmax(logits_d[i])

the expected number of copies in use (copy ``j`` is used unless no task picks it) times their cost,
in units of one copy of the whole encoder; in closed form, where the authors' code enumerates all
``T^T`` assignments. The derived plan takes every task's most probable copy and is made a tree (a
group can only split further down).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from mtc.ir.plan import Plan
from mtc.spaces import OptimizerSpec, SearchHost, Stage, Strategy, Update
from mtc.spaces.branched.blocks import blocks_of, levels_json, tree_to_plan
from mtc.spaces.branched.options import GUMBEL_OPTIONS
from mtc.spaces.branched.trees import Partition, make_tree

if TYPE_CHECKING:
    from mtc.lower.module import GraphModule


def expected_copies(probs: torch.Tensor) -> torch.Tensor:
    """``Σ_j (1 − Π_i (1 − p_ij))``: the expected number of distinct copies the tasks pick when task
    ``i`` picks copy ``j`` with probability ``probs[..., i, j]`` independently."""
    return (1.0 - torch.prod(1.0 - probs, dim=-2)).sum(-1)


def resource_loss(logits: Sequence[torch.Tensor], costs: Sequence[float]) -> torch.Tensor:
    """``Σ_d costs[d] · E[copies of block d in use]`` under softmax(logits_d) per task."""
    p = F.softmax(torch.stack(list(logits)), dim=-1)
    return (expected_copies(p) * torch.as_tensor(list(costs), dtype=p.dtype, device=p.device)).sum()


def linear_tau(tau0: float, tau_min: float, steps: int):
    """τ(s) from ``tau0`` at the first search step to ``tau_min`` at the last (BMTAS's schedule)."""
    def tau(s: int) -> float:
        return tau_min if steps <= 1 else tau0 - (tau0 - tau_min) * min(s, steps - 1) / (steps - 1)

    return tau


def derive_levels(logits: Sequence[torch.Tensor], n: int) -> list[Partition]:
    """Every task's most probable copy per block, made a tree."""
    levels = []
    for x in logits:
        pick = torch.argmax(x.detach(), dim=-1).tolist()
        groups: dict[int, int] = {}
        for i, k in enumerate(pick):
            groups[k] = groups.get(k, 0) | (1 << i)
        levels.append(tuple(sorted(groups.values(), key=lambda b: b & -b)))
    return make_tree(levels)


class GumbelTreeSearch(Strategy):
    """BMTAS's search on the branched supergraph (see the module docstring)."""

    name = "gumbel"
    help = "BMTAS: Gumbel-softmax over each block's copies with a closed-form resource loss"
    options = GUMBEL_OPTIONS

    def build(self, host: SearchHost) -> GraphModule:
        from mtc.spaces.branched.lowering import lower_branched

        o = self.opts
        self.host = host
        self.blocks = blocks_of(self.model)
        self.module = lower_branched(self.model, mode="own", tau=float(o["tau0"]), device=host.device)
        inits = self.module.named_initializers()
        self.logits = [inits[f"{c}.policy"] for c in self.blocks.choices]
        sizes = np.array(self.blocks.sizes(str(o["resource_unit"])), dtype=np.float64)
        self.costs = (sizes / max(sizes.sum(), 1.0)).tolist()
        self.tau = linear_tau(float(o["tau0"]), float(o["tau_min"]), int(o["search_steps"]))
        return self.module

    def optimizers(self, module: GraphModule) -> list[OptimizerSpec]:
        ids = {id(p) for p in self.logits}
        weights = {k: p for k, p in module.named_initializers().items()
                   if isinstance(p, torch.nn.Parameter) and id(p) not in ids}
        policy = {f"{c}.policy": p for c, p in zip(self.blocks.choices, self.logits, strict=True)
                  if isinstance(p, torch.nn.Parameter)}
        return [OptimizerSpec("weights", weights, float(self.opts["weight_lr"])),
                OptimizerSpec("policy", policy, float(self.opts["policy_lr"]))]

    def streams(self, train: Any) -> dict[str, Any]:
        from torch.utils.data import Subset

        n = len(train)
        perm = np.random.default_rng([self.host.seed, 0xB3]).permutation(n)
        cut = max(1, min(n - 1, int(round(n * (1 - float(self.opts["policy_fraction"]))))))
        return {"weights": Subset(train, perm[:cut].tolist()), "policy": Subset(train, perm[cut:].tolist())}

    def _controls(self) -> Any:
        from mtc.spaces.branched.lowering import BranchedControls

        c = self.module.controls
        assert isinstance(c, BranchedControls)
        return c

    def stages(self) -> list[Stage]:
        lam = float(self.opts["resource_weight"])

        def own(_s: int) -> dict[str, Any]:
            self._controls().mode = "own"
            return {}

        def gumbel(s: int) -> dict[str, Any]:
            c = self._controls()
            c.mode, c.tau = "gumbel", self.tau(s)
            return {"tau": round(c.tau, 5)}

        def resource(_s: int) -> tuple[Any, dict[str, Any]]:
            r = resource_loss(self.logits, self.costs)
            return lam * r, {"resource": round(float(r.detach()), 5)}

        return [Stage("warmup", int(self.opts["warmup_steps"]), [Update("weights", ("weights",))], own),
                Stage("search", int(self.opts["search_steps"]),
                      [Update("weights", ("weights",)),
                       Update("policy", ("policy",), extra_loss=resource, record="policy_loss")], gumbel)]

    def eval_mode(self, module: GraphModule) -> None:
        c = self._controls()
        if int(self.opts["search_steps"]) > 0:
            c.mode, c.tau = "gumbel", self.tau(int(self.opts["search_steps"]) - 1)
        else:
            c.mode = "own"

    def derive(self, module: GraphModule) -> Plan:
        levels = derive_levels(self.logits, len(self.blocks.tasks))
        return tree_to_plan(levels, self.blocks, {"tree": levels_json(levels, self.blocks.tasks)})

    def finish(self, host: SearchHost, module: GraphModule, plan: Plan) -> Plan:
        from mtc.spaces.branched.blocks import plan_levels
        from mtc.spaces.branched.rsa import _plot, tree_info

        levels = plan_levels(plan, self.blocks)
        unit = str(self.opts["resource_unit"])
        with torch.no_grad():
            p = F.softmax(torch.stack([x.detach().float() for x in self.logits]), dim=-1)
            same = (p @ p.transpose(1, 2)).numpy()  # P(tasks i and j pick the same copy of block d)
            for m in same:
                np.fill_diagonal(m, 1.0)
            expected = float(resource_loss(self.logits, self.costs))
        info = tree_info(None, self.blocks, levels, unit) | {
            "strategy": "gumbel", "resource_unit": unit, "expected_copies_cost": round(expected, 6),
            "probabilities": np.round(p.numpy(), 6).tolist()}
        host.write_json("tree.json", info)
        host.write_json("selection.json", {"tasks": self.blocks.tasks, "locations": self.blocks.locations,
                                           "same_copy": np.round(same, 6).tolist(),
                                           "note": "same_copy[d][i][j]: probability that tasks i and j pick "
                                                   "the same copy of block d"})
        _plot(host.file("tree.png"), levels, self.blocks, f"gumbel tree (λ = {self.opts['resource_weight']})")
        try:
            from mtc.spaces.branched.plots import plot_affinity

            plot_affinity(host.file("affinity.png"), same, self.blocks.tasks, self.blocks.locations,
                          title="P(two tasks pick the same copy)")
        except ImportError:
            pass
        plan.info.update({"cost": None, "params": info["params"], "macs": info["macs"]})
        return plan
