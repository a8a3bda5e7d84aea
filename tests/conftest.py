from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one intra-op thread each (and for the `mtc` processes
    # they start), so that they do not fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ROOT / "backbones"

warnings.filterwarnings("ignore", module="torch")


def parse(text: str) -> ir.Model:
    """An IR model from ONNX text syntax (``onnx.parser``)."""
    return ir.from_proto(onnx.parser.parse_model(text))


def run_ort(model: ir.Model | onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


SEARCH_TESTS = Path(__file__).resolve().parent / "search"


def run_mtc(*args: str, cwd, check: bool = False, **kw):
    """Run the `mtc` CLI in a subprocess as a user would; tests/search (the `tinydata` plug-in) is importable."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(SEARCH_TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "mtc.cli", *args], capture_output=True, text=True, cwd=cwd,
                       env=env, **kw)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def invoke_mtc(*args: str, cwd, check: bool = False):
    """``mtc ARGS`` in ``cwd``, in this process, on one intra-op thread (small convolutions on shared
    cores): the installed command's exit code and stderr without a process start. An exception that
    is not the CLI's exit is raised (a bug, not bad input). ``returncode`` mirrors ``exit_code``."""
    from click.testing import CliRunner

    from mtc.cli import main

    if str(SEARCH_TESTS) not in sys.path:  # the `tinydata` plug-in, as run_mtc's PYTHONPATH has it
        sys.path.append(str(SEARCH_TESTS))
    old = os.getcwd()
    os.chdir(cwd)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)
        torch.set_num_threads(n)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    if check:
        assert r.exit_code == 0, r.stderr + r.stdout
    r.returncode = r.exit_code  # type: ignore[attr-defined]
    return r


class Four(torch.utils.data.Dataset):
    """Random images with four learnable targets (two regressions, two classifications)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        m = self.x.mean((2, 3))
        self.t = {"a": m[:, :1] * 10, "b": (m[:, 0] > 0).long() + (m[:, 1] > 0).long(),
                  "c": m[:, 1:] * 10, "d": (m[:, 2] > 0).long()}

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {k: v[i] for k, v in self.t.items()}


#: The reference nets whose torch.onnx *dynamo* export runs in `make test`; the dynamo variants of
#: the other nets (3-6 s each, 67 tests, ~180 s) are `slow` (`make test-slow`). The TorchScript
#: export of every net stays in `make test`, and these four cover the dynamo exporter's op forms
#: (plain convolutions, depthwise + inverted residuals, concatenation, and the opset-20 Gelu that
#: import decomposes).
DYNAMO_IN_DEFAULT_RUN = frozenset({"tiny_resnet", "inverted_residual", "concat_heavy", "layernorm_gelu"})


#: Modules of minutes-long tests, started first so that parallel workers do not end on them.
FIRST = ("search/test_efficacy.py", "train/test_ddp.py", "spaces/branched/test_branched_efficacy.py",
         "spaces/allocation/test_allocation_efficacy.py", "test_errors.py")


def pytest_collection_modifyitems(config, items):
    rank = {m: i for i, m in enumerate(FIRST)}
    items.sort(key=lambda it: next((rank[m] for m in FIRST if it.nodeid.startswith("tests/" + m)), len(FIRST)))
    slow = pytest.mark.slow
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        exporter = params.get("exporter", params.get("dynamo"))
        dynamo = exporter is True or (isinstance(exporter, str) and exporter.startswith("dynamo"))
        name = params.get("name")
        if dynamo and name is not None and name not in DYNAMO_IN_DEFAULT_RUN:
            item.add_marker(slow)
