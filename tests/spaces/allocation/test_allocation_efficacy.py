"""Efficacy of the allocation space (issue 14, "Done when"): CPU, small settings, seeds 0, 1, 2.

1. ``relatedness`` with two related pairs (ρ = 1 inside a pair, orthogonal across; the paper's
   Appendix A3): the tasks of a pair end with more similar embeddings than tasks of different pairs
   (mean cosine inside minus across >= 0.3).
2. four ``digits`` tasks, two copies of the digit task and two of the rotation task (the paper's
   4-MNISTs): copies end with more similar allocations than non-copies.
3. the same four tasks with budget b = 0.75 against no budget (the paper's Table I, means over
   runs): over the seeds, the mean final active fraction is at most 0.77 and the mean top-1 within
   one point of the unconstrained runs (six runs of 1,500 small steps: 12-18 s each on a 2-core
   host, the longest test of ``make test``).

Settings (recorded in docs/spaces/allocation.md, "Efficacy"):

- relatedness: :class:`Branches`, the A3 network: one modular layer of 4 parallel components, each
  a 3-layer MLP (16 hidden units, ReLU, one output unit), written as 1x1 convolutions joined by a
  Concat, compiled with ``--components branches`` (each branch a component); data
  ``relatedness?rho=1&d=16`` (2,000 training samples); 250 steps of batch 64 (every task in every
  step), weights Adam 0.01 (the paper's A3 rate), logits Adam 6e-3, p_init 0.5, the authors'
  temperature schedule, budget 0.5 with λ = 1 (the paper uses b = 0.5 for its task clusters; on
  this CPU budget, without it every task keeps all four components).
- digits: :class:`Digits`, three modular layers (a dense 8x8 convolution of 64 units, 1x1
  convolutions of 64 and 32 units, ReLU), K = 4 components each, data ``digits?rotations=2``; 400
  steps of batch 16, weights Adam 0.01, logits Adam 0.05, p_init 0.97 (the paper's value for
  deeper networks), temperature max(0.5, 5/sqrt(step+1)) (tau0 5: the schedule reaches its floor
  within the short run), budget 0.75 with λ = 20 (the paper's 4-MNISTs budget).
- budget: :func:`mtc.spaces.allocation.nets.digits_mlp` (the same three layers at 128, 128 and 64
  units: at 64 units a quarter of the allocations off costs the digit tasks capacity), the digits
  settings above but 1,500 steps of batch 64 and λ = 40, b = 0.75 against b = 1, top-1 on the whole
  validation split (359 images; the default 4 batches of 16 make one image 1.6 points). At λ = 20
  two seeds end one allocation over (37 of 48 active, 0.771); docs/spaces/allocation.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
REL_TASKS = "a1:regress:1,a2:regress:1,b1:regress:1,b2:regress:1"
REL = {"steps": 250, "batch_size": 64, "weight_lr": 0.01, "budget": 0.5}
DIG_TASKS = "digit:class,digit_2:class:10,rotated:class:2,rotated_2:class:2"
DIG = {"steps": 400, "batch_size": 16, "weight_lr": 0.01, "alloc_lr": 0.05, "p_init": 0.97, "tau0": 5.0,
       "budget": 0.75, "budget_penalty": 20.0}
BUDGET = {**DIG, "steps": 1500, "batch_size": 64, "budget_penalty": 40.0, "eval_batches": None}


class Branches(nn.Module):
    """Appendix A3's modular layer: 4 parallel 3-layer MLPs with one output unit each."""

    def __init__(self, d: int = 16, hidden: int = 16, k: int = 4) -> None:
        super().__init__()
        self.b = nn.ModuleList([nn.Sequential(nn.Conv2d(d, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                                              nn.ReLU(), nn.Conv2d(hidden, 1, 1)) for _ in range(k)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.b], 1)


class Digits(nn.Module):
    """Three modular layers over the 8x8 digits (see the module docstring)."""

    def __init__(self, w: int = 64, out: int = 32) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Conv2d(1, w, 8), nn.Conv2d(w, w, 1), nn.Conv2d(w, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x))))))


def branches() -> nn.Module:
    torch.manual_seed(0)
    return Branches()


def digits() -> nn.Module:
    torch.manual_seed(0)
    return Digits()


def _compile(factory: str, shape, tasks: str, components: str):
    from mtc.frontends import import_model
    from mtc.spaces import compile_supergraph

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    model = import_model(factory if ":" in factory else f"test_allocation_efficacy:{factory}", input_shape=shape)
    compile_supergraph(model, tasks=tasks, head_width=8, feature=model.graph.outputs[0].name, space="allocation",
                       sites="all", components=components)
    return model


@pytest.fixture(scope="module")
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: extra threads only contend
    yield
    torch.set_num_threads(n)


def _search(model, data: str, shape, seed: int, tmp_path, opts: dict):
    from mtc.data import load_data
    from mtc.tasks.spec import tasks_of
    from mtc.train.run import RunDir
    from mtc.train.search import run_search

    train, val = load_data(data, tasks_of(model), shape, seed)
    run = RunDir(tmp_path / f"run{seed}")
    run_search(run, model, train, val, {"checkpoint_every": 10**9, "log_every": 10**9, "seed": seed, **opts},
               strategy="gumbel", progress=False)
    emb = run.read_json("task_embeddings.json")
    e = np.array(emb["embeddings"], dtype=float)
    n = np.linalg.norm(e, axis=1)
    sim = (e @ e.T) / np.outer(np.where(n > 0, n, 1), np.where(n > 0, n, 1))  # recomputed here
    np.testing.assert_allclose(sim, emb["similarity"], atol=1e-5)
    return sim, run


def relatedness(seed: int, work: Path) -> tuple[float, float, np.ndarray]:
    """Mean embedding cosine inside the pairs and across them, and the similarity matrix."""
    model = _compile("branches", (1, 16, 1, 1), REL_TASKS, "branches")
    sim, _ = _search(model, "relatedness?rho=1&d=16&n_train=2000&n_val=200", (16, 1, 1), seed, work, REL)
    inside = np.mean([sim[0, 1], sim[2, 3]])
    across = np.mean([sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]])
    return float(inside), float(across), sim


def copies(seed: int, work: Path) -> tuple[float, float, np.ndarray]:
    """Mean allocation cosine between copies of a digits task and between other tasks."""
    model = _compile("digits", (1, 1, 8, 8), DIG_TASKS, "4")
    sim, _ = _search(model, "digits?rotations=2", (1, 8, 8), seed, work, DIG)
    same = np.mean([sim[0, 1], sim[2, 3]])
    others = np.mean([sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]])
    return float(same), float(others), sim


def _final(run) -> tuple[float, float]:
    """(active fraction of the maximum-likelihood allocation, its mean top-1 over the tasks)."""
    active = float(run.read_json("allocation.json")["active_fraction"])
    val = [r for r in run.records() if r.get("stage") == "search-end"][-1]["val"]
    return active, float(np.mean([m["top1"] for m in val.values()]))


def budget(seed: int, work: Path) -> dict[float, tuple[float, float]]:
    """b -> (active fraction, mean top-1) for b = 0.75 and b = 1."""
    runs = {}
    for b in (0.75, 1.0):
        model = _compile("mtc.spaces.allocation.nets:digits_mlp", (1, 1, 8, 8), DIG_TASKS, "4")
        _, run = _search(model, "digits?rotations=2", (1, 8, 8), seed, Path(work) / f"b{b}", {**BUDGET, "budget": b})
        runs[b] = _final(run)
    return runs


# --- the claims per seed, for the results harness (bench/results.py --efficacy) -----------------

def claim_relatedness(seed: int, work: Path) -> dict:
    inside, across, _ = relatedness(seed, work)
    return {"value": inside - across, "met": inside - across >= 0.3}


def claim_copies(seed: int, work: Path) -> dict:
    same, others, _ = copies(seed, work)
    return {"value": same - others, "met": same > others}


def claim_budget(seed: int, work: Path) -> dict:
    runs = budget(seed, work)
    (active, acc), (_, free) = runs[0.75], runs[1.0]
    return {"value": acc - free, "met": active <= 0.77 and acc >= free - 1.0,
            "detail": {"active": active, "top1": acc, "top1_free": free}}


CLAIMS = {
    "allocation: related pairs end with more similar embeddings": (claim_relatedness,
                                                                   "mean cosine inside − across ≥ 0.3"),
    "allocation: copies of a digits task end with more similar allocations": (claim_copies,
                                                                              "mean cosine copies − others > 0"),
    "allocation: b = 0.75 keeps ≤ 0.77 active within a point": (
        claim_budget, "active fraction ≤ 0.77 and top-1 ≥ top-1 at b = 1 − 1 point (value: the top-1 difference)"),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_related_pairs_end_with_more_similar_embeddings(threads, tmp_path, seed):
    inside, across, sim = relatedness(seed, tmp_path)
    assert inside - across >= 0.3, np.round(sim, 3)


@pytest.mark.parametrize("seed", SEEDS)
def test_copies_of_a_digits_task_end_with_more_similar_allocations(threads, tmp_path, seed):
    same, others, sim = copies(seed, tmp_path)
    assert same > others, np.round(sim, 3)


def test_a_budget_of_three_quarters_keeps_at_most_077_active_within_a_point(threads, tmp_path):
    """Over the seeds, as the paper's Table I reports it (means over 30 runs). Per seed it is one
    allocation of 48 from the threshold: on one host seed 0 ended 36 of 48 active, on another 37
    (0.771); the harness checks each seed on its own over seeds 0-9 (docs/spaces/allocation.md)."""
    runs = [budget(seed, tmp_path / f"s{seed}") for seed in SEEDS]
    print({s: r for s, r in zip(SEEDS, runs, strict=True)})
    active = np.mean([r[0.75][0] for r in runs])
    acc, free = np.mean([r[0.75][1] for r in runs]), np.mean([r[1.0][1] for r in runs])
    assert active <= 0.77, runs
    assert acc >= free - 1.0, runs
