"""Channel dependency groups: one hand-built graph per op rule, hand-counted tables for real nets,
the analysis's speed, and ``mtc inspect --channels``."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from channelnets import Builder, backbone, zoo_net
from click.testing import CliRunner
from conftest import BACKBONES
from onnx import helper

from mtc.cli import main
from mtc.ir.channels import Channels, Group, analyze, describe_map

X = {"x": ["N", 3, 8, 8]}


def of(ch: Channels, value: str, axis: int = 1, pos: int = 0) -> Group:
    """The group holding position ``pos`` of ``value``'s ``axis``."""
    return ch.groups[int(ch.unit_group[ch.slot_units[(value, axis)][pos]])]


def member_map(g: Group, value: str) -> str:
    (m,) = [m for m in g.members if m.value == value]
    return m.map


def table(ch: Channels) -> list[tuple[int, bool]]:
    return [(g.size, g.prunable) for g in ch]


# --- one rule at a time -----------------------------------------------------------------------------


def test_conv_chain_producers_consumers_and_interface() -> None:
    b = Builder()
    r = b.op("Relu", b.conv("x", 3, 8, 3, name="c1"), name="r")
    y = b.conv(r, 8, 4, name="c2")
    ch = analyze(b.model(X, [y]))
    assert [(g.name, g.size, g.prunable) for g in ch] == [("x", 3, False), ("c1", 8, True), ("c2", 4, False)]
    g = ch.find("c1")
    assert g is not None and ch.find(1) is g and ch.find("1") is g and ch.find("nope") is None
    assert [p.node for p in g.producers] == ["c1"] and [c.node for c in g.consumers] == ["c2"]
    assert {m.value for m in g.members} == {"c1", "r"} and all(m.map == "all" for m in g.members)
    assert ch.groups[0].reason == "graph input 'x'"
    assert ch.groups[2].reason == "graph output 'c2'"


def test_residual_add_ties_and_broadcasts() -> None:
    """Add of two convs ties them; a [N,C,1,1] gate (squeeze-excite) ties C; a scalar and a
    [1,C,1,1] constant tie nothing."""
    b = Builder()
    s = b.op("Add", b.conv("x", 3, 8, name="a"), b.conv("x", 3, 8, name="b"), name="s")
    s = b.op("Mul", s, b.w(value=np.float32(0.5)), name="half")
    s = b.op("Mul", s, b.w(1, 8, 1, 1), name="scale")
    pooled = b.op("GlobalAveragePool", s, name="pool")
    gate = b.op("Sigmoid", b.conv(pooled, 8, 8, name="fc"), name="sig")
    y = b.conv(b.op("Mul", s, gate, name="se"), 8, 4, name="out")
    ch = analyze(b.model(X, [y]))
    assert table(ch) == [(3, False), (8, True), (4, False)]
    g = of(ch, "s")
    assert {p.node for p in g.producers} == {"a", "b", "fc"}
    assert {c.node for c in g.consumers} == {"fc", "out"}
    assert of(ch, "se") is g and of(ch, "sig") is g and of(ch, "pool") is g


def test_depthwise_ties_and_a_one_channel_conv_is_not_depthwise() -> None:
    b = Builder()
    c = b.conv("x", 3, 8, name="c")
    dw = b.conv(c, 8, 8, 3, group=8, name="dw")
    dw2 = b.conv(dw, 8, 16, 3, group=8, name="dw2")  # channel multiplier 2
    one = b.conv(dw2, 16, 1, name="one")  # one output channel, group 1: an ordinary conv
    spread = b.conv(one, 1, 4, 3, name="spread")  # one input channel, group 1: ordinary too
    y = b.conv(spread, 4, 2, name="y")
    ch = analyze(b.model(X, [y]))
    g = of(ch, "c")
    assert of(ch, "dw") is g and of(ch, "dw2") is g
    assert member_map(g, "dw2") == "0:16 blocks of 2" and g.size == 8
    assert {p.node for p in g.producers} == {"c", "dw", "dw2"}
    assert of(ch, "one") is not g and of(ch, "one").size == 1 and of(ch, "one").prunable
    assert of(ch, "spread") is not of(ch, "one") and of(ch, "spread").size == 4
    assert table(ch) == [(3, False), (8, True), (1, True), (4, True), (2, False)]


def test_grouped_conv_keeps_or_removes_whole_groups() -> None:
    b = Builder()
    a = b.conv("x", 3, 8, name="a")
    g4 = b.conv(a, 8, 12, 3, group=4, name="g4")  # 2 inputs and 3 outputs per group
    y = b.conv(g4, 12, 4, name="y")
    ch = analyze(b.model(X, [y]))
    g = of(ch, "a")
    assert g.size == 4 and of(ch, "g4") is g
    assert member_map(g, "a") == "0:8 blocks of 2" and member_map(g, "g4") == "0:12 blocks of 3"


def test_concat_offsets_make_separate_groups() -> None:
    b = Builder()
    cat = b.op("Concat", b.conv("x", 3, 4, name="a"), b.conv("x", 3, 6, name="b"), name="cat", axis=1)
    y = b.conv(cat, 10, 2, name="y")
    ch = analyze(b.model(X, [y]))
    ga, gb = of(ch, "cat", pos=0), of(ch, "cat", pos=4)
    assert ga is not gb and (ga.size, gb.size) == (4, 6)
    assert member_map(ga, "cat") == "0:4" and member_map(gb, "cat") == "4:10"
    (c,) = gb.consumers
    assert c.node == "y" and c.positions.tolist() == list(range(4, 10))


def test_split_slice_and_gather_cut_groups_at_range_edges() -> None:
    b = Builder()
    a = b.conv("x", 3, 8, name="a")
    p, q = b.op("Split", a, b.ints(3, 5), name="split", outputs=2, axis=1)
    sl = b.op("Slice", a, b.ints(2), b.ints(6), b.ints(1), name="slice")
    ga = b.op("Gather", a, b.ints(7, 6), name="gather", axis=1)
    ys = [b.conv(p, 3, 2, name="yp"), b.conv(q, 5, 2, name="yq"), b.conv(sl, 4, 2, name="ys"),
          b.conv(ga, 2, 2, name="yg")]
    ch = analyze(b.model(X, ys))
    # Cuts at 2 (slice), 3 (split), 6 (slice, gather): pieces 0:2, 2:3, 3:6, 6:8.
    pieces = [of(ch, "a", pos=i) for i in range(8)]
    assert [g.size for g in dict.fromkeys(pieces)] == [2, 1, 3, 2]
    assert [g.name for g in dict.fromkeys(pieces)] == ["a[0:2]", "a[2:3]", "a[3:6]", "a[6:8]"]
    assert member_map(of(ch, "slice", pos=0), "slice") == "0:1"
    assert member_map(of(ch, "gather"), "gather") == "map"  # reversed: units 1, 0


def test_channels_last_transpose_matmul_and_layernorm() -> None:
    """LayerNorm over a channels-last axis reads every channel: that group is unprunable, named. The
    MLP's hidden channels are fine, and so are channels a Transpose brings back to axis 1."""
    b = Builder()
    c = b.conv("x", 3, 8, name="c")
    t = b.op("Transpose", c, name="nhwc", perm=[0, 2, 3, 1])
    n = b.op("LayerNormalization", t, b.w(8), b.w(8), name="ln", axis=-1)
    h = b.op("Relu", b.op("MatMul", n, b.w(8, 16), name="fc1"), name="act")
    o = b.op("Add", b.op("MatMul", h, b.w(16, 6), name="fc2"), b.w(6), name="bias")
    y = b.conv(b.op("Transpose", o, name="nchw", perm=[0, 3, 1, 2]), 6, 2, name="y")
    ch = analyze(b.model(X, [y]))
    assert table(ch) == [(3, False), (8, False), (16, True), (6, True), (2, False)]
    assert ch.find("c").reason == "node 'ln' (LayerNormalization) normalises over axis 3 of 'nhwc'"
    g = ch.find("fc2")
    assert {(m.value, m.axis) for m in g.members} == {("fc2", 3), ("bias", 3), ("nchw", 1)}
    assert [c.node for c in g.consumers] == ["y"]


def test_layernorm_over_a_spatial_last_axis_passes_channels() -> None:
    b = Builder()
    n = b.op("LayerNormalization", b.conv("x", 3, 8, name="c"), b.w(8), b.w(8), name="ln", axis=-1)
    ch = analyze(b.model(X, [b.conv(n, 8, 2, name="y")]))
    assert ch.find("c").prunable and of(ch, "ln") is ch.find("c")


def test_flatten_and_reshape_into_gemm_read_blocks_per_channel() -> None:
    b = Builder()
    c = b.conv("x", 3, 4, name="c")
    f = b.op("Flatten", c, name="flat", axis=1)
    y1 = b.op("Gemm", f, b.w(5, 256), name="fc", transB=1)
    last = b.op("Transpose", b.conv("x", 3, 2, name="d"), name="nhwc", perm=[0, 2, 3, 1])
    r = b.op("Reshape", last, b.ints(0, -1), name="rs")
    y2 = b.op("Gemm", r, b.w(128, 5), name="fc2")
    ch = analyze(b.model(X, [y1, y2]))
    assert member_map(ch.find("c"), "flat") == "0:256 blocks of 64"
    assert member_map(ch.find("d"), "rs") == "0:128 stride 2"
    assert ch.find("c").prunable and ch.find("d").prunable
    (cons,) = ch.find("c").consumers
    assert cons.node == "fc" and cons.positions.tolist() == list(range(256))


@pytest.mark.parametrize(("build", "reason"), [
    (lambda b, c: b.op("ReduceMean", c, b.ints(1), name="m"), "node 'm' (ReduceMean) reduces over axis 1 of 'c'"),
    (lambda b, c: b.op("Softmax", c, name="m", axis=1), "node 'm' (Softmax) normalises over axis 1 of 'c'"),
    (lambda b, c: b.op("Reshape", c, b.ints(0, 2, 4, 8, 8), name="m"), "node 'm' (Reshape) splits or mixes axis 1"),
    (lambda b, c: b.op("DepthToSpace", c, name="m", blocksize=2), "node 'm' (DepthToSpace) has no channel rule"),
    (lambda b, c: b.op("Pad", c, b.ints(0, 1, 0, 0, 0, 1, 0, 0), name="m"), "node 'm' (Pad) pads axis 1"),
    (lambda b, c: b.op("LRN", c, name="m", size=3), "node 'm' (LRN) mixes neighbouring channels"),
])
def test_ops_that_mix_channels_make_the_group_unprunable(build, reason: str) -> None:
    b = Builder()
    c = b.conv("x", 3, 8, name="c")
    y = b.op("Identity", build(b, c), name="y")
    ch = analyze(b.model(X, [y, b.conv(c, 8, 2, name="z")]))
    g = ch.find("c")
    assert not g.prunable and any(reason in r for r in g.reasons), g.reasons


@pytest.mark.parametrize("build", [
    lambda b, c: b.op("ReduceMean", c, b.ints(2, 3), name="m"),
    lambda b, c: b.op("Softmax", c, name="m", axis=3),
    lambda b, c: b.op("Pad", c, b.ints(0, 0, 1, 1, 0, 0, 1, 1), name="m"),
    lambda b, c: b.op("MaxPool", c, name="m", kernel_shape=[2, 2], strides=[2, 2]),
    lambda b, c: b.op("Resize", c, "", "", b.ints(2, 8, 16, 16), name="m", mode="nearest"),
    lambda b, c: b.op("Clip", c, b.w(value=np.float32(0)), b.w(value=np.float32(6)), name="m"),
])
def test_ops_that_keep_channels_apart_pass_them(build) -> None:
    b = Builder()
    c = b.conv("x", 3, 8, name="c")
    m = build(b, c)
    ch = analyze(b.model(X, [b.conv(m, 8, 2, name="y")]))
    g = ch.find("c")
    assert g.prunable and of(ch, "m") is g, g.reasons


def test_custom_domain_op_is_named() -> None:
    b = Builder()
    c = b.conv("x", 3, 8, name="c")
    b.nodes.append(helper.make_node("Thing", [c], ["t"], name="t", domain="ai.mtc"))
    ch = analyze(b.model(X, [b.conv(c, 8, 2, name="y"), "t"], domains={"ai.mtc": 1}))
    assert ch.find("c").reason == "node 't' (ai.mtc.Thing) has no channel rule"


def test_describe_map() -> None:
    ar = np.arange
    assert describe_map(ar(4), ar(4), 4) == "all"
    assert describe_map(ar(4) + 2, ar(4), 8) == "2:6"
    assert describe_map(ar(4), ar(4) + 4, 4) == "0:4 <- units 4:8"
    assert describe_map(ar(6), np.repeat(ar(2), 3), 6) == "0:6 blocks of 3"
    assert describe_map(ar(6), np.tile(ar(3), 2), 6) == "0:6 stride 3"
    assert describe_map(np.array([0, 2]), ar(2), 4) == "map"


# --- hand-counted tables -----------------------------------------------------------------------------

# tiny_resnet (mtc.zoo.TinyResNet, widths 16/24/32/48, two basic blocks per stage):
#   the input (3, unprunable); per stage the residual stream (the stem or the strided 1x1 shortcut,
#   tied by the Adds to both blocks' conv2), then each block's conv1; the classifier (10, output).
TINY_RESNET = [(3, False)] + [(w, True) for w in (16, 24, 32, 48) for _ in range(3)] + [(10, False)]
# tiny_mobilenetv2 (cfg in mtc.zoo.TinyMobileNetV2, expand 4): the input; stem 16 tied with block 0's
#   projection (residual); block 0's expansion 64 (its depthwise conv ties in); block 1: expansion 64,
#   projection 24 tied with block 2's (residual); block 2: 96; block 3: 96, projection 32 tied with
#   block 4's; block 4: 128; block 5 (SE): expansion 128 (the SE's fc2 ties in through the Mul), SE
#   fc1 128/4 = 32, projection 48 tied with block 6's; block 6 (SE): 192 and fc1 48; the last 1x1
#   96; the classifier 10.
TINY_MOBILENETV2 = ([(3, False)] + [(n, True) for n in (16, 64, 64, 24, 96, 96, 32, 128, 128, 32, 48, 192, 48, 96)]
                    + [(10, False)])
# tiny_densenet: the input; the stem 16; per dense block three growth convs of 8 (each concatenated,
#   so its own group) and the transition 1x1 (24, 32, 40); the classifier.
TINY_DENSENET = [(3, False), (16, True)] + [(n, True) for t in (24, 32, 40) for n in (8, 8, 8, t)] + [(10, False)]
# deeplab_resnet34.prototxt (ResNet-34, stages of 3/4/6/3 blocks, 64/128/256/512): the input; stage 1's
#   stream (stem + 3 conv2, identity shortcuts) and 3 conv1; stages 2-4: each block's conv1 (the first
#   block's before the stream in graph order) and the stream (shortcut conv + conv2s); stage 4's
#   stream is the graph output.
DEEPLAB = ([(3, False), (64, True)] + [(64, True)] * 3 + [(128, True)] * 5 + [(256, True)] * 7
           + [(512, True), (512, False), (512, True), (512, True)])
# zoo 'grouped' (mtc.zoo.GroupedNet): the input; stem 16 tied with expand (residual); reduce 32 read
#   by a 4-group conv: 4 units of 8 channels; mid 16 read by a 2-group conv (8 -> 12 per group) and
#   then a depthwise x2 conv: 2 units; the gate (1 channel, broadcast by a Mul: unprunable); the
#   spread conv 4; the output conv 16.
GROUPED = [(3, False), (16, True), (4, True), (2, True), (1, False), (4, True), (16, False)]


@pytest.mark.parametrize(("name", "expected"), [
    ("tiny_resnet.onnx", TINY_RESNET), ("tiny_mobilenetv2.onnx", TINY_MOBILENETV2),
    ("tiny_densenet.onnx", TINY_DENSENET), ("deeplab_resnet34.prototxt", DEEPLAB),
])
def test_hand_counted_groups_of_backbones(name: str, expected: list[tuple[int, bool]]) -> None:
    _, ch = backbone(name)
    assert table(ch) == expected


def test_hand_counted_groups_of_grouped_net() -> None:
    _, ch = zoo_net("grouped")
    assert table(ch) == GROUPED
    assert "broadcast over axis 1" in (ch.groups[4].reason or "")


def test_analysis_is_fast_on_the_big_backbones() -> None:
    for name in ("deeplab_resnet34.prototxt", "mobilenetv2.prototxt"):
        m, _ = backbone(name)
        best = min(_timed(analyze, m) for _ in range(3))
        assert best < 0.1, f"{name}: {best * 1000:.0f} ms"


def _timed(f, *a) -> float:
    t0 = time.perf_counter()
    f(*a)
    return time.perf_counter() - t0


def test_analysis_writes_nothing_into_the_model() -> None:
    m, _ = backbone("tiny_resnet.onnx")
    before = [dict(n.metadata_props) for n in m.graph]
    analyze(m)
    assert [dict(n.metadata_props) for n in m.graph] == before and not m.metadata_props.get("mtc.channels")


# --- mtc inspect --channels --------------------------------------------------------------------------


def test_inspect_channels_text_and_json() -> None:
    path = str(BACKBONES / "tiny_resnet.onnx")
    r = CliRunner().invoke(main, ["inspect", path, "--channels"], catch_exceptions=False)
    assert r.exit_code == 0
    assert "no: graph input 'input'" in r.output and "14 groups, 12 prunable" in r.output
    r = CliRunner().invoke(main, ["inspect", path, "--channels", "--json"], catch_exceptions=False)
    data = json.loads(r.output)
    assert data["count"] == 14 and data["prunable"] == 12
    g = data["groups"][1]
    assert (g["name"], g["size"], g["prunable"], g["reason"]) == ("stem.0.0", 16, True, None)
    assert {p["node"] for p in g["producers"]} == {"stem.0.0", "layers.0.conv2.0", "layers.1.conv2.0"}
    assert all(set(m) >= {"value", "axis", "size", "map"} for m in g["members"])
