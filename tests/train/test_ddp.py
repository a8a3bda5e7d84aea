"""``torchrun --nproc-per-node 2 -m mtc ...`` on the CPU (gloo): a search and a post-train with world
size 2 and --sync-bn end where world size 1 ends with the same global batch (float tolerance);
a resume with another world size is one line; a rank killed with SIGKILL stops the run, which then
resumes to the uninterrupted result; a failing rank stops the others with its message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BACKBONES, SEARCH_TESTS

from mtc.train.run import read_tensors

HERE = Path(__file__).resolve().parent
SEARCH = ["--pretrain-steps", "3", "--policy-steps", "3", "--batch-size", "8", "--checkpoint-every", "3", "--quiet",
          "--sync-bn"]
TRAIN = ["--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--quiet", "--sync-bn"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(SEARCH_TESTS), str(HERE), os.environ.get("PYTHONPATH", "")]),
                PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def mtc(*args: str, cwd: Path, nproc: int = 1, check: bool = True, popen: bool = False):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "mtc", *args]
    else:
        cmd = [sys.executable, "-m", "mtc", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def sg(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mtc("compile", str(BACKBONES / "tiny_densenet.onnx"), "--tasks", "a:regress:1,b:class:2", "--head-width", "8",
        "--input-shape", "1,3,32,32", "-o", "s.mtc.onnx", cwd=d)
    return d


def _close(a: Path, b: Path, *, tol: float = 1e-4) -> None:
    ta, tb = read_tensors(a)[0], read_tensors(b)[0]
    assert ta.keys() == tb.keys()
    for k in ta:
        if ta[k].is_floating_point():
            torch.testing.assert_close(tb[k], ta[k], rtol=tol, atol=tol, msg=k)
        else:
            assert torch.equal(ta[k], tb[k]), k


def _losses(run: Path) -> list[tuple[str, int, dict[str, float]]]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for key in ("loss", "policy_loss"):
            if key in r:
                out.append((r["stage"], r["step"], r[key]))
    return out


def test_world_size_2_with_sync_bn_equals_world_size_1(sg):
    data = ["--data", "tinydata:factory?n=32"]
    mtc("search", "s.mtc.onnx", *data, "--run-dir", "one", *SEARCH, cwd=sg)
    mtc("search", "s.mtc.onnx", *data, "--run-dir", "two", *SEARCH, cwd=sg, nproc=2)
    one, two = sg / "one", sg / "two"
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert "world_size" not in json.loads((one / "config.json").read_text())
    _close(one / "checkpoints/search.safetensors", two / "checkpoints/search.safetensors")
    la, lb = _losses(one), _losses(two)
    assert [x[:2] for x in la] == [x[:2] for x in lb] and len(la) >= 3
    for (_, _, a), (_, _, b) in zip(la, lb, strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert json.loads((one / "plan.json").read_text()) == json.loads((two / "plan.json").read_text())
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("mtc-rank1-*/two"))  # rank 1's copy is gone
    # post-train of the plan, world size 2 against 1
    mtc("train", "one", *TRAIN, cwd=sg)
    mtc("train", "two", *TRAIN, cwd=sg, nproc=2)
    _close(one / "checkpoints/train.safetensors", two / "checkpoints/train.safetensors")
    ma, mb = (json.loads((d / "metrics.json").read_text())["tasks"] for d in (one, two))
    for t in ma:
        for k, v in ma[t].items():
            assert mb[t][k] == pytest.approx(v, rel=1e-3, abs=1e-5), (t, k)
    # a resume with another world size: one line, nothing changed
    before = (two / "checkpoints/train.safetensors").read_bytes()
    r = mtc("train", "two", *TRAIN, "--resume", cwd=sg, check=False)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "started with 2 processes" in lines[0], r.stderr
    assert (two / "checkpoints/train.safetensors").read_bytes() == before


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_stops_the_run_and_it_resumes_to_the_same_result(sg):
    data = ["--data", "tinydata:factory?n=32"]
    long = ["--pretrain-steps", "6", "--policy-steps", "6", "--batch-size", "8", "--checkpoint-every", "2",
            "--quiet", "--sync-bn"]
    mtc("search", "s.mtc.onnx", *data, "--run-dir", "ref", *long, cwd=sg, nproc=2)
    p = mtc("search", "s.mtc.onnx", *data, "--run-dir", "killed", *long, cwd=sg, nproc=2, popen=True)
    ckpt = sg / "killed" / "checkpoints" / "search.safetensors"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before its first checkpoint"
    workers = _children(p.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one rank dies: the others must not hang
    p.wait(timeout=120)
    assert p.returncode != 0
    assert not (sg / "killed" / "plan.json").exists()
    mtc("search", "s.mtc.onnx", *data, "--run-dir", "killed", *long, "--resume", cwd=sg, nproc=2)
    _close(sg / "ref/checkpoints/search.safetensors", ckpt, tol=0)
    assert (sg / "ref/plan.json").read_text() == (sg / "killed/plan.json").read_text()


@pytest.mark.slow
def test_a_failing_rank_stops_the_others_with_its_message(sg):
    # sample 11 cannot be read; with 2 ranks it is in one rank's shard only: that rank stops with one
    # line, torchrun stops the other (blocked in a collective) instead of leaving it hanging
    r = mtc("search", "s.mtc.onnx", "--data", "ddpbad:factory", "--run-dir", "bad", *SEARCH, cwd=sg, nproc=2,
            check=False)
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("mtc: error:")]
    assert len(errors) == 1 and "--data 'ddpbad:factory': sample 11 (stream" in errors[0], r.stderr
    assert "cannot be read (OSError: disk gone)" in errors[0]
    assert not (sg / "bad" / "checkpoints").exists()
