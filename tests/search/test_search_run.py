"""`mtc search` / `mtc train` as a user runs them: resume after SIGKILL, NaN stop, partial labels,
bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BACKBONES, invoke_mtc

HERE = Path(__file__).resolve().parent
SMALL = ["--pretrain-steps", "6", "--policy-steps", "14", "--batch-size", "4", "--checkpoint-every", "4", "--quiet"]


# In process (the killed search below is a real process): the same command lines, exit codes and
# stderr without a Python start per command.
mtc = invoke_mtc


@pytest.fixture(scope="module")
def supergraph(tmp_path_factory):
    d = tmp_path_factory.mktemp("sg")
    mtc("compile", str(BACKBONES / "tiny_densenet.onnx"), "--tasks", "a:regress:1,b:class:2",
        "--head-width", "8", "--input-shape", "1,3,32,32", "-o", "s.mtc.onnx", cwd=d, check=True)
    return d / "s.mtc.onnx"


def test_search_then_train(tmp_path, supergraph):
    mtc("search", str(supergraph), "--data", "tinydata:factory", "--run-dir", "run", *SMALL, cwd=tmp_path,
        check=True)
    run = tmp_path / "run"
    for f in ("config.json", "super.mtc.onnx", "policy.json", "policy.png", "task_correlation.json",
              "task_correlation.png", "metrics.jsonl", "checkpoints/search.safetensors"):
        assert (run / f).exists(), f
    pol = json.loads((run / "policy.json").read_text())
    assert set(pol["tasks"]) == {"a", "b"}
    r = mtc("train", "run", "--steps", "6", "--checkpoint-every", "3", "--quiet", cwd=tmp_path, check=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"a", "b"} and metrics["params"] > 0
    assert "mse" in metrics["tasks"]["a"] and "top1" in metrics["tasks"]["b"]
    assert "parameters" in r.stdout


def test_sigkill_then_resume_gives_the_same_policy(tmp_path, supergraph):
    mtc("search", str(supergraph), "--data", "tinydata:factory", "--run-dir", "ref", *SMALL, cwd=tmp_path,
        check=True)
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "mtc.cli", "search", str(supergraph), "--data", "tinydata:factory",
                          "--run-dir", "killed", *SMALL], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "search.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
    p.wait()
    assert ckpt.exists()
    mtc("search", str(supergraph), "--data", "tinydata:factory", "--run-dir", "killed", *SMALL, "--resume",
        cwd=tmp_path, check=True)
    ref = json.loads((tmp_path / "ref" / "policy.json").read_text())
    got = json.loads((tmp_path / "killed" / "policy.json").read_text())
    assert got == ref
    # the log has no duplicated steps after the resume
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps))


def test_nan_stops_with_task_and_iteration_and_keeps_checkpoint(tmp_path, supergraph):
    r = mtc("search", str(supergraph), "--data", "tinydata:factory?nan_after=30", "--run-dir", "run",
            "--pretrain-steps", "20", "--policy-steps", "0", "--batch-size", "4", "--checkpoint-every", "2",
            "--quiet", cwd=tmp_path)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    import re


    m = re.search(r"loss of task 'a' is nan at pretrain iteration (\d+)", line)
    assert m, line
    failed_at = int(m.group(1))
    assert failed_at >= 2
    from mtc.train.run import read_tensors

    _, state = read_tensors(tmp_path / "run" / "checkpoints" / "search.safetensors")
    assert state["step"] == failed_at - failed_at % 2  # the last good checkpoint, not overwritten


def test_partial_labels(tmp_path, supergraph):
    mtc("search", str(supergraph), "--data", "tinydata:factory?label_fraction=0.3", "--run-dir", "run", *SMALL,
        cwd=tmp_path, check=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(v == v for rec in log if "loss" in rec for v in rec["loss"].values())  # finite, no NaN


@pytest.mark.parametrize("setup,args,needle", [
    (None, ["--data", "no_such_module:f"], "cannot import module"),
    (None, ["--data", "tinydata:factory?extra_task=true"], "zzz"),
])
def test_search_bad_input(tmp_path, supergraph, setup, args, needle):
    r = mtc("search", str(supergraph), *args, "--run-dir", "run", *SMALL, cwd=tmp_path)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_run_dir_of_another_supergraph_and_corrupt_checkpoint(tmp_path, supergraph):
    mtc("search", str(supergraph), "--data", "tinydata:factory", "--run-dir", "run", *SMALL, cwd=tmp_path,
        check=True)
    other = tmp_path / "other.mtc.onnx"
    mtc("compile", str(BACKBONES / "tiny_densenet.onnx"), "--tasks", "a:regress:1,b:class:3", "--head-width", "8",
        "--input-shape", "1,3,32,32", "-o", str(other), cwd=tmp_path, check=True)
    r = mtc("search", str(other), "--data", "tinydata:factory", "--run-dir", "run", "--resume", *SMALL, cwd=tmp_path)
    assert r.returncode == 2 and "different supergraph" in r.stderr
    good = (tmp_path / "run" / "checkpoints" / "search.safetensors").read_bytes()
    (tmp_path / "run" / "checkpoints" / "search.safetensors").write_bytes(good[: len(good) // 3])
    r = mtc("search", str(supergraph), "--data", "tinydata:factory", "--run-dir", "run", "--resume", *SMALL,
            cwd=tmp_path)
    assert r.returncode == 2 and "corrupt checkpoint" in r.stderr
    r = mtc("train", "run", "--policy", str(tmp_path / "nope.json"), cwd=tmp_path)
    assert r.returncode == 2 and "nope.json" in r.stderr


def test_baseline_train_with_delta_and_report(tmp_path, supergraph):
    args = ["--steps", "4", "--batch-size", "4", "--quiet"]
    mtc("baseline", str(BACKBONES / "tiny_densenet.onnx"), "--tasks", "a:regress:1,b:class:2", "--head-width", "8",
        "--input-shape", "1,3,32,32", "--data", "tinydata:factory", "--run-dir", "base", *args, cwd=tmp_path,
        check=True)
    base = json.loads((tmp_path / "base" / "baselines.json").read_text())
    assert set(base["single"]) == {"a", "b"} and base["multi"]["params"] < sum(
        base["single"][t]["params"] for t in ("a", "b"))
    mtc("search", str(supergraph), "--data", "tinydata:factory", "--run-dir", "run", *SMALL, cwd=tmp_path, check=True)
    mtc("train", "run", "--baselines", "base", *args, cwd=tmp_path, check=True)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(m["delta_t_i"]) == {"a", "b"}
    assert m["delta_t"] == pytest.approx(sum(m["delta_t_i"].values()) / 2)
    r = mtc("report", "base", "run", "--out", "rep", cwd=tmp_path, check=True)
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [row["model"] for row in rep["rows"]] == ["single-task", "multi-task (hard shared)", "mtc (run)"]
    assert rep["rows"][2]["delta_t"] == pytest.approx(m["delta_t"], abs=0.01)
    assert "Δt %" in (tmp_path / "rep.md").read_text() and "single-task" in r.stdout


def test_amp_fp16_needs_cuda(tmp_path, supergraph):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = mtc("search", str(supergraph), "--data", "tinydata:factory", "--run-dir", "run", "--amp", "fp16", *SMALL,
            cwd=tmp_path)
    assert r.returncode == 2 and "--amp fp16 needs a CUDA device" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_amp_bf16_search_on_cpu_runs_and_its_loss_falls(tmp_path, supergraph):
    mtc("search", str(supergraph), "--data", "tinydata:factory?n=64", "--run-dir", "run", "--amp",
        "--pretrain-steps", "11", "--policy-steps", "1", "--batch-size", "8", "--checkpoint-every", "50", "--quiet",
        cwd=tmp_path, check=True)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pre = [r for r in recs if r.get("stage") == "pretrain" and "loss" in r]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["search"]["amp"] == "bf16"
    assert pre[-1]["loss"]["a"] < 0.5 * pre[0]["loss"]["a"], pre  # the regression task learns fast
    assert sum(pre[-1]["loss"].values()) < sum(pre[0]["loss"].values()), pre
