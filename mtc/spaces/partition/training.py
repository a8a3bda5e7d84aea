"""The training form of a partition supergraph: what its kernels and controls run (torch-free).

The supergraph's ``ai.mtc::Mask`` nodes read a ones initializer; in the training form each becomes
``ai.mtc.partition::TaskMask`` whose forward mask ``m_f`` comes from the module's controls at run
time (so one lowered network evaluates any candidate P), with no initializer (so the network's
weights carry exactly the specialised form's IR names).

With backward masks ``m_b ⊆ m_f`` (Newell et al.: "any weights we wish to leave unchanged will have
their gradients zeroed out according to m_b"), a task's gradient must reach none of the weights that
make or read its channels outside ``m_b``, while activation gradients flow as usual. A shared
weight serves all task streams in one op, so the per-task parts of its gradient are separated by
evaluating it twice, once through ``StopGrad`` weights, and letting each stream take the value of
the evaluation whose weight gradient it may produce:

- producer ``y = P(x, W)``: ``Blend(P(x, W), P(x, sg(W)))`` takes, per task stream, the channels of
  ``m_b`` from the first and the others from the second (equal values, so the forward pass is
  unchanged);
- consumer ``C(z, W) = C(z ⊙ m_b, W) + C(z - z ⊙ m_b, sg(W))`` (C is linear in its input: Conv,
  ConvTranspose, Gemm, MatMul), bias once;
- a task's own BatchNorm copy and a head reading the site: their parameters become
  ``p ⊙ r + sg(p) ⊙ (1 - r)`` (``ParamMask``) with ``r`` the task's backward mask.

Weights a task does not update then get no gradient from it, so neither the gradient nor the
optimiser's moments (which only ever see gradients) hold anything of that task there.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.names import TASK_KEY
from mtc.passes.canonicalize import remove_dead
from mtc.passes.streams import is_mtc, node_name

DOMAIN = "ai.mtc.partition"
DOMAIN_VERSION = 1
#: ops whose output is linear in their first input (the consumer split needs it)
_LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _node(g: ir.Graph, name: str) -> ir.Node:
    for n in g:
        if n.name == name:
            return n
    raise MtcError(f"no node named '{name}' in the supergraph")


def _like(out: ir.Value, like: ir.Value, name: str) -> ir.Value:
    out.name = name
    if like.dtype is not None:
        out.dtype = like.dtype
    out.shape = like.shape
    return out


def _op(g: ir.Graph, op: str, inputs: list[ir.Value | None], name: str, like: ir.Value, before: ir.Node,
        **attrs: Any) -> ir.Value:
    """A node of this space's domain (or the default one for ``Sub``/``Add``) before ``before``."""
    domain = "" if op in ("Sub", "Add") else DOMAIN
    ir_attrs: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, str):
            ir_attrs[k] = ir.AttrString(k, v)
        else:
            ir_attrs[k] = ir.AttrInt64(k, int(v))
    n = ir.node(op, inputs, domain=domain, name=name, attributes=ir_attrs)
    g.insert_before(before, n)
    return _like(n.outputs[0], like, name)


def _stop(g: ir.Graph, v: ir.Value, before: ir.Node, cache: dict[str, ir.Value]) -> ir.Value:
    assert v.name is not None
    if v.name not in cache:
        n = ir.node("StopGrad", [v], domain=DOMAIN, name=f"{v.name}.sg")
        g.insert_before(before, n)
        cache[v.name] = _like(n.outputs[0], v, f"{v.name}.sg")
    return cache[v.name]


def _copy_node(g: ir.Graph, n: ir.Node, inputs: list[ir.Value | None], suffix: str) -> ir.Node:
    c = ir.node(n.op_type, inputs, domain=n.domain, name=f"{n.name}{suffix}", attributes=dict(n.attributes),
                num_outputs=len(n.outputs))
    c.metadata_props.update(n.metadata_props)
    for o, co in zip(n.outputs, c.outputs, strict=True):
        _like(co, o, f"{o.name}{suffix}")
    g.insert_after(n, c)
    return c


def _is_weight(v: ir.Value | None) -> bool:
    if v is None:
        return False
    p = v.producer()
    return v.is_initializer() or (p is not None and is_mtc(p, "CopyOf"))


def training_form(model: ir.Model, space: str, *, backward: bool) -> ir.Model:
    """A clone of ``model`` in the training form (module docstring).

    Args:
        space: the space whose masks are rewritten (``partition``).
        backward: also separate the per-task gradients of the weights around every site.

    Raises:
        MtcError: with ``backward``, a site without per-task BatchNorm copies where it has a
            BatchNorm, or a consumer that reads the site through other ops (naming it).
    """
    m = model.clone()
    g = m.graph
    tasks = sg.task_names(m)
    T = len(tasks)
    stops: dict[str, ir.Value] = {}
    for c in sg.choices_of(m, "mask"):
        if c.info.get("space") != space:
            continue
        mask = _node(g, c.node)
        x = mask.inputs[0]
        assert x is not None
        out = mask.outputs[0]
        tm = ir.node("TaskMask", [x], domain=DOMAIN, name=c.node,
                     attributes={"choice": ir.AttrString("choice", c.name), "tasks": ir.AttrInt64("tasks", T),
                                 "axis": ir.AttrInt64("axis", c.axis)})
        g.insert_before(mask, tm)
        mask.name = f"{c.node}.old"
        out.replace_all_uses_with(_like(tm.outputs[0], out, f"{c.output}"), replace_graph_outputs=True)
        out.name = f"{c.output}.old"
        g.remove(mask, safe=True)
        if backward:
            _separate(g, c, tm.outputs[0], tasks, stops)
    remove_dead(m)
    g.sort()
    m.opset_imports[DOMAIN] = DOMAIN_VERSION
    return m


def _separate(g: ir.Graph, c: sg.ChoicePoint, z: ir.Value, tasks: list[str], stops: dict[str, ir.Value]) -> None:
    T = len(tasks)
    info = c.info
    if info.get("batchnorms") and not info.get("norms"):
        raise MtcError(f"backward masks at site '{c.name}' need per-task BatchNorm copies of "
                       f"'{info['batchnorms'][0]}' (compile with --task-norm): a shared BatchNorm's parameters "
                       "serve every task in one op")
    # Producers: both evaluations, blended per stream.
    for pname in info.get("producers", []):
        p = _node(g, pname)
        y = p.outputs[0]
        uses = list(y.uses())
        p_ins: list[ir.Value | None] = [(_stop(g, v, p, stops) if i > 0 and v is not None and _is_weight(v) else v)
                                        for i, v in enumerate(p.inputs)]
        twin = _copy_node(g, p, p_ins, ".sg")
        blend = ir.node("Blend", [y, twin.outputs[0]], domain=DOMAIN, name=f"{pname}.blend",
                        attributes={"choice": ir.AttrString("choice", c.name), "tasks": ir.AttrInt64("tasks", T)})
        g.insert_after(twin, blend)
        _like(blend.outputs[0], y, f"{y.name}.blend")
        for user, idx in uses:
            user.replace_input_with(idx, blend.outputs[0])
    # The task's BatchNorm copies: parameter views.
    norms = info.get("norms", [])
    for bn in norms:
        for i, t in enumerate(tasks):
            n = _node(g, f"{bn}@{t}")
            for k in (1, 2):
                v = n.inputs[k]
                if v is None:
                    continue
                view = _op(g, "ParamMask", [v], f"{v.name}.bmask", v, n, choice=c.name, task=i, tasks=T, axis=0)
                n.replace_input_with(k, view)
    # Consumers: split reads by the backward mask.
    for cname in info.get("consumers", []):
        n = _node(g, cname)
        reads = [j for j, v in enumerate(n.inputs) if v is z]
        task = n.metadata_props.get(TASK_KEY)
        if task is not None and not reads:
            # A head reading the site (through pooling, Flatten): the head is the task's own, so its
            # weight's input channels get the task's backward mask as a parameter view.
            _head_view(g, n, c, tasks.index(task), T)
            continue
        if not reads or n.op_type not in _LINEAR or n.domain not in ("", "ai.onnx"):
            raise MtcError(f"backward masks need every consumer of site '{c.name}' to be a Conv, Gemm or MatMul "
                           f"reading it directly or a task's head; '{cname}' ({n.op_type}) is not")
        k = reads[0]
        zb = _op(g, "RowMask", [z], f"{cname}.zb", z, n, choice=c.name, tasks=T)
        zs = _op(g, "Sub", [z, zb], f"{cname}.zs", z, n)
        n.replace_input_with(k, zb)
        ins: list[ir.Value | None] = []
        for i, v in enumerate(n.inputs):
            if i == k:
                ins.append(zs)
            elif i > 0 and _is_weight(v):
                # The bias is added once, by the original node.
                bias = (n.op_type in ("Conv", "ConvTranspose") and i == 2) or (n.op_type == "Gemm" and i == 2)
                ins.append(None if bias else _stop(g, v, n, stops))  # type: ignore[arg-type]
            else:
                ins.append(v)
        while ins and ins[-1] is None:
            ins.pop()
        out = n.outputs[0]
        uses = list(out.uses())
        was_output = out.is_graph_output()
        twin = _copy_node(g, n, ins, ".sg")
        add = ir.node("Add", [out, twin.outputs[0]], name=f"{cname}.sum")
        g.insert_after(twin, add)
        _like(add.outputs[0], out, f"{out.name}.sum")
        for user, ui in uses:
            user.replace_input_with(ui, add.outputs[0])
        if was_output:
            outs = g.outputs
            outs[[i for i, v in enumerate(outs) if v is out][0]] = add.outputs[0]


def _head_view(g: ir.Graph, n: ir.Node, c: sg.ChoicePoint, task: int, T: int) -> None:
    if n.op_type == "Gemm":
        trans_b = n.attributes.get("transB")
        axis = 1 if trans_b is not None and trans_b.as_int() else 0
    elif n.op_type == "MatMul":
        axis = 0
    elif n.op_type in ("Conv",):
        axis = 1
    else:
        raise MtcError(f"backward masks cannot isolate the head node '{node_name(n)}' ({n.op_type}) reading site "
                       f"'{c.name}'")
    w = n.inputs[1]
    assert w is not None
    view = _op(g, "ParamMask", [w], f"{w.name}.bmask", w, n, choice=c.name, task=task, tasks=T, axis=axis)
    n.replace_input_with(1, view)
