"""The branched space on tiny_resnet: locations from cut points, sizes, tree plans, the exported tree
(one copy of each block per group, verified in onnxruntime) and single-task models as a start.

TinyResNet at 32x32 (counted by hand from mtc.zoo.TinyResNet): the stem convolution gives 16x16
(``stem.1``), the max-pool and stage 1 8x8 (``layers.1/relu_1``), stage 2 4x4 (``layers.3/relu_1``),
stage 3 2x2 (``layers.5/relu_1``, the feature the heads attach to at this size). Convolutions per
block: the stem 1; pool + stage 1, two basic blocks, 4; stages 2 and 3 (a strided stage adds the 1x1
down-sampling conv) 5 each. Regress/class heads pool and use a Gemm: no conv.
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
from mtc.ir.cost import model_cost
from mtc.ir.plan import Plan
from mtc.spaces import compile_supergraph, get_space, read_plan
from mtc.spaces.branched import blocks_of, plan_levels, tree_to_plan
from mtc.spaces.branched.baselines import block_tensors, copy_name, head_tensors, load_single_task
from mtc.spaces.branched.trees import is_tree, random_tree

TASKS = "a:regress:1,b:class:3,c:regress:2,d:class:2"
STAGES = ["stem.1", "layers.1/relu_1", "layers.3/relu_1", "layers.5/relu_1"]
CONVS = [1, 4, 5, 5]


def _compile(tasks: str = TASKS, **opts):
    m = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    compile_supergraph(m, tasks=tasks, head_width=8, space="branched", **opts)
    return m


@pytest.fixture(scope="module")
def model():
    return _compile()


def _convs(m) -> int:
    return sum(1 for n in m.graph if n.op_type == "Conv")


# ------------------------------------------------------------------------------------- locations
def test_default_locations_are_the_stage_ends(model):
    b = blocks_of(model)
    assert b.locations == STAGES and b.choices == ["block1", "block2", "block3", "block4"]
    assert [len(c.options) for c in sg.choices_of(model, "op")] == [4, 4, 4, 4]
    assert sg.space_of(model)["name"] == "branched"
    # one copy of every block is the backbone: block sizes add up to the hard-shared model
    plain = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
    from mtc.passes.pipeline import prepare_multitask

    prepare_multitask(plain, tasks=TASKS, head_width=8)
    params, macs, _ = model_cost(plain)
    assert b.shared_size("params") == params and b.shared_size("macs") == macs


def test_locations_by_count_and_by_name():
    assert blocks_of(_compile(locations="1")).locations == ["layers.5/relu_1"]
    two = blocks_of(_compile(locations="2")).locations
    assert len(two) == 2 and two[-1] == "layers.5/relu_1"
    # names in any order; the feature always ends the last block
    assert blocks_of(_compile(locations="layers.3/relu_1,pool")).locations == ["pool", "layers.3/relu_1",
                                                                               "layers.5/relu_1"]


@pytest.mark.parametrize("spec,needle", [
    ("layers.0/relu", "'layers.0/relu' is not a cut point (a branch cannot start there: other paths bypass it); "
                      "the nearest cut points are pool, layers.0/add"),
    ("layers.9/relu_1", "no tensor named 'layers.9/relu_1' in the backbone (cut points near that name:"),
    ("0", "--locations: 0: at least one location is needed"),
    ("99", "--locations 99: the backbone has 16 cut points up to the feature ('layers.5/relu_1')"),
    ("pool,pool", "'pool' is named twice"),
    ("a,,b", "expected 'stages', a count or comma-separated tensor names"),
])
def test_bad_locations_are_one_line(spec, needle):
    with pytest.raises(MtcError) as e:
        _compile(locations=spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_one_task_is_refused():
    with pytest.raises(MtcError, match="the branched space needs at least two tasks, got 1"):
        _compile(tasks="a:regress:1")


# ------------------------------------------------------------------------------------------ trees
def test_tree_sizes_equal_the_trained_and_exported_networks(model):
    from mtc.train.loop import count_parameters
    from mtc.train.posttrain import plan_module

    b = blocks_of(model)
    rng = np.random.default_rng(0)
    for counts in ([1, 1, 1, 1], [1, 1, 2, 3], [1, 2, 2, 4], [4, 4, 4, 4]):
        levels = random_tree(4, counts, rng)
        plan = tree_to_plan(levels, b)
        read_plan(plan.to_json(), model)  # a valid plan of the space
        assert plan_levels(plan, b) == levels
        assert count_parameters(plan_module(model, plan)) == b.size(levels, "params")
        if counts not in ([1, 1, 2, 3], [4, 4, 4, 4]):
            continue  # two exports suffice (the CLI test exports another tree)
        ex = export_graphs(model, plan)
        assert ex.fused is not None
        assert model_cost(ex.fused)[1] == b.size(levels, "macs")
        # exactly one copy of each block per group
        assert _convs(ex.fused) == sum(c * k for c, k in zip(CONVS, counts, strict=True))
        for t in "abcd":
            assert _convs(ex.tasks[t]) == sum(CONVS)


def test_the_exported_tree_matches_the_lowering_in_onnxruntime(model, tmp_path):
    from mtc.train.posttrain import TrainOptions, run_train
    from mtc.train.run import RunDir, module_tensors, read_tensors

    b = blocks_of(model)
    a, bb, c, d = 1, 2, 4, 8
    levels = [(a | bb | c | d,), (a | bb, c | d), (a | bb, c | d), (a, bb, c | d)]
    plan = tree_to_plan(levels, b)
    assert plan.ops["block4"] == {"a": "copy0", "b": "copy1", "c": "copy2", "d": "copy2"}
    run_train(RunDir(tmp_path / "run"), model, plan, Four(16, 0), Four(8, 1),
              TrainOptions(steps=3, batch_size=4, checkpoint_every=10), progress=False)
    weights = module_tensors(read_tensors(tmp_path / "run" / "checkpoints" / "train.safetensors")[0])
    ex = export_graphs(model, plan, weights)
    assert ex.fused is not None and _convs(ex.fused) == 1 + 4 * 2 + 5 * 2 + 5 * 3
    assert max(verify(ex.fused, ex.module).values()) <= 1e-4
    for m in ex.tasks.values():
        assert max(verify(m, ex.module).values()) <= 1e-4


def test_a_plan_that_is_not_a_tree_is_refused(model):
    ops = {c: dict.fromkeys("abcd", "copy0") for c in ("block1", "block2", "block3", "block4")}
    ops["block2"] = {"a": "copy0", "b": "copy0", "c": "copy2", "d": "copy2"}
    ops["block3"] = {"a": "copy0", "b": "copy1", "c": "copy0", "d": "copy3"}  # a and c merge again
    with pytest.raises(MtcError, match="plan is not a tree: at block3 tasks 'a' and 'c' share copy0 but took "
                                       "different copies at block2"):
        read_plan(Plan(space="branched", ops=ops).to_json(), model)


def test_describe_plan_prints_the_tree(model):
    b = blocks_of(model)
    plan = tree_to_plan([(15,), (15,), (3, 12), (1, 2, 12)], b)
    text = get_space("branched").describe_plan(model, plan)
    assert "block3 (layers.3/relu_1)  {a b}  {c d}" in text
    assert "block4 (layers.5/relu_1)  {a}  {b}  {c d}" in text
    assert f"{b.size(plan_levels(plan, b), 'params'):,} parameters" in text


# ------------------------------------------------------------------------------------ baselines
@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """An ``mtc baseline`` run's layout (baselines.json, single-<task>/checkpoints/train.safetensors
    keyed module/<IR name>) holding each task's single-task model with random weights: every model
    differs, so the test can tell whose weights landed where. (test_branched_cli.py uses a real
    ``mtc baseline`` run.)"""
    from safetensors.torch import save_file

    from mtc.lower import lower
    from mtc.passes.pipeline import prepare_multitask
    from mtc.tasks.spec import parse_tasks

    d = tmp_path_factory.mktemp("baselines")
    specs = parse_tasks(TASKS)
    (d / "baselines.json").write_text(json.dumps({"tasks": [t.name for t in specs],
                                                  "kinds": {t.name: t.kind for t in specs}}))
    g = torch.Generator().manual_seed(5)
    for t in specs:
        m = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
        prepare_multitask(m, tasks=[t], head_width=8)
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in lower(m).ir_state().items()}
        state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}
        (d / f"single-{t.name}" / "checkpoints").mkdir(parents=True)
        save_file({f"module/{k}": v.contiguous() for k, v in state.items()},
                  str(d / f"single-{t.name}" / "checkpoints" / "train.safetensors"))
    return d


def _single(d, t):
    from mtc.train.run import module_tensors, read_tensors

    return module_tensors(read_tensors(d / f"single-{t}" / "checkpoints" / "train.safetensors")[0])


def test_init_from_baselines_takes_each_groups_copy_from_its_first_task(model, baselines):
    b = blocks_of(model)
    levels = [(15,), (3, 12), (1, 2, 12), (1, 2, 4, 8)]
    plan = tree_to_plan(levels, b)
    init = get_space("branched").init_from_baselines(model, plan, baselines)
    single = {t: _single(baselines, t) for t in "abcd"}
    per_block = block_tensors(model)
    for d, (choice, names) in enumerate(zip(b.choices, per_block, strict=True)):
        for t in "abcd":
            k = int(plan.ops[choice][t].removeprefix("copy"))
            first = "abcd"[k]  # the copy of a group is numbered by its first task
            for n in names:
                assert torch.equal(init[copy_name(n, k)], single[first][n]), (d, t, n)
    for t in "abcd":
        for n in head_tensors(model, t):
            assert torch.equal(init[n], single[t][n])
    # with every task on its own copy, each task's output is its single-task model's (lowered on its own)
    from mtc.lower import lower
    from mtc.passes.pipeline import prepare_multitask
    from mtc.tasks.spec import parse_tasks
    from mtc.train.posttrain import plan_module

    sep = tree_to_plan([(1, 2, 4, 8)] * 4, b)
    net = plan_module(model, sep).eval()
    net.load_ir_state(get_space("branched").init_from_baselines(model, sep, baselines), strict=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for i, spec in enumerate(parse_tasks(TASKS)):
        plain = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
        prepare_multitask(plain, tasks=[spec], head_width=8)
        ref = lower(plain).eval()
        ref.load_ir_state(single[spec.name])
        with torch.no_grad():
            torch.testing.assert_close(net(x)[i], ref(x)[0], rtol=1e-5, atol=1e-5)


def test_baselines_of_another_task_set_or_backbone_are_refused(model, baselines, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(baselines, other)
    meta = json.loads((other / "baselines.json").read_text())
    meta["tasks"] = ["a", "b", "c", "e"]
    (other / "baselines.json").write_text(json.dumps(meta))
    with pytest.raises(MtcError, match=r"the baselines are for tasks a, b, c, e, the supergraph has a, b, c, d "
                                       r"\(another task set\)"):
        load_single_task(model, other)
    m2 = import_model(BACKBONES / "tiny_mobilenetv2.onnx", input_shape=(1, 3, 32, 32))
    compile_supergraph(m2, tasks=TASKS, head_width=8, space="branched")
    with pytest.raises(MtcError, match="another backbone"):
        load_single_task(m2, baselines)
    with pytest.raises(MtcError, match="not an mtc baseline run directory"):
        load_single_task(model, tmp_path)
    assert is_tree([(15,), (3, 12)])
