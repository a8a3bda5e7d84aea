"""Shape inference on the IR, and queries about static and symbolic dimensions."""

from __future__ import annotations

from typing import TypeGuard

import onnx
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir.seeded import DrawnTensor

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
#: Float initializers above this many elements reach shape inference without their data.
_WEIGHTLESS_ABOVE = 1024


def _heavy(t: ir.TensorProtocol | None) -> TypeGuard[ir.TensorProtocol]:
    """A float initializer large enough that checks and inference get it without its data."""
    return t is not None and t.dtype in _FLOATS and t.size > _WEIGHTLESS_ABOVE


def _proto_without_weights(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a proto whose large float initializers carry type and shape but no bytes.

    Shape inference reads only their dims (data propagation needs the small integer ones), so
    serialising 85 MB of weights for it would be pure cost (~1 s on deeplab_resnet34).
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for v in model.graph.initializers.values():
            t = v.const_value
            if not _heavy(t):
                continue
            swapped.append((v, t))
            v.const_value = ir.ExternalTensor("mtc-weights-not-loaded", offset=0, length=t.nbytes, dtype=t.dtype,
                                              shape=ir.Shape([int(d) for d in t.shape.numpy()]), name=v.name or "", base_dir="")
        return ir.to_proto(model)
    finally:
        for v, t in swapped:
            v.const_value = t


def check_model(model: ir.Model) -> None:
    """``onnx.checker.check_model(full_check=True)`` on ``model`` without serialising its weights.

    The large float initializers reach the checker as graph inputs of the same type and shape (what
    the checker and its strict shape inference read of them), and their data is checked here
    against that shape instead: on deeplab_resnet34 this saves serialising 85 MB twice (~0.3 s of
    its import). Raises the checker's own ``ValidationError``, or ``ValueError`` for a weight whose
    data does not fill its shape.
    """
    heavy: set[str] = set()
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if _heavy(t):
            heavy.add(name)
            if isinstance(t, DrawnTensor) and not t.drawn:
                continue  # drawn by mtc to its shape when read; drawing it here would only cost time
            try:
                t.numpy()  # a view where the data is in memory: cheap
            except Exception as e:  # a proto's bytes or an external file that do not fill the shape
                raise ValueError(f"initializer '{name}': its data cannot be read ({e})") from None
    proto = _proto_without_weights(model)
    g = proto.graph
    inputs = {i.name for i in g.input}
    kept = [init for init in g.initializer if init.name not in heavy]
    g.input.extend(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                   for init in g.initializer if init.name in heavy and init.name not in inputs)
    del g.initializer[:]
    g.initializer.extend(kept)
    onnx.checker.check_model(proto, full_check=True)


def infer_shapes(model: ir.Model, *, file: str | None = None, strict: bool = False) -> ir.Model:
    """Run ONNX shape inference (with data propagation) and write the results into ``model`` in place.

    Custom-domain nodes are skipped by ONNX's inference and keep whatever shapes they carry.
    ``strict``: shapes that do not agree (a convolution reading more channels than its input has)
    are an error naming the node, not a shape left unknown.
    """
    proto = _proto_without_weights(model)
    # Shape inference must not see stale value_info: an old, wrong shape would be merged in.
    del proto.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=strict, strict_mode=strict, data_prop=True)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        msg = " ".join(lines[-2:]) if lines else type(e).__name__
        what = "the shapes do not agree" if strict else "shape inference failed"
        raise MtcError(f"{what}: {msg}", file=file) from None
    infos: dict[str, onnx.ValueInfoProto] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        infos[vi.name] = vi
    for node in model.graph:
        for out in node.outputs:
            vi = infos.get(out.name) if out.name is not None else None
            if vi is None or not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            if tt.elem_type:
                out.dtype = ir.DataType(tt.elem_type)
            if tt.HasField("shape"):
                dims: list[int | str | None] = []
                for d in tt.shape.dim:
                    if d.HasField("dim_value"):
                        dims.append(d.dim_value)
                    elif d.HasField("dim_param"):
                        dims.append(d.dim_param)
                    else:
                        dims.append(None)
                out.shape = ir.Shape(dims)
    return model


def dims(value: ir.Value) -> tuple[int | str | None, ...] | None:
    """The value's shape as a tuple of ints (static), strings (symbolic) and None (unknown)."""
    if value.shape is None:
        return None
    out: list[int | str | None] = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value)
    return tuple(out)


def static_dims(value: ir.Value, batch: int = 1) -> tuple[int, ...] | None:
    """The shape with a symbolic leading (batch) dimension replaced by ``batch``; None if not static."""
    d = dims(value)
    if d is None:
        return None
    out = []
    for i, x in enumerate(d):
        if isinstance(x, int):
            out.append(x)
        elif i == 0:
            out.append(batch)
        else:
            return None
    return tuple(out)


def input_dims(value: ir.Value, batch: int, hint: str) -> tuple[int, ...]:
    """:func:`static_dims` of a graph input that must be concrete (to make data for it).

    Raises:
        MtcError: no shape, or a symbolic dimension other than the leading batch; ``hint`` says
            what to do about it.
    """
    d = dims(value)
    if d is None:
        raise MtcError(f"input '{value.name}' has no shape: {hint}")
    out = static_dims(value, batch)
    if out is None:
        i, x = next((i, x) for i, x in enumerate(d) if i > 0 and not isinstance(x, int))
        raise MtcError(f"input '{value.name}' has symbolic dimension '{x}' at axis {i}: {hint}")
    return out


def format_shape(value: ir.Value) -> str:
    d = dims(value)
    if d is None:
        return "?"
    return "[" + ",".join("?" if x is None else str(x) for x in d) + "]"
