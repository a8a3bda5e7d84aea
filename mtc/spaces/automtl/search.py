"""AutoMTL's policy search (paper section 5): the regulariser, the temperature schedule, deriving a
discrete policy, the task-correlation matrix, and the ``gumbel`` strategy that runs stages 1 and 2
(pre-train, then weights and policy alternately) on the trainer.

Notation follows the paper: L VCNs at depths l = 1..L (topological order), N tasks, per task and
VCN a distribution π over (shared, specific, skip).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from mtc.errors import MtcError
from mtc.ir.plan import Plan
from mtc.spaces import OptimizerSpec, SearchHost, Stage, Strategy, Update
from mtc.spaces.automtl.options import (
    DEFAULTS,
    GENERIC,
    LAMBDA_REG_SCALINGS,
    PAPER_POLICY_STEPS,
    STRATEGY_OPTIONS,
    SearchOptions,
)
from mtc.spaces.automtl.policy import OPTIONS, Policy, vcns_of

__all__ = ["DEFAULTS", "LAMBDA_REG_SCALINGS", "PAPER_POLICY_STEPS", "GumbelSearch", "SearchOptions", "TauSchedule",
           "derive_policy", "distributions", "policy_json", "policy_regularizer", "sample_policy",
           "sharing_fraction", "task_correlation"]

if TYPE_CHECKING:
    from mtc.lower.module import GraphModule

def distributions(logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """π per VCN: softmax of its ``[tasks, 3]`` logits."""
    return {v: F.softmax(t, dim=-1) for v, t in logits.items()}


def policy_regularizer(logits: Mapping[str, torch.Tensor], depths: Mapping[str, int]) -> torch.Tensor:
    """AutoMTL Eq. 3: Σ_i Σ_l (L − l)/L [softplus(P'(1) − P'(0)) + softplus(P'(2) − P'(0))].

    ``P'`` is evaluated as the policy distribution π (the softmax of the logits), the quantity the
    Gumbel samples are drawn from; bottom VCNs (small l) weigh most, so sharing is pushed there.

    Args:
        logits: VCN name -> ``[tasks, 3]`` logits.
        depths: VCN name -> depth l (1-based); L is the largest depth.
    """
    if not logits:
        raise MtcError("the supergraph has no VCNs: nothing to regularise")
    big_l = max(depths[v] for v in logits)
    total: torch.Tensor | None = None
    for v, t in logits.items():
        p = F.softmax(t, dim=-1)
        term = F.softplus(p[:, 1] - p[:, 0])
        if p.shape[-1] > 2:  # a VCN without a skip has no skip term
            term = term + F.softplus(p[:, 2] - p[:, 0])
        w = (big_l - depths[v]) / big_l
        contrib = w * term.sum()
        total = contrib if total is None else total + contrib
    assert total is not None
    return total


@dataclass(frozen=True)
class TauSchedule:
    """Gumbel-softmax temperature: τ0 = 5 (paper) annealed geometrically toward ``tau_min``.

    τ(s) = max(tau_min, τ0 · decay^s) for policy-train step s. The default decay brings τ from 5 to
    about 0.5 over ``steps`` steps, so late samples are close to one-hot.
    """

    tau0: float = 5.0
    tau_min: float = 0.1
    decay: float | None = None
    steps: int = 1000

    def __call__(self, step: int) -> float:
        decay = self.decay if self.decay is not None else (0.1) ** (1.0 / max(1, self.steps))
        return max(self.tau_min, self.tau0 * decay ** step)


def derive_policy(logits: Mapping[str, torch.Tensor], tasks: list[str]) -> Policy:
    """The most probable option per task and VCN (deterministic)."""
    return Policy({v: {t: int(i) for t, i in zip(tasks, torch.argmax(x, dim=-1).tolist(), strict=True)}
                   for v, x in logits.items()})


def sample_policy(logits: Mapping[str, torch.Tensor], tasks: list[str], generator: torch.Generator) -> Policy:
    """One policy drawn from π (for ``--sample K``)."""
    out: dict[str, dict[str, int]] = {}
    for v, x in logits.items():
        p = F.softmax(x.detach().float(), dim=-1)
        idx = torch.multinomial(p, 1, generator=generator).squeeze(-1).tolist()
        out[v] = {t: int(i) for t, i in zip(tasks, idx, strict=True)}
    return Policy(out)


def task_correlation(logits: Mapping[str, torch.Tensor], tasks: list[str]) -> np.ndarray:
    """Cosine similarity of the tasks' policies (AutoMTL Appendix D): each task's π over all VCNs
    flattened into one vector; entry (i, j) compares tasks i and j."""
    vecs = torch.stack([torch.cat([F.softmax(x.detach().float(), -1)[i] for x in logits.values()])
                        for i in range(len(tasks))])
    vecs = F.normalize(vecs, dim=-1)
    return (vecs @ vecs.T).numpy()


def policy_json(logits: Mapping[str, torch.Tensor], tasks: list[str], chosen: Policy) -> dict:
    """``policy.json``: per task, per VCN, the distribution π and the chosen option."""
    pis = distributions({v: x.detach().float() for v, x in logits.items()})
    return {
        "options": list(OPTIONS),
        "tasks": {
            t: {v: {"pi": [round(float(p), 6) for p in pis[v][i].tolist()],
                    "chosen": OPTIONS[chosen.choices[v][t]]}
                for v in logits}
            for i, t in enumerate(tasks)
        },
    }


def sharing_fraction(policy: Policy, a: str, b: str) -> float:
    """Fraction of VCNs where tasks ``a`` and ``b`` both choose the shared operator."""
    n = len(policy.choices)
    return sum(1 for per in policy.choices.values() if per[a] == 0 and per[b] == 0) / n if n else math.nan


# ------------------------------------------------------------------------------------------------
# The search driver: pre-train, then policy-train (weights and policy alternately).


# ------------------------------------------------------------------------------------------------
# The strategy: every constant of SearchOptions that is not a generic training knob is an option.

class GumbelSearch(Strategy):
    """AutoMTL's search (sections 5.1-5.2): pre-train with every option averaged, then weights on
    train1 and the policy on train2 (Gumbel-softmax over the options, Eq. 3's regulariser)."""

    name = "gumbel"
    help = "AutoMTL: pre-train, then weights and policy alternately (Gumbel-softmax, Eq. 3)"
    options = STRATEGY_OPTIONS

    def _opts(self, host: SearchHost) -> SearchOptions:
        cfg = {k: getattr(host.config, k) for k in GENERIC if hasattr(host.config, k)}
        return SearchOptions(**self.opts, **cfg)

    def build(self, host: SearchHost) -> GraphModule:
        from mtc.spaces.automtl.lowering import lower_supergraph, policy_parameters

        self.host = host
        self.o = o = self._opts(host)
        self.names = [t.name for t in host.tasks]
        self.depths = {v.name: v.depth for v in vcns_of(self.model)}
        self.module = lower_supergraph(self.model, mode="warmup", tau=o.tau0, hard=o.hard, device=host.device)
        self.logits = policy_parameters(self.module)
        self.lambda_reg = o.effective_lambda_reg()
        self.tau = TauSchedule(o.tau0, o.tau_min, o.tau_decay, max(1, o.policy_steps))
        return self.module

    def optimizers(self, module: GraphModule) -> list[OptimizerSpec]:
        ids = {id(p) for p in self.logits.values()}
        weights = {k: p for k, p in module.named_initializers().items()
                   if isinstance(p, torch.nn.Parameter) and id(p) not in ids}
        return [OptimizerSpec("weights", weights, self.o.weight_lr, decay=self.o.lr_decay,
                              decay_every=self.o.lr_decay_every),
                OptimizerSpec("policy", {f"{k}.policy": p for k, p in self.logits.items()}, self.o.policy_lr)]

    def streams(self, train: Any) -> dict[str, Any]:
        # AutoMTL's train1/train2: the weights and the policy learn from disjoint parts of the data.
        from torch.utils.data import Subset

        n = len(train)
        perm = np.random.default_rng([self.o.seed, 7]).permutation(n)
        cut = max(1, min(n - 1, int(round(n * (1 - self.o.policy_fraction)))))
        return {"pretrain": train, "weights": Subset(train, perm[:cut].tolist()),
                "policy": Subset(train, perm[cut:].tolist())}

    def stages(self) -> list[Stage]:
        from mtc.spaces.automtl.lowering import set_mode

        def warmup(_s: int) -> dict[str, Any]:
            set_mode(self.module, "warmup")
            return {}

        def gumbel(s: int) -> dict[str, Any]:
            set_mode(self.module, "gumbel", tau=self.tau(s), hard=self.o.hard)
            return {"tau": self.tau(s)}

        def reg(_s: int) -> tuple[Any, dict[str, Any]]:
            r = policy_regularizer(self.logits, self.depths)
            return self.lambda_reg * r, {"reg": float(r.detach()), "lambda_reg": self.lambda_reg}

        return [Stage("pretrain", self.o.pretrain_steps, [Update("pretrain", ("weights",))], warmup),
                Stage("policy", self.o.policy_steps,
                      [Update("weights", ("weights",)),
                       Update("policy", ("policy",), extra_loss=reg, record="policy_loss")], gumbel)]

    def eval_mode(self, module: GraphModule) -> None:
        from mtc.spaces.automtl.lowering import set_mode

        # The end-of-search metrics are the searched distribution's, whatever stage ran last.
        if self.o.policy_steps > 0:
            set_mode(module, "gumbel", tau=self.tau(self.o.policy_steps), hard=self.o.hard)
        else:
            set_mode(module, "warmup")

    def derive(self, module: GraphModule) -> Plan:
        return derive_policy(self.logits, self.names).to_plan()

    def finish(self, host: SearchHost, module: GraphModule, plan: Plan) -> Plan:
        policy = Policy.from_plan(plan)
        if self.o.sample > 0:
            policy = _best_sampled(self.model, module, self.logits, self.names, host, self.o, policy)
        _write_policy_outputs(host, self.logits, self.names, policy)
        return policy.to_plan()


def _best_sampled(model: Any, module: Any, logits: Any, names: list[str], host: SearchHost, opts: SearchOptions,
                  mode_policy: Policy) -> Policy:
    """Draw K policies, score each briefly on validation with the searched weights, keep the best."""
    from mtc.spaces.automtl.lowering import lower_supergraph

    gen = torch.Generator().manual_seed(opts.seed)
    candidates = [mode_policy] + [sample_policy(logits, names, gen) for _ in range(opts.sample)]
    best, best_loss = mode_policy, math.inf
    trained = module.ir_state()
    for cand in candidates:
        fixed = lower_supergraph(model, mode="fixed", policy=cand, device=host.device)
        own = fixed.named_initializers()
        fixed.load_ir_state({k: v for k, v in trained.items() if k in own and own[k].shape == v.shape}, strict=False)
        scores = host.evaluate(fixed, max_batches=opts.eval_batches)
        total = sum(s["loss"] for s in scores.values())
        if total < best_loss:
            best, best_loss = cand, total
    return best


def _write_policy_outputs(host: SearchHost, logits: Any, names: list[str], policy: Policy) -> None:
    host.write_json("policy.json", {**policy_json(logits, names, policy), "policy": policy.to_json()})
    corr = task_correlation(logits, names)
    host.write_json("task_correlation.json", {"tasks": names, "matrix": np.round(corr, 6).tolist()})
    try:
        from mtc.spaces.automtl.plots import plot_correlation, plot_policy

        plot_policy(host.file("policy.png"), logits, names)
        plot_correlation(host.file("task_correlation.png"), corr, names)
    except ImportError:  # matplotlib is optional: JSON is always written
        pass
