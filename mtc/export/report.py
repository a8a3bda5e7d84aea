"""The deployment report: parameters, MACs and onnxruntime latency of the exported models.

Each task's model stands next to the original backbone with that task's head (the all-shared
export of the same supergraph, which is exactly that network), and the fused model next to the sum
of the per-task models.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.export.api import REPORT, Exported, export_graphs, sample_input, session
from mtc.ir import supergraph as sg
from mtc.ir.cost import model_cost
from mtc.ir.io import atomic_write

__all__ = ["REPORT", "deployment_report", "latency_ms", "print_report"]


def latency_ms(model: ir.Model, x: np.ndarray, *, provider: str = "cpu", warmup: int = 5, repeat: int = 30) -> float:
    """Median onnxruntime latency of one run in milliseconds, after ``warmup`` untimed runs."""
    sess = session(model, provider)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _cost(model: ir.Model) -> dict[str, int]:
    params, macs, _ = model_cost(model)
    return {"params": int(params), "macs": int(macs)}


def deployment_report(model: ir.Model, ex: Exported, out_dir: str | os.PathLike[str] | None = None, *,
                      path: str | os.PathLike[str] | None = None, provider: str = "cpu", repeat: int = 30,
                      batch: int = 1) -> dict[str, Any]:
    """Measure the exported models against the backbone with each task's head.

    The fused model stands next to the sum of every task's model, including tasks not exported
    (their models are built from the same lowering just for the sum).

    Args:
        model: the supergraph the models were exported from.
        ex: the exported graphs.
        out_dir: a folder to write ``report.json`` into (None: do not write).
        path: the report file to write instead (e.g. ``seg.report.json`` beside ``seg.onnx``).
        provider: onnxruntime execution provider (``cpu`` or ``cuda``).
        repeat: timed runs per model (median reported).
        batch: input batch size for the timings.
    """
    x = sample_input(ex.module.model, seed=0, batch=batch)
    order = [t.name for t in sg.tasks_of(model) or []]
    # The reference gets the same BatchNorm treatment, so MACs and latency compare like with like.
    base = export_graphs(model, sg.Policy.uniform(model, 0), None, tasks=list(ex.tasks), fused=False,
                         fold_bn=ex.fold_bn)
    rows: dict[str, Any] = {}
    for t, m in ex.tasks.items():
        ref = base.tasks[t]
        rows[t] = {"exported": {**_cost(m), "latency_ms": latency_ms(m, x, provider=provider, repeat=repeat)},
                   "backbone": {**_cost(ref), "latency_ms": latency_ms(ref, x, provider=provider, repeat=repeat)}}
    rep: dict[str, Any] = {"provider": provider, "batch": batch, "repeat": repeat,
                           "tasks": {t: rows[t] for t in order if t in rows}}
    if ex.fused is not None:
        missing = [t for t in order if t not in rows]
        extra: dict[str, Any] = {}
        if missing:
            if ex.policy is None:
                raise ValueError("the fused report needs every task's model or the export policy")
            more = export_graphs(model, ex.policy, ex.module, tasks=missing, fused=False, fold_bn=ex.fold_bn)
            extra = {t: {"exported": {**_cost(m), "latency_ms": latency_ms(m, x, provider=provider, repeat=repeat)}}
                     for t, m in more.tasks.items()}
        per_task = [r["exported"] for r in (*rows.values(), *extra.values())]
        summed = {k: sum(r[k] for r in per_task) for k in ("params", "macs", "latency_ms")}
        rep["fused"] = {**_cost(ex.fused), "latency_ms": latency_ms(ex.fused, x, provider=provider, repeat=repeat),
                        "sum_of_tasks": summed}
    if path is None and out_dir is not None:
        path = Path(out_dir) / REPORT
    if path is not None:
        with atomic_write(path) as f:
            json.dump(rep, f, indent=2)
            f.write("\n")
        rep["path"] = str(path)
    return rep


def _h(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}T"


def print_report(rep: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    lines = [f"deployment report ({rep['provider']}, batch {rep['batch']}, median of {rep['repeat']} runs)",
             f"{'model':<16} {'params':>9} {'MACs':>9} {'latency ms':>11}   "
             f"{'backbone+head params':>20} {'MACs':>9} {'latency ms':>11}"]
    for t, r in rep["tasks"].items():
        e, b = r["exported"], r["backbone"]
        lines.append(f"{t:<16} {_h(e['params']):>9} {_h(e['macs']):>9} {e['latency_ms']:>11.3f}   "
                     f"{_h(b['params']):>20} {_h(b['macs']):>9} {b['latency_ms']:>11.3f}")
    f = rep.get("fused")
    if f is not None:
        s = f["sum_of_tasks"]
        lines.append(f"{'fused':<16} {_h(f['params']):>9} {_h(f['macs']):>9} {f['latency_ms']:>11.3f}   "
                     f"{'sum of tasks':>20} {_h(s['macs']):>9} {s['latency_ms']:>11.3f}")
    return "\n".join(lines)
