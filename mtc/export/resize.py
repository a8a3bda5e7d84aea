"""Linear ``Resize`` as MatMuls with interpolation matrices: exact, and much faster in onnxruntime.

Linear interpolation along one axis is a linear map: ``y = M x`` with ``M`` an ``[out, in]`` matrix
holding the two weights of each output position. Along the last two axes of a tensor it is a
``MatMul`` each::

    before: x [N,C,h,w] ─ Resize(linear, sizes=[H, W]) ─ y [N,C,H,W]
    after:  x [N,C,h,w] ─ MatMul(Mh [H,h], x) ─ MatMul(·, Mwᵀ [w,W]) ─ y [N,C,H,W]

(the axis that grows least goes first, which keeps the intermediate tensor small).

onnxruntime's CPU ``Resize`` runs bilinear at ~1 ns per output element; the two small GEMMs run
2-8x faster for the shapes segmentation heads and decoders use (docs/export.md), and match
onnxruntime's ``Resize`` to float rounding (the weights are the same). Only what the rewrite can
reproduce exactly is rewritten: ``mode="linear"`` without antialiasing, static sizes or scales
along the last two axes only, and every coordinate transformation except ``tf_crop_and_resize``.
Other ``Resize`` nodes are left as they are.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from mtc.ir.names import unique
from mtc.ir.shapes import dims

#: Coordinate transformations the matrices reproduce (``tf_crop_and_resize`` needs a run-time roi).
COORDINATES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric")
_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)


def source_coordinates(n_in: int, n_out: int, scale: float, mode: str) -> np.ndarray:
    """Where each of ``n_out`` output positions samples the input (ONNX ``Resize``, one axis)."""
    x = np.arange(n_out, dtype=np.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        offset = n_in / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if n_out > 1 else np.zeros(n_out)
    if mode == "align_corners":
        return x * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(n_out)
    if mode == "asymmetric":
        return x / scale
    raise ValueError(f"unsupported coordinate_transformation_mode '{mode}'")


def linear_matrix(n_in: int, n_out: int, scale: float, mode: str) -> np.ndarray:
    """The ``[n_out, n_in]`` matrix of linear interpolation along one axis.

    Source positions are clamped to ``[0, n_in - 1]`` (the edge value repeats), as in the ONNX
    reference and onnxruntime.
    """
    src = np.clip(source_coordinates(n_in, n_out, scale, mode), 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _str(node: ir.Node, name: str, default: str) -> str:
    a = node.attributes.get(name)
    return default if a is None else a.as_string()


def _int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else a.as_int()


def plan(node: ir.Node) -> dict[int, tuple[int, int, float]] | None:
    """``{axis: (n_in, n_out, scale)}`` for each axis a rewritable ``Resize`` changes, else None.

    None for a node the rewrite cannot reproduce exactly: another mode, antialiasing, a crop, a
    run-time size or scale, an unknown input shape, a resized axis before the last two, or an axis
    whose size a scale other than 1 leaves unchanged (where runtimes disagree with the spec).
    """
    if node.op_type != "Resize" or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    x = node.inputs[0]
    shape = dims(x) if x is not None else None
    if x is None or shape is None or x.dtype not in _FLOATS or len(shape) < 2:
        return None
    if _str(node, "mode", "nearest") != "linear" or _int(node, "antialias", 0) != 0:
        return None
    coord = _str(node, "coordinate_transformation_mode", "half_pixel")
    if coord not in COORDINATES or _str(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        return None
    rank = len(shape)
    axes_attr = node.attributes.get("axes")
    axes = [a % rank for a in axes_attr.as_ints()] if axes_attr is not None else list(range(rank))
    scales = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    sizes = _const(node.inputs[3]) if len(node.inputs) > 3 else None
    if sizes is not None and sizes.size:
        if sizes.size != len(axes):
            return None
        outs = [int(s) for s in sizes.reshape(-1)]
        given: list[float | None] = [None] * len(axes)
    elif scales is not None and scales.size == len(axes):
        factors = [float(s) for s in scales.reshape(-1)]
        given = list(factors)
        outs = []
        for a, f in zip(axes, factors, strict=True):
            n = shape[a]
            if not isinstance(n, int):
                return None
            outs.append(math.floor(n * f))
    else:
        return None
    out: dict[int, tuple[int, int, float]] = {}
    for a, n_out, s in zip(axes, outs, given, strict=True):
        n_in = shape[a]
        if not isinstance(n_in, int) or n_in < 1 or n_out < 1:
            return None
        scale = s if s is not None else n_out / n_in
        if n_out == n_in:
            if scale != 1.0:
                # The spec still interpolates (a shifted grid); onnxruntime copies. Keep the node.
                return None
            continue  # an axis left alone
        if a < rank - 2:
            return None
        out[a] = (n_in, n_out, scale)
    return out or None


def _initializer(g: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    name = unique(name, set(g.initializers))
    val = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                   const_value=ir.tensor(arr, name=name))
    g.register_initializer(val)
    return val


def resize_as_matmul(model: ir.Model) -> int:
    """Rewrite every linear ``Resize`` :func:`plan` accepts as one ``MatMul`` per resized axis.

    The MatMuls keep the Resize's name (``<name>/W``, ``<name>/H`` for the last and second-to-last
    axis) and metadata (its origin); the last one writes the Resize's output value. Initializers
    only the Resize read are dropped. Returns the number of nodes rewritten.
    """
    g = model.graph
    taken = {n.name for n in g if n.name}
    values = {v.name for v in (*g.inputs, *g.initializers.values(), *(o for n in g for o in n.outputs)) if v.name}
    done = 0
    for node in list(g):
        axes = plan(node)
        if axes is None:
            continue
        x, y = node.inputs[0], node.outputs[0]
        assert x is not None and x.dtype is not None
        dtype = x.dtype.numpy()
        shape = list(dims(x) or [])
        rank = len(shape)
        mats = {a: linear_matrix(*axes[a], _str(node, "coordinate_transformation_mode", "half_pixel"))
                for a in axes}
        # Resize the axis first that makes the intermediate tensor smaller (fewer MACs overall).
        order = sorted(axes, key=lambda a: axes[a][1] / axes[a][0])
        cur = x
        new_nodes = []
        for i, a in enumerate(order):
            n_in, n_out, _ = axes[a]
            side = "W" if a == rank - 1 else "H"
            name = unique(f"{node.name}/{side}", taken)
            taken.add(name)
            if a == rank - 1:
                w = _initializer(g, f"{node.name}.{side}", mats[a].T.astype(dtype))
                inputs = [cur, w]
            else:
                w = _initializer(g, f"{node.name}.{side}", mats[a].astype(dtype))
                inputs = [w, cur]
            mm = ir.Node("", "MatMul", inputs, name=name, metadata_props=dict(node.metadata_props))
            shape[a] = n_out
            out = mm.outputs[0]
            out.dtype = x.dtype
            out.shape = ir.Shape(shape)
            if i < len(order) - 1:
                out.name = unique(name, values)
                values.add(out.name)
            new_nodes.append(mm)
            cur = out
        g.insert_after(node, new_nodes)
        y_name = y.name
        y.replace_all_uses_with(cur, replace_graph_outputs=True)
        if y.shape is not None:
            cur.shape = y.shape
        config = [v for v in node.inputs[1:] if v is not None]
        g.remove(node, safe=True)
        y.name = None
        cur.name = y_name
        for v in config:  # roi, scales, sizes no one else reads
            if v.name is not None and v.name in g.initializers and not v.uses() and not v.is_graph_output():
                del g.initializers[v.name]
        done += 1
    return done
