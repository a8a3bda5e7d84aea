"""``mtc verify`` and the lowering's bad-input behaviour, as a user meets them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner

from mtc.errors import MtcError
from mtc.ir import io
from mtc.lower import lower, supported_ops
from mtc.lower import registry as reg
from mtc.lower.reference import export_reference


def _main():
    from mtc.cli import main

    return main


def run(*args: str):
    return CliRunner().invoke(_main(), ["verify", *args], catch_exceptions=False)


def parse(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


UNSUPPORTED = """
<ir_version: 8, opset_import: ["" : 18, "com.example" : 1]>
g (float[1,3,4,4] x) => (float[1,3,4,4] y) {
    h = Relu(x)
    y = com.example.Frobnicate(h)
}
"""

RESHAPE = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N,6] x) => (float[4,M] y) {
    s = Constant<value = int64[2] {4, -1}>()
    y = Reshape(x, s)
}
"""


def _unsupported_model() -> ir.Model:
    model = parse(UNSUPPORTED)
    node = list(model.graph)[1]
    node.name = "frob3"
    node.metadata_props["mtc.origin"] = "layer7/frob"
    return model


@pytest.fixture(scope="module")
def residual(tmp_path_factory) -> str:
    _, model = export_reference("residual", "torchscript")
    return str(io.save(model, tmp_path_factory.mktemp("m") / "residual.onnx"))


# --- build-time and run-time errors ----------------------------------------------------------------


def test_unsupported_op_fails_at_build_time_naming_everything() -> None:
    with pytest.raises(MtcError) as e:
        lower(_unsupported_model())
    msg = str(e.value)
    assert "\n" not in msg
    assert "frob3" in msg and "Frobnicate" in msg and "layer7/frob" in msg
    assert "supported ops: " + ", ".join(supported_ops()) in msg


def test_runtime_failure_names_the_node() -> None:
    model = parse(RESHAPE)
    list(model.graph)[1].name = "reshape1"
    module = lower(model)
    assert module(torch.zeros(2, 6))[0].shape == (4, 3)
    with pytest.raises(RuntimeError, match=r"^while executing node reshape1 \(Reshape\): ") as e:
        module(torch.zeros(1, 6))
    assert isinstance(e.value.__cause__, RuntimeError)


def test_wrong_number_of_inputs() -> None:
    with pytest.raises(TypeError, match="expected 1 inputs"):
        lower(parse(RESHAPE))()


# --- mtc verify ------------------------------------------------------------------------------------


def test_verify_ok_prints_a_table(residual: str) -> None:
    r = run(residual)
    assert r.exit_code == 0, r.output
    assert "max abs diff" in r.output and "max rel diff" in r.output and "ok" in r.output


def test_verify_with_input_file(residual: str, tmp_path) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
    assert run(residual, "--input", str(x)).exit_code == 0
    assert run(residual, "--input", f"input={x}", "--seed", "3").exit_code == 0


def test_verify_mismatching_input_shape_is_one_line(residual: str, tmp_path) -> None:
    x = tmp_path / "small.npy"
    np.save(x, np.zeros((1, 3, 16, 16), np.float32))
    r = CliRunner().invoke(_main(), ["verify", residual, "--input", str(x)])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "input 'input' expects shape [1,3,32,32], got [1,3,16,16]" in lines[0]


@pytest.mark.parametrize("bad", [["--input", "missing.npy"], ["--input", "nope=x.npy"]])
def test_verify_bad_input_argument_is_exit_2(residual: str, bad: list[str], tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.zeros((1, 3, 32, 32), np.float32))
    r = CliRunner().invoke(_main(), ["verify", residual, *bad])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_verify_unsupported_op_is_exit_2(tmp_path) -> None:
    path = io.save(_unsupported_model(), tmp_path / "u.onnx")
    r = CliRunner().invoke(_main(), ["verify", str(path)])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "frob3" in lines[0] and "Frobnicate" in lines[0] and "supported ops" in lines[0]


def test_verify_missing_file_is_exit_2(tmp_path) -> None:
    r = CliRunner().invoke(_main(), ["verify", str(tmp_path / "none.onnx")])
    assert r.exit_code == 2 and "no such file" in r.stderr


def test_verify_exits_1_beyond_tolerance(residual: str, monkeypatch) -> None:
    # A deliberately wrong Relu: the lowering no longer matches onnxruntime.
    spec = reg.lookup("Relu")
    assert spec is not None
    tampered = reg.OpSpec("Relu", "", 1, lambda node: (lambda x: torch.relu(x) * 1.01))
    monkeypatch.setitem(reg._REGISTRY, ("", "Relu"), [tampered])
    r = run(residual)
    assert r.exit_code == 1
    assert "FAIL" in r.output


def test_verify_exits_1_with_zero_tolerance(tmp_path) -> None:
    _, model = export_reference("layernorm_gelu", "dynamo")
    path = io.save(model, tmp_path / "ln.onnx")
    assert run(str(path)).exit_code == 0
    assert run(str(path), "--atol", "0", "--rtol", "0").exit_code == 1


def test_verify_compile(residual: str) -> None:
    r = run(residual, "--compile")
    assert r.exit_code == 0, r.output
    assert "compiled" in r.output
