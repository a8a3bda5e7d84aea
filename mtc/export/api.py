"""Export entry points: graphs in memory, files verified in onnxruntime before they appear."""

from __future__ import annotations

import contextlib
import os
import shutil
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
from mtc.ir.io import temp_dir
from mtc.ir.plan import Plan
from mtc.ir.shapes import input_dims

#: Verification tolerance: max |a - b| / max |reference| per output.
TOLERANCE = 1e-4
FUSED = "fused"
#: The deployment report's file name in an output folder (beside a single file: ``<stem>.report.json``).
REPORT = "report.json"


class VerificationError(Exception):
    """An exported model disagrees with the lowering (exit code 1, not a user error)."""

    exit_code = 1


@dataclass
class Exported:
    """The exported graphs of one supergraph under one plan."""

    tasks: dict[str, ir.Model] = field(default_factory=dict)
    fused: ir.Model | None = None
    module: Any = None  # the plan's lowering with the weights loaded (the verification reference)
    plan: Plan | None = None
    fold_bn: bool = False
    resize_matmul: bool = True
    origin: dict[str, Any] = field(default_factory=dict)  # what the files came from (recorded in each)


def _info(kind: str, tasks: list[str], plan: Plan, fold_bn: bool, resize_matmul: bool,
          origin: dict[str, Any]) -> dict[str, Any]:
    from mtc import __version__

    return {"kind": kind, "tasks": tasks, "fold_bn": fold_bn, "resize_matmul": resize_matmul, "mtc": __version__,
            "plan": plan.to_json(), **origin}


def export_graphs(
    model: ir.Model,
    plan: Any,
    weights: Mapping[str, torch.Tensor] | Any = None,
    *,
    tasks: Sequence[str] | None = None,
    fused: bool = True,
    fold_bn: bool = False,
    resize_matmul: bool = True,
    weights_source: str | None = None,
    origin: dict[str, Any] | None = None,
) -> Exported:
    """Per-task graphs (and the fused one) of ``model`` under ``plan`` with ``weights`` bound.

    Args:
        model: the supergraph; not modified.
        plan: a plan deciding every choice point (or a space's view of one, with ``to_plan()``).
        weights: tensors by IR name (``module/`` of a train checkpoint), the plan's lowered module,
            or None for the supergraph's initial weights.
        tasks: the tasks to export one graph each for (default: all, in task order).
        fused: also build the fused graph of all tasks.
        fold_bn: fold BatchNormalization into the preceding Conv.
        resize_matmul: rewrite linear Resize as MatMuls with interpolation matrices (exact, and
            several times faster in onnxruntime; :mod:`mtc.export.resize`).
        weights_source: the file ``weights`` came from, named in errors.
        origin: recorded in every file's ``mtc.export`` metadata (run, weights digest).

    Raises:
        MtcError: the plan, a task or the weights do not match the supergraph.
    """
    sg.check_format(model)
    p = eg.as_plan(plan)
    p.validate(model)
    order = sg.task_names(model)
    wanted = list(order if tasks is None else tasks)
    for t in wanted:
        if t not in order:
            raise MtcError(f"task '{t}' is not in the run (tasks: {', '.join(order)})")
    module = eg.fixed_module(model, p, weights, source=weights_source)
    grouped = eg.ungroup(eg.bind(model, p, weights, source=weights_source))
    org = dict(origin or {})
    out = Exported(module=module, plan=p, fold_bn=fold_bn, resize_matmul=resize_matmul, origin=org)
    for t in wanted:
        m = eg.restrict(grouped, [t])
        out.tasks[t] = eg.finish(m, order=order, fold_bn=fold_bn, resize_matmul=resize_matmul,
                                 info=_info("task", [t], p, fold_bn, resize_matmul, org))
    if fused:
        m = eg.restrict(grouped, order)
        out.fused = eg.finish(m, order=order, fold_bn=fold_bn, resize_matmul=resize_matmul,
                              info=_info("fused", order, p, fold_bn, resize_matmul, org))
    return out


# --- verification ---------------------------------------------------------------------------------


def sample_input(model: ir.Model, *, seed: int = 0, batch: int = 2) -> np.ndarray:
    """A seeded standard-normal input for ``model``'s one input (symbolic batch → ``batch``)."""
    x = model.graph.inputs[0]
    dims = input_dims(x, batch, "compile with --input-shape")
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


def session_options(*, threads: int | None = None, flush_denormals: bool = False, spinning: bool = True) -> Any:
    """onnxruntime ``SessionOptions``: quiet, and as :func:`session` describes its flags."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if flush_denormals:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def session(path_or_model: str | os.PathLike[str] | ir.Model, provider: str = "cpu", *,
            threads: int | None = None, flush_denormals: bool = False, spinning: bool = True,
            options: Any = None) -> Any:
    """An onnxruntime session for a file or an in-memory model.

    ``threads`` pins the intra-op threads (default: onnxruntime's choice) and ``flush_denormals``
    treats denormals as zero, as the benchmarks do for torch (bench/common.py). ``spinning=False``
    stops idle pool threads from busy-waiting: benchmarks that alternate several sessions on few
    cores need it, or each session's spinning threads slow the next one down. ``options``: ready
    ``SessionOptions`` (from :func:`session_options`) instead of those three.
    """
    import onnxruntime as ort

    opts = options if options is not None else session_options(
        threads=threads, flush_denormals=flush_denormals, spinning=spinning)
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


def _stems(ex: Exported) -> dict[str, ir.Model]:
    items = dict(ex.tasks)
    if ex.fused is not None:
        if FUSED in items:
            raise MtcError(f"a task named '{FUSED}' clashes with the fused model's file name")
        items[FUSED] = ex.fused
    return items


def write_verified(ex: Exported, out: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]], *,
                   provider: str = "cpu", seed: int = 0, tolerance: float = TOLERANCE) -> dict[str, dict[str, Any]]:
    """Write the exported models, each only once verified in onnxruntime.

    Every model is written to a temporary folder beside its destination and verified there; only
    when every one passes are they renamed into place, so a failure leaves no exported file behind
    (and removes the folders it created).

    Args:
        ex: the exported graphs.
        out: a folder (``<task>.onnx`` per task and ``fused.onnx``), or a mapping from each model's
            stem (task name or ``"fused"``) to its destination file; every model of ``ex`` needs one.

    Returns:
        per model stem: ``{"path": ..., "diff": {output: relative difference}}``.

    Raises:
        VerificationError: a model disagrees with the lowering (nothing is written).
    """
    items = _stems(ex)
    if isinstance(out, Mapping):
        missing = [k for k in items if k not in out]
        if missing:
            raise ValueError(f"no destination for the model '{missing[0]}'")
        dests = {k: Path(out[k]) for k in items}
    else:
        dests = {k: Path(out) / f"{k}.onnx" for k in items}
    if len({p.resolve() for p in dests.values()}) != len(dests):
        raise MtcError("two exported models would be written to the same file")
    created: list[Path] = []
    for d in dict.fromkeys(p.parent for p in dests.values()):
        missing_dirs = [a for a in (d, *d.parents) if not a.exists()]
        d.mkdir(parents=True, exist_ok=True)
        created.extend(reversed(missing_dirs))  # outermost first
    tmps: dict[Path, Path] = {}
    result: dict[str, dict[str, Any]] = {}
    ok = False
    try:
        x = sample_input(ex.module.model, seed=seed)
        ref = reference_outputs(ex.module, x)
        for d in dict.fromkeys(p.parent for p in dests.values()):
            tmps[d] = temp_dir(d, "export-")
        for stem, m in items.items():
            p = tmps[dests[stem].parent] / dests[stem].name
            _save_checked(m, p)
            result[stem] = {"diff": verify(p, ex.module, provider=provider, tolerance=tolerance, reference=ref, x=x)}
        for stem, dst in dests.items():
            tmp = tmps[dst.parent]
            for f in (tmp / dst.name, tmp / f"{dst.name}.data"):  # the model and its external data, if any
                if f.exists():
                    os.replace(f, dst.parent / f.name)
            result[stem]["path"] = str(dst)
        ok = True
    finally:
        for t in tmps.values():
            with contextlib.suppress(OSError):
                shutil.rmtree(t)
        if not ok:
            for d in reversed(created):  # innermost first; only folders left empty
                with contextlib.suppress(OSError):
                    d.rmdir()
    return result


@dataclass
class OutputPlan:
    """Which models ``mtc export`` writes, and where."""

    tasks: list[str]
    fused: bool
    paths: dict[str, Path]  # model stem (task or "fused") -> destination file
    report: Path  # where the deployment report goes


def plan_outputs(model: ir.Model, out: str | os.PathLike[str], *, tasks: Sequence[str] = (),
                 all_tasks: bool = False, fused: bool | None = None) -> OutputPlan:
    """The models to export and their files, from the ``mtc export`` selectors and ``-o``.

    Selection: ``tasks`` (``--task``, repeatable) or ``all_tasks`` (``--all``) pick per-task
    models, and the fused model is added only with ``fused=True``; ``fused=True`` alone picks only
    the fused model. With neither ``tasks`` nor ``all_tasks`` and ``fused`` not True, every task is
    exported, plus the fused model unless ``fused`` is False (the default of old).

    Output: when exactly one model is exported and ``out`` ends with ``.onnx`` it is that file and
    the report goes to ``<stem>.report.json`` beside it; otherwise ``out`` is a folder holding
    ``<task>.onnx``, ``fused.onnx`` and ``report.json``.

    Raises:
        MtcError: an unknown task, ``--all`` with ``--task``, or a ``.onnx`` output for several models.
    """
    order = sg.task_names(model)
    if all_tasks and tasks:
        raise MtcError("--all and --task exclude each other")
    for t in tasks:
        if t not in order:
            raise MtcError(f"task '{t}' is not in the run (tasks: {', '.join(order)})")
    if all_tasks or tasks:
        wanted, with_fused = (order if all_tasks else list(dict.fromkeys(tasks))), bool(fused)
    elif fused:
        wanted, with_fused = [], True
    else:
        wanted, with_fused = order, fused is None
    if with_fused and FUSED in wanted:
        raise MtcError(f"a task named '{FUSED}' clashes with the fused model's file name")
    stems = wanted + ([FUSED] if with_fused else [])
    o = Path(out)
    if str(out).lower().endswith(".onnx"):
        if len(stems) != 1:
            raise MtcError(f"a .onnx output holds one model but {len(stems)} would be written "
                           f"({', '.join(stems)}): give a folder, or pick one (--task T or --fused alone)",
                           file=str(out))
        if o.is_dir():
            raise MtcError("is a directory, expected the .onnx file to write", file=str(out))
        return OutputPlan(wanted, with_fused, {stems[0]: o}, o.with_name(o.name[: -len(".onnx")] + ".report.json"))
    if o.exists() and not o.is_dir():
        raise MtcError("exists and is not a folder (a single model's file must end with .onnx)", file=str(out))
    return OutputPlan(wanted, with_fused, {s: o / f"{s}.onnx" for s in stems}, o / REPORT)


# --- run directories --------------------------------------------------------------------------------


@dataclass
class RunInputs:
    """What export reads from a run directory or a supergraph file."""

    model: ir.Model
    plan: Plan
    weights: dict[str, torch.Tensor] | None  # None: the supergraph's initial weights
    supergraph_path: str
    weights_path: str | None = None
    run_dir: str | None = None

    def origin(self) -> dict[str, Any]:
        """What an exported file records of where it came from (``mtc verify --against`` checks it)."""
        from mtc.train.run import file_digest

        out: dict[str, Any] = {"supergraph_sha256": file_digest(self.supergraph_path)}
        if self.weights_path is not None:
            out["weights_sha256"] = file_digest(self.weights_path)
        if self.run_dir is not None:
            out["run"] = str(Path(self.run_dir).resolve())
        return out


def read_plan(path: str | os.PathLike[str], model: ir.Model) -> Plan:
    """A plan file (``plan.json``, or an older form the supergraph's space reads, such as AutoMTL's
    ``policy.json``), validated against ``model``."""
    from mtc.ir.plan import read_plan_file
    from mtc.spaces import read_plan as _read

    return _read(read_plan_file(path), model, source=str(path))


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors by IR name from a file: a checkpoint written by ``mtc train`` (its ``module/`` part) or
    a safetensors file of weights keyed by IR name. Nothing is unpickled.

    Raises:
        MtcError: the file is missing, corrupt, not safetensors, or holds no tensors.
    """
    from mtc.train.run import module_tensors, read_tensors

    tensors, _meta = read_tensors(path)
    state = module_tensors(tensors)
    if not state:
        raise MtcError("not weights: the file holds no tensors", file=str(path))
    return state


def load_run(run_dir: str | os.PathLike[str], *, plan_file: str | os.PathLike[str] | None = None,
             weights_file: str | os.PathLike[str] | None = None) -> RunInputs:
    """The supergraph, plan and final trained weights of a run directory.

    Args:
        run_dir: the run directory.
        plan_file: a plan instead of the run's ``plan.json``.
        weights_file: weights (see :func:`read_weights`) instead of ``checkpoints/train.safetensors``,
            which then need not exist.

    Raises:
        MtcError: not a run directory, no final checkpoint, or a plan that does not match the
            supergraph.
    """
    from mtc.ir.io import load
    from mtc.train.run import PLAN, SUPERGRAPH, RunDir

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise MtcError("no such run directory", file=str(run_dir))
    cfg = run.config()
    sg_path = run.file(str(cfg.get("supergraph", SUPERGRAPH)))
    model = load(sg_path)
    sg.check_format(model, file=str(sg_path))
    if weights_file is None and not run.has_checkpoint("train"):
        raise MtcError("no final checkpoint (checkpoints/train.safetensors): train the run first "
                       "(mtc train RUN_DIR)", file=str(run_dir))
    plan = read_plan(plan_file if plan_file is not None else run.file(PLAN), model)
    wpath = Path(weights_file) if weights_file is not None else run.checkpoint_path("train")
    return RunInputs(model=model, plan=plan, weights=read_weights(wpath), supergraph_path=str(sg_path),
                     weights_path=str(wpath), run_dir=str(run_dir))


def load_source(source: str | os.PathLike[str], *, plan_file: str | os.PathLike[str] | None = None,
                weights_file: str | os.PathLike[str] | None = None) -> RunInputs:
    """What ``mtc export SOURCE`` exports: a run directory (:func:`load_run`) or a supergraph file.

    A supergraph file needs ``plan_file``; ``weights_file`` is optional (None: the supergraph's
    initial weights, ``RunInputs.weights`` is None). For a run directory, ``weights_file``
    replaces the final checkpoint.

    Raises:
        MtcError: no such source, a file that is not a supergraph, no plan for a supergraph file,
            a plan that does not match, or a weights file that is corrupt or not weights.
    """
    from mtc.ir.io import load

    p = Path(source)
    if p.is_dir():
        return load_run(p, plan_file=plan_file, weights_file=weights_file)
    if not p.exists():
        raise MtcError("no such run directory or supergraph file", file=str(source))
    model = load(p)
    sg.check_format(model, file=str(source))
    if plan_file is None:
        raise MtcError("a supergraph source needs --policy/--plan FILE (a run's plan.json or policy.json, or a "
                       "hand-written plan)",
                       file=str(source))
    plan = read_plan(plan_file, model)
    weights = read_weights(weights_file) if weights_file is not None else None
    return RunInputs(model=model, plan=plan, weights=weights, supergraph_path=str(p),
                     weights_path=str(weights_file) if weights_file is not None else None)


def verify_against(path: str | os.PathLike[str], run_dir: str | os.PathLike[str], *, task: str | None = None,
                   seed: int = 0, provider: str = "cpu", tolerance: float = TOLERANCE) -> dict[str, float]:
    """``mtc verify OUT.onnx --against RUN_DIR [--task T]``: an exported file against the run's lowering.

    Raises:
        MtcError: bad run directory, ``task`` is not in the run or not an output of the file, or the
            file records that it was exported from another run or other weights.
        VerificationError: an output differs beyond ``tolerance``.
    """
    inputs = load_run(run_dir)
    order = sg.task_names(inputs.model)
    if task is not None and task not in order:
        raise MtcError(f"task '{task}' is not in the run (tasks: {', '.join(order)})")
    _check_origin(path, inputs)
    module = eg.fixed_module(inputs.model, inputs.plan, inputs.weights, source=inputs.weights_path)
    sess = session(path, provider)
    outs = [o.name for o in sess.get_outputs()]
    if task is not None and task not in outs:
        raise MtcError(f"the model has no output '{task}' (outputs: {', '.join(outs)})", file=str(path))
    diffs = verify(path, module, seed=seed, provider=provider, tolerance=tolerance)
    return {task: diffs[task]} if task is not None else diffs


def _check_origin(path: str | os.PathLike[str], inputs: RunInputs) -> None:
    """Refuse a file whose ``mtc.export`` metadata names another supergraph or other weights."""
    import json

    from mtc.ir.io import load

    meta = load(path).metadata_props.get(eg.EXPORT_KEY)
    if meta is None:
        return  # not written by mtc export: nothing recorded to compare
    try:
        info = json.loads(meta)
    except json.JSONDecodeError:
        raise MtcError(f"corrupt '{eg.EXPORT_KEY}' metadata", file=str(path)) from None
    want = inputs.origin()
    for key, what in (("supergraph_sha256", "supergraph"), ("weights_sha256", "weights")):
        if key in info and key in want and info[key] != want[key]:
            raise MtcError(f"the file was exported from other {what} than the run's (its {key} "
                           f"{str(info[key])[:12]}…, the run's {want[key][:12]}…)", file=str(path))
