"""cut-at-feature: the default feature rule on text graphs and bundled backbones, --feature, errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import BACKBONES, parse, run_ort
from graphtext import Net

from mtc.errors import MtcError
from mtc.ir.cuts import branch_points
from mtc.ir.shapes import dims
from mtc.passes.canonicalize import Canonicalize
from mtc.passes.feature import FEATURE_KEY, CutAtFeature, find_feature
from mtc.passes.manager import PassManager, resolve

GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "AveragePool"}


def _cut(model: ir.Model, **kw) -> tuple[ir.Model, bool]:
    res = PassManager([Canonicalize(), CutAtFeature(**kw)]).run(model)
    return res.model, res.records[-1].modified


def _with_output(model: ir.Model, name: str) -> ir.Model:
    """The model with tensor ``name`` added as a graph output (to read it in onnxruntime)."""
    v = next(o for n in model.graph for o in n.outputs if o.name == name)
    model.graph.outputs.append(v)
    return model


def _check_cut_numerics(text: str, cut: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    feat = cut.metadata_props[FEATURE_KEY]
    want = run_ort(_with_output(parse(text), feat), feeds)[-1]
    (got,) = run_ort(cut, feeds)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------- the default rule
def _classifier(tail: str) -> tuple[Net, str]:
    """conv -> res -> pool -> conv(stride 2) -> res, then a classifier tail; returns the feature."""
    net = Net(hw=(16, 16))
    net.conv(4)
    net.relu()
    net.res()
    net.maxpool()
    net.conv(6, stride=2)
    net.relu()
    feat = net.res()
    if tail == "gap":
        net.gap()
        net.flatten()
        net.gemm(5)
    elif tail == "reducemean":  # the PyTorch exporters' x.mean((2, 3), keepdim=True)
        net.reducemean()
        net.flatten()
        net.gemm(5)
    elif tail == "caffe-avgpool":  # AveragePool over the whole map
        net.avgpool_full()
        net.flatten()
        net.gemm(5)
    elif tail == "vgg":  # Flatten straight from the map into the classifier
        net.flatten()
        net.gemm(5)
    elif tail == "back-to-4d":  # classifier output reshaped to (N, K, 1, 1): still after the pooling
        net.gap()
        net.flatten()
        net.gemm(5)
        net.reshape4()
    elif tail == "se":  # squeeze-and-excite keeps the map spatial: it is the feature
        feat = net.se()
    elif tail == "fcn":  # fully convolutional: the output is the feature
        feat = net.conv(3, k=1)
    return net, feat


@pytest.mark.parametrize("tail", ["gap", "reducemean", "caffe-avgpool", "vgg", "back-to-4d", "se", "fcn"])
def test_default_feature_is_the_last_map_before_pooling(tail):
    net, feat = _classifier(tail)
    text = net.text()
    model, modified = _cut(parse(text))
    assert modified
    assert model.metadata_props[FEATURE_KEY] == feat
    (out,) = model.graph.outputs
    assert out.name == feat and len(dims(out)) == 4
    # Nothing after the feature is left, nor the weights it read.
    assert not any(n.op_type in ("Gemm", "Flatten", "GlobalAveragePool") for n in model.graph) or tail == "se"
    assert not any(k.startswith("fc") for k in model.graph.initializers)
    _check_cut_numerics(text, model, net.feeds())
    # Idempotent: the feature of the cut graph is its output.
    assert not PassManager([CutAtFeature()]).run(model).modified


def test_two_outputs_share_the_feature():
    net, feat = _classifier("gap")
    logits = net.cur
    text = net.text([logits, feat])
    model, modified = _cut(parse(text))
    assert modified and [v.name for v in model.graph.outputs] == [feat]


# ---------------------------------------------------------------------------- bundled backbones
ONNX_BACKBONES = sorted(p.name for p in BACKBONES.glob("*.onnx"))
PROTOTXTS = sorted(p.name for p in BACKBONES.glob("*.prototxt"))


@pytest.mark.parametrize("name", ONNX_BACKBONES)
def test_bundled_onnx_backbones(name):
    from mtc.frontends import import_model

    src = str(BACKBONES / name)
    original = import_model(src)
    feat = find_feature(original)
    assert len(dims(feat)) == 4
    assert feat.name in branch_points(original, include_ends=True)
    # It is what the global pooling reads.
    assert any(u.node.op_type in GLOBAL_POOLS for u in feat.uses()), [u.node.op_type for u in feat.uses()]
    if name == "tiny_resnet.onnx":
        assert feat.name == "layers.7/relu_1" and dims(feat) == ("N", 48, 2, 2)
    cut, modified = _cut(import_model(src))
    assert modified
    assert [v.name for v in cut.graph.outputs] == [feat.name]
    assert not any(n.op_type in ("Gemm", "Flatten") for n in cut.graph)
    onnx.checker.check_model(ir.to_proto(cut), full_check=True)
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)}
    want = run_ort(_with_output(import_model(src), feat.name), feeds)[-1]
    np.testing.assert_array_equal(run_ort(cut, feeds)[0], want)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.skipif(
    importlib.util.find_spec("mtc.frontends.prototxt") is None, reason="the prototxt front end is not there yet"
)
@pytest.mark.parametrize("name", PROTOTXTS)
def test_bundled_prototxts_feature_is_the_spatial_output(name):
    from mtc.frontends import import_model

    model = import_model(str(BACKBONES / name))
    (out,) = model.graph.outputs
    assert len(dims(out)) == 4 and all(isinstance(d, int) and d > 1 for d in dims(out)[2:])
    n_nodes = model.graph.num_nodes()
    cut, modified = _cut(model)
    assert cut.metadata_props[FEATURE_KEY] == out.name
    assert cut.graph.outputs[0] is out and cut.graph.num_nodes() == n_nodes
    assert modified  # only the metadata was added
    assert not PassManager([CutAtFeature()]).run(cut).modified


# ---------------------------------------------------------------------------- --feature
def test_feature_override_at_an_earlier_cut_point():
    net, _ = _classifier("gap")
    text = net.text()
    early = next(name for name in net.shapes if name.startswith("pool"))  # the MaxPool output
    cut, modified = _cut(parse(text), feature=early)
    assert modified and [v.name for v in cut.graph.outputs] == [early]
    assert cut.graph.outputs[0].meta[FEATURE_KEY] == {"rank": 4, "given": True}
    assert [n.op_type for n in cut.graph] == ["Conv", "Relu", "Conv", "Relu", "Conv", "Add", "Relu", "MaxPool"]
    _check_cut_numerics(text, cut, net.feeds())
    assert not PassManager([CutAtFeature(feature=early)]).run(cut).modified


def test_flat_feature_is_allowed_and_recorded():
    net, _ = _classifier("gap")
    flat = next(name for name in net.shapes if name.startswith("flat"))
    cut, modified = _cut(parse(net.text()), feature=flat)
    assert modified and cut.graph.outputs[0].meta[FEATURE_KEY] == {"rank": 2, "given": True}


def test_unknown_feature_names_the_argument():
    net, _ = _classifier("gap")
    with pytest.raises(MtcError) as e:
        _cut(parse(net.text()), feature="nope")
    msg = str(e.value)
    assert "\n" not in msg
    assert "pass cut-at-feature: --feature 'nope': the graph has no tensor of that name" in msg
    with pytest.raises(MtcError, match=r"--feature 'relu': .*did you mean"):
        _cut(parse(net.text()), feature="relu")


def test_unknown_feature_that_is_a_node_name_points_to_its_tensor():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N,3,8,8] x) => (float[N,3,8,8] y) {
      [layer1] blob1 = Relu (x)
      [layer2] y = Sigmoid (blob1)
    }
    """)
    with pytest.raises(MtcError, match=r"--feature 'layer1': .* \(node 'layer1' outputs 'blob1'\)"):
        _cut(model, feature="layer1")


def test_feature_inside_a_residual_block_is_rejected():
    net = Net()
    net.conv(4)
    entry = net.relu()
    net.conv(4)
    inner = net.relu()  # inside the block: the skip path bypasses it
    net.conv(4)
    add = net._op("add", "Add", [net.cur, entry], net.shape)
    net.relu()
    with pytest.raises(MtcError) as e:
        _cut(parse(net.text()), feature=inner)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"node '{inner}' (Relu)" in msg and f"--feature '{inner}' [N,4,8,8] is not a cut point" in msg
    assert "residual block" in msg and "skip path" in msg
    assert f"'{entry}' before" in msg and f"'{add}' after" in msg


def test_feature_that_is_an_input_or_a_weight_is_rejected():
    net, _ = _classifier("gap")
    with pytest.raises(MtcError, match="--feature 'x' is a graph input"):
        _cut(parse(net.text()), feature="x")
    with pytest.raises(MtcError, match="--feature 'w1' is a constant"):
        _cut(parse(net.text()), feature="w1")


def test_no_spatial_tensor_at_all():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N,16] x) => (float[N,4] y) <float[4,16] w = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}> {
      h = Relu (x)
      y = Gemm <transB = 1> (h, w)
    }
    """)
    with pytest.raises(MtcError) as e:
        _cut(model)
    msg = str(e.value)
    assert msg == (
        "pass cut-at-feature: cannot find the feature map: the backbone has no rank-4 (N, C, H, W) tensor; "
        "pass --feature TENSOR to name the tensor heads should read"
    )


def test_maps_that_merge_only_after_pooling():
    # Two parallel towers from the input, merged after their global pooling: no map is on every path.
    net = Net()
    a = net.conv(4, x="x")
    pa = net._op("gap", "GlobalAveragePool", [a], ("N", 4, 1, 1))
    b = net.conv(4, x="x")
    pb = net._op("gap", "GlobalAveragePool", [b], ("N", 4, 1, 1))
    net._op("add", "Add", [pa, pb], ("N", 4, 1, 1))
    net.flatten()
    with pytest.raises(MtcError, match="no rank-4 .* before the global pooling lies on every path"):
        _cut(parse(net.text()))


def test_registered_and_repr():
    (p,) = resolve("cut-at-feature", {"cut-at-feature": {"feature": "relu5"}})
    assert repr(p) == "CutAtFeature(feature='relu5')"
    assert repr(CutAtFeature()) == "CutAtFeature(feature=None)"
    with pytest.raises(MtcError, match="--feature: expected a tensor name"):
        CutAtFeature(feature="")
