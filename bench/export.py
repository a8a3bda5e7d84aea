"""Fused model vs the sum of the per-task models in onnxruntime, for policies sharing 0/50/100% of the VCNs.

For each policy, the fused graph computes every shared operator once; the per-task graphs each
compute their whole network. The latency ratio (fused / sum of per-task, measured interleaved in
the same run) is compared with the MAC ratio (fused MACs, shared operators counted once / summed
per-task MACs): sharing turns into speed when the latency ratio is at most 1.1x the MAC ratio.

Usage: ``python bench/export.py [--backbone tiny_resnet] [--tasks 3] [--provider cpu|cuda]
[--batch 8] [--repeats 30] [--out bench/results/export.json]``
"""

from __future__ import annotations

import argparse
import sys

from common import ROOT, environment, format_table, median_ms, setup, time_interleaved, write_json

TASKS = {2: "a:regress:1,b:class:2", 3: "a:regress:1,b:class:2,c:seg:3",
         4: "a:regress:1,b:class:2,c:seg:3,d:regress:2"}


def policy_sharing(model, fraction: float):
    """The first ``fraction`` of the VCNs shared by every task, the rest task-specific."""
    from mtc.ir import supergraph as sg

    names = [r.name for r in sg.vcns_of(model)]
    k = round(fraction * len(names))
    policy = sg.Policy.uniform(model, "specific")
    for v in names[:k]:
        policy.choices[v] = dict.fromkeys(policy.choices[v], 0)
    return policy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tiny_resnet")
    ap.add_argument("--tasks", type=int, default=3, choices=sorted(TASKS))
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--head-width", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export.json"))
    args = ap.parse_args(argv)
    threads = setup()

    from mtc.errors import MtcError
    from mtc.export.api import export_graphs, sample_input, session
    from mtc.frontends import import_model
    from mtc.ir.cost import model_cost
    from mtc.passes.pipeline import compile_supergraph

    model = import_model(str(ROOT / "backbones" / f"{args.backbone}.onnx"))
    compile_supergraph(model, tasks=TASKS[args.tasks], head_width=args.head_width)
    rows, records = [], []
    try:
        for frac in (0.0, 0.5, 1.0):
            ex = export_graphs(model, policy_sharing(model, frac))
            assert ex.fused is not None
            x = sample_input(ex.module.model, batch=args.batch)
            sessions = {t: session(m, args.provider, threads=threads) for t, m in ex.tasks.items()}
            fused = session(ex.fused, args.provider, threads=threads)
            name = fused.get_inputs()[0].name

            def run_tasks(sessions=sessions, name=name, x=x) -> None:
                for s in sessions.values():
                    s.run(None, {name: x})

            times = time_interleaved({"fused": lambda fused=fused, name=name, x=x: fused.run(None, {name: x}),
                                      "per_task": run_tasks}, warmup=5, repeats=args.repeats)
            fused_ms, sum_ms = median_ms(times["fused"]), median_ms(times["per_task"])
            fused_macs = model_cost(ex.fused)[1]
            sum_macs = sum(model_cost(m)[1] for m in ex.tasks.values())
            lat_ratio, mac_ratio = fused_ms / sum_ms, fused_macs / sum_macs
            rec = {"shared_vcns": f"{int(frac * 100)}%", "fused_ms": round(fused_ms, 3),
                   "sum_per_task_ms": round(sum_ms, 3), "latency_ratio": round(lat_ratio, 3),
                   "mac_ratio": round(mac_ratio, 3), "ok": lat_ratio <= 1.1 * mac_ratio}
            records.append(rec)
            rows.append(rec)
    except MtcError as e:
        print(f"bench/export.py: {e}", file=sys.stderr)
        return 2
    print(f"{args.backbone}, {args.tasks} tasks, {args.provider}, batch {args.batch}, {threads} threads")
    print(format_table(rows))
    write_json(args.out, {"backbone": args.backbone, "tasks": args.tasks, "provider": args.provider,
                          "batch": args.batch, "environment": environment(), "results": records})
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
