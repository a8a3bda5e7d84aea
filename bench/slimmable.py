"""The slimmable space's efficacy study (docs/results.md, "Slimmable"): every command it runs is an
``mtc`` command a user could type; this script only runs them (skipping runs already complete) and
turns their JSON outputs into the tables.

1. CI-KD ablation (the paper's Table 4): the supernet trained with λ = 1 and with λ = 0; Δt of its
   smallest sub-network against the single-task models (``mtc baseline``).
2. Predictor-guided search against random encoders at equal budget (Fig. 5): the most preferred
   task's loss, predicted and measured, over the 20 drawn preferences at each budget.
3. Preference sweep (Fig. 7): Spearman ρ between a task's preference and its metric.
4. HV at two budgets (Tables 1-3 in form) next to static models (``mtc baseline --width R``) at the
   widest uniform width that fits each budget, with the same reference point.

Usage: ``python bench/slimmable.py [--work DIR] [--seeds 0 1 2] [--steps 400] [--out
bench/results/slimmable.json]``. About 25 minutes per seed on 2 shared cores (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "backbones/tiny_resnet.onnx"
TASKS = "seg:seg:13,depth:depth:1,normal:normal:3"
DATA = "scenes?n_train=512&n_val=64&cache=true"
HEAD = "16"


def mtc(*args: str, cwd: Path, log: Path) -> None:
    """Run one ``mtc`` command (one intra-op thread: the cores are shared), its output into ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ mtc {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "mtc.cli", *args], cwd=cwd, env=env, stdout=f, stderr=f)
        f.write(f"# exit {r.returncode} after {time.time() - t0:.0f} s\n")
    if r.returncode != 0:
        raise SystemExit(f"mtc {' '.join(args)} failed (see {log})")
    print(f"[{time.time() - t0:6.0f} s] mtc {' '.join(args)}", flush=True)


def _resume(work: Path, d: str) -> tuple[str, ...]:
    """``--resume`` for a search that was interrupted after its first checkpoint (same options)."""
    return ("--resume",) if (work / d / "checkpoints").is_dir() and any((work / d / "checkpoints").iterdir()) else ()


def run_all(work: Path, seeds: list[int], steps: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    if not (work / "slim.mtc.onnx").exists():
        mtc("compile", str(ROOT / BACKBONE), "--tasks", TASKS, "--head-width", HEAD, "--space", "slimmable",
            "-o", "slim.mtc.onnx", cwd=work, log=log)
    if not (work / "single" / "baselines.json").exists():
        mtc("baseline", str(ROOT / BACKBONE), "--tasks", TASKS, "--head-width", HEAD, "--data", DATA,
            "--run-dir", "single", "--steps", str(steps), "--quiet", cwd=work, log=log)
    for s in seeds:
        if not (work / f"ecmt-s{s}" / "controllability.json").exists():
            mtc("search", "slim.mtc.onnx", "--data", DATA, "--run-dir", f"ecmt-s{s}", "--seed", str(s),
                "--steps", str(steps), "--calib-batches", "10", "--predictor-samples", "100", "--sweep-levels",
                "5", "--quiet", *_resume(work, f"ecmt-s{s}"), cwd=work, log=log)
        if not (work / f"nokd-s{s}" / "controllability.json").exists():
            mtc("search", "slim.mtc.onnx", "--data", DATA, "--run-dir", f"nokd-s{s}", "--seed", str(s),
                "--steps", str(steps), "--calib-batches", "10", "--kd-weight", "0", "--predictor-samples", "0",
                "--quiet", *_resume(work, f"nokd-s{s}"), cwd=work, log=log)
        for b, r in static_widths(work, s).items():
            d = f"static-{b.rstrip('%')}-s{s}"
            if not (work / d / "baselines.json").exists():
                mtc("baseline", str(ROOT / BACKBONE), "--tasks", TASKS, "--head-width", HEAD, "--data", DATA,
                    "--run-dir", d, "--seed", str(s), "--steps", str(steps), "--width", f"{r:g}", "--quiet",
                    cwd=work, log=log)


def static_widths(work: Path, seed: int) -> dict[str, float]:
    """Per HV budget of the seed's search: the widest uniform ratio of ω whose network fits it."""
    sys.path.insert(0, str(ROOT))
    from mtc.ir import io
    from mtc.spaces.slimmable.config import WidthSpace
    from mtc.spaces.slimmable.cost import CostModel
    from mtc.spaces.slimmable.search import bound_full

    model = io.load(work / "slim.mtc.onnx")
    space = WidthSpace.of(model)
    cost = CostModel(bound_full(model, space), space)
    rep = json.loads((work / f"ecmt-s{seed}" / "controllability.json").read_text())
    out = {}
    for b in rep["budgets"]:
        fits = [k for k in range(len(space.ratios)) if cost.macs(space.full(k)) <= b["macs"]]
        out[b["budget"]] = space.ratios[max(fits)]
    return out


def _mean_sd(xs: list[float]) -> str:
    a = np.asarray([x for x in xs if x is not None], dtype=float)
    return f"{a.mean():.4g} ± {a.std(ddof=1):.2g}" if len(a) > 1 else (f"{a.mean():.4g}" if len(a) else "–")


def tables(work: Path, seeds: list[int]) -> dict:
    sys.path.insert(0, str(ROOT))
    from mtc.spaces.slimmable.control import hypervolume
    from mtc.tasks.kinds import delta_t, relative_performance

    single = json.loads((work / "single" / "baselines.json").read_text())
    kinds = single["kinds"]
    tasks = single["tasks"]
    out: dict = {"seeds": seeds, "tasks": tasks, "ablation": {}, "search": {}, "sweep": {}, "hv": {}}

    def dt(metrics: dict) -> float:
        return delta_t([relative_performance(metrics[t], single["single"][t]["tasks"][t], kinds[t]) for t in tasks])

    for name in ("ecmt", "nokd"):
        rows = []
        for s in seeds:
            ext = json.loads((work / f"{name}-s{s}" / "controllability.json").read_text())["extremes"]
            rows.append({"smallest": dt(ext["smallest"]), "largest": dt(ext["largest"]),
                         "macs": ext["macs"], "metrics": ext})
        out["ablation"][name] = rows
    out["ablation"]["multi"] = dt(single["multi"]["tasks"])
    for s in seeds:
        rep = json.loads((work / f"ecmt-s{s}" / "controllability.json").read_text())
        ref = rep["reference_point"]
        for b in rep["budgets"]:
            key = b["budget"]
            e = out["search"].setdefault(key, {"macs": b["macs"], "ecmt_pred": [], "ecmt_meas": [], "rand_pred": [],
                                                "rand_meas": [], "ecmt_macs": [], "rand_macs": []})
            e["ecmt_pred"].append(b["preferred_loss"]["ecmt"]["predicted"])
            e["ecmt_meas"].append(b["preferred_loss"]["ecmt"]["measured"])
            e["rand_pred"].append(b["preferred_loss"]["random"]["predicted"])
            e["rand_meas"].append(b["preferred_loss"]["random"]["measured"])
            e["ecmt_macs"].append(float(np.mean([r["ecmt"]["macs"] for r in b["rows"]])))
            e["rand_macs"].append(float(np.mean([r["random"]["macs"] for r in b["rows"]])))
            st = json.loads((work / f"static-{key.rstrip('%')}-s{s}" / "baselines.json").read_text())
            point = np.array([[st["multi"]["tasks"][t]["loss"] for t in tasks]])
            h = out["hv"].setdefault(key, {"macs": b["macs"], "ecmt": [], "random": [], "static": [],
                                           "static_width": st["width"]["ratio"], "static_macs": st["multi"]["macs"],
                                           "ref": []})
            h["ecmt"].append(b["hv"])
            h["random"].append(b["hv_random"])
            h["static"].append(hypervolume(point, ref))
            h["ref"].append(ref)
        for t, e in rep["sweep"]["tasks"].items():
            sw = out["sweep"].setdefault(t, {"metric": e["metric"], "largest": [], "smallest": [], "searched": [],
                                             "decoder": []})
            for k in ("largest", "smallest", "searched"):
                sw[k].append(e[k]["spearman_metric"])
            sw["decoder"].append(e["searched"]["spearman_decoder"])
    return out


def markdown(res: dict) -> str:
    lines = ["CI-KD ablation: Δt (%) against the single-task models (mean ± sd over seeds "
             f"{', '.join(map(str, res['seeds']))})", "",
             "| supernet | smallest sub-network Δt | largest sub-network Δt |", "|---|---|---|"]
    for name, label in (("nokd", "λ = 0"), ("ecmt", "λ = 1 (CI-KD)")):
        rows = res["ablation"][name]
        lines.append(f"| {label} | {_mean_sd([r['smallest'] for r in rows])} | "
                     f"{_mean_sd([r['largest'] for r in rows])} |")
    lines += [f"| hard-shared multi-task model (full width, seed 0) | | {res['ablation']['multi']:.4g} |", ""]
    lines += ["Most preferred task's loss over the 20 preferences (predictor-guided Algorithm 2 against a random "
              "encoder, same decoders and budget)", "",
              "| budget | MACs | Alg. 2 predicted | random predicted | Alg. 2 measured | random measured | "
              "Alg. 2 mean MACs | random mean MACs |", "|---|---|---|---|---|---|---|---|"]
    for b, e in res["search"].items():
        lines.append(f"| {b} | {e['macs']:,.0f} | {_mean_sd(e['ecmt_pred'])} | {_mean_sd(e['rand_pred'])} | "
                     f"{_mean_sd(e['ecmt_meas'])} | {_mean_sd(e['rand_meas'])} | {_mean_sd(e['ecmt_macs'])} | "
                     f"{_mean_sd(e['rand_macs'])} |")
    lines += ["", "Preference sweep: Spearman ρ between a task's preference and its metric (sign: higher is "
              "better)", "", "| task | metric | largest encoder | smallest encoder | Alg. 2 at the first budget | "
              "decoder width (Alg. 2) |", "|---|---|---|---|---|---|"]
    for t, e in res["sweep"].items():
        lines.append(f"| {t} | {e['metric']} | {_mean_sd(e['largest'])} | {_mean_sd(e['smallest'])} | "
                     f"{_mean_sd(e['searched'])} | {_mean_sd(e['decoder'])} |")
    lines += ["", "HV of the task losses (20 preferences) and of the static model at the widest uniform width that "
              "fits the budget", "", "| budget | MACs | ECMT | random encoder | MTL-Static (width, MACs) |",
              "|---|---|---|---|---|"]
    for b, h in res["hv"].items():
        lines.append(f"| {b} | {h['macs']:,.0f} | {_mean_sd(h['ecmt'])} | {_mean_sd(h['random'])} | "
                     f"{_mean_sd(h['static'])} ({h['static_width']:g}, {h['static_macs']:,}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("slimmable-study"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "slimmable.json")
    ap.add_argument("--tables-only", action="store_true", help="Only read the finished runs.")
    a = ap.parse_args()
    if not a.tables_only:
        run_all(a.work.resolve(), a.seeds, a.steps)
    res = tables(a.work.resolve(), a.seeds)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))


if __name__ == "__main__":
    main()
