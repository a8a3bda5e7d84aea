"""ECMT's sub-network search (Algorithm 2) for a budget F_user and a task preference τ (no torch).

Step 1 (Eq. 4): after min-max normalising τ, task ``i``'s decoder gets the ratio
``ω_i = ω_min + (ω_max - ω_min) τ_i``, snapped to the nearest ratio of ω. When those decoders do
not fit the budget even with the smallest encoder, they are capped: every decoder ratio above the
largest cap that fits comes down to the cap (the paper does not say; a cap keeps "a higher
preference never lowers its decoder's width" true at a fixed budget).

Step 2 (Eq. 5 and regularised evolution): a pool of P models with those decoders, the uniform
encoder widths that fit first, then random non-uniform ones that fit; each of T_cycle cycles mutates
a random model's encoder (K random groups move by ``η · sign(F_user - F)``, Eq. 5, each move kept
only when the model stays within the budget), adds the mutant and deletes the model the predictor
scores worst on the most preferred task. The best model of the pool on that task is returned.
Every model of the pool always fits the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtc.errors import MtcError
from mtc.ir.cost import human
from mtc.spaces.slimmable.config import WidthSpace

Cost = Callable[[np.ndarray], int]
#: configs [n, choices] -> predicted task losses [n, tasks]
Predict = Callable[[np.ndarray], np.ndarray]


def normalise_preference(tau: Sequence[float] | np.ndarray) -> np.ndarray:
    """Min-max normalised τ (all equal: every task is the most preferred, 1)."""
    t = np.asarray(tau, dtype=np.float64)
    lo, hi = float(t.min()), float(t.max())
    if hi - lo <= 0:
        return np.ones_like(t)
    return (t - lo) / (hi - lo)


def eq4(tau: Sequence[float] | np.ndarray, ratios: Sequence[float]) -> np.ndarray:
    """Eq. 4 on the min-max normalised preference: ``ω_min + (ω_max - ω_min) τ_i`` per task."""
    lo, hi = min(ratios), max(ratios)
    return lo + (hi - lo) * normalise_preference(tau)


def decoder_indices(space: WidthSpace, tau: Sequence[float] | np.ndarray) -> np.ndarray:
    """Eq. 4 snapped to ω: one ratio index per task, in task order."""
    return np.array([space.nearest(float(w)) for w in eq4(tau, space.ratios)], dtype=np.int64)


def with_decoders(space: WidthSpace, encoder: np.ndarray | int, dec: Sequence[int] | np.ndarray) -> np.ndarray:
    """A configuration from encoder ratio indices (one per encoder choice, or one for all) and one
    ratio index per task's decoder."""
    cfg = np.zeros(len(space), dtype=np.int64)
    cfg[space.encoder] = encoder
    for t, k in zip(space.tasks, dec, strict=True):
        cfg[space.decoders[t]] = int(k)
    return cfg


def check_budget(budget: float, cost: Cost, space: WidthSpace) -> tuple[int, int]:
    """The MACs of the smallest and the largest sub-network.

    Raises:
        MtcError: the budget is below the smallest or above the largest (naming both limits).
    """
    lo, hi = cost(space.smallest()), cost(space.full())
    if budget < lo or budget > hi:
        where = "below the smallest" if budget < lo else "above the largest"
        raise MtcError(f"--budget {human(budget, 4)}MAC is {where} sub-network: the sub-networks cost {human(lo, 4)} to "
                       f"{human(hi, 4)} MACs ({lo:,} to {hi:,})")
    return lo, hi


@dataclass
class Decoders:
    """Step 1's outcome: ratio index per task, Eq. 4's before any cap, and the cap (None: none)."""

    indices: np.ndarray
    wanted: np.ndarray
    cap: int | None = None


def set_decoders(space: WidthSpace, tau: Sequence[float] | np.ndarray, cost: Cost, budget: float) -> Decoders:
    """Step 1: Eq. 4, capped when the smallest encoder cannot carry the decoders within the budget."""
    want = decoder_indices(space, tau)
    if cost(with_decoders(space, 0, want)) <= budget:
        return Decoders(want, want)
    for cap in range(int(want.max()) - 1, -1, -1):
        dec = np.minimum(want, cap)
        if cost(with_decoders(space, 0, dec)) <= budget:
            return Decoders(dec, want, cap)
    raise MtcError(f"--budget {human(budget, 4)}MAC: not even the smallest sub-network fits")


def fit_random(space: WidthSpace, base: np.ndarray, cost: Cost, budget: float, rng: np.random.Generator) -> np.ndarray:
    """A random non-uniform encoder on ``base``'s decoders, narrowed (random groups one step at a
    time) until it fits the budget."""
    cfg = base.copy()
    cfg[space.encoder] = rng.integers(0, len(space.ratios), size=len(space.encoder))
    while cost(cfg) > budget:
        wide = space.encoder[cfg[space.encoder] > 0]
        if len(wide) == 0:
            break
        cfg[rng.choice(wide)] -= 1
    return cfg


def _step(space: WidthSpace, k: int, eta: float, direction: int) -> int:
    """Eq. 5 for one group: the ratio of ω nearest to ``ω_k + η · direction`` (at least one step)."""
    if direction == 0:
        return k
    j = space.nearest(space.ratios[k] + eta * direction)
    if j == k:
        j = k + direction
    return int(min(max(j, 0), space.top))


def mutate(space: WidthSpace, cfg: np.ndarray, cost: Cost, budget: float, rng: np.random.Generator, *,
           groups: int = 1, eta: float = 0.1) -> tuple[np.ndarray, list[int]]:
    """Eq. 5 on ``groups`` random encoder groups: ``ω_k ← ω_k + η · sign(F_user - F)``; a group
    whose move would leave the budget is not moved (another random group is tried instead).

    Returns:
        the mutant and the choice indices that moved.
    """
    f = cost(cfg)
    direction = int(np.sign(budget - f))
    out = cfg.copy()
    moved: list[int] = []
    if direction == 0:
        return out, moved
    for g in rng.permutation(space.encoder).tolist():
        if len(moved) == groups:
            break
        j = _step(space, int(out[g]), eta, direction)
        if j == out[g]:
            continue
        cand = out.copy()
        cand[g] = j
        if cost(cand) <= budget:
            out = cand
            moved.append(int(g))
    return out, moved


@dataclass
class SearchResult:
    """What Algorithm 2 returns and how it got there."""

    config: np.ndarray
    macs: int
    predicted: np.ndarray  # predicted task losses of the returned model
    decoders: Decoders
    preferred: int  # task index of the most preferred task
    history: list[dict[str, Any]] = field(default_factory=list)


def search(space: WidthSpace, tau: Sequence[float] | np.ndarray, budget: float, cost: Cost, predict: Predict,
           rng: np.random.Generator, *, pool: int = 50, cycles: int = 10, groups: int = 1,
           eta: float = 0.1) -> SearchResult:
    """Algorithm 2 (module docstring).

    Raises:
        MtcError: the budget is outside the sub-networks' range.
    """
    check_budget(budget, cost, space)
    dec = set_decoders(space, tau, cost, budget)
    preferred = int(np.argmax(np.asarray(tau, dtype=np.float64)))
    base = with_decoders(space, 0, dec.indices)
    models = [with_decoders(space, u, dec.indices) for u in range(len(space.ratios) - 1, -1, -1)]
    models = [m for m in models if cost(m) <= budget][:pool]
    tries = 0
    while len(models) < pool and tries < 20 * pool:
        models.append(fit_random(space, base, cost, budget, rng))
        tries += 1
    scores = predict(np.stack(models))
    history: list[dict[str, Any]] = []
    for t in range(cycles):
        i = int(rng.integers(len(models)))
        child, moved = mutate(space, models[i], cost, budget, rng, groups=groups, eta=eta)
        models.append(child)
        scores = np.concatenate([scores, predict(child[None])], axis=0)
        worst = int(np.argmax(scores[:, preferred]))
        history.append({"cycle": t, "parent": i, "moved": moved, "child_loss": float(scores[-1, preferred]),
                        "deleted": worst, "deleted_loss": float(scores[worst, preferred])})
        del models[worst]
        scores = np.delete(scores, worst, axis=0)
    best = int(np.argmin(scores[:, preferred]))
    cfg = models[best]
    return SearchResult(cfg, int(cost(cfg)), scores[best], dec, preferred, history)


def random_encoder(space: WidthSpace, tau: Sequence[float] | np.ndarray, budget: float, cost: Cost,
                   rng: np.random.Generator) -> np.ndarray:
    """Fig. 5's baseline: the decoders of Eq. 4 and a random encoder that fits the budget."""
    check_budget(budget, cost, space)
    dec = set_decoders(space, tau, cost, budget)
    return fit_random(space, with_decoders(space, 0, dec.indices), cost, budget, rng)
