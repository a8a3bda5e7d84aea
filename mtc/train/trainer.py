"""The one trainer: stages of updates, optimisers over IR-named parameters, exact resume.

Every training in mtc runs here: a search strategy's stages (AutoMTL's pre-train and policy-train),
the post-train of a plan (``mtc train``), the baselines, and the short inner trainings of
strategies that search in an outer loop. The training step is written once (:meth:`Trainer._update`).

Determinism: batches are a pure function of (seed, stream, step) (:class:`~mtc.train.loop.Batcher`)
and the torch seed of every global step is drawn from (seed, tag, step), so a run killed at any
point and resumed from its last checkpoint ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mtc.errors import MtcError
from mtc.lower.module import GraphModule
from mtc.lower.seeding import seed_torch
from mtc.spaces import OptimizerSpec, Stage, Update
from mtc.tasks.spec import TaskSpec
from mtc.train import distributed
from mtc.train.loop import Batcher, amp_dtype, autocast_forward, check_finite, step_seed, task_losses
from mtc.train.run import RunDir
from mtc.train.weighting import UpdateInfo, make_weighting


@dataclass
class TrainConfig:
    """The knobs every training shares (strategies add their own)."""

    batch_size: int = 8
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    amp: bool | str = False  # False, True or "bf16" (bfloat16 autocast), "fp16" (float16 + GradScaler, CUDA)
    task_weights: dict[str, float] | None = None
    eval_batches: int | None = 4
    data: str | None = None  # the --data spec, named in errors about the data
    weighting: str = "equal"  # mtc.train.weighting.WEIGHTINGS
    weighting_lr: float | None = None  # the learned weightings' Adam; None: the first optimiser's lr
    gradnorm_alpha: float = 1.5
    dwa_temperature: float = 2.0
    workers: int = 0  # processes preparing batches (0: in this one); the batches do not depend on it


class Stopped(Exception):
    """Raised by :meth:`Trainer.run` with ``stop_after``: the run ends as if killed there."""


def _input_chw(module: GraphModule) -> tuple[int, ...] | None:
    """The (C, H, W) a sample's image must have, from the module's static input shape."""
    graph_inputs = list(module.model.graph.inputs)
    if len(graph_inputs) != 1 or graph_inputs[0].shape is None:
        return None
    dims = list(graph_inputs[0].shape)[1:]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]


def _build_optimizer(spec: OptimizerSpec) -> tuple[torch.optim.Optimizer, Any]:
    params = list(spec.params.values())
    # foreach: one kernel call per step for all tensors. Torch picks it only on CUDA; on CPU the
    # per-tensor loop was a tenth of a small model's step, and both give the same bits.
    if spec.kind == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay,
                                                      foreach=True)
    elif spec.kind == "sgd":
        opt = torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay, foreach=True)
    else:
        raise MtcError(f"unknown optimiser '{spec.kind}' (expected adam or sgd)")
    sched: Any = None
    if spec.poly_steps > 0:
        total, power = spec.poly_steps, spec.poly_power
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1.0 - k / total) ** power)
    elif spec.decay_every > 0:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=spec.decay_every, gamma=spec.decay)
    return opt, sched


class _Bar:
    def __init__(self, title: str, total: int, start: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeRemainingColumn(), transient=False)
        self.p.start()
        self.t = self.p.add_task(title, total=total, completed=start)

    def update(self, g: int, stage: str, losses: dict[str, float]) -> None:
        desc = f"{stage} " + " ".join(f"{k}={v:.3f}" for k, v in losses.items())
        self.p.update(self.t, completed=g, description=desc)

    def stop(self) -> None:
        self.p.stop()


class Trainer:
    """Runs ``stages`` on ``module`` (see the module docstring).

    Args:
        run: where checkpoints and the log go; None for an inner training that keeps nothing.
        module: the lowered network (search form or a plan's network).
        tasks: the tasks, in output order.
        optimizers: the optimisers, by name (an :class:`Update` names the ones it steps).
        streams: data set per stream name (one deterministic batch stream each).
        stages: run in order; the global step counts across them.
        config: batch size, checkpoint and log intervals, seed, amp, task weights.
        name: the checkpoint's name (``checkpoints/NAME.safetensors``) and the tag of the
            per-step torch seeds.
        device: where batches go.
        progress: show a progress bar.
    """

    def __init__(self, run: RunDir | None, module: GraphModule, tasks: Sequence[TaskSpec], *,
                 optimizers: Sequence[OptimizerSpec], streams: dict[str, Any], stages: Sequence[Stage],
                 config: TrainConfig, name: str, device: str = "cpu", progress: bool = True) -> None:
        self.run_dir = run
        self.module = module
        self.tasks = list(tasks)
        self.config = config
        self.name = name
        self.device = device
        self.progress = progress
        self.stages = list(stages)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise MtcError(f"stage names must be unique, got {names}")
        self.specs = {o.name: o for o in optimizers}
        self.optims = {o.name: _build_optimizer(o) for o in optimizers}
        for st in self.stages:
            for u in st.updates:
                missing = [o for o in u.optimizers if o not in self.optims]
                if missing:
                    raise MtcError(f"stage '{st.name}' steps unknown optimiser '{missing[0]}'")
                if u.stream not in streams:
                    raise MtcError(f"stage '{st.name}' reads unknown data stream '{u.stream}'")
        shape = _input_chw(module)
        self.world = distributed.current()
        self.batchers = {k: Batcher(ds, self.tasks, config.batch_size, config.seed, k, spec=config.data, shape=shape,
                                    workers=config.workers, shard=(self.world.rank, self.world.size))
                         for k, ds in streams.items()}
        self.weights = {t.name: (config.task_weights or {}).get(t.name, 1.0) for t in self.tasks}
        lr = config.weighting_lr if config.weighting_lr is not None else (optimizers[0].lr if optimizers else 1e-3)
        self.weighting = make_weighting(config.weighting, self.tasks, self.weights, lr=lr,
                                        gradnorm_alpha=config.gradnorm_alpha,
                                        dwa_temperature=config.dwa_temperature).to(device)
        if self.world.size > 1:
            self.weighting.mean = self.world.mean  # the global batch's losses and per-task gradients
        self.scaler: Any = None
        if amp_dtype(config.amp) == torch.float16:  # float16 needs loss scaling (bfloat16 does not)
            if not self.weighting.scalable:
                raise MtcError(f"--amp fp16 does not combine with --weighting {config.weighting} (its per-task "
                               "gradients are not loss-scaled): use --amp bf16")
            self.scaler = torch.amp.GradScaler(torch.device(device).type)
            scaler = self.scaler
            self.weighting.backprop = lambda loss: scaler.scale(loss).backward()
        self.total = sum(s.steps for s in self.stages)
        self.step = 0  # global step: updates done
        self._has_checkpoint = False

    # ------------------------------------------------------------------ checkpoints
    def _ir_names(self, spec: OptimizerSpec) -> list[str]:
        return list(spec.params)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The checkpoint: tensors by IR name and the JSON rest."""
        tensors = {f"module/{k}": v for k, v in self.module.ir_state().items()}
        meta: dict[str, Any] = {"step": self.step, "name": self.name, "optim": {}, "sched": {},
                                "controls": self.module.controls.state()}
        for oname, (opt, sched) in self.optims.items():
            sd = opt.state_dict()
            names = self._ir_names(self.specs[oname])
            slots: dict[str, list[str]] = {}
            for idx, st in sd["state"].items():
                pname = names[idx]
                for slot, val in st.items():
                    t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
                    tensors[f"optim/{oname}/{pname}/{slot}"] = t
                    slots.setdefault(pname, []).append(slot)
            groups = [{k: v for k, v in grp.items() if k != "params"} | {"params": [names[i] for i in grp["params"]]}
                      for grp in sd["param_groups"]]
            meta["optim"][oname] = {"param_groups": groups, "slots": slots}
            if sched is not None:
                meta["sched"][oname] = sched.state_dict()
        if self.weighting.name != "equal":  # an equal weighting's checkpoint is what it always was
            wt, wmeta = self.weighting.state()
            tensors.update(wt)
            meta["weighting"] = wmeta
        if self.scaler is not None:
            meta["scaler"] = self.scaler.state_dict()
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, source: str) -> None:
        """Restore :meth:`state`.

        Raises:
            MtcError: a checkpoint of another network or training (naming what does not fit).
        """
        mod = {k[len("module/"):]: v for k, v in tensors.items() if k.startswith("module/")}
        self.module.load_ir_state(mod, source=source)
        try:
            step = int(meta["step"])
            for oname, (opt, sched) in self.optims.items():
                om = meta["optim"][oname]
                names = self._ir_names(self.specs[oname])
                index = {n: i for i, n in enumerate(names)}
                state: dict[int, dict[str, Any]] = {}
                for pname, slots in om["slots"].items():
                    state[index[pname]] = {slot: tensors[f"optim/{oname}/{pname}/{slot}"] for slot in slots}
                groups = [dict(grp) | {"params": [index[n] for n in grp["params"]]} for grp in om["param_groups"]]
                opt.load_state_dict({"state": state, "param_groups": groups})
                if sched is not None:
                    sched.load_state_dict(meta["sched"][oname])
            self.module.controls.load_state(meta.get("controls", {}))
            if self.weighting.name != "equal" or "weighting" in meta:
                self.weighting.load_state(tensors, meta.get("weighting", {"name": "equal"}))
            if self.scaler is not None:
                self.scaler.load_state_dict(meta["scaler"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise MtcError(f"the checkpoint does not belong to this training ({type(e).__name__}: {e}); use a new "
                           "--run-dir or drop --resume", file=source) from None
        if not 0 <= step <= self.total:
            raise MtcError(f"the checkpoint is at step {step}, outside this training's 0..{self.total}", file=source)
        self.step = step

    def checkpoint(self) -> None:
        self._has_checkpoint = self._has_checkpoint or self.run_dir is not None
        if self.run_dir is not None and self.world.main:  # rank 0 alone writes (atomically)
            tensors, meta = self.state()
            self.run_dir.save_checkpoint(self.name, tensors, meta)
            self._has_checkpoint = True

    def resume(self) -> bool:
        """Continue from the run's checkpoint, if it has one; drop log records it will redo."""
        if self.run_dir is None or not self.run_dir.has_checkpoint(self.name):
            return False
        tensors, meta = self.run_dir.load_checkpoint(self.name)
        self.load_state(tensors, meta, source=str(self.run_dir.checkpoint_path(self.name)))
        self._has_checkpoint = True
        self.run_dir.truncate_log(self._keep_record)
        return True

    def _position(self, g: int) -> tuple[int, int]:
        """(stage index, local step) of global step ``g``."""
        for i, st in enumerate(self.stages):
            if g < st.steps:
                return i, g
            g -= st.steps
        return len(self.stages), 0

    def _keep_record(self, r: dict[str, Any]) -> bool:
        order = {s.name: i for i, s in enumerate(self.stages)}
        stage = r.get("stage")
        if stage == f"{self.name}-end":
            return False  # written again when the run ends
        if stage not in order:
            return True
        # Records of steps done before the checkpoint stay; the step at it will be logged again.
        return (order[stage], int(r.get("step", 0))) < self._position(self.step)

    # ------------------------------------------------------------------ the loop
    def log(self, record: dict[str, Any]) -> None:
        if self.run_dir is not None:
            self.run_dir.log(record)

    def _update(self, u: Update, stage: Stage, s: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One update: clear every gradient, forward a batch, task losses (+ extras), backward, step."""
        for opt, _ in self.optims.values():
            opt.zero_grad(set_to_none=True)
        self.weighting.zero_grad()
        batcher = self.batchers[u.stream]
        images, targets = batcher.batch(s, self.device)
        info = UpdateInfo(key=f"{stage.name}/{u.stream}", step=s, epoch=batcher.epoch(s),
                          params=self._update_params(u), module=self.module, seed=self.config.seed)
        # One pass, or several accumulated before one step (Update.passes: the sandwich rule).
        setups: list[Any] = list(u.passes(s)) if u.passes is not None else [None]
        first: dict[str, torch.Tensor] | None = None
        extra: dict[str, Any] = {}
        per_pass: list[dict[str, float]] = []
        for k, setup in enumerate(setups):
            if setup is not None:
                setup()
            losses = task_losses(autocast_forward(self.module, images, self.config.amp), targets, self.tasks)
            try:
                check_finite(losses, stage.name, s, resumable=self._has_checkpoint)
            except MtcError as e:
                cause = batcher.non_finite(s)  # bad data rather than a diverging run?
                raise MtcError(f"{e.message}; {cause}" if cause else e.message) from None
            term = None
            if u.extra_loss is not None:
                term, more = u.extra_loss(s)
                extra.update(more)
            info.pass_index = k
            extra.update(self.weighting.backward(losses, term, info))
            if self.world.size > 1:
                losses = {k: v.detach() for k, v in zip(losses, self.world.mean(torch.stack(
                    [v.detach().float() for v in losses.values()])), strict=True)}
            first = losses if first is None else first
            per_pass.append({k: float(v.detach()) for k, v in losses.items()})
        if u.passes is not None:
            extra["passes"] = per_pass
        if self.world.size > 1 and not self.weighting.global_grads:
            distributed.average_gradients(self._all_params())
        assert first is not None
        losses = first
        for oname in u.optimizers:
            opt, sched = self.optims[oname]
            if self.scaler is not None:
                self.scaler.step(opt)  # skipped when the scaled gradients overflowed
            else:
                opt.step()
            if sched is not None:
                sched.step()
        if self.scaler is not None:
            self.weighting.step(self.scaler.step)
            self.scaler.update()
        else:
            self.weighting.step()
        return losses, extra

    def _all_params(self) -> list[torch.Tensor]:
        """Every trainable tensor whose gradient is averaged over the ranks: the module's, the
        optimisers' (a strategy's own), the weighting's learned ones."""
        seen: dict[int, torch.Tensor] = {}
        for p in self.module.parameters():
            seen.setdefault(id(p), p)
        for spec in self.specs.values():
            for p in spec.params.values():
                seen.setdefault(id(p), p)
        for p in self.weighting.local_params():
            seen.setdefault(id(p), p)
        return [p for p in seen.values() if p.requires_grad]

    def _update_params(self, u: Update) -> list[torch.nn.Parameter]:
        """The parameters an update's optimisers step (each once)."""
        seen: dict[int, torch.nn.Parameter] = {}
        for oname in u.optimizers:
            for p in self.specs[oname].params.values():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> None:
        """Run the stages to the end (from the checkpoint with ``resume``).

        Raises:
            Stopped: ``stop_after`` global steps were reached (nothing more is written).
            MtcError: a non-finite loss (the last good checkpoint stays), a bad checkpoint.
        """
        if resume:
            self.resume()
        if self.world.size > 1:  # every rank starts from rank 0's state
            distributed.broadcast([*self.module.state_dict().values(), *self._all_params()])
        bar = _Bar(self.name, self.total, self.step) if self.progress and self.total and self.world.main else None
        t0 = time.perf_counter()
        self.module.train()
        sync = distributed.sync_batch_norm(self.world.sync_bn)
        sync.__enter__()
        try:
            while self.step < self.total:
                if stop_after is not None and self.step >= stop_after:
                    raise Stopped()
                i, s = self._position(self.step)
                stage = self.stages[i]
                seed_torch(step_seed(self.config.seed, self.name, self.step))
                record: dict[str, Any] = {"stage": stage.name, "step": s}
                if stage.before_step is not None:
                    record.update(stage.before_step(s))
                first: dict[str, float] = {}
                for u in stage.updates:
                    losses, extra = self._update(u, stage, s)
                    values = {k: float(v.detach()) for k, v in losses.items()}
                    record[u.record] = values
                    record.update(extra)
                    first = first or values
                self.step += 1
                if s % self.config.log_every == 0 or self.step == self.total:
                    record["elapsed_s"] = round(time.perf_counter() - t0, 3)
                    self.log(record)
                if bar is not None:
                    bar.update(self.step, stage.name, first)
                if self.step % self.config.checkpoint_every == 0 or self.step == self.total:
                    if self.world.size > 1 and self.step == self.total:  # the ranks took the same steps
                        distributed.check_identical(self._all_params(), what="parameters")
                    self.checkpoint()
        finally:
            sync.__exit__(None, None, None)
            for b in self.batchers.values():
                b.close()
            if bar is not None:
                bar.stop()
