"""The partition space (Newell et al., "Feature Partitioning for Efficient Multi-Task Architectures").

Every task uses its own subset of the channels at each mask site (:mod:`.sites`); a small matrix P
of channel use and pairwise overlap parameterises the subsets (:mod:`.solver`, Eq. 1-3), and the
strategies ``random`` and ``es`` (evolution strategies) search P, scoring each sample with a
feature-distillation proxy or a short training (:mod:`.search`, :mod:`.proxy`). A plan keeps, per
site and task, the channels the solver gave the best P; export cuts the others out of each task's
model. docs/spaces/partition.md has every option.

This module imports no torch: the kernels and the search load on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.passes.base import Pass
from mtc.passes.streams import is_mtc, node_name
from mtc.spaces import Space, register_space, register_strategy
from mtc.spaces.partition.options import COMPILE_OPTIONS, ES_OPTIONS, RANDOM_OPTIONS
from mtc.spaces.partition.sites import MaskSites, mask_choices, space_options
from mtc.spaces.partition.solver import check_p, mean_use, remap, solve_masks

SPACE = "partition"
VERSION = 1

__all__ = ["Partition", "frozen_parameters", "plan_from_p"]


def site_seed(seed: int, name: str) -> list[int]:
    """The solver's seed for one site (a site's masks depend on P, its channel count and this)."""
    import zlib

    return [int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())]


def plan_from_p(model: ir.Model, p: Any, *, seed: int = 0, backward: str = "forward", solver_iters: int = 2000,
                info: dict[str, Any] | None = None) -> Plan:
    """The plan of a partitioning matrix P: per site, the solver's masks for ``P̃`` (Eq. 1-3).

    Args:
        model: a partition supergraph.
        p: the ``[N, N]`` matrix (N tasks).
        seed: seeds the solver (per site).
        backward: how the backward masks follow (``forward``, ``exclusive``, ``split``).

    Raises:
        MtcError: P is not square in the task count, not symmetric, or outside [0, 1].
    """
    tasks = sg.task_names(model)
    a = check_p(p, len(tasks))
    pt = remap(a)
    masks: dict[str, dict[str, list[int]]] = {}
    back: dict[str, dict[str, list[int]]] = {}
    for c in mask_choices(model, SPACE):
        m = solve_masks(pt, c.channels, seed=site_seed(seed, c.name), max_iters=solver_iters)
        masks[c.name] = {t: np.flatnonzero(m[:, i]).tolist() for i, t in enumerate(tasks)}
        back[c.name] = backward_masks(m, backward, tasks)
    plan = Plan(space=SPACE, version=VERSION, masks=masks,
                info={"P": np.round(a, 6).tolist(), "P_tilde": np.round(pt, 6).tolist(),
                      "mean_use": round(mean_use(a), 6), **(info or {})})
    if backward != "forward":
        plan.info["backward"] = back
        plan.info["backward_mask"] = backward
    return plan


def backward_masks(m: np.ndarray, how: str, tasks: list[str]) -> dict[str, list[int]]:
    """Backward masks within the forward masks ``m`` (``[C, N]``): ``forward`` (the same),
    ``exclusive`` (the channels only the task reads) or ``split`` (each channel is updated by one
    of the tasks reading it, the readers taking turns over the channels they share)."""
    b = m.astype(bool).copy()
    if how == "exclusive":
        b &= (m.sum(1) == 1)[:, None]
    elif how == "split":
        b[:] = False
        turn: dict[tuple[int, ...], int] = {}
        for c in range(m.shape[0]):
            readers = tuple(np.flatnonzero(m[c]).tolist())
            if readers:
                k = turn.get(readers, 0)
                b[c, readers[k % len(readers)]] = True
                turn[readers] = k + 1
    elif how != "forward":
        raise MtcError(f"--backward-mask: '{how}' is not one of forward, exclusive, split")
    return {t: np.flatnonzero(b[:, i]).tolist() for i, t in enumerate(tasks)}


def frozen_parameters(model: ir.Model) -> list[str]:
    """With ``--freeze-shared``: the parameters of the layers before the partitioned part."""
    opts = space_options(model, SPACE)
    if not opts.get("freeze_shared"):
        return []
    entry = str(opts.get("entry", ""))
    g = model.graph
    producer = next((n for n in g for o in n.outputs if o.name == entry), None)
    if producer is None:
        return []
    seen: set[str] = set()
    stack = [producer]
    names: list[str] = []
    while stack:
        n = stack.pop()
        if node_name(n) in seen:
            continue
        seen.add(node_name(n))
        for v in n.inputs:
            if v is None:
                continue
            if v.is_initializer():
                if not is_mtc(n) and v.name not in names and v.const_value is not None and v.const_value.dtype in (
                        ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
                    names.append(str(v.name))
            elif v.producer() is not None:
                stack.append(v.producer())  # type: ignore[arg-type]
    return sorted(names)


@register_space
class Partition(Space):
    """Newell et al.'s feature partitioning (see the module docstring)."""

    name = SPACE
    version = VERSION
    help = "feature partitioning (Newell et al.): per-task channel masks from a matrix P, searched by ES or random"
    compile_options = COMPILE_OPTIONS
    default_strategy = "es"

    def passes(self, model: ir.Model, options: dict[str, Any], *, seed: int) -> list[Pass]:
        return [MaskSites(name="partition-masks", sites=str(options["sites"]), alternate=True,
                          task_norm=bool(options["task_norm"]), space=SPACE, version=VERSION,
                          space_options={"sites": str(options["sites"]),
                                         "freeze_shared": bool(options["freeze_shared"])})]

    def check_plan(self, plan: Plan, model: ir.Model, *, source: str | None = None) -> None:
        tasks = sg.task_names(model)
        if "P" in plan.info:
            try:
                check_p(plan.info["P"], len(tasks), what="the plan's P (info.P)")
            except MtcError as e:
                raise MtcError(str(e), file=source) from None
        back = plan.info.get("backward")
        if back is None:
            return
        if not isinstance(back, dict):
            raise MtcError("plan info 'backward' must map mask choices to tasks to channels", file=source)
        for c in mask_choices(model, SPACE):
            per = back.get(c.name)
            if not isinstance(per, dict) or sorted(per) != sorted(tasks):
                raise MtcError(f"plan info 'backward': mask choice '{c.name}' needs the channels of every task",
                               file=source)
            for t, idx in per.items():
                if not isinstance(idx, list) or not set(idx) <= set(plan.masks[c.name][t]):
                    raise MtcError(f"plan info 'backward': mask choice '{c.name}', task '{t}': a backward mask must "
                                   "keep a subset of the task's forward channels", file=source)

    def train_network(self, model: ir.Model, plan: Plan, *, device: str | None = None) -> Any:
        from mtc.spaces.partition.lowering import has_backward, training_network

        frozen = frozen_parameters(model)
        if not frozen and not has_backward(plan):
            return None
        return training_network(model, plan, frozen=frozen, device=device)

    def snapshot(self, model: ir.Model) -> dict[str, Any]:
        cs = mask_choices(model, SPACE)
        return {"partition": {"sites": [c.name for c in cs], "channels": [c.channels for c in cs],
                              "task_norm": bool(space_options(model, SPACE).get("task_norm", True))}}

    def summary(self, model: ir.Model) -> dict[str, Any]:
        opts = space_options(model, SPACE)
        return {"sites": {c.name: c.channels for c in mask_choices(model, SPACE)}, "entry": opts.get("entry"),
                "task_norm": opts.get("task_norm"), "freeze_shared": opts.get("freeze_shared")}

    def describe_plan(self, model: ir.Model, plan: Plan) -> str:
        tasks = sg.task_names(model)
        lines = []
        for c in mask_choices(model, SPACE):
            per = ", ".join(f"{t} {len(plan.masks[c.name][t])}" for t in tasks)
            lines.append(f"  {c.name} ({c.channels} channels): {per}")
        use = plan.info.get("mean_use")
        head = f"mean channel use {use:.3f}" if isinstance(use, float) else "kept channels per site and task"
        return head + "\n" + "\n".join(lines)


register_strategy(Partition, "es", "evolution strategies over P (Mania et al.'s random search) with an L2 penalty on "
                  "its diagonal, samples scored by distillation", ES_OPTIONS, "mtc.spaces.partition.search:EvolutionSearch")
register_strategy(Partition, "random", "random P, each scored by distillation (the paper's Fig. 5 map)", RANDOM_OPTIONS,
                  "mtc.spaces.partition.search:RandomSearch")
