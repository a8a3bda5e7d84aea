"""The interpreter itself: the execution plan, parameters and buffers, folding, the registry's hooks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from mtc.lower import BuildNode, lower, register_op, supported_ops
from mtc.lower import registry as reg
from mtc.lower.reference import export_reference
from mtc.lower.verify import run_onnxruntime

CNN_OPS = """Conv ConvTranspose BatchNormalization Relu LeakyRelu Clip Sigmoid HardSigmoid HardSwish Tanh Erf Add
Sub Mul Div Pow Sqrt MaxPool AveragePool GlobalAveragePool GlobalMaxPool ReduceMean Gemm MatMul Flatten Reshape
Transpose Concat Split Slice Gather Squeeze Unsqueeze Resize Pad Softmax LayerNormalization Dropout Identity""".split()


def parse(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def test_registry_covers_the_cnn_ops() -> None:
    ops = set(supported_ops())
    assert not [op for op in CNN_OPS if op not in ops]
    assert supported_ops() == sorted(supported_ops())


def test_plan_frees_every_intermediate_once() -> None:
    _, model = export_reference("tiny_densenet", "torchscript")
    module = lower(model)
    produced = []
    freed = []
    for _fn, _ins, out, free in module._steps:
        produced += [out] if isinstance(out, int) else list(out)
        freed += list(free)
    assert len(freed) == len(set(freed))
    state = {s for s, _ in module._param_slots} | {s for s, _ in module._buffer_slots}
    assert not state & set(freed)
    # Everything but the graph output is dropped after its last use (the input included).
    assert set(produced) - set(module._output_slots) <= set(freed)
    assert set(module._input_slots) <= set(freed)
    for k, (_fn, _ins, _out, free) in enumerate(module._steps):
        later_reads = {s for _f, ins, _o, _fr in module._steps[k + 1:] for s in ins}
        assert not set(free) & later_reads


def test_shape_arithmetic_is_folded_at_build_time() -> None:
    _, model = export_reference("channel_shuffle", "torchscript")
    ops = {n.op_type for n in model.graph}
    assert {"Shape", "Gather", "Unsqueeze", "Concat"} <= ops  # the exporter left shape arithmetic in
    module = lower(model)
    run = [label for _, label in module._node_labels]
    assert not {"Shape", "Gather", "Unsqueeze", "Constant"} & set(run)
    assert run.count("Concat") == 2  # the two channel concats, not the shape concats


def test_parameters_buffers_and_constants() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[1,2,5,5] x) => (float[1,1,5,5] y)
        <float[1,2,3,3] conv_w = {0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9},
         float[1] conv_b = {0.5}, float[1] slope = {0.25}, float half = {0.5},
         float[1] bn_scale = {1.5}, float[1] bn_bias = {0.1}, float[1] bn_mean = {0.2}, float[1] bn_var = {2.0}> {
            c = Conv<pads = [1, 1, 1, 1]>(x, conv_w, conv_b)
            b = BatchNormalization(c, bn_scale, bn_bias, bn_mean, bn_var)
            p = PRelu(b, slope)
            y = Mul(p, half)
        }
    """)
    module = lower(model)
    params = dict(module.named_parameters())
    # One-element weights that an op marks as weights (a 1-channel bias, a PReLU slope) train;
    # a scalar literal in arithmetic does not.
    assert set(params) == {"conv_w", "conv_b", "slope", "bn_scale", "bn_bias"}
    assert set(module.state_dict()) == set(params) | {"bn_mean", "bn_var"}
    assert set(module.named_initializers()) == set(module.state_dict())
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, run_onnxruntime(model, [x])[0], rtol=1e-5, atol=1e-6)


def test_names_are_sanitised_and_mapped_back() -> None:
    module, model = export_reference("dense", "torchscript")
    lowered = lower(model)
    assert "block_layers_0_bn_running_mean" in dict(lowered.named_buffers())
    assert lowered.initializer_names["stem_0_0_weight"] == "stem.0.0.weight"
    expected = {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(lowered.named_initializers()) == expected


def test_initializer_listed_as_input_is_not_an_input() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1.0, 2.0}> {
            y = Mul(x, w)
        }
    """)
    module = lower(model)
    assert module.input_names == ["x"]
    assert module(torch.ones(2))[0].tolist() == [1.0, 2.0]


def test_custom_domain_op_through_the_registry() -> None:
    """What later ops (ai.mtc task gates) need: attributes, constants, own parameters, the training flag."""
    seen: dict[str, object] = {}

    @register_op("ScaleGate", domain="ai.mtc.test")
    def _gate(node: BuildNode):
        seen["attr"] = node.attr("width")
        seen["const"] = node.const(1).tolist()
        node.add_parameter("logit", torch.zeros(1))
        module = node.module

        def gate(x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(logit) * (2.0 if module.training else 1.0)

        return gate

    try:
        model = parse("""
            <ir_version: 8, opset_import: ["" : 18, "ai.mtc.test" : 1]>
            g (float[3] x) => (float[3] y) {
                k = Constant<value = int64[2] {4, 5}>()
                y = ai.mtc.test.ScaleGate<width = 7>(x, k)
            }
        """)
        assert "ai.mtc.test::ScaleGate" in supported_ops()
        module = lower(model)
        assert seen == {"attr": 7, "const": [4, 5]}
        (name,) = [k for k, _ in module.named_parameters()]
        assert "logit" in name
        x = torch.ones(3)
        assert module.eval()(x)[0].tolist() == [0.5] * 3
        out = module.train()(x)[0]
        assert out.tolist() == [1.0] * 3
        out.sum().backward()
        assert getattr(module, name).grad is not None
    finally:
        del reg._REGISTRY[("ai.mtc.test", "ScaleGate")]


def test_opset_versions_pick_the_right_builder() -> None:
    # Clip took min/max as attributes before opset 11.
    old = parse("""
        <ir_version: 6, opset_import: ["" : 6]>
        g (float[4] x) => (float[4] y) { y = Clip<min = -1.0, max = 1.0>(x) }
    """)
    assert lower(old)(torch.tensor([-3.0, -0.5, 0.5, 3.0]))[0].tolist() == [-1.0, -0.5, 0.5, 1.0]
    assert reg.lookup("Clip", "", 6).since_version == 1
    assert reg.lookup("Clip", "", 18).since_version == 11


def test_gelu_and_linear_are_fused_and_still_exact() -> None:
    module, model = export_reference("layernorm_gelu", "dynamo-bn")
    lowered = lower(model)
    labels = [label for _, label in lowered._node_labels]
    assert any(label.startswith("Gelu, fused") for label in labels)
    assert sum(label.startswith("Linear, fused") for label in labels) == 2
    assert not {"Erf", "MatMul"} & set(labels)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lowered.eval()(x)[0], module(x), rtol=1e-5, atol=1e-6)


def test_device_argument_and_move() -> None:
    _, model = export_reference("decoder", "torchscript")
    module = lower(model, device="cpu").double()
    assert all(p.dtype == torch.float64 for p in module.parameters())
    out = module.eval()(torch.randn(1, 3, 32, 32, dtype=torch.float64))[0]
    assert out.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_parity() -> None:
    from mtc.lower.verify import verify

    _, model = export_reference("tiny_mobilenetv2", "dynamo-bn")
    assert verify(model, device="cuda").ok
