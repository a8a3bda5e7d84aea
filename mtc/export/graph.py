"""Deployable graphs from a supergraph, a plan and trained weights.

The chain, all on clones (the input model is never mutated)::

    supergraph ─ specialize(plan) ─ trained weights by IR name, CopyOf → initializers  (bind)
               ─ one tensor per group of identical streams, plain ONNX            (ungroup)
               ─ all task outputs: fused graph │ one task output + dead code: task graph

``specialize`` leaves stacked tensors holding one block of rows per group of tasks with identical
streams. :func:`ungroup` turns each such tensor into a list of group tensors: an ordinary op on a
G-group tensor becomes G nodes (one per group, each computed once), ``Regroup`` picks group
tensors, and the ``Concat`` that replaced a ``Gate`` becomes the concatenation of its inputs'
lists. A task graph is the fused graph restricted to one output: exactly the chain of groups the
task belongs to, i.e. only what that task executes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.opset import TARGET_OPSET
from mtc.ir.plan import Plan
from mtc.lower.module import GraphModule
from mtc.passes.canonicalize import remove_dead
from mtc.spaces import bind_plan

EXPORT_KEY = "mtc.export"
# Temporary marker on the per-group clones: the node name they were cloned from.
_BASE = "mtc.export.base"
_DROP_METADATA = (sg.FORMAT_KEY, sg.CHOICES_KEY, sg.SPACE_KEY)


def fixed_module(model: ir.Model, plan: Any, weights: Mapping[str, torch.Tensor] | GraphModule | None = None, *,
                 source: str | None = None) -> GraphModule:
    """The lowering of ``plan``'s network with ``weights`` loaded, in eval mode: what every exported
    file is verified against.

    Args:
        model: the supergraph (not modified).
        plan: a plan (or a space's view of one, with ``to_plan()``).
        weights: tensors by IR name (a trained run's ``module/`` tensors), the plan's lowered module
            itself (returned as is, in eval mode), or None for the supergraph's initial weights.
        source: the file the weights came from, named in errors.

    Raises:
        MtcError: the plan does not match, or the weights do not fit the plan's network.
    """
    from mtc.lower.module import lower

    p = as_plan(plan)
    p.validate(model)
    if isinstance(weights, GraphModule):
        return weights.eval()
    module = lower(bind_plan(model, p), owned=True)
    if weights is not None:
        module.load_ir_state(dict(weights), source=source)
    return module.eval()


def as_plan(plan: Any) -> Plan:
    """A :class:`Plan`, from itself or a space's view of one (``to_plan()``)."""
    return plan.to_plan() if hasattr(plan, "to_plan") else plan


def bind(model: ir.Model, plan: Any, weights: Mapping[str, torch.Tensor] | GraphModule | None = None, *,
         source: str | None = None) -> ir.Model:
    """The specialised graph of ``plan`` with ``weights`` bound as initializers (no lowering).

    Every ``CopyOf`` becomes an initializer named like its output (``conv1.weight@seg``) holding the
    copy's trained tensor (or its source's, without weights); every other weight is replaced by
    the tensor of the same IR name.

    Raises:
        MtcError: the weights lack a tensor the network needs, have one it does not know, or one
            of the wrong shape (naming it and ``source``).
    """
    m = bind_plan(model, as_plan(plan))
    g = m.graph
    if isinstance(weights, GraphModule):
        weights = weights.ir_state()
    state = dict(weights) if weights is not None else None
    used: set[str] = set()

    def tensor_of(name: str, like: ir.TensorProtocol | None, shape: tuple[int, ...]) -> ir.TensorProtocol:
        assert state is not None
        if name not in state:
            raise MtcError(f"the weights do not fit the plan's network: they lack '{name}'", file=source)
        t = state[name]
        if tuple(t.shape) != tuple(shape):
            raise MtcError(f"the weights do not fit the plan's network: '{name}' has shape {tuple(t.shape)}, "
                           f"expected {tuple(shape)}", file=source)
        used.add(name)
        arr = t.detach().cpu().numpy()
        if like is not None:
            arr = arr.astype(like.dtype.numpy(), copy=False)
        return ir.tensor(arr, name=name)

    for node in list(g):
        if node.domain != sg.DOMAIN or node.op_type != "CopyOf":
            continue
        out = node.outputs[0]
        name = out.name
        assert name is not None  # the passes name every copy
        src = node.inputs[0]
        assert src is not None and src.const_value is not None  # a copy of an initializer
        tensor = (tensor_of(name, src.const_value, tuple(src.const_value.shape.numpy())) if state is not None
                  else ir.tensor(np.array(src.const_value.numpy(), copy=True), name=name))
        init = ir.Value(name=None, type=out.type, shape=ir.Shape(tensor.shape.numpy()), const_value=tensor)
        out.name = None
        init.name = name
        g.register_initializer(init)
        out.replace_all_uses_with(init, replace_graph_outputs=True)
        g.remove(node, safe=True)
    remove_dead(m)
    if state is not None:
        for name, v in g.initializers.items():
            if name in state and name not in used and v.const_value is not None:
                v.const_value = tensor_of(name, v.const_value, tuple(v.const_value.shape.numpy()))
        extra = sorted(set(state) - used)
        if extra:
            raise MtcError(f"the weights do not fit the plan's network: they have unknown '{extra[0]}' "
                           f"({len(extra)} unknown)", file=source)
    return m


def ungroup(spec: ir.Model) -> ir.Model:
    """Rewrite a specialised graph's stacked tensors into one tensor per group (on a clone).

    Args:
        spec: the output of :func:`bind` (a specialised, weight-bound graph).

    Returns:
        plain ONNX computing every task output, each operator once per group of identical streams.
        Per-group clones carry a temporary ``mtc.export.base`` marker (see :func:`finish`).
    """
    model = spec.clone()
    g = model.graph
    if len(g.inputs) != 1:
        raise MtcError(f"export expects a supergraph with one input, this one has {len(g.inputs)}")
    parts: dict[ir.Value, list[ir.Value]] = {g.inputs[0]: [g.inputs[0]]}
    for node in list(g):
        stacked = [v for v in node.inputs if v is not None and v in parts]
        if not stacked:
            continue
        if node.domain == sg.DOMAIN:
            if node.op_type != "Regroup":
                raise MtcError("unexpected ai.mtc node after specialize", node=node.name, op=node.op_type)
            src = parts[stacked[0]]
            index = [int(i) for i in node.attributes["index"].as_ints()]
            if len(src) != node.attributes["groups"].as_int():
                raise MtcError(f"Regroup expects {node.attributes['groups'].as_int()} groups, its input has "
                               f"{len(src)}", node=node.name, op="Regroup")
            parts[node.outputs[0]] = [src[i] for i in index]
            continue
        if node.op_type == "Concat" and sg.MERGE_KEY in node.metadata_props:
            parts[node.outputs[0]] = [p for v in node.inputs if v is not None for p in parts[v]]
            continue
        counts = {len(parts[v]) for v in stacked}
        if len(counts) != 1:
            raise MtcError(f"inputs hold different numbers of stream groups ({sorted(counts)})",
                           node=node.name, op=node.op_type)
        n_groups = counts.pop()
        if n_groups == 1:
            for i, v in enumerate(node.inputs):
                if v is not None and v in parts:
                    node.replace_input_with(i, parts[v][0])
            for out in node.outputs:
                parts[out] = [out]
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise MtcError("cannot split a node with subgraphs into stream groups", node=node.name, op=node.op_type)
        clones = []
        for k in range(n_groups):
            ins = [parts[v][k] if v is not None and v in parts else v for v in node.inputs]
            meta = dict(node.metadata_props)
            meta[_BASE] = node.name or ""
            c = ir.Node(node.domain, node.op_type, ins, list(node.attributes.values()), overload=node.overload,
                        num_outputs=len(node.outputs), version=node.version, name=f"{node.name}#{k}",
                        metadata_props=meta)
            for o, co in zip(node.outputs, c.outputs, strict=True):
                co.name = f"{o.name}#{k}"
                if o.dtype is not None:
                    co.dtype = o.dtype
            clones.append(c)
        g.insert_before(node, clones)
        for j, out in enumerate(node.outputs):
            parts[out] = [c.outputs[j] for c in clones]
    for i, out in enumerate(list(g.outputs)):
        if out in parts and parts[out][0] is not out:
            if len(parts[out]) != 1:
                raise MtcError(f"output '{out.name}' holds {len(parts[out])} stream groups, expected one")
            new = parts[out][0]
            if new.is_graph_output() or new.is_graph_input():
                ident = ir.node("Identity", [new], name=f"{out.name}.output")
                g.append(ident)
                new = ident.outputs[0]
            name = out.name
            out.name = None
            new.name = name
            if out.dtype is not None:
                new.dtype = out.dtype
            new.shape = out.shape
            g.outputs[i] = new
    remove_dead(model)
    return model


def restrict(grouped: ir.Model, tasks: list[str]) -> ir.Model:
    """A clone of an ungrouped graph computing only ``tasks``' outputs (in that order)."""
    model = grouped.clone()
    g = model.graph
    by_name = {o.name: o for o in g.outputs}
    missing = [t for t in tasks if t not in by_name]
    if missing:
        raise MtcError(f"task '{missing[0]}' is not an output of the graph ({', '.join(map(str, by_name))})")
    g.outputs.clear()
    g.outputs.extend(by_name[t] for t in tasks)
    remove_dead(model)
    return model


def _downstream_tasks(g: ir.Graph) -> dict[ir.Node, set[str]]:
    out: dict[ir.Node, set[str]] = {}
    for node in reversed(list(g)):
        s: set[str] = set()
        for o in node.outputs:
            if o.is_graph_output():
                s.add(str(o.name))
            for user, _ in o.uses():
                s |= out.get(user, set())
        out[node] = s
    return out


def _rename_groups(model: ir.Model, order: list[str]) -> None:
    """Give per-group clones readable names: the original name when one clone is left (a task
    graph), else ``name[seg+depth]`` after the tasks that read it."""
    g = model.graph
    by_base: dict[str, list[ir.Node]] = {}
    for node in g:
        base = node.metadata_props.get(_BASE)
        if base is not None:
            by_base.setdefault(base, []).append(node)
    tasks = _downstream_tasks(g)
    for base, nodes in by_base.items():
        for node in nodes:
            k = str(node.name).rpartition("#")[2]
            suffix = "" if len(nodes) == 1 else "[" + "+".join(t for t in order if t in tasks[node]) + "]"
            node.name = base + suffix
            for o in node.outputs:
                if not o.is_graph_output() and o.name is not None and o.name.endswith(f"#{k}"):
                    o.name = o.name[: -len(f"#{k}")] + suffix
            del node.metadata_props[_BASE]


def inference_batchnorm(model: ir.Model) -> bool:
    """BatchNormalization nodes in inference form: ``training_mode`` off, one output."""
    changed = False
    for node in model.graph:
        if node.op_type != "BatchNormalization" or node.domain != "":
            continue
        tm = node.attributes.get("training_mode")
        if tm is not None and tm.as_int():
            if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
                raise MtcError("a BatchNormalization in training mode whose running statistics are read",
                               node=node.name, op=node.op_type)
            node.attributes.pop("training_mode")
            changed = True
        if "training_mode" in node.attributes:
            node.attributes.pop("training_mode")
        if len(node.outputs) > 1:
            new = ir.Node("", "BatchNormalization", list(node.inputs), list(node.attributes.values()),
                          name=node.name, metadata_props=dict(node.metadata_props))
            out = node.outputs[0]
            name = out.name
            if out.dtype is not None:
                new.outputs[0].dtype = out.dtype
            new.outputs[0].shape = out.shape
            model.graph.insert_before(node, new)
            out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
            out.name = None
            new.outputs[0].name = name
            model.graph.remove(node, safe=True)
            changed = True
    return changed


def fold_batchnorm(model: ir.Model) -> int:
    """Fold every inference BatchNormalization that follows a Conv (its only reader) into the Conv.

    ``W' = W * s / sqrt(v + eps)`` per output channel, ``b' = (b - m) * s / sqrt(v + eps) + beta``:
    exact in eval mode. Convs sharing one weight and BN (a shared unit cloned per group) share the
    folded initializers. Returns the number of folds.
    """
    g = model.graph
    cache: dict[tuple[int, ...], tuple[ir.Value, ir.Value]] = {}
    folds = 0
    for bn in list(g):
        if bn.op_type != "BatchNormalization" or bn.domain != "" or len(bn.outputs) != 1:
            continue
        x = bn.inputs[0]
        conv = x.producer() if x is not None else None
        if conv is None or conv.op_type != "Conv" or conv.domain != "" or x is None:
            continue
        if len(x.uses()) != 1 or x.is_graph_output():
            continue
        params = [conv.inputs[1], conv.inputs[2] if len(conv.inputs) > 2 else None, *bn.inputs[1:5]]
        if any(p is not None and p.const_value is None for p in params) or params[0] is None \
                or any(p is None for p in params[2:]):
            continue
        key = tuple(id(p) for p in params)
        if key not in cache:
            w = params[0].const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
            b = (params[1].const_value.numpy().astype(np.float64) if params[1] is not None  # type: ignore[union-attr]
                 else np.zeros(w.shape[0]))
            s, beta, m, v = (p.const_value.numpy().astype(np.float64) for p in params[2:])  # type: ignore[union-attr]
            eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
            k = s / np.sqrt(v + eps)
            dtype = params[0].const_value.dtype.numpy()  # type: ignore[union-attr]
            wf = (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(dtype)
            bf = ((b - m) * k + beta).astype(dtype)
            base = str(params[0].name)
            vals = []
            for suffix, arr in ((".folded", wf), (".folded_bias", bf)):
                name = base + suffix
                val = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT)
                               if dtype == np.float32 else None, const_value=ir.tensor(arr, name=name))
                g.register_initializer(val)
                vals.append(val)
            cache[key] = (vals[0], vals[1])
        wv, bv = cache[key]
        conv.replace_input_with(1, wv)
        if len(conv.inputs) > 2:
            conv.replace_input_with(2, bv)
        else:
            conv.resize_inputs(3)
            conv.replace_input_with(2, bv)
        out = bn.outputs[0]
        bn_name = out.name
        out.replace_all_uses_with(x, replace_graph_outputs=True)
        g.remove(bn, safe=True)
        out.name = None
        if bn_name is not None:
            x.name = bn_name
        folds += 1
    remove_dead(model)
    return folds


def finish(model: ir.Model, *, order: list[str], fold_bn: bool = False, resize_matmul: bool = False,
           slim: bool = True, info: dict[str, Any] | None = None) -> ir.Model:
    """Names, BN form, opsets, shapes and metadata of an exported graph, then ``onnx.checker``.

    ``slim`` removes the channels that bound masks and widths zero (:mod:`mtc.export.slim`);
    ``fold_bn`` folds BatchNormalization into Convs; ``resize_matmul`` rewrites linear Resize as
    MatMuls (:mod:`mtc.export.resize`). All are exact.
    """
    from mtc.export.resize import resize_as_matmul
    from mtc.export.slim import slim as slim_masks
    from mtc.ir.shapes import infer_shapes

    g = model.graph
    _rename_groups(model, order)
    inference_batchnorm(model)
    bad = [n for n in g if n.domain == sg.DOMAIN]
    if bad:
        raise MtcError("an ai.mtc node is left in the exported graph", node=bad[0].name, op=bad[0].op_type)
    model.opset_imports.pop(sg.DOMAIN, None)
    if model.opset_imports.get("", TARGET_OPSET) < 17:
        raise MtcError(f"the supergraph uses opset {model.opset_imports['']}, export needs 17 or newer")
    model.opset_imports.setdefault("", TARGET_OPSET)
    for key in _DROP_METADATA:
        model.metadata_props.pop(key, None)
    # Stacked shapes (T·N rows) are stale in a per-group graph: infer them again.
    outs = {o: (o.dtype, o.shape) for o in g.outputs}
    for node in g:
        for o in node.outputs:
            if o not in outs:
                o.shape = None
    for o in g.outputs:
        o.shape = None
    infer_shapes(model)
    for o, (dt, shape) in outs.items():
        if o.shape is None:
            o.shape = shape
        if o.dtype is None and dt is not None:
            o.dtype = dt
    slimmed: dict[str, Any] = {}
    if slim:
        model, slimmed = slim_masks(model)
        g = model.graph
    if fold_bn:
        fold_batchnorm(model)
    if resize_matmul:
        resize_as_matmul(model)  # after inference: it needs the input shapes
    if info is not None:
        if slimmed.get("removed"):
            info = {**info, "slimmed": slimmed}
        model.metadata_props[EXPORT_KEY] = json.dumps(info, separators=(",", ":"))
    check(model)
    return model


def proto_fits(model: ir.Model) -> bool:
    """Whether ``model`` fits one protobuf (else it is saved with external data, checked by path)."""
    from mtc.ir.io import EXTERNAL_DATA_THRESHOLD

    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None) <= EXTERNAL_DATA_THRESHOLD


def check(model: ir.Model) -> None:
    """``onnx.checker`` (full check) on ``model``, as an MtcError naming the problem.

    Models above the protobuf limit are checked after saving, by path (see ``api.write_verified``).
    """
    if not proto_fits(model):
        return
    try:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MtcError(f"the exported graph fails onnx.checker: {msg}") from None
