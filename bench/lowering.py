"""Forward+backward step time of the lowered module vs the hand-written PyTorch module it came from.

For every reference architecture in :mod:`mtc.zoo`: export the module (weights and BN statistics
included) with the chosen exporters, lower the ONNX with :func:`mtc.lower.lower`, and time one
training step (train mode, forward, mean of the outputs, backward) of both at batch 8, interleaved
in the same run. Reports median milliseconds and the ratio lowered / hand-written.

Usage::

    python bench/lowering.py [--out bench-out/lowering.json] [--batch 8] [--repeats 25]
        [--threads N] [--exporter torchscript --exporter frontend] [--models a,b] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import torch
from common import environment, format_table, ratio_rows, setup, time_interleaved, write_json

#: The requirement: lowered / hand-written step time.
MAX_RATIO = 1.15


def _step(module: torch.nn.Module, x: torch.Tensor, params: list[torch.nn.Parameter]) -> Any:
    def run() -> None:
        for p in params:
            p.grad = None
        out = module(x)
        outs = out if isinstance(out, tuple | list) else (out,)
        loss = sum(o.float().mean() for o in outs)
        loss.backward()

    return run


def bench_model(name: str, exporter: str, *, batch: int, repeats: int, warmup: int, device: str) -> dict[str, Any]:
    from mtc import zoo
    from mtc.lower import lower
    from mtc.lower.reference import export_reference

    if exporter == "frontend":
        # mtc's own import pipeline (symbolic batch, shape folding), as `mtc import` runs it.
        from mtc.frontends import canonicalize_import
        from mtc.lower.reference import export_module

        ref = zoo.build(name)
        shape = [batch, *zoo.REFERENCE[name][1][1:]]
        model = canonicalize_import(export_module(ref, shape, "dynamo-bn", dynamic_batch=True), file=name)
    else:
        ref, model = export_reference(name, exporter, batch=batch)
    low = lower(model, device=device)
    ref = ref.to(device).train()
    low.train()
    shape = list(zoo.REFERENCE[name][1])
    shape[0] = batch
    x = torch.randn(*shape, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    times = time_interleaved(
        {"lowered": _step(low, x, list(low.parameters())), "torch": _step(ref, x, list(ref.parameters()))},
        warmup=warmup, repeats=repeats, sync=sync,
    )
    return times


def main(argv: list[str] | None = None) -> int:
    from mtc import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=25, help="timed steps per module (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--exporter", action="append", default=None,
                    help="export flavour (mtc.lower.reference.EXPORTERS, or 'frontend' for mtc's import "
                         "pipeline with a symbolic batch); repeatable; default torchscript, dynamo-bn, frontend")
    ap.add_argument("--models", default=None, help="comma-separated subset of mtc.zoo.REFERENCE")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be at least 5")
    warnings.filterwarnings("ignore")
    threads = setup(args.threads)
    exporters = args.exporter or ["torchscript", "dynamo-bn", "frontend"]
    models = args.models.split(",") if args.models else list(zoo.REFERENCE)

    times: dict[str, dict[str, list[float]]] = {}
    for name in models:
        for exp in exporters:
            times[f"{name} ({exp})"] = bench_model(name, exp, batch=args.batch, repeats=args.repeats,
                                                    warmup=args.warmup, device=args.device)
    rows = ratio_rows(times, candidate="lowered", baseline="torch")
    worst = max(r["ratio"] for r in rows)
    print(f"forward+backward step, batch {args.batch}, {args.device}, {threads} threads, "
          f"median of {args.repeats} steps (lowered / hand-written)")
    print(format_table(rows, ["case", "lowered_ms", "torch_ms", "ratio"]))
    ok = worst <= MAX_RATIO
    print(f"worst ratio {worst:.3f} ({'within' if ok else 'ABOVE'} the {MAX_RATIO} bound)")
    if args.out:
        write_json(args.out, {"benchmark": "lowering", "batch": args.batch, "device": args.device,
                              "repeats": args.repeats, "max_ratio": MAX_RATIO, "ok": ok,
                              "environment": environment(), "rows": rows})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
