"""`mtc check`: graph-regression snapshots against tests/golden/*.json, as users run it in CI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import BACKBONES, ROOT

from mtc.check import SCHEMA_VERSION, compare, dumps_golden, load_model, read_golden, snapshot, write_golden
from mtc.cli import main
from mtc.errors import MtcError

# The bundled prototxts name their input 'data' but declare 'blob1'; the import warns and binds it.
pytestmark = pytest.mark.filterwarnings("ignore::mtc.frontends.prototxt.PrototxtWarning")

GOLDEN = ROOT / "tests" / "golden"
TASKS = {2: "seg,depth", 3: "seg,depth,normal"}
HEAD_WIDTH = "32"  # small heads keep the compiles fast; the structure checked is the same
BUNDLED = sorted(p.name for p in BACKBONES.glob("*.onnx")) + sorted(p.name for p in BACKBONES.glob("*.prototxt"))


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def golden_of(backbone: str, n: int) -> Path:
    return GOLDEN / f"{Path(backbone).stem}-{n}tasks.json"


def check(backbone: str, n: int, golden: Path, *extra: str):
    return run("check", BACKBONES / backbone, "--tasks", TASKS[n], "--head-width", HEAD_WIDTH,
               "--golden", golden, *extra)


def _leaves(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


# ----------------------------------------------------------------------------- the golden files
def test_every_bundled_backbone_has_goldens():
    assert len(BUNDLED) == 7
    expected = {golden_of(b, n).name for b in BUNDLED for n in TASKS}
    assert {p.name for p in GOLDEN.glob("*.json")} == expected


@pytest.mark.parametrize("n", sorted(TASKS))
@pytest.mark.parametrize("backbone", BUNDLED)
def test_bundled_backbone_matches_golden(backbone, n):
    g = golden_of(backbone, n)
    r = check(backbone, n, g)
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == f"OK: {BACKBONES / backbone} matches {g}"
    snap = read_golden(g)
    assert g.read_text() == dumps_golden(snap)  # goldens are stored in canonical form
    assert snap["kind"] == "supergraph"
    assert snap["tasks"] == ["seg:seg:13", "depth:depth:1", "normal:normal:3"][:n]


def test_stored_supergraph_matches_the_same_golden(tmp_path):
    """A .mtc.onnx written by `mtc compile` is checked as is, against the backbone's golden."""
    sup = tmp_path / "tr.mtc.onnx"
    r = run("compile", BACKBONES / "tiny_resnet.onnx", "--tasks", TASKS[2], "--head-width", HEAD_WIDTH, "-o", sup)
    assert r.exit_code == 0, r.output
    r = run("check", sup, "--golden", golden_of("tiny_resnet.onnx", 2))
    assert r.exit_code == 0, r.output
    assert "OK:" in r.output


# --------------------------------------------------------------------------------- differences
def test_different_head_width_fails_with_diff():
    r = run("check", BACKBONES / "tiny_resnet.onnx", "--tasks", TASKS[2], "--head-width", "16",
            "--golden", golden_of("tiny_resnet.onnx", 2))
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[0].startswith("FAIL: ") and "differences" in lines[0]
    diff = [x.strip() for x in lines[1:-1]]
    keys = {x.split(":")[0] for x in diff}
    assert {"params.heads", "params.heads_per_task.seg", "params.heads_per_task.depth", "params.total"} <= keys
    # the backbone did not change, so neither do its numbers
    assert not keys & {"params.shared", "params.specific", "params.skip", "nodes", "vcns.count"}
    assert "--update" in lines[-1]


def test_one_more_task_names_what_changed():
    r = check("tiny_resnet.onnx", 3, golden_of("tiny_resnet.onnx", 2))
    assert r.exit_code == 1
    out = r.output
    assert "tasks: added normal:normal:3" in out
    assert "outputs.normal: added (float[N,3,64,64])" in out
    assert "params.heads_per_task.normal: added (" in out
    g2, g3 = read_golden(golden_of("tiny_resnet.onnx", 2)), read_golden(golden_of("tiny_resnet.onnx", 3))
    old, new = g2["params"]["specific"], g3["params"]["specific"]
    assert f"params.specific: {old} -> {new} ({new - old:+d})" in out
    assert "ops.ai.mtc::Gate" not in out  # one gate per VCN, whatever the task count


def test_tampered_golden_numbers(tmp_path):
    g = tmp_path / "g.json"
    data = read_golden(golden_of("tiny_resnet.onnx", 2))
    shared, gates = data["params"]["shared"], data["ops"]["ai.mtc::Gate"]
    data["params"]["shared"] -= 64
    data["ops"]["ai.mtc::Gate"] += 1
    data["ops"]["Sigmoid"] = 2
    del data["ops"]["MaxPool"]
    write_golden(g, data)
    r = check("tiny_resnet.onnx", 2, g)
    assert r.exit_code == 1
    diff = [x.strip() for x in r.output.splitlines()[1:-1]]
    assert diff == [
        "ops.MaxPool: added (1)",
        "ops.Sigmoid: removed (was 2)",
        f"ops.ai.mtc::Gate: {gates + 1} -> {gates} (-1)",
        f"params.shared: {shared - 64} -> {shared} (+64)",
    ]


def test_update_rewrites_and_reports(tmp_path):
    g = tmp_path / "g.json"
    data = read_golden(golden_of("tiny_resnet.onnx", 2))
    data["nodes"] += 5
    g.write_text(json.dumps(data))  # not canonical formatting either
    r = check("tiny_resnet.onnx", 2, g, "--update")
    assert r.exit_code == 0, r.output
    assert f"nodes: {data['nodes']} -> {data['nodes'] - 5} (-5)" in r.output
    assert f"updated {g}: 1 difference accepted" in r.output
    assert g.read_text() == golden_of("tiny_resnet.onnx", 2).read_text()
    r = check("tiny_resnet.onnx", 2, g, "--update")
    assert r.exit_code == 0 and "is up to date" in r.output
    assert check("tiny_resnet.onnx", 2, g).exit_code == 0


def test_update_creates_missing_golden(tmp_path):
    g = tmp_path / "sub" / "new.json"
    r = check("tiny_densenet.onnx", 2, g, "--update")
    assert r.exit_code == 0, r.output
    assert "new golden" in r.output
    assert g.read_text() == golden_of("tiny_densenet.onnx", 2).read_text()
    assert [p.name for p in g.parent.iterdir()] == ["new.json"]  # no temporary files left


def test_plain_model_snapshot(tmp_path):
    g = tmp_path / "plain.json"
    assert run("check", BACKBONES / "tiny_resnet.onnx", "--golden", g, "--update").exit_code == 0
    snap = read_golden(g)
    assert snap["kind"] == "model"
    assert snap["params"] == {"total": 143626}  # = mtc inspect's params
    assert snap["branch_points"]["count"] == len(snap["branch_points"]["names"]) == 22
    assert "vcns" not in snap and "tasks" not in snap
    assert snap["inputs"] == {"input": "float[N,3,64,64]"}
    r = run("check", BACKBONES / "tiny_resnet.onnx", "--golden", g)
    assert r.exit_code == 0 and "OK:" in r.output
    # a plain model checked against a supergraph golden: the kind is the first line of the diff
    r = run("check", BACKBONES / "tiny_resnet.onnx", "--golden", golden_of("tiny_resnet.onnx", 2))
    assert r.exit_code == 1
    assert r.output.splitlines()[1].strip() == "kind: supergraph -> model"


# ------------------------------------------------------------------------------ bad golden / input
def _one_error_line(r) -> str:
    assert r.exit_code == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtc: error: ")
    return err[0]


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["does not exist", "--update"]),
        ("{\n  \"schema\": 1,\n", ["not valid JSON", "line"]),
        ("[1, 2]", ["JSON list", "schema"]),
        ('{"schema": 99}', ["schema 99", f"schema {SCHEMA_VERSION}", "--update"]),
        ('{"nodes": 3}', ["schema null"]),
    ],
    ids=["missing", "truncated", "not-object", "future-schema", "no-schema"],
)
def test_bad_golden_is_one_line_exit_2(tmp_path, content, words):
    g = tmp_path / "g.json"
    if content is not None:
        g.write_text(content)
    r = CliRunner().invoke(main, ["check", str(BACKBONES / "tiny_resnet.onnx"), "--golden", str(g)])
    line = _one_error_line(r)
    assert str(g) in line
    for w in words:
        assert w in line
    assert r.stdout == ""


def test_update_replaces_corrupt_golden(tmp_path):
    g = tmp_path / "g.json"
    g.write_text("not json")
    r = check("tiny_resnet.onnx", 2, g, "--update")
    assert r.exit_code == 0 and "not a usable golden" in r.output
    assert g.read_text() == golden_of("tiny_resnet.onnx", 2).read_text()


def test_tasks_with_a_supergraph_and_options_without_tasks(tmp_path):
    sup = tmp_path / "s.mtc.onnx"
    run("compile", BACKBONES / "tiny_resnet.onnx", "--tasks", "seg", "--head-width", "8", "-o", sup)
    g = golden_of("tiny_resnet.onnx", 2)
    line = _one_error_line(CliRunner().invoke(main, ["check", str(sup), "--tasks", "seg", "--golden", str(g)]))
    assert "already a compiled supergraph" in line
    line = _one_error_line(CliRunner().invoke(
        main, ["check", str(BACKBONES / "tiny_resnet.onnx"), "--head-width", "8", "--golden", str(g)]))
    assert "--tasks" in line
    line = _one_error_line(CliRunner().invoke(
        main, ["check", str(BACKBONES / "tiny_resnet.onnx"), "--tasks", "seg,seg", "--golden", str(g)]))
    assert "duplicate" in line


def test_exit_codes_through_the_installed_entry_point(tmp_path):
    """The command as a CI job runs it: a separate process whose exit status is 1 on a difference."""
    g = tmp_path / "g.json"
    shutil.copy(golden_of("tiny_resnet.onnx", 2), g)
    cmd = [sys.executable, "-m", "mtc.cli", "check", str(BACKBONES / "tiny_resnet.onnx"), "--tasks", TASKS[2],
           "--head-width", HEAD_WIDTH, "--golden", str(g)]
    data = json.loads(g.read_text())
    data["vcns"]["count"] = 19
    g.write_text(json.dumps(data))
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 1 and "vcns.count: 19 -> 20 (+1)" in p.stdout


# ------------------------------------------------------------------------------- snapshot / compare
def test_snapshot_is_deterministic_and_exact():
    kw = {"tasks": TASKS[3], "head_width": 8}
    a = snapshot(load_model(str(BACKBONES / "tiny_mobilenetv2.onnx"), **kw))
    b = snapshot(load_model(str(BACKBONES / "tiny_mobilenetv2.onnx"), **kw))
    assert a == b and dumps_golden(a) == dumps_golden(b)
    assert json.loads(dumps_golden(a)) == a  # JSON-ready as is
    assert all(isinstance(x, bool | int | str) for x in _leaves(a))  # no floats: comparisons are exact
    assert compare(a, b) == []
    # the counts agree with each other
    assert sum(a["ops"].values()) == a["nodes"]
    assert a["ops"]["ai.mtc::Gate"] == a["vcns"]["count"] == sum(a["vcns"]["units"].values())
    assert a["vcns"]["choices"] == 3 * a["vcns"]["count"]
    p = a["params"]
    assert p["heads"] == sum(p["heads_per_task"].values())
    assert p["specific"] == 3 * p["shared"]  # every shared unit has one copy per task
    assert a["macs"]["all_shared"] <= a["macs"]["all_specific"]


def test_compare_formats():
    old = {"schema": 1, "ops": {"Conv": 3, "ai.mtc::Gate": 20}, "tasks": ["a:seg:13", "b:depth:1"],
           "feature": "x", "options": {"per_task_norm": False}, "params": {"shared": 10}}
    new = {"schema": 1, "ops": {"Conv": 3, "ai.mtc::Gate": 21, "Relu": 2}, "tasks": ["b:depth:1", "a:seg:13"],
           "feature": "y", "options": {"per_task_norm": True}}
    assert compare(old, new) == [
        "feature: x -> y",
        "ops.Relu: added (2)",
        "ops.ai.mtc::Gate: 20 -> 21 (+1)",
        "options.per_task_norm: false -> true",
        "params.shared: removed (was 10)",
        "tasks: order changed: [a:seg:13, b:depth:1] -> [b:depth:1, a:seg:13]",
    ]
    assert compare({"n": 1}, {"n": True}) == ["n: 1 -> true"]  # a bool is not the int 1 here
    assert compare({"t": ["a", "b"]}, {"t": ["b", "c"]}) == ["t: removed a; added c"]
    assert compare({"kind": "model", "a": 1}, {"kind": "supergraph", "a": 2})[0] == "kind: model -> supergraph"


def test_read_golden_errors_name_the_file(tmp_path):
    with pytest.raises(MtcError, match="does not exist"):
        read_golden(tmp_path / "none.json")
    with pytest.raises(MtcError, match="directory"):
        read_golden(tmp_path)
