"""Oracle: the lowering matches onnxruntime (and the PyTorch source) in eval mode.

Every reference architecture of :mod:`mtc.zoo` is exported with both PyTorch exporters (in the four
flavours of :mod:`mtc.lower.reference`: BatchNormalization kept or folded, shape arithmetic kept or
folded, sequence ops or not), converted to opset 18 and lowered; the outputs must agree with
onnxruntime on the same weights and input to 1e-4 of the output's scale, and with the PyTorch module
the ONNX came from. The bundled backbones and the front end's imports are checked the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtc import zoo
from mtc.lower import lower
from mtc.lower.reference import EXPORTERS, export_reference
from mtc.lower.verify import compare, random_inputs, run_lowered, run_onnxruntime, verify

RTOL = 1e-4
ATOL = 1e-6
ROOT = Path(__file__).resolve().parents[2]
NETS = list(zoo.REFERENCE)


def _input(name: str, batch: int | None = None, seed: int = 0) -> np.ndarray:
    shape = list(zoo.REFERENCE[name][1])
    if batch is not None:
        shape[0] = batch
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _check(model, module: torch.nn.Module | None, x: np.ndarray) -> None:
    lowered = lower(model)
    got = run_lowered(lowered, [x])
    ref = run_onnxruntime(model, [x])
    assert len(got) == len(ref) == len(lowered.output_names)
    for name, g, r in zip(lowered.output_names, got, ref, strict=True):
        d = compare(name, g, r, atol=ATOL, rtol=RTOL)
        assert d.ok, f"vs onnxruntime: {d}"
    if module is not None:
        with torch.no_grad():
            expected = module.eval()(torch.from_numpy(x)).numpy()
        d = compare("output", got[0], expected, atol=ATOL, rtol=RTOL)
        assert d.ok, f"vs PyTorch: {d}"


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NETS)
def test_reference_net_matches_onnxruntime_and_torch(name: str, exporter: str) -> None:
    module, model = export_reference(name, exporter)
    _check(model, module, _input(name))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo-bn"])
@pytest.mark.parametrize("name", NETS)
def test_symbolic_batch(name: str, exporter: str) -> None:
    """A symbolic batch leaves shape arithmetic to run time; batch 3 was never traced."""
    module, model = export_reference(name, exporter, dynamic_batch=True)
    assert not isinstance(model.graph.inputs[0].shape[0], int)
    _check(model, module, _input(name, batch=3, seed=1))


def test_verify_reports_every_output() -> None:
    _, model = export_reference("decoder", "torchscript")
    report = verify(model, seed=3)
    assert report.ok and len(report.outputs) == 1
    out = report.outputs[0]
    assert out.shape == (1, 4, 32, 32) and out.max_rel < RTOL


# --- bundled backbones and the front end --------------------------------------------------------


def _import_model():
    frontends = pytest.importorskip("mtc.frontends")
    fn = getattr(frontends, "import_model", None)
    if fn is None:
        pytest.skip("mtc.frontends.import_model is not available yet")
    return fn


BACKBONES = sorted(p.name for p in (ROOT / "backbones").glob("*.onnx")) + sorted(
    p.name for p in (ROOT / "backbones").glob("*.prototxt")
)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bundled_backbone(backbone: str) -> None:
    import_model = _import_model()
    model = import_model(str(ROOT / "backbones" / backbone))
    report = verify(model, inputs=random_inputs(model, seed=0, batch=1), atol=ATOL, rtol=RTOL)
    assert report.ok, report.outputs


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", zoo.BACKBONES)
def test_front_end_import(name: str, exporter: str) -> None:
    import_model = _import_model()
    shape = zoo.REFERENCE[name][1]
    model = import_model(f"mtc.zoo:{name}", input_shape=shape, exporter=exporter)
    x = _input(name, batch=2)
    _check(model, zoo.build(name), x)
