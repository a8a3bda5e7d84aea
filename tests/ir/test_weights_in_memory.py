"""Weights on their way into the IR and into a lowered module: checked without serialising them,
drawn once, and nothing left resident that the module does not hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mtc.errors import MtcError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("channels", [4, 64])  # 108 values: checked by onnx; 1,728: by mtc
def test_a_weight_whose_data_does_not_fill_its_shape_is_one_error_naming_it(tmp_path, channels):
    from mtc.frontends import import_model

    w = numpy_helper.from_array(np.ones((channels, 3, 3, 3), np.float32), "conv.w")
    w.raw_data = w.raw_data[:100]
    g = helper.make_graph([helper.make_node("Conv", ["x", "conv.w"], ["y"], pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(MtcError, match="conv.w") as e:
        import_model(str(path))
    assert "not valid ONNX" in str(e.value) and "\n" not in str(e.value)


def test_the_weightless_check_accepts_what_the_full_check_accepts():
    from mtc.frontends import import_model
    from mtc.ir.shapes import check_model

    model = import_model(str(ROOT / "backbones" / "tiny_resnet.onnx"))
    check_model(model)  # what import ran
    import onnx_ir as ir

    onnx.checker.check_model(ir.to_proto(model), full_check=True)  # the oracle: onnx on every byte


@pytest.mark.filterwarnings("ignore::UserWarning")  # the file binds 'data' to its declared input
def test_prototxt_weights_are_in_memory_arrays_with_the_documented_distributions():
    from mtc.frontends import import_model
    from mtc.ir.seeded import DrawnTensor

    model = import_model(str(ROOT / "backbones" / "deeplab_resnet34.prototxt"))
    w = model.graph.initializers["conv1.weight"].const_value
    # drawn into memory when first read (not a proto's bytes), and not read by the import itself
    assert isinstance(w, DrawnTensor) and not w.drawn
    a = w.numpy()
    assert w.drawn and a.dtype == np.float32 and a.flags.writeable
    fan_in = a[0].size
    bound = np.sqrt(3.0 / fan_in)  # the file's xavier filler
    assert np.abs(a).max() <= bound * (1 + 1e-6) and a.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
    again = import_model(str(ROOT / "backbones" / "deeplab_resnet34.prototxt"))
    np.testing.assert_array_equal(again.graph.initializers["conv1.weight"].const_value.numpy(), a)


CONV_PROTOTXT = """
name: "one"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 16 kernel_size: 3 pad: 1 bias_term: %s
    weight_filler { type: "xavier" } %s } }
"""


@pytest.mark.parametrize("bias", ["none", "constant", "gaussian"])
def test_a_prototxt_weight_drawn_late_has_the_values_of_the_files_stream(tmp_path, bias):
    """The weight is the first draw from its layer's stream (PCG64 over [seed, layer index]); drawn
    when the lowering reads it or eagerly (a random bias draws after it), the values are the same."""
    from mtc.frontends import import_model
    from mtc.ir.seeded import DrawnTensor
    from mtc.lower import lower

    path = tmp_path / "one.prototxt"
    filler = {"none": "", "constant": 'bias_filler { type: "constant" value: 0.5 }',
              "gaussian": 'bias_filler { type: "gaussian" std: 0.1 }'}[bias]
    path.write_text(CONV_PROTOTXT % ("false" if bias == "none" else "true", filler))
    model = import_model(str(path), seed=7)
    w = model.graph.initializers["c1.weight"].const_value
    assert isinstance(w, DrawnTensor) == (bias != "gaussian")
    # the oracle: Caffe's xavier (fan_in 27) from the layer's own stream, drawn by numpy here
    # (the convolution is the file's layer 0)
    ref = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 0]))).random((16, 3, 3, 3), dtype=np.float32)
    scale = np.float32(np.sqrt(3.0 / 27))
    ref *= 2 * scale
    ref -= scale
    held = dict(lower(model).named_initializers())["c1.weight"].detach().numpy()
    np.testing.assert_array_equal(held, ref)
    np.testing.assert_array_equal(w.numpy(), held)  # the model reads the same values afterwards
    if bias == "constant":
        np.testing.assert_array_equal(model.graph.initializers["c1.bias"].const_value.numpy(), 0.5)


def test_unread_head_weights_are_drawn_into_the_module_once_and_equal_the_recipe():
    from mtc.frontends import import_model
    from mtc.ir.seeded import SeededTensor, draw
    from mtc.lower import lower
    from mtc.spaces import compile_supergraph

    model = import_model(str(ROOT / "backbones" / "tiny_resnet.onnx"))
    compile_supergraph(model, tasks="s:seg:3,d:depth:1", head_width=8)
    seeded = {n: v.const_value for n, v in model.graph.initializers.items()
              if isinstance(v.const_value, SeededTensor)}
    assert seeded
    module = lower(model)
    held = dict(module.named_initializers())
    for name, t in seeded.items():
        assert t._tensor is None  # not cached in the IR: the module holds the only copy
        ref = draw(t.recipe, t.seed, name, tuple(int(d) for d in t.shape))
        np.testing.assert_array_equal(held[name].detach().numpy(), ref)
    # read after the lowering: the same values, and a second lowering does not alias the first
    name, t = next(iter(seeded.items()))
    np.testing.assert_array_equal(t.numpy(), held[name].detach().numpy())
    other = dict(lower(model).named_initializers())
    assert other[name].data_ptr() != held[name].data_ptr()


@pytest.mark.parametrize("shape, dtype", [((3, 5), np.float32), ((512, 1024), np.float32), ((300, 1000), np.int64),
                                          ((), np.float64)])
def test_new_weight_memory_is_a_plain_writeable_array_freed_with_its_last_user(shape, dtype):
    import gc
    import weakref

    import torch

    from mtc.ir import memory

    a = memory.empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    src = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    b = memory.copy(src)
    assert np.array_equal(b, src) and not np.shares_memory(b, src)
    t = torch.from_numpy(b)  # the lowering hands such arrays to torch without a copy
    t += 1
    assert np.array_equal(b, src + 1)
    if np.prod(shape) * np.dtype(dtype).itemsize >= memory.POPULATE_MIN_BYTES:
        base = b
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        ref = weakref.ref(base)  # the mapping: unmapped once the array and the tensor are gone
        del a, b, t, base
        gc.collect()
        assert ref() is None


def test_kaiming_uniform_has_the_kaiming_normal_variance_and_old_recipes_still_read():
    from mtc.ir import seeded

    shape = (64, 32, 3, 3)
    std = np.sqrt(2.0 / (64 * 9))
    w = seeded.draw("kaiming_uniform", 0, "head@seg/aspp1/conv1.weight", shape)
    assert w.dtype == np.float32 and w.shape == shape
    assert np.abs(w).max() <= np.sqrt(3) * std * (1 + 1e-6)  # U(-b, b), b = sqrt(6 / fan_out)
    assert w.std() == pytest.approx(std, rel=0.02) and abs(float(w.mean())) < 0.01 * std
    # The same generator, the documented affine map of its float32 uniforms.
    u = seeded.rng(0, "head@seg/aspp1/conv1.weight").random(shape, dtype=np.float32)
    b = np.float32(np.sqrt(3) * std)
    assert np.array_equal(w, u * np.float32(2 * b) - b)
    # Files written before the heads drew uniforms name kaiming_normal: the same values as then.
    n = seeded.draw("kaiming_normal", 0, "x", shape)
    expect = seeded.rng(0, "x").standard_normal(shape, dtype=np.float32) * np.float32(std)
    assert np.array_equal(n, expect)
