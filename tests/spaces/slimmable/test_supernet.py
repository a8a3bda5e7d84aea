"""The slimmable supernet against independent oracles: the physically slimmed ONNX export in
onnxruntime (every bundled backbone, random non-uniform widths, after the same BatchNorm
recalibration), ``model_cost`` of the exported files for the cost model, statistics computed by
hand for the recalibration, and the sandwich step recomputed by hand."""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKBONES, parse, run_ort

from mtc.export.api import export_graphs
from mtc.frontends import import_model
from mtc.ir import supergraph as sg
from mtc.ir.channels import analyze
from mtc.ir.cost import model_cost
from mtc.lower import lower
from mtc.lower.controls import PlanControls
from mtc.lower.supergraph import lower_search
from mtc.spaces import bind_plan, compile_supergraph
from mtc.spaces.slimmable.config import WidthSpace
from mtc.spaces.slimmable.cost import CostModel
from mtc.spaces.slimmable.lowering import controls_of, lower_supernet, norm_stats, recalibrate
from mtc.spaces.slimmable.search import bound_full, full_plan


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small convolutions: one intra-op thread beats two when the cores are shared (and is no
    slower on a dedicated machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = [("tiny_resnet.onnx", 32), ("tiny_mobilenetv2.onnx", 32), ("tiny_densenet.onnx", 32)]
BIG = [pytest.param(n, 64, marks=pytest.mark.slow) for n in ("mobilenetv2.prototxt", "mnasnet.prototxt",
                                                               "deeplab_resnet34.prototxt",
                                                               "deeplab_resnet34_adashare.prototxt")]


def _compile(name: str, side: int, tasks: str = "seg:seg:5,depth:depth:1", **opts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = import_model(BACKBONES / name, input_shape=(1, 3, side, side))
    compile_supergraph(m, tasks=tasks, head_width=8, space="slimmable", **opts)
    return m


def _x(side: int, n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, side, side)).astype(np.float32)


@pytest.mark.parametrize(("name", "side"), SMALL + BIG)
def test_exported_slimmed_onnx_equals_the_supernet_and_its_macs_the_cost_model(name, side):
    model = _compile(name, side)
    space = WidthSpace.of(model)
    ref = bound_full(model, space)
    b_cost = CostModel(ref, space)
    e_cost = CostModel(export_graphs(model, full_plan(space), None, tasks=[]).fused, space, reference=ref)
    sup = lower_supernet(model)
    ctl = controls_of(sup)
    rng = np.random.default_rng(0)
    calib = [torch.from_numpy(_x(side, 4, 10 + i)) for i in range(2)]
    x = _x(side)
    for trial in range(1):
        cfg = space.random(rng)
        assert len(set(cfg.tolist())) > 1  # non-uniform
        ctl.set(space, cfg)
        recalibrate(sup, norm_stats(sup.model), calib)
        sup.eval()
        with torch.no_grad():
            want = [o.numpy() for o in sup(torch.from_numpy(x))]
        plan = space.to_plan(cfg)
        ex = export_graphs(model, plan, sup.ir_state())
        for graph, outs in [(ex.fused, space.tasks), *((ex.tasks[t], [t]) for t in space.tasks)]:
            assert graph is not None
            assert not [n for n in graph.graph if n.op_type == "Mul" and n.name.endswith(".apply")]  # slimmed
            got = run_ort(graph, {graph.graph.inputs[0].name: x})
            for o, t in zip(got, outs, strict=True):
                w = want[space.tasks.index(t)]
                assert np.max(np.abs(o - w)) / np.max(np.abs(w)) <= 1e-4, (name, t)
        assert model_cost(ex.fused)[1] == e_cost.macs(cfg)
        keep = export_graphs(model, plan, sup.ir_state(), tasks=[], resize_matmul=False).fused
        assert model_cost(keep)[1] == b_cost.macs(cfg)
        if trial == 0:
            # the producers really lost their channels: a conv of every encoder choice keeps its count
            counts = space.counts(cfg)
            ch = analyze(ref)
            convs = {n.name: n for n in ex.fused.graph if n.op_type == "Conv"}
            for c in space.choices[:3]:
                prod = ch.find(c.name).producers[0]
                if prod.node in convs:
                    assert convs[prod.node].inputs[1].const_value.shape[0] == counts[c.name]


def test_width_choices_cover_the_dependency_groups_and_tied_groups_share_one():
    model = _compile("tiny_resnet.onnx", 32)
    space = WidthSpace.of(model)
    ch = analyze(bound_full(model, space))
    enc = [c.name for c in space.choices if c.part == "encoder"]
    # one choice per prunable backbone group: the residual stages' groups tie their blocks' convs
    assert enc == [g.name for g in ch.prunable if not g.name.startswith("head@")]
    stem = ch.find("stem.0.0")
    assert len(stem.producers) == 3 and "stem.0.0" in enc  # stem conv + two blocks' conv2, one ratio
    assert {t: len(v) for t, v in space.decoders.items()} == {"seg": 8, "depth": 8}  # 4 ASPP branches x 2
    # the widths of ω, as kept counts, are the allowed widths of each choice point
    for c in sg.choices_of(model, "width"):
        assert c.widths == sorted(set(c.info["counts"])) and not c.per_task
    # every consumer of every group reads through a Slim node
    slim_outputs = {n.outputs[0].name for n in model.graph if n.domain == "ai.mtc.slimmable"}
    for n in model.graph:
        if n.op_type == "Conv" and n.name != "stem.0.0":
            assert n.inputs[0].name in slim_outputs, n.name


def test_the_plan_binds_to_masks_and_the_search_form_agrees():
    model = _compile("tiny_densenet.onnx", 32)
    space = WidthSpace.of(model)
    cfg = space.random(np.random.default_rng(5))
    plan = space.to_plan(cfg)
    bound = bind_plan(model, plan)
    assert not [n for n in bound.graph if n.domain == "ai.mtc.slimmable"]
    assert [n for n in bound.graph if n.op_type == "Mul" and sg.MERGE_KEY + ".mask" in n.metadata_props]
    x = torch.from_numpy(_x(32))
    fixed = lower(bound).eval()
    generic = lower_search(model, PlanControls(plan, sg.choices_of(model), sg.task_names(model))).eval()
    mine = lower_supernet(model).eval()
    controls_of(mine).set(space, cfg)
    with torch.no_grad():
        for a, b, c in zip(fixed(x), generic(x), mine(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert space.from_plan(plan).tolist() == cfg.tolist()


def test_recalibration_sets_the_average_of_the_batch_statistics():
    m = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 2, 4, 4] x) => (float[N, 2, 4, 4] y) <float[2] s = {1.0, 2.0}, float[2] b = {0.5, -1.0},
            float[2] mu = {7.0, 7.0}, float[2] var = {9.0, 9.0}> {
            y = BatchNormalization <momentum: float = 0.75> (x, s, b, mu, var)
        }""")
    module = lower(m).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 2, 4, 4, generator=g) * (i + 1) + i for i in range(3)]
    assert recalibrate(module, norm_stats(m), batches) == 3
    inits = module.named_initializers()
    mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(inits["mu"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inits["var"], var, rtol=1e-5, atol=1e-6)
    assert torch.equal(inits["s"], torch.tensor([1.0, 2.0]))  # the weights are untouched
    assert not module.training


def test_supergraph_passes_the_checker_and_round_trips(tmp_path):
    import onnx

    from mtc.ir import io

    model = _compile("tiny_mobilenetv2.onnx", 32, width_list="0.5:1.0:0.25", round_to=4)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    io.save(model, tmp_path / "s.mtc.onnx")
    back = io.load(tmp_path / "s.mtc.onnx")
    space = WidthSpace.of(back)
    assert space.ratios == (0.5, 0.75, 1.0)
    assert all(n % 4 == 0 or n == c.channels for c in space.choices for n in c.counts)
    assert sg.space_of(back)["options"] == {"width_list": [0.5, 0.75, 1.0], "round_to": 4}


def test_bad_width_lists_and_options_are_one_line_errors():
    from mtc.errors import MtcError

    for bad in ("", "0,0.5", "0.4,1.5"):
        with pytest.raises(MtcError, match="--width-list"):
            _compile("tiny_resnet.onnx", 32, width_list=bad)
    with pytest.raises(MtcError, match="--round-to"):
        _compile("tiny_resnet.onnx", 32, round_to=0)


# --------------------------------------------------------------------------------- sandwich step
class _Scenes(torch.utils.data.Dataset):
    """Random images with dense seg and depth targets (learnable from the image)."""

    def __init__(self, n: int, side: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, side, side, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        return x, {"seg": (x[0] > 0).long() + (x[1] > 0).long(), "depth": x[2:3].abs() + 0.5}


def test_a_sandwich_step_is_b_networks_one_optimiser_step_and_ci_kd_on_children_only(tmp_path, monkeypatch):
    from mtc.spaces.slimmable.search import EcmtSearch
    from mtc.tasks.spec import tasks_of
    from mtc.train.loop import Batcher, task_losses
    from mtc.train.run import RunDir
    from mtc.train.search import run_search

    model = _compile("tiny_resnet.onnx", 32, tasks="seg:seg:3,depth:depth:1")
    space = WidthSpace.of(model)
    forwards: list[dict[str, int]] = []
    kd_calls: list[tuple[int, bool, bool]] = []
    grads: list[dict[str, torch.Tensor]] = []
    before: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}
    real_kd = EcmtSearch.kd_term

    def spy_kd(self, step):
        term, rec = real_kd(self, step)
        kd_calls.append((self._pass, term is not None, self._z is not None and self._z.requires_grad))
        forwards.append(dict(self.controls.counts))
        if step == 0 and self._pass == 0 and not before:
            before.update({k: v.detach().clone() for k, v in self.module.ir_state().items()})
            names.update({id(p): k for k, p in self.module.named_initializers().items()})
        return term, rec

    monkeypatch.setattr(EcmtSearch, "kd_term", spy_kd)
    real_step = torch.optim.Adam.step

    def spy_step(self, *a, **k):
        grads.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None})
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy_step)
    train, val = _Scenes(8, 32, 0), _Scenes(4, 32, 1)
    opts = {"batch_size": 4, "steps": 2, "sandwich": 4, "kd_weight": 1.0, "predictor_samples": 0,
            "calib_batches": 1, "poly": 0.0, "weight_decay": 0.0}
    run_search(RunDir(tmp_path / "run"), model, train, val, opts, progress=False)
    b = 4
    assert len(grads) == 2  # one optimiser step per training step
    assert len(forwards) == 2 * b  # b networks per step
    sand = EcmtSearch.sandwich
    # pass 0 is the largest network, pass 1 the smallest, then b - 2 random non-uniform ones
    assert forwards[0] == space.counts(space.full()) and forwards[1] == space.counts(space.smallest())
    assert forwards[2] != forwards[3]
    # CI-KD only on the children, against the largest network's detached feature
    assert [c[:2] for c in kd_calls[:b]] == [(0, False), (1, True), (2, True), (3, True)]
    assert not any(c[2] for c in kd_calls)
    # the step's gradient is the sum over the b networks of L_co and λ/(b-1) MSE(ẑ, ẑ_i), recomputed by hand
    net = lower_supernet(model)
    net.load_ir_state(before)
    net.train()
    ctl = controls_of(net)
    tasks = tasks_of(model)
    images, targets = Batcher(train, tasks, 4, 0, "train").batch(0)
    strat = EcmtSearch.__new__(EcmtSearch)
    strat.ws, strat.b = space, b
    strat.host = type("H", (), {"seed": 0})()
    configs = sand(strat, 0)
    ctl.capture = True
    z0 = None
    total = torch.zeros(())
    for i, cfg in enumerate(configs):
        ctl.set(space, cfg)
        outs = net(images)
        loss = sum(task_losses(outs, targets, tasks).values())
        f, kept = ctl.feature
        z = f.sum(1) / kept
        if i == 0:
            z0 = z.detach()
        else:
            loss = loss + 1.0 / (b - 1) * F.mse_loss(z, z0)
        total = total + loss
    total.backward()
    own = {k: p for k, p in net.named_initializers().items() if isinstance(p, torch.nn.Parameter)}
    got = {names[i]: g for i, g in grads[0].items()}
    assert set(got) == {k for k, p in own.items() if p.grad is not None}
    for k, g in got.items():
        torch.testing.assert_close(g, own[k].grad, rtol=1e-4, atol=1e-6, msg=k)


def test_a_killed_sandwich_training_resumes_to_the_uninterrupted_weights(tmp_path):
    from mtc.train.run import RunDir, module_tensors, read_tensors
    from mtc.train.search import run_search

    model = _compile("tiny_resnet.onnx", 32, tasks="seg:seg:3,depth:depth:1")
    train, val = _Scenes(8, 32, 0), _Scenes(4, 32, 1)
    opts = {"batch_size": 4, "steps": 3, "checkpoint_every": 1, "predictor_samples": 0, "calib_batches": 1}
    run_search(RunDir(tmp_path / "a"), model, train, val, opts, progress=False)
    run_search(RunDir(tmp_path / "b"), model, train, val, opts, progress=False, stop_after=2)
    run_search(RunDir(tmp_path / "b"), model, train, val, opts, progress=False, resume=True)

    def weights(d: str) -> dict[str, torch.Tensor]:
        t = module_tensors(read_tensors(tmp_path / d / "checkpoints" / "search.safetensors")[0])
        return {k: v for k, v in t.items() if "running" not in k and not k.endswith((".mean", ".var"))}

    a, b = weights("a"), weights("b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
