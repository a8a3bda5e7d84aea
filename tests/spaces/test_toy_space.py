"""The proof of the space plug-in contract: a space defined entirely in this file.

The toy space gives each convolution's output a learned per-task channel scale, and per task and
convolution the plan decides whether the scale is used (``plain`` or ``scaled``). It brings its own
op (``ai.mtc.toy::TaskScale``) with its kernel, its pass, a gradient strategy and an outer-loop
strategy that calls the trainer for inner trainings, and a bind pass that rewrites its op into
standard ONNX. Compiled, searched, bound by a plan and exported to ONNX verified in onnxruntime,
with no file outside this one edited.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import BACKBONES

from mtc.export.api import export_graphs, verify, write_verified
from mtc.frontends import import_model
from mtc.ir import supergraph as sg
from mtc.ir.names import TASK_KEY
from mtc.ir.plan import Plan
from mtc.lower.controls import Controls
from mtc.lower.registry import BuildNode, Kernel, register_op
from mtc.lower.supergraph import lower_search
from mtc.passes.base import Pass, PassResult
from mtc.passes.streams import Streams, node_name
from mtc.spaces import (
    OptimizerSpec,
    Option,
    SearchHost,
    Space,
    Stage,
    Strategy,
    Update,
    compile_supergraph,
    register_space,
    register_strategy,
)
from mtc.train.run import RunDir
from mtc.train.search import run_search

DOMAIN = "ai.mtc.toy"
OPTIONS = ("plain", "scaled")


@register_op("TaskScale", domain=DOMAIN)
def _task_scale(node: BuildNode) -> Kernel:
    T = int(node.attr("tasks"))
    node.weight(1)

    def task_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        xs = x.view(T, -1, *x.shape[1:])
        return (xs * s.view(T, 1, -1, *([1] * (x.dim() - 2)))).reshape(x.shape)

    return task_scale


class ToyScales(Pass):
    """Every backbone Conv output gets ``TaskScale`` and a per-task choice between it and the plain output."""

    name = "toy-scales"

    def call(self, model: ir.Model) -> PassResult:
        s = Streams(model, pass_name=self.name)
        s.ensure_streams()
        convs = [n for n in model.graph if n.op_type == "Conv" and TASK_KEY not in n.metadata_props]
        records = []
        for depth, conv in enumerate(convs, start=1):
            y = conv.outputs[0]
            name = node_name(conv)
            uses = s.uses_of(y)
            was_output = y.is_graph_output()
            y_name = y.name
            c = y.shape[1]
            scale = s.init(f"{name}.toy_scale", np.ones((len(s.tasks), c), np.float32))
            n = ir.node("TaskScale", [y, scale], domain=DOMAIN, name=f"{name}.toy",
                        attributes={"tasks": ir.AttrInt64("tasks", len(s.tasks))})
            s.finish(n, f"{y_name}.scaled", y)
            y.name = f"{y_name}.plain"
            values = [[s.slice(y, t) for t in s.tasks], [s.slice(n.outputs[0], t) for t in s.tasks]]
            gate = s.gate(name + ".toy", OPTIONS, values, y, y_name, depth=depth, logits=False)
            s.redirect(y, gate.outputs[0], uses, was_output)
            records.append(sg.ChoicePoint(
                kind="op", name=name + ".toy", node=node_name(gate), input=y.name, output=y_name, depth=depth,
                options=[sg.OptionRecord("plain", sg.STACKED, [], entry=[]),
                         sg.OptionRecord("scaled", sg.STACKED, [node_name(n)], entry=[node_name(n)], params=c)],
                info={"space": "toy"}))
        model.graph.sort()
        sg.add_choices(model, records)
        sg.set_space(model, "toy", 1, {})
        return PassResult(model, True)


class BindToy(Pass):
    """``TaskScale(x, s)`` as standard ONNX: per task, its slice times its row of ``s``, restacked."""

    name = "bind-toy"

    def call(self, model: ir.Model) -> PassResult:
        s = Streams(model, pass_name=self.name)
        g = model.graph
        for n in [n for n in g if n.domain == DOMAIN]:
            x, scale = n.inputs[0], n.inputs[1]
            assert x is not None and scale is not None
            per_task = []
            for i, t in enumerate(s.tasks):
                row = s.const(f"{n.name}.row{i}", np.array([i], np.int64))
                shape = s.const(f"{n.name}.shape", np.array([1, -1, 1, 1], np.int64))
                gather = ir.node("Gather", [scale, row], name=f"{n.name}.gather{i}", attributes={"axis": ir.AttrInt64("axis", 0)})
                g.append(gather)
                reshape = ir.node("Reshape", [gather.outputs[0], shape], name=f"{n.name}.reshape{i}")
                g.append(reshape)
                mul = ir.node("Mul", [s.slice(x, t), reshape.outputs[0]], name=f"{n.name}@{t}")
                s.finish(mul, f"{n.outputs[0].name}@{t}", x)
                per_task.append(mul.outputs[0])
            stack = ir.node("Stack", per_task, domain=sg.DOMAIN, name=f"{n.name}.stack")
            s.finish(stack, f"{n.outputs[0].name}.stacked", x)
            n.outputs[0].replace_all_uses_with(stack.outputs[0])
            g.remove(n, safe=True)
        g.sort()
        return PassResult(model, True)


@register_space
class Toy(Space):
    name = "toy"
    help = "a test space: learned per-task channel scales on convolution outputs"
    compile_options = ()
    default_strategy = "grad"

    def passes(self, model: ir.Model, options: dict[str, Any], *, seed: int) -> list[Pass]:
        return [ToyScales()]

    def bind_passes(self, model: ir.Model, plan: Plan) -> list[Pass]:
        return [BindToy()]


class MixControls(Controls):
    """Train both options at once: each gate outputs the mean of plain and scaled."""


class ToyGrad(Strategy):
    """Train the scales with the weights (both options averaged), then keep a task's scale where it
    moved away from 1."""

    name = "grad"
    options = (Option("steps", 6, "training steps", low=1), Option("threshold", 1e-3, "|scale - 1| to keep it"))

    def build(self, host: SearchHost):
        self.module = lower_search(self.model, MixControls())
        return self.module

    def optimizers(self, module):
        params = {k: p for k, p in module.named_initializers().items() if isinstance(p, torch.nn.Parameter)}
        return [OptimizerSpec("all", params, 1e-2)]

    def stages(self):
        return [Stage("toy", self.opts["steps"], [Update("train", ("all",))])]

    def derive(self, module) -> Plan:
        inits = module.named_initializers()
        tasks = sg.task_names(self.model)
        ops = {}
        for c in sg.choices_of(self.model, "op"):
            moved = (inits[f"{c.name[:-len('.toy')]}.toy_scale"].detach() - 1).abs().mean(1)
            ops[c.name] = {t: "scaled" if float(moved[i]) > self.opts["threshold"] else "plain"
                           for i, t in enumerate(tasks)}
        return Plan(space="toy", ops=ops)


class ToyRandom(Strategy):
    """An outer loop: K random plans, each trained briefly through the host (the trainer as an inner
    loop), the best on validation loss kept. Its progress survives a resume (``host.state``)."""

    name = "random"
    options = (Option("candidates", 3, "plans to try", low=1), Option("inner_steps", 2, "steps per plan", low=1))

    def search(self, host: SearchHost) -> Plan:
        tasks = sg.task_names(self.model)
        choices = sg.choices_of(self.model, "op")
        rng = np.random.default_rng(host.seed)
        done = host.state("scores") or []
        best = None
        for k in range(self.opts["candidates"]):
            plan = Plan(space="toy", ops={c.name: {t: OPTIONS[int(rng.integers(2))] for t in tasks} for c in choices})
            if k < len(done):
                score = done[k]
            else:
                res = host.train_plan(plan, steps=self.opts["inner_steps"], tag=f"cand{k}")
                score = sum(m["loss"] for m in res["tasks"].values())
                done.append(score)
                host.save_state("scores", done)
            if best is None or score < best[0]:
                best = (score, plan)
        assert best is not None
        host.log({"stage": "search-end", "step": len(done), "best_loss": best[0]})
        return best[1]


register_strategy(Toy, "grad", "train scales, keep the ones that moved", ToyGrad.options, f"{__name__}:ToyGrad")
register_strategy(Toy, "random", "random plans, each trained briefly", ToyRandom.options, f"{__name__}:ToyRandom")


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        return x, {"a": x.mean().view(1) * 10, "b": (x[0].mean() > 0).long()}


@pytest.fixture
def toy_model():
    m = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    compile_supergraph(m, tasks="a:regress:1,b:class:2", head_width=8, space="toy")
    return m


def test_the_toy_space_compiles_searches_binds_and_exports(tmp_path, toy_model):
    model = toy_model
    assert sg.space_of(model)["name"] == "toy"
    assert len(sg.choices_of(model, "op")) == 15  # one per backbone conv up to the feature
    plan = run_search(RunDir(tmp_path / "grad"), model, Data(16, 0), Data(8, 1),
                      {"batch_size": 4, "checkpoint_every": 3, "steps": 6}, strategy="grad", progress=False)
    assert set(plan.ops) == {c.name for c in sg.choices_of(model, "op")}
    assert "scaled" in {o for per in plan.ops.values() for o in per.values()}  # the scales trained
    assert (tmp_path / "grad" / "plan.json").exists()
    # bound by the plan (the toy's bind pass, then specialize) and exported with the searched weights
    from mtc.train.run import module_tensors, read_tensors

    weights = module_tensors(read_tensors(tmp_path / "grad" / "checkpoints" / "search.safetensors")[0])
    from mtc.export import graph as eg

    ref = eg.fixed_module(model, plan)
    own = ref.named_initializers()
    weights = {k: v for k, v in weights.items() if k in own}
    ex = export_graphs(model, plan, weights)
    assert ex.fused is not None and not [n for n in ex.fused.graph if n.domain.startswith("ai.mtc")]
    written = write_verified(ex, tmp_path / "out")
    assert set(written) == {"a", "b", "fused"}
    for m in [*ex.tasks.values(), ex.fused]:
        assert max(verify(m, ex.module).values()) <= 1e-4
    # the search form with the plan's choices computes what the exported network computes
    from mtc.lower.controls import PlanControls

    search = lower_search(model, PlanControls(plan, sg.choices_of(model), sg.task_names(model))).eval()
    search.load_ir_state({k: v for k, v in weights.items() if k in search.named_initializers()}, strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ex.module(x), search(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_outer_loop_strategy_runs_the_trainer_as_its_inner_loop_and_resumes(tmp_path, toy_model):
    model = toy_model
    opts = {"batch_size": 4, "candidates": 3, "inner_steps": 2}
    ref = run_search(RunDir(tmp_path / "ref"), model, Data(16, 0), Data(8, 1), opts, strategy="random",
                     progress=False)
    # A run that stopped after two candidates continues from its saved state, not from scratch.
    run = RunDir(tmp_path / "resumed")
    first = run_search(run, model, Data(16, 0), Data(8, 1), {**opts, "candidates": 2}, strategy="random",
                       progress=False)
    assert len(run.read_json("strategy_state.json")["scores"]) == 2
    got = run_search(run, model, Data(16, 0), Data(8, 1), opts, strategy="random", resume=True, progress=False)
    assert got.ops == ref.ops
    assert run.read_json("strategy_state.json")["scores"] == RunDir(tmp_path / "ref").read_json(
        "strategy_state.json")["scores"]
    assert first.ops in (ref.ops, first.ops)  # the two-candidate search is a search of its own


def test_strategy_options_are_checked():
    from mtc.errors import MtcError

    m = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    compile_supergraph(m, tasks="a:regress:1,b:class:2", head_width=8, space="toy")
    with pytest.raises(MtcError, match="--candidates: 0 is out of range"):
        run_search(RunDir("/nonexistent/never-written"), m, Data(4, 0), Data(4, 1), {"candidates": 0},
                   strategy="random", progress=False)
    with pytest.raises(MtcError, match="is not a strategy of space 'toy'"):
        run_search(RunDir("/nonexistent/never-written"), m, Data(4, 0), Data(4, 1), {}, strategy="nope",
                   progress=False)
