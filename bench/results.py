"""The results harness: one flow (compile -> search -> baselines -> train -> report) over a grid of
seeds x backbones x task sets x budgets, resumable, and one table per claim with mean, standard
deviation and number of runs for every metric, Δt and the parameter share, plus the paired
comparison of the searched model against the hard-shared one (same seed, same backbone).

Every step is an ``mtc`` command a user could type (recorded in ``commands.log`` and in the
tables); a step counts as done once its stamp ``<run>/.done-<step>`` exists, written atomically
after the command succeeded. A killed harness resumes where it stopped: finished steps are not
redone, the outputs of the interrupted step are removed and the step is run again.

Usage::

    python bench/results.py --work bench-out/results --grid automtl            # the preset below
    python bench/results.py --work W --grid grid.json --out docs-tables        # your own grid
    python bench/results.py --work W --grid automtl --tables-only              # aggregate what exists
    python bench/results.py --work W --efficacy all --seeds 0-9                # the efficacy tests' claims

``--efficacy`` runs the efficacy tests' own measurements per seed instead of the flow
(``bench/efficacy.py``): how many seeds meet each test's threshold.

A grid file is JSON: ``{"backbones": [...], "tasks": {"name": "t:kind:C,..."}, "seeds": [...],
"budgets": {"name": {"pretrain": N, "policy": N, "steps": N}}, "data": SPEC, "head_width": W,
"space": "automtl", "strategy": null, "search": [extra search options]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: AutoMTL re-checked (issue "Results that hold beyond one seed"): the demo's budget and 4x.
AUTOMTL = {
    "backbones": ["backbones/tiny_resnet.onnx", "backbones/tiny_mobilenetv2.onnx", "backbones/tiny_densenet.onnx"],
    "tasks": {"seg+depth": "seg:seg:13,depth:depth:1", "seg+depth+normal": "seg:seg:13,depth:depth:1,normal:normal:3"},
    "seeds": [0, 1, 2],
    "budgets": {"demo": {"pretrain": 100, "policy": 200, "steps": 300},
                "x4": {"pretrain": 400, "policy": 800, "steps": 1200}},
    "data": "scenes?n_train=512&n_val=128",
    "head_width": 32,
    "space": "automtl",
    "strategy": None,
    "search": [],
}
PRESETS = {"automtl": AUTOMTL}
SEARCHED = "mtc (search)"
HARD = "multi-task (hard shared)"
STEPS = ("compile", "search", "baseline", "train", "report")


def load_grid(spec: str) -> dict[str, Any]:
    if spec in PRESETS:
        return json.loads(json.dumps(PRESETS[spec]))
    grid = json.loads(Path(spec).read_text())
    missing = [k for k in ("backbones", "tasks", "seeds", "budgets", "data") if k not in grid]
    if missing:
        raise SystemExit(f"results.py: {spec}: the grid has no {', '.join(missing)}")
    return {**AUTOMTL, "search": [], "strategy": None, **grid}


def runs_of(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's runs in the order they are executed (seeds innermost: the first seeds of every
    cell finish first, so an interrupted harness already has a spread everywhere)."""
    out = []
    for budget, bb, (tname, tasks), seed in itertools.product(grid["budgets"], grid["backbones"],
                                                              grid["tasks"].items(), grid["seeds"]):
        stem = Path(bb).name.split(".")[0]
        out.append({"id": f"{stem}.{tname}.{budget}.s{seed}", "backbone": bb, "stem": stem, "tasks_name": tname,
                    "tasks": tasks, "budget": budget, "seed": int(seed)})
    return out


def commands(grid: dict[str, Any], run: dict[str, Any]) -> dict[str, tuple[list[str], list[str]]]:
    """Step -> (mtc arguments, outputs the step writes, relative to the run's folder)."""
    b = grid["budgets"][run["budget"]]
    bb = str((ROOT / run["backbone"]) if not Path(run["backbone"]).is_absolute() else run["backbone"])
    hw, data, seed = str(grid["head_width"]), grid["data"], str(run["seed"])
    space = ["--space", grid["space"]] if grid.get("space") and grid["space"] != "automtl" else []
    strategy = ["--strategy", grid["strategy"]] if grid.get("strategy") else []
    return {
        "compile": (["compile", bb, "--tasks", run["tasks"], "--head-width", hw, *space, "-o", "super.mtc.onnx"],
                    ["super.mtc.onnx"]),
        "search": (["search", "super.mtc.onnx", "--data", data, "--run-dir", "search", "--seed", seed,
                    "--pretrain-steps", str(b["pretrain"]), "--policy-steps", str(b["policy"]), *strategy,
                    *grid.get("search", []), "--quiet"], ["search"]),
        "baseline": (["baseline", bb, "--tasks", run["tasks"], "--head-width", hw, "--data", data, "--run-dir",
                      "baselines", "--seed", seed, "--steps", str(b["steps"]), "--quiet"], ["baselines"]),
        "train": (["train", "search", "--steps", str(b["steps"]), "--baselines", "baselines", "--quiet"],
                  ["search/checkpoints/train.safetensors", "search/metrics.json"]),
        "report": (["report", "baselines", "search", "--out", "report"], ["report.md", "report.json"]),
    }


def _stamp(folder: Path, step: str) -> Path:
    return folder / f".done-{step}"


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the harness dies (Linux), so a killed harness leaves no command
    running on (and locking) a run directory it will redo."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_step(folder: Path, step: str, args: list[str], outputs: list[str], log: Path, threads: int) -> None:
    for o in outputs:  # what an interrupted attempt left
        _remove(folder / o)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ cd {folder.name} && mtc {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "mtc.cli", *args], cwd=folder, env=env, stdout=f, stderr=f,
                           preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        f.write(f"# exit {r.returncode} after {time.time() - t0:.0f} s\n")
    if r.returncode != 0:
        raise SystemExit(f"results.py: {folder.name}: mtc {args[0]} failed (exit {r.returncode}; see {log})")
    tmp = _stamp(folder, step).with_suffix(".tmp")
    tmp.write_text(f"{time.time() - t0:.1f}\n")
    os.replace(tmp, _stamp(folder, step))


def execute(grid: dict[str, Any], work: Path, threads: int, progress: bool = True) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "grid.json").write_text(json.dumps(grid, indent=1))
    log = work / "commands.log"
    for run in runs_of(grid):
        folder = work / run["id"]
        folder.mkdir(exist_ok=True)
        for step, (args, outputs) in commands(grid, run).items():
            if _stamp(folder, step).exists():
                continue
            t0 = time.time()
            run_step(folder, step, args, outputs, log, threads)
            if progress:
                print(f"[{time.time() - t0:6.0f} s] {run['id']}: {step}", flush=True)


# --------------------------------------------------------------------------------- aggregation
def _stats(values: list[float]) -> dict[str, float | int]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def collect(grid: dict[str, Any], work: Path) -> dict[str, Any]:
    """Per cell (backbone, task set, budget) and model: mean, std (ddof 1) and n of every metric,
    Δt_i, Δt and the parameter share; the paired comparison searched - hard-shared per seed."""
    cells: dict[str, dict[str, Any]] = {}
    for run in runs_of(grid):
        p = work / run["id"] / "report.json"
        if not _stamp(work / run["id"], "report").exists() or not p.exists():
            continue
        rep = json.loads(p.read_text())
        key = f"{run['stem']} | {run['tasks_name']} | {run['budget']}"
        cell = cells.setdefault(key, {"backbone": run["stem"], "tasks": run["tasks_name"], "budget": run["budget"],
                                      "seeds": [], "values": {}, "paired": []})
        cell["seeds"].append(run["seed"])
        rows = {r["model"]: r for r in rep["rows"]}
        for name, r in rows.items():
            vals = cell["values"].setdefault(name, {})
            vals.setdefault("params_pct", []).append(r["params_pct"])
            vals.setdefault("delta_t", []).append(r["delta_t"])
            for t, v in r["delta_t_i"].items():
                vals.setdefault(f"Δ{t}", []).append(v)
            for t, ms in r["metrics"].items():
                for m, v in ms.items():
                    vals.setdefault(f"{t} {m}", []).append(v)
        if SEARCHED in rows and HARD in rows:
            cell["paired"].append({"seed": run["seed"], "delta_t": rows[SEARCHED]["delta_t"] - rows[HARD]["delta_t"],
                                   "params_pct": rows[SEARCHED]["params_pct"] - rows[HARD]["params_pct"]})
    out: dict[str, Any] = {}
    for key, cell in cells.items():
        diffs = [p["delta_t"] for p in cell["paired"]]
        out[key] = {
            "backbone": cell["backbone"], "tasks": cell["tasks"], "budget": cell["budget"], "seeds": cell["seeds"],
            "models": {m: {k: _stats(v) for k, v in vals.items()} for m, vals in cell["values"].items()},
            "paired": {"per_seed": cell["paired"], **({"delta_t": _stats(diffs),
                                                      "searched_better": sum(d > 0 for d in diffs),
                                                      "runs": len(diffs)} if diffs else {})},
        }
    # pooled over backbones: the claim as a user would state it (one number per task set and budget)
    pooled: dict[str, list[float]] = {}
    for c in out.values():
        for p in c["paired"]["per_seed"]:
            pooled.setdefault(f"{c['tasks']} | {c['budget']}", []).append(p["delta_t"])
    return {"cells": out, "pooled": {k: {"delta_t": _stats(v), "searched_better": sum(d > 0 for d in v),
                                         "runs": len(v)} for k, v in pooled.items()}}


def _ms(s: dict[str, float | int], digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def to_markdown(grid: dict[str, Any], res: dict[str, Any], work: Path) -> str:
    lines = ["# Results harness", "", "Mean ± standard deviation (ddof 1) over n runs (seeds); paired: the searched "
             "model's Δt minus the hard-shared model's, same seed.", ""]
    lines += ["## Paired: searched − hard-shared Δt (pooled over backbones)", "",
              "| task set | budget | mean ± std | searched better | runs |", "|---|---|---|---|---|"]
    for k, v in res["pooled"].items():
        t, b = k.split(" | ")
        lines.append(f"| {t} | {b} | {_ms(v['delta_t'])} | {v['searched_better']} | {v['runs']} |")
    for c in res["cells"].values():
        lines += ["", f"## {c['backbone']}, {c['tasks']}, budget {c['budget']} (seeds {c['seeds']})", ""]
        models = list(c["models"])
        cols = ["params_pct", "delta_t"] + [k for k in c["models"][models[0]] if k not in ("params_pct", "delta_t")]
        lines.append("| model | n | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for m in models:
            st = c["models"][m]
            n = st["delta_t"]["n"]
            lines.append(f"| {m} | {n} | " + " | ".join(_ms(st[k]) if k in st else "" for k in cols) + " |")
        pr = c["paired"]
        if "delta_t" in pr:
            per = ", ".join(f"s{p['seed']} {p['delta_t']:+.2f}" for p in pr["per_seed"])
            lines += ["", f"Paired Δt (searched − hard-shared): {_ms(pr['delta_t'])}; searched better on "
                      f"{pr['searched_better']} of {pr['runs']} seeds ({per})."]
    lines += ["", "## Commands", "", "```bash"]
    log = work / "commands.log"
    if log.exists():  # this table's runs only (one work folder may hold several grids)
        ids = {r["id"] for r in runs_of(grid)}
        lines += [x[2:] for x in log.read_text().splitlines()
                  if x.startswith("$ cd ") and x.split()[2] in ids]
    lines += ["```", ""]
    return "\n".join(lines)


def write_tables(grid: dict[str, Any], work: Path, out: Path) -> dict[str, Any]:
    from tables import write_tables as write

    res = collect(grid, work)
    write(out, {"grid": grid, **res}, to_markdown(grid, res, work))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder of the runs (resumable)")
    ap.add_argument("--grid", default="automtl", help="a preset (automtl) or a grid JSON file")
    ap.add_argument("--out", default=None, help="tables as OUT.md and OUT.json (default WORK/results)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per command")
    ap.add_argument("--tables-only", action="store_true", help="aggregate the finished runs, run nothing")
    ap.add_argument("--budgets", default=None, help="only these budgets (comma-separated)")
    ap.add_argument("--backbones", default=None, help="only these backbone stems (comma-separated)")
    ap.add_argument("--task-sets", default=None, help="only these task sets (comma-separated)")
    ap.add_argument("--efficacy", default=None, metavar="GROUPS",
                    help="run the efficacy tests' claims instead of the flow: all, or some of automtl,branched,allocation")
    ap.add_argument("--seeds", default="0-9", help="with --efficacy: seeds, e.g. 0-9 or 0,3,5")
    ap.add_argument("--claims", default=None, help="with --efficacy: only claims whose name contains this text")
    args = ap.parse_args(argv)
    if args.efficacy:
        return run_efficacy(args, argv)
    grid = load_grid(args.grid)
    for flag, key in ((args.budgets, "budgets"), (args.task_sets, "tasks")):
        if flag:
            keep = flag.split(",")
            grid[key] = {k: v for k, v in grid[key].items() if k in keep}
    if args.backbones:
        keep = args.backbones.split(",")
        grid["backbones"] = [b for b in grid["backbones"] if Path(b).name.split(".")[0] in keep]
    work = Path(args.work)
    if not args.tables_only:
        with contextlib.suppress(KeyboardInterrupt):
            execute(grid, work, args.threads)
    res = write_tables(grid, work, Path(args.out) if args.out else work / "results")
    print(json.dumps(res["pooled"], indent=1))
    return 0


def run_efficacy(args: argparse.Namespace, argv: list[str] | None) -> int:
    sys.path.insert(0, str(ROOT))
    import efficacy

    seeds = efficacy.parse_seeds(args.seeds)
    cl = efficacy.claims(args.efficacy)
    if args.claims:
        cl = [c for c in cl if args.claims in c["name"]]
        if not cl:
            raise SystemExit(f"results.py: --claims: no claim of {args.efficacy} contains '{args.claims}'")
    work = Path(args.work)
    if not args.tables_only:
        with contextlib.suppress(KeyboardInterrupt):
            efficacy.execute(cl, seeds, work)
    rows = efficacy.collect(cl, seeds, work)
    command = "python bench/results.py " + " ".join(sys.argv[1:] if argv is None else argv)
    efficacy.write_tables(rows, Path(args.out) if args.out else work / "efficacy", command)
    for r in rows:
        print(f"{r['claim']}: met on {r['met']} of {r['runs']} seeds ({'holds' if r['holds'] else 'does not hold'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
