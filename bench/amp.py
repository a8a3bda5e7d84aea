"""Mixed precision (``--amp``) against float32: time of one training step and its memory.

The network is ``backbones/tiny_resnet.onnx`` at ``--size`` with two tasks (``a:regress:1``,
``b:class:4``, small heads), lowered as ``mtc baseline`` lowers its hard-shared model. One step is
what :class:`mtc.train.trainer.Trainer` runs: forward (under ``torch.autocast`` for the bf16 case,
outputs cast back to float32), task losses in float32, backward, one Adam step. Both cases run in
the same process on the same batch, interleaved step by step (:func:`mtc.timing.time_interleaved`)
after a warm-up; the median of ``--repeats`` steps (at least 5) is reported, threads fixed
(``--threads``), denormals flushed.

Memory is the bytes autograd saves for backward during one forward (every tensor the
``saved_tensors_hooks`` see, counted once per storage): the activation memory that mixed
precision shrinks; on CUDA the peak allocated memory of a step is reported as well.

Usage::

    python bench/amp.py [--out bench-out/amp.json] [--size 64] [--batch 8] [--threads 2]
        [--repeats 15] [--warmup 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import ROOT, environment, format_table, median_ms, setup, time_interleaved, write_json  # noqa: E402


def build(size: int, device: str) -> Any:
    from mtc.frontends import import_model
    from mtc.lower.module import lower
    from mtc.passes.pipeline import prepare_multitask

    m = import_model(ROOT / "backbones" / "tiny_resnet.onnx", input_shape=(1, 3, size, size))
    prepare_multitask(m, tasks="a:regress:1,b:class:4", head_width=16)
    return lower(m, device=device)


def saved_bytes(step_forward: Any) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_forward()
    return sum(seen.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "amp.json"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be at least 5")
    threads = setup(args.threads)

    from mtc.tasks.spec import TaskSpec
    from mtc.train.loop import autocast_forward, task_losses

    tasks = [TaskSpec("a", "regress", 1), TaskSpec("b", "class", 4)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device)
    targets = {"a": torch.randn(args.batch, 1, generator=g).to(args.device),
               "b": torch.randint(0, 4, (args.batch,), generator=g).to(args.device)}
    cases: dict[str, Any] = {}
    for name, amp in (("fp32", False), ("bf16", "bf16")):
        torch.manual_seed(0)
        module = build(args.size, args.device).train()
        opt = torch.optim.Adam(module.parameters(), lr=1e-4)
        cases[name] = (module, opt, amp)

    def forward(name: str) -> torch.Tensor:
        module, _, amp = cases[name]
        losses = task_losses(autocast_forward(module, x, amp), targets, tasks)
        assert all(v.dtype == torch.float32 for v in losses.values())
        return torch.stack(list(losses.values())).sum()

    def step(name: str) -> None:
        _, opt, _ = cases[name]
        opt.zero_grad(set_to_none=True)
        forward(name).backward()
        opt.step()

    sync = torch.cuda.synchronize if args.device == "cuda" else None
    times = time_interleaved({n: (lambda n=n: step(n)) for n in cases}, warmup=args.warmup, repeats=args.repeats,
                             sync=sync)
    mem = {n: saved_bytes(lambda n=n: forward(n)) for n in cases}
    peak: dict[str, int] = {}
    if args.device == "cuda":
        for n in cases:
            torch.cuda.reset_peak_memory_stats()
            step(n)
            torch.cuda.synchronize()
            peak[n] = int(torch.cuda.max_memory_allocated())
    rows = [{"precision": n, "step_ms": round(median_ms(times[n]), 2),
             "saved_for_backward_MiB": round(mem[n] / 2**20, 2),
             **({"peak_MiB": round(peak[n] / 2**20, 2)} if peak else {})} for n in cases]
    ratio = {"time_bf16_over_fp32": round(median_ms(times["bf16"]) / median_ms(times["fp32"]), 3),
             "memory_bf16_over_fp32": round(mem["bf16"] / mem["fp32"], 3)}
    if peak:
        ratio["peak_bf16_over_fp32"] = round(peak["bf16"] / peak["fp32"], 3)
    print(format_table(rows))
    print(ratio)
    out = {"environment": environment(), "threads": threads, "device": args.device, "size": args.size,
           "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup, "rows": rows, "ratios": ratio,
           "times_s": times}
    print(f"wrote {write_json(args.out, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
