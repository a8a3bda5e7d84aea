"""`mtc export` on a real tiny run (mtc search + mtc train), and its bad-input errors."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from conftest import BACKBONES, run_mtc

SMALL = ["--pretrain-steps", "2", "--policy-steps", "4", "--batch-size", "2", "--checkpoint-every", "4", "--quiet"]


mtc = run_mtc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_run")
    mtc("compile", str(BACKBONES / "tiny_resnet.onnx"), "--tasks", "a:regress:1,b:class:2", "--head-width", "8",
        "--input-shape", "1,3,32,32", "-o", "s.mtc.onnx", cwd=d, check=True)
    mtc("search", "s.mtc.onnx", "--data", "tinydata:factory", "--run-dir", "run", *SMALL, cwd=d, check=True)
    mtc("train", "run", "--steps", "2", "--batch-size", "2", "--quiet", cwd=d, check=True)
    return d / "run"


def test_export_writes_verified_models_and_a_report(run, tmp_path):
    r = mtc("export", str(run), "-o", str(tmp_path / "out"), "--fold-bn", "--repeat", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["a.onnx", "b.onnx", "fused.onnx", "report.json"]
    for stem in ("a", "b", "fused"):
        m = onnx.load(str(tmp_path / "out" / f"{stem}.onnx"))
        onnx.checker.check_model(m, full_check=True)
        assert not [n for n in m.graph.node if n.domain == "ai.mtc"]
        assert not [n for n in m.graph.node if n.op_type == "BatchNormalization"
                    and any(p.output[0] == n.input[0] and p.op_type == "Conv" for p in m.graph.node)]
    assert "verified" in r.stdout and "fused" in r.stdout
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep["tasks"]) == {"a", "b"} and rep["fused"]["latency_ms"] > 0
    for t in ("a", "b"):
        assert rep["tasks"][t]["exported"]["macs"] > 0 and rep["tasks"][t]["backbone"]["latency_ms"] > 0


def test_export_one_task_without_fused(run, tmp_path):
    r = mtc("export", str(run), "-o", "o", "--task", "b", "--no-fused", "--no-report", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["b.onnx"]
    m = onnx.load(str(tmp_path / "o" / "b.onnx"))
    assert [o.name for o in m.graph.output] == ["b"]


def _bad(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtc: error:"), r.stderr
    return lines[0]


def test_bad_inputs_exit_2(run, tmp_path):
    assert "task 'nope'" in _bad(mtc("export", str(run), "-o", "o", "--task", "nope", cwd=tmp_path))
    assert "no such run directory" in _bad(mtc("export", "missing", "-o", "o", cwd=tmp_path))
    untrained = tmp_path / "untrained"
    shutil.copytree(run, untrained)
    (untrained / "checkpoints" / "train.pt").unlink()
    assert "final checkpoint" in _bad(mtc("export", str(untrained), "-o", "o", cwd=tmp_path))
    pol = json.loads((run / "policy.json").read_text())
    wrong_vcn = dict(pol, policy={**{k + "x": v for k, v in pol["policy"].items()}})
    (tmp_path / "p1.json").write_text(json.dumps(wrong_vcn))
    assert "VCN" in _bad(mtc("export", str(run), "-o", "o", "--policy", "p1.json", cwd=tmp_path))
    wrong_task = dict(pol, policy={k: {"a": "shared", "zz": "shared"} for k in pol["policy"]})
    mismatched = tmp_path / "mismatched"
    shutil.copytree(run, mismatched)
    (mismatched / "policy.json").write_text(json.dumps(wrong_task))
    assert "tasks" in _bad(mtc("export", str(mismatched), "-o", "o", cwd=tmp_path))
    assert not (tmp_path / "o").exists()


def test_cuda_provider_without_onnxruntime_gpu_is_a_clear_error(run, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    assert "onnxruntime-gpu" in _bad(mtc("export", str(run), "-o", "o", "--provider", "cuda", cwd=tmp_path))


def test_verify_against_the_run(run, tmp_path):
    mtc("export", str(run), "-o", "o", "--no-report", cwd=tmp_path, check=True)
    r = mtc("verify", "o/fused.onnx", "--against", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "a:" in r.stdout and "b:" in r.stdout
    r = mtc("verify", "o/a.onnx", "--against", str(run), "--task", "a", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no output 'b'" in _bad(mtc("verify", "o/a.onnx", "--against", str(run), "--task", "b", cwd=tmp_path))
