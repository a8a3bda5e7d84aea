"""The partition space's options: every constant of Newell et al.'s search, with the paper's value
in its help and CPU-sized defaults where the paper's budget is a GPU's (torch-free, so the command
line declares them without importing the search)."""

from __future__ import annotations

from mtc.spaces import Option

PROXIES = ("distill", "short-train")
BACKWARD_MASKS = ("forward", "exclusive", "split")

COMPILE_OPTIONS = (
    Option("sites", "last-third", "where the per-task masks go: all, last-third (the paper partitions the last third "
           "of the network) or comma-separated channel groups/tensors (mtc inspect --channels)", metavar="SPEC"),
    Option("task_norm", True, "per-task BatchNorm copies at the mask sites (the paper: separate batch normalization "
           "statistics per task)"),
    Option("freeze_shared", False, "freeze the layers before the partitioned part (the paper shares and freezes the "
           "first two thirds of an ImageNet-pretrained ResNet; off for backbones trained from scratch)"),
)

#: options both strategies take (how a sample is scored and turned into masks)
_COMMON = (
    Option("proxy", "distill", "how a sample is scored: distill (feature distillation, the paper) or short-train (a "
           "short training on the task losses, the paper's baseline)", choices=PROXIES),
    Option("baselines", "", "an mtc baseline run directory: its single-task models are the distillation teachers and "
           "its hard-shared model the students' start (default: train them here: a shared model on all tasks, then "
           "each teacher fine-tuned from it on its task alone)", metavar="DIR"),
    Option("teacher_steps", 300, "iterations of the shared model and of each teacher trained here (Adam, batch 16)",
           low=1),
    Option("teacher_lr", 1e-3, "Adam learning rate of the teachers trained on the fly", low=0.0, low_open=True),
    Option("distill_steps", 60, "distillation iterations per sample (paper: 3,000)", low=1),
    Option("distill_batch", 8, "distillation batch size (paper: 4)", low=1),
    Option("distill_lr", 0.05, "distillation learning rate, SGD with momentum 0.9 (paper: 1)", low=0.0, low_open=True),
    Option("distill_drop", 2 / 3, "share of the distillation after which the learning rate drops x0.1 (paper: "
           "2,000 of 3,000)", low=0.0, high=1.0),
    Option("short_steps", 60, "iterations of the short-train proxy (the paper compares 5k and 10k)", low=1),
    Option("short_lr", 1e-3, "Adam learning rate of the short-train proxy", low=0.0, low_open=True),
    Option("score_batches", 8, "validation batches (of 16) a sample is scored on", low=1),
    Option("backward_mask", "forward", "backward masks m_b within the forward masks: forward (m_b = m_f), exclusive "
           "(a task updates only the channels no other task reads) or split (each shared channel is updated by one "
           "of its readers, in turn)", choices=BACKWARD_MASKS),
    Option("solver_iters", 2000, "local-search moves of the mask solver", low=0),
)

RANDOM_OPTIONS = (
    Option("samples", 32, "random P to evaluate (the paper maps the space with random samples)", low=1),
    Option("use_min", 0.0, "lowest channel use per task (P's diagonal is drawn in [use-min, use-max])", low=0.0,
           high=1.0),
    Option("use_max", 1.0, "highest channel use per task", low=0.0, high=1.0),
    *_COMMON,
)

ES_OPTIONS = (
    Option("es_steps", 4, "ES steps (paper: 1,000 samples, about 31 steps of 32)", low=1),
    Option("directions", 16, "random directions per step, each added and subtracted (paper: 16 -> 32 samples)",
           low=1),
    Option("top", 0, "use the best b directions only (Mania et al.'s V1-t; 0: all)", low=0),
    Option("es_lr", 0.1, "ES learning rate (paper: 0.1)", low=0.0, low_open=True),
    Option("noise", 0.1, "std of the random directions (Mania et al.'s nu)", low=0.0, low_open=True),
    Option("diag_penalty", 1e-3, "weight of the L2 penalty on P's diagonal: how much channel use costs (paper: "
           "1e-3, 'es (wd 1e-3)')", low=0.0),
    Option("random_samples", 0, "random P scored before the ES steps (the grey map of the paper's Fig. 5 under the "
           "ES trajectory)", low=0),
    Option("init", "", "the starting P: a JSON matrix or rows separated by ';', or best-random (the best of the "
           "--random-samples, a warm start); default: a random P", metavar="P"),
    *_COMMON,
)
