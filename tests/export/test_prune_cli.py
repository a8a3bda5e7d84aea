"""``mtc prune``: a smaller model that is verified before it lands, a report, and one-line errors."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from click.testing import CliRunner
from conftest import BACKBONES, run_mtc, run_ort

from mtc.cli import main
from mtc.frontends import import_model
from mtc.ir.cost import model_cost
from mtc.ir.io import load

RESNET = str(BACKBONES / "tiny_resnet.onnx")


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_prune_writes_a_verified_smaller_model_and_reports(tmp_path) -> None:
    out = tmp_path / "p.onnx"
    r = run_mtc("prune", RESNET, "-o", str(out), "--ratio", "0.5", "--repeat", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "verified against the zeroed-consumer reference" in r.stdout
    assert "prune report (cpu, batch 1, median of 5 interleaved runs)" in r.stdout
    assert "12 of 12 prunable groups pruned (14 groups); 180 of 373 channels removed" in r.stdout
    pruned, original = load(out), import_model(RESNET)
    assert model_cost(pruned)[1] < 0.6 * model_cost(original)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx"]  # no temporary files left


def test_keep_by_name_and_id_importance_and_rounding(tmp_path) -> None:
    out = tmp_path / "p.onnx"
    r = _invoke("prune", RESNET, "-o", str(out), "--keep", "stem.0.0=8,2=4", "--no-report")
    assert r.exit_code == 0, r.output
    m = load(out)
    w = {n.name: n.inputs[1].const_value.shape for n in m.graph if n.op_type == "Conv"}
    assert tuple(w["stem.0.0"]) == (8, 3, 3, 3) and tuple(w["layers.0.conv1.0"]) == (4, 8, 3, 3)
    r = _invoke("prune", RESNET, "-o", str(out), "--ratio", "0.3", "--round-to", "8", "--importance", "random",
                "--seed", "3", "--ignore", "layers.7.conv2.0", "--no-report")
    assert r.exit_code == 0, r.output
    m = load(out)
    outs = {n.name: n.outputs[0].shape for n in m.graph}
    assert outs["stem.0.0"][1] == 8 and outs["layers.2.down.0"][1] == 16 and outs["layers.6.down.0"][1] == 48
    x = {"input": __import__("numpy").zeros((1, 3, 64, 64), "float32")}
    assert run_ort(m, x)[0].shape == (1, 10)


@pytest.mark.parametrize(("args", "message"), [
    (["--keep", "nope=3"], "--keep: no group 'nope'"),
    (["--keep", "stem.0.0=17"], "--keep: group 'stem.0.0' has 16 channels, cannot keep 17"),
    (["--keep", "stem.0.0=0"], "--keep: group 'stem.0.0': keep at least 1 channel (got 0)"),
    (["--keep", "head.fc=5"], "--keep: group 'head.fc' is not prunable: graph output 'linear'"),
    (["--keep", "input=2"], "--keep: group 'input' is not prunable: graph input 'input'"),
    (["--keep", "stem.0.0"], "--keep: 'stem.0.0' is not GROUP=N"),
    (["--keep", "stem.0.0=half"], "--keep: 'stem.0.0=half': N must be a whole number"),
    (["--ratio", "0"], "--ratio 0: must be in (0, 1)"),
    (["--ratio", "1"], "--ratio 1: must be in (0, 1)"),
    (["--ratio", "1.5"], "--ratio 1.5: must be in (0, 1)"),
    (["--ratio", "-0.2"], "--ratio -0.2: must be in (0, 1)"),
    (["--ratio", "0.5", "--round-to", "0"], "--round-to 0: must be at least 1"),
    (["--ratio", "0.5", "--ignore", "stem.0.0,nope"], "--ignore: no node 'nope' in the model"),
    (["--keep", "stem.0.0=4", "--ignore", "layers.0.conv2.0"], "--keep: group 'stem.0.0' touches a node --ignore"),
    ([], "give --ratio R or --keep GROUP=N,..."),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args: list[str], message: str) -> None:
    out = tmp_path / "p.onnx"
    r = CliRunner().invoke(main, ["prune", RESNET, "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtc: error: ") and message in lines[0], r.stderr
    assert not r.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_disagrees_with_the_oracle_is_not_written(tmp_path, monkeypatch) -> None:
    import numpy as np

    import mtc.export.prune as ep

    real = ep.apply_plan

    def broken(model, channels, plan):
        m = real(model, channels, plan)
        w = next(n for n in m.graph if n.op_type == "Gemm").inputs[1]
        w.const_value = ir.tensor(w.const_value.numpy() * np.float32(1.001), name=w.name)
        return m

    monkeypatch.setattr(ep, "apply_plan", broken)
    out = tmp_path / "p.onnx"
    r = CliRunner().invoke(main, ["prune", RESNET, "-o", str(out), "--ratio", "0.5"])
    assert r.exit_code == 1
    assert r.stderr.startswith("mtc: verification failed: output 'linear' differs from the zeroed-consumer")
    assert r.stderr.strip().endswith("no file written") and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_prototxt_source_is_imported_first(tmp_path) -> None:
    out = tmp_path / "m.onnx"
    r = _invoke("prune", str(BACKBONES / "mobilenetv2.prototxt"), "-o", str(out), "--ratio", "0.5", "--no-report")
    assert r.exit_code == 0, r.output
    assert model_cost(load(out))[1] < 0.6 * model_cost(import_model(str(BACKBONES / "mobilenetv2.prototxt")))[1]
