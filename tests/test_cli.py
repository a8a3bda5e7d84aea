"""The `mtc` command line as a user runs it: output, JSON keys, exit codes, no partial files."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner
from conftest import BACKBONES

from mtc import __version__
from mtc.cli import main

INSPECT_KEYS = {"schema", "source", "graph", "opset", "inputs", "outputs", "nodes", "ops", "params", "macs",
                "heaviest", "branch_points"}


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_import_and_inspect_json(tmp_path):
    out = tmp_path / "r.onnx"
    r = run("import", str(BACKBONES / "tiny_resnet.onnx"), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    r = run("inspect", str(out), "--json")
    assert r.exit_code == 0
    s = json.loads(r.output)
    assert set(s) == INSPECT_KEYS
    assert s["params"] == 143626  # = sum(p.numel()) of mtc.zoo.TinyResNet
    assert s["inputs"][0]["shape"] == ["N", 3, 64, 64]
    assert s["outputs"][0]["shape"] == ["N", 10]
    assert sum(s["ops"].values()) == s["nodes"]
    assert len(s["heaviest"]) == 10
    macs = [h["macs"] for h in s["heaviest"]]
    assert macs == sorted(macs, reverse=True)
    assert s["branch_points"]["count"] == len(s["branch_points"]["names"]) > 0


def test_inspect_human_output():
    r = run("inspect", str(BACKBONES / "tiny_densenet.onnx"), "--top", "3")
    assert r.exit_code == 0
    for word in ("Interface", "Ops", "Heaviest 3 nodes", "candidate branch points", "Conv"):
        assert word in r.output


def test_import_prototxt_keeps_origin(tmp_path):
    out = tmp_path / "m.onnx"
    r = run("import", str(BACKBONES / "mobilenetv2.prototxt"), "-o", str(out))
    assert r.exit_code == 0, r.output
    m = onnx.load(str(out))
    assert all(any(p.key == "mtc.origin" for p in n.metadata_props) for n in m.graph.node)


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtc.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("make,args,needle", [
    (None, ["missing.onnx"], "missing.onnx: no such file"),
    (b"garbage bytes", ["bad.onnx"], "bad.onnx: not a valid ONNX file"),
    ("layer { name: 'c' type: 'Convolution' bottom: 'data' top: 'c' convolution_param { num_output: 4 ",
     ["broken.prototxt"], "broken.prototxt:"),
    (None, ["no_such_pkg_zz:factory", "--input-shape", "1,3,8,8"], "cannot import module"),
    (None, [str(BACKBONES / "tiny_resnet.onnx"), "--input-shape", "1,3,x,64"], "--input-shape"),
    (None, [str(BACKBONES / "tiny_resnet.onnx"), "--input-shape", "1,3,64"], "rank 3"),
])
def test_user_errors_one_line_exit_2_no_output(tmp_path, make, args, needle):
    if make is not None:
        p = tmp_path / args[0]
        p.write_bytes(make if isinstance(make, bytes) else make.encode())
    out = tmp_path / "out.onnx"
    r = _cli("import", *args, "-o", str(out), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("W1")]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("args,needle", [
    (["search", "s.onnx", "--data", "scenes", "--run-dir", "r", "--lambda-reg-scaling", "bad"],
     "Invalid value for '--lambda-reg-scaling': 'bad' is not one of 'budget', 'none' (see mtc search --help)"),
    (["export"], "Missing argument 'SOURCE' (see mtc export --help)"),
    (["compile", "x.onnx", "--tasks", "seg", "--no-such-option"], "No such option '--no-such-option' (see mtc compile --help)"),
    (["bogus"], "No such command 'bogus' (see mtc --help)"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, needle):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("mtc: error: ") and needle in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
