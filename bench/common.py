"""Shared timing helpers for mtc's benchmarks: fixed threads, warm-up, interleaved medians, ratio tables.

Every benchmark reports ratios against a baseline measured in the same run, interleaving the
candidates step by step so that drift (thermal, other load) hits them alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mtc.timing import time_interleaved  # noqa: E402, F401  (re-exported for the benchmarks)


def setup(threads: int | None = None, seed: int = 0) -> int:
    """Pin the thread count, flush denormals, seed torch; returns the thread count used."""
    n = threads or min(os.cpu_count() or 1, 8)
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    return n


def median_ms(ts: Sequence[float]) -> float:
    return statistics.median(ts) * 1e3


def ratio_rows(times: dict[str, dict[str, list[float]]], *, candidate: str, baseline: str) -> list[dict[str, Any]]:
    """One row per case: median ms of candidate and baseline and their ratio."""
    rows = []
    for case, t in times.items():
        c, b = median_ms(t[candidate]), median_ms(t[baseline])
        rows.append({"case": case, f"{candidate}_ms": round(c, 3), f"{baseline}_ms": round(b, 3),
                     "ratio": round(c / b, 3), "steps": len(t[candidate])})
    return rows


def format_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (also readable on a terminal)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join([line, sep, *body])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """What the figures depend on: versions, CPU, threads (and the GPU when one is used)."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2) + "\n")
    return p
