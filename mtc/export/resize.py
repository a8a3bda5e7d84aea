"""Linear ``Resize`` as MatMuls with interpolation matrices: exact, and much faster in onnxruntime.

Linear interpolation along one axis is a linear map: ``y = M x`` with ``M`` an ``[out, in]`` matrix
holding the two weights of each output position. Along the last two axes of a tensor it is a
``MatMul`` each::

    before: x [N,C,h,w] ─ Resize(linear, sizes=[H, W]) ─ y [N,C,H,W]
    after:  x [N,C,h,w] ─ MatMul(Mh [H,h], x) ─ MatMul(·, Mwᵀ [w,W]) ─ y [N,C,H,W]

(the axis that grows least goes first, which keeps the intermediate tensor small).

onnxruntime's CPU ``Resize`` runs bilinear at ~1 ns per output element; the two small GEMMs run
2-8x faster for the shapes segmentation heads and decoders use (docs/export.md), and match
onnxruntime's ``Resize`` to float rounding. The matrices are the lowering's own per-axis plans
(:mod:`mtc.lower.resize`, checked against the ONNX backend tests) written densely. Only what the rewrite can
reproduce exactly is rewritten: ``mode="linear"`` without antialiasing, static sizes or scales
along the last two axes only, and every coordinate transformation except ``tf_crop_and_resize``.
Other ``Resize`` nodes are left as they are.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mtc.ir.names import unique
from mtc.ir.shapes import dims
from mtc.lower.resize import axis_matrix, output_sizes, resize_attrs

#: Coordinate transformations rewritten (``tf_crop_and_resize`` needs a run-time roi and extrapolates).
COORDINATES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric")
_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def plan(node: ir.Node) -> dict[int, np.ndarray] | None:
    """``{axis: [out, in] interpolation matrix}`` for each axis a rewritable ``Resize`` changes, else None.

    The matrices are the lowering's own per-axis plans (:func:`mtc.lower.resize.axis_matrix`).
    None for a node the rewrite leaves alone: another mode, antialiasing, a crop, another
    ``keep_aspect_ratio_policy``, a run-time size or scale, an unknown input shape, a resized axis
    before the last two, or an axis whose size a scale other than 1 leaves unchanged (where
    runtimes disagree with the spec).
    """
    if node.op_type != "Resize" or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    x = node.inputs[0]
    shape = dims(x) if x is not None else None
    if x is None or shape is None or x.dtype not in _FLOATS or len(shape) < 2:
        return None
    a = resize_attrs(lambda name, default: node.attributes[name].value if name in node.attributes else default)
    if a.mode != "linear" or a.antialias or a.ctm not in COORDINATES or a.policy != "stretch":
        return None
    rank = len(shape)
    n_axes = len(a.axes) if a.axes is not None else rank
    scales = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    sizes = _const(node.inputs[3]) if len(node.inputs) > 3 else None
    if sizes is not None and sizes.size:
        if sizes.size != n_axes:
            return None
        scales = None
    elif scales is None or scales.size != n_axes:
        return None
    resized = {a_ % rank for a_ in a.axes} if a.axes is not None else set(range(rank))
    if any(not isinstance(shape[ax], int) for ax in resized):
        return None
    static = [d if isinstance(d, int) else 1 for d in shape]  # unresized symbolic axes keep their size
    outs, scale = output_sizes(a, static, None if scales is None else scales.reshape(-1).tolist(),
                               None if sizes is None or not sizes.size else sizes.reshape(-1).tolist())
    out: dict[int, np.ndarray] = {}
    for ax in sorted(resized):
        n_in, n_out = static[ax], outs[ax]
        if n_in < 1 or n_out < 1:
            return None
        if n_out == n_in:
            if scale[ax] != 1.0:
                # The spec still interpolates (a shifted grid); onnxruntime copies. Keep the node.
                return None
            continue  # an axis left alone
        if ax < rank - 2:
            return None
        out[ax] = axis_matrix(a, n_in, n_out, scale[ax])
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
        # Resize the axis first that makes the intermediate tensor smaller (fewer MACs overall).
        order = sorted(axes, key=lambda a: axes[a].shape[0] / axes[a].shape[1])
        cur = x
        new_nodes = []
        for i, a in enumerate(order):
            side = "W" if a == rank - 1 else "H"
            name = unique(f"{node.name}/{side}", taken)
            taken.add(name)
            if a == rank - 1:
                w = _initializer(g, f"{node.name}.{side}", axes[a].T.astype(dtype))
                inputs = [cur, w]
            else:
                w = _initializer(g, f"{node.name}.{side}", axes[a].astype(dtype))
                inputs = [w, cur]
            mm = ir.Node("", "MatMul", inputs, name=name, metadata_props=dict(node.metadata_props))
            shape[a] = axes[a].shape[0]
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
