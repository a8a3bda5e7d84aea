"""Caffe prototxt front end: corpus backbones, numerics against torch/numpy, properties, diagnostics.

The oracles here never reuse the front end's shape or weight logic: shapes and parameter counts are
recomputed from the prototxt text with Caffe's formulas, and numerics are recomputed from the
returned initializers with torch.nn.functional / numpy.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtc.errors import MtcError
from mtc.frontends.prototxt import SUPPORTED_LAYERS, PrototxtWarning, load_prototxt

BACKBONES = Path(__file__).parents[2] / "backbones"
CORPUS = sorted(BACKBONES.glob("*.prototxt"))

# Parameter counts of the matching torchvision feature extractors (classifier removed): a second,
# external oracle for the three nets that have a torchvision twin.
TORCHVISION_FEATURES = {
    "mobilenetv2": 2_223_872,  # mobilenet_v2: 3,504,872 - 1280*1000 - 1000
    "mnasnet": 3_102_312,  # mnasnet1_0: 4,383,312 - 1280*1000 - 1000
    "deeplab_resnet34": 21_284_672,  # resnet34: 21,797,672 - 512*1000 - 1000
}

RUNNING_STATS = (".running_mean", ".running_var")


# ---------------------------------------------------------------------------------------- helpers


def _write(tmp_path: Path, text: str, name: str = "net.prototxt") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _load(path: Path, **kw) -> ir.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrototxtWarning)
        return load_prototxt(path, **kw)


def _proto(model: ir.Model) -> onnx.ModelProto:
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _run(model: ir.Model, feeds: dict[str, np.ndarray] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Check the model, run it in onnxruntime on ``feeds`` (random by default); outputs by name."""
    proto = _proto(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    if feeds is None:
        rs = np.random.RandomState(seed)
        feeds = {
            i.name: rs.randn(*[d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in proto.graph.input
        }
    names = [o.name for o in proto.graph.output]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _inits(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def _params(model: ir.Model) -> int:
    """The documented convention: every initializer except BatchNorm running statistics."""
    return sum(int(a.size) for n, a in _inits(model).items() if not n.endswith(RUNNING_STATS))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))


def _close(a: np.ndarray, b: np.ndarray | torch.Tensor, tol: float = 1e-4) -> None:
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol)


HEADER = 'name: "t"\ninput: "data"\ninput_shape {{ {dims} }}\n'


def _net(shape: tuple[int, ...], body: str) -> str:
    return HEADER.format(dims=" ".join(f"dim: {d}" for d in shape)) + body


# ---------------------------------------------------------- independent prototxt oracle (no protobuf)


def _parse_text(text: str) -> dict:
    """A tiny protobuf-text reader: message -> {field: [values]} (strings unquoted, numbers as text)."""
    text = re.sub(r"#[^\n]*", "", text)
    tokens = re.findall(r'"[^"]*"|[{}:]|[^\s{}:"]+', text)

    def message(i: int) -> tuple[dict, int]:
        out: dict = {}
        while i < len(tokens) and tokens[i] != "}":
            key = tokens[i]
            i += 1
            if tokens[i] == ":":
                i += 1
            if tokens[i] == "{":
                val, i = message(i + 1)
                i += 1
            else:
                val = tokens[i].strip('"')
                i += 1
            out.setdefault(key, []).append(val)
        return out, i

    return message(0)[0]


def _get(msg: dict, key: str, default):
    return msg[key][0] if key in msg else default


def _oracle(text: str, in_shape: tuple[int, ...]) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Parameter count and shape of every unconsumed top, walking the layers with Caffe's formulas.

    Covers what the corpus and the property tests use: Convolution, BatchNorm (+ Scale), ReLU,
    Pooling, Eltwise, Concat. A bottom nobody produced is the network input (the corpus quirk).
    """
    net = _parse_text(text)
    shapes: dict[str, tuple[int, ...]] = {}
    unconsumed: dict[str, None] = {}
    bn_tops: set[str] = set()
    params = 0
    for layer in net["layer"]:
        kind = layer["type"][0]
        bottoms, tops = layer.get("bottom", []), layer["top"]
        ins = [shapes.get(b, in_shape) for b in bottoms]
        for b in bottoms:
            unconsumed.pop(b, None)
        n, c, h, w = ins[0]
        if kind == "Convolution":
            cp = layer["convolution_param"][0]
            cout, k = int(cp["num_output"][0]), int(cp["kernel_size"][0])
            s, p = int(_get(cp, "stride", 1)), int(_get(cp, "pad", 0))
            d, g = int(_get(cp, "dilation", 1)), int(_get(cp, "group", 1))
            params += cout * (c // g) * k * k + (cout if _get(cp, "bias_term", "true") == "true" else 0)
            size = [(x + 2 * p - d * (k - 1) - 1) // s + 1 for x in (h, w)]
            out = (n, cout, *size)
        elif kind == "BatchNorm":
            params += 2 * c  # scale and shift (a following Scale is folded in)
            out = ins[0]
        elif kind == "Scale":
            sp = layer.get("scale_param", [{}])[0]
            if bottoms[0] not in bn_tops:
                params += c * (2 if _get(sp, "bias_term", "false") == "true" else 1)
            out = ins[0]
        elif kind == "Pooling":
            pp = layer["pooling_param"][0]
            k, s, p = int(pp["kernel_size"][0]), int(_get(pp, "stride", 1)), int(_get(pp, "pad", 0))
            rnd = math.floor if _get(pp, "round_mode", "CEIL") == "FLOOR" else math.ceil
            size = []
            for x in (h, w):
                o = rnd((x + 2 * p - k) / s) + 1
                if p and (o - 1) * s >= x + p:
                    o -= 1
                size.append(o)
            out = (n, c, *size)
        elif kind == "Concat":
            out = (n, sum(i[1] for i in ins), h, w)
        elif kind in ("ReLU", "Eltwise"):
            out = ins[0]
        else:
            raise AssertionError(f"oracle does not know {kind}")
        bn_tops.discard(tops[0])
        if kind == "BatchNorm":
            bn_tops.add(tops[0])
        shapes[tops[0]] = out
        unconsumed.pop(tops[0], None)
        unconsumed[tops[0]] = None
    return params, {t: shapes[t] for t in unconsumed}


# ------------------------------------------------------------------------------------ the schema


def test_generated_module_matches_the_schema() -> None:
    """caffe_pb2.py was regenerated after the last edit of caffe.proto (scripts/gen_caffe_pb2.sh)."""
    from mtc.frontends import caffe_pb2

    proto = (Path(caffe_pb2.__file__).parent / "caffe.proto").read_text()
    proto = re.sub(r"//[^\n]*", "", proto)
    stack: list[tuple[str, str]] = []
    fields = 0
    for line in proto.splitlines():
        if m := re.match(r"\s*(message|enum)\s+(\w+)\s*\{", line):
            stack.append((m[1], m[2]))
        elif m := re.match(r"\s*(?:optional|repeated|required)\s+[\w.]+\s+(\w+)\s*=\s*(\d+)", line):
            kind, msg = stack[-1]
            assert kind == "message"
            desc = caffe_pb2.DESCRIPTOR.message_types_by_name[msg]
            assert desc.fields_by_name[m[1]].number == int(m[2]), (msg, m[1])
            fields += 1
        if "}" in line and not line.strip().startswith(("message", "enum")):
            stack.pop()
    total = sum(len(d.fields) for d in caffe_pb2.DESCRIPTOR.message_types_by_name.values())
    assert fields == total


def test_schema_keeps_bvlc_field_numbers() -> None:
    from mtc.frontends import caffe_pb2

    bvlc = {
        "NetParameter": {"name": 1, "input": 3, "input_shape": 8, "input_dim": 4, "layer": 100},
        "LayerParameter": {
            "name": 1,
            "type": 2,
            "bottom": 3,
            "top": 4,
            "param": 6,
            "blobs": 7,
            "include": 8,
            "batch_norm_param": 139,
            "clip_param": 148,
            "concat_param": 104,
            "convolution_param": 106,
            "dropout_param": 108,
            "eltwise_param": 110,
            "flatten_param": 135,
            "inner_product_param": 117,
            "input_param": 143,
            "pooling_param": 121,
            "relu_param": 123,
            "scale_param": 142,
            "sigmoid_param": 124,
            "softmax_param": 125,
            "tanh_param": 127,
        },
        "ConvolutionParameter": {
            "num_output": 1,
            "bias_term": 2,
            "pad": 3,
            "kernel_size": 4,
            "group": 5,
            "stride": 6,
            "weight_filler": 7,
            "bias_filler": 8,
            "pad_h": 9,
            "pad_w": 10,
            "kernel_h": 11,
            "kernel_w": 12,
            "stride_h": 13,
            "stride_w": 14,
            "engine": 15,
            "axis": 16,
            "force_nd_im2col": 17,
            "dilation": 18,
        },
        "PoolingParameter": {
            "pool": 1,
            "kernel_size": 2,
            "stride": 3,
            "pad": 4,
            "kernel_h": 5,
            "kernel_w": 6,
            "stride_h": 7,
            "stride_w": 8,
            "pad_h": 9,
            "pad_w": 10,
            "engine": 11,
            "global_pooling": 12,
            "round_mode": 13,
        },
        "BatchNormParameter": {"use_global_stats": 1, "moving_average_fraction": 2, "eps": 3},
        "FillerParameter": {
            "type": 1,
            "value": 2,
            "min": 3,
            "max": 4,
            "mean": 5,
            "std": 6,
            "sparse": 7,
            "variance_norm": 8,
        },
    }
    for msg, want in bvlc.items():
        desc = caffe_pb2.DESCRIPTOR.message_types_by_name[msg]
        assert {f: desc.fields_by_name[f].number for f in want} == want


# ------------------------------------------------------------------------------------ the corpus


def _declared_shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in re.findall(r"^input_dim:\s*(\d+)", text, flags=re.M))


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_backbone(path: Path) -> None:
    text = path.read_text()
    declared = _declared_shape(text)
    assert len(declared) == 4
    shape = (1, *declared[1:])
    with pytest.warns(PrototxtWarning, match="binding 'data' to input 'blob1'"):
        model = load_prototxt(path, input_shape=shape)

    proto = _proto(model)
    assert [i.name for i in proto.graph.input] == ["blob1"]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == list(shape)
    assert proto.opset_import[0].version == 18

    want_params, want_outputs = _oracle(text, shape)
    assert _params(model) == want_params
    if path.stem in TORCHVISION_FEATURES:
        assert want_params == TORCHVISION_FEATURES[path.stem]

    outs = _run(model)
    assert {k: v.shape for k, v in outs.items()} == want_outputs
    for v in outs.values():
        assert np.isfinite(v).all()

    layer_names = re.findall(r'^\s*name:\s*"([^"]+)"', text.split("layer {", 1)[1], flags=re.M)
    nodes = list(model.graph)
    assert len({n.name for n in nodes}) == len(nodes)
    assert {n.metadata_props["mtc.origin"] for n in nodes} == set(layer_names)
    for a in _inits(model).values():
        assert a.dtype == np.float32


def test_corpus_declared_batch_is_kept() -> None:
    with pytest.warns(PrototxtWarning):
        model = load_prototxt(BACKBONES / "mnasnet.prototxt")
    assert model.graph.inputs[0].shape.numpy() == (10, 3, 224, 224)


def test_conversion_is_deterministic() -> None:
    path = BACKBONES / "mobilenetv2.prototxt"
    with pytest.warns(PrototxtWarning):
        a = ir.to_proto(load_prototxt(path, seed=3)).SerializeToString()
    with pytest.warns(PrototxtWarning):
        b = ir.to_proto(load_prototxt(path, seed=3)).SerializeToString()
    with pytest.warns(PrototxtWarning):
        c = load_prototxt(path, seed=4)
    assert a == b
    other = _inits(c)["conv1.weight"]
    same = {i.name: i for i in onnx.load_from_string(a).graph.initializer}["conv1.weight"]
    assert not np.array_equal(onnx.numpy_helper.to_array(same), other)


# -------------------------------------------------------------------------- numerics: small nets


def test_conv_bn_scale_relu_in_place_folds(tmp_path: Path) -> None:
    body = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { eps: 0.001 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 2 }
    bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
"""
    model = _load(_write(tmp_path, _net((2, 3, 9, 9), body)))
    ops = [(n.op_type, n.name) for n in model.graph]
    assert ops == [("Conv", "conv1"), ("BatchNormalization", "bn1"), ("Relu", "relu1")]
    bn = [n for n in model.graph if n.op_type == "BatchNormalization"][0]
    assert bn.metadata_props["mtc.folded"] == "scale1"
    w = _inits(model)
    assert set(w) == {
        "conv1.weight",
        "conv1.bias",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
    }
    assert (w["bn1.weight"] >= 0.5).all() and (w["bn1.weight"] <= 2).all()
    x = np.random.RandomState(1).randn(2, 3, 9, 9).astype(np.float32)
    out = _run(model, {"data": x})
    assert list(out) == ["conv1"]  # the final version keeps the blob's name
    ref = F.conv2d(_t(x), _t(w["conv1.weight"]), _t(w["conv1.bias"]), stride=2, padding=1)
    ref = F.batch_norm(
        ref,
        _t(w["bn1.running_mean"]),
        _t(w["bn1.running_var"]),
        _t(w["bn1.weight"]),
        _t(w["bn1.bias"]),
        eps=1e-3,
    )
    _close(out["conv1"], F.relu(ref))


def test_bn_alone_is_identity_affine_and_scale_alone_broadcasts(tmp_path: Path) -> None:
    body = """
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "b" }
layer { name: "sc" type: "Scale" bottom: "b" top: "s" scale_param { bias_term: true
  filler { type: "uniform" min: 1 max: 3 } bias_filler { type: "constant" value: 0.25 } } }
layer { name: "other" type: "ReLU" bottom: "b" top: "r" }
"""
    model = _load(_write(tmp_path, _net((1, 3, 4, 4), body)))
    w = _inits(model)
    np.testing.assert_array_equal(w["bn.weight"], np.ones(3, np.float32))
    np.testing.assert_array_equal(w["bn.bias"], np.zeros(3, np.float32))
    assert w["sc.weight"].shape == (3, 1, 1) and w["sc.bias"].shape == (3, 1, 1)
    assert [n.name for n in model.graph] == ["bn", "sc", "sc/bias", "other"]
    x = np.random.RandomState(2).randn(1, 3, 4, 4).astype(np.float32)
    out = _run(model, {"data": x})
    bn = x / np.sqrt(1 + 1e-5)
    _close(out["s"], bn * w["sc.weight"] + 0.25)
    _close(out["r"], np.maximum(bn, 0))


def test_eltwise_sum_coeff_prod_max(tmp_path: Path) -> None:
    text = """name: "e"
layer { name: "in" type: "Input" top: "a" top: "b" top: "c"
  input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "sum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 } }
layer { name: "prod" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "prod"
  eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "max"
  eltwise_param { operation: MAX } }
layer { name: "plain" type: "Eltwise" bottom: "a" bottom: "b" top: "plain" }
"""
    model = _load(_write(tmp_path, text))
    rs = np.random.RandomState(3)
    a, b, c = (rs.randn(2, 3, 4, 5).astype(np.float32) for _ in range(3))
    out = _run(model, {"a": a, "b": b, "c": c})
    _close(out["sum"], 0.5 * a - 2 * b + c)
    _close(out["prod"], a * b * c)
    _close(out["max"], np.maximum(np.maximum(a, b), c))
    _close(out["plain"], a + b)
    assert _params(model) == 0
    names = [n.name for n in model.graph]
    assert len(set(names)) == len(names) and "sum" in names and "plain" in names


def _caffe_pool(x: np.ndarray, k, s, p, ceil: bool, ave: bool) -> np.ndarray:
    """Caffe's pooling loops (pooling_layer.cpp); k, s, p are ints or (h, w) pairs."""
    k, s, p = ((v, v) if isinstance(v, int) else v for v in (k, s, p))
    size = x.shape[-2:]
    out = []
    for ax in range(2):
        o = (math.ceil if ceil else math.floor)((size[ax] + 2 * p[ax] - k[ax]) / s[ax]) + 1
        if p[ax] and (o - 1) * s[ax] >= size[ax] + p[ax]:
            o -= 1
        out.append(o)
    y = np.zeros(x.shape[:2] + tuple(out), np.float32)
    for i in range(out[0]):
        for j in range(out[1]):
            hs, ws = i * s[0] - p[0], j * s[1] - p[1]
            he, we = min(hs + k[0], size[0] + p[0]), min(ws + k[1], size[1] + p[1])
            area = (he - hs) * (we - ws)
            win = x[..., max(hs, 0) : min(he, size[0]), max(ws, 0) : min(we, size[1])]
            y[..., i, j] = win.sum(axis=(-1, -2)) / area if ave else win.max(axis=(-1, -2))
    return y


@pytest.mark.parametrize(
    "size,k,s,p,mode,want",
    [
        (7, 2, 2, 0, "CEIL", 4),  # ceil(5/2)+1
        (7, 2, 2, 0, "FLOOR", 3),  # floor(5/2)+1
        (6, 3, 2, 1, "CEIL", 4),  # ceil(5/2)+1, last window starts at 6-1=5 < 6: kept
        (6, 3, 2, 1, "FLOOR", 3),
        (3, 2, 2, 1, "CEIL", 2),  # ceil(3/2)+1 = 3, but window 3 starts at 4-1=3 >= 3: clipped to 2
        (3, 2, 2, 1, None, 2),  # Caffe's default rounding is CEIL
        (10, 3, 3, 0, "CEIL", 4),  # ceil(7/3)+1
        (10, 3, 3, 0, "FLOOR", 3),
    ],
)
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_pooling_rounding(
    tmp_path: Path, size: int, k: int, s: int, p: int, mode: str | None, want: int, pool: str
) -> None:
    rm = f"round_mode: {mode}" if mode else ""
    body = f"""layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"
  pooling_param {{ pool: {pool} kernel_size: {k} stride: {s} pad: {p} {rm} }} }}"""
    model = _load(_write(tmp_path, _net((1, 2, size, size), body)))
    x = np.random.RandomState(size + k).randn(1, 2, size, size).astype(np.float32)
    out = _run(model, {"data": x})["pool"]
    assert out.shape == (1, 2, want, want)
    ref = _caffe_pool(x, k, s, p, ceil=mode != "FLOOR", ave=pool == "AVE")
    _close(out, ref)
    if pool == "AVE":
        tref = F.avg_pool2d(_t(x), k, s, p, ceil_mode=mode != "FLOOR", count_include_pad=True)
        _close(out, tref)


@pytest.mark.parametrize(
    "hw,params,want",
    [
        # Same window on both axes, but H takes the ceil size and W is clipped back to the floor size.
        ((3, 5), "kernel_size: 3 stride: 3 pad: 1", (2, 2)),
        ((9, 8), "kernel_size: 3 stride: 3 pad: 1", (4, 3)),
        ((6, 3), "kernel_h: 3 kernel_w: 2 stride: 2 pad: 1", (4, 2)),
        ((7, 5), "kernel_h: 2 kernel_w: 4 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 2", (4, 3)),
    ],
)
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_pooling_mixed_rounding_axes(
    tmp_path: Path, hw: tuple[int, int], params: str, want: tuple[int, int], pool: str
) -> None:
    body = f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param {{ pool: {pool} {params} }} }}'
    model = _load(_write(tmp_path, _net((1, 2, *hw), body)))
    x = np.random.RandomState(sum(hw)).randn(1, 2, *hw).astype(np.float32)
    out = _run(model, {"data": x})["pool"]
    assert out.shape == (1, 2, *want)
    vals = {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", params)}
    k = (vals.get("kernel_h", vals.get("kernel_size")), vals.get("kernel_w", vals.get("kernel_size")))
    s = (vals.get("stride_h", vals.get("stride")), vals.get("stride_w", vals.get("stride")))
    p = (vals.get("pad_h", vals.get("pad")), vals.get("pad_w", vals.get("pad")))
    _close(out, _caffe_pool(x, k, s, p, ceil=True, ave=pool == "AVE"))
    # No single ceil_mode fits both axes: floor mode with extra end padding (and, for averages, an
    # explicit Pad so that the divisor ignores that extra padding).
    ops = [n.op_type for n in model.graph]
    assert ops == (["MaxPool"] if pool == "MAX" else ["Constant", "Pad", "AveragePool"])


def test_pooling_matches_caffe_exhaustively(tmp_path: Path) -> None:
    """Every kernel 1-4, stride 1-4, pad 0-2, MAX and AVE, on every input from 1x1 to 7x7."""
    for h, w in itertools.product(range(1, 8), repeat=2):
        layers = []
        for k, s, p, pool in itertools.product(range(1, 5), range(1, 5), range(3), ["MAX", "AVE"]):
            if p >= k or min(h, w) + 2 * p < k or (not p and s > k):
                continue  # Caffe refuses pad >= kernel; stride > kernel without pad: tested apart
            layers.append(
                f'layer {{ name: "{pool}_{k}_{s}_{p}" type: "Pooling" bottom: "data" top: "{pool}_{k}_{s}_{p}" '
                f"pooling_param {{ pool: {pool} kernel_size: {k} stride: {s} pad: {p} }} }}"
            )
        if not layers:
            continue
        model = _load(_write(tmp_path, _net((1, 2, h, w), "\n".join(layers))))
        x = np.random.RandomState(h * 10 + w).randn(1, 2, h, w).astype(np.float32)
        for name, y in _run(model, {"data": x}).items():
            pool, k, s, p = name.split("_")
            ref = _caffe_pool(x, int(k), int(s), int(p), ceil=True, ave=pool == "AVE")
            assert y.shape == ref.shape, name
            _close(y, ref)


def test_pooling_empty_caffe_window_is_dropped_with_warning(tmp_path: Path) -> None:
    body = """layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
  pooling_param { pool: MAX kernel_size: 1 stride: 3 } }"""
    with pytest.warns(PrototxtWarning, match="empty pooling window"):
        model = load_prototxt(_write(tmp_path, _net((1, 1, 5, 5), body)))
    assert _run(model)["pool"].shape == (1, 1, 2, 2)


def test_global_pooling(tmp_path: Path) -> None:
    body = """layer { name: "gap" type: "Pooling" bottom: "data" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gmp" type: "Pooling" bottom: "data" top: "gmp" pooling_param { pool: MAX global_pooling: true } }"""
    model = _load(_write(tmp_path, _net((2, 3, 5, 6), body)))
    x = np.random.RandomState(4).randn(2, 3, 5, 6).astype(np.float32)
    out = _run(model, {"data": x})
    _close(out["gap"], x.mean(axis=(2, 3), keepdims=True))
    _close(out["gmp"], x.max(axis=(2, 3), keepdims=True))


@pytest.mark.parametrize(
    "group,dilation,stride,pad,kh,kw",
    [(1, 1, 1, 0, 1, 1), (2, 2, 1, 2, 3, 3), (4, 1, 2, 1, 3, 3), (1, 3, 2, 0, 2, 3)],
)
def test_grouped_dilated_conv(
    tmp_path: Path, group: int, dilation: int, stride: int, pad: int, kh: int, kw: int
) -> None:
    body = f"""layer {{ name: "c" type: "Convolution" bottom: "data" top: "c"
  convolution_param {{ num_output: 8 group: {group} dilation: {dilation} stride: {stride} pad: {pad}
    kernel_h: {kh} kernel_w: {kw} weight_filler {{ type: "msra" }} bias_filler {{ type: "constant" value: 0.1 }} }} }}"""
    model = _load(_write(tmp_path, _net((2, 4, 11, 10), body)))
    w = _inits(model)
    assert w["c.weight"].shape == (8, 4 // group, kh, kw)
    np.testing.assert_array_equal(w["c.bias"], np.full(8, 0.1, np.float32))
    x = np.random.RandomState(5).randn(2, 4, 11, 10).astype(np.float32)
    ref = F.conv2d(
        _t(x), _t(w["c.weight"]), _t(w["c.bias"]), stride=stride, padding=pad, dilation=dilation, groups=group
    )
    _close(_run(model, {"data": x})["c"], ref)


def test_deconvolution(tmp_path: Path) -> None:
    body = """layer { name: "up" type: "Deconvolution" bottom: "data" top: "up"
  convolution_param { num_output: 6 group: 2 kernel_size: 4 stride: 2 pad: 1 dilation: 1
    weight_filler { type: "bilinear" } bias_term: true bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "up2" type: "Deconvolution" bottom: "data" top: "up2"
  convolution_param { num_output: 3 kernel_size: 3 stride: 3 dilation: 2 bias_term: false
    weight_filler { type: "xavier" } } }"""
    model = _load(_write(tmp_path, _net((1, 4, 5, 7), body)))
    w = _inits(model)
    assert w["up.weight"].shape == (4, 3, 4, 4)  # Caffe's (C_in, C_out / group, k, k)
    # The bilinear filler is 0.25 * (1, 3, 3, 1) x (1, 3, 3, 1) / 4 for a 4-tap kernel.
    taps = np.array([0.25, 0.75, 0.75, 0.25], np.float32)
    np.testing.assert_allclose(w["up.weight"][0, 0], np.outer(taps, taps), rtol=1e-6)
    x = np.random.RandomState(6).randn(1, 4, 5, 7).astype(np.float32)
    out = _run(model, {"data": x})
    _close(
        out["up"],
        F.conv_transpose2d(_t(x), _t(w["up.weight"]), _t(w["up.bias"]), stride=2, padding=1, groups=2),
    )
    _close(out["up2"], F.conv_transpose2d(_t(x), _t(w["up2.weight"]), None, stride=3, dilation=2))
    assert out["up"].shape == (1, 6, 10, 14)
    assert out["up2"].shape == (1, 3, 3 * 4 + 2 * 2 + 1, 3 * 6 + 2 * 2 + 1)


def test_inner_product_concat_softmax_flatten(tmp_path: Path) -> None:
    body = """
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "cat" type: "Concat" bottom: "data" bottom: "c1" top: "cat" }
layer { name: "cat0" type: "Concat" bottom: "data" bottom: "data" top: "cat0" concat_param { concat_dim: 0 } }
layer { name: "fc" type: "InnerProduct" bottom: "cat" top: "fc" inner_product_param { num_output: 7
  weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 1 } } }
layer { name: "fct" type: "InnerProduct" bottom: "fc" top: "fct"
  inner_product_param { num_output: 3 transpose: true bias_term: false } }
layer { name: "prob" type: "Softmax" bottom: "fct" top: "prob" }
layer { name: "flat" type: "Flatten" bottom: "cat" top: "flat" flatten_param { axis: 2 } }
"""
    model = _load(_write(tmp_path, _net((2, 3, 4, 5), body)))
    w = _inits(model)
    assert w["fc.weight"].shape == (7, 5 * 4 * 5) and w["fct.weight"].shape == (7, 3)
    x = np.random.RandomState(7).randn(2, 3, 4, 5).astype(np.float32)
    out = _run(model, {"data": x})
    c1 = F.conv2d(_t(x), _t(w["c1.weight"]), _t(w["c1.bias"])).numpy()
    cat = np.concatenate([x, c1], axis=1)
    fc = cat.reshape(2, -1) @ w["fc.weight"].T + w["fc.bias"]
    fct = fc @ w["fct.weight"]
    _close(out["cat0"], np.concatenate([x, x], axis=0))
    _close(out["prob"], torch.softmax(_t(fct), dim=1))
    _close(out["flat"], cat.reshape(2, 5, 20))
    assert _params(model) == 2 * 3 + 2 + 7 * 100 + 7 + 7 * 3


def test_activations_dropout_resize(tmp_path: Path) -> None:
    body = """
layer { name: "leaky" type: "ReLU" bottom: "data" top: "leaky" relu_param { negative_slope: 0.1 } }
layer { name: "r6" type: "ReLU6" bottom: "data" top: "r6" }
layer { name: "clip" type: "Clip" bottom: "data" top: "clip" clip_param { min: -0.5 max: 0.25 } }
layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }
layer { name: "drop" type: "Dropout" bottom: "sig" top: "sig" dropout_param { dropout_ratio: 0.3 } }
layer { name: "drop2" type: "Dropout" bottom: "sig" top: "kept" }
layer { name: "zoom" type: "Interp" bottom: "data" top: "zoom" interp_param { zoom_factor: 3 } }
layer { name: "fixed" type: "Interp" bottom: "data" top: "fixed" interp_param { height: 7 width: 9 } }
layer { name: "up" type: "Upsample" bottom: "data" top: "up" upsample_param { scale: 2 } }
"""
    model = _load(_write(tmp_path, _net((1, 2, 4, 5), body)))
    x = (np.random.RandomState(8).randn(1, 2, 4, 5) * 3).astype(np.float32)
    out = _run(model, {"data": x})
    xt = _t(x)
    _close(out["leaky"], F.leaky_relu(xt, 0.1))
    _close(out["r6"], np.clip(x, 0, 6))
    _close(out["clip"], np.clip(x, -0.5, 0.25))
    _close(out["tanh"], np.tanh(x))
    _close(out["kept"], torch.sigmoid(xt))
    assert "sig" not in out  # consumed by drop2
    _close(out["zoom"], F.interpolate(xt, size=(10, 13), mode="bilinear", align_corners=True))
    _close(out["fixed"], F.interpolate(xt, size=(7, 9), mode="bilinear", align_corners=True))
    _close(out["up"], F.interpolate(xt, scale_factor=2, mode="nearest"))
    ops = {n.name: n.op_type for n in model.graph}
    # A Dropout is the identity: dropped, unless its top is a net output ("kept").
    assert ops["drop2"] == "Identity" and "drop" not in ops
    assert all(n.metadata_props.get("mtc.origin") for n in model.graph)


def test_in_place_on_the_input_keeps_the_input_name(tmp_path: Path) -> None:
    body = 'layer { name: "bn0" type: "BatchNorm" bottom: "data" top: "data" }\n'
    model = _load(_write(tmp_path, _net((1, 2, 3, 3), body)))
    assert [v.name for v in model.graph.inputs] == ["data"]
    assert [v.name for v in model.graph.outputs] == ["data/bn0"]


def test_blobs_in_the_text_are_ignored_with_a_warning(tmp_path: Path) -> None:
    body = 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" blobs { data: 1 data: 2 } }\n'
    with pytest.warns(PrototxtWarning, match="'r' carries 1 blob"):
        load_prototxt(_write(tmp_path, _net((1, 2, 3, 3), body)))


def test_phase_rules_and_input_layer_shape_override(tmp_path: Path) -> None:
    text = """name: "p"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "train_only" type: "Dropout" bottom: "c" top: "c" include { phase: TRAIN } }
layer { name: "not_test" type: "ReLU" bottom: "c" top: "c" exclude { phase: TEST } }
"""
    model = _load(_write(tmp_path, text), input_shape=(2, 3, 10, 12))
    assert [n.name for n in model.graph] == ["c"]
    assert _run(model)["c"].shape == (2, 2, 8, 10)


ALL_LAYERS = """
layer { name: "leaky" type: "ReLU" bottom: "data" top: "leaky" relu_param { negative_slope: 0.1 } }
layer { name: "r6" type: "ReLU6" bottom: "leaky" top: "r6" }
layer { name: "sig" type: "Sigmoid" bottom: "r6" top: "sig" }
layer { name: "drop" type: "Dropout" bottom: "sig" top: "kept" }
layer { name: "zoom" type: "Interp" bottom: "kept" top: "zoom" interp_param { zoom_factor: 2 } }
layer { name: "up" type: "Upsample" bottom: "zoom" top: "up" }
layer { name: "bn" type: "BatchNorm" bottom: "up" top: "bn" }
layer { name: "sc" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
layer { name: "c" type: "Convolution" bottom: "bn" top: "c" convolution_param { num_output: 4 kernel_size: 3 group: 2 } }
layer { name: "d" type: "Deconvolution" bottom: "c" top: "d" convolution_param { num_output: 4 kernel_size: 2 stride: 2 } }
layer { name: "p" type: "Pooling" bottom: "d" top: "p" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "m" type: "Pooling" bottom: "p" top: "m" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "e" type: "Eltwise" bottom: "m" bottom: "m" top: "e" eltwise_param { coeff: 2 coeff: 3 } }
layer { name: "cat" type: "Concat" bottom: "e" bottom: "m" top: "cat" }
layer { name: "fl" type: "Flatten" bottom: "cat" top: "fl" flatten_param { axis: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "fl" top: "fc" inner_product_param { num_output: 5 axis: 2 } }
layer { name: "sm" type: "Softmax" bottom: "fc" top: "sm" softmax_param { axis: -1 } }
layer { name: "t" type: "TanH" bottom: "sm" top: "t" }
layer { name: "cl" type: "Clip" bottom: "t" top: "cl" clip_param { min: 0 max: 0.5 } }
"""


@pytest.mark.parametrize("opset", [17, 18, onnx.defs.onnx_opset_version()])
def test_every_layer_type_at_each_opset(tmp_path: Path, opset: int) -> None:
    model = _load(_write(tmp_path, _net((1, 4, 6, 6), ALL_LAYERS)), opset=opset)
    proto = _proto(model)
    assert proto.opset_import[0].version == opset
    out = _run(model)
    assert out["cl"].shape == (1, 8, 5)
    used = {n.metadata_props["mtc.origin"] for n in model.graph}
    types = set(re.findall(r'type: "(\w+)"', ALL_LAYERS))
    assert types | {"Input"} == set(SUPPORTED_LAYERS)
    assert used == set(re.findall(r'name: "(\w+)"', ALL_LAYERS)) - {"drop", "sc"}  # dropped, folded


def test_constants_do_not_bake_in_the_batch(tmp_path: Path) -> None:
    """mtc's import pipeline makes the batch symbolic: Reshape/Resize constants must allow it."""
    model = _load(_write(tmp_path, _net((1, 4, 6, 6), ALL_LAYERS)))
    proto = ir.to_proto(model)
    for v in [*proto.graph.input, *proto.graph.output]:
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto, full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.RandomState(9).randn(3, 4, 6, 6).astype(np.float32)
    batched = sess.run(["cl"], {"data": x})[0]
    single = np.concatenate([_run(model, {"data": x[i : i + 1]})["cl"] for i in range(3)])
    _close(batched, single)


# ------------------------------------------------------------------------------------ fillers


def test_fillers_follow_caffe(tmp_path: Path) -> None:
    body = """
layer { name: "xav" type: "Convolution" bottom: "data" top: "xav" convolution_param { num_output: 64 kernel_size: 3
  weight_filler { type: "xavier" } } }
layer { name: "msra" type: "Convolution" bottom: "data" top: "msra" convolution_param { num_output: 256 kernel_size: 3
  weight_filler { type: "msra" variance_norm: FAN_OUT } bias_term: false } }
layer { name: "default" type: "Convolution" bottom: "data" top: "default" convolution_param { num_output: 256 kernel_size: 3
  bias_filler { type: "gaussian" mean: 5 std: 0.001 } } }
layer { name: "uni" type: "InnerProduct" bottom: "data" top: "uni" inner_product_param { num_output: 100
  weight_filler { type: "uniform" min: 2 max: 3 } } }
layer { name: "ball" type: "InnerProduct" bottom: "data" top: "ball" inner_product_param { num_output: 5
  weight_filler { type: "positive_unitball" } } }
layer { name: "sparse" type: "InnerProduct" bottom: "data" top: "sparse" inner_product_param { num_output: 300
  weight_filler { type: "gaussian" sparse: 30 } } }
"""
    model = _load(_write(tmp_path, _net((1, 16, 5, 5), body)))
    w = _inits(model)
    bound = math.sqrt(3 / (16 * 9))  # fan_in = C_in * k * k
    assert np.abs(w["xav.weight"]).max() <= bound and np.abs(w["xav.weight"]).max() > 0.9 * bound
    np.testing.assert_array_equal(w["xav.bias"], 0)  # Caffe's default bias filler: constant 0
    assert w["msra.weight"].std() == pytest.approx(
        math.sqrt(2 / (256 * 9)), rel=0.05
    )  # fan_out = C_out * k * k
    assert w["default.weight"].std() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.05)  # no filler: msra
    assert w["default.bias"].mean() == pytest.approx(5, abs=1e-3)
    assert w["uni.weight"].min() >= 2 and w["uni.weight"].max() <= 3
    np.testing.assert_allclose(w["ball.weight"].sum(axis=1), 1, rtol=1e-5)
    assert (w["ball.weight"] >= 0).all()
    assert (w["sparse.weight"] != 0).mean() == pytest.approx(0.1, abs=0.02)  # sparse / num_output


# ------------------------------------------------------------------------- property-based tests


@st.composite
def _stacks(draw):
    """A random layer stack as prototxt text, with its output shape and parameter count per Caffe."""
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(6, 14)), draw(st.integers(6, 14))
    shape = (1, c, h, w)
    if draw(st.booleans()):
        header = 'name: "h"\ninput: "data"\n' + "".join(f"input_dim: {d}\n" for d in shape)
    else:
        header = 'name: "h"\ninput: "data"\ninput_shape { ' + " ".join(f"dim: {d}" for d in shape) + " }\n"
    blobs: dict[str, tuple[int, ...]] = {"data": shape}
    cur, params, layers = "data", 0, []
    for i in range(draw(st.integers(1, 7))):
        n, c, h, w = blobs[cur]
        kind = draw(st.sampled_from(["conv", "bn", "bn_scale", "relu", "pool", "eltwise", "concat"]))
        name = f"{kind}{i}"
        in_place = draw(st.booleans()) and kind in ("bn", "bn_scale", "relu") and cur != "data"
        top = cur if in_place else name
        if kind == "conv":
            g = draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0]))
            cout = g * draw(st.integers(1, 3))
            k = draw(st.integers(1, min(3, h, w)))  # small maps stay convolvable
            d, s = draw(st.integers(1, 2)), draw(st.integers(1, 2))
            p = draw(st.integers(0, k - 1))
            span = d * (k - 1) + 1
            if min(h, w) + 2 * p < span:
                d, span = 1, k
            bias = draw(st.booleans())
            filler = draw(st.sampled_from(['type: "xavier"', 'type: "msra"', 'type: "gaussian" std: 0.2']))
            layers.append(
                f'layer {{ name: "{name}" type: "Convolution" bottom: "{cur}" top: "{top}" convolution_param {{ '
                f"num_output: {cout} kernel_size: {k} stride: {s} pad: {p} dilation: {d} group: {g} "
                f"bias_term: {str(bias).lower()} weight_filler {{ {filler} }} }} }}"
            )
            params += cout * (c // g) * k * k + (cout if bias else 0)
            out = (n, cout, (h + 2 * p - span) // s + 1, (w + 2 * p - span) // s + 1)
        elif kind in ("bn", "bn_scale"):
            layers.append(f'layer {{ name: "{name}" type: "BatchNorm" bottom: "{cur}" top: "{top}" }}')
            if kind == "bn_scale":
                bias = str(draw(st.booleans())).lower()
                layers.append(
                    f'layer {{ name: "{name}_s" type: "Scale" bottom: "{top}" top: "{top}" '
                    f"scale_param {{ bias_term: {bias} }} }}"
                )
            params += 2 * c
            out = (n, c, h, w)
        elif kind == "relu":
            slope = draw(st.sampled_from(["", "relu_param { negative_slope: 0.1 }"]))
            layers.append(f'layer {{ name: "{name}" type: "ReLU" bottom: "{cur}" top: "{top}" {slope} }}')
            out = (n, c, h, w)
        elif kind == "pool":
            k = draw(st.integers(1, min(3, h, w)))
            s, p = draw(st.integers(1, 3)), draw(st.integers(0, k - 1))
            if not p:
                s = min(s, k)  # stride > kernel without padding: Caffe's empty windows (tested apart)
            mode = draw(st.sampled_from(["", "round_mode: CEIL", "round_mode: FLOOR"]))
            pool = draw(st.sampled_from(["MAX", "AVE"]))
            layers.append(
                f'layer {{ name: "{name}" type: "Pooling" bottom: "{cur}" top: "{top}" pooling_param {{ '
                f"pool: {pool} kernel_size: {k} stride: {s} pad: {p} {mode} }} }}"
            )
            size = []
            for x in (h, w):
                o = (math.floor if "FLOOR" in mode else math.ceil)((x + 2 * p - k) / s) + 1
                if p and (o - 1) * s >= x + p:
                    o -= 1
                size.append(o)
            out = (n, c, *size)
        elif kind == "eltwise":
            same = [b for b, sh in blobs.items() if sh == (n, c, h, w)]
            other = draw(st.sampled_from(same))
            op = draw(st.sampled_from(["SUM", "PROD", "MAX", "SUM coeff: 1 coeff: -0.5"]))
            layers.append(
                f'layer {{ name: "{name}" type: "Eltwise" bottom: "{cur}" bottom: "{other}" top: "{top}" '
                f"eltwise_param {{ operation: {op} }} }}"
            )
            out = (n, c, h, w)
        else:
            same = [b for b, sh in blobs.items() if sh[2:] == (h, w)]
            other = draw(st.sampled_from(same))
            layers.append(
                f'layer {{ name: "{name}" type: "Concat" bottom: "{other}" bottom: "{cur}" top: "{top}" }}'
            )
            out = (n, c + blobs[other][1], h, w)
        blobs[top] = out
        cur = top
    return header + "\n".join(layers) + "\n", cur, blobs[cur], params


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in re.findall(r"(?:input_dim:|dim:)\s*(\d+)", text.split("layer", 1)[0]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_stacks())
def test_random_stacks(tmp_path: Path, case) -> None:
    text, out_blob, out_shape, params = case
    model = _load(_write(tmp_path, text))
    outs = _run(model)
    assert {k: v.shape for k, v in outs.items()} == {out_blob: out_shape}
    assert all(np.isfinite(v).all() for v in outs.values())
    assert _params(model) == params
    # The text oracle agrees with the generator's own bookkeeping.
    assert _oracle(text, _parse_shape(text)) == (params, {out_blob: out_shape})
    names = [n.name for n in model.graph]
    assert len(set(names)) == len(names)


# -------------------------------------------------------------------------------- diagnostics


def _error(path: Path, **kw) -> str:
    with pytest.raises(MtcError) as info:
        load_prototxt(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert path.name in msg
    return msg


CONV = 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 4 kernel_size: 7 } }\n'


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in _error(tmp_path / "nope.prototxt")


def test_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'name: "x"\ninput: "data"\nlayer {\n  name: "c"\n  type: "Convolution"\n    bogus_field: 3\n}\n',
    )
    msg = _error(path)
    assert f"{path}:6:5:" in msg and "bogus_field" in msg
    path = _write(
        tmp_path, 'name: "x"\nlayer {\n  name: "p" type: "Pooling"\n  pooling_param { pool: AVERAGE }\n}\n'
    )
    assert f"{path}:4:" in _error(path)
    path = _write(tmp_path, 'name: "x"\nlayers {\n  name: "c"\n}\n')
    assert f"{path}:2:1:" in _error(path) and "upgrade_net_proto_text" in _error(path)


def test_unknown_layer_type(tmp_path: Path) -> None:
    body = 'layer { name: "norm1" type: "LRN" bottom: "data" top: "n" }\n'
    msg = _error(_write(tmp_path, _net((1, 3, 8, 8), body)))
    assert "'norm1'" in msg and "'LRN'" in msg and ", ".join(sorted(SUPPORTED_LAYERS)) in msg


def test_undefined_bottom(tmp_path: Path) -> None:
    body = CONV + 'layer { name: "relu1" type: "ReLU" bottom: "ghost" top: "r" }\n'
    msg = _error(_write(tmp_path, _net((1, 3, 16, 16), body)))
    assert "'relu1'" in msg and "'ghost'" in msg


def test_use_before_define(tmp_path: Path) -> None:
    body = (
        'layer { name: "early" type: "ReLU" bottom: "late_top" top: "r" }\n'
        'layer { name: "late" type: "ReLU" bottom: "data" top: "late_top" }\n'
    )
    msg = _error(_write(tmp_path, _net((1, 3, 8, 8), body)))
    assert "'early'" in msg and "'late'" in msg and "late_top" in msg and "before" in msg


def test_layer_without_top(tmp_path: Path) -> None:
    body = 'layer { name: "sink" type: "ReLU" bottom: "data" }\n'
    msg = _error(_write(tmp_path, _net((1, 3, 8, 8), body)))
    assert "'sink'" in msg and "no top" in msg


@pytest.mark.parametrize(
    "shape,needle",
    [
        ((1, 3, 16), "rank 3"),
        ((1, 0, 16, 16), "input_shape"),
        ((1, 3, -2, 16), "input_shape"),
        ((), "input_shape"),
    ],
)
def test_bad_input_shape_argument(tmp_path: Path, shape: tuple[int, ...], needle: str) -> None:
    msg = _error(_write(tmp_path, _net((1, 3, 16, 16), CONV)), input_shape=shape)
    assert needle in msg and "input_shape" in msg


def test_input_shape_too_small_names_the_layer(tmp_path: Path) -> None:
    body = (
        CONV
        + 'layer { name: "pool1" type: "Pooling" bottom: "c1" top: "p" pooling_param { kernel_size: 3 } }\n'
    )
    path = _write(tmp_path, _net((1, 3, 16, 16), body))
    msg = _error(path, input_shape=(1, 3, 4, 4))
    assert "'conv1'" in msg and "too small" in msg
    msg = _error(path, input_shape=(1, 3, 8, 8))  # conv1 gives 2x2, below the 3x3 pooling window
    assert "'pool1'" in msg and "too small" in msg


def test_declared_shape_must_be_positive(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, _net((1, 3, 0, 16), CONV)))
    assert "'data'" in msg and "positive" in msg


@pytest.mark.parametrize(
    "body,needles",
    [
        (
            'layer { name: "g" type: "Convolution" bottom: "data" top: "g" convolution_param { num_output: 4 kernel_size: 1 group: 2 } }',
            ["'g'", "group 2"],
        ),
        (
            'layer { name: "k" type: "Convolution" bottom: "data" top: "k" convolution_param { num_output: 4 } }',
            ["'k'", "kernel_size is required"],
        ),
        (
            'layer { name: "f" type: "Convolution" bottom: "data" top: "f" convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "magic" } } }',
            ["'f'", "'magic'", "xavier"],
        ),
        (
            'layer { name: "e" type: "Eltwise" bottom: "data" bottom: "data" top: "e" eltwise_param { operation: MAX coeff: 1 coeff: 2 } }',
            ["'e'", "SUM"],
        ),
        (
            'layer { name: "s" type: "Pooling" bottom: "data" top: "s" pooling_param { pool: STOCHASTIC kernel_size: 2 } }',
            ["'s'", "STOCHASTIC"],
        ),
        (
            'layer { name: "pp" type: "Pooling" bottom: "data" top: "pp" pooling_param { kernel_size: 2 pad: 2 } }',
            ["'pp'", "smaller than the kernel"],
        ),
        (
            'layer { name: "cl" type: "Clip" bottom: "data" top: "cl" clip_param { min: 0 } }',
            ["'cl'", "min and max"],
        ),
        ('layer { name: "one" type: "Eltwise" bottom: "data" top: "one" }', ["'one'", "at least 2"]),
        (
            'layer { name: "cat" type: "Concat" bottom: "data" bottom: "x" top: "cat" }\n'
            'layer { name: "x" type: "Pooling" bottom: "data" top: "x" pooling_param { kernel_size: 2 stride: 2 } }',
            ["'cat'", "'x'", "before"],
        ),
    ],
)
def test_bad_layer_parameters(tmp_path: Path, body: str, needles: list[str]) -> None:
    msg = _error(_write(tmp_path, _net((1, 3, 8, 8), body + "\n")))
    for needle in needles:
        assert needle in msg


def test_shape_mismatches(tmp_path: Path) -> None:
    pool = 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { kernel_size: 2 stride: 2 } }\n'
    msg = _error(
        _write(
            tmp_path,
            _net(
                (1, 3, 8, 8),
                pool + 'layer { name: "add" type: "Eltwise" bottom: "data" bottom: "p" top: "a" }\n',
            ),
        )
    )
    assert "'add'" in msg and "(1, 3, 4, 4)" in msg
    msg = _error(
        _write(
            tmp_path,
            _net(
                (1, 3, 8, 8),
                pool + 'layer { name: "cat" type: "Concat" bottom: "data" bottom: "p" top: "c" }\n',
            ),
        )
    )
    assert "'cat'" in msg and "(1, 3, 8, 8)" in msg


def test_bad_arguments(tmp_path: Path) -> None:
    path = _write(tmp_path, _net((1, 3, 16, 16), CONV))
    assert "seed" in _error(path, seed=-1)
    assert "opset" in _error(path, opset=9)


# -------------------------------------------------------------------------- the input-name quirk


QUIRK = 'name: "q"\ninput: "blob1"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 16\ninput_dim: 16\n'


def test_declared_input_under_another_name_warns_and_imports(tmp_path: Path) -> None:
    path = _write(tmp_path, QUIRK + CONV + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    with pytest.warns(PrototxtWarning, match=r"'conv1'.*'data'.*'blob1'") as rec:
        model = load_prototxt(path)
    assert len(rec) == 1 and path.name in str(rec[0].message)
    assert [v.name for v in model.graph.inputs] == ["blob1"]
    outs = _run(model)
    assert outs["c1"].shape == (1, 4, 10, 10) and outs["r"].shape == (1, 3, 16, 16)


def test_quirk_does_not_bind_a_second_unknown_blob(tmp_path: Path) -> None:
    body = CONV + 'layer { name: "r" type: "ReLU" bottom: "other" top: "r" }\n'
    with pytest.warns(PrototxtWarning):
        msg = _error(_write(tmp_path, QUIRK + body))
    assert "'r'" in msg and "'other'" in msg


def test_quirk_needs_an_unused_declared_input(tmp_path: Path) -> None:
    body = CONV + 'layer { name: "r" type: "ReLU" bottom: "blob1" top: "r" }\n'
    msg = _error(_write(tmp_path, QUIRK + body))
    assert "'conv1'" in msg and "'data'" in msg
