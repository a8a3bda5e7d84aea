"""bench/results.py: a tiny grid killed with SIGKILL in the middle of its second run resumes without
redoing finished steps, and its tables are the mean, std (ddof 1) and paired counts of the runs'
own report.json files (recomputed here with numpy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKBONES

ROOT = Path(__file__).resolve().parents[1]
GRID = {
    "backbones": [str(BACKBONES / "tiny_resnet.onnx")],
    "tasks": {"seg+depth": "seg:seg:3,depth:depth:1"},
    "seeds": [0, 1],
    # 20 training steps: after 2 the depth heads still predict ~0 (delta1 = 0 leaves Δt undefined).
    "budgets": {"tiny": {"pretrain": 2, "policy": 2, "steps": 20}},
    "data": "scenes?n_train=16&n_val=8",
    "head_width": 8,
}


def _harness(work: Path, grid: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "results.py"), "--work", str(work), "--grid",
                             str(grid)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # ten mtc processes: about 80 s of CPU
def test_a_killed_grid_resumes_without_redoing_runs_and_its_tables_are_the_runs_statistics(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(GRID))
    work = tmp_path / "work"
    first, second = work / "tiny_resnet.seg+depth.tiny.s0", work / "tiny_resnet.seg+depth.tiny.s1"
    p = _harness(work, grid)
    deadline = time.time() + 600
    while not (second / ".done-compile").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (first / ".done-report").exists()
    assert not (second / ".done-report").exists()  # killed inside the second run
    before = {f.name: f.stat().st_mtime_ns for f in first.iterdir() if f.is_file()}
    report0 = (first / "report.json").read_text()

    p = _harness(work, grid)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    assert {f.name: f.stat().st_mtime_ns for f in first.iterdir() if f.is_file() and f.name in before} == before
    assert (first / "report.json").read_text() == report0
    log = (work / "commands.log").read_text().splitlines()
    ran = [x for x in log if x.startswith(f"$ cd {first.name} ")]
    assert len(ran) == 5  # compile, search, baseline, train, report: once each

    res = json.loads((work / "results.json").read_text())
    cell = res["cells"]["tiny_resnet | seg+depth | tiny"]
    reps = [json.loads((d / "report.json").read_text()) for d in (first, second)]
    for model in ("single-task", "multi-task (hard shared)", "mtc (search)"):
        rows = [next(r for r in rep["rows"] if r["model"] == model) for rep in reps]
        for key, values in (("delta_t", [r["delta_t"] for r in rows]),
                            ("params_pct", [r["params_pct"] for r in rows]),
                            ("seg miou", [r["metrics"]["seg"]["miou"] for r in rows])):
            st = cell["models"][model][key]
            assert st["n"] == 2
            assert np.isclose(st["mean"], np.mean(values)) and np.isclose(st["std"], np.std(values, ddof=1))
    diffs = [next(r for r in rep["rows"] if r["model"] == "mtc (search)")["delta_t"]
             - next(r for r in rep["rows"] if r["model"] == "multi-task (hard shared)")["delta_t"] for rep in reps]
    assert np.isclose(cell["paired"]["delta_t"]["mean"], np.mean(diffs))
    assert cell["paired"]["searched_better"] == sum(d > 0 for d in diffs) and cell["paired"]["runs"] == 2
    md = (work / "results.md").read_text()
    assert "searched better on" in md and "mtc search super.mtc.onnx" in md


def _efficacy():
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import efficacy

    return efficacy


def test_efficacy_seeds_parse_ranges_and_lists_and_refuse_the_rest():
    ef = _efficacy()
    assert ef.parse_seeds("0-3,7,2") == [0, 1, 2, 3, 7]
    for bad in ("a", "3-1", "1-", ""):
        with pytest.raises(SystemExit, match="--seeds"):
            ef.parse_seeds(bad)


def test_every_efficacy_test_module_declares_claims_the_harness_can_run():
    ef = _efficacy()
    cl = ef.claims("all")
    assert {c["group"] for c in cl} == set(ef.MODULES)
    for c in cl:
        assert callable(c["fn"]) and c["criterion"] and c["test_seeds"] == [0, 1, 2]
    with pytest.raises(SystemExit, match="unknown group"):
        ef.claims("automtl,nope")


def test_efficacy_mode_resumes_after_a_failure_and_counts_seeds_meeting_the_threshold(tmp_path):
    """A measurement that dies keeps the finished seeds' results; the rerun measures only the rest, and
    the table is the count of seeds whose value met the criterion, with mean and std (ddof 1)."""
    ef = _efficacy()
    calls: list[int] = []
    values = {0: 0.4, 1: 0.1, 2: 0.5}

    def measure(seed: int, folder: Path) -> dict:
        calls.append(seed)
        (folder / "partial").write_text("x")  # what the run leaves in its folder
        if seed == 2 and calls.count(2) == 1:
            raise RuntimeError("killed")
        return {"value": values[seed], "met": values[seed] >= 0.3, "detail": {"v": np.float32(values[seed])}}

    cl = [{"group": "toy", "name": "toy: a claim", "fn": measure, "criterion": "value ≥ 0.3", "test": "t.py",
           "test_seeds": [0]}]
    with pytest.raises(RuntimeError):
        ef.execute(cl, [0, 1, 2], tmp_path, progress=False)
    assert calls == [0, 1, 2]
    ef.execute(cl, [0, 1, 2], tmp_path, progress=False)
    assert calls == [0, 1, 2, 2]  # seeds 0 and 1 were not redone
    (row,) = ef.collect(cl, [0, 1, 2], tmp_path)
    assert (row["runs"], row["met"], row["holds"]) == (3, 2, True)
    assert row["value"]["mean"] == pytest.approx(np.mean([0.4, 0.1, 0.5]))
    assert row["value"]["std"] == pytest.approx(np.std([0.4, 0.1, 0.5], ddof=1))
    ef.write_tables([row], tmp_path / "out" / "eff", "cmd")
    md = (tmp_path / "out" / "eff.md").read_text()
    assert "| toy: a claim | value ≥ 0.3 | 2 of 3 | yes |" in md and "s1 +0.100 ✗" in md
    assert json.loads((tmp_path / "out" / "eff.json").read_text())["claims"][0]["per_seed"][0]["detail"]["v"] == pytest.approx(0.4)
