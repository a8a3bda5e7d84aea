"""The vcn pass and `mtc compile`: structure, format, size, names, errors."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import onnx
import onnx_ir as ir
import pytest
from conftest import BACKBONES

from mtc.frontends import import_model
from mtc.ir import io
from mtc.ir import supergraph as sg
from mtc.ir.verify import verify
from mtc.spaces import compile_supergraph
from mtc.spaces.automtl import vcns_of
from mtc.spaces.automtl.vcn import Vcn
from mtc.tasks.spec import tasks_of

TASKS = {1: "seg", 2: "seg,depth", 3: "seg,depth,normal", 5: "seg,depth,normal,edge,keypoint"}
SMALL = sorted(p.name for p in BACKBONES.glob("*.onnx")) + ["mobilenetv2.prototxt"]
# 224x224 ResNet-34 / MNASNet: a few seconds each (checker and proto comparison of ~200 MB), so slow.
BIG = [pytest.param(n, marks=pytest.mark.slow)
       for n in ("deeplab_resnet34.prototxt", "deeplab_resnet34_adashare.prototxt", "mnasnet.prototxt")]


def _compile(name: str, n: int, **kw) -> ir.Model:
    m = import_model(BACKBONES / name)
    compile_supergraph(m, tasks=TASKS[n], head_width=kw.pop("head_width", 16), **kw)
    return m


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("name", SMALL + BIG)
def test_compiles_checks_and_round_trips(tmp_path, name, n):
    m = _compile(name, n)
    verify(m)
    proto = ir.to_proto(m)
    onnx.checker.check_model(proto, full_check=True)
    p = io.save(m, tmp_path / "s.mtc.onnx")
    back = io.load(p)
    assert ir.to_proto(back) == proto  # loads back unchanged
    tasks = [t.name for t in tasks_of(back)]
    assert [v.name for v in back.graph.outputs] == tasks
    vcns = vcns_of(back)
    ops = Counter((nd.domain, nd.op_type) for nd in back.graph)
    assert ops[(sg.DOMAIN, "Gate")] == len(vcns) > 0
    assert ops[(sg.DOMAIN, "Fork")] == 1
    names = {nd.name for nd in back.graph}
    for v in vcns:
        assert back.graph.initializers[v.policy].const_value.shape == (n, 3)
        for t in tasks:
            assert f"{v.name}@{t}" in names and f"{v.name}@{t}.skip" in names
    # every parameterised backbone node is in exactly one VCN unit
    in_units = [x for v in vcns for x in v.nodes]
    assert len(in_units) == len(set(in_units))


def test_units_pair_conv_with_following_bn():
    m = _compile("tiny_resnet.onnx", 2)
    vcns = vcns_of(m)
    by_op = {nd.name: nd.op_type for nd in m.graph}
    for v in vcns:
        assert [by_op[x] for x in v.nodes] == ["Conv", "BatchNormalization"]
    # stride-2 units get a down-sampling skip, the others an identity
    kinds = Counter(v.skip for v in vcns)
    assert kinds["downsample"] >= 4 and kinds["identity"] >= 8


def test_standalone_norm_is_its_own_vcn():
    m = _compile("tiny_densenet.onnx", 2)
    by_op = {nd.name: nd.op_type for nd in m.graph}
    singles = [v for v in vcns_of(m) if len(v.nodes) == 1]
    assert any(by_op[v.nodes[0]] == "BatchNormalization" for v in singles)
    assert all(v.skip == "identity" for v in singles if by_op[v.nodes[0]] == "BatchNormalization")


def test_per_task_norm_moves_norm_into_every_option():
    m = _compile("tiny_resnet.onnx", 2, per_task_norm=True)
    names = {nd.name for nd in m.graph}
    v = vcns_of(m)[0]
    conv, bn = v.nodes
    assert bn not in names  # the shared option has no shared normalisation
    assert f"{bn}@seg.shared" in names and f"{bn}@depth.shared" in names
    verify(m)
    onnx.checker.check_model(ir.to_proto(m), full_check=True)


def test_copies_are_not_stored_twice(tmp_path):
    m1 = _compile("tiny_resnet.onnx", 1, head_width=8)
    m5 = _compile("tiny_resnet.onnx", 5, head_width=8)
    s1 = io.save(m1, tmp_path / "a.onnx").stat().st_size
    s5 = io.save(m5, tmp_path / "b.onnx").stat().st_size
    backbone = (BACKBONES / "tiny_resnet.onnx").stat().st_size
    # 5 tasks add heads and tiny skips, never 5 backbone copies
    assert s5 < backbone + (s5 - s1) + 2 * (s1 - backbone) + 400_000
    assert s5 < 2.5 * backbone


def test_vcn_is_not_rerun():
    m = _compile("tiny_resnet.onnx", 2)
    assert not Vcn()(m).modified


def _mtc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mtc.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_compile_cli_prints_pass_times(tmp_path):
    r = _mtc("compile", str(BACKBONES / "tiny_densenet.onnx"), "--tasks", "seg:seg:5,depth", "--head-width", "8",
             "-o", "s.mtc.onnx", "--dump-after", "vcn", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for p in ("canonicalize", "cut-at-feature", "attach-heads", "vcn", "ms"):
        assert p in r.stdout
    assert (tmp_path / "s.mtc.onnx").exists()
    assert (tmp_path / "s.dump" / "03-vcn.onnx.txt").exists()
    r = _mtc("inspect", "s.mtc.onnx", "--json", cwd=tmp_path)
    import json

    sup = json.loads(r.stdout)["supergraph"]
    assert [t["name"] for t in sup["tasks"]] == ["seg", "depth"] and sup["tasks"][0]["channels"] == 5
    assert sup["vcns"] > 0 and sup["search_space"]["choices"] == 2 * sup["vcns"]
    tot = sup["macs"]["total"]
    assert tot["all_specific"] > tot["all_shared"]


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "seg:nope"], "unknown"),
    (["--tasks", "seg,seg"], "duplicate task name 'seg'"),
    (["--tasks", "seg:seg:0"], "seg:seg:0"),
    (["--tasks", "seg", "--feature", "no_such_tensor"], "--feature"),
])
def test_compile_bad_input(tmp_path, args, needle):
    r = _mtc("compile", str(BACKBONES / "tiny_resnet.onnx"), *args, "-o", "out.mtc.onnx", cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "out.mtc.onnx").exists()
