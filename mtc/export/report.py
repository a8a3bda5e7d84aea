"""The deployment report: parameters, MACs and onnxruntime latency of the exported models.

Each task's model stands next to the original backbone with that task's head (the all-shared
export of the same supergraph, which is exactly that network), and the fused model next to the sum
of the per-task models.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.export.api import REPORT, Exported, export_graphs, sample_input, session
from mtc.ir import supergraph as sg
from mtc.ir.cost import human, model_cost
from mtc.ir.io import atomic_write
from mtc.ir.plan import reference_plan
from mtc.timing import time_interleaved

__all__ = ["REPORT", "deployment_report", "latencies_ms", "latency_ms", "print_report"]


def latencies_ms(models: dict[str, ir.Model], x: np.ndarray, *, provider: str = "cpu", warmup: int = 5,
                 repeat: int = 30) -> dict[str, float]:
    """Median onnxruntime latency of one run of each model in milliseconds.

    The models run round-robin (order reversed every round) after ``warmup`` untimed rounds, so
    drift in the machine's speed affects them alike; idle pool threads do not spin, so one
    session's threads do not slow the next one down.
    """
    sessions = {k: session(m, provider, spinning=False) for k, m in models.items()}

    def step(s: Any) -> Callable[[], Any]:
        feed = {s.get_inputs()[0].name: x}
        return lambda: s.run(None, feed)

    times = time_interleaved({k: step(s) for k, s in sessions.items()}, warmup=warmup, repeats=max(1, repeat))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def latency_ms(model: ir.Model, x: np.ndarray, *, provider: str = "cpu", warmup: int = 5, repeat: int = 30) -> float:
    """Median onnxruntime latency of one run in milliseconds, after ``warmup`` untimed runs."""
    return latencies_ms({"m": model}, x, provider=provider, warmup=warmup, repeat=repeat)["m"]


def _cost(model: ir.Model) -> dict[str, int]:
    params, macs, _ = model_cost(model)
    return {"params": int(params), "macs": int(macs)}


def deployment_report(model: ir.Model, ex: Exported, out_dir: str | os.PathLike[str] | None = None, *,
                      path: str | os.PathLike[str] | None = None, provider: str = "cpu", repeat: int = 30,
                      batch: int = 1, extra: dict[str, Any] | None = None) -> dict[str, Any]:
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
        extra: more keys for the report (what a space's export options chose, say).
    """
    x = sample_input(ex.module.model, seed=0, batch=batch)
    order = sg.task_names(model)
    # The reference gets the same rewrites (BatchNorm, Resize), so MACs and latency compare like with like.
    base = export_graphs(model, reference_plan(model), None, tasks=list(ex.tasks), fused=False,
                         fold_bn=ex.fold_bn, resize_matmul=ex.resize_matmul)
    timed: dict[str, ir.Model] = {}
    for t, m in ex.tasks.items():
        timed[f"exported/{t}"] = m
        timed[f"backbone/{t}"] = base.tasks[t]
    missing: list[str] = []
    if ex.fused is not None:
        timed["fused"] = ex.fused
        missing = [t for t in order if t not in ex.tasks]
        if missing:
            if ex.plan is None:
                raise ValueError("the fused report needs every task's model or the export plan")
            more = export_graphs(model, ex.plan, ex.module.ir_state(), tasks=missing, fused=False,
                                 fold_bn=ex.fold_bn, resize_matmul=ex.resize_matmul)
            timed.update({f"exported/{t}": m for t, m in more.tasks.items()})
    ms = latencies_ms(timed, x, provider=provider, repeat=repeat)
    rows = {t: {"exported": {**_cost(timed[f"exported/{t}"]), "latency_ms": ms[f"exported/{t}"]},
                "backbone": {**_cost(timed[f"backbone/{t}"]), "latency_ms": ms[f"backbone/{t}"]}}
            for t in order if t in ex.tasks}
    rep: dict[str, Any] = {"provider": provider, "batch": batch, "repeat": repeat, "tasks": rows}
    if ex.fused is not None:
        per_task = [{**_cost(timed[f"exported/{t}"]), "latency_ms": ms[f"exported/{t}"]} for t in order]
        summed = {k: sum(r[k] for r in per_task) for k in ("params", "macs", "latency_ms")}
        rep["fused"] = {**_cost(ex.fused), "latency_ms": ms["fused"], "sum_of_tasks": summed}
    rep.update(extra or {})
    if path is None and out_dir is not None:
        path = Path(out_dir) / REPORT
    if path is not None:
        with atomic_write(path) as f:
            json.dump(rep, f, indent=2)
            f.write("\n")
        rep["path"] = str(path)
    return rep


def print_report(rep: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    lines = [f"deployment report ({rep['provider']}, batch {rep['batch']}, median of {rep['repeat']} runs)",
             f"{'model':<16} {'params':>9} {'MACs':>9} {'latency ms':>11}   "
             f"{'backbone+head params':>20} {'MACs':>9} {'latency ms':>11}"]
    for t, r in rep["tasks"].items():
        e, b = r["exported"], r["backbone"]
        lines.append(f"{t:<16} {human(e['params']):>9} {human(e['macs']):>9} {e['latency_ms']:>11.3f}   "
                     f"{human(b['params']):>20} {human(b['macs']):>9} {b['latency_ms']:>11.3f}")
    f = rep.get("fused")
    if f is not None:
        s = f["sum_of_tasks"]
        lines.append(f"{'fused':<16} {human(f['params']):>9} {human(f['macs']):>9} {f['latency_ms']:>11.3f}   "
                     f"{'sum of tasks':>20} {human(s['macs']):>9} {s['latency_ms']:>11.3f}")
    return "\n".join(lines)
