"""The ``cut-at-feature`` pass: find the backbone's feature map and drop what comes after it.

The feature rule (no backbone is special-cased):

1. Candidates are the graph's *cut points* (:func:`mtc.ir.cuts.branch_points`): tensors every
   path from the inputs to the outputs passes through. A head attached anywhere else would
   see only part of the computation (e.g. inside a residual block it would drop the skip path).
2. A candidate is an activation of rank 4, ``(N, C, H, W)``, produced by a node (not a graph
   input) and not *reduced*. A value is reduced when its producer collapses space (a global
   pooling or reduction: ``GlobalAveragePool``, ``GlobalMaxPool``, ``GlobalLpPool``, a
   ``Reduce*`` over all spatial axes, or any op turning an ``H x W > 1`` map into ``1 x 1``, such
   as a Caffe ``AveragePool`` with the full kernel), when it has rank 2 or less (``Flatten``,
   ``Gemm``: the classifier), or when every activation it is computed from is reduced (a
   ``Reshape`` back to ``(N, C, 1, 1)`` after the classifier stays reduced; a squeeze-and-excite
   ``Mul`` of the feature map by pooled weights does not).
3. The feature is the deepest candidate. For a classifier backbone that is the input of the
   global pooling; for a fully-convolutional backbone (DeepLab) it is the output itself.
"""

from __future__ import annotations

import difflib

import networkx as nx
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir.cuts import branch_points, dataflow_graph
from mtc.ir.names import node_error
from mtc.ir.shapes import dims, format_shape
from mtc.ir.supergraph import FEATURE_KEY
from mtc.ir.supergraph import TASKS_KEY as _TASKS_KEY
from mtc.passes.base import Pass, PassResult
from mtc.passes.canonicalize import remove_dead
from mtc.passes.manager import register_pass

__all__ = ["FEATURE_KEY", "CutAtFeature", "find_feature", "is_reduced_map"]

_PASS = "cut-at-feature"
_ARG = "--feature"

_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCES = {
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}


def _rank(v: ir.Value) -> int | None:
    return len(v.shape) if v.shape is not None else None


def _spatial_size(v: ir.Value) -> int | None:
    """H x W x ... of an ``(N, C, ...)`` value when static, else None."""
    d = dims(v)
    if d is None or len(d) < 3:
        return None
    size = 1
    for x in d[2:]:
        if not isinstance(x, int):
            return None
        size *= x
    return size


def _reduce_axes(node: ir.Node) -> list[int] | None:
    """The axes a ``Reduce*`` node reduces; ``[]`` means all of them; None when not constant."""
    if "axes" in node.attributes:  # opset < 18 (ReduceSum < 13)
        return list(node.attributes["axes"].as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        c = node.inputs[1].const_value
        if c is None:
            return None
        return [int(a) for a in c.numpy().ravel()]
    return []


def _collapses_space(node: ir.Node, acts: list[ir.Value]) -> bool:
    """Whether ``node`` is a global pooling or reduction over the spatial axes of its input."""
    if node.op_type in _GLOBAL_POOLS and node.domain in ("", "ai.onnx"):
        return True
    x = acts[0] if acts else None
    if node.op_type in _REDUCES and node.domain in ("", "ai.onnx") and x is not None:
        r = _rank(x)
        axes = _reduce_axes(node)
        if r is not None and r >= 3 and axes is not None:
            noop = "noop_with_empty_axes" in node.attributes and node.attributes["noop_with_empty_axes"].as_int()
            if not axes:
                return not noop
            norm = {a % r for a in axes}
            if set(range(2, r)) <= norm:
                return True
    # Shape evidence, whatever the op: an H x W > 1 map in, a 1 x 1 map out.
    for out in node.outputs:
        if _spatial_size(out) == 1 and any((_spatial_size(a) or 1) > 1 for a in acts):
            return True
    return False


def is_reduced_map(model: ir.Model) -> dict[str, bool]:
    """For each node output (by name): whether it lies after the global pooling or classifier.

    See the module docstring for the rule.
    """
    reduced: dict[str, bool] = {}
    for node in model.graph:
        acts = [v for v in node.inputs if v is not None and v.const_value is None and not v.is_initializer()]
        collapses = _collapses_space(node, acts)
        from_reduced = bool(acts) and all(reduced.get(v.name or "", False) for v in acts)
        for out in node.outputs:
            r = _rank(out)
            reduced[out.name or ""] = collapses or from_reduced or (r is not None and r <= 2)
    return reduced


def _values(model: ir.Model) -> dict[str, ir.Value]:
    g = model.graph
    vals: dict[str, ir.Value] = {v.name: v for v in g.inputs if v.name}
    vals.update({k: v for k, v in g.initializers.items()})
    for n in g:
        for o in n.outputs:
            if o.name:
                vals[o.name] = o
    return vals


def _fail(msg: str, node: ir.Node | None = None) -> MtcError:
    return node_error(msg, node, pass_name=_PASS)


def _not_a_cut(model: ir.Model, v: ir.Value, cuts: list[str]) -> MtcError:
    g = dataflow_graph(model)
    outs = {o.name for o in model.graph.outputs}
    msg = f"{_ARG} '{v.name}' {format_shape(v)} is not a cut point of the graph"
    if v.name in g and not (nx.descendants(g, v.name) & outs) and v.name not in outs:
        msg += ": it does not feed the graph outputs"
    else:
        anc = nx.ancestors(g, v.name) if v.name in g else set()
        desc = nx.descendants(g, v.name) if v.name in g else set()
        before = [c for c in cuts if c in anc]
        after = [c for c in cuts if c in desc]
        msg += (
            ": a path from the input to the outputs bypasses it (it lies inside a residual block or a "
            "parallel branch, so heads attached there would drop the skip path)"
        )
        near = [f"'{before[-1]}' before" if before else None, f"'{after[0]}' after" if after else None]
        near_s = " and ".join(x for x in near if x)
        if near_s:
            msg += f"; the nearest cut points are {near_s}"
    return _fail(msg, v.producer())


def _unknown(model: ir.Model, name: str, vals: dict[str, ir.Value]) -> MtcError:
    msg = f"{_ARG} '{name}': the graph has no tensor of that name"
    node = next((n for n in model.graph if n.name == name), None)
    if node is not None and node.outputs:
        msg += f" (node '{name}' outputs {', '.join(repr(o.name) for o in node.outputs)})"
    else:
        close = difflib.get_close_matches(name, list(vals), n=3)
        if close:
            msg += f" (did you mean {', '.join(repr(c) for c in close)}?)"
    return _fail(msg)


def find_feature(model: ir.Model, feature: str | None = None) -> ir.Value:
    """The tensor task heads attach to: ``feature`` if given and valid, else the default rule.

    Args:
        model: the backbone, with inferred shapes.
        feature: a tensor name (``--feature``); validated to exist, be an activation and be a cut
            point. Its rank is not checked here (global heads accept any ``(N, C, ...)`` tensor).

    Raises:
        MtcError: one line naming ``--feature`` and the tensor (or the node), or saying that no
            feature map can be found.
    """
    g = model.graph
    if not len(g.outputs):
        raise _fail("the graph has no outputs")
    cuts = branch_points(model, include_ends=True)
    if feature is not None:
        vals = _values(model)
        v = vals.get(feature)
        if v is None:
            raise _unknown(model, feature, vals)
        if v.is_initializer() or v.const_value is not None:
            raise _fail(f"{_ARG} '{feature}' is a constant (initializer), not an activation of the backbone")
        if v.producer() is None:
            raise _fail(f"{_ARG} '{feature}' is a graph input: there is no backbone before it")
        if feature not in cuts:
            raise _not_a_cut(model, v, cuts)
        return v
    vals = {o.name: o for n in g for o in n.outputs if o.name}
    reduced = is_reduced_map(model)
    for name in reversed(cuts):
        v = vals.get(name)
        if v is not None and _rank(v) == 4 and not reduced.get(name, False):
            return v
    maps = [o for n in g for o in n.outputs if _rank(o) == 4]
    if not maps:
        raise _fail(
            "cannot find the feature map: the backbone has no rank-4 (N, C, H, W) tensor; "
            f"pass {_ARG} TENSOR to name the tensor heads should read"
        )
    raise _fail(
        "cannot find the feature map: no rank-4 (N, C, H, W) tensor before the global pooling lies on "
        f"every path from the input to the outputs; pass {_ARG} TENSOR to name the tensor heads should read"
    )


@register_pass
class CutAtFeature(Pass):
    """Rewrites the backbone so that its feature map is the only output: the classifier is dropped.

    The feature is found by the rule in this module's docstring, or named by ``feature``
    (``--feature``). Everything that only served other outputs (pooling, classifier, auxiliary
    outputs) is removed with the initializers it read. The feature keeps its name, which is
    recorded in ``model.metadata_props["mtc.feature"]``; ``value.meta["mtc.feature"]`` holds its
    rank and whether it was given. A second run finds the same feature and changes nothing; on a
    graph that already has heads (``mtc.tasks`` recorded) the pass changes nothing if the feature is
    the recorded one and raises otherwise::

        before: x -> ... -> layer4/relu [N,512,7,7] -> GlobalAveragePool -> Flatten -> Gemm -> logits
        after:  x -> ... -> layer4/relu [N,512,7,7]          (graph output; mtc.feature=layer4/relu)

    Args:
        feature: name of the tensor to cut at (default: found by the rule).
    """

    name = _PASS
    options = ("feature",)

    def __init__(self, *, feature: str | None = None) -> None:
        super().__init__()
        if feature is not None and (not isinstance(feature, str) or not feature.strip()):
            raise MtcError(f"{_ARG}: expected a tensor name, got {feature!r}")
        self.feature = feature.strip() if feature is not None else None

    def _has_heads(self, model: ir.Model) -> bool:
        """True if heads are attached at the requested feature already; raise if at another one."""
        if _TASKS_KEY not in model.metadata_props:
            return False
        recorded = model.metadata_props.get(FEATURE_KEY)
        if recorded is not None and self.feature in (None, recorded) and recorded in _values(model):
            return True
        raise _fail(
            f"the graph already has task heads (metadata '{_TASKS_KEY}') on feature '{recorded}'"
            + (f", not on {_ARG} '{self.feature}'" if self.feature else "")
            + "; cut-at-feature runs on a backbone, before attach-heads"
        )

    def requires(self, model: ir.Model) -> None:
        if not self._has_heads(model):
            find_feature(model, self.feature)

    def call(self, model: ir.Model) -> PassResult:
        if self._has_heads(model):
            return PassResult(model, False)  # already cut, and the heads hang off the feature
        g = model.graph
        feat = find_feature(model, self.feature)
        modified = False
        if list(g.outputs) != [feat]:
            g.outputs.clear()
            g.outputs.append(feat)
            modified = True
        modified |= remove_dead(model)
        name = feat.name or ""  # named: canonicalize (or the import) names every value
        if model.metadata_props.get(FEATURE_KEY) != name:
            model.metadata_props[FEATURE_KEY] = name
            modified = True
        feat.meta[FEATURE_KEY] = {"rank": _rank(feat), "given": self.feature is not None}
        return PassResult(model, modified)
