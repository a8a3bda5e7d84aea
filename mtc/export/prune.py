"""``mtc prune``: a physically smaller model of standard ONNX ops, verified before it is written.

The verification oracle is independent of the pruner (:mod:`mtc.passes.prune`): it is the
original model, full width, with the weights through which consumers read a removed channel set to
zero (:func:`zeroed_reference`). It reads only the groups' consumer ports and the consumers' own
attributes, never the pruner's rewrite rules. The pruned model must match it in onnxruntime to
``1e-5`` (max |a - b| / max |reference| per output) or nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.export.api import VerificationError, rel_diff, session
from mtc.ir.channels import Channels, analyze
from mtc.ir.cost import human, model_cost
from mtc.ir.shapes import input_dims
from mtc.passes.prune import ChannelPlan, apply_plan, build_plan

__all__ = ["TOLERANCE", "PruneResult", "parse_ignore", "parse_keep", "print_prune_report", "prune_model",
           "prune_report", "random_feeds", "verify_pruned", "write_pruned", "zeroed_reference"]

#: Largest relative difference between the pruned model and the zeroed-consumer oracle.
TOLERANCE = 1e-5


@dataclass
class PruneResult:
    """A pruned model with what made it."""

    model: ir.Model
    original: ir.Model
    channels: Channels
    plan: ChannelPlan


# --- the oracle ------------------------------------------------------------------------------------


def _zero_consumer_weights(g: ir.Graph, node: ir.Node, data_index: int, positions: np.ndarray) -> None:
    """Zero the weights through which ``node`` reads ``positions`` of its input ``data_index``."""
    op = node.op_type
    w_index = 0 if (op == "MatMul" and data_index == 1) else 1
    wv = node.inputs[w_index]
    t = ir.convenience.get_const_tensor(wv) if wv is not None else None
    if wv is None or t is None:
        raise ValueError(f"consumer '{node.name}' ({op}) has no constant weight")
    W = t.numpy().copy()
    if op == "Conv":
        groups = int(node.attributes["group"].value) if "group" in node.attributes else 1
        cin_g, cout_g = W.shape[1], W.shape[0] // groups
        for p in positions:
            k = int(p) // cin_g  # the conv group reading input channel p
            W[k * cout_g:(k + 1) * cout_g, int(p) % cin_g] = 0
    elif op == "ConvTranspose":
        W[positions] = 0  # weight [C_in, C_out/group, k...]: input channels on axis 0 for any group
    elif op == "Gemm":
        trans_b = int(node.attributes["transB"].value) if "transB" in node.attributes else 0
        if trans_b:
            W[:, positions] = 0
        else:
            W[positions] = 0
    elif op == "MatMul":
        if data_index == 0:
            W[positions] = 0  # x @ W: W's rows read x's last axis
        else:
            W[:, positions] = 0  # W @ x: W's columns read x's second-to-last axis
    else:
        raise ValueError(f"consumer '{node.name}' has an op ({op}) the oracle does not know")
    name = f"{wv.name}@zeroed@{node.name}"
    val = ir.Value(name=name, shape=ir.Shape(W.shape), type=ir.TensorType(ir.DataType.from_numpy(W.dtype)),
                   const_value=ir.tensor(W, name=name))
    g.register_initializer(val)
    node.replace_input_with(w_index, val)
    if wv.name is not None and wv.name in g.initializers and not wv.uses() and not wv.is_graph_output():
        del g.initializers[wv.name]


def zeroed_reference(model: ir.Model, channels: Channels, plan: ChannelPlan) -> ir.Model:
    """The original model (a copy) with every consumer weight that reads a removed channel set to zero."""
    out = model.clone()
    nodes = {n.name: n for n in out.graph}
    for gid, idx in plan.keep.items():
        group = channels.groups[gid]
        kept = np.zeros(group.size, dtype=bool)
        kept[np.asarray(idx, dtype=np.int64)] = True
        for c in group.consumers:
            removed = c.positions[~kept[c.units]]
            if removed.size:
                _zero_consumer_weights(out.graph, nodes[c.node], c.index, removed)
    return out


# --- verification ----------------------------------------------------------------------------------


def random_feeds(model: ir.Model, *, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for every graph input (symbolic batch -> ``batch``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.inputs:
        shape = input_dims(v, batch, "import with --input-shape")
        dtype = v.dtype.numpy() if v.dtype is not None else np.float32
        feeds[v.name or ""] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _run(model: ir.Model, feeds: dict[str, np.ndarray], provider: str) -> dict[str, np.ndarray]:
    s = session(model, provider)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds), strict=True))


def verify_pruned(model: ir.Model, pruned: ir.Model, channels: Channels, plan: ChannelPlan, *, seed: int = 0,
                  batch: int = 2, provider: str = "cpu", tolerance: float = TOLERANCE) -> dict[str, float]:
    """Run ``pruned`` and the zeroed-consumer oracle of ``model`` on one seeded input.

    Returns:
        the relative difference per output.

    Raises:
        VerificationError: an output is missing, has another shape, or differs above ``tolerance``.
    """
    feeds = random_feeds(model, seed=seed, batch=batch)
    ref = _run(zeroed_reference(model, channels, plan), feeds, provider)
    got = _run(pruned, feeds, provider)
    diffs: dict[str, float] = {}
    for name, r in ref.items():
        if name not in got:
            raise VerificationError(f"the pruned model lacks output '{name}'")
        diffs[name] = rel_diff(got[name], r)
    worst = max(diffs, key=lambda k: diffs[k]) if diffs else None
    if worst is not None and not diffs[worst] <= tolerance:
        raise VerificationError(f"output '{worst}' differs from the zeroed-consumer reference by {diffs[worst]:.3g} "
                                f"(relative; tolerance {tolerance:g})")
    return diffs


# --- the command -----------------------------------------------------------------------------------


def parse_keep(text: str | None) -> dict[str, int]:
    """``GROUP=N,...`` -> ``{GROUP: N}`` (GROUP is a group name or id from ``mtc inspect --channels``)."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, n = item.rpartition("=")
        if not eq or not name.strip():
            raise MtcError(f"--keep: '{item}' is not GROUP=N")
        try:
            out[name.strip()] = int(n)
        except ValueError:
            raise MtcError(f"--keep: '{item}': N must be a whole number of channels") from None
    return out


def parse_ignore(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def prune_model(model: ir.Model, *, ratio: float | None = None, keep: dict[str, int] | None = None,
                importance: str = "l1", round_to: int = 1, ignore: Sequence[str] = (), seed: int = 0) -> PruneResult:
    """Analyse ``model``, make the plan for the budget and return the pruned copy (not yet verified).

    Raises:
        MtcError: a bad budget (see :func:`mtc.passes.prune.build_plan`).
    """
    channels = analyze(model)
    plan = build_plan(model, channels, ratio=ratio, keep=dict(keep or {}), importance=importance,
                      round_to=round_to, ignore=ignore, seed=seed)
    return PruneResult(apply_plan(model, channels, plan), model, channels, plan)


def prune_report(result: PruneResult, *, provider: str = "cpu", repeat: int = 30, batch: int = 1) -> dict[str, Any]:
    """Parameters, MACs and onnxruntime latency (interleaved, median) before and after."""
    from mtc.export.report import latencies_ms

    x = next(iter(random_feeds(result.original, seed=0, batch=batch).values()))
    ms = latencies_ms({"original": result.original, "pruned": result.model}, x, provider=provider, repeat=repeat)
    rows = {}
    for key, m in (("original", result.original), ("pruned", result.model)):
        params, macs, _ = model_cost(m)
        rows[key] = {"params": int(params), "macs": int(macs), "latency_ms": ms[key]}
    ch = result.channels
    pruned_groups = [g for g in result.plan.keep if len(result.plan.keep[g]) < ch.groups[g].size]
    return {"provider": provider, "batch": batch, "repeat": repeat, **rows,
            "groups": {"total": len(ch), "prunable": len(ch.prunable), "pruned": len(pruned_groups)},
            "channels": {"total": int(sum(g.size for g in ch)), "removed": result.plan.removed(ch)}}


def print_prune_report(rep: dict[str, Any]) -> str:
    """The report as a plain-text table (like the deployment report's)."""
    a, b = rep["original"], rep["pruned"]

    def pct(k: str) -> str:
        return f"{100.0 * (b[k] - a[k]) / a[k]:+.1f}%" if a[k] else "-"

    g, c = rep["groups"], rep["channels"]
    return "\n".join([
        f"prune report ({rep['provider']}, batch {rep['batch']}, median of {rep['repeat']} interleaved runs)",
        f"{'model':<10} {'params':>9} {'MACs':>9} {'latency ms':>11}",
        f"{'original':<10} {human(a['params']):>9} {human(a['macs']):>9} {a['latency_ms']:>11.3f}",
        f"{'pruned':<10} {human(b['params']):>9} {human(b['macs']):>9} {b['latency_ms']:>11.3f}",
        f"{'change':<10} {pct('params'):>9} {pct('macs'):>9} {pct('latency_ms'):>11}",
        f"{g['pruned']} of {g['prunable']} prunable groups pruned ({g['total']} groups); "
        f"{c['removed']} of {c['total']} channels removed",
    ])


def write_pruned(result: PruneResult, out: str | os.PathLike[str], *, provider: str = "cpu", seed: int = 0,
                 tolerance: float = TOLERANCE) -> tuple[Path, dict[str, float]]:
    """Verify ``result`` against the zeroed-consumer oracle, then save it atomically.

    Raises:
        VerificationError: the pruned model disagrees with the oracle (nothing is written).
    """
    from mtc.ir.io import save

    diffs = verify_pruned(result.original, result.model, result.channels, result.plan, seed=seed,
                          provider=provider, tolerance=tolerance)
    return save(result.model, out), diffs
