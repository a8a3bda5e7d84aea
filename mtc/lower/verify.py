"""Check a lowering against onnxruntime on the same weights and inputs (``mtc verify``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from mtc.errors import MtcError
from mtc.ir.shapes import input_dims
from mtc.lower.module import GraphModule, lower, to_numpy, to_torch

#: Default tolerances: outputs agree to 1e-4 of their scale (max |reference|).
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-6
#: A symbolic batch dimension is filled with this size for random inputs.
DEFAULT_BATCH = 2


@dataclass
class OutputDiff:
    """How one output of the lowering differs from the reference.

    Attributes:
        name: graph output name.
        shape: the reference output's shape.
        max_abs: max |lowered - reference|.
        max_rel: ``max_abs`` / max |reference| (the output's scale).
        ok: ``max_abs <= atol + rtol * scale`` (and the shapes agree).
        note: why it failed, when not for the values (a shape mismatch).
    """

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


@dataclass
class VerifyReport:
    """Per-output differences of the eager (and, with ``compile``, compiled) lowering vs onnxruntime."""

    outputs: list[OutputDiff]
    atol: float
    rtol: float
    compiled: list[OutputDiff] | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs) and all(o.ok for o in self.compiled or [])

    def rows(self) -> list[tuple[str, OutputDiff]]:
        """``(mode, diff)`` rows: ``eager`` first, then ``compiled``."""
        out = [("eager", d) for d in self.outputs]
        out += [("compiled", d) for d in self.compiled or []]
        return out


def compare(name: str, got: Any, ref: np.ndarray, *, atol: float, rtol: float) -> OutputDiff:
    """Compare one output (``got``: tensor or array) with its reference."""
    a = np.asarray(to_numpy(got))
    b = np.asarray(ref)
    if a.shape != b.shape:
        return OutputDiff(name, tuple(b.shape), float("inf"), float("inf"), False,
                          f"shape {list(a.shape)} vs reference {list(b.shape)}")
    if b.size == 0:
        return OutputDiff(name, tuple(b.shape), 0.0, 0.0, True)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(b64)
    diff = np.where(both_nan, 0.0, np.abs(a64 - b64))
    max_abs = float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)))
    scale = float(np.max(np.abs(np.where(np.isfinite(b64), b64, 0.0))))
    max_rel = max_abs / max(scale, np.finfo(np.float64).tiny)
    return OutputDiff(name, tuple(b.shape), max_abs, max_rel, max_abs <= atol + rtol * scale)


def random_inputs(model: ir.Model, *, seed: int = 0, batch: int = DEFAULT_BATCH) -> list[np.ndarray]:
    """Seeded inputs shaped like the graph inputs (a symbolic batch dimension gets ``batch``)."""
    rng = np.random.default_rng(seed)
    out = []
    for v in _user_inputs(model):
        shape = input_dims(v, batch, "pass --input")
        dtype = v.dtype.numpy() if v.dtype is not None else np.float32
        if np.issubdtype(dtype, np.floating):
            out.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == np.bool_:
            out.append(rng.integers(0, 2, shape).astype(bool))
        else:
            out.append(rng.integers(0, 4, shape).astype(dtype))
    return out


def _user_inputs(model: ir.Model) -> list[ir.Value]:
    inits = model.graph.initializers
    return [v for v in model.graph.inputs if v.name not in inits]


def check_inputs(model: ir.Model, inputs: list[np.ndarray]) -> None:
    """One array per graph input, each of the declared rank and static dims; MtcError otherwise."""
    vals = _user_inputs(model)
    if len(inputs) != len(vals):
        names = ", ".join(str(v.name) for v in vals)
        raise MtcError(f"the model takes {len(vals)} inputs ({names}), got {len(inputs)}")
    for v, x in zip(vals, inputs, strict=True):
        if v.shape is None:
            continue
        declared = list(v.shape.dims)
        shown = "[" + ",".join(str(d) for d in declared) + "]"
        got = list(np.shape(x))
        if len(got) != len(declared) or any(isinstance(d, int) and d != g for d, g in zip(declared, got, strict=False)):
            raise MtcError(f"input '{v.name}' expects shape {shown}, got [{','.join(map(str, got))}]")


def _with_inline_data(model: ir.Model) -> ir.Model:
    """A copy whose initializers are in memory (onnxruntime cannot follow external data from bytes)."""
    if not any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        return model
    copy = model.clone()
    ir.external_data.load_to_model(copy)
    return copy


def run_onnxruntime(model: ir.Model, inputs: list[np.ndarray], *, threads: int | None = None) -> list[np.ndarray]:
    """Run ``model`` in onnxruntime (CPU, graph optimisations off: an op-by-op reference)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        proto = ir.to_proto(_with_inline_data(model))
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MtcError(f"onnxruntime cannot load the model: {msg}") from None
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs, strict=True)))


def run_lowered(module: GraphModule, inputs: list[np.ndarray], *, device: torch.device | str | None = None
                ) -> list[np.ndarray]:
    """Run a lowered module in eval mode without gradients; outputs as numpy."""
    module.eval()
    xs = [to_torch(x) for x in inputs]
    if device is not None:
        xs = [x.to(device) for x in xs]
    with torch.no_grad():
        outs = module(*xs)
    return [to_numpy(o) for o in outs]


def verify(
    model: ir.Model,
    *,
    inputs: list[np.ndarray] | None = None,
    seed: int = 0,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    compile: bool = False,
    device: torch.device | str | None = None,
) -> VerifyReport:
    """Lower ``model``, run it and onnxruntime on the same inputs, and compare every output.

    Args:
        model: the model (weights included).
        inputs: one array per graph input; seeded random arrays from the input shapes by default.
        seed: seed of the random inputs.
        atol: absolute tolerance.
        rtol: tolerance relative to each output's scale (max |reference|).
        compile: also run the module under ``torch.compile`` and compare that too.
        device: where to run the lowering (CPU by default).

    Raises:
        MtcError: inputs that do not match the graph, an unsupported op, or a model onnxruntime
            cannot load.
    """
    if inputs is None:
        inputs = random_inputs(model, seed=seed)
    check_inputs(model, inputs)
    module = lower(model, device=device)
    ref = run_onnxruntime(model, inputs)
    names = module.output_names
    got = run_lowered(module, inputs, device=device)
    report = VerifyReport(
        [compare(n, g, r, atol=atol, rtol=rtol) for n, g, r in zip(names, got, ref, strict=True)],
        atol,
        rtol,
        input_shapes={str(v.name): tuple(np.shape(x)) for v, x in zip(_user_inputs(model), inputs, strict=True)},
    )
    if compile:
        compiled = torch.compile(module)
        got_c = run_lowered(compiled, inputs, device=device)  # type: ignore[arg-type]
        report.compiled = [compare(n, g, r, atol=atol, rtol=rtol) for n, g, r in zip(names, got_c, ref, strict=True)]
    return report
