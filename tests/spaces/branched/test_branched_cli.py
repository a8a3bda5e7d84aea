"""The branched flow as a user runs it: compile, baseline, search (rsa with budgets and random trees,
gumbel), train each tree from the single-task models, report params and Δt per tree, export the
tree; and every bad input of the issue as one line with exit code 2 and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import BACKBONES, invoke_mtc

from mtc.ir import io

DATA = "scenes?n_train=16&n_val=8"
TASKS = "seg:seg:4,reg:regress:1,far:regress:1"
SHAPE = ["--input-shape", "1,3,32,32"]
RUN = ["--batch-size", "4", "--quiet"]


def _mtc(*args: str, cwd, check: bool = False):
    """``mtc ARGS`` in this process (tests/conftest.py: invoke_mtc)."""
    return invoke_mtc(*args, cwd=cwd, check=check)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    d = tmp_path_factory.mktemp("branched")
    _mtc("compile", str(BACKBONES / "tiny_resnet.onnx"), *SHAPE, "--tasks", TASKS, "--head-width", "8",
         "--space", "branched", "-o", "b.mtc.onnx", cwd=d, check=True)
    _mtc("baseline", str(BACKBONES / "tiny_resnet.onnx"), *SHAPE, "--tasks", TASKS, "--head-width", "8",
         "--data", DATA, "--run-dir", "base", "--steps", "3", *RUN, cwd=d, check=True)
    r = _mtc("search", "b.mtc.onnx", "--data", DATA, "--run-dir", "rsa", "--baselines", "base", "--rsa-images", "8",
             "--budget", "2x", "--budgets", "1.2x,2.5x", "--random-trees", "1", *RUN, cwd=d, check=True)
    return d, r.stdout


def test_rsa_search_prints_the_tree_and_writes_its_outputs(flow):
    d, out = flow
    rd = d / "rsa"
    for f in ("plan.json", "tree.json", "tree.png", "affinity.json", "affinity.png", "affinity_1.png",
              "affinity_4.png", "trees/budget-1.2x/plan.json", "trees/budget-2.5x/tree.png",
              "trees/random-1/plan.json", "trees/random-1/super.mtc.onnx"):
        assert (rd / f).exists(), f
    tree = json.loads((rd / "tree.json").read_text())
    assert tree["budget"] == "2x" and tree["params"] <= 2 * tree["limits"][0]
    assert tree["trees_total"] == 35 and 0 < tree["trees_within_budget"] <= 35  # 3 tasks, 4 locations
    assert "block1 (stem.1)" in out and "trees within the budget 2x of 35 in all, searched exactly in" in out
    A = json.loads((rd / "affinity.json").read_text())["affinity"]
    assert len(A) == 4 and all(len(a) == 3 and a[0][0] == 1.0 for a in A)
    # the random tree has the chosen tree's size
    rnd = json.loads((rd / "trees/random-1/tree.json").read_text())
    assert [len(p) for p in rnd["levels"]] == [len(p) for p in tree["levels"]] and rnd["params"] == tree["params"]
    for b in ("1.2x", "2.5x"):
        t = json.loads((rd / f"trees/budget-{b}/tree.json").read_text())
        assert t["params"] <= float(b[:-1]) * tree["limits"][0]


def test_each_tree_trains_from_the_baselines_and_the_report_shows_params_and_delta(flow):
    d, _ = flow
    for run in ("rsa", "rsa/trees/budget-2.5x"):
        _mtc("train", run, "--steps", "2", "--baselines", "base", "--init-from-baselines", "base", *RUN, cwd=d,
             check=True)
    r = _mtc("report", "base", "rsa", "rsa/trees/budget-2.5x", "--out", "rep", cwd=d, check=True)
    assert "mtc (rsa)" in r.stdout and "mtc (budget-2.5x)" in r.stdout
    rep = json.loads((d / "rep.json").read_text())
    rows = {row["model"]: row for row in rep["rows"]}
    tree = json.loads((d / "rsa/trees/budget-2.5x/tree.json").read_text())
    assert rows["mtc (budget-2.5x)"]["params"] == tree["params"] and "delta_t" in rows["mtc (budget-2.5x)"]


def test_the_exported_tree_has_one_copy_per_group_and_is_verified(flow):
    d, _ = flow
    run = d / "rsa" / "trees" / "budget-2.5x"
    if not (run / "checkpoints" / "train.safetensors").exists():
        _mtc("train", str(run), "--steps", "2", *RUN, cwd=d, check=True)
    r = _mtc("export", str(run), "-o", "out", "--repeat", "2", cwd=d, check=True)
    assert "fused.onnx: verified against the lowering" in r.stdout
    tree = json.loads((run / "tree.json").read_text())
    convs = [1, 4, 5, 5]  # per block of tiny_resnet (tests/spaces/branched/test_branched_space.py)
    fused = io.load(d / "out" / "fused.onnx")
    encoder = [n for n in fused.graph if n.op_type == "Conv" and not (n.name or "").startswith("head@")]
    assert len(encoder) == sum(c * len(p) for c, p in zip(convs, tree["levels"], strict=True))


def test_gumbel_search_writes_a_tree(flow):
    d, _ = flow
    r = _mtc("search", "b.mtc.onnx", "--strategy", "gumbel", "--data", DATA, "--run-dir", "gum", "--warmup-steps",
             "2", "--search-steps", "3", *RUN, cwd=d, check=True)
    assert "block4 (layers.5/relu_1)" in r.stdout
    for f in ("plan.json", "tree.json", "tree.png", "affinity.png", "selection.json", "checkpoints/search.safetensors"):
        assert (d / "gum" / f).exists(), f
    tree = json.loads((d / "gum" / "tree.json").read_text())
    assert len(tree["probabilities"]) == 4 and len(tree["probabilities"][0]) == 3


@pytest.mark.parametrize("args,needle", [
    (["--budget", "0.5x"], "--budget 0.5x: "),
    (["--budget", "9x"], "is above the single-task models' size (limits: "),
    (["--budgets", "1.5x,20000000"], "--budgets 20000000: 20,000,000 parameters is above the single-task"),
    (["--budget", "1.5y"], "expected a number or a multiple of the hard-shared model"),
    (["--rsa-images", "50"], "--rsa-images 50: the validation set has only 8 images"),
    (["--baselines", "nope"], "--baselines: no baselines.json: not an mtc baseline run directory"),
    (["--baselines", "other"], "(another task set)"),
])
def test_bad_search_input_is_one_line_and_writes_nothing(flow, args, needle):
    d, _ = flow
    if "other" in args and not (d / "other").exists():
        shutil.copytree(d / "base", d / "other")
        meta = json.loads((d / "other" / "baselines.json").read_text())
        meta["tasks"] = ["seg", "reg"]
        (d / "other" / "baselines.json").write_text(json.dumps(meta))
    r = _mtc("search", "b.mtc.onnx", "--data", DATA, "--run-dir", "bad", "--rsa-images", "4", *args, *RUN, cwd=d)
    assert r.exit_code == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (d / "bad").exists()
    if args[1] == "0.5x":
        assert "is below the hard-shared model's size (limits: " in r.stderr


def test_bad_compile_input_is_one_line(flow):
    d, _ = flow
    r = _mtc("compile", str(BACKBONES / "tiny_resnet.onnx"), *SHAPE, "--tasks", TASKS, "--head-width", "8",
             "--space", "branched", "--locations", "layers.0/relu", "-o", "x.mtc.onnx", cwd=d)
    assert r.exit_code == 2 and "the nearest cut points are pool, layers.0/add" in r.stderr
    r = _mtc("compile", str(BACKBONES / "tiny_resnet.onnx"), *SHAPE, "--tasks", "seg:seg:4", "--space", "branched",
             "-o", "y.mtc.onnx", cwd=d)
    assert r.exit_code == 2 and "at least two tasks" in r.stderr
    assert not (d / "x.mtc.onnx").exists() and not (d / "y.mtc.onnx").exists()


def test_init_from_baselines_of_a_space_without_the_hook_is_refused():
    from mtc.errors import MtcError
    from mtc.spaces import get_space

    with pytest.raises(MtcError, match="--init-from-baselines: space 'automtl' cannot start its plans from "
                                       "single-task models"):
        get_space("automtl").init_from_baselines(None, None, "x")  # type: ignore[arg-type]
