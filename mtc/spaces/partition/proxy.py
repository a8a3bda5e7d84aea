"""Proxy scores of a partitioning (Newell et al., Sec. 4.2): feature distillation, or a short training.

**Distillation.** The network is cut into three parts at two tensors: the *entry* (the cut point
before the first mask site, recorded by the compile pass) and the *end* (the tensor the heads read,
after the last site's mask where the feature is a site):

- ``pre``: input -> entry, ``mid``: entry -> end (the partitioned layers), ``post``: end -> outputs.

A teacher is task t's single-task model (an ``mtc baseline`` run's ``single-<t>`` checkpoint, or a
model trained here on t's loss alone, full channels). The student is a copy of ``mid`` with the
candidate's masks applied, its weights starting from the supergraph's; it reads, per task stream,
teacher t's features at the entry and is trained by SGD (momentum 0.9, the learning rate dropped
x0.1 after ``distill_drop`` of the steps) to reproduce teacher t's features at the end (MSE summed
over tasks, every task in every step). Its score runs teacher t's ``post`` (its remaining layers
and head) on the student's features of stream t, on ``score_batches`` validation batches.

**Short training** (``--proxy short-train``): the plan's network trained on the task losses for
``short_steps`` from the supergraph's weights, then evaluated (the paper's baseline in Table 1).

The score is the mean over tasks of each task's first metric (its negative where lower is better):
higher is better for every kind.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.lower.module import GraphModule, lower
from mtc.lower.seeding import seed_torch
from mtc.passes.canonicalize import remove_dead
from mtc.spaces.baselines import CHECKPOINT, baseline_tasks, module_weights, single_task_weights
from mtc.spaces.partition.lowering import PartitionControls, partition_choices
from mtc.spaces.partition.sites import space_options
from mtc.spaces.partition.training import training_form
from mtc.tasks.batch import collate_batch
from mtc.tasks.kinds import get_kind
from mtc.tasks.spec import TaskSpec, tasks_of

SPACE = "partition"
#: batch size of the teachers trained on the fly
TEACHER_BATCH = 16


def score_of(metrics: dict[str, dict[str, float]], tasks: Sequence[TaskSpec]) -> float:
    """The mean over tasks of each task's first metric, negated where lower is better."""
    vals = []
    for t in tasks:
        k = get_kind(t.kind)
        info = k.metrics[0]
        v = float(metrics[t.name][info.name])
        vals.append(v if info.higher_is_better else -v)
    return float(np.mean(vals))


def _batch(dataset: Any, tasks: Sequence[TaskSpec], size: int, seed: int, tag: str, step: int
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    n = len(dataset)
    per = max(1, n // min(size, n))
    epoch, k = divmod(step, per)
    perm = np.random.default_rng([seed, zlib.crc32(tag.encode()), epoch]).permutation(n)
    idx = perm[k * min(size, n):(k + 1) * min(size, n)]
    return collate_batch([dataset[int(i)] for i in idx], list(tasks))


def cut(model: ir.Model, inputs: Sequence[str], outputs: Sequence[str]) -> ir.Model:
    """A clone of ``model`` computing ``outputs`` from ``inputs`` (tensor names), nothing else."""
    m = model.clone()
    g = m.graph
    values: dict[str, ir.Value] = {str(v.name): v for v in g.inputs}
    for n in g:
        for o in n.outputs:
            values[str(o.name)] = o
    new_inputs = []
    for name in inputs:
        v = values[name]
        if v.is_graph_input():
            new_inputs.append(v)
            continue
        nv = ir.Value(name=name, shape=v.shape, type=v.type)
        v.replace_all_uses_with(nv)
        v.name = f"{name}.cut"
        new_inputs.append(nv)
    outs = [values[o] for o in outputs]
    g.inputs.clear()
    g.inputs.extend(new_inputs)
    g.outputs.clear()
    g.outputs.extend(outs)
    remove_dead(m)
    for name, v in list(g.initializers.items()):
        if not v.uses():
            del g.initializers[name]
    return m


def end_value(model: ir.Model) -> str:
    """The tensor the heads read: the backbone's feature, after its mask where it is a site."""
    feature = model.metadata_props.get(sg.FEATURE_KEY, "")
    if not feature:
        raise MtcError("the supergraph records no feature tensor (mtc.feature): compile it with mtc compile")
    for c in partition_choices(model):
        if c.input == feature:
            return str(c.output)
    return feature


class Parts:
    """The training form cut at the entry and the end (module docstring), each lowered with one
    :class:`PartitionControls`; ``pre`` is None when the entry is the graph input."""

    def __init__(self, model: ir.Model, *, device: str = "cpu") -> None:
        from mtc.passes.manager import PassManager, resolve

        self.model = model
        self.tasks = tasks_of(model) or []
        self.names = [t.name for t in self.tasks]
        form = training_form(model, SPACE, backward=False)
        PassManager(resolve(["unstack-slices", "stack-gate-inputs"]), verify_each=False).run(form)
        entry = str(space_options(model, SPACE).get("entry", ""))
        inp = str(form.graph.inputs[0].name)
        self.entry = entry if entry and entry != inp else inp
        self.end = end_value(model)
        outs = [str(v.name) for v in form.graph.outputs]
        self.device = device
        self.controls = PartitionControls(partition_choices(model), self.names)

        def build(m: ir.Model) -> GraphModule:
            return lower(m, device=device, controls=self.controls, owned=True)

        self.pre = build(cut(form, [inp], [self.entry])) if self.entry != inp else None
        self.mid_model = cut(form, [self.entry], [self.end])
        self.post = build(cut(form, [self.end], outs))
        self.mid = build(self.mid_model)
        self.stacked_entry = self.pre is not None

    def rows(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Stream ``t`` of a stacked tensor."""
        T = len(self.names)
        return x.view(T, -1, *x.shape[1:])[t]


def _float_names(module: GraphModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.named_initializers().items() if v.is_floating_point()}


def teacher_weights(model: ir.Model, tensors: dict[str, torch.Tensor], task: str, *, wanted: Sequence[str],
                    shapes: dict[str, tuple[int, ...]], flag: str, file: str) -> dict[str, torch.Tensor]:
    """Task ``task``'s teacher tensors under the supergraph's names: ``X@<task>`` (a per-task
    BatchNorm copy) from the single-task model's ``X``, other tasks' heads and copies left out."""
    others = [t for t in sg.task_names(model) if t != task]
    out: dict[str, torch.Tensor] = {}
    for name in wanted:
        if any(name.startswith(f"head@{o}/") or name.endswith(f"@{o}") for o in others):
            continue
        src = name[: -len(f"@{task}")] if name.endswith(f"@{task}") else name
        if src not in tensors:
            what = "another head" if name.startswith("head@") else "another backbone"
            raise MtcError(f"{flag}: the single-task model of '{task}' has no tensor '{src}' (trained on {what}?)",
                           file=file)
        if tuple(tensors[src].shape) != shapes[name]:
            raise MtcError(f"{flag}: the single-task model of '{task}' has '{src}' of shape "
                           f"{tuple(tensors[src].shape)}, the supergraph {shapes[name]} (another backbone or head "
                           "width?)", file=file)
        out[name] = tensors[src]
    return out


def load_teachers(model: ir.Model, directory: str | Path, names: Sequence[str], shapes: dict[str, tuple[int, ...]],
                  *, flag: str = "--baselines") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Every task's teacher tensors (by the supergraph's IR names) from an ``mtc baseline`` run, and
    the students' start: its hard-shared model (``multi/``) where the run has one (every task's
    BatchNorm copy from its one BatchNorm), else nothing.

    Raises:
        MtcError: not a baseline run, another task set, or another backbone (naming the tensor).
    """
    d = Path(directory)
    mine = baseline_tasks(model, d, flag=flag)
    out = {}
    for t in mine:
        path, tensors = single_task_weights(d, t, flag=flag)
        out[t] = teacher_weights(model, tensors, t, wanted=names, shapes=shapes, flag=flag, file=str(path))
    shared: dict[str, torch.Tensor] = {}
    multi = d / "multi" / CHECKPOINT
    if multi.is_file():
        tensors = module_weights(multi, flag=flag)
        for name in names:
            src = next((name[: -len(f"@{t}")] for t in mine if name.endswith(f"@{t}")), name)
            if src in tensors and tuple(tensors[src].shape) == shapes[name]:
                shared[name] = tensors[src]
    return out, shared


class Distiller:
    """Scores plans by feature distillation (module docstring).

    Args:
        model: the partition supergraph.
        train, val: the data sets.
        opts: the strategy's options (``teachers``, ``teacher_steps``, ``teacher_lr``, ``distill_*``,
            ``score_batches``).
        seed: seeds batches and the teachers trained here.
        log: called with a dict per teacher trained here.
    """

    def __init__(self, model: ir.Model, train: Any, val: Any, opts: dict[str, Any], *, seed: int,
                 device: str = "cpu", log: Any = None) -> None:
        self.model = model
        self.train, self.val = train, val
        self.opts = opts
        self.seed = int(seed)
        self.parts = Parts(model, device=device)
        self.tasks = self.parts.tasks
        self.log = log or (lambda rec: None)
        self.init = {k: v.detach().clone() for k, v in self._all_tensors().items()}
        shapes = {k: tuple(v.shape) for k, v in self.init.items()}
        if opts.get("baselines"):
            self.teachers, shared = load_teachers(model, str(opts["baselines"]), list(self.init), shapes)
            self.init.update(shared)
        else:
            # The teachers are fine-tuned from one shared model, which the students start from (the
            # paper: teachers and students both start from the ImageNet model).
            self.init = self._train(None, self.init, "shared")
            self.teachers = {t.name: self._train(i, self.init, f"teacher:{t.name}") for i, t in enumerate(self.tasks)}
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, Any]] = {}

    def _modules(self) -> list[GraphModule]:
        p = self.parts
        return [m for m in (p.pre, p.mid, p.post) if m is not None]

    def _all_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self._modules():
            out.update(_float_names(m))
        return out

    def _load(self, tensors: dict[str, torch.Tensor], modules: Sequence[GraphModule] | None = None) -> None:
        with torch.no_grad():
            for m in modules if modules is not None else self._modules():
                own = m.named_initializers()
                for k, v in tensors.items():
                    if k in own:
                        own[k].copy_(v.to(own[k].device))

    def _full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]:
        """entry, end and outputs of the whole network (with the controls' current masks)."""
        p = self.parts
        e = p.pre(x)[0] if p.pre is not None else x
        z = p.mid(e)[0]
        return e, z, p.post(z)

    def _train(self, i: int | None, start: dict[str, torch.Tensor], tag: str) -> dict[str, torch.Tensor]:
        """The full-channel network trained from ``start`` on task ``i``'s loss alone (every task's
        with ``i`` None) for ``teacher_steps`` (Adam, ``teacher_lr``)."""
        o = self.opts
        self._load(start)
        self.parts.controls.set_masks({c: {t: list(range(n)) for t in self.parts.names}
                                       for c, n in self.parts.controls.sizes.items()})
        params = [v for m in self._modules() for v in m.parameters() if v.requires_grad]
        opt = torch.optim.Adam(params, lr=float(o["teacher_lr"]), foreach=True)
        for m in self._modules():
            m.train()
        loss = torch.zeros(())
        for step in range(int(o["teacher_steps"])):
            x, targets = _batch(self.train, self.tasks, TEACHER_BATCH, self.seed, tag, step)
            seed_torch(self.seed * 7919 + step)
            _, _, outs = self._full(x.to(self.parts.device))
            which = range(len(self.tasks)) if i is None else [i]
            loss = sum((get_kind(self.tasks[j].kind).loss(outs[j], targets.get(self.tasks[j].name)) for j in which),
                       torch.zeros(()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.log({"teacher": tag, "steps": int(o["teacher_steps"]), "loss": round(float(loss.detach()), 6)})
        return {k: v.detach().clone() for k, v in self._all_tensors().items()}

    def _teacher_io(self, tag: str, step: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's input (each stream from its task's teacher) and the teachers' end features."""
        p = self.parts
        T = len(p.names)
        ins, ends = [], []
        p.controls.set_masks({c: {t: list(range(n)) for t in p.names} for c, n in p.controls.sizes.items()})
        with torch.no_grad():
            for m in self._modules():
                m.eval()
            for i, t in enumerate(p.names):
                self._load(self.teachers[t])
                e, z, _ = self._full(x)
                ins.append(p.rows(e, i) if p.stacked_entry else e)
                ends.append(p.rows(z, i))
        e_all = torch.cat(ins, 0) if p.stacked_entry else ins[0]
        assert e_all.shape[0] in (x.shape[0], T * x.shape[0])
        return e_all, torch.cat(ends, 0)

    def _cached(self, tag: str, step: int, data: Any, size: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        key = (tag, step)
        if key not in self._cache:
            if tag == "val":
                n = len(data)
                idx = range(step * size, min(n, (step + 1) * size))
                x, targets = collate_batch([data[i] for i in idx], list(self.tasks))
            else:
                x, targets = _batch(data, self.tasks, size, self.seed, tag, step)
            e, z = self._teacher_io(tag, step, x.to(self.parts.device))
            self._cache[key] = (e, z, targets)
        return self._cache[key]

    def score(self, plan: Plan) -> dict[str, Any]:
        """Distil the student under ``plan``'s masks and score it (module docstring)."""
        o = self.opts
        p = self.parts
        steps, lr = int(o["distill_steps"]), float(o["distill_lr"])
        drop = int(round(float(o["distill_drop"]) * steps))
        batches = [self._cached("distill", s, self.train, int(o["distill_batch"])) for s in range(steps)]
        n_val = min(int(o["score_batches"]), -(-len(self.val) // 16))
        val = [self._cached("val", b, self.val, 16) for b in range(n_val)]
        # The student starts from the supergraph's weights every time.
        self._load(self.init, [p.mid])
        p.controls.set_plan(plan)
        student = p.mid
        student.train()
        params = [v for v in student.parameters() if v.requires_grad]
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True)
        losses = []
        for s, (e, z, _) in enumerate(batches):
            if s == drop:
                for gr in opt.param_groups:
                    gr["lr"] = lr * 0.1
            out = student(e)[0]
            loss = F.mse_loss(out, z, reduction="none").flatten(1).mean(1).view(len(p.names), -1).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            losses.append(float(loss.detach()))
        student.eval()
        metrics = {t.name: get_kind(t.kind).metric(t.channels) for t in self.tasks}
        with torch.no_grad():
            feats = [(student(e)[0], targets) for e, _, targets in val]
            for i, t in enumerate(self.tasks):
                self._load(self.teachers[t.name], [p.post])
                p.post.eval()
                for z, targets in feats:
                    tgt = targets.get(t.name)
                    if tgt is None:
                        continue
                    metrics[t.name].update(p.post(z)[i].cpu(), tgt)
        result = {t: metrics[t].compute() for t in metrics}
        return {"tasks": result, "score": score_of(result, self.tasks),
                "distill_loss": round(float(np.mean(losses[-max(1, steps // 10):])), 6)}


def short_train_score(host: Any, plan: Plan, opts: dict[str, Any], tag: str) -> dict[str, Any]:
    """The short-train proxy: the plan's network trained on the task losses, then evaluated."""
    res = host.train_plan(plan, steps=int(opts["short_steps"]), tag=tag, lr=float(opts["short_lr"]))
    tasks = tasks_of(host.model) or []
    return {"tasks": res["tasks"], "score": score_of(res["tasks"], tasks)}
