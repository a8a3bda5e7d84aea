"""Strategy ``rsa``: task affinities by RSA at the locations, then the best tree under a budget
(Vandenhende et al., Algorithm 1).

1. One single-task model per task, all with the same encoder and trained under the same conditions:
   those of an ``mtc baseline`` run (``--baselines``), or trained here as the plan in which every
   task has its own copy of every block (the ``T`` networks share nothing, so training them together
   on the same batches is training each alone).
2. K held-out images (the first ``--rsa-images`` of the validation set) give every task's RDM at
   every location, and the affinities ``A[d, i, j]`` (:mod:`mtc.spaces.branched.affinity`);
   ``affinity.json``, ``affinity.png`` (all locations) and ``affinity_<d>.png`` (one per location,
   the paper's Fig. 4).
3. The tree of least clustering cost within the budget, found exactly
   (:func:`mtc.spaces.branched.trees.best_tree`); ``tree.json``, ``tree.png`` (the paper's Fig. 2)
   and the plan. ``--budgets`` adds the tree of every budget (the paper's Fig. 5 path) and
   ``--random-trees`` random trees of the chosen tree's size (distinct, and not the chosen tree,
   while such trees remain), each as a run directory under
   ``trees/`` that ``mtc train`` post-trains and ``mtc report`` compares.

The affinities survive ``--resume`` (the host's state), so a resumed search does not retrain.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import numpy as np
import torch

from mtc.errors import MtcError
from mtc.ir.plan import Plan
from mtc.spaces import SearchHost, Strategy
from mtc.spaces.branched.affinity import affinities
from mtc.spaces.branched.baselines import load_single_task, per_copy_encoders
from mtc.spaces.branched.blocks import (
    Blocks,
    blocks_of,
    check_budget,
    format_tree,
    levels_json,
    tree_to_plan,
)
from mtc.spaces.branched.options import RSA_OPTIONS
from mtc.spaces.branched.trees import Partition, SearchResult, best_tree, random_trees, tree_cost

TREES = "trees"


def all_separate(blocks: Blocks) -> Plan:
    """Every task on its own copy of every block: the single-task models side by side."""
    return Plan(space="branched", ops={c: {t: f"copy{i}" for i, t in enumerate(blocks.tasks)} for c in blocks.choices})


class RsaSearch(Strategy):
    """Algorithm 1 of Vandenhende et al. (see the module docstring)."""

    name = "rsa"
    help = "Vandenhende et al.: task affinity by RSA at the locations, the best tree within a budget"
    options = RSA_OPTIONS

    def search(self, host: SearchHost) -> Plan:
        o = self.opts
        blocks = blocks_of(self.model)
        unit = str(o["budget_unit"])
        # Everything a user can get wrong is checked before any training (nothing half-written).
        budget = check_budget(o["budget"], blocks, unit)
        budgets = [(b, check_budget(b, blocks, unit, "--budgets")) for b in str(o["budgets"]).split(",") if b]
        k = int(o["rsa_images"])
        if k > len(host.val):
            raise MtcError(f"--rsa-images {k}: the validation set has only {len(host.val)} images")
        single = load_single_task(self.model, o["baselines"]) if o["baselines"] else None

        # The affinities of an earlier attempt are reused only if they came from the same models and images.
        source = {"baselines": str(o["baselines"]), "single_steps": int(o["single_steps"]),
                  "single_lr": float(o["single_lr"]), "rsa_images": k, "seed": host.seed}
        saved = host.state("affinity")
        if saved is None or host.state("affinity_source") != source:
            weights = per_copy_encoders(self.model, single) if single is not None else self._train(host, blocks)
            images = torch.stack([torch.as_tensor(host.val[i][0], dtype=torch.float32) for i in range(k)])
            from mtc.spaces.branched.lowering import location_features

            t0 = time.perf_counter()
            feats = location_features(self.model, weights, images, device=host.device)
            A, _ = affinities(feats)
            host.log({"stage": "rsa", "step": 0, "images": k, "seconds": round(time.perf_counter() - t0, 3)})
            host.save_state("affinity", A.tolist())
            host.save_state("affinity_source", source)
        else:
            A = np.asarray(saved, dtype=np.float64)
        self._write_affinity(host, A, blocks, k, "baselines" if single is not None else "trained here")

        res = best_tree(A, blocks.sizes(unit), budget, blocks.const(unit))
        assert res.levels is not None  # a budget at least the hard-shared model's always fits one
        plan = self._tree_outputs(host, A, blocks, res, o["budget"], budget, unit)
        for text, value in budgets:
            r = best_tree(A, blocks.sizes(unit), value, blocks.const(unit))
            assert r.levels is not None
            self._sub_run(host, f"budget-{text}", A, blocks, r.levels, unit, {"budget": text, "budget_value": value})
        rng = np.random.default_rng([host.seed, 0xB7])
        drawn = random_trees(len(blocks.tasks), [len(p) for p in res.levels], int(o["random_trees"]), rng,
                             exclude=[res.levels])
        for i, levels in enumerate(drawn):
            self._sub_run(host, f"random-{i + 1}", A, blocks, levels, unit, {"random": i + 1})
        host.log({"stage": "search-end", "step": 0, "cost": res.cost, unit: res.size, "trees": res.feasible})
        return plan

    # ------------------------------------------------------------------------------------------
    def _train(self, host: SearchHost, blocks: Blocks) -> dict[str, torch.Tensor]:
        """The single-task models, trained here: the all-separate plan's network."""
        steps = int(self.opts["single_steps"])
        res = host.train_plan(all_separate(blocks), steps=steps, tag="single-task", lr=float(self.opts["single_lr"]))
        host.log({"stage": "single-task", "step": steps, "val": res["tasks"]})
        return dict(res["module"].ir_state())

    def _write_affinity(self, host: SearchHost, A: np.ndarray, blocks: Blocks, k: int, source: str) -> None:
        host.write_json("affinity.json", {
            "tasks": blocks.tasks, "locations": blocks.locations, "images": k, "single_task_models": source,
            "affinity": np.round(A, 6).tolist(),
            "note": "A[d][i][j]: Spearman correlation of the upper triangles of task i's and task j's RDMs "
                    "(1 - Pearson correlation between the K images' features) at location d"})
        try:
            from mtc.spaces.branched.plots import plot_affinity

            plot_affinity(host.file("affinity.png"), A, blocks.tasks, blocks.locations)
            for d, loc in enumerate(blocks.locations):
                plot_affinity(host.file(f"affinity_{d + 1}.png"), A[d], blocks.tasks, [loc],
                              title=f"task affinity at location {d + 1}")
        except ImportError:  # matplotlib is optional: the JSON is always written
            pass

    def _tree_outputs(self, host: SearchHost, A: np.ndarray, blocks: Blocks, res: SearchResult, text: str,
                      budget: float, unit: str) -> Plan:
        assert res.levels is not None
        info = tree_info(A, blocks, res.levels, unit) | {
            "budget": text, "budget_value": budget, "budget_unit": unit,
            "limits": [blocks.shared_size(unit), blocks.separate_size(unit)],
            "trees_within_budget": res.feasible, "trees_total": res.total, "search_states": res.states,
            "search_seconds": round(res.seconds, 4), "strategy": "rsa"}
        host.write_json("tree.json", info)
        _plot(host.file("tree.png"), res.levels, blocks, f"rsa tree, budget {text} ({unit})")
        keep = ("cost", "params", "macs", "budget", "budget_value", "budget_unit", "trees_within_budget",
                "trees_total", "search_states", "search_seconds")
        return tree_to_plan(res.levels, blocks, {"tree": info["levels"], **{k: info[k] for k in keep}})

    def _sub_run(self, host: SearchHost, label: str, A: np.ndarray, blocks: Blocks, levels: list[Partition],
                 unit: str, extra: dict[str, Any]) -> None:
        """``trees/<label>/``: a run directory holding one tree (for ``mtc train`` and ``mtc report``)."""
        name = f"{TREES}/{label}"
        info = tree_info(A, blocks, levels, unit) | extra
        host.write_json(f"{name}/tree.json", info)
        plan = tree_to_plan(levels, blocks, {"tree": info["levels"], "cost": info["cost"], "params": info["params"],
                                             "macs": info["macs"]})
        host.write_json(f"{name}/plan.json", plan.to_json())
        _plot(host.file(f"{name}/tree.png"), levels, blocks, label)
        # The run's config and supergraph (written by mtc search), so mtc train can start there.
        for f in ("config.json", "super.mtc.onnx"):
            src, dst = host.file(f), host.file(f"{name}/{f}")
            if src.exists() and not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)


def tree_info(A: np.ndarray | None, blocks: Blocks, levels: list[Partition], unit: str) -> dict[str, Any]:
    """``tree.json``'s description of a tree: groups per block, cost, parameters and MACs."""
    return {"tasks": blocks.tasks, "blocks": blocks.choices, "locations": blocks.locations,
            "levels": levels_json(levels, blocks.tasks), "text": format_tree(levels, blocks),
            "cost": round(tree_cost(A, levels), 6) if A is not None else None,
            "params": blocks.size(levels, "params"), "macs": blocks.size(levels, "macs"),
            "params_x": round(blocks.size(levels, "params") / blocks.shared_size("params"), 4),
            "macs_x": round(blocks.size(levels, "macs") / blocks.shared_size("macs"), 4)}


def _plot(path: Any, levels: list[Partition], blocks: Blocks, title: str) -> None:
    try:
        from mtc.spaces.branched.plots import plot_tree

        plot_tree(path, levels, blocks.tasks, blocks.locations, title)
    except ImportError:
        pass
