"""``mtc search``: run a space's strategy on a supergraph, as the :class:`~mtc.spaces.SearchHost`.

The host gives a strategy the data, the trainer (:meth:`Host.run_stages` for its own stages,
:meth:`Host.train_plan` for inner trainings of candidate plans), evaluation, the run directory and
a JSON state that survives a resume (for outer loops). The plan a strategy returns is written as
``plan.json``.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from mtc.ir.plan import Plan
from mtc.lower.module import GraphModule
from mtc.spaces import OptimizerSpec, SearchHost, Stage, Strategy, Update, resolve_options, space_of_model
from mtc.tasks.spec import tasks_of
from mtc.train.loop import evaluate
from mtc.train.run import PLAN, RunDir
from mtc.train.trainer import Stopped, TrainConfig, Trainer

#: the name of a search's checkpoint and of its per-step seeds
SEARCH = "search"
STATE = "strategy_state.json"
_CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}


class Host(SearchHost):
    """The trainer's side of the strategy interface (see the module docstring)."""

    def __init__(self, run: RunDir, model: ir.Model, train: Any, val: Any, *, config: TrainConfig,
                 options: dict[str, Any], device: str = "cpu", resume: bool = False, progress: bool = True,
                 stop_after: int | None = None) -> None:
        self.run = run
        self.model = model
        self.tasks = tasks_of(model) or []
        self.train = train
        self.val = val
        self.config = config
        self.options = options
        self.device = device
        self.seed = config.seed
        self.resume = resume
        self.progress = progress
        self.stop_after = stop_after
        self._inner = 0

    def file(self, name: str) -> Path:
        return self.run.file(name)

    def write_json(self, name: str, data: Any) -> Path:
        return self.run.write_json(name, data)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(record)

    def run_stages(self, strategy: Strategy, module: GraphModule) -> None:
        trainer = Trainer(self.run, module, self.tasks, optimizers=strategy.optimizers(module),
                          streams=strategy.streams(self.train), stages=strategy.stages(), config=self.config,
                          name=SEARCH, device=self.device, progress=self.progress)
        trainer.run(resume=self.resume, stop_after=self.stop_after)

    def evaluate(self, module: Any, *, max_batches: int | None = None) -> dict[str, dict[str, float]]:
        return evaluate(module.eval(), self.val, self.tasks, device=self.device,
                        max_batches=max_batches if max_batches is not None else self.config.eval_batches)

    def train_plan(self, plan: Plan, *, steps: int, tag: str, lr: float = 1e-3,
                   init: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Train ``plan``'s network for ``steps`` (nothing is checkpointed) and evaluate it.

        ``tag`` names this inner training (its batches and seeds follow from it, so the same tag
        gives the same training); ``init`` starts from these weights (by IR name) where they fit.
        """
        plan.validate(self.model)
        module = _lower_plan(self.model, plan, self.device)
        if init:
            own = module.named_initializers()
            module.load_ir_state({k: v for k, v in init.items() if k in own and own[k].shape == v.shape},
                                 strict=False)
        params = dict(module.named_initializers())
        weights = {k: p for k, p in params.items() if isinstance(p, torch.nn.Parameter)}
        cfg = TrainConfig(**{**asdict(self.config), "checkpoint_every": 10**9, "log_every": 10**9})
        trainer = Trainer(None, module, self.tasks, optimizers=[OptimizerSpec("weights", weights, lr)],
                          streams={f"inner:{tag}": self.train},
                          stages=[Stage(f"inner:{tag}", steps, [Update(f"inner:{tag}", ("weights",))])],
                          config=cfg, name=f"inner:{tag}", device=self.device, progress=False)
        trainer.run()
        return {"tasks": self.evaluate(module), "module": module}

    def state(self, key: str) -> Any:
        p = self.run.file(STATE)
        if not p.exists():
            return None
        return self.run.read_json(STATE).get(key)

    def save_state(self, key: str, value: Any) -> None:
        p = self.run.file(STATE)
        cur = self.run.read_json(STATE) if p.exists() else {}
        cur[key] = value
        self.run.write_json(STATE, cur)


def _lower_plan(model: ir.Model, plan: Plan, device: str) -> GraphModule:
    from mtc.spaces import train_network

    return train_network(model, plan, device=device)


def split_options(options: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Generic training knobs (:class:`TrainConfig`) and the strategy's own options."""
    cfg = TrainConfig(**{k: v for k, v in options.items() if k in _CONFIG_FIELDS})
    return cfg, {k: v for k, v in options.items() if k not in _CONFIG_FIELDS}


def run_search(run: RunDir, model: ir.Model, train: Any, val: Any, options: Any = None, *,
               strategy: str | None = None, device: str = "cpu", resume: bool = False, progress: bool = True,
               stop_after: int | None = None, data_spec: str | None = None) -> Plan:
    """Search ``model``'s space with ``strategy`` (default: the space's); writes ``plan.json``.

    Args:
        options: a dict (or dataclass) of :class:`TrainConfig` fields and the strategy's options.
        stop_after: end as if killed after that many global steps (tests simulate kills with it).

    Returns:
        the plan (also when stopped early: then nothing more is written).
    """
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        options = {k: v for k, v in asdict(options).items()}
    config, own = split_options(options)
    if data_spec is not None:
        config.data = data_spec
    space = space_of_model(model)
    cls = space.strategy(strategy)
    opts = resolve_options(cls.options, {k: v for k, v in own.items() if k in {o.name for o in cls.options}},
                           what=f"strategy '{cls.name}'")
    strat = cls(space, model, opts)
    host = Host(run, model, train, val, config=config, options=opts, device=device, resume=resume,
                progress=progress, stop_after=stop_after)
    try:
        plan = strat.search(host)
    except Stopped:
        module = getattr(strat, "module", None)
        return strat.derive(module) if module is not None else Plan(space.name)
    run.write_json(PLAN, plan.to_json())
    return plan


def finished_plan(run: RunDir, model: ir.Model) -> Plan | None:
    """The plan of a search that already ended in ``run`` (plan written, ``search-end`` logged), else
    None: resuming a finished search with its own options changes nothing. Its checkpoint is still
    read, so a file that is not a readable safetensors is refused as on any resume."""
    if not run.file(PLAN).exists() or not any(r.get("stage") == "search-end" for r in run.records()):
        return None
    from mtc.spaces import read_plan

    if run.has_checkpoint(SEARCH):
        run.load_checkpoint(SEARCH)
    return read_plan(run.read_json(PLAN), model, source=str(run.file(PLAN)))
