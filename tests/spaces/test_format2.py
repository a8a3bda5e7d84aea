"""Format 2 with hand-written plans, before the spaces that search them exist.

(b) a tree of branches (block copies, partitions refining with depth), (c) per-task channel masks,
(d) width choices, and (a) AutoMTL's op choices combined with (c): each compiles, binds, trains for
a few steps and exports to ONNX that onnxruntime runs equal to the lowering. Plans that do not fit
are refused with one line naming the choice point; a format-1 file says to recompile.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BACKBONES, Four

from mtc.errors import MtcError
from mtc.export.api import export_graphs, verify
from mtc.frontends import import_model
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.passes.choices import BlockChoices, TaskMasks, Widths
from mtc.passes.pipeline import prepare_multitask
from mtc.spaces import compile_supergraph, read_plan
from mtc.spaces.automtl import Policy, vcns_of
from mtc.tasks.spec import tasks_of
from mtc.train.posttrain import TrainOptions, run_train
from mtc.train.run import RunDir

TASKS4 = "a:regress:1,b:class:3,c:regress:2,d:class:2"
# tiny_resnet at 32x32: the heads attach after stage 3 (cut-at-feature's choice); stage ends are cut
# points, so block 1 = stage 1, block 2 = stage 2, block 3 = stage 3.
BOUNDS = ["pool", "layers.1/relu_1", "layers.3/relu_1", "layers.5/relu_1"]


def _backbone(tasks: str):
    m = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    prepare_multitask(m, tasks=tasks, head_width=8)
    return m


def _convs(m) -> int:
    return sum(1 for n in m.graph if n.op_type == "Conv")


def _same_as_search_form(model, plan, weights=None) -> None:
    """Independent of ``specialize``: the search form driven by the plan (one-hot gates, the plan's
    masks and widths) computes what the plan's network computes."""
    from mtc.lower.controls import PlanControls
    from mtc.lower.supergraph import lower_fixed, lower_search

    fixed = lower_fixed(model, plan).eval()
    search = lower_search(model, PlanControls(plan, sg.choices_of(model), sg.task_names(model))).eval()
    if weights is not None:
        fixed.load_ir_state(weights)
        own = search.named_initializers()
        search.load_ir_state({k: v for k, v in weights.items() if k in own}, strict=False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(fixed(x), search(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _train_and_export(tmp_path, model, plan, tasks_train: int = 4):
    """A few training steps of the plan's network, then every export, verified in onnxruntime."""
    tasks = tasks_of(model)
    res = run_train(RunDir(tmp_path / "run"), model, plan, Four(16, 0), Four(8, 1),
                    TrainOptions(steps=tasks_train, batch_size=4, checkpoint_every=2), progress=False)
    assert set(res["tasks"]) == {t.name for t in tasks} and res["params"] > 0
    from mtc.train.run import module_tensors, read_tensors

    weights = module_tensors(read_tensors(tmp_path / "run" / "checkpoints" / "train.safetensors")[0])
    _same_as_search_form(model, plan, weights)
    ex = export_graphs(model, plan, weights)
    for t, m in ex.tasks.items():
        assert max(verify(m, ex.module).values()) <= 1e-4, t
    assert ex.fused is not None
    assert max(verify(ex.fused, ex.module).values()) <= 1e-4
    return ex


# ------------------------------------------------------------------------------------------- (b) tree
def _tree_supergraph():
    m = _backbone(TASKS4)
    BlockChoices(boundaries=BOUNDS, copies=4)(m)
    return m


def _tree_plan() -> Plan:
    # a tree: all tasks share block 1; {a,b} | {c,d} from block 2; {a} | {b} | {c,d} from block 3
    return Plan(space="manual", ops={
        "block1": dict.fromkeys("abcd", "copy0"),
        "block2": {"a": "copy0", "b": "copy0", "c": "copy1", "d": "copy1"},
        "block3": {"a": "copy0", "b": "copy1", "c": "copy2", "d": "copy2"},
    })


def test_tree_plan_exports_one_copy_per_group_per_block(tmp_path):
    model = _tree_supergraph()
    assert [c.name for c in sg.choices_of(model, "op")] == ["block1", "block2", "block3"]
    assert all(len(c.options) == 4 for c in sg.choices_of(model, "op"))
    ex = _train_and_export(tmp_path, model, _tree_plan())
    # Counted by hand from TinyResNet: stem 1 conv; stages of two basic blocks with 4, 5, 5 convs
    # (a stride-2 stage adds the 1x1 down-sampling conv). Block 1 (stage 1) = 4 convs, once;
    # block 2 (stage 2) = 5 convs, twice ({a,b}, {c,d}); block 3 (stage 3) = 5 convs, three times.
    # The heads of regress/class tasks pool and use a Gemm: no conv.
    assert _convs(ex.fused) == 1 + 4 * 1 + 5 * 2 + 5 * 3 == 30
    for t in "abcd":
        assert _convs(ex.tasks[t]) == 1 + 4 + 5 + 5 == 15


def test_tree_with_every_task_on_copy0_is_the_backbone(tmp_path):
    model = _tree_supergraph()
    plan = Plan(space="manual", ops={f"block{d}": dict.fromkeys("abcd", "copy0") for d in (1, 2, 3)})
    ex = export_graphs(model, plan)
    assert ex.fused is not None and _convs(ex.fused) == 15


def test_tree_plan_errors_name_the_choice_point():
    model = _tree_supergraph()
    bad = _tree_plan()
    bad.ops["block2"]["c"] = "copy9"
    with pytest.raises(MtcError, match="op choice 'block2', task 'c': option 'copy9' is not one of"):
        bad.validate(model)
    missing = _tree_plan()
    del missing.ops["block3"]
    with pytest.raises(MtcError, match="no decision for op choice 'block3'"):
        missing.validate(model)
    extra = _tree_plan()
    extra.ops["block1"]["zz"] = "copy0"
    with pytest.raises(MtcError, match="op choice 'block1' names tasks"):
        extra.validate(model)
    with pytest.raises(MtcError, match="unknown mask choice 'layers.1/relu_1'"):
        Plan(space="manual", ops=_tree_plan().ops, masks={"layers.1/relu_1": {}}).validate(model)


# ------------------------------------------------------------------------------------------ (c) masks
MASK_SITES = ["layers.3/relu_1", "layers.5/relu_1"]  # 24 and 32 channels


def _mask_plan(model, seed: int = 0) -> Plan:
    rng = np.random.default_rng(seed)
    masks = {}
    for c in sg.choices_of(model, "mask"):
        per = {}
        for t in sg.task_names(model):
            k = int(rng.integers(1, c.channels))
            per[t] = sorted(rng.choice(c.channels, size=k, replace=False).tolist())
        masks[c.name] = per
    return Plan(space="manual", masks=masks)


def test_mask_plan_binds_trains_and_exports(tmp_path):
    model = _backbone(TASKS4)
    TaskMasks(sites=MASK_SITES)(model)
    assert [c.channels for c in sg.choices_of(model, "mask")] == [24, 32]
    plan = _mask_plan(model)
    plan.masks[MASK_SITES[0]]["b"] = plan.masks[MASK_SITES[0]]["a"]  # a and b keep one stream there
    ex = _train_and_export(tmp_path, model, plan)
    # The masked channels are zero in each task's own graph: a's output does not depend on them.
    muls = [n for n in ex.tasks["a"].graph if n.op_type == "Mul" and n.name.endswith(".apply")]
    assert len(muls) == 2


def test_masks_equal_zeroed_channels_in_the_lowering():
    """The mask's effect, recomputed by hand: each task's stream at the site has exactly its kept
    channels, the others zero."""
    from mtc.lower.supergraph import lower_fixed

    model = _backbone("a:regress:1,b:regress:1")
    TaskMasks(sites=["layers.5/relu_1"])(model)
    plan = _mask_plan(model, 3)
    plain = _backbone("a:regress:1,b:regress:1")
    from mtc.lower import lower

    ref = lower(plain).eval()
    net = lower_fixed(model, plan).eval()
    x = torch.randn(2, 3, 32, 32)
    # The heads pool then apply a linear layer: zeroing channels of the feature is zeroing the
    # pooled vector's entries, so each output equals the linear layer on the masked pooled feature.
    with torch.no_grad():
        outs = net(x)
        inits = net.named_initializers()
        for t, out in zip(["a", "b"], outs, strict=True):
            keep = plan.masks["layers.5/relu_1"][t]
            m = torch.zeros(32)
            m[keep] = 1
            pooled = _pooled_feature(ref, x) * m
            want = pooled @ inits[f"head@{t}/fc.weight"].T + inits[f"head@{t}/fc.bias"]
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def _pooled_feature(module, x):
    """The backbone's pooled feature map (the input of every global head)."""
    import onnx_ir as ir

    from mtc.lower import lower

    m = module.to_model()
    g = m.graph
    feat = next(v for n in g for v in n.outputs if v.name == "layers.5/relu_1")
    g.outputs.clear()
    g.outputs.append(feat)
    from mtc.passes.canonicalize import remove_dead

    remove_dead(m)
    assert isinstance(m, ir.Model)
    return lower(m).eval()(x)[0].mean((2, 3))


# ----------------------------------------------------------------------------------------- (d) widths
def test_width_plans_shared_and_per_task(tmp_path):
    model = _backbone(TASKS4)
    Widths(sites=["layers.3/relu_1"], widths=[0.25, 0.5, 1.0])(model)
    Widths(sites=["layers.5/relu_1"], per_task=True)(model)
    shared, per_task = sg.choices_of(model, "width")
    assert not shared.per_task and shared.widths == [6, 12, 24] and per_task.per_task
    plan = Plan(space="manual", widths={"layers.3/relu_1": {"*": 12},
                                        "layers.5/relu_1": {"a": 12, "b": 32, "c": 12, "d": 30}})
    ex = _train_and_export(tmp_path, model, plan)
    assert ex.fused is not None
    bad = Plan(space="manual", widths={"layers.3/relu_1": {"*": 10}, "layers.5/relu_1": plan.widths["layers.5/relu_1"]})
    with pytest.raises(MtcError, match=r"width choice 'layers.3/relu_1', task '\*': 10 channels, expected one of"):
        bad.validate(model)


# ---------------------------------------------------------------------------------- (a) + (c) together
def test_op_choices_and_masks_compose(tmp_path):
    model = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    compile_supergraph(model, tasks=TASKS4, head_width=8)
    TaskMasks(sites=["layers.5/relu_1"], space="partition")(model)
    assert [s["name"] for s in sg.space_of(model)["spaces"]] == ["automtl", "partition"]
    policy = Policy.random(model, seed=4)
    plan = policy.to_plan()
    plan.masks = _mask_plan(model, 1).masks
    ex = _train_and_export(tmp_path, model, plan)
    assert ex.fused is not None
    assert len(vcns_of(model)) == 15  # one per conv up to the feature (stage 3 at 32x32)


# ------------------------------------------------------------------------------------ reading plans
def test_plan_json_round_trip_and_v1_policy(tmp_path):
    model = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    compile_supergraph(model, tasks="a:regress:1,b:class:3", head_width=8)
    policy = Policy.random(model, seed=1)
    plan = policy.to_plan()
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    # v1's policy.json, {"policy": {vcn: {task: option}}}, is read as the AutoMTL plan
    v1 = {"options": ["shared", "specific", "skip"], "tasks": {}, "policy": policy.to_json()}
    assert read_plan(v1, model).ops == plan.ops
    with pytest.raises(MtcError, match="not a plan"):
        Plan.from_json({"ops": {}})


def test_format_1_is_refused_with_a_line_that_says_recompile():
    from mtc.lower.supergraph import lower_fixed

    model = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    compile_supergraph(model, tasks="a:regress:1", head_width=8)
    model.metadata_props[sg.FORMAT_KEY] = "mtc.supergraph/1"
    with pytest.raises(MtcError, match="recompile the backbone with mtc compile"):
        lower_fixed(model, Policy.uniform(model, 0))
