"""`mtc export` on a real tiny run (mtc search + mtc train), and its bad-input errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import BACKBONES, invoke_mtc

SMALL = ["--pretrain-steps", "2", "--policy-steps", "4", "--batch-size", "2", "--checkpoint-every", "4", "--quiet"]


# In process: the same command line, exit codes and stderr without a Python start per command
# (the installed entry point itself is exercised by tests/test_cli.py and tests/test_errors.py).
mtc = invoke_mtc


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
    (untrained / "checkpoints" / "train.safetensors").unlink()
    assert "final checkpoint" in _bad(mtc("export", str(untrained), "-o", "o", cwd=tmp_path))
    pol = json.loads((run / "policy.json").read_text())
    wrong_vcn = dict(pol, policy={**{k + "x": v for k, v in pol["policy"].items()}})
    (tmp_path / "p1.json").write_text(json.dumps(wrong_vcn))
    assert "VCN" in _bad(mtc("export", str(run), "-o", "o", "--policy", "p1.json", cwd=tmp_path))
    wrong_task = dict(pol, policy={k: {"a": "shared", "zz": "shared"} for k in pol["policy"]})
    mismatched = tmp_path / "mismatched"
    shutil.copytree(run, mismatched)
    (mismatched / "plan.json").write_text(json.dumps(wrong_task))  # the run's plan, in v1 policy form
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


# --- the command-line forms: one task to a file, --all to a folder, --fused to a file, a supergraph source ---


def _outputs(path) -> list[str]:
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    return [o.name for o in m.graph.output]


def _ort(path, x):
    from conftest import run_ort

    return run_ort(str(path), {onnx.load(str(path)).graph.input[0].name: x})


def _x():
    import numpy as np

    return np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)


def test_one_task_to_a_file_with_its_report_beside_it(run, tmp_path):
    r = mtc("export", str(run), "--task", "a", "-o", "deploy/a_model.onnx", "--repeat", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["a_model.onnx", "a_model.report.json"]
    assert _outputs(tmp_path / "deploy" / "a_model.onnx") == ["a"]
    rep = json.loads((tmp_path / "deploy" / "a_model.report.json").read_text())
    assert set(rep["tasks"]) == {"a"} and "fused" not in rep
    r = mtc("verify", "deploy/a_model.onnx", "--against", str(run), "--task", "a", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_all_tasks_to_a_folder_without_fused(run, tmp_path):
    r = mtc("export", str(run), "--all", "-o", "out/", "--no-report", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.onnx", "b.onnx"]
    assert _outputs(tmp_path / "out" / "a.onnx") == ["a"] and _outputs(tmp_path / "out" / "b.onnx") == ["b"]
    r = mtc("verify", "out/b.onnx", "--against", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_fused_only_to_a_file(run, tmp_path):
    r = mtc("export", str(run), "--fused", "-o", "all.onnx", "--repeat", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.onnx", "all.report.json"]
    assert _outputs(tmp_path / "all.onnx") == ["a", "b"]
    rep = json.loads((tmp_path / "all.report.json").read_text())
    assert rep["tasks"] == {} and rep["fused"]["sum_of_tasks"]["macs"] >= rep["fused"]["macs"] > 0
    r = mtc("verify", "all.onnx", "--against", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "a:" in r.stdout and "b:" in r.stdout


def test_an_onnx_output_for_several_models_is_an_error(run, tmp_path):
    assert "2 would be written" in _bad(mtc("export", str(run), "--all", "-o", "x.onnx", cwd=tmp_path))
    assert "3 would be written" in _bad(mtc("export", str(run), "-o", "x.onnx", cwd=tmp_path))
    assert "(a, fused)" in _bad(mtc("export", str(run), "--task", "a", "--fused", "-o", "sub/x.onnx",
                                    cwd=tmp_path))
    assert "exclude" in _bad(mtc("export", str(run), "--all", "--task", "a", "-o", "o", cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


def _supergraph(run):
    cfg = json.loads((run / "config.json").read_text())
    return run / cfg.get("supergraph", "super.mtc.onnx")


def test_supergraph_source_without_weights_matches_the_lowering(run, tmp_path):
    from conftest import rel_err

    from mtc.export import graph as eg
    from mtc.export.api import read_plan, reference_outputs
    from mtc.ir.io import load

    sup = _supergraph(run)
    r = mtc("export", str(sup), "--policy", str(run / "policy.json"), "--fused", "-o", "f.onnx", "--no-report",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        "mtc: note: no --weights: exporting the supergraph's initial (untrained) weights"]
    assert _outputs(tmp_path / "f.onnx") == ["a", "b"]
    model = load(sup)
    ref = reference_outputs(eg.fixed_module(model, read_plan(run / "policy.json", model)), _x())
    for name, got in zip(["a", "b"], _ort(tmp_path / "f.onnx", _x()), strict=True):
        assert rel_err(got, ref[name]) <= 1e-4


def test_supergraph_source_with_weights_matches_the_run(run, tmp_path):
    import numpy as np

    mtc("export", str(run), "--fused", "-o", "run.onnx", "--no-report", cwd=tmp_path, check=True)
    from safetensors.torch import load_file, save_file

    ckpt = run / "checkpoints" / "train.safetensors"
    # weights alone: the checkpoint's module tensors, keyed by IR name
    save_file({k[len("module/"):]: v for k, v in load_file(ckpt).items() if k.startswith("module/")},
              tmp_path / "sd.pt")
    sup, pol = str(_supergraph(run)), str(run / "policy.json")
    r = mtc("export", sup, "--policy", pol, "--weights", str(ckpt), "--fused", "-o", "ckpt.onnx", "--no-report",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""
    mtc("export", sup, "--policy", pol, "--weights", "sd.pt", "--task", "b", "-o", "sd_b.onnx", "--no-report",
        cwd=tmp_path, check=True)
    # --weights with a run directory replaces checkpoints/train.safetensors
    mtc("export", str(run), "--weights", "sd.pt", "--fused", "-o", "override.onnx", "--no-report", cwd=tmp_path,
        check=True)
    x = _x()
    want = _ort(tmp_path / "run.onnx", x)
    for f in ("ckpt.onnx", "override.onnx"):
        for got, ref in zip(_ort(tmp_path / f, x), want, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_ort(tmp_path / "sd_b.onnx", x)[0], want[1], rtol=1e-5, atol=1e-6)
    r = mtc("verify", "ckpt.onnx", "--against", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_supergraph_source_errors(run, tmp_path):
    import torch

    sup, pol = str(_supergraph(run)), str(run / "policy.json")
    assert "needs --policy" in _bad(mtc("export", sup, "--task", "a", "-o", "a.onnx", cwd=tmp_path))
    backbone = str(BACKBONES / "tiny_resnet.onnx")
    assert "not a supergraph" in _bad(mtc("export", backbone, "--policy", pol, "-o", "o", cwd=tmp_path))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    assert "corrupt checkpoint" in _bad(mtc("export", sup, "--policy", pol, "--weights", "garbage.pt", "-o", "o",
                                            cwd=tmp_path))
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(1)}, tmp_path / "misfit.pt")
    misfit = _bad(mtc("export", sup, "--policy", pol, "--weights", "misfit.pt", "-o", "o", cwd=tmp_path))
    assert "do not fit" in misfit and "misfit.pt" in misfit
    save_file({}, tmp_path / "list.pt")  # a valid file with no tensors
    assert "not weights" in _bad(mtc("export", str(run), "--weights", "list.pt", "-o", "o", cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pt", "list.pt", "misfit.pt"]


def test_keep_resize_leaves_the_seg_heads_resize(tmp_path):
    from mtc.ir.io import load
    from mtc.spaces.automtl import Policy

    mtc("compile", str(BACKBONES / "tiny_resnet.onnx"), "--tasks", "s:seg:3,d:regress:1", "--head-width", "8",
        "--input-shape", "1,3,32,32", "-o", "s.mtc.onnx", cwd=tmp_path, check=True)
    policy = Policy.random(load(tmp_path / "s.mtc.onnx"), seed=3)
    (tmp_path / "p.json").write_text(json.dumps({"policy": policy.to_json()}))
    for flag, name in (("--resize-matmul", "fast.onnx"), ("--keep-resize", "plain.onnx")):
        r = mtc("export", "s.mtc.onnx", "--policy", "p.json", "--task", "s", flag, "-o", name, "--no-report",
                cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    fast, plain = (onnx.load(str(tmp_path / n)) for n in ("fast.onnx", "plain.onnx"))
    assert [n.op_type for n in plain.graph.node][-1] == "Resize"
    assert not [n for n in fast.graph.node if n.op_type == "Resize"]
    assert [(n.name, n.op_type) for n in fast.graph.node][-2:] == [("head@s/resize/H", "MatMul"),
                                                                    ("head@s/resize/W", "MatMul")]
    assert json.loads({p.key: p.value for p in fast.metadata_props}["mtc.export"])["resize_matmul"] is True
    x = _x()
    np.testing.assert_allclose(_ort(tmp_path / "fast.onnx", x)[0], _ort(tmp_path / "plain.onnx", x)[0],
                               rtol=1e-5, atol=1e-6)
