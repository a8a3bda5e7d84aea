"""``mtc report``: results in the form of AutoMTL's Tables 2 and 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtc.errors import MtcError
from mtc.tasks.kinds import delta_t, get_kind, relative_performance
from mtc.train.run import RunDir


def _kinds(run: RunDir) -> dict[str, str]:
    """Task name -> kind, from a run's supergraph config or a baseline's supergraph."""
    from mtc.ir import io
    from mtc.ir import supergraph as sg

    for cand in (run.file("super.mtc.onnx"), run.path / "multi" / "super.mtc.onnx"):
        if cand.exists():
            return {d["name"]: d["kind"] for d in sg.task_records(io.load(cand)) or []}
    raise MtcError("cannot tell the task kinds (no super.mtc.onnx)", file=str(run.path))


def build_report(dirs: list[str]) -> dict[str, Any]:
    """Rows for the single-task baseline, the hard-shared model and every trained run."""
    baseline: dict[str, Any] | None = None
    runs: list[tuple[str, dict[str, Any]]] = []
    kinds: dict[str, str] = {}
    for d in dirs:
        run = RunDir(d)
        if run.file("baselines.json").exists():
            baseline = run.read_json("baselines.json")
        if run.file("metrics.json").exists():
            runs.append((Path(d).name, run.read_json("metrics.json")))
            kinds.update(_kinds(run))
    if baseline is None:
        raise MtcError("no baselines.json among the directories: run mtc baseline first")
    tasks = list(baseline["tasks"])
    kinds.update(baseline.get("kinds", {}))
    missing = [t for t in tasks if t not in kinds]
    if missing:
        raise MtcError(f"cannot tell the kind of task '{missing[0]}'")
    single_params = sum(baseline["single"][t]["params"] for t in tasks)

    def row(name: str, metrics: dict[str, dict[str, float]], params: int) -> dict[str, Any]:
        rel = {t: relative_performance(metrics[t], baseline["single"][t]["tasks"][t], kinds[t]) for t in tasks}
        return {"model": name, "params": params, "params_pct": round(100.0 * params / single_params, 1),
                "metrics": {t: {k: v for k, v in metrics[t].items() if k != "loss"} for t in tasks},
                "delta_t_i": {t: round(v, 2) for t, v in rel.items()}, "delta_t": round(delta_t(list(rel.values())), 2)}

    rows = [{"model": "single-task", "params": single_params, "params_pct": 100.0,
             "metrics": {t: {k: v for k, v in baseline["single"][t]["tasks"][t].items() if k != "loss"} for t in tasks},
             "delta_t_i": dict.fromkeys(tasks, 0.0), "delta_t": 0.0}]
    rows.append(row("multi-task (hard shared)", baseline["multi"]["tasks"], baseline["multi"]["params"]))
    for name, m in runs:
        rows.append(row(f"mtc ({name})", m["tasks"], m["params"]))
    return {"tasks": tasks, "kinds": kinds, "rows": rows}


def to_markdown(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    cols = ["model", "params (%)"]
    metric_names = {t: list(report["rows"][0]["metrics"][t]) for t in tasks}
    for t in tasks:
        k = get_kind(report["kinds"][t])
        cols += [f"{t} {m} {'↑' if k.higher_is_better(m) else '↓'}" for m in metric_names[t]]
    cols += [f"Δ{t} %" for t in tasks] + ["Δt %"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        cells = [r["model"], f"{r['params_pct']:.1f}"]
        for t in tasks:
            cells += [f"{r['metrics'][t][m]:.4g}" for m in metric_names[t]]
        cells += [f"{r['delta_t_i'][t]:+.2f}" for t in tasks] + [f"{r['delta_t']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
