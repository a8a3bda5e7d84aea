"""Checkpoints cannot run code: tensors are safetensors, the rest JSON; a crafted pickle in their
place is refused with one line on every command that reads one, and what it would do never happens."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from conftest import BACKBONES  # in process: a pickle runs its code there too
from conftest import invoke_mtc as run_mtc

SMALL = ["--pretrain-steps", "2", "--policy-steps", "2", "--batch-size", "4", "--checkpoint-every", "2", "--quiet"]


class Payload:
    """Unpickling this creates the file ``path``: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    run_mtc("compile", str(BACKBONES / "tiny_densenet.onnx"), "--tasks", "a:regress:1,b:class:2",
            "--head-width", "8", "--input-shape", "1,3,32,32", "-o", "s.mtc.onnx", cwd=d, check=True)
    run_mtc("search", "s.mtc.onnx", "--data", "tinydata:factory", "--run-dir", "run", *SMALL, cwd=d, check=True)
    run_mtc("train", "run", "--steps", "2", "--batch-size", "2", "--quiet", cwd=d, check=True)
    run_mtc("export", "run", "--fused", "-o", "f.onnx", "--no-report", cwd=d, check=True)
    return d


def _one_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtc: error:") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
def test_a_crafted_pickle_creates_nothing_on_any_command(tmp_path, trained, form):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    shutil.copy(trained / "s.mtc.onnx", tmp_path / "s.mtc.onnx")
    shutil.copy(trained / "f.onnx", tmp_path / "f.onnx")
    evil = tmp_path / "evil.bin"
    if form == "pickle":
        evil.write_bytes(pickle.dumps({"module": Payload(str(marker))}))
    else:
        torch.save({"module": Payload(str(marker))}, evil)
    # the crafted file really runs code when unpickled (the test would prove nothing otherwise)
    pickle.loads(pickle.dumps(Payload(str(tmp_path / "control"))))
    assert (tmp_path / "control").exists()
    for ckpt in ("search", "train"):
        shutil.copy(evil, run / "checkpoints" / f"{ckpt}.safetensors")
    # a run not trained yet: `train --keep-weights` starts from the (crafted) search checkpoint
    shutil.copytree(run, tmp_path / "fresh")
    (tmp_path / "fresh" / "checkpoints" / "train.safetensors").unlink()
    commands = [
        ["search", "s.mtc.onnx", "--data", "tinydata:factory", "--run-dir", "run", *SMALL, "--resume"],
        ["train", "run", "--steps", "2", "--batch-size", "2", "--quiet", "--resume"],
        ["train", "fresh", "--steps", "2", "--batch-size", "2", "--quiet", "--keep-weights"],
        ["export", "run", "--fused", "-o", "o.onnx", "--no-report"],
        ["export", "s.mtc.onnx", "--plan", "run/plan.json", "--weights", "evil.bin", "--fused", "-o", "o.onnx"],
        ["export", "run", "--weights", "evil.bin", "--fused", "-o", "o.onnx", "--no-report"],
        ["verify", "f.onnx", "--against", "run"],
    ]
    if form == "torch.save":  # the same refusal, whatever the pickle's container: two commands suffice
        commands = [commands[0], commands[4]]
    for args in commands:
        line = _one_line(run_mtc(*args, cwd=tmp_path))
        assert "safetensors" in line, line
        assert not marker.exists(), args
    assert not (tmp_path / "o.onnx").exists()
