"""``mtc train`` (AutoMTL's stage 3, any space's post-train): train a plan's network, then evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import torch

from mtc.ir.plan import Plan
from mtc.lower.module import GraphModule
from mtc.spaces import OptimizerSpec, Stage, Update, train_network
from mtc.tasks.spec import tasks_of
from mtc.train.loop import count_parameters, evaluate
from mtc.train.run import RunDir
from mtc.train.trainer import Stopped, TrainConfig, Trainer

TRAIN = "train"


@dataclass
class TrainOptions:
    steps: int = 400
    batch_size: int = 8
    lr: float = 1e-3
    lr_decay: float = 0.5
    lr_decay_every: int = 4000
    task_weights: dict[str, float] | None = None
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    keep_weights: bool = False
    amp: bool | str = False  # --amp: "bf16" (CPU or CUDA) or "fp16" (CUDA, with a gradient scaler)
    data: str | None = None  # the --data spec, named in errors about the data
    weighting: str = "equal"  # --weighting (mtc.train.weighting)
    weighting_lr: float | None = None
    gradnorm_alpha: float = 1.5
    dwa_temperature: float = 2.0
    workers: int = 0  # --workers: processes preparing batches


def plan_module(model: ir.Model, plan: Plan, *, device: str = "cpu") -> GraphModule:
    """The network that trains ``plan`` (the specialised form, lowered, unless its space brings its
    own: ``Space.train_network``)."""
    return train_network(model, plan, device=device)


def train_module(run: RunDir, module: GraphModule, tasks: list[Any], train: Any, val: Any, opts: TrainOptions, *,
                 device: str = "cpu", resume: bool = False, progress: bool = True,
                 stop_after: int | None = None) -> dict[str, Any]:
    """Train ``module`` for ``opts.steps`` (checkpoint ``train``) and evaluate every task on ``val``.

    Returns:
        the ``metrics.json`` content: per-task validation metrics and the parameter count.
    """
    weights = {k: p for k, p in module.named_initializers().items() if isinstance(p, torch.nn.Parameter)}
    cfg = TrainConfig(batch_size=opts.batch_size, checkpoint_every=opts.checkpoint_every, log_every=opts.log_every,
                      seed=opts.seed, amp=opts.amp, task_weights=opts.task_weights, data=opts.data,
                      weighting=opts.weighting, weighting_lr=opts.weighting_lr, gradnorm_alpha=opts.gradnorm_alpha,
                      dwa_temperature=opts.dwa_temperature, workers=opts.workers)
    trainer = Trainer(run, module, tasks,
                      optimizers=[OptimizerSpec("weights", weights, opts.lr, decay=opts.lr_decay,
                                                decay_every=opts.lr_decay_every)],
                      streams={TRAIN: train}, stages=[Stage(TRAIN, opts.steps, [Update(TRAIN, ("weights",))])],
                      config=cfg, name=TRAIN, device=device, progress=progress)
    trainer.run(resume=resume, stop_after=stop_after)
    scores = evaluate(module, val, tasks, device=device)
    run.log({"stage": f"{TRAIN}-end", "step": opts.steps, "val": scores})
    return {"tasks": scores, "params": count_parameters(module)}


def run_train(run: RunDir, model: ir.Model, plan: Any, train: Any, val: Any, opts: TrainOptions, *,
              device: str = "cpu", resume: bool = False, progress: bool = True, stop_after: int | None = None,
              searched_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train the plan's network from the supergraph's initial weights (or the searched ones).

    Args:
        plan: a :class:`Plan` or a space's view of one (``to_plan()``).
        searched_state: with ``opts.keep_weights``, start from these tensors (by IR name) where
            they fit: weights keep their names across the search and the plan's network.
    """
    p: Plan = plan.to_plan() if hasattr(plan, "to_plan") else plan
    tasks = tasks_of(model) or []
    module = plan_module(model, p, device=device)
    if opts.keep_weights and searched_state is not None:
        own = module.named_initializers()
        module.load_ir_state({k: v for k, v in searched_state.items() if k in own and own[k].shape == v.shape},
                             strict=False)
    try:
        result = train_module(run, module, tasks, train, val, opts, device=device, resume=resume,
                              progress=progress, stop_after=stop_after)
    except Stopped:
        return {}  # a simulated kill: nothing more is written
    result["plan"] = p.to_json()
    return result
