"""``mtc export RUN --budget B --preference T=V,..`` (or ``--widths FILE``) for a slimmable run.

The sub-network for the budget and preference is searched with Algorithm 2 (the run's predictor,
the cost model of the fused model as export writes it), its BatchNorm statistics are recalibrated
on training batches, and the plan plus the supernet's weights with those statistics go to the
generic export, which slims the zeroed channels away and verifies every file against the lowering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.ir.shapes import static_dims
from mtc.spaces import ExportChoice
from mtc.spaces.slimmable import evolution as evo
from mtc.spaces.slimmable.config import WidthSpace
from mtc.spaces.slimmable.cost import CostModel
from mtc.spaces.slimmable.lowering import (
    calibration_batches,
    controls_of,
    lower_supernet,
    norm_stats,
    recalibrate,
)
from mtc.spaces.slimmable.options import parse_macs, parse_preference
from mtc.spaces.slimmable.predictor import Predictor

#: the checkpoint ``mtc search`` leaves in the run directory: the trained supernet
SEARCH_CHECKPOINT = "search"


def cost_model(model: ir.Model, space: WidthSpace, deployed: Callable[[Plan], ir.Model] | None) -> CostModel:
    """The MACs of the fused model as it is deployed (``deployed``), else of the sliced network."""
    from mtc.spaces.slimmable.search import bound_full, full_plan

    ref = bound_full(model, space)
    if deployed is None:
        return CostModel(ref, space)
    return CostModel(deployed(full_plan(space)), space, reference=ref)


def supernet_weights(run: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The trained supernet's tensors by IR name, and the checkpoint's path."""
    if not run.has_checkpoint(SEARCH_CHECKPOINT):
        raise MtcError("the run has no trained supernet (checkpoints/search.safetensors): run mtc search first",
                       file=str(run.path))
    tensors, _ = run.load_checkpoint(SEARCH_CHECKPOINT)
    prefix = "module/"
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, str(
        run.checkpoint_path(SEARCH_CHECKPOINT))


def export_choice(run: Any, model: ir.Model, options: dict[str, Any], *, device: str = "cpu",
                  deployed: Callable[[Plan], ir.Model] | None = None) -> ExportChoice:
    """The plan and recalibrated weights for ``--budget``/``--preference`` or ``--widths`` (module docstring).

    Raises:
        MtcError: a budget outside the sub-networks' range (both limits named), a preference naming an
            unknown task or with a negative value, widths that do not fit, ``--widths`` with
            ``--budget``/``--preference``, or a run without a trained supernet or predictor.
    """
    space = WidthSpace.of(model)
    tasks = space.tasks
    widths_file = str(options.get("widths") or "")
    budget_text = str(options.get("budget") or "")
    pref_text = str(options.get("preference") or "")
    if widths_file and (budget_text or pref_text):
        raise MtcError("--widths gives the whole configuration: it excludes --budget and --preference")
    if not widths_file and not budget_text and not pref_text:
        raise MtcError("give --budget B (and --preference T=V,..) or --widths FILE")
    tau = parse_preference(pref_text, tasks) if pref_text else dict.fromkeys(tasks, 1.0)
    budget = parse_macs(budget_text) if budget_text else None
    # What fails on the files alone fails before any graph work.
    cfg = space.read_widths_file(widths_file, model) if widths_file else None
    weights, source = supernet_weights(run)
    cost = cost_model(model, space, deployed)
    lo, hi = cost.macs(space.smallest()), cost.macs(space.full())
    info: dict[str, Any] = {"space": "slimmable", "macs_range": [lo, hi]}
    if cfg is not None:
        info["widths_file"] = widths_file
    else:
        b = float(hi) if budget is None else budget
        evo.check_budget(b, cost.macs, space)
        predictor, meta = Predictor.load(run.path)
        if meta.get("choices") != [c.name for c in space.choices]:
            raise MtcError("the run's predictor was trained for other width choices than the supergraph's",
                           file=str(run.path))
        cfg_run = run.config().get("search", {})

        def predict(cfgs: np.ndarray) -> np.ndarray:
            return predictor(np.stack([space.vector(c) for c in cfgs]))

        seed = int(run.config().get("seed", 0))
        res = evo.search(space, [tau[t] for t in tasks], b, cost.macs, predict, np.random.default_rng([seed, 0xE7]),
                         pool=int(cfg_run.get("pool", 50)), cycles=int(cfg_run.get("cycles", 10)),
                         groups=int(cfg_run.get("mutate", 1)), eta=float(cfg_run.get("eta", 0.1)))
        cfg = res.config
        info.update({"budget_macs": b, "preference": tau,
                     "decoder_ratios": {t: space.ratios[int(k)] for t, k in zip(tasks, res.decoders.indices,
                                                                                  strict=True)},
                     "decoder_cap": None if res.decoders.cap is None else space.ratios[res.decoders.cap],
                     "predicted_losses": dict(zip(tasks, res.predicted.tolist(), strict=True))})
    macs = cost.macs(cfg)
    info["predicted_macs"] = macs
    plan = space.to_plan(cfg, info={k: v for k, v in info.items() if k in ("budget_macs", "preference")})
    module = lower_supernet(model, device=device)
    module.load_ir_state(weights, source=source)
    controls_of(module).set(space, cfg)
    cal = int(options.get("calib_batches", 20))
    rc = run.config()
    from mtc.data import load_data
    from mtc.tasks.spec import tasks_of

    task_specs = tasks_of(model) or []
    shape = tuple(int(d) for d in (static_dims(model.graph.inputs[0]) or ())[1:])
    train, _ = load_data(str(rc["data"]), task_specs, shape, int(rc.get("seed", 0)))
    batch = int(rc.get("search", {}).get("batch_size", 8))
    calib = calibration_batches(train, task_specs, batches=cal, batch_size=batch, seed=int(rc.get("seed", 0)),
                                device=device)
    recalibrate(module, norm_stats(module.model), calib)
    info["calib_batches"] = cal
    info["summary"] = _summary(info, space, cfg)
    state = {k: v.detach().cpu() for k, v in module.ir_state().items()}
    assert sg.task_names(model) == tasks
    return ExportChoice(plan=plan, weights=state, info=info, weights_source=source)


def _summary(info: dict[str, Any], space: WidthSpace, cfg: np.ndarray) -> list[str]:
    enc = space.vector(cfg)[space.encoder]
    lines = []
    if "budget_macs" in info:
        pref = ", ".join(f"{t}={v:g}" for t, v in info["preference"].items())
        dec = ", ".join(f"{t} {r:g}" for t, r in info["decoder_ratios"].items())
        lines.append(f"sub-network for {info['budget_macs']:,.0f} MACs and preference {pref}: decoder widths {dec}"
                     + (f" (capped at {info['decoder_cap']:g} to fit)" if info.get("decoder_cap") else ""))
    else:
        lines.append(f"sub-network of {info['widths_file']}")
    lines.append(f"encoder widths: mean {float(enc.mean()):.2f} (min {float(enc.min()):g}, max {float(enc.max()):g})"
                 f" over {len(enc)} groups; cost model: {info['predicted_macs']:,} MACs (sub-networks "
                 f"{info['macs_range'][0]:,} to {info['macs_range'][1]:,}); BatchNorm recalibrated on "
                 f"{info['calib_batches']} batches")
    return lines
