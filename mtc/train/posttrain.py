"""AutoMTL stage 3 (post-train): train the derived multi-task model with its policy fixed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from mtc.ir import supergraph as sg
from mtc.lower.supergraph import lower_supergraph
from mtc.train.loop import Batcher, check_finite, count_parameters, evaluate, step_seed, task_losses
from mtc.train.loop import autocast_forward as _forward


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
    amp: bool = False  # bfloat16 autocast on CUDA


def run_train(run: Any, model: Any, policy: sg.Policy, train: Any, val: Any, opts: TrainOptions, *,
              device: str = "cpu", resume: bool = False, progress: bool = True,
              stop_after: int | None = None, searched_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train the policy's network from the supergraph's initial weights (or the searched ones).

    Returns the ``metrics.json`` content: per-task validation metrics and the parameter count.
    """
    amp = opts.amp
    tasks = sg.tasks_of(model) or []
    weights = {t.name: (opts.task_weights or {}).get(t.name, 1.0) for t in tasks}
    module = lower_supergraph(model, mode="fixed", policy=policy, device=device)
    if opts.keep_weights and searched_state is not None:
        # Parameters keep their names across modes: start from what the search trained.
        own = module.state_dict()
        module.load_state_dict({k: v for k, v in searched_state.items() if k in own and own[k].shape == v.shape},
                               strict=False)
    opt = torch.optim.Adam(module.parameters(), lr=opts.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=opts.lr_decay_every, gamma=opts.lr_decay)
    batches = Batcher(train, tasks, opts.batch_size, opts.seed, "train")
    step = 0
    if resume and run.has_checkpoint("train"):
        state = run.load_checkpoint("train")
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = int(state["step"])
        run.truncate_log("train", step)

    def checkpoint() -> None:
        run.save_checkpoint("train", {"module": module.state_dict(), "opt": opt.state_dict(),
                                      "sched": sched.state_dict(), "step": step})

    from mtc.search.automtl import _progress

    bar = _progress(progress, opts.steps, step)
    t0 = time.perf_counter()
    module.train()
    while step < opts.steps:
        if stop_after is not None and step >= stop_after:
            if bar is not None:
                bar.stop()
            return {}
        torch.manual_seed(step_seed(opts.seed, "train", step))
        images, targets = batches.batch(step, device)
        losses = task_losses(_forward(module, images, amp), targets, tasks)
        check_finite(losses, "train", step)
        loss = torch.stack([weights[k] * v for k, v in losses.items()]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_values = {k: float(v.detach()) for k, v in losses.items()}
        record: dict[str, Any] = {"stage": "train", "step": step, "loss": loss_values}
        step += 1
        if (step - 1) % opts.log_every == 0 or step == opts.steps:
            record["elapsed_s"] = round(time.perf_counter() - t0, 3)
            run.log(record)
        if bar is not None:
            bar.update(step, "train", loss_values)
        if step % opts.checkpoint_every == 0 or step == opts.steps:
            checkpoint()
    if bar is not None:
        bar.stop()
    scores = evaluate(module, val, tasks, device=device)
    result = {"tasks": scores, "params": count_parameters(module), "policy": policy.to_json()}
    run.log({"stage": "train-end", "step": opts.steps, "val": scores})
    return result
