"""AutoMTL's search options: every constant of the search, with the paper's defaults.

Kept apart from the search itself (which needs torch) so that the command line can declare the
options without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mtc.errors import MtcError
from mtc.spaces import Option

#: AutoMTL Table 1 defaults (NYUv2 / CityScapes rows) and section 5.
DEFAULTS = {
    "weight_lr": 1e-3,
    "policy_lr": 1e-2,
    "lr_decay": 0.5,
    "lr_decay_every": 4000,
    "lambda_reg": 1e-3,
    "tau0": 5.0,
}

#: Policy-logit updates behind Table 1's λ_reg: 20,000 policy-train iterations (section 6.1), of
#: which the authors' implementation spends 100 of every 500 on the policy (the rest on weights).
#: See :meth:`SearchOptions.effective_lambda_reg`.
PAPER_POLICY_STEPS = 4_000
LAMBDA_REG_SCALINGS = ("budget", "none")


@dataclass
class SearchOptions:
    """Every constant of the search; defaults follow AutoMTL (Table 1, section 5) where it gives one.

    Step counts default to a small CPU budget (the paper used 10,000 + 20,000 iterations).
    """

    pretrain_steps: int = 200
    policy_steps: int = 400
    batch_size: int = 8
    weight_lr: float = DEFAULTS["weight_lr"]
    policy_lr: float = DEFAULTS["policy_lr"]
    lr_decay: float = DEFAULTS["lr_decay"]
    lr_decay_every: int = int(DEFAULTS["lr_decay_every"])
    lambda_reg: float = DEFAULTS["lambda_reg"]
    lambda_reg_scaling: str = "budget"  # or "none"; see effective_lambda_reg
    task_weights: dict[str, float] | None = None
    tau0: float = DEFAULTS["tau0"]
    tau_min: float = 0.1
    tau_decay: float | None = None
    hard: bool = False
    policy_fraction: float = 0.5  # the share of the training data kept for the policy (train2)
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    sample: int = 0  # --sample K: draw K policies and keep the best on validation
    eval_batches: int = 4
    amp: bool = False  # bfloat16 autocast on CUDA

    def __post_init__(self) -> None:
        if self.lambda_reg_scaling not in LAMBDA_REG_SCALINGS:
            raise MtcError(f"unknown λ_reg scaling '{self.lambda_reg_scaling}' (expected "
                           f"{' or '.join(LAMBDA_REG_SCALINGS)})")
        if self.lambda_reg < 0:
            raise MtcError(f"--lambda-reg must be >= 0, got {self.lambda_reg}")

    def effective_lambda_reg(self) -> float:
        """The weight of L_reg per policy step.

        ``budget`` (default): ``λ_reg · 4,000 / policy_steps``. The logits train with Adam, whose
        steps are normalised by the gradient's RMS, which the noisy task losses dominate; the
        regulariser's steady gradient therefore moves the logits in proportion to λ_reg times the
        number of policy updates. Table 1's λ_reg was used over about 4,000 policy updates
        (``PAPER_POLICY_STEPS``), so a shorter search gets the same total pull from a
        proportionally larger weight (at the default 400 steps, 0.01). Without it, the paper's 0.001
        over 400 steps changes no choice at all (docs/search.md). ``none``: λ_reg as given.
        """
        if self.lambda_reg_scaling == "none":
            return self.lambda_reg
        return self.lambda_reg * PAPER_POLICY_STEPS / max(1, self.policy_steps)



GENERIC = {"batch_size", "checkpoint_every", "log_every", "seed", "eval_batches", "amp", "task_weights"}
_HELP = {
    "pretrain_steps": ("stage 1 (pre-train, every option averaged) iterations (paper: 10,000)", 0, None),
    "policy_steps": ("stage 2 (policy-train) iterations (paper: 20,000)", 0, None),
    "weight_lr": ("learning rate of the weights, Adam (Table 1: 0.001)", 0.0, None),
    "policy_lr": ("learning rate of the policy logits, Adam (Table 1: 0.01)", 0.0, None),
    "lr_decay": ("weight learning-rate decay factor (Table 1: 0.5)", 0.0, 1.0),
    "lr_decay_every": ("decay the weight learning rate every N steps (Table 1: 4,000)", 1, None),
    "lambda_reg": ("weight of the policy regulariser, Eq. 3 (Table 1: 0.001)", 0.0, None),
    "lambda_reg_scaling": ("budget: λ_reg · 4,000 / policy steps (docs/search.md); none: as given", None, None),
    "tau0": ("initial Gumbel-softmax temperature (paper: 5)", 0.0, None),
    "tau_min": ("floor of the temperature", 0.0, None),
    "tau_decay": ("temperature decay per policy step (default: 5 -> 0.5 over the policy steps)", 0.0, 1.0),
    "hard": ("straight-through one-hot Gumbel samples", None, None),
    "policy_fraction": ("share of the training data that trains the policy (train2; the rest train1)", 0.0, 1.0),
    "sample": ("draw K policies from π and keep the best on validation (AutoMTL's sampling)", 0, None),
}


def _options() -> tuple[Option, ...]:
    out = []
    for f in dataclasses.fields(SearchOptions):
        if f.name in GENERIC:
            continue
        text, lo, hi = _HELP[f.name]
        default = f.default
        positive = f.name in ("weight_lr", "policy_lr", "tau0", "lr_decay_every", "tau_decay", "lr_decay")
        out.append(Option(f.name, default, text, low=lo, high=hi, low_open=positive,
                          high_open=f.name == "policy_fraction",
                          choices=LAMBDA_REG_SCALINGS if f.name == "lambda_reg_scaling" else None,
                          parse=(lambda t: None if t.lower() == "none" else float(t)) if f.name == "tau_decay" else None))
    return tuple(out)



STRATEGY_OPTIONS = _options()
