"""The lowering benchmark runs end to end (tiny settings) and writes its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_lowering_benchmark_smoke(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import lowering  # bench/lowering.py

    out = tmp_path / "lowering.json"
    threads = torch.get_num_threads()
    try:
        rc = lowering.main(["--models", "residual", "--exporter", "torchscript", "--repeats", "5", "--warmup", "1",
                            "--batch", "2", "--threads", "1", "--out", str(out)])
    finally:  # the benchmark pins process-wide settings
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    data = json.loads(out.read_text())
    assert [r["case"] for r in data["rows"]] == ["residual (torchscript)"]
    row = data["rows"][0]
    assert row["ratio"] > 0 and row["steps"] == 5
    assert rc == (0 if data["ok"] else 1)
    assert "| residual (torchscript)" in capsys.readouterr().out
    sys.modules.pop("lowering", None)
    sys.modules.pop("common", None)
