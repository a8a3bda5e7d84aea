"""The slimmable space's options and the parsers of their command-line text (no torch).

Every constant of ECMT (Aich et al.) is an option with the paper's value as its default where the
paper gives one and a CPU-sized default where the paper's would take days (documented in
docs/spaces/slimmable.md). Kept apart from the search so the CLI lists them without importing torch.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mtc.errors import MtcError
from mtc.spaces import Option

SPACE = "slimmable"
VERSION = 1
#: Algorithm 1's width list ω = [0.3, 0.4, ..., 1.0] (the issue's default; NYUD-v2 [0.6 .. 1.0],
#: PASCAL-Context [0.5 .. 1.0], CIFAR-100 [0.2 .. 1.0]).
DEFAULT_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def parse_ratios(text: str | Any) -> tuple[float, ...]:
    """A width list: ``0.3,0.4,...`` or a range ``0.3:1.0:0.1`` (both ends included).

    Raises:
        ValueError: empty, not numbers, or a ratio outside (0, 1].
    """
    if not isinstance(text, str):
        vals = [float(v) for v in text]
    else:
        s = text.strip()
        if not s:
            raise ValueError("the width list is empty")
        if ":" in s:
            parts = s.split(":")
            if len(parts) != 3:
                raise ValueError(f"'{s}': a range is LOW:HIGH:STEP, e.g. 0.3:1.0:0.1")
            lo, hi, step = (float(p) for p in parts)
            if not step > 0 or not math.isfinite(lo + hi + step):
                raise ValueError(f"'{s}': the step must be a positive number")
            n = int(math.floor((hi - lo) / step + 1e-9)) + 1
            vals = [round(lo + i * step, 10) for i in range(max(0, n))]
        else:
            try:
                vals = [float(p) for p in s.split(",") if p.strip()]
            except ValueError:
                raise ValueError(f"'{s}' is not a comma-separated list of numbers") from None
    if not vals:
        raise ValueError("the width list is empty")
    bad = [v for v in vals if not (0.0 < v <= 1.0) or math.isnan(v)]
    if bad:
        raise ValueError(f"width ratio {bad[0]:g} is outside (0, 1]")
    return tuple(sorted(set(vals)))


_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_macs(text: str) -> float:
    """A MAC count: ``0.6GMAC``, ``600M``, ``1.5e6``, ``2.5MMACs`` (case of the unit letter ignored).

    Raises:
        MtcError: not a positive number with an optional K/M/G/T prefix and MAC(s) suffix.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)\s*(?:MACs?|macs?)?\s*", text)
    if m is None:
        raise MtcError(f"--budget: '{text}' is not a MAC count (e.g. 0.6GMAC, 600MMAC, 1.5e6)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not value > 0:
        raise MtcError(f"--budget: '{text}' must be positive")
    return value


def parse_preference(text: str, tasks: list[str]) -> dict[str, float]:
    """``seg=0.8,depth=0.2`` -> per task preference τ (tasks not named get 0).

    Raises:
        MtcError: an unknown task, a value that is not a finite number >= 0, or all zero.
    """
    out = dict.fromkeys(tasks, 0.0)
    given = False
    for item in (p for p in text.split(",") if p.strip()):
        name, sep, val = item.partition("=")
        name = name.strip()
        if not sep:
            raise MtcError(f"--preference: '{item}' needs TASK=VALUE, e.g. seg=0.8")
        if name not in out:
            raise MtcError(f"--preference: '{name}' is not a task ({', '.join(tasks)})")
        try:
            v = float(val)
        except ValueError:
            raise MtcError(f"--preference: '{item}' needs a number, e.g. {name}=0.8") from None
        if not math.isfinite(v) or v < 0:
            raise MtcError(f"--preference: '{item}': a preference must be a finite number >= 0")
        out[name] = v
        given = True
    if not given:
        raise MtcError("--preference: name at least one task, e.g. seg=0.8,depth=0.2")
    return out


def parse_budgets(text: str) -> list[str]:
    """The HV budgets: comma-separated MAC counts or percentages of the largest sub-network (a list,
    as config.json records it: ``--resume`` compares the two)."""
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        raise ValueError("give at least one budget (e.g. 50%,90%)")
    for it in items:
        if it.endswith("%"):
            try:
                v = float(it[:-1])
            except ValueError:
                raise ValueError(f"'{it}' is not a percentage") from None
            if not 0 < v <= 100:
                raise ValueError(f"'{it}': a percentage must be in (0, 100]")
        else:
            try:
                parse_macs(it)
            except MtcError as e:
                raise ValueError(str(e).removeprefix("--budget: ")) from None
    return items


def parse_reference(text: str) -> list[float] | str:
    """``auto`` or one positive number per task (the HV reference point in loss space; a list, as
    config.json records it)."""
    s = text.strip()
    if s == "auto":
        return s
    try:
        vals = [float(v) for v in s.split(",")]
    except ValueError:
        raise ValueError(f"'{s}' is not 'auto' or a comma-separated list of numbers") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise ValueError(f"'{s}': every coordinate must be a positive number")
    return vals


COMPILE_OPTIONS = (
    Option("width_list", DEFAULT_RATIOS, "width ratios ω every group may take, LOW:HIGH:STEP or a list (Alg. 1: "
           "0.3:1.0:0.1; NYUD-v2 0.6:1.0:0.1, PASCAL-Context 0.5:1.0:0.1, CIFAR-100 0.2:1.0:0.1)",
           parse=parse_ratios, metavar="RATIOS"),
    Option("round_to", 1, "kept channel counts are multiples of K (a group smaller than K stays whole)", low=1,
           metavar="K"),
)

#: The ``ecmt`` strategy's options (Algorithms 1-3); see docs/spaces/slimmable.md for each paper value.
STRATEGY_OPTIONS = (
    Option("steps", 300, "sandwich-rule iterations, Alg. 1 (paper: 100 epochs)", low=0),
    Option("lr", 1e-3, "Adam learning rate (paper: 1e-4 NYUD-v2/PASCAL with an ImageNet encoder, 1e-3 CIFAR-100 "
           "from scratch)", low=0.0, low_open=True),
    Option("weight_decay", 1e-4, "Adam weight decay (paper: 1e-4)", low=0.0),
    Option("poly", 0.9, "poly learning-rate schedule power, 0 for a constant rate (paper: poly, as in "
           "Vandenhende et al.)", low=0.0),
    Option("sandwich", 4, "networks per step b: the largest, the smallest and b-2 random (paper: 4)", low=2),
    Option("kd_weight", 1.0, "λ, weight of the CI-KD loss, Eq. 3 (paper: 1 NYUD-v2, 0.001 PASCAL, 0.01 CIFAR)",
           low=0.0),
    Option("calib_batches", 20, "training batches that recalibrate BatchNorm for each sub-network (once-for-all: "
           "2,000 images, 20 batches of 100; here 20 training batches)", low=1),
    Option("predictor_samples", 120, "M, sub-networks measured to train the predictor (paper: 2,000); 0: train "
           "the supernet only (its largest and smallest sub-networks are measured, no predictor or figures)", low=0),
    Option("predictor_epochs", 150, "predictor training epochs, L1 loss (paper: 150)", low=1),
    Option("predictor_lr", 1e-3, "predictor Adam learning rate (paper: 1e-3)", low=0.0, low_open=True),
    Option("predictor_batch", 16, "predictor batch size (paper: 16)", low=1),
    Option("predictor_holdout", 0.2, "share of the measured sub-networks held out for the rank correlation",
           low=0.0, high=1.0, low_open=True, high_open=True),
    Option("pool", 50, "P, models in the evolution pool, Alg. 2 (paper: 50)", low=1),
    Option("cycles", 10, "T_cycle, evolution cycles, Alg. 2 (paper: 10 NYUD-v2/PASCAL, 150 CIFAR-100)", low=0),
    Option("mutate", 1, "K, encoder groups mutated per cycle, Eq. 5 (Alg. 2: one)", low=1),
    Option("eta", 0.1, "η, the step of Eq. 5 in width ratio (paper: 0.1, the list's spacing)", low=0.0,
           low_open=True),
    Option("preferences", 20, "task preferences drawn for the HV figures (paper: 20, after CDMA)", low=1),
    Option("alpha", 0.2, "Dirichlet concentration of the drawn preferences (paper: 0.2 NYUD-v2/PASCAL, 1.0 "
           "CIFAR-100)", low=0.0, low_open=True),
    Option("budgets", ["50%", "90%"], "the two budgets of the HV figures: MACs (0.6GMAC) or % of the largest "
           "sub-network", parse=parse_budgets, metavar="B1,B2"),
    Option("hv_ref", "auto", "HV reference point in task-loss space, one value per task; auto: 1.1 x the "
           "largest loss measured for the predictor (paper: [4,4,4] NYUD-v2)", parse=parse_reference,
           metavar="R1,R2,.."),
    Option("sweep_levels", 6, "preference levels per task in the marginal sweep (Fig. 7)", low=2),
    Option("sweep_repeats", 2, "random preferences of the other tasks per level in the marginal sweep", low=1),
)

#: What ``mtc export RUN`` accepts for a run of this space.
EXPORT_OPTIONS = (
    Option("budget", "", "compute budget of the fused model, e.g. 0.6GMAC (searches the sub-network, Alg. 2)",
           metavar="MACS"),
    Option("preference", "", "task preference τ, e.g. seg=0.8,depth=0.2 (decoder widths by Eq. 4)",
           metavar="T=V,.."),
    Option("widths", "", "export this width configuration: a plan JSON, or {\"widths\": {choice or *: ratio}}",
           metavar="FILE"),
    Option("calib_batches", 20, "training batches that recalibrate BatchNorm for the exported sub-network", low=1),
)
