"""Fused model vs the sum of the per-task models in onnxruntime, for policies sharing 0/50/100% of the VCNs.

For each policy, the fused graph computes every shared operator once; the per-task graphs each
compute their whole network. The latency ratio (fused / sum of per-task, measured interleaved in
the same run: the median of the per-round ratios, with their interquartile range) is compared with the MAC ratio (fused MACs, shared operators counted once / summed
per-task MACs): sharing turns into speed when the latency ratio is at most 1.1x the MAC ratio.
``mac_op_time_ratio`` is the same ratio for the time spent in Conv/Gemm/MatMul kernels alone
(onnxruntime's profiler), and ``fused_time_in_other_ops`` the fused model's share of kernel time in
ops that have no MACs (Resize, layout reorders, pooling, elementwise): these explain a latency
ratio above the MAC ratio.

With ``--space branched`` the rows are trees of the branched space instead (all shared; two branches
from halfway down; two branches, then every task alone in the last block; all separate): the fused
tree computes each block once per group of tasks.

Every bundled tiny backbone at batch 8 and 32 by default; onnxruntime sessions are pinned to the
bench's thread count and treat denormals as zero (as bench/common.py does for torch).

Usage: ``python bench/export.py [--space automtl|branched] [--backbone tiny_resnet ...] [--tasks 3]
[--provider cpu|cuda] [--batch 8 32] [--repeats 200] [--out bench/results/export.json]``
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from common import ROOT, environment, format_table, median_ms, setup, time_interleaved, write_json

TASKS = {2: "a:regress:1,b:class:2", 3: "a:regress:1,b:class:2,c:seg:3",
         4: "a:regress:1,b:class:2,c:seg:3,d:regress:2"}


def policy_sharing(model, fraction: float):
    """The first ``fraction`` of the VCNs shared by every task, the rest task-specific."""
    from mtc.spaces.automtl import Policy, vcns_of

    names = [r.name for r in vcns_of(model)]
    k = round(fraction * len(names))
    policy = Policy.uniform(model, "specific")
    for v in names[:k]:
        policy.choices[v] = dict.fromkeys(policy.choices[v], 0)
    return policy


def kernel_ms(model, x, provider: str, threads: int, runs: int = 30) -> dict[str, float]:
    """Milliseconds per run spent in each op type's kernels (onnxruntime's profiler; the first
    run's one-off costs are averaged in)."""
    import json
    import os
    import tempfile

    from mtc.export.api import session, session_options

    opts = session_options(threads=threads, flush_denormals=True, spinning=False)
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="mtc-prof-"), "p")
    sess = session(model, provider, options=opts)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(runs):
        sess.run(None, feed)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    out: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            op = e["args"]["op_name"]
            out[op] = out.get(op, 0.0) + e["dur"] / 1e3 / runs
    return out


def measure(backbone: str, n_tasks: int, batch: int, head_width: int, provider: str, repeats: int,
            threads: int) -> list[dict]:
    """One row per sharing fraction for one backbone and batch size."""
    from mtc.export.api import export_graphs
    from mtc.frontends import import_model
    from mtc.spaces import compile_supergraph

    model = import_model(str(ROOT / "backbones" / f"{backbone}.onnx"))
    compile_supergraph(model, tasks=TASKS[n_tasks], head_width=head_width)
    rows = []
    for frac in (0.0, 0.5, 1.0):
        ex = export_graphs(model, policy_sharing(model, frac))
        rows.append({"backbone": backbone, "batch": batch, "shared_vcns": f"{int(frac * 100)}%",
                     **compare(ex, batch, provider, repeats, threads)})
    return rows


def trees(n_blocks: int, n_tasks: int) -> dict[str, list[list[int]]]:
    """Trees of the branched space as task labels per block: all shared; shared, then split in two
    groups halfway down; shared, two groups, then every task alone in the last block; all separate."""
    half = [i * 2 // n_tasks for i in range(n_tasks)]
    alone = list(range(n_tasks))
    mid = n_blocks // 2
    return {"shared": [[0] * n_tasks] * n_blocks,
            "two-branch": [[0] * n_tasks] * mid + [half] * (n_blocks - mid),
            "tree": [[0] * n_tasks] * mid + [half] * max(0, n_blocks - mid - 1) + [alone],
            "separate": [alone] * n_blocks}


def measure_trees(backbone: str, n_tasks: int, batch: int, head_width: int, provider: str, repeats: int,
                  threads: int) -> list[dict]:
    """One row per tree of the branched space (``--space branched``) for one backbone and batch size:
    the fused tree computes each block once per group (docs/spaces/branched.md)."""
    from mtc.export.api import export_graphs
    from mtc.frontends import import_model
    from mtc.spaces import compile_supergraph
    from mtc.spaces.branched import blocks_of, tree_to_plan
    from mtc.spaces.branched.trees import from_groups

    model = import_model(str(ROOT / "backbones" / f"{backbone}.onnx"))
    compile_supergraph(model, tasks=TASKS[n_tasks], head_width=head_width, space="branched")
    b = blocks_of(model)
    rows = []
    for name, labels in trees(len(b.choices), n_tasks).items():
        levels = [from_groups([[t for t, g in zip(b.tasks, lab, strict=True) if g == k] for k in sorted(set(lab))],
                              b.tasks) for lab in labels]
        ex = export_graphs(model, tree_to_plan(levels, b))
        rows.append({"backbone": backbone, "batch": batch, "tree": name,
                     "groups": "/".join(str(len(p)) for p in levels), **compare(ex, batch, provider, repeats, threads)})
    return rows


def compare(ex, batch: int, provider: str, repeats: int, threads: int) -> dict:
    """The fused model against the summed per-task models: latency ratio (median of paired rounds, with
    its interquartile range) against the MAC ratio, and where the time goes."""
    from mtc.export.api import sample_input, session
    from mtc.ir.cost import model_cost

    assert ex.fused is not None
    x = sample_input(ex.module.model, batch=batch)
    sessions = {t: session(m, provider, threads=threads, flush_denormals=True, spinning=False) for t, m in ex.tasks.items()}
    fused = session(ex.fused, provider, threads=threads, flush_denormals=True, spinning=False)
    name = fused.get_inputs()[0].name

    def run_tasks(sessions=sessions, name=name, x=x) -> None:
        for s in sessions.values():
            s.run(None, {name: x})

    times = time_interleaved({"fused": lambda fused=fused, name=name, x=x: fused.run(None, {name: x}),
                              "per_task": run_tasks}, warmup=5, repeats=repeats)
    fused_ms, sum_ms = median_ms(times["fused"]), median_ms(times["per_task"])
    fused_macs = model_cost(ex.fused)[1]
    sum_macs = sum(model_cost(m)[1] for m in ex.tasks.values())
    # Paired per round (the two ran back to back), so slow drift in the machine's speed cancels.
    paired = np.array(times["fused"]) / np.array(times["per_task"])
    lat_ratio, mac_ratio = float(np.median(paired)), fused_macs / sum_macs
    q1, q3 = np.percentile(paired, [25, 75])
    # Where the time goes: kernels of MAC-bearing ops vs the rest (Resize, layout reorders, ...).
    kf = kernel_ms(ex.fused, x, provider, threads)
    kt = [kernel_ms(m, x, provider, threads) for m in ex.tasks.values()]
    mac_ops = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul")
    conv_f = sum(v for k, v in kf.items() if k in mac_ops)
    conv_t = sum(v for d in kt for k, v in d.items() if k in mac_ops)
    other_share = 1 - conv_f / max(sum(kf.values()), 1e-9)
    return {"fused_ms": round(fused_ms, 3), "sum_per_task_ms": round(sum_ms, 3),
            "latency_ratio": round(lat_ratio, 3), "ratio_iqr": f"{q1:.3f}-{q3:.3f}",
            "mac_ratio": round(mac_ratio, 3),
            "mac_op_time_ratio": round(conv_f / max(conv_t, 1e-9), 3),
            "fused_time_in_other_ops": round(other_share, 3),
            "ok": lat_ratio <= 1.1 * mac_ratio}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", nargs="+", default=["tiny_resnet", "tiny_mobilenetv2", "tiny_densenet"])
    ap.add_argument("--tasks", type=int, default=3, choices=sorted(TASKS))
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--head-width", type=int, default=32)
    ap.add_argument("--space", default="automtl", choices=["automtl", "branched"],
                    help="automtl: policies sharing 0/50/100%% of the VCNs; branched: trees of task groups")
    ap.add_argument("--out", default=None, help="default bench/results/export.json (export_branched.json)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / ("export.json" if args.space == "automtl" else "export_branched.json"))
    threads = setup()

    from mtc.errors import MtcError

    records = []
    try:
        for backbone in args.backbone:
            for batch in args.batch:
                fn = measure if args.space == "automtl" else measure_trees
                records += fn(backbone, args.tasks, batch, args.head_width, args.provider, args.repeats, threads)
    except MtcError as e:
        print(f"bench/export.py: {e}", file=sys.stderr)
        return 2
    print(f"{args.tasks} tasks, {args.provider}, {threads} threads, median of {args.repeats}")
    print(format_table(records))
    write_json(args.out, {"space": args.space, "tasks": args.tasks, "provider": args.provider, "repeats": args.repeats,
                          "environment": environment(), "results": records})
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
