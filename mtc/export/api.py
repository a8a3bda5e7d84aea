"""Export entry points: graphs in memory, files verified in onnxruntime before they appear."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from mtc.errors import MtcError
from mtc.export import graph as eg
from mtc.ir import supergraph as sg

#: Verification tolerance: max |a - b| / max |reference| per output.
TOLERANCE = 1e-4
FUSED = "fused"


class VerificationError(Exception):
    """An exported model disagrees with the lowering (exit code 1, not a user error)."""

    exit_code = 1


@dataclass
class Exported:
    """The exported graphs of one supergraph under one policy."""

    tasks: dict[str, ir.Model] = field(default_factory=dict)
    fused: ir.Model | None = None
    module: Any = None  # the fixed-mode lowering they were bound from (the verification reference)


def _info(kind: str, tasks: list[str], policy: sg.Policy, fold_bn: bool) -> dict[str, Any]:
    from mtc import __version__

    return {"kind": kind, "tasks": tasks, "fold_bn": fold_bn, "mtc": __version__, "policy": policy.to_json()}


def export_graphs(
    model: ir.Model,
    policy: sg.Policy,
    weights: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    *,
    tasks: Sequence[str] | None = None,
    fused: bool = True,
    fold_bn: bool = False,
) -> Exported:
    """Per-task graphs (and the fused one) of ``model`` under ``policy`` with ``weights`` bound.

    Args:
        model: the supergraph; not modified.
        policy: a fixed policy for every VCN and task.
        weights: a state dict of the fixed-mode lowered module (``checkpoints/train.pt``'s
            ``"module"``), the module itself, or None for the supergraph's initial weights.
        tasks: the tasks to export one graph each for (default: all, in task order).
        fused: also build the fused graph of all tasks.
        fold_bn: fold BatchNormalization into the preceding Conv.

    Raises:
        MtcError: the policy, a task or the weights do not match the supergraph.
    """
    if not sg.is_supergraph(model):
        raise MtcError("not a supergraph: compile the backbone first (mtc compile --tasks ...)")
    order = [t.name for t in sg.tasks_of(model) or []]
    wanted = list(order if tasks is None else tasks)
    for t in wanted:
        if t not in order:
            raise MtcError(f"task '{t}' is not in the run (tasks: {', '.join(order)})")
    module = fixed_module = eg.fixed_module(model, policy, weights)
    records = sg.vcns_of(model)
    grouped = eg.ungroup(eg.bind(fixed_module), records)
    out = Exported(module=module)
    for t in wanted:
        m = eg.restrict(grouped, [t])
        out.tasks[t] = eg.finish(m, order=order, fold_bn=fold_bn, info=_info("task", [t], policy, fold_bn))
    if fused:
        m = eg.restrict(grouped, order)
        out.fused = eg.finish(m, order=order, fold_bn=fold_bn, info=_info("fused", order, policy, fold_bn))
    return out


# --- verification ---------------------------------------------------------------------------------


def sample_input(model: ir.Model, *, seed: int = 0, batch: int = 2) -> np.ndarray:
    """A seeded standard-normal input for ``model``'s one input (symbolic batch → ``batch``)."""
    x = model.graph.inputs[0]
    if x.shape is None:
        raise MtcError(f"input '{x.name}' has no shape: cannot make a verification input")
    dims = []
    for i, d in enumerate(x.shape):
        if isinstance(d, int):
            dims.append(d)
        elif i == 0:
            dims.append(batch)
        else:
            raise MtcError(f"input '{x.name}' has a symbolic dimension {i} ({d}): compile with --input-shape")
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    return np.random.default_rng(seed).standard_normal(dims).astype(dtype)


def providers(provider: str) -> list[str]:
    """onnxruntime execution providers for ``cpu`` or ``cuda``.

    Raises:
        MtcError: ``cuda`` without onnxruntime-gpu or without a GPU.
    """
    import onnxruntime as ort

    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider != "cuda":
        raise MtcError(f"unknown provider '{provider}' (expected cpu or cuda)")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MtcError("--provider cuda needs onnxruntime-gpu (pip install 'mtc[gpu]') and a GPU; this "
                       f"onnxruntime offers {', '.join(ort.get_available_providers())}")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session(path_or_model: str | os.PathLike[str] | ir.Model, provider: str = "cpu") -> Any:
    """An onnxruntime session for a file or an in-memory model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src: Any = path_or_model
    if isinstance(path_or_model, ir.Model):
        src = ir.to_proto(path_or_model).SerializeToString()
    else:
        src = str(path_or_model)
    try:
        return ort.InferenceSession(src, opts, providers=providers(provider))
    except MtcError:
        raise
    except Exception as e:
        raise VerificationError(f"onnxruntime cannot load the exported model: {str(e).splitlines()[0]}") from None


def reference_outputs(module: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed-mode lowering's outputs on ``x``, in eval mode, by output name."""
    module.eval()
    dev = next(iter(module.parameters()), torch.zeros(())).device
    with torch.no_grad():
        outs = module(torch.from_numpy(x).to(dev))
    return {name: o.detach().cpu().numpy() for name, o in zip(module.output_names, outs, strict=True)}


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """max |a - b| / max |ref| (max |a - b| when the reference is all zeros)."""
    if got.shape != ref.shape:
        return float("inf")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def verify(path_or_model: str | os.PathLike[str] | ir.Model, module: Any, *, seed: int = 0,
           provider: str = "cpu", tolerance: float = TOLERANCE,
           reference: dict[str, np.ndarray] | None = None, x: np.ndarray | None = None) -> dict[str, float]:
    """Run an exported model in onnxruntime and the lowering on one seeded input, per output.

    Returns:
        the relative difference per output name.

    Raises:
        VerificationError: an output is missing or differs by more than ``tolerance``.
    """
    sess = session(path_or_model, provider)
    if x is None:
        x = sample_input(module.model, seed=seed)
    ref = reference if reference is not None else reference_outputs(module, x)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))
    diffs: dict[str, float] = {}
    for name, arr in got.items():
        if name not in ref:
            raise VerificationError(f"output '{name}' is not an output of the lowering ({', '.join(ref)})")
        diffs[name] = rel_diff(arr, ref[name])
    worst = max(diffs, key=lambda k: diffs[k]) if diffs else None
    if worst is not None and not diffs[worst] <= tolerance:
        raise VerificationError(f"output '{worst}' differs from the lowering by {diffs[worst]:.3g} "
                                f"(relative; tolerance {tolerance:g})")
    return diffs


# --- files ------------------------------------------------------------------------------------------


def _save_checked(model: ir.Model, path: Path) -> None:
    from mtc.ir.io import save

    save(model, path)
    if not eg.proto_fits(model):
        import onnx

        onnx.checker.check_model(str(path), full_check=True)  # large models: check by path


def write_verified(ex: Exported, out_dir: str | os.PathLike[str], *, provider: str = "cpu",
                   seed: int = 0, tolerance: float = TOLERANCE) -> dict[str, dict[str, Any]]:
    """Write ``<task>.onnx`` per task and ``fused.onnx`` to ``out_dir``, each only once verified.

    Everything is written to a temporary folder beside ``out_dir`` and verified there; only when
    every file passes are they moved in, so a failure leaves no exported file behind.

    Returns:
        per file stem: ``{"path": ..., "diff": {output: relative difference}}``.

    Raises:
        VerificationError: a model disagrees with the lowering (nothing is written).
    """
    dst = Path(out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    items = dict(ex.tasks)
    if ex.fused is not None:
        if FUSED in items:
            raise MtcError(f"a task named '{FUSED}' clashes with the fused model's file name")
        items[FUSED] = ex.fused
    x = sample_input(ex.module.model, seed=seed)
    ref = reference_outputs(ex.module, x)
    tmp = Path(tempfile.mkdtemp(prefix=".mtc-export-", dir=dst))
    result: dict[str, dict[str, Any]] = {}
    try:
        for stem, m in items.items():
            p = tmp / f"{stem}.onnx"
            _save_checked(m, p)
            result[stem] = {"diff": verify(p, ex.module, provider=provider, tolerance=tolerance, reference=ref, x=x)}
        for stem in items:
            for f in tmp.glob(f"{stem}.onnx*"):
                os.replace(f, dst / f.name)
            result[stem]["path"] = str(dst / f"{stem}.onnx")
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    return result


# --- run directories --------------------------------------------------------------------------------


@dataclass
class RunInputs:
    """What export reads from a run directory."""

    model: ir.Model
    policy: sg.Policy
    weights: dict[str, torch.Tensor]
    supergraph_path: str


def read_policy(path: str | os.PathLike[str], model: ir.Model) -> sg.Policy:
    """A policy JSON (``{"policy": {...}}`` as ``policy.json`` holds it, or the bare mapping),
    validated against ``model``."""
    import json

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MtcError(f"cannot read the policy: {e}", file=str(path)) from None
    if not isinstance(raw, dict):
        raise MtcError("not a policy: expected a JSON object", file=str(path))
    policy = sg.Policy.from_json(raw.get("policy", raw), source=str(path))
    policy.validate(model, source=str(path))
    return policy


def load_run(run_dir: str | os.PathLike[str], *, policy_file: str | os.PathLike[str] | None = None) -> RunInputs:
    """The supergraph, policy and final trained weights of a run directory.

    Raises:
        MtcError: not a run directory, no final checkpoint (``checkpoints/train.pt``), or a policy
            that does not match the supergraph's VCNs or tasks.
    """
    from mtc.ir.io import load
    from mtc.train.run import SUPERGRAPH, RunDir

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise MtcError("no such run directory", file=str(run_dir))
    cfg = run.config()
    sg_path = run.file(cfg.get("supergraph", SUPERGRAPH))
    model = load(sg_path)
    if not sg.is_supergraph(model):
        raise MtcError("not a supergraph", file=str(sg_path))
    if not run.has_checkpoint("train"):
        raise MtcError("no final checkpoint (checkpoints/train.pt): train the run first (mtc train RUN_DIR)",
                       file=str(run_dir))
    policy = read_policy(policy_file if policy_file is not None else run.file("policy.json"), model)
    state = run.load_checkpoint("train")["module"]
    return RunInputs(model=model, policy=policy, weights=state, supergraph_path=str(sg_path))


def verify_against(path: str | os.PathLike[str], run_dir: str | os.PathLike[str], *, task: str | None = None,
                   seed: int = 0, provider: str = "cpu", tolerance: float = TOLERANCE) -> dict[str, float]:
    """``mtc verify OUT.onnx --against RUN_DIR [--task T]``: an exported file against the run's lowering.

    Raises:
        MtcError: bad run directory, or ``task`` is not in the run or not an output of the file.
        VerificationError: an output differs beyond ``tolerance``.
    """
    inputs = load_run(run_dir)
    order = [t.name for t in sg.tasks_of(inputs.model) or []]
    if task is not None and task not in order:
        raise MtcError(f"task '{task}' is not in the run (tasks: {', '.join(order)})")
    module = eg.fixed_module(inputs.model, inputs.policy, inputs.weights)
    sess = session(path, provider)
    outs = [o.name for o in sess.get_outputs()]
    if task is not None and task not in outs:
        raise MtcError(f"the model has no output '{task}' (outputs: {', '.join(outs)})", file=str(path))
    diffs = verify(path, module, seed=seed, provider=provider, tolerance=tolerance)
    return {task: diffs[task]} if task is not None else diffs
