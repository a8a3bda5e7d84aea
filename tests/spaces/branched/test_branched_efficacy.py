"""Search efficacy of the branched space (issue 13, "Done when" 4): CPU, small settings, seeds 0, 1, 2.

On a 4-task ``relatedness`` benchmark of two related pairs (tasks t1, t2 and t3, t4: ρ = 1 inside
a pair, orthogonal weight vectors across pairs):

1. ``rsa``: at the last location the affinity inside each pair is higher than any affinity across
   the pairs, and the tree chosen at a two-branch budget (the hard-shared model plus one copy of the
   last block) puts each pair on its own branch;
2. ``gumbel``: the tree's first split is the same grouping, each pair on its own branch.

Both run in ``make test``: about 30 s (rsa) + 55 s (gumbel) for the three seeds on 2 shared cores
(the whole of tests/spaces/branched: about 95 s).

Settings (every one is recorded here and in docs/results.md, "Branched networks: efficacy"):

- backbone: :class:`Backbone`, 3 layers written as convolutions: a Conv whose 4x4 kernel covers the
  whole ``(1, 4, 4)`` input (a fully connected layer), then two 1x1 Convs; WIDTH channels each,
  bias-free, each followed by BatchNorm + ReLU; ``torch.manual_seed(0)`` weights. Compiled with
  ``--space branched --locations 3`` (the three ReLU outputs: one block per layer), head width 8.
  The narrow layers make sharing a block across the pairs cost accuracy (two unrelated regressions
  through one narrow layer), which is what a gradient-based search can see.
- data: ``relatedness?rho=1&d=16&n_train=2000&n_val=200`` (the paper's m = 6 sine terms, c = 1,
  α_k = k, β_k = (k−1)², noise variance 0.01), data seed = run seed.
- rsa: single-task models trained here for RSA_STEPS steps (Adam, lr RSA_LR, batch 8), K = 200
  held-out images, budget unit parameters.
- gumbel: the options in GUMBEL (the BMTAS defaults otherwise: Adam 1e-3 / 1e-2, τ 5 → 0.1
  linearly, 80/20 split), batch 32.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
WIDTH = 4
INPUT_SHAPE = (1, 1, 4, 4)
TASKS = "t1:regress:1,t2:regress:1,t3:regress:1,t4:regress:1"
DATA = "relatedness?rho=1&d=16&n_train=2000&n_val=200"
PAIRS = [["t1", "t2"], ["t3", "t4"]]
RSA_STEPS, RSA_LR, RSA_IMAGES = 200, 5e-3, 200
GUMBEL = {"warmup_steps": 50, "search_steps": 400, "resource_weight": 0.1}


class Backbone(nn.Module):
    """FC layer over the whole (1, 4, 4) input (as a 4x4 Conv), then two 1x1 Convs; BN + ReLU."""

    def __init__(self, width: int = WIDTH, in_shape: tuple[int, int, int] = INPUT_SHAPE[1:]) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(c, width, (h, w) if i == 0 else 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def factory() -> nn.Module:
    torch.manual_seed(0)
    return Backbone()


@functools.cache
def _supergraph():
    from mtc.frontends import import_model
    from mtc.spaces import compile_supergraph
    from mtc.spaces.branched import blocks_of
    from mtc.tasks.spec import tasks_of

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    model = import_model("test_branched_efficacy:factory", input_shape=INPUT_SHAPE)
    compile_supergraph(model, tasks=TASKS, head_width=8, feature=model.graph.outputs[0].name, space="branched",
                       locations="3")
    b = blocks_of(model)
    assert len(b.choices) == 3
    return model, b, tasks_of(model)


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: extra threads only contend on a 2-core machine
    yield _supergraph()
    torch.set_num_threads(threads)


def _search(setup, tmp_path, seed: int, strategy: str, opts: dict):
    from mtc.data import load_data
    from mtc.train.run import RunDir
    from mtc.train.search import run_search

    model, b, tasks = setup
    train, val = load_data(DATA, tasks, INPUT_SHAPE[1:], seed)
    run = RunDir(tmp_path / f"{strategy}{seed}")
    plan = run_search(run, model, train, val, {"checkpoint_every": 10**9, "log_every": 10**9, "seed": seed, **opts},
                      strategy=strategy, progress=False)
    return plan, run


def _groups(level) -> list[list[str]]:
    return sorted(sorted(g) for g in level)


def rsa(seed: int, work: Path) -> dict:
    """The rsa search of one seed: the last location's affinities inside and across the pairs, the tree."""
    setup = _supergraph()
    _, b, _ = setup
    two_branch = b.shared_size("params") + b.params[-1]
    _, run = _search(setup, work, seed, "rsa", {"batch_size": 8, "single_steps": RSA_STEPS, "single_lr": RSA_LR,
                                                 "rsa_images": RSA_IMAGES, "budget": str(two_branch)})
    A = np.array(run.read_json("affinity.json")["affinity"])[-1]
    inside = min(A[0, 1], A[2, 3])
    across = max(A[0, 2], A[0, 3], A[1, 2], A[1, 3])
    return {"A": A, "inside": float(inside), "across": float(across), "tree": run.read_json("tree.json")}


def first_split(seed: int, work: Path) -> list[list[str]]:
    """The first split of the gumbel search's tree (the last level if it never splits)."""
    _, run = _search(_supergraph(), work, seed, "gumbel", {"batch_size": 32, **GUMBEL})
    tree = run.read_json("tree.json")
    return _groups(next((level for level in tree["levels"] if len(level) > 1), tree["levels"][-1]))


# --- the claims per seed, for the results harness (bench/results.py --efficacy) -----------------

def claim_rsa(seed: int, work: Path) -> dict:
    r = rsa(seed, work)
    levels = r["tree"]["levels"]
    met = (r["inside"] > r["across"] and [len(level) for level in levels] == [1, 1, 2]
           and _groups(levels[-1]) == PAIRS)
    return {"value": r["inside"] - r["across"], "met": met, "detail": {"last": _groups(levels[-1])}}


def claim_gumbel(seed: int, work: Path) -> dict:
    first = first_split(seed, work)
    return {"value": float(first == PAIRS), "met": first == PAIRS, "detail": {"first_split": first}}


CLAIMS = {
    "branched rsa: pairs have the higher affinity and get their own branches": (
        claim_rsa, "min affinity inside > max across at the last location; two-branch tree = the pairs"),
    "branched gumbel: the first split is the pairs": (claim_gumbel, "first split of the tree = the pairs"),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_rsa_affinity_is_higher_inside_the_pairs_and_the_two_branch_tree_separates_them(setup, tmp_path, seed):
    r = rsa(seed, tmp_path)
    A, inside, across = r["A"], r["inside"], r["across"]
    assert inside > across, np.round(A, 3)
    tree = r["tree"]
    assert [len(level) for level in tree["levels"]] == [1, 1, 2]
    assert _groups(tree["levels"][-1]) == PAIRS, tree["levels"]


@pytest.mark.parametrize("seed", SEEDS)
def test_gumbel_finds_the_same_grouping(setup, tmp_path, seed):
    first = first_split(seed, tmp_path)
    assert first == PAIRS, first
