"""Fold constant and shape arithmetic so exported graphs come in clean.

Both PyTorch exporters compute reshape targets and resize sizes at run time from ``Shape`` of a
tensor (``x.view(x.size(0), -1)``, ``interpolate(size=x.shape[-2:])``). With static spatial
dimensions and a symbolic batch, those subgraphs are partially known. This pass evaluates them
with symbolic entries and rewrites their consumers:

    before: Shape(x) -> Gather(0) -> Unsqueeze -> Concat([N], [-1]) -> Reshape(y, .)
    after:  Reshape(y, [0, -1])          # 0 copies y's batch dimension (allowzero=0)

    before: Shape(x) -> Slice(2:4) -> Concat([N, C], [H, W]) -> Resize(y, sizes=.)
    after:  Resize(y, sizes=[H', W'], axes=[2, 3])     # opset 18

Nodes whose inputs are all constants are evaluated with ONNX's reference implementation
(except those reading large float initializers, which are weights, not arithmetic).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from mtc.ir.opset import opset_of
from mtc.ir.seeded import DrawnTensor
from mtc.passes.base import Pass, PassResult
from mtc.passes.manager import register_pass

_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli", "Dropout"}
#: A node reading a float initializer with more elements than this is compute, not shape arithmetic.
MAX_FOLD_WEIGHT = 4096
MAX_FOLD_OUTPUT = 1 << 20


class Sym:
    """A symbolic (run-time) scalar in a shape vector, e.g. the batch size."""

    _ids = itertools.count()

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.id = next(self._ids)

    def __repr__(self) -> str:
        return f"Sym({self.name or self.id})"

    def _new(self, *_: object) -> Sym:
        return Sym(None)

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _new
    __floordiv__ = __rfloordiv__ = __truediv__ = __rtruediv__ = __mod__ = _new


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.const_value is None:
        return None
    t = v.const_value
    if isinstance(t, DrawnTensor) and not t.drawn and t.size > MAX_FOLD_WEIGHT:
        return None  # a fresh weight: never folded (_reads_weights), so not drawn just to look at it
    try:
        return v.const_value.numpy()
    except Exception:  # lazy external tensors that cannot be read
        return None


def _is_partial(a: object) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == object


def _has_sym(a: np.ndarray) -> bool:
    return any(isinstance(x, Sym) for x in a.ravel())


@register_pass
class FoldShapes(Pass):
    """Fold constant subgraphs and partially-known shape arithmetic (see module docstring)."""

    name = "fold-shapes"

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for _ in range(8):  # folding exposes more folding; converge
            changed = self._sweep(model)
            modified |= changed
            if not changed:
                break
        return PassResult(model, modified)

    # ------------------------------------------------------------------ evaluation
    def _sweep(self, model: ir.Model) -> bool:
        g = model.graph
        opset = opset_of(model)
        partial: dict[int, np.ndarray] = {}  # id(value) -> object array with Sym entries
        changed = False
        for node in list(g):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Reshape" and self._fold_reshape(g, node, partial):
                changed = True
                continue
            if node.op_type == "Resize" and opset >= 18 and self._fold_resize(g, node, partial):
                changed = True
                continue
            consts = [_const(v) if v is not None else None for v in node.inputs]
            if (
                node.op_type == "CastLike"
                and consts[0] is not None
                and (target := node.inputs[1]) is not None
                and target.dtype is not None
            ):
                # Only the second input's type matters, which is known at import.
                dtype = target.dtype.numpy()
                self._replace_with_constants(g, node, [consts[0].astype(dtype)])
                changed = True
                continue
            known = all(v is None or c is not None for v, c in zip(node.inputs, consts, strict=True))
            if known and node.op_type not in _NO_FOLD and not self._reads_weights(node):
                values = self._evaluate(node, consts, opset)
                if values is not None:
                    self._replace_with_constants(g, node, values)
                    changed = True
                    continue
            res = self._partial(node, consts, partial)
            if res is not None:
                res = np.asarray(res, dtype=object)
                if _has_sym(res):
                    partial[id(node.outputs[0])] = res
                else:
                    self._replace_with_constants(g, node, [res.astype(np.int64)])  # fully known
                    changed = True
        if changed:
            _drop_zero_bias(g)
            _remove_dead(g)
        return changed

    @staticmethod
    def _reads_weights(node: ir.Node) -> bool:
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.const_value is not None:
                t = v.const_value
                if t.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE) and t.size > MAX_FOLD_WEIGHT:
                    return True
        return False

    @staticmethod
    def _evaluate(node: ir.Node, consts: list[np.ndarray | None], opset: int) -> list[np.ndarray] | None:
        if not node.outputs or any(not o.name for o in node.outputs):
            return None
        proto = ir.serde.serialize_node(node)
        in_names = [f"i{k}" if v is not None else "" for k, v in enumerate(node.inputs)]
        out_names = [f"o{k}" for k in range(len(node.outputs))]
        del proto.input[:]
        proto.input.extend(in_names)
        del proto.output[:]
        proto.output.extend(out_names)
        try:
            ev = ReferenceEvaluator(proto, opsets={"": opset})
            feeds = {n: c for n, c in zip(in_names, consts, strict=True) if n}
            res = ev.run(None, feeds)
        except Exception:
            return None
        out = [np.asarray(r) for r in res]
        if any(r.size > MAX_FOLD_OUTPUT or r.dtype == object for r in out):
            return None
        return out

    @staticmethod
    def _partial(node: ir.Node, consts: list[np.ndarray | None], partial: dict[int, np.ndarray]) -> np.ndarray | None:
        """Evaluate shape ops over arrays whose entries may be symbolic; None when unknown."""

        def arg(i: int) -> np.ndarray | None:
            if i >= len(node.inputs) or node.inputs[i] is None:
                return None
            v = node.inputs[i]
            if id(v) in partial:
                return partial[id(v)]
            c = consts[i]
            return None if c is None else c.astype(object)

        op = node.op_type
        attrs = node.attributes
        try:
            if op == "Shape":
                x = node.inputs[0]
                if x is None or x.shape is None:
                    return None
                entries = [d if isinstance(d, int) else Sym(d.value) for d in x.shape]
                start = attrs["start"].as_int() if "start" in attrs else 0
                end = attrs["end"].as_int() if "end" in attrs else None
                return np.array(entries[start:end] if end is not None else entries[start:], dtype=object)
            if op in ("Identity", "Cast"):
                a = arg(0)
                if a is None or (op == "Cast" and attrs["to"].as_int() not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)):
                    return None
                return a
            if op == "Gather":
                a, idx = arg(0), consts[1]
                if a is None or idx is None or a.ndim != 1:
                    return None
                return np.take(a, idx.astype(np.int64), axis=0)
            if op == "Slice":
                a = arg(0)
                starts, ends = consts[1], consts[2]
                if a is None or a.ndim != 1 or starts is None or ends is None:
                    return None
                st, en = int(starts[0]), int(ends[0])
                step = int(consts[4][0]) if len(consts) > 4 and consts[4] is not None else 1
                return a[slice(st, min(en, len(a)) if en >= 0 else en, step)]
            if op == "Concat":
                parts = [arg(i) for i in range(len(node.inputs))]
                known_parts = [p for p in parts if p is not None]
                if len(known_parts) != len(parts):
                    return None
                return np.concatenate([np.atleast_1d(p) for p in known_parts])
            if op == "Reshape":
                a, shp = arg(0), consts[1]
                if a is None or shp is None or 0 in shp.tolist():
                    return None
                return a.reshape(tuple(int(d) for d in shp))
            if op in ("Unsqueeze", "Squeeze"):
                a = arg(0)
                if a is None:
                    return None
                return a.reshape(-1) if op == "Unsqueeze" and a.ndim == 0 else (a.reshape(()) if a.size == 1 and op == "Squeeze" else a)
            if op in ("Add", "Sub", "Mul", "Div"):
                a, b = arg(0), arg(1)
                if a is None or b is None:
                    return None
                if op == "Div":
                    return np.vectorize(lambda p, q: Sym(None) if isinstance(p, Sym) or isinstance(q, Sym) else int(p / q) if p * q >= 0 else -(-p // q), otypes=[object])(a, b)
                fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
                return fn(a, b)
        except Exception:
            return None
        return None

    # ------------------------------------------------------------------ rewrites
    @staticmethod
    def _fold_reshape(g: ir.Graph, node: ir.Node, partial: dict[int, np.ndarray]) -> bool:
        shape_v = node.inputs[1]
        if shape_v is None or id(shape_v) not in partial:
            return False
        target = partial[id(shape_v)]
        data = node.inputs[0]
        allowzero = node.attributes["allowzero"].as_int() if "allowzero" in node.attributes else 0
        if data is None or data.shape is None or target.ndim != 1:
            return False
        if allowzero and any(not isinstance(x, Sym) and x == 0 for x in target):
            return False  # a literal zero-sized dimension: leave it alone
        new = []
        minus_one = sum(1 for x in target if not isinstance(x, Sym) and x == -1)
        for i, x in enumerate(target):
            if isinstance(x, Sym):
                d = data.shape[i] if i < len(data.shape) else None
                if d is not None and not isinstance(d, int) and x.name is not None and d.value == x.name:
                    new.append(0)  # copy the dimension from the input
                elif minus_one == 0:
                    new.append(-1)
                    minus_one = 1
                else:
                    return False
            else:
                new.append(int(x))
        const = _initializer(g, f"{node.name}_shape", np.array(new, dtype=np.int64))
        node.replace_input_with(1, const)
        if allowzero and 0 in new:
            # Without literal zeros allowzero changes nothing, and our 0 means "copy".
            node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
        return True

    @staticmethod
    def _fold_resize(g: ir.Graph, node: ir.Node, partial: dict[int, np.ndarray]) -> bool:
        if len(node.inputs) < 4 or node.inputs[3] is None or id(node.inputs[3]) not in partial:
            return False
        if "axes" in node.attributes:
            return False
        sizes = partial[id(node.inputs[3])]
        x = node.inputs[0]
        if x is None or x.shape is None or len(sizes) != len(x.shape):
            return False
        axes, vals = [], []
        for i, (s, d) in enumerate(zip(sizes, x.shape, strict=True)):
            if isinstance(s, Sym):
                # Only a dimension carried through unchanged (same symbol as the input's) can go.
                if isinstance(d, int) or s.name is None or d.value != s.name:
                    return False
                continue
            if isinstance(d, int) and d == int(s):
                continue  # unchanged axis: leave it out of `axes`
            axes.append(i)
            vals.append(int(s))
        if not axes:
            return False
        node.attributes["axes"] = ir.AttrInt64s("axes", axes)
        const = _initializer(g, f"{node.name}_sizes", np.array(vals, dtype=np.int64))
        node.replace_input_with(3, const)
        return True

    @staticmethod
    def _replace_with_constants(g: ir.Graph, node: ir.Node, values: list[np.ndarray]) -> None:
        for out, val in zip(node.outputs, values, strict=False):
            if not out.uses() and not out.is_graph_output():
                continue
            name = out.name
            assert name is not None  # onnx_ir names every value once its node is in a graph
            const = _initializer(g, name + "_folded" if out.is_graph_output() else name + "_c", val)
            const.shape = ir.Shape(val.shape)
            if out.is_graph_output():
                # A graph output must stay produced by a node: keep an Identity in its place.
                continue
            out.replace_all_uses_with(const)


def _initializer(g: ir.Graph, base: str, arr: np.ndarray) -> ir.Value:
    name = base
    k = 1
    while name in g.initializers:
        name = f"{base}_{k}"
        k += 1
    v = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
    v.shape = ir.Shape(arr.shape)
    v.dtype = ir.DataType.from_numpy(arr.dtype)
    v.meta["mtc.folded"] = True
    g.register_initializer(v)
    return v


def _drop_zero_bias(g: ir.Graph) -> None:
    """A folded all-zero Conv bias is an exporter artefact (``bias=False``), not a parameter."""
    for node in g:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) == 3 and node.inputs[2] is not None:
            b = node.inputs[2]
            if b.meta.get("mtc.folded") and b.const_value is not None and not np.any(b.const_value.numpy()):
                node.resize_inputs(2)


def _remove_dead(g: ir.Graph) -> None:
    """Drop nodes and initializers that nothing reads any more."""
    outputs = {id(v) for v in g.outputs}
    for node in reversed(list(g)):
        if all(not o.uses() and id(o) not in outputs for o in node.outputs):
            g.remove(node, safe=True)
    inputs = {id(v) for v in g.inputs}
    for name, v in list(g.initializers.items()):
        if not v.uses() and id(v) not in outputs and id(v) not in inputs:
            del g.initializers[name]
