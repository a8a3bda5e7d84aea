"""The allocation space's options (Maziarz et al.'s values in the help; torch-free)."""

from __future__ import annotations

from mtc.spaces import Option

LR_RULES = ("fixed", "tasks")


def parse_components(text: str) -> str:
    """``K`` (a positive integer) or ``branches``."""
    t = str(text).strip()
    if t == "branches":
        return t
    if t.isdigit() and int(t) >= 1:
        return str(int(t))
    raise ValueError(f"expected a number of components (>= 1) or 'branches', got '{text}'")


COMPILE_OPTIONS = (
    Option("sites", "all", "where the allocation masks go: all (the paper allocates every modular layer), last-third "
           "or comma-separated channel groups/tensors (mtc inspect --channels)", metavar="SPEC"),
    Option("components", "4", "components per site: K contiguous blocks of its channels (the paper's 4-MNISTs: 4), "
           "or 'branches': the parallel branches a Concat joins there", parse=parse_components, metavar="K|branches"),
    Option("task_norm", True, "per-task BatchNorm copies at the mask sites"),
)

GUMBEL_OPTIONS = (
    Option("steps", 600, "training steps, every task in each (the paper: 10 epochs per task on 4-MNISTs)", low=1),
    Option("weight_lr", 3e-4, "Adam learning rate of the weights (paper: 3e-4)", low=0.0, low_open=True),
    Option("alloc_lr", 6e-3, "Adam learning rate of the allocation logits (paper: 6e-3)", low=0.0, low_open=True),
    Option("alloc_lr_rule", "fixed", "fixed: --alloc-lr; tasks: T times --weight-lr (the paper's Omniglot rule)",
           choices=LR_RULES),
    Option("p_init", 0.5, "initial allocation probability of every task and component (paper: 0.5; 0.97 for deep "
           "networks)", low=0.0, high=1.0, low_open=True, high_open=True),
    Option("tau0", 50.0, "temperature schedule max(tau-min, tau0 / sqrt(step + 1)) (the authors' code: 50)", low=0.0,
           low_open=True),
    Option("tau_min", 0.5, "lowest temperature (the authors' code: 0.5)", low=0.0, low_open=True),
    Option("budget", 1.0, "largest mean allocation probability e_c allowed without penalty (paper: 0.75 on "
           "4-MNISTs, 0.5 for the task clusters; 1: no budget)", low=0.0, high=1.0, low_open=True),
    Option("budget_penalty", 1.0, "lambda of the budget penalty lambda * max(0, e_c - b) (paper: 1)", low=0.0),
)
