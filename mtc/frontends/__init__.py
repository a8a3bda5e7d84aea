"""Front ends: every source becomes an ONNX model in the mtc IR, canonicalised the same way.

``import_model`` dispatches on the source (``.onnx`` file, ``.prototxt`` file, or a
``pkg.module:factory`` spec) and then runs the shared import pipeline: unlist initializers from
the inputs, apply ``--input-shape``, convert to the target opset, infer shapes, fold shape
arithmetic, name every node, and check the result with ``onnx.checker``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir.memory import release_freed_memory
from mtc.ir.names import fix_names, name_after_origin
from mtc.ir.opset import TARGET_OPSET, convert_opset
from mtc.ir.shapes import check_model, infer_shapes
from mtc.passes.fold import FoldShapes

BATCH = "N"

Shape = tuple[int | str, ...]


#: Values per sample of a model's input above which it is refused (verify would allocate them).
MAX_INPUT_VALUES = 1 << 28


def parse_input_shape(text: str | None) -> Shape | None:
    """Parse ``1,3,224,224`` (a symbolic batch may be written ``N,3,224,224``)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    if not parts:
        raise MtcError(f"--input-shape '{text}': expected comma-separated dimensions like 1,3,224,224")
    dims: list[int | str] = []
    for i, p in enumerate(parts):
        if p.lstrip("-").isdigit():
            d = int(p)
            if d <= 0:
                raise MtcError(f"--input-shape '{text}': dimension {i} is {d}, must be positive")
            dims.append(d)
        elif i == 0 and p.isidentifier():
            dims.append(p)
        else:
            raise MtcError(f"--input-shape '{text}': dimension {i} '{p}' is not a positive integer")
    if len(dims) < 2:
        raise MtcError(f"--input-shape '{text}': expected a batch and at least one more dimension, e.g. 1,3,224,224")
    per_sample = math.prod(int(d) for d in dims[1:])
    if per_sample > MAX_INPUT_VALUES:
        raise MtcError(f"--input-shape '{text}': {per_sample:,} values per sample, above the limit of "
                       f"{MAX_INPUT_VALUES:,}")
    return tuple(dims)


def source_kind(src: str) -> str:
    if src.endswith(".onnx"):
        return "onnx"
    if src.endswith(".prototxt") or src.endswith(".pt.txt"):
        return "prototxt"
    if ":" in src and not os.path.exists(src):
        return "torch"
    if os.path.exists(src):
        # Sniff: prototxt is text with `layer {`, anything else is tried as ONNX.
        with open(src, "rb") as f:
            head = f.read(4096)
        if b"layer" in head and b"{" in head:
            return "prototxt"
        return "onnx"
    raise MtcError("no such file (and not a pkg.module:factory spec)", file=src)


def import_model(
    src: str | os.PathLike[str],
    *,
    input_shape: Shape | None = None,
    opset: int = TARGET_OPSET,
    exporter: str = "dynamo",
    seed: int = 0,
) -> ir.Model:
    """Import a backbone from any supported source into the canonical mtc IR.

    Args:
        src: path to ``.onnx`` / ``.prototxt``, or ``pkg.module:factory`` for PyTorch.
        input_shape: overrides the declared input shape (required for PyTorch sources and for
            ONNX models with symbolic spatial dimensions).
        opset: target opset of the default domain (17 or newer).
        exporter: ``dynamo`` or ``torchscript`` for PyTorch sources.
        seed: seed of the prototxt weight fillers.
    """
    src = str(src)
    kind = source_kind(src)
    if kind == "onnx":
        from mtc.frontends.onnx import load_onnx

        model = load_onnx(src)
    elif kind == "prototxt":
        from mtc.frontends.prototxt import load_prototxt

        static = tuple(1 if isinstance(d, str) else d for d in input_shape) if input_shape else None
        model = load_prototxt(src, input_shape=static, seed=seed, opset=max(opset, 17))
        # Caffe layers never bake in the batch size, so the batch dimension can be symbolic.
        _make_batch_symbolic(model)
    else:
        from mtc.frontends.torch import load_torch

        if input_shape is None:
            raise MtcError("--input-shape is required to export a PyTorch module", file=src)
        static = tuple(1 if isinstance(d, str) else d for d in input_shape)
        model = load_torch(src, static, opset=opset, exporter=exporter)
        input_shape = None  # exported with exactly that shape (and a symbolic batch)
    return canonicalize_import(model, file=src, input_shape=input_shape, opset=opset)


def _make_batch_symbolic(model: ir.Model) -> None:
    for v in model.graph.inputs:
        if v.shape is not None and len(v.shape) >= 1:
            v.shape = ir.Shape([BATCH, *list(v.shape)[1:]])
    for node in model.graph:
        for out in node.outputs:
            out.shape = None  # re-inferred from the new input shape


def _apply_input_shape(model: ir.Model, shape: Shape, file: str) -> None:
    inputs = list(model.graph.inputs)
    if len(inputs) != 1:
        raise MtcError(f"--input-shape given but the model has {len(inputs)} inputs; mtc backbones take one", file=file)
    v = inputs[0]
    declared = list(v.shape) if v.shape is not None else None
    if declared is not None and len(declared) != len(shape):
        raise MtcError(
            f"--input-shape {','.join(map(str, shape))} has rank {len(shape)} but input '{v.name}' has rank "
            f"{len(declared)} {_fmt(declared)}",
            file=file,
        )
    if declared is not None:
        for i, (d, s) in enumerate(zip(declared, shape, strict=True)):
            if i > 0 and isinstance(d, int) and isinstance(s, int) and d != s and i == 1:
                raise MtcError(
                    f"--input-shape dimension 1 is {s} but input '{v.name}' {_fmt(declared)} has {d} channels",
                    file=file,
                )
    dims_new: list[int | str] = list(shape)
    if declared and not isinstance(declared[0], int):
        # A symbolic batch stays symbolic: `--input-shape 1,3,H,W` fixes the sample shape, and a
        # graph specialised to batch 1 could not train on batches.
        dims_new[0] = declared[0].value or BATCH
    v.shape = ir.Shape(dims_new)
    for node in model.graph:
        for out in node.outputs:
            out.shape = None


def _fmt(dims: list) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else str(getattr(d, "value", d)) for d in dims) + "]"


def check_inputs(model: ir.Model, file: str) -> None:
    """Only the batch dimension of an input may be symbolic; name an anonymous one ``N``."""
    for v in model.graph.inputs:
        if v.shape is None:
            raise MtcError(f"input '{v.name}' has no shape: pass --input-shape", file=file)
        dims = list(v.shape)
        fixed: list[int | str] = []
        for i, d in enumerate(dims):
            if isinstance(d, int):
                if d <= 0:
                    raise MtcError(f"input '{v.name}' dimension {i} is {d}", file=file)
                fixed.append(d)
            elif i == 0:
                fixed.append(d.value or BATCH)
            else:
                raise MtcError(
                    f"input '{v.name}' has symbolic dimension '{d.value or '?'}' at axis {i} {_fmt(dims)}: "
                    "mtc needs static spatial sizes, pass --input-shape",
                    file=file,
                )
        per_sample = math.prod(int(d) for d in fixed[1:])
        if per_sample > MAX_INPUT_VALUES:
            raise MtcError(f"input '{v.name}' {_fmt(dims)} holds {per_sample:,} values per sample, above the limit of "
                           f"{MAX_INPUT_VALUES:,}", file=file)
        v.shape = ir.Shape(fixed)
    if not model.graph.outputs:
        raise MtcError("the model has no outputs", file=file)


def _static(v: ir.Value | None, axis: int) -> int | None:
    if v is None or v.shape is None or len(v.shape) <= axis:
        return None
    d = v.shape[axis]
    return d if isinstance(d, int) else None


def _channel_conflict(node: ir.Node) -> str | None:
    """What ONNX shape inference lets through: a layer whose weights read another number of
    channels than its input holds (Conv, ConvTranspose, the channel-wise normalisations, Gemm,
    MatMul). None when the shapes agree or are not static."""
    ins = list(node.inputs)
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or not ins:
        return None
    x = ins[0]
    w = ins[1] if len(ins) > 1 else None
    if x is None:
        return None
    if op in ("Conv", "ConvTranspose") and w is not None:
        g = node.attributes.get("group")
        group = g.as_int() if g is not None else 1
        c, w_axis = _static(x, 1), (1 if op == "Conv" else 0)
        k = _static(w, w_axis)
        if c is not None and k is not None and c != (k * group if op == "Conv" else k):
            want = k * group if op == "Conv" else k
            return (f"its weights '{w.name}' read {want} input channels (group {group}) but its input "
                    f"'{x.name}' has {c}")
    elif op in ("BatchNormalization", "InstanceNormalization"):
        c = _static(x, 1)
        for p in ins[1:]:
            n = _static(p, 0)
            if p is not None and c is not None and n is not None and n != c:
                return f"its parameter '{p.name}' has {n} values but its input '{x.name}' has {c} channels"
    elif op in ("Gemm", "MatMul") and w is not None and x.shape is not None and w.shape is not None:
        ta = node.attributes.get("transA")
        tb = node.attributes.get("transB")
        ra, rb = len(x.shape), len(w.shape)
        if ra == 0 or rb == 0:
            return None
        a_ax = (0 if ta is not None and ta.as_int() else ra - 1) if op == "Gemm" else ra - 1
        b_ax = (1 if tb is not None and tb.as_int() else 0) if op == "Gemm" else max(rb - 2, 0)
        ka, kb = _static(x, a_ax), _static(w, b_ax)
        if ka is not None and kb is not None and ka != kb:
            return f"it multiplies '{x.name}' ({ka} features) by '{w.name}' ({kb} rows)"
    return None


def check_shapes(model: ir.Model, file: str) -> None:
    """After inference every activation has a shape with positive static non-batch dimensions, and
    every layer's weights read as many channels as its input holds."""
    for node in model.graph:
        conflict = _channel_conflict(node)
        if conflict is not None:
            raise MtcError(f"the shapes do not agree: {conflict}", file=file, node=node.name, op=node.op_type,
                           origin=node.metadata_props.get("mtc.origin"))
        for out in node.outputs:
            if out.shape is None:
                continue
            for i, d in enumerate(out.shape):
                if isinstance(d, int) and d <= 0 and not (out.const_value is not None):
                    raise MtcError(
                        f"output '{out.name}' gets size {d} at axis {i}: the input is too small for this layer "
                        "(check --input-shape)",
                        file=file, node=node.name, op=node.op_type,
                        origin=node.metadata_props.get("mtc.origin"),
                    )


def canonicalize_import(
    model: ir.Model, *, file: str, input_shape: Shape | None = None, opset: int = TARGET_OPSET
) -> ir.Model:
    """The shared import pipeline (see module docstring)."""
    if input_shape is not None:
        _apply_input_shape(model, input_shape, file)
    check_inputs(model, file)
    model = convert_opset(model, opset, file=file)
    infer_shapes(model, file=file, strict=True)
    # Folding makes more shapes static, which makes more folding possible: alternate to a fixpoint.
    for _ in range(16):
        if not FoldShapes()(model).modified:
            break
        infer_shapes(model, file=file)
    name_after_origin(model)
    fix_names(model)
    check_shapes(model, file)
    try:
        check_model(model)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MtcError(f"the imported graph is not valid ONNX: {msg}", file=file) from None
    model.producer_name = "mtc"
    release_freed_memory()  # the import's transient protos and arrays
    return model


def default_output(src: str) -> Path:
    name = Path(src.split(":")[-1]).stem if ":" in src and not os.path.exists(src) else Path(src).stem
    return Path(name + ".onnx")
