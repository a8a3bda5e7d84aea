"""Both flows as a user runs them (README): compile, search, train, export, for the partition space
(es with the distillation proxy) and the allocation space (gumbel); and every bad input of issue 14
as one line with exit code 2 and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import invoke_mtc

NET = "mtc.spaces.allocation.nets:digits_mlp"
COMPILE = [NET, "--input-shape", "1,1,8,8", "--tasks", "digit:class,rotated:class:4", "--head-width", "8",
           "--feature", "relu_2"]
ES = ["--strategy", "es", "--es-steps", "1", "--directions", "2", "--random-samples", "2", "--teacher-steps", "5",
      "--distill-steps", "3", "--score-batches", "1", "--solver-iters", "50", "--quiet"]


def _mtc(*args: str, cwd):
    """``mtc ARGS`` in this process (tests/conftest.py: invoke_mtc)."""
    return invoke_mtc(*args, cwd=cwd)


def _ok(*args: str, cwd):
    r = _mtc(*args, cwd=cwd)
    assert r.exit_code == 0, r.stderr + r.stdout
    return r


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    d = tmp_path_factory.mktemp("flows")
    _ok("compile", *COMPILE, "--space", "partition", "--sites", "all", "-o", "p.mtc.onnx", cwd=d)
    r = _ok("search", "p.mtc.onnx", "--data", "digits", "--run-dir", "prun", *ES, "--init", "best-random", cwd=d)
    assert "mean channel use" in r.stdout
    _ok("train", "prun", "--steps", "2", "--quiet", cwd=d)
    _ok("export", "prun", "-o", "pout", "--repeat", "2", cwd=d)
    _ok("compile", *COMPILE, "--space", "allocation", "--sites", "all", "--components", "4", "-o", "a.mtc.onnx",
        cwd=d)
    r = _ok("search", "a.mtc.onnx", "--data", "digits", "--run-dir", "arun", "--steps", "3", "--quiet", cwd=d)
    assert "active allocations" in r.stdout
    _ok("train", "arun", "--steps", "2", "--quiet", cwd=d)
    _ok("export", "arun", "-o", "aout", "--repeat", "2", cwd=d)
    return d


def test_partition_flow_writes_samples_figure_plan_and_smaller_task_models(flows):
    from mtc.ir import io

    samples = [json.loads(x) for x in (flows / "prun" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 + 4
    # --init best-random: the first ES pair straddles the better random sample
    best = max(samples[:2], key=lambda r: (r["score"], -r["index"]))
    mid = (np.array(samples[2]["P"]) + np.array(samples[3]["P"])) / 2
    inside = (np.array(samples[2]["P"]) > 0) & (np.array(samples[2]["P"]) < 1) & (np.array(samples[3]["P"]) > 0) \
        & (np.array(samples[3]["P"]) < 1)
    assert inside.any()
    np.testing.assert_allclose(mid[inside], np.array(best["P"])[inside], atol=2e-6)
    plan = json.loads((flows / "prun" / "plan.json").read_text())
    assert (flows / "prun" / "samples.png").is_file()
    for t in ("digit", "rotated"):
        m = io.load(str(flows / "pout" / f"{t}.onnx"))
        l1 = next(n for n in m.graph if n.name == "l1")
        assert l1.inputs[1].const_value.shape[0] == len(plan["masks"]["relu"][t])
    report = json.loads((flows / "pout" / "report.json").read_text())
    assert report


def test_allocation_flow_writes_embeddings_and_allocated_task_models(flows):
    from mtc.ir import io

    emb = json.loads((flows / "arun" / "task_embeddings.json").read_text())
    e = np.array(emb["embeddings"], dtype=float)
    assert e.shape == (2, 12)
    n = np.linalg.norm(e, axis=1)
    want = (e @ e.T) / np.outer(np.where(n > 0, n, 1), np.where(n > 0, n, 1))
    np.testing.assert_allclose(emb["similarity"], want, atol=1e-5)
    assert emb["distinct"] == len({tuple(r) for r in e.tolist()})
    assert (flows / "arun" / "task_embeddings.png").is_file() and (flows / "arun" / "task_similarity.png").is_file()
    plan = json.loads((flows / "arun" / "plan.json").read_text())
    for t in ("digit", "rotated"):
        m = io.load(str(flows / "aout" / f"{t}.onnx"))
        l1 = next(n for n in m.graph if n.name == "l1")
        assert l1.inputs[1].const_value.shape[0] == len(plan["masks"]["relu"][t])


@pytest.mark.parametrize("args, needle", [
    (["--init", "1 2; 2 1"], "--init must lie in [0, 1]: entry (0, 1) is 2"),
    (["--init", "1 0.5 0.5; 0.5 1 0.5; 0.5 0.5 1"], "--init must be square in the task count (2x2), got 3x3"),
    (["--baselines", "."], "not an mtc baseline run directory"),
    (["--init", "best-random", "--random-samples", "0"], "--init best-random starts from the best of the --random-samples: give at least one"),
])
def test_bad_search_input_is_one_line_and_writes_nothing(flows, args, needle):
    r = _mtc("search", "p.mtc.onnx", "--data", "digits", "--run-dir", "bad", *ES, *args, cwd=flows)
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (flows / "bad").exists()


def test_bad_compile_and_budget_input_is_one_line(flows):
    r = _mtc("compile", *COMPILE, "--space", "allocation", "--components", "100", "--sites", "all", "-o", "x.onnx",
             cwd=flows)
    assert r.exit_code == 2 and "--components 100 is larger than site 'relu_2' (group 'l3': 64 channels)" in r.stderr
    r = _mtc("compile", *COMPILE, "--space", "partition", "--sites", "head@digit/fc", "-o", "x.onnx", cwd=flows)
    assert r.exit_code == 2 and "cannot hold a per-task mask: it is not prunable: graph output 'digit'" in r.stderr
    r = _mtc("compile", *COMPILE, "--space", "partition", "--sites", "nothing", "-o", "x.onnx", cwd=flows)
    assert r.exit_code == 2 and "'nothing' is neither a channel group nor a tensor" in r.stderr
    assert not (flows / "x.onnx").exists()
    for b in ("1.5", "0"):
        r = _mtc("search", "a.mtc.onnx", "--data", "digits", "--run-dir", "bad", "--budget", b, cwd=flows)
        assert r.exit_code == 2 and "--budget" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (flows / "bad").exists()


def test_a_plan_with_a_bad_p_is_refused(flows):
    plan = json.loads((flows / "prun" / "plan.json").read_text())
    plan["info"]["P"] = [[1.0, 0.5, 0.1]]
    (flows / "badplan.json").write_text(json.dumps(plan))
    r = _mtc("export", "p.mtc.onnx", "--plan", "badplan.json", "-o", "badout", cwd=flows)
    assert r.exit_code == 2 and "must be square in the task count (2x2), got 1x3" in r.stderr, r.stderr
    assert not (flows / "badout").exists()
