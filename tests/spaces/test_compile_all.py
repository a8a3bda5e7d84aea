"""Every bundled backbone and every reference net compiles for 1, 2, 3 and 5 tasks, passes the
checker, and its all-shared network is exactly the backbone with the heads; units whose output a
strided 1x1 sampling cannot match (no padding, upsampling, channels-last Linear layers) get skips
that match, checked against hand-written PyTorch."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKBONES

from mtc import zoo
from mtc.frontends import import_model
from mtc.ir.verify import verify
from mtc.lower import lower
from mtc.passes.pipeline import prepare_multitask
from mtc.spaces import compile_supergraph
from mtc.spaces.automtl import Policy, lower_supergraph, vcns_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from channelnets import zoo_net  # noqa: E402

TASKS = {1: "seg", 2: "seg,depth", 3: "seg,depth,normal", 5: "seg,depth,normal,edge,keypoint"}
SMALL_FILES = sorted(p.name for p in BACKBONES.glob("*.onnx")) + ["mobilenetv2.prototxt"]
BIG_FILES = [pytest.param(n, marks=pytest.mark.slow)
             for n in ("deeplab_resnet34.prototxt", "deeplab_resnet34_adashare.prototxt", "mnasnet.prototxt")]
NETS = [f"zoo:{n}" for n in zoo.REFERENCE] + SMALL_FILES + BIG_FILES


def _source(key: str) -> ir.Model:
    if key.startswith("zoo:"):
        return zoo_net(key[4:])[0].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return import_model(BACKBONES / key)


def _input(model: ir.Model) -> torch.Tensor:
    dims = [d if isinstance(d, int) else 2 for d in model.graph.inputs[0].shape]
    return torch.randn(*dims, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key", NETS)
def test_compiles_for_1_2_3_5_tasks_and_all_shared_is_the_backbone_with_heads(key):
    x = None
    for n, tasks in TASKS.items():
        plain = _source(key)
        prepare_multitask(plain, tasks=tasks, head_width=8)
        sup = plain.clone()
        compile_supergraph(sup, tasks=tasks, head_width=8, passes=["vcn"])
        verify(sup)
        onnx.checker.check_model(ir.to_proto(sup), full_check=True)
        assert vcns_of(sup)
        if n in (1, 5):
            x = _input(plain) if x is None else x
            fixed = lower_supergraph(sup, mode="fixed", policy=Policy.uniform(sup, "shared")).eval()
            ref = lower(plain).eval()
            with torch.no_grad():
                for a, b in zip(fixed(x), ref(x), strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            if n == 5 and key.startswith("zoo:"):
                # and the search form runs every option on every net
                warm = lower_supergraph(sup, mode="warmup").train()
                sum(o.float().pow(2).mean() for o in warm(x)).backward()


def _skip_io(model, vcn, x, task: str = "a") -> tuple[torch.Tensor, torch.Tensor]:
    """The skip option of ``vcn`` for ``task``: its input and output tensors, from one forward pass
    of the supergraph with those two values as its outputs."""
    from mtc.passes.canonicalize import remove_dead

    m = model.clone()
    g = m.graph
    by_name = {o.name: o for n in g for o in n.outputs}
    outs = [by_name[f"{vcn.input}[{task}]"], by_name[f"{vcn.name}@{task}.skip"]]
    g.outputs.clear()
    g.outputs.extend(outs)
    remove_dead(m)
    with torch.no_grad():
        a, b = lower(m).eval()(x)
    return a, b


def test_a_stem_without_padding_skips_through_its_kernel_centres():
    """stem_nopad: a 3x3 stride-2 conv without padding on 33x33 (16x16 out). Its skip crops to the
    kernel centres (rows and columns 1..31) and samples them with a strided 1x1 conv + BN."""
    src = zoo_net("stem_nopad")[0].clone()
    compile_supergraph(src, tasks="a:regress:1,b:regress:1", head_width=8)
    stem = vcns_of(src)[0]
    assert stem.skip == "downsample" and stem.skip_macs < stem.macs
    inits = {k: v.const_value.numpy() for k, v in src.graph.initializers.items()}
    x = torch.randn(2, 3, 33, 33)
    inp, got = _skip_io(src, stem, x)
    base = f"{stem.name}@a.skip"
    t = {k: torch.from_numpy(inits[f"{base}.{k}"]) for k in ("weight", "bn.mean", "bn.var", "bn.scale", "bn.bias")}
    want = F.conv2d(inp[:, :, 1:32, 1:32], t["weight"], stride=2)
    want = F.batch_norm(want, t["bn.mean"], t["bn.var"], t["bn.scale"], t["bn.bias"], False, 0.0, 1e-5)
    assert got.shape == (2, 16, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_upsampling_unit_skips_by_nearest_upsampling_and_channel_select():
    src = zoo_net("deconv_decoder")[0].clone()
    compile_supergraph(src, tasks="a:regress:1,b:regress:1", head_width=8)
    up = next(v for v in vcns_of(src) if "ConvTranspose" in v.name)
    assert up.skip == "select" and up.skip_params == up.skip_macs == 0 and up.macs > 0
    inp, out = _skip_io(src, up, _input(src))
    (_, c, h, w), (_, c_out, H, W) = inp.shape, out.shape
    assert (H, W) == (2 * h, 2 * w)
    want = inp[:, :, np.arange(H) * h // H][:, :, :, np.arange(W) * w // W][:, np.arange(c_out) % c]
    torch.testing.assert_close(out, want)


def test_a_channels_last_linear_layer_skips_on_the_last_axis():
    src = zoo_net("channels_last")[0].clone()
    compile_supergraph(src, tasks="a:regress:1,b:regress:1", head_width=8)
    lin = next(v for v in vcns_of(src) if v.name.endswith("MatMul") and v.skip == "select")
    inp, out = _skip_io(src, lin, _input(src))
    assert out.shape[:-1] == inp.shape[:-1] and out.shape[-1] != inp.shape[-1]
    torch.testing.assert_close(out, inp[..., np.arange(out.shape[-1]) % inp.shape[-1]])
