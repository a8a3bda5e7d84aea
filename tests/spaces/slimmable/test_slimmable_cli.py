"""The user's commands, as a user runs them: compile, search (supernet, predictor, figures), export for
two budgets and preferences and for a width file, the static baseline, and every bad input as one line
with exit code 2 and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BACKBONES, invoke_mtc

from mtc.ir import io
from mtc.ir.cost import model_cost

DATA = "scenes?n_train=12&n_val=8"
TASKS = "seg:seg:4,depth:depth:1"
SEARCH = ["--steps", "2", "--batch-size", "4", "--predictor-samples", "10", "--predictor-epochs", "20",
          "--preferences", "3", "--sweep-levels", "2", "--sweep-repeats", "1", "--calib-batches", "1",
          "--pool", "6", "--cycles", "3", "--quiet"]


def _mtc(*args: str, cwd, check: bool = False):
    """``mtc ARGS`` in this process (tests/conftest.py: invoke_mtc)."""
    return invoke_mtc(*args, cwd=cwd, check=check)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("slim")
    _mtc("compile", str(BACKBONES / "tiny_resnet.onnx"), "--input-shape", "1,3,32,32", "--tasks", TASKS,
         "--head-width", "8", "--space", "slimmable", "-o", "s.mtc.onnx", cwd=d, check=True)
    r = _mtc("search", "s.mtc.onnx", "--data", DATA, "--run-dir", "run", *SEARCH, cwd=d, check=True)
    assert "encoder and" in r.stdout and "decoder width choices" in r.stdout
    return d


def test_search_writes_the_supernet_predictor_and_controllability_figures(run):
    rd = run / "run"
    for f in ("checkpoints/search.safetensors", "plan.json", "predictor.safetensors", "predictor.json",
              "controllability.json", "controllability.png", "marginal.png", "predictor.png"):
        assert (rd / f).exists(), f
    rep = json.loads((rd / "controllability.json").read_text())
    assert len(rep["reference_point"]) == 2 and rep["reference"].startswith("auto")
    assert [b["budget"] for b in rep["budgets"]] == ["50%", "90%"]
    for b in rep["budgets"]:
        assert b["fits"] and len(b["rows"]) == 3 and b["hv"] >= 0 and b["hv_random"] >= 0
        assert all(r["ecmt"]["macs"] <= b["macs"] for r in b["rows"])
    assert set(rep["sweep"]["tasks"]) == {"seg", "depth"}
    pred = json.loads((rd / "predictor.json").read_text())
    assert pred["samples"] == 10 and pred["holdout"] == 2 and set(pred["holdout_spearman"]) == {"seg", "depth"}


def test_export_for_two_budgets_and_preferences(run):
    outs = {}
    for name, budget, pref in (("a", "1.2MMAC", "seg=0.8,depth=0.2"), ("b", "0.6MMAC", "seg=0.1,depth=0.9")):
        r = _mtc("export", "run", "--budget", budget, "--preference", pref, "-o", name, "--repeat", "2", cwd=run,
                 check=True)
        assert "budget asked" in r.stdout and "delivered" in r.stdout
        rep = json.loads((run / name / "report.json").read_text())
        fused = io.load(run / name / "fused.onnx")
        macs = model_cost(fused)[1]
        assert rep["fused"]["macs"] == macs == rep["choice"]["predicted_macs"] <= rep["choice"]["budget_macs"]
        assert not [n for n in fused.graph if n.op_type == "Mul" and n.name.endswith(".apply")]  # slimmed
        outs[name] = rep["choice"]
    assert outs["a"]["decoder_ratios"]["seg"] > outs["a"]["decoder_ratios"]["depth"]
    assert outs["b"]["decoder_ratios"]["depth"] > outs["b"]["decoder_ratios"]["seg"]
    assert outs["b"]["predicted_macs"] <= 0.6e6 < outs["a"]["budget_macs"]


def test_export_a_width_file_and_the_static_baseline_at_its_width(run):
    (run / "w.json").write_text(json.dumps({"widths": {"*": 0.5}}))
    _mtc("export", "run", "--widths", "w.json", "-o", "w", "--no-report", cwd=run, check=True)
    macs = model_cost(io.load(run / "w" / "fused.onnx", ), )[1]
    r = _mtc("baseline", str(BACKBONES / "tiny_resnet.onnx"), "--input-shape", "1,3,32,32", "--tasks", TASKS,
             "--head-width", "8", "--data", DATA, "--run-dir", "static", "--steps", "1", "--batch-size", "4",
             "--width", "0.5", "--quiet", cwd=run, check=True)
    base = json.loads((run / "static" / "baselines.json").read_text())
    assert base["single"] == {} and base["width"]["ratio"] == 0.5
    # the static network at width 0.5 is the supernet's uniform 0.5 sub-network (same channels, same MACs,
    # counted here without the Resize-as-MatMul rewrite the export applies)
    plain = _mtc("export", "run", "--widths", "w.json", "-o", "k", "--no-report", "--keep-resize", cwd=run,
                 check=True)
    assert plain.returncode == 0
    assert base["multi"]["macs"] == model_cost(io.load(run / "k" / "fused.onnx"))[1] < macs
    assert "hard-shared at width 0.5" in r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "1KMAC"], "below the smallest sub-network: the sub-networks cost"),
    (["--budget", "1GMAC"], "above the largest sub-network: the sub-networks cost"),
    (["--budget", "1MMAC", "--preference", "normal=1"], "'normal' is not a task (seg, depth)"),
    (["--budget", "1MMAC", "--preference", "seg=-0.5"], "a preference must be a finite number >= 0"),
    (["--budget", "lots"], "is not a MAC count"),
    (["--widths", "bad.json"], "'nope' is not a width choice"),
    (["--widths", "ratio.json"], "ratio 0.55 is not in the width list"),
    (["--widths", "ratio.json", "--budget", "1MMAC"], "excludes --budget"),
    (["--budget", "1MMAC", "--plan", "x.json"], "exclude --plan and --weights"),
])
def test_bad_export_input_is_one_line_exit_2_and_nothing_written(run, args, message):
    (run / "bad.json").write_text(json.dumps({"widths": {"*": 0.5, "nope": 1.0}}))
    (run / "ratio.json").write_text(json.dumps({"widths": {"*": 0.55}}))
    r = _mtc("export", "run", *args, "-o", "never", cwd=run)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtc: error:") and message in lines[0], r.stderr
    assert not (run / "never").exists()


def test_bad_compile_options_are_one_line_exit_2(tmp_path):
    for wl, msg in (("", "empty"), ("0,0.5", "outside (0, 1]"), ("0.5,1.5", "outside (0, 1]")):
        r = _mtc("compile", str(BACKBONES / "tiny_resnet.onnx"), "--tasks", TASKS, "--space", "slimmable",
                 "--width-list", wl, "-o", "x.mtc.onnx", cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr
        assert not (tmp_path / "x.mtc.onnx").exists()


def test_the_width_file_round_trips_through_the_plan(run):
    plan = json.loads((run / "run" / "plan.json").read_text())
    assert plan["space"] == "slimmable" and set(np.unique(list(plan["info"]["ratios"].values()))) == {1.0}


def test_mtc_check_snapshot_of_a_slimmable_supergraph(tmp_path):
    """The graph-regression snapshot (`mtc check --space slimmable`) of tiny_resnet with two tasks."""
    from pathlib import Path

    golden = Path(__file__).parent / "golden" / "tiny_resnet-2tasks.json"
    r = _mtc("check", str(BACKBONES / "tiny_resnet.onnx"), "--tasks", "seg,depth", "--head-width", "32", "--space",
             "slimmable", "--golden", str(golden), cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    snap = json.loads(golden.read_text())
    assert snap["space"] == "slimmable" and snap["width_choices"] == {"encoder": 12, "decoders": {"depth": 8, "seg": 8}}
