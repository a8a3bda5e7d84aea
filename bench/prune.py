"""``mtc prune --ratio 0.5``: MACs, parameters and onnxruntime latency before and after.

For each model (default: ``backbones/tiny_resnet.onnx``, ``backbones/tiny_mobilenetv2.onnx``,
``backbones/mobilenetv2.prototxt``) the backbone is imported, pruned at ``--ratio`` with L1
importance (:func:`mtc.export.prune.prune_model`), verified against the zeroed-consumer oracle
(:func:`mtc.export.prune.verify_pruned`), and then both models are timed in onnxruntime in the
same run: sessions pinned to the bench's thread count, denormals treated as zero, no spinning;
warm-up rounds, then ``--repeats`` rounds interleaved (order alternating every round). Reported per
batch size: the median latency of each, the median of the per-round latency ratios (pruned /
original; the two ran back to back, so slow drift cancels) with its interquartile range, and the
MAC and parameter ratios.

Checks: MACs fall by at least 40 % and the latency ratio is below 1 for every model and batch.

Usage: ``python bench/prune.py [--model PATH ...] [--ratio 0.5] [--batch 1 8] [--repeats 100]
[--out bench/results/prune.json]``
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
from common import ROOT, environment, format_table, median_ms, setup, time_interleaved, write_json

MODELS = ["backbones/tiny_resnet.onnx", "backbones/tiny_mobilenetv2.onnx", "backbones/mobilenetv2.prototxt"]


def measure(path: str, ratio: float, batches: list[int], repeats: int, threads: int) -> list[dict]:
    from mtc.export.api import session
    from mtc.export.prune import prune_model, random_feeds, verify_pruned
    from mtc.frontends import import_model
    from mtc.ir.cost import model_cost

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = import_model(str(ROOT / path))
    res = prune_model(model, ratio=ratio)
    worst = max(verify_pruned(model, res.model, res.channels, res.plan).values())
    (p0, m0, _), (p1, m1, _) = model_cost(model), model_cost(res.model)
    rows = []
    for batch in batches:
        x = next(iter(random_feeds(model, batch=batch).values()))
        sess = {k: session(m, "cpu", threads=threads, flush_denormals=True, spinning=False)
                for k, m in (("original", model), ("pruned", res.model))}
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sess.items()}
        times = time_interleaved({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sess.items()},
                                 warmup=5, repeats=repeats)
        paired = np.array(times["pruned"]) / np.array(times["original"])
        q1, q3 = np.percentile(paired, [25, 75])
        lat = float(np.median(paired))
        rows.append({"model": path.split("/")[-1], "batch": batch, "original_ms": round(median_ms(times["original"]), 3),
                     "pruned_ms": round(median_ms(times["pruned"]), 3), "latency_ratio": round(lat, 3),
                     "ratio_iqr": f"{q1:.3f}-{q3:.3f}", "mac_ratio": round(m1 / m0, 3),
                     "param_ratio": round(p1 / p0, 3), "macs": f"{m0:,} -> {m1:,}",
                     "groups_pruned": f"{len(res.plan.keep)}/{len(res.channels.prunable)}",
                     "max_rel_diff": f"{worst:.1e}", "ok": m1 <= 0.6 * m0 and lat < 1.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=MODELS, help="Paths relative to the repository root.")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prune.json"))
    args = ap.parse_args(argv)
    threads = setup()

    from mtc.errors import MtcError

    records: list[dict] = []
    try:
        for path in args.model:
            records += measure(path, args.ratio, args.batch, args.repeats, threads)
    except MtcError as e:
        print(f"bench/prune.py: {e}", file=sys.stderr)
        return 2
    print(f"ratio {args.ratio}, cpu, {threads} threads, median of {args.repeats} interleaved rounds")
    print(format_table(records))
    write_json(args.out, {"ratio": args.ratio, "repeats": args.repeats, "environment": environment(),
                          "results": records})
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
