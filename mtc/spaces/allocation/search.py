"""The ``gumbel`` strategy of the allocation space: Gumbel-Matrix training (Maziarz et al., Sec. III).

One stage of ``steps`` steps; each step draws one allocation per task and site (straight-through
Gumbel-softmax at temperature ``max(tau_min, tau0 / sqrt(step + 1))``), runs every task's batch
through its allocated components and updates the weights (Adam, ``weight_lr``) and the allocation
logits (Adam, ``alloc_lr`` or ``T · weight_lr``) together, with the budget penalty
``λ · max(0, e_c - b)`` on the mean allocation probability ``e_c``. The plan is the
maximum-likelihood allocation; the end-of-search metrics are measured with it.

Outputs in the run directory: ``allocation.json`` (per site, task and component the probability
and the chosen allocation), ``task_embeddings.json`` (each task's concatenated binary allocation,
their cosine similarities, the number of distinct embeddings) and, with matplotlib, the paper's
Fig. 5 (``task_embeddings.png``) and Fig. 6 (``task_similarity.png``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.spaces import OptimizerSpec, SearchHost, Stage, Strategy, Update
from mtc.spaces.allocation import SPACE, plan_from_allocation
from mtc.spaces.allocation.lowering import (
    LOGITS,
    controls_of,
    cosine_similarity,
    ml_allocation,
    search_network,
    task_embeddings,
)
from mtc.spaces.allocation.options import GUMBEL_OPTIONS
from mtc.spaces.partition.sites import mask_choices

if TYPE_CHECKING:
    from mtc.lower.module import GraphModule


def temperature(step: int, tau0: float = 50.0, tau_min: float = 0.5) -> float:
    """The authors' schedule: ``max(tau_min, tau0 / sqrt(step + 1))``."""
    return max(tau_min, tau0 / math.sqrt(step + 1))


def budget_penalty(e_c: torch.Tensor, budget: float, weight: float) -> torch.Tensor:
    """``λ · max(0, e_c - b)`` (Sec. III-D)."""
    return weight * torch.clamp(e_c - budget, min=0.0)


class GumbelMatrix(Strategy):
    """Gumbel-Matrix allocation learned with the weights (see the module docstring)."""

    name = "gumbel"
    help = "Gumbel-Matrix: binary allocations learned with the weights (straight-through Gumbel-softmax)"
    options = GUMBEL_OPTIONS

    def build(self, host: SearchHost) -> GraphModule:
        o = self.opts
        self.tasks = sg.task_names(self.model)
        self.sites = [c.name for c in mask_choices(self.model, SPACE)]
        self.module = search_network(self.model, p_init=float(o["p_init"]), device=host.device)
        self.controls = controls_of(self.module)
        return self.module

    def optimizers(self, module: GraphModule) -> list[OptimizerSpec]:
        o = self.opts
        inits = module.named_initializers()
        logits = {k + LOGITS: p for k in self.sites if isinstance(p := inits[k + LOGITS], torch.nn.Parameter)}
        ids = {id(p) for p in logits.values()}
        weights = {k: p for k, p in inits.items() if isinstance(p, torch.nn.Parameter) and id(p) not in ids}
        alloc_lr = float(o["alloc_lr"]) if o["alloc_lr_rule"] == "fixed" else len(self.tasks) * float(o["weight_lr"])
        return [OptimizerSpec("weights", weights, float(o["weight_lr"])),
                OptimizerSpec("allocation", logits, alloc_lr)]

    def stages(self) -> list[Stage]:
        o = self.opts

        def before(step: int) -> dict[str, Any]:
            self.controls.sample = True
            self.controls.tau = temperature(step, float(o["tau0"]), float(o["tau_min"]))
            return {"tau": round(self.controls.tau, 6)}

        def budget(_step: int) -> tuple[Any, dict[str, Any]]:
            e_c = self.controls.expected_fraction()
            term = budget_penalty(e_c, float(o["budget"]), float(o["budget_penalty"]))
            return term, {"e_c": round(float(e_c.detach()), 6), "budget_loss": round(float(term.detach()), 6)}

        return [Stage("allocation", int(o["steps"]), [Update("train", ("weights", "allocation"), extra_loss=budget)],
                      before)]

    def eval_mode(self, module: GraphModule) -> None:
        # Inference with the maximum-likelihood allocation (the paper's evaluation).
        self.controls.sample = False

    def derive(self, module: GraphModule) -> Plan:
        probs = {k: v.tolist() for k, v in controls_of(module).probabilities().items()}
        return plan_from_allocation(self.model, ml_allocation(controls_of(module)), probabilities=probs,
                                    info={"probabilities": {k: np.round(v, 6).tolist() for k, v in probs.items()}})

    def finish(self, host: SearchHost, module: GraphModule, plan: Plan) -> Plan:
        alloc = ml_allocation(controls_of(module))
        probs = controls_of(module).probabilities()
        host.write_json("allocation.json", {
            "tasks": self.tasks,
            "sites": {s: {"components": [c for c in next(ch for ch in mask_choices(self.model, SPACE)
                                                         if ch.name == s).info["components"]],
                          "probability": {t: np.round(probs[s][i].numpy(), 6).tolist() for i, t in enumerate(self.tasks)},
                          "allocation": {t: alloc[s][i] for i, t in enumerate(self.tasks)}}
                      for s in self.sites},
            "active_fraction": plan.info.get("active_fraction"),
            "expected_fraction": round(float(self.controls.expected_fraction().detach()), 6),
        })
        write_embeddings(host, alloc, self.sites, self.tasks)
        return plan


def embedding_report(alloc: dict[str, list[list[int]]], sites: list[str], tasks: list[str]) -> dict[str, Any]:
    """The task embeddings, their cosine similarities and how many are distinct."""
    emb = task_embeddings(alloc, sites)
    sim = cosine_similarity(emb)
    return {"tasks": tasks, "sites": sites, "embeddings": emb.astype(int).tolist(),
            "similarity": np.round(sim, 6).tolist(), "distinct": len({tuple(r) for r in emb.astype(int).tolist()})}


def write_embeddings(host: SearchHost, alloc: dict[str, list[list[int]]], sites: list[str], tasks: list[str]) -> None:
    rep = embedding_report(alloc, sites, tasks)
    host.write_json("task_embeddings.json", rep)
    try:
        from mtc.spaces.allocation.plots import plot_embeddings, plot_similarity
    except ImportError:  # matplotlib is optional: the JSON is always written
        return
    plot_embeddings(host.file("task_embeddings.png"), np.asarray(rep["embeddings"]), tasks, sites,
                    [len(alloc[s][0]) for s in sites])
    plot_similarity(host.file("task_similarity.png"), np.asarray(rep["similarity"]), tasks)
