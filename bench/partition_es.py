"""Feature partitioning: ES with the diagonal penalty against as many random samples (issue 14).

One ``es`` search per (seed, λ) with ``--random-samples E`` and E ES evaluations: the random samples
(P uniform, diagonal uniform in [0, 1]) and the ES samples are scored by the same teachers and the
same distillation proxy in the same run, so the comparison is paired. Per run:

- ES's result is its plan, the ES sample with the best reward (score − λ‖diag P‖²);
- "dominated": some random sample scores at least as well at no more mean channel use;
- "vs the best random": ES's score against the best random score, and its use against that sample's.

Setting (the one of docs/results.md, "Feature partitioning"): ``digits_mlp`` on ``digits`` (tasks
``digit:class,rotated:class:4``), head width 8, ``--sites all``, batch 16, the CPU proxy defaults
(teachers trained here; 60 distillation steps of batch 8, SGD 0.05), scored on ``--score-batches``
validation batches of 16 (default 22: all but 7 of the 359 validation images).

With ``--start best-random`` each (seed, λ) also gets a warm-started ES run of the same total cost:
``--random-samples R`` (``--warmup``, default E/2) and ES from the best of them (``--init
best-random``) for the other E − R evaluations, compared with the same E random samples as the
plain run (sample i of a seed is the same P with the same score in every run: the teachers, the
batches and the student's start depend on the seed only).

Usage::

    python bench/partition_es.py --work W --seeds 0,1,2 --lambdas 0.001,0.5 --evals 96
    python bench/partition_es.py --work W --seeds 0,1,2 --lambdas 0.001,0.5 --evals 96 --tables-only
    python bench/partition_es.py --work W --seeds 0,1,2 --lambdas 0.001 --evals 96 --start best-random

Resumable: a finished run has ``done.json``; an interrupted one resumes through the search's own
``--resume`` (every sample already scored is reused).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASKS = "digit:class,rotated:class:4"
SHAPE = (1, 1, 8, 8)


def run_one(folder: Path, seed: int, lam: float, evals: int, directions: int, score_batches: int,
            warmup: int = 0) -> None:
    """One es search: E random samples then E ES evaluations, or (``warmup`` R > 0) R random samples
    then E − R ES evaluations from the best of them."""
    import torch

    from mtc.data import load_data
    from mtc.frontends import import_model
    from mtc.spaces import compile_supergraph
    from mtc.tasks.spec import tasks_of
    from mtc.train.run import RunDir
    from mtc.train.search import run_search

    torch.set_num_threads(1)
    model = import_model("mtc.spaces.allocation.nets:digits_mlp", input_shape=SHAPE)
    compile_supergraph(model, tasks=TASKS, head_width=8, feature=model.graph.outputs[0].name, space="partition",
                       sites="all")
    train, val = load_data("digits", tasks_of(model), SHAPE[1:], seed)
    steps = (evals - warmup if warmup else evals) // (2 * directions)
    opts = {"seed": seed, "batch_size": 16, "checkpoint_every": 10**9, "log_every": 10**9,
            "random_samples": warmup or evals, "es_steps": steps, "directions": directions, "diag_penalty": lam,
            "score_batches": score_batches, **({"init": "best-random"} if warmup else {})}
    resume = (folder / "run").exists()
    run_search(RunDir(folder / "run"), model, train, val, opts, strategy="es", progress=False, resume=resume)
    tmp = folder / "done.json.tmp"
    tmp.write_text(json.dumps({"seed": seed, "lambda": lam, "evals": evals, "directions": directions,
                               "es_steps": steps, "score_batches": score_batches, "warmup": warmup}))
    os.replace(tmp, folder / "done.json")


def _samples(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / "run" / "samples.jsonl").read_text().splitlines() if x.strip()]


def analyse(folder: Path, against: Path | None = None) -> dict[str, Any]:
    """ES's plan in ``folder`` against the random samples of ``against`` (default: its own)."""
    from mtc.spaces.partition.search import best_sample

    recs = _samples(folder)
    es = [r for r in recs if r["kind"] == "es"]
    rnd = [r for r in _samples(against or folder) if r["kind"] == "random"]
    own = [r for r in recs if r["kind"] == "random"]
    # the warm run's own random samples must be the first of the comparison set, with the same scores
    if against is not None and [(r["P"], r["score"]) for r in own] != [(r["P"], r["score"]) for r in rnd[:len(own)]]:
        raise SystemExit(f"partition_es.py: {folder}'s random samples differ from {against}'s: not comparable")
    # the search's own choice (its best reward), as its plan records it
    chosen = json.loads((folder / "run" / "plan.json").read_text())["info"]["sample"]
    plan = next(r for r in recs if r["index"] == chosen)
    best_rnd = best_sample(rnd)
    at_most = [r for r in rnd if r["mean_use"] <= plan["mean_use"]]
    best_at_most = max(at_most, key=lambda r: r["score"]) if at_most else None
    return {
        "evals": {"random": len(rnd), "es": len(es) + (len(own) if against is not None else 0)},
        "es": {"score": plan["score"], "use": plan["mean_use"], "index": plan["index"]},
        "es_best_score": max(r["score"] for r in es),
        "random_best": {"score": best_rnd["score"], "use": best_rnd["mean_use"]},
        "random_best_at_es_use": ({"score": best_at_most["score"], "use": best_at_most["mean_use"],
                                   "n": len(at_most)} if best_at_most else None),
        "not_dominated": best_at_most is None or plan["score"] > best_at_most["score"],
        "beats_best_random": plan["score"] > best_rnd["score"] and plan["mean_use"] <= best_rnd["mean_use"],
    }


def to_markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = ["# Partition: ES against as many random samples", "",
             "Per run: ES's plan (best reward), the best random sample at no more mean channel use, and the best "
             "random sample overall. Scores: mean top-1 of the two tasks (%). Start: `random` (ES from a random P, "
             "all its evaluations ES steps) or `best-random R` (R random samples, ES from the best of them; "
             "the R count in its evaluations).", "",
             "| seed | λ | start | evaluations (each) | ES score | ES use | best random at ≤ ES use | not dominated | "
             "best random (use) | ES beats it at ≤ its use |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["result"]
        at = a["random_best_at_es_use"]
        at_s = f"{at['score']:.1f} ({at['n']} samples)" if at else "none"
        start = f"best-random {r['warmup']}" if r.get("warmup") else "random"
        lines.append(f"| {r['seed']} | {r['lambda']:g} | {start} | {a['evals']['es']} | {a['es']['score']:.1f} | "
                     f"{a['es']['use']:.3f} | {at_s} | {'yes' if a['not_dominated'] else 'no'} | "
                     f"{a['random_best']['score']:.1f} ({a['random_best']['use']:.3f}) | "
                     f"{'yes' if a['beats_best_random'] else 'no'} |")
    for lam, warm in sorted({(r["lambda"], r.get("warmup", 0)) for r in rows}):
        sub = [r["result"] for r in rows if r["lambda"] == lam and r.get("warmup", 0) == warm]
        start = f"best-random {warm}" if warm else "random"
        lines += ["", f"λ = {lam:g}, start {start}: not dominated on {sum(a['not_dominated'] for a in sub)} of {len(sub)} seeds; "
                  f"beats the best random sample at no more use on {sum(a['beats_best_random'] for a in sub)} of "
                  f"{len(sub)}; mean ES − best-random score {np.mean([a['es']['score'] - a['random_best']['score'] for a in sub]):+.2f}."]
    lines += ["", "```bash", command, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lambdas", default="0.001,0.5", help="diagonal penalties (the paper's default: 0.001)")
    ap.add_argument("--evals", type=int, default=96, help="evaluations of each kind (random, ES)")
    ap.add_argument("--directions", type=int, default=8, help="ES directions per step (2 evaluations each)")
    ap.add_argument("--score-batches", type=int, default=22)
    ap.add_argument("--out", default=None, help="tables as OUT.md / OUT.json (default WORK/partition-es)")
    ap.add_argument("--start", choices=("random", "best-random"), default="random",
                    help="best-random: also a warm-started ES run of the same cost per (seed, λ)")
    ap.add_argument("--warmup", type=int, default=None, help="with --start best-random: random samples R (default E/2)")
    ap.add_argument("--tables-only", action="store_true")
    args = ap.parse_args(argv)
    if args.evals % (2 * args.directions):
        raise SystemExit(f"partition_es.py: --evals {args.evals} is not a multiple of 2 x --directions")
    warm = 0
    if args.start == "best-random":
        warm = args.warmup if args.warmup is not None else args.evals // 2
        if not 0 < warm < args.evals or (args.evals - warm) % (2 * args.directions):
            raise SystemExit(f"partition_es.py: --warmup {warm} must lie in (0, --evals) and leave a multiple of "
                             "2 x --directions ES evaluations")
    work = Path(args.work)
    from efficacy import parse_seeds

    seeds = parse_seeds(args.seeds)
    lams = [float(x) for x in args.lambdas.split(",")]
    rows = []
    for lam in lams:
        for seed in seeds:
            folder = work / f"lam{lam:g}.s{seed}"
            if not (folder / "done.json").exists() and not args.tables_only:
                folder.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                run_one(folder, seed, lam, args.evals, args.directions, args.score_batches)
                print(f"[{time.time() - t0:6.0f} s] seed {seed}, λ {lam:g}", flush=True)
            if (folder / "done.json").exists():
                rows.append({"seed": seed, "lambda": lam, "result": analyse(folder)})
            if not warm:
                continue
            wfolder = work / f"lam{lam:g}.s{seed}.warm{warm}"
            if not (wfolder / "done.json").exists() and not args.tables_only:
                wfolder.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                run_one(wfolder, seed, lam, args.evals, args.directions, args.score_batches, warmup=warm)
                print(f"[{time.time() - t0:6.0f} s] seed {seed}, λ {lam:g}, ES from the best of {warm}", flush=True)
            if (wfolder / "done.json").exists() and (folder / "done.json").exists():
                rows.append({"seed": seed, "lambda": lam, "warmup": warm, "result": analyse(wfolder, folder)})
    command = "python bench/partition_es.py " + " ".join(sys.argv[1:] if argv is None else argv)
    from tables import write_tables

    write_tables(Path(args.out) if args.out else work / "partition-es", {"command": command, "runs": rows},
                 to_markdown(rows, command))
    print(to_markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
