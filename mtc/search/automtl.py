"""AutoMTL's policy search pieces (paper section 5): the regulariser, the temperature schedule,
deriving a discrete policy, and the task-correlation matrix.

Notation follows the paper: L VCNs at depths l = 1..L (topological order), N tasks, per task and
VCN a distribution π over (shared, specific, skip).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mtc.errors import MtcError
from mtc.ir.supergraph import OPTIONS, Policy

#: AutoMTL Table 1 defaults (NYUv2 / CityScapes rows) and section 5.
DEFAULTS = {
    "weight_lr": 1e-3,
    "policy_lr": 1e-2,
    "lr_decay": 0.5,
    "lr_decay_every": 4000,
    "lambda_reg": 1e-3,
    "tau0": 5.0,
}


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
        term = F.softplus(p[:, 1] - p[:, 0]) + F.softplus(p[:, 2] - p[:, 0])
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
