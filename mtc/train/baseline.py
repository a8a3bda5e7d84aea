"""Baselines for Δt: one single-task model per task and the hard-shared multi-task model, each the
backbone plus its heads, trained on the same budget as ``mtc train``."""

from __future__ import annotations

from typing import Any

from mtc.frontends import import_model
from mtc.ir import supergraph as sg
from mtc.passes.pipeline import compile_supergraph
from mtc.tasks.spec import TaskSpec
from mtc.train.posttrain import TrainOptions, run_train
from mtc.train.run import RunDir


def run_baselines(src: str, tasks: list[TaskSpec], train: Any, val: Any, run: RunDir, opts: TrainOptions, *,
                  input_shape: Any = None, head_width: int = 256, device: str = "cpu",
                  progress: bool = True) -> dict[str, Any]:
    """Train the hard-shared model (all tasks, every VCN shared) and each single-task model."""

    def build(task_list: list[TaskSpec]) -> Any:
        m = import_model(src, input_shape=input_shape)
        compile_supergraph(m, tasks=task_list, head_width=head_width, seed=opts.seed)
        return m

    out: dict[str, Any] = {"tasks": [t.name for t in tasks], "kinds": {t.name: t.kind for t in tasks}, "single": {}}
    multi = build(tasks)
    out["multi"] = run_train(RunDir(run.path / "multi"), multi, sg.Policy.uniform(multi, "shared"), train, val,
                             opts, device=device, progress=progress)
    for t in tasks:
        single = build([t])
        out["single"][t.name] = run_train(RunDir(run.path / f"single-{t.name}"), single,
                                          sg.Policy.uniform(single, "shared"), train, val, opts, device=device,
                                          progress=progress)
    run.write_json("baselines.json", out)
    return out
