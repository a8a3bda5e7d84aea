"""The results harness's efficacy mode: every efficacy test's claim, measured per seed over more
seeds than the test runs, with how many seeds meet the test's threshold.

The efficacy tests in ``make test`` run three seeds each. Their measurements live in the test
modules (``CLAIMS``: name -> (measure(seed, folder) -> {"value", "met", "detail"}, criterion)),
so the harness runs exactly what the tests run; here each threshold is applied to every seed on
its own (where a test thresholds the mean over its seeds, per seed is the stricter reading). A
claim holds when it is met on a majority of the seeds run.

Resumable like the flow grid: one result file per (claim, seed), written atomically once the
measurement finished; a killed harness redoes only the unfinished measurement (its folder is
removed first).

Usage::

    python bench/results.py --efficacy all --seeds 0-9 --work W --out bench/results/efficacy
    python bench/results.py --efficacy automtl,branched --seeds 0-4 --work W
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: group -> the test module that holds its claims
MODULES = {
    "automtl": "tests/search/test_efficacy.py",
    "branched": "tests/spaces/branched/test_branched_efficacy.py",
    "allocation": "tests/spaces/allocation/test_allocation_efficacy.py",
}


def parse_seeds(text: str) -> list[int]:
    """``0-9`` or ``0,1,5`` or a mix: ``0-2,7``."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise SystemExit(f"results.py: --seeds: '{part}' is not a seed or a range like 0-9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SystemExit(f"results.py: --seeds: empty range '{part}'")
        out += [s for s in range(lo, hi + 1) if s not in out]
    return out


def _load(path: str) -> ModuleType:
    """The test module, imported under its own name (its factories are found as ``stem:factory``)."""
    file = ROOT / path
    name = file.stem
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(file.parent))
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def claims(groups: str) -> list[dict[str, Any]]:
    keys = list(MODULES) if groups == "all" else [g.strip() for g in groups.split(",")]
    unknown = [k for k in keys if k not in MODULES]
    if unknown:
        raise SystemExit(f"results.py: --efficacy: unknown group {', '.join(unknown)} (known: all, {', '.join(MODULES)})")
    out = []
    for k in keys:
        mod = _load(MODULES[k])
        for name, (fn, criterion) in mod.CLAIMS.items():
            out.append({"group": k, "name": name, "fn": fn, "criterion": criterion, "test": MODULES[k],
                        "test_seeds": list(getattr(mod, "SEEDS", ()))})
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def execute(cl: list[dict[str, Any]], seeds: list[int], work: Path, progress: bool = True) -> None:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)  # the exporter's notes on torchvision ops
    torch.set_num_threads(1)  # the tests' setting: tiny layers, extra threads only contend
    # (no flush-denormal: the tests run without it, and it changes the float paths: seed 0 of the
    # allocation budget claim ends 37 of 48 allocations active with it, 36 without)
    for c in cl:
        for seed in seeds:
            out = work / "efficacy" / _slug(c["name"]) / f"s{seed}.json"
            if out.exists():
                continue
            folder = out.with_suffix("")
            shutil.rmtree(folder, ignore_errors=True)  # what an interrupted attempt left
            folder.mkdir(parents=True)
            t0 = time.time()
            r = c["fn"](seed, folder)
            rec = {"claim": c["name"], "seed": seed, "value": float(r["value"]), "met": bool(r["met"]),
                   "detail": _jsonable(r.get("detail", {})), "seconds": round(time.time() - t0, 1)}
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, out)
            if progress:
                print(f"[{rec['seconds']:6.0f} s] {c['name']}, seed {seed}: {'met' if rec['met'] else 'NOT met'} "
                      f"(value {rec['value']:+.3f})", flush=True)


def collect(cl: list[dict[str, Any]], seeds: list[int], work: Path) -> list[dict[str, Any]]:
    rows = []
    for c in cl:
        recs = []
        for seed in seeds:
            p = work / "efficacy" / _slug(c["name"]) / f"s{seed}.json"
            if p.exists():
                recs.append(json.loads(p.read_text()))
        vals = np.array([r["value"] for r in recs], dtype=float)
        met = sum(r["met"] for r in recs)
        rows.append({"claim": c["name"], "criterion": c["criterion"], "test": c["test"], "test_seeds": c["test_seeds"],
                     "runs": len(recs), "met": met, "holds": bool(recs) and met * 2 > len(recs),
                     "value": {"mean": float(vals.mean()) if len(vals) else None,
                               "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0},
                     "per_seed": [{k: r[k] for k in ("seed", "value", "met", "detail", "seconds")} for r in recs]})
    return rows


def to_markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = ["# Efficacy claims over seeds", "",
             "Each efficacy test's measurement (its `CLAIMS`), run per seed; the test's threshold applied to each "
             "seed on its own. A claim holds when a majority of the seeds meet it.", "",
             "| claim | criterion (per seed) | seeds met | holds | value, mean ± std | test (its seeds) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        v = r["value"]
        ms = f"{v['mean']:+.3f} ± {v['std']:.3f}" if v["mean"] is not None else ""
        lines.append(f"| {r['claim']} | {r['criterion']} | {r['met']} of {r['runs']} | {'yes' if r['holds'] else 'no'} "
                     f"| {ms} | `{r['test']}` ({', '.join(map(str, r['test_seeds']))}) |")
    lines += ["", "## Per seed", ""]
    for r in rows:
        per = ", ".join(f"s{p['seed']} {p['value']:+.3f}{'' if p['met'] else ' ✗'}" for p in r["per_seed"])
        lines.append(f"- {r['claim']}: {per}")
    lines += ["", "## Command", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def write_tables(rows: list[dict[str, Any]], out: Path, command: str) -> None:
    from tables import write_tables as write

    write(out, {"command": command, "claims": rows}, to_markdown(rows, command))
