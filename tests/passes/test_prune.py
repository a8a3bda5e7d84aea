"""Channel pruning: the physically pruned graph equals the original with the removed channels'
consumer weights zeroed, in onnxruntime, for random groups and keep-sets over every bundled
backbone and every reference net; plus each rewrite on a hand-built graph and the plan API."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from channelnets import BACKBONE_FILES, BIG, Builder, compare, net
from hypothesis import given, settings
from hypothesis import strategies as st

from mtc import zoo
from mtc.errors import MtcError
from mtc.ir.channels import Channels, analyze
from mtc.ir.cost import model_cost
from mtc.passes.manager import REGISTRY, PassManager
from mtc.passes.prune import (
    ChannelPlan,
    PruneChannels,
    apply_plan,
    build_plan,
    ignored_groups,
    importance,
    ratio_counts,
    resolve_counts,
    select,
    validate_plan,
)

TOL = 1e-5
SMALL = [n for n in BACKBONE_FILES if n not in BIG] + [f"zoo:{n}" for n in zoo.REFERENCE]


def draw_plan(data: st.DataObject, ch: Channels) -> dict[int, tuple[int, ...]]:
    """1-3 prunable groups, each keeping a random non-empty proper subset (every member kept alive)."""
    choices = [g.id for g in ch.prunable if g.size > 1]
    if not choices:
        return {}
    picked = data.draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3, unique=True), label="groups")
    keep: dict[int, tuple[int, ...]] = {}
    for gid in picked:
        g = ch.groups[gid]
        n = data.draw(st.integers(1, g.size - 1), label=f"kept of {g.name}")
        seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        kept = np.zeros(g.size, dtype=bool)
        kept[np.random.default_rng(seed).choice(g.size, n, replace=False)] = True
        for m in g.members:  # a Slice/Split holding part of a group must keep something
            if not kept[m.units].any():
                kept[m.units[0]] = True
        keep[gid] = tuple(int(i) for i in np.flatnonzero(kept))
    return keep


def _check_random_plan(key: str, data: st.DataObject, batch: int) -> None:
    model, ch = net(key)
    keep = draw_plan(data, ch)
    if not keep:
        return
    plan = ChannelPlan(keep)
    pruned = apply_plan(model, ch, plan)
    assert model_cost(pruned)[0] < model_cost(model)[0]  # every prunable group has a producer: weights went
    assert compare(model, pruned, ch, keep, batch=batch) <= TOL


@pytest.mark.parametrize("key", SMALL)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_pruned_equals_zeroed_consumers(key: str, data: st.DataObject) -> None:
    _check_random_plan(key, data, batch=2)


@pytest.mark.parametrize("key", sorted(BIG))
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_pruned_equals_zeroed_consumers_big_backbones(key: str, data: st.DataObject) -> None:
    _check_random_plan(key, data, batch=1)


def test_half_of_every_group_of_every_net() -> None:
    """Everything prunable at once (ratio 0.5, random channels): still the oracle."""
    for key in SMALL:
        model, ch = net(key)
        plan = build_plan(model, ch, ratio=0.5, importance="random", seed=1)
        pruned = apply_plan(model, ch, plan)
        assert compare(model, pruned, ch, dict(plan.keep)) <= TOL, key


# --- one rewrite at a time ---------------------------------------------------------------------------

X = {"x": ["N", 3, 8, 8]}


def _prune(m: ir.Model, keep: dict[str, list[int]]) -> tuple[ir.Model, Channels, ChannelPlan]:
    ch = analyze(m)
    plan = ChannelPlan({ch.find(k).id: tuple(v) for k, v in keep.items()})
    pruned = apply_plan(m, ch, plan)
    assert compare(m, pruned, ch, dict(plan.keep)) <= TOL
    return pruned, ch, plan


def _node(m: ir.Model, name: str) -> ir.Node:
    return next(n for n in m.graph if n.name == name)


def _w(m: ir.Model, node: str, i: int = 1) -> tuple[int, ...]:
    return tuple(_node(m, node).inputs[i].const_value.shape)


def test_grouped_conv_loses_whole_groups_and_depthwise_stays_depthwise() -> None:
    b = Builder()
    a = b.bn(b.conv("x", 3, 8, name="a"), 8)
    g4 = b.op("Relu", b.conv(a, 8, 12, 3, group=4, name="g4"))
    dw = b.conv(b.op("Relu", b.conv(g4, 12, 6, name="c")), 6, 6, 3, group=6, name="dw")
    dw2 = b.conv(dw, 6, 12, 3, group=6, name="dw2")
    m = b.model(X, [b.conv(dw2, 12, 2, name="y")])
    pruned, _, _ = _prune(m, {"a": [0, 3], "c": [1, 2, 5]})
    assert _node(pruned, "g4").attributes["group"].value == 2 and _w(pruned, "g4") == (6, 2, 3, 3)
    assert _w(pruned, "a") == (4, 3, 1, 1) and _w(pruned, "y") == (2, 6, 1, 1)
    assert _node(pruned, "dw").attributes["group"].value == 3 and _w(pruned, "dw") == (3, 1, 3, 3)
    assert _node(pruned, "dw2").attributes["group"].value == 3 and _w(pruned, "dw2") == (6, 1, 3, 3)


def test_conv_transpose_plain_grouped_and_depthwise() -> None:
    b = Builder()
    a = b.conv("x", 3, 8, name="a")
    up = b.op("ConvTranspose", a, b.w(8, 6, 2, 2), b.w(6), name="up", strides=[2, 2])
    g2 = b.op("ConvTranspose", up, b.w(6, 2, 3, 3), b.w(4), name="g2", group=2, pads=[1, 1, 1, 1])
    dw = b.op("ConvTranspose", g2, b.w(4, 1, 3, 3), name="dw", group=4, pads=[1, 1, 1, 1])
    m = b.model(X, [b.conv(dw, 4, 2, name="y")])
    ch = analyze(m)
    assert [g.size for g in ch] == [3, 8, 2, 2]  # up's 6 channels read in 2 groups; g2 and dw follow
    pruned, _, _ = _prune(m, {"a": [2, 5, 7], "up": [1]})
    assert _w(pruned, "up") == (3, 3, 2, 2)
    assert _node(pruned, "g2").attributes["group"].value == 1 and _w(pruned, "g2") == (3, 2, 3, 3)
    assert _node(pruned, "dw").attributes["group"].value == 2 and _w(pruned, "dw") == (2, 1, 3, 3)


def test_concat_offsets_and_split_sizes_follow() -> None:
    b = Builder()
    cat = b.op("Concat", b.conv("x", 3, 6, name="a"), b.conv("x", 3, 4, name="c"), name="cat", axis=1)
    p, q = b.op("Split", cat, b.ints(4, 6), name="split", outputs=2, axis=1)
    m = b.model(X, [b.conv(p, 4, 2, name="yp"), b.conv(q, 6, 2, name="yq")])
    ch = analyze(m)
    assert [g.name for g in ch][1:4] == ["a[0:4]", "a[4:6]", "c"]  # the Split cuts 'a' at 4
    pruned, _, _ = _prune(m, {"a[0:4]": [1, 3], "c": [0, 2]})
    assert _node(pruned, "split").inputs[1].const_value.numpy().tolist() == [2, 4]
    assert _w(pruned, "yp") == (2, 2, 1, 1) and _w(pruned, "yq") == (2, 4, 1, 1)


def test_split_to_sequence_read_at_fixed_positions_is_a_split() -> None:
    """PyTorch's chunk through the dynamo exporter: SplitToSequence + SequenceAt."""
    b = Builder()
    a = b.conv("x", 3, 8, name="a")
    seq = b.op("SplitToSequence", a, b.w(value=np.array(3, dtype=np.int64)), name="seq", axis=1)  # 3 | 3 | 2
    p = b.op("SequenceAt", seq, b.w(value=np.array(0, dtype=np.int64)), name="p")
    r = b.op("SequenceAt", seq, b.w(value=np.array(-1, dtype=np.int64)), name="r")
    m = b.model(X, [b.conv(p, 3, 2, name="yp"), b.conv(r, 2, 2, name="yr")])
    # ONNX shape inference gives a sequence's tensors no channel count; exporters record it.
    for name, c in (("p", 3), ("r", 2)):
        m.graph.node(name).outputs[0].shape = ir.Shape(["N", c, 8, 8])
    ch = analyze(m)
    assert [g.name for g in ch][1:4] == ["a[0:3]", "a[3:6]", "a[6:8]"]
    pruned, _, _ = _prune(m, {"a[0:3]": [0, 2], "a[3:6]": [1]})
    assert _node(pruned, "seq").inputs[1].const_value.numpy().tolist() == [2, 1, 2]
    assert _w(pruned, "yp") == (2, 2, 1, 1) and _w(pruned, "yr") == (2, 2, 1, 1)


def test_slice_bounds_follow() -> None:
    b = Builder()
    a = b.conv("x", 3, 8, name="a")
    s = b.op("Slice", a, b.ints(2), b.ints(7), b.ints(1), name="sl")
    m = b.model(X, [b.conv(s, 5, 2, name="y"), b.conv(a, 8, 2, name="z")])
    pruned, _, _ = _prune(m, {"a[0:2]": [1], "a[2:7]": [0, 2, 4]})
    assert _w(pruned, "y") == (2, 3, 1, 1) and _w(pruned, "z") == (2, 5, 1, 1)


def test_gather_indices_follow() -> None:
    b = Builder()
    a = b.conv("x", 3, 4, name="a")
    t = b.op("Add", b.op("Gather", a, b.ints(3, 1), name="ga", axis=1), b.conv("x", 3, 2, name="d"), name="t")
    m = b.model(X, [b.conv(t, 2, 2, name="y"), b.conv(a, 4, 2, name="z")])
    ch = analyze(m)
    g = of_value(ch, "d")
    assert g.size == 2 and {p.node for p in g.producers} == {"a", "d"}
    for keep in ([0], [1]):
        pruned, _, _ = _prune(m, {g.name: keep})
        assert _node(pruned, "ga").inputs[1].const_value.numpy().shape == (1,)


def test_reshape_target_and_gemm_blocks_follow() -> None:
    b = Builder()
    c = b.op("MaxPool", b.conv("x", 3, 4, name="c"), kernel_shape=[4, 4], strides=[4, 4])
    f = b.op("Reshape", c, b.ints(-1, 16), name="flat")
    m = b.model(X, [b.op("Gemm", f, b.w(16, 5), b.w(5), name="fc")])
    pruned, _, _ = _prune(m, {"c": [1, 2]})
    assert _w(pruned, "fc") == (8, 5)
    assert _node(pruned, "flat").inputs[1].const_value.numpy().tolist() == [-1, 8]


def test_slice_whose_kept_positions_stop_being_a_progression_becomes_a_gather() -> None:
    """A stride-2 Slice tied to a 4-channel conv: removing one of those 4 leaves a's kept positions
    0, 2, 6 of 7, which no Slice can pick; the pruner inserts a Gather."""
    b = Builder()
    a = b.conv("x", 3, 8, name="a")
    s = b.op("Slice", a, b.ints(0), b.ints(8), b.ints(1), b.ints(2), name="every2")
    t = b.op("Add", s, b.conv("x", 3, 4, name="c"), name="t")
    m = b.model(X, [b.conv(t, 4, 2, name="y"), b.conv(a, 8, 2, name="z")])
    ch = analyze(m)
    g = of_value(ch, "c")
    assert g.size == 4 and {p.node for p in g.producers} == {"a", "c"}
    pruned, _, _ = _prune(m, {g.name: [0, 1, 3]})
    assert [n.op_type for n in pruned.graph if n.name.startswith("every2")] == ["Slice", "Gather"]
    assert _w(pruned, "z") == (2, 7, 1, 1) and _w(pruned, "y") == (2, 3, 1, 1)


def of_value(ch: Channels, value: str):
    return ch.groups[int(ch.unit_group[ch.slot_units[(value, 1)][0]])]


@pytest.mark.parametrize("op", ["Resize", "Expand", "PRelu", "InstanceNormalization", "BiasAdd"])
def test_config_inputs_follow_the_new_widths(op: str) -> None:
    b = Builder()
    a = b.op("Relu", b.conv("x", 3, 8, name="a"))
    if op == "Resize":
        y = b.op("Resize", a, "", "", b.ints(2, 8, 16, 16), name="m", mode="nearest")
    elif op == "Expand":
        y = b.op("Expand", b.op("GlobalAveragePool", a), b.ints(1, 8, 8, 8), name="m")
    elif op == "PRelu":
        y = b.op("PRelu", a, b.w(8, 1, 1), name="m")
    elif op == "InstanceNormalization":
        y = b.op("InstanceNormalization", a, b.w(8), b.w(8), name="m")
    else:  # a bias over the last axis of a channels-last tensor
        y = b.op("Add", b.op("Transpose", a, perm=[0, 2, 3, 1]), b.w(8), name="m")
        y = b.op("Transpose", y, perm=[0, 3, 1, 2])
    m = b.model(X, [b.conv(y, 8, 2, name="z")])
    pruned, _, _ = _prune(m, {"a": [0, 4, 5]})
    assert _w(pruned, "z") == (2, 3, 1, 1)


def test_every_other_op_needs_no_rewrite() -> None:
    """Ops the analysis passes channels through keep their attributes and extra inputs."""
    b = Builder()
    a = b.bn(b.conv("x", 3, 8, name="a"), 8)
    y = b.op("Clip", a, b.w(value=np.float32(0)), b.w(value=np.float32(6)))
    y = b.op("AveragePool", b.op("Pad", y, b.ints(0, 0, 1, 1, 0, 0, 1, 1)), kernel_shape=[3, 3])
    y = b.op("Softmax", b.op("ReduceMean", y, b.ints(3)), axis=2)
    m = b.model(X, [b.conv(y, 8, 2, name="z")])
    _prune(m, {"a": [1, 2, 6]})


# --- the API ------------------------------------------------------------------------------------------


def test_apply_plan_is_pure_and_works_per_task() -> None:
    model, ch = net("tiny_resnet.onnx")
    before = ir.to_onnx_text(model)
    g = ch.find("stem.0.0")
    a = apply_plan(model, ch, ChannelPlan({g.id: (0, 1, 2, 3)}))
    b = apply_plan(model, ch, ChannelPlan({g.id: tuple(range(12))}))
    assert ir.to_onnx_text(model) == before
    assert _w(a, "stem.0.0") == (4, 3, 3, 3) and _w(b, "stem.0.0") == (12, 3, 3, 3)
    assert model_cost(a)[1] < model_cost(b)[1] < model_cost(model)[1]


def test_plan_validation_names_the_problem() -> None:
    model, ch = net("tiny_resnet.onnx")
    g = ch.find("stem.0.0")
    for keep, msg in [({99: (0,)}, "no group 99"), ({g.id: ()}, "keep at least 1"),
                      ({g.id: (3, 1)}, "ascending"), ({g.id: (0, 16)}, "ascending"),
                      ({0: (0, 1)}, "group 'input' is not prunable: graph input 'input'")]:
        with pytest.raises(MtcError, match=msg):
            validate_plan(ch, ChannelPlan(keep))
    other, _ = net("tiny_mobilenetv2.onnx")
    with pytest.raises(MtcError, match="do not belong to this model"):
        apply_plan(other, ch, ChannelPlan({g.id: (0,)}))


def test_plan_json_round_trip() -> None:
    model, ch = net("tiny_resnet.onnx")
    plan = build_plan(model, ch, ratio=0.5)
    data = plan.to_json(ch)
    assert "stem.0.0" in data["keep"]
    assert ChannelPlan.from_json(data, ch) == plan
    assert ChannelPlan.from_json(plan.to_json(), ch) == plan
    with pytest.raises(MtcError, match="no group 'nope'"):
        ChannelPlan.from_json({"keep": {"nope": [0]}}, ch)


def test_importance_and_selection() -> None:
    model, ch = net("tiny_resnet.onnx")
    g = ch.find("layers.0.conv1.0")
    w = next(n for n in model.graph if n.name == "layers.0.conv1.0").inputs[1].const_value.numpy()
    np.testing.assert_allclose(importance(model, ch, g, "l1"), np.abs(w).reshape(16, -1).sum(1), rtol=1e-6)
    np.testing.assert_allclose(importance(model, ch, g, "l2"), np.sqrt((w.reshape(16, -1) ** 2).sum(1)), rtol=1e-6)
    r = importance(model, ch, g, "random", seed=3)
    assert np.array_equal(r, importance(model, ch, g, "random", seed=3)) and not np.array_equal(
        r, importance(model, ch, g, "random", seed=4))
    plan = select(model, ch, {g.id: 4}, method="l1")
    assert plan.keep[g.id] == tuple(sorted(np.argsort(-np.abs(w).reshape(16, -1).sum(1))[:4].tolist()))
    # A residual group scores the sum over all its producers.
    s = ch.find("stem.0.0")
    total = sum(np.abs(next(n for n in model.graph if n.name == p.node).inputs[1].const_value.numpy())
                .reshape(16, -1).sum(1) for p in s.producers)
    np.testing.assert_allclose(importance(model, ch, s, "l1"), total, rtol=1e-6)


def test_ratio_counts_rounding() -> None:
    model, ch = net("tiny_resnet.onnx")
    sizes = {g.id: g.size for g in ch.prunable}
    c = ratio_counts(ch, 0.5)
    assert all(c[i] == sizes[i] // 2 for i in sizes)
    c = ratio_counts(ch, 0.3, round_to=8)  # 16*0.7 = 11.2 -> 11 -> 8; 24 -> 16.8 -> 17 -> 16; 48 -> 33.6 -> 34 -> 32
    assert sorted(set(c.values())) == [8, 16, 24, 32]
    assert ratio_counts(ch, 0.01) == {}  # nothing would change
    assert ratio_counts(ch, 0.99) == dict.fromkeys(sizes, 1)
    assert ratio_counts(ch, 0.9, round_to=64) == {}  # groups smaller than K stay whole
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(MtcError, match=r"--ratio .*: must be in \(0, 1\)"):
            ratio_counts(ch, bad)
    with pytest.raises(MtcError, match="--round-to 0"):
        ratio_counts(ch, 0.5, round_to=0)


def test_keep_counts_and_ignore() -> None:
    model, ch = net("tiny_resnet.onnx")
    assert resolve_counts(ch, {"stem.0.0": 4, "2": 8}) == {1: 4, 2: 8}
    for keep, msg in [({"nope": 1}, "--keep: no group 'nope'"), ({"stem.0.0": 0}, "keep at least 1 channel"),
                      ({"stem.0.0": 17}, "has 16 channels, cannot keep 17"),
                      ({"input": 2}, "group 'input' is not prunable: graph input")]:
        with pytest.raises(MtcError, match=msg):
            resolve_counts(ch, keep)
    assert resolve_counts(ch, {"input": 3}) == {0: 3}  # keeping all of an unprunable group is fine
    skip = ignored_groups(ch, ["layers.0.conv2.0"], model)
    assert skip == {ch.find("stem.0.0").id, ch.find("layers.0.conv1.0").id}
    with pytest.raises(MtcError, match="--ignore: no node 'nope'"):
        ignored_groups(ch, ["nope"], model)
    plan = build_plan(model, ch, ratio=0.5, ignore=["layers.0.conv2.0"], keep={"layers.1.conv1.0": 3})
    assert set(skip).isdisjoint(plan.keep) and len(plan.keep[ch.find("layers.1.conv1.0").id]) == 3
    with pytest.raises(MtcError, match="touches a node --ignore leaves whole"):
        build_plan(model, ch, keep={"stem.0.0": 3}, ignore=["stem.0.0"])


def test_the_pass_is_registered_and_runs_in_a_pipeline() -> None:
    model, _ = net("tiny_mobilenetv2.onnx")
    m = model.clone()
    assert REGISTRY["prune-channels"] is PruneChannels
    p = PruneChannels(ratio=0.5, importance="l2", round_to=4)
    assert "ratio=0.5" in repr(p)
    res = PassManager([p]).run(m)
    assert res.modified and p.applied is not None and p.channels is not None
    assert model_cost(m)[1] < 0.5 * model_cost(model)[1]
    for kwargs, msg in [({}, "needs a plan"), ({"ratio": 0.5, "plan": ChannelPlan()}, "not both"),
                        ({"ratio": 0.5, "importance": "l3"}, "importance 'l3'")]:
        with pytest.raises(MtcError, match=msg):
            PruneChannels(**kwargs)(model.clone())
    unchanged = PruneChannels(plan=ChannelPlan())(model.clone())
    assert not unchanged.modified
