"""The ``canonicalize`` pass: one clean, named, shape-annotated graph for every later pass."""

from __future__ import annotations

import onnx_ir as ir

from mtc.ir.names import fix_names
from mtc.ir.shapes import dims, infer_shapes
from mtc.passes.base import Pass, PassResult
from mtc.passes.fold import FoldShapes
from mtc.passes.manager import register_pass

__all__ = ["Canonicalize", "remove_dead", "remove_noops"]

#: Alternations of folding and shape inference before giving up on a fixpoint.
MAX_ROUNDS = 16


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _dropout_is_noop(node: ir.Node) -> bool:
    """A Dropout is the identity at inference unless ``training_mode`` is (or may be) true."""
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return False  # its mask is read
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = node.inputs[2].const_value
        if mode is None:
            return False  # decided at run time
        try:
            return not bool(mode.numpy().any())
        except Exception:  # an unreadable tensor: leave the node alone
            return False
    return True


def remove_noops(model: ir.Model, *, keep_dropout: bool = False) -> bool:
    """Remove ``Identity`` nodes and inference-time no-op ``Dropout`` nodes; return whether any went.

    A no-op whose output is a graph output keeps the output's name: when its input is an
    activation read by nothing else under that name (not a graph input, initializer or another
    graph output), the input value takes over the output's name; otherwise the node stays,
    because a graph output must be produced by a node and each output needs its own value.
    """
    g = model.graph
    changed = False
    for node in list(g):
        if not _is_default_domain(node) or not node.inputs or node.inputs[0] is None:
            continue
        if node.op_type == "Identity":
            pass
        elif node.op_type == "Dropout" and not keep_dropout and _dropout_is_noop(node):
            pass
        else:
            continue
        src, out = node.inputs[0], node.outputs[0]
        if out.is_graph_output():
            if src.producer() is None or src.is_graph_output() or src.is_graph_input():
                continue
            name = out.name
            for i, v in enumerate(g.outputs):
                if v is out:
                    g.outputs[i] = src
            out.replace_all_uses_with(src)
            g.remove(node, safe=True)
            out.name = None  # free the name before the input takes it
            src.name = name
            if src.shape is None:
                src.shape = out.shape
            if src.dtype is None and out.dtype is not None:
                src.dtype = out.dtype
        else:
            out.replace_all_uses_with(src)
            g.remove(node, safe=True)
        changed = True
    return changed


def remove_dead(model: ir.Model) -> bool:
    """Remove nodes none of whose outputs is read or a graph output, then unread initializers.

    Graph inputs are part of the interface and stay, even when nothing reads them. Returns whether
    anything was removed.
    """
    g = model.graph
    changed = False
    for node in reversed(list(g)):  # consumers first, so whole dead chains go in one sweep
        if all(not o.uses() and not o.is_graph_output() for o in node.outputs):
            g.remove(node, safe=True)
            changed = True
    for name, v in list(g.initializers.items()):
        if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            del g.initializers[name]
            changed = True
    return changed


def _shape_snapshot(model: ir.Model) -> dict[ir.Value, tuple]:
    # Keyed by the values themselves (identity hash), which also keeps them alive for the comparison.
    return {o: (dims(o), o.dtype, o.shape) for n in model.graph for o in n.outputs}


def _generated(d: object) -> bool:
    """An unknown dimension: none, or a symbol ONNX shape inference made up (``unk__3``)."""
    return d is None or (isinstance(d, str) and d.startswith("unk__"))


def _same_shape(old: tuple | None, new: tuple | None) -> bool:
    """Equal up to the names of made-up symbols, which inference renumbers on every run."""
    if old is None or new is None or len(old) != len(new):
        return old == new
    return all(a == b or (_generated(a) and _generated(b)) for a, b in zip(old, new, strict=True))


def _restore_equivalent_shapes(before: dict[ir.Value, tuple]) -> bool:
    """Keep each value's old shape where inference found the same one; return whether any changed."""
    changed = False
    for v, (old_dims, old_dtype, old_shape) in before.items():
        if old_dtype != v.dtype:
            changed = True
        if _same_shape(old_dims, dims(v)):
            if old_shape is not None:
                v.shape = old_shape
        else:
            changed = True
    return changed


@register_pass
class Canonicalize(Pass):
    """Rewrites an imported graph into canonical form: named, folded, without no-ops or dead code.

    Steps, each only as far as it changes something: name every node and value
    (:func:`mtc.ir.names.fix_names`), drop ``Identity`` and inference no-op ``Dropout`` nodes,
    fold constant and shape arithmetic (:class:`mtc.passes.fold.FoldShapes`, alternated with
    shape inference to a fixpoint), remove dead nodes and unread initializers, and infer shapes.
    ``modified`` is true only if the graph changed: a shape inference that finds the shapes
    already recorded does not count. A second run returns ``modified=False``::

        before: x -> Conv -> Identity -> Dropout -> Relu -> y      Shape(x) -> Gather -> (unused)
                (anonymous nodes, no intermediate shapes)
        after:  x -> Conv[conv_0] -> Relu[relu_0] -> y              (every value with its shape)

    Args:
        keep_dropout: keep ``Dropout`` nodes (they are no-ops in inference, but regularise
            training of the supergraph).
    """

    name = "canonicalize"
    options = ("keep_dropout",)

    def __init__(self, *, keep_dropout: bool = False) -> None:
        super().__init__()
        self.keep_dropout = bool(keep_dropout)

    def call(self, model: ir.Model) -> PassResult:
        before = _shape_snapshot(model)
        modified = fix_names(model)
        removed = remove_noops(model, keep_dropout=self.keep_dropout)
        modified |= removed
        # An imported model arrives with every shape inferred and folded to a fixpoint; inferring
        # again (a protobuf round trip, ~140 ms on deeplab) is only needed after a change or a gap.
        if removed or any(o.shape is None for n in model.graph for o in n.outputs):
            infer_shapes(model)
        # Folding makes more shapes static, which makes more folding possible.
        for _ in range(MAX_ROUNDS):
            if not FoldShapes()(model).modified:
                break
            modified = True
            infer_shapes(model)
        modified |= remove_dead(model)
        # Cheap insurance: the steps above must not leave anonymous or clashing names behind.
        modified |= fix_names(model)
        # Values removed on the way are no longer in the graph; only the survivors count.
        live = {o for n in model.graph for o in n.outputs}
        modified |= _restore_equivalent_shapes({v: s for v, s in before.items() if v in live})
        return PassResult(model, modified)
