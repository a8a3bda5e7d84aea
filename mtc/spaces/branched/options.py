"""Every option of the branched space and its strategies, with the papers' values (docs/spaces/branched.md).

Kept apart from the strategies (which need torch) so the command line declares them without
importing torch.
"""

from __future__ import annotations

from mtc.spaces import Option
from mtc.spaces.branched.blocks import STAGES, parse_budget, parse_budgets, parse_locations

UNITS = ("params", "macs")

COMPILE_OPTIONS = (
    Option("locations", STAGES,
           "candidate branch locations: 'stages' (the cut point at the end of every stage, where the spatial size "
           "changes: the paper's 'after every ResNet block'), N evenly spread cut points, or tensor names T1,T2,...; "
           "the feature the heads attach to always ends the last block",
           parse=parse_locations, metavar="stages|N|T1,T2,.."),
)

RSA_OPTIONS = (
    Option("baselines", "", "an mtc baseline run directory whose single-task models to use (default: train them "
           "here under the same conditions, for --single-steps)", metavar="DIR"),
    Option("rsa_images", 500, "K held-out (validation) images for the RDMs (paper: 500)", low=2),
    Option("single_steps", 400, "training steps of the single-task models when --baselines is not given "
           "(mtc baseline's default)", low=0),
    Option("single_lr", 1e-3, "learning rate (Adam) of those single-task models", low=0.0, low_open=True),
    Option("budget", "1.5x", "the tree's size limit: a number, or a multiple of the hard-shared model (1.5x); "
           "the paper sets it per experiment", parse=parse_budget, metavar="N|Fx"),
    Option("budgets", "", "also the tree for each of these budgets (the paper's Fig. 5 path), each a run directory "
           "trees/budget-B/ for mtc train", parse=parse_budgets, metavar="B1,B2,.."),
    Option("budget_unit", "params", "what the budget counts: parameters (the paper) or MACs per sample",
           choices=UNITS),
    Option("random_trees", 0, "also N random trees of the chosen tree's size, run directories trees/random-i/ (the "
           "paper's Fig. 5 'other groupings')", low=0),
)

GUMBEL_OPTIONS = (
    Option("warmup_steps", 20, "warm-up steps, every task on its own copy (BMTAS: the first 1/20 of the epochs)",
           low=0),
    Option("search_steps", 400, "search steps: weights on the 80 % part, logits on the 20 % part (BMTAS: 160 "
           "epochs, ~40,000 weight iterations)", low=0),
    Option("weight_lr", 1e-3, "learning rate of the weights, Adam (BMTAS: 0.001)", low=0.0, low_open=True),
    Option("policy_lr", 1e-2, "learning rate of the [T, T] logits per block, Adam (BMTAS: 0.01)", low=0.0,
           low_open=True),
    Option("tau0", 5.0, "initial Gumbel-softmax temperature (BMTAS: 5)", low=0.0, low_open=True),
    Option("tau_min", 0.1, "final temperature, reached linearly over the search steps (BMTAS: 0.1)", low=0.0,
           low_open=True),
    Option("policy_fraction", 0.2, "share of the training data that trains the logits (BMTAS: 20 %)", low=0.0,
           high=1.0, low_open=True, high_open=True),
    Option("resource_weight", 0.1, "weight of the resource loss: the expected cost of the copies in use, in "
           "units of one copy of the encoder (BMTAS: 0.05 per GFLOP of its MobileNetV2 encoder)", low=0.0),
    Option("resource_unit", "macs", "what the resource loss counts: MACs per sample (BMTAS: FLOPs) or parameters",
           choices=UNITS),
)
