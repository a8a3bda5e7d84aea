"""Baselines for Δt: one single-task model per task and the hard-shared multi-task model, each the
backbone plus its heads, trained on the same budget as ``mtc train``.

They need no search space: the hard-shared model is the backbone with every task's head (what any
space's all-shared plan computes), a single-task model the same with one head.
"""

from __future__ import annotations

from typing import Any

from mtc.frontends import import_model
from mtc.lower.module import lower
from mtc.passes.pipeline import prepare_multitask
from mtc.tasks.spec import TaskSpec
from mtc.train.posttrain import TrainOptions, train_module
from mtc.train.run import RunDir


def run_baselines(src: str, tasks: list[TaskSpec], train: Any, val: Any, run: RunDir, opts: TrainOptions, *,
                  input_shape: Any = None, head_width: int = 256, device: str = "cpu",
                  progress: bool = True, width: float | None = None, round_to: int = 1) -> dict[str, Any]:
    """Train the hard-shared model (all tasks on one backbone) and each single-task model.

    With ``width``, only the hard-shared model is trained, every prunable channel group (backbone and
    heads) slimmed to the first ``width`` of its channels through the pruning API (a static model at
    a uniform width, as a slimmable space's uniform sub-network keeps them: ``mtc baseline --width``).
    """
    from mtc.ir.cost import model_cost

    def fit(task_list: list[TaskSpec], where: str) -> dict[str, Any]:
        m = import_model(src, input_shape=input_shape)
        prepare_multitask(m, tasks=task_list, head_width=head_width, seed=opts.seed)
        if width is not None:
            from mtc.ir.channels import analyze
            from mtc.passes.prune import apply_plan, width_plan

            ch = analyze(m)
            m = apply_plan(m, ch, width_plan(ch, width, round_to=round_to))
        module = lower(m, device=device)
        res = train_module(RunDir(run.path / where), module, task_list, train, val, opts, device=device,
                           progress=progress)
        return {**res, "macs": int(model_cost(m)[1])}

    out: dict[str, Any] = {"tasks": [t.name for t in tasks], "kinds": {t.name: t.kind for t in tasks}, "single": {}}
    if width is not None:
        out["width"] = {"ratio": width, "round_to": round_to}
    out["multi"] = fit(tasks, "multi")
    if width is None:
        for t in tasks:
            out["single"][t.name] = fit([t], f"single-{t.name}")
    run.write_json("baselines.json", out)
    return out
