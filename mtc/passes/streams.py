"""Building blocks of the passes that insert choice points: task streams, slices, copies, gates.

Every space's pass builds the same constructs of format 2 (docs/supergraph.md), so they are made
here once: :class:`Streams` forks the graph into stacked task streams (idempotent, so spaces
compose), slices a stacked tensor per task, makes ``CopyOf`` parameters, clones a subgraph onto a
new input with copied parameters, and creates ``Gate``, ``Mask`` and ``Width`` nodes with their
choice-point records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TypeGuard

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.names import ORIGIN_KEY, TASK_KEY, origin

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
#: Inputs of these ops that are running statistics (buffers), not trained weights.
_STATE_INPUTS = {"BatchNormalization": (3, 4)}


def param_tensor(v: ir.Value | None) -> ir.TensorProtocol | None:
    """The floating-point tensor ``v`` holds as an initializer, or None when it is no parameter."""
    if v is None or not v.is_initializer():
        return None
    t = v.const_value
    return t if t is not None and t.dtype in _FLOATS else None


def is_param(v: ir.Value | None) -> TypeGuard[ir.Value]:
    return param_tensor(v) is not None


def has_params(node: ir.Node) -> bool:
    return any((t := param_tensor(v)) is not None and len(t.shape) > 0 for v in node.inputs[1:])


def node_name(n: ir.Node) -> str:
    assert n.name is not None  # onnx_ir names every node a graph holds
    return n.name


def is_mtc(node: ir.Node, op: str | None = None) -> bool:
    return node.domain == sg.DOMAIN and (op is None or node.op_type == op)


class Streams:
    """Helpers bound to one graph and its task list (see the module docstring).

    Args:
        model: the model being rewritten; must carry ``mtc.tasks`` (run attach-heads first).
        pass_name: named in errors.
    """

    def __init__(self, model: ir.Model, *, pass_name: str) -> None:
        self.model = model
        self.g = model.graph
        self.tasks = sg.task_names(model)
        self.pass_name = pass_name
        if not self.tasks:
            raise MtcError("no tasks: run attach-heads first", pass_name=pass_name)
        self.slices: dict[tuple[int, str], ir.Value] = {}
        #: every node :meth:`finish` appended, in order (passes read what a step created)
        self.log: list[ir.Node] = []
        for n in self.g:
            if is_mtc(n, "TaskSlice") and n.inputs[0] is not None:
                self.slices[(id(n.inputs[0]), n.attributes["task"].as_string())] = n.outputs[0]

    # ------------------------------------------------------------------ streams
    def ensure_streams(self) -> None:
        """Fork the graph input into stacked task streams and give heads their task's slice.

        Idempotent: a graph that is already a supergraph keeps its Fork.
        """
        sg.mark_supergraph(self.model)
        if any(is_mtc(n, "Fork") for n in self.g):
            return
        if len(self.g.inputs) != 1:
            raise MtcError(f"expected one graph input, found {len(self.g.inputs)}", pass_name=self.pass_name)
        x = self.g.inputs[0]
        if x.shape is None or any(not isinstance(d, int) for d in list(x.shape)[1:]):
            raise MtcError(f"input '{x.name}' needs static non-batch dimensions", pass_name=self.pass_name)
        uses = list(x.uses())
        fork = ir.node("Fork", [x], domain=sg.DOMAIN, name="fork",
                       attributes={"tasks": ir.AttrStrings("tasks", self.tasks)})
        fork.outputs[0].name = f"{x.name}@fork"
        if x.dtype is not None:
            fork.outputs[0].dtype = x.dtype
        fork.outputs[0].shape = x.shape
        self.g.insert_before(next(iter(self.g)), fork)
        for user, idx in uses:
            user.replace_input_with(idx, fork.outputs[0])
        self._slice_heads()

    def _slice_heads(self) -> None:
        """Head nodes (``mtc.task``) read their task's slice of every stacked tensor they use."""
        for n in list(self.g):
            task = n.metadata_props.get(TASK_KEY)
            if task is None or n.domain == sg.DOMAIN:
                continue
            for i, v in enumerate(n.inputs):
                if v is None or v.is_initializer():
                    continue
                p = v.producer()
                if p is None or TASK_KEY in p.metadata_props or is_mtc(p, "TaskSlice") or is_mtc(p, "CopyOf"):
                    continue
                n.replace_input_with(i, self.slice(v, task))

    def slice(self, v: ir.Value, task: str) -> ir.Value:
        """``v[task]``: the task's stream of stacked tensor ``v`` (one TaskSlice node per pair)."""
        key = (id(v), task)
        if key not in self.slices:
            # Value names of slices use brackets: `@` names belong to task copies of nodes.
            n = ir.node("TaskSlice", [v], domain=sg.DOMAIN, name=f"{v.name}[{task}].slice",
                        attributes={"task": ir.AttrString("task", task),
                                    "index": ir.AttrInt64("index", self.tasks.index(task)),
                                    "tasks": ir.AttrInt64("tasks", len(self.tasks))})
            self.finish(n, f"{v.name}[{task}]", v)
            self.slices[key] = n.outputs[0]
        return self.slices[key]

    # ------------------------------------------------------------------ copies
    def copy_param(self, p: ir.Value, name: str, origin_: str | None, state: bool = False) -> ir.Value:
        """A ``CopyOf`` of parameter ``p`` named ``name`` (``buffer=1`` for running statistics)."""
        n = ir.node("CopyOf", [p], domain=sg.DOMAIN, name=f"{name}.copy",
                    attributes={"buffer": ir.AttrInt64("buffer", int(state))})
        if origin_:
            n.metadata_props[ORIGIN_KEY] = origin_
        t = param_tensor(p)
        assert t is not None  # callers copy only parameters (is_param)
        out = n.outputs[0]
        out.name = name
        if p.dtype is not None:
            out.dtype = p.dtype
        out.shape = ir.Shape(t.shape.numpy())  # a tensor's shape is always static
        self.g.append(n)
        return out

    def clone(self, nodes: Sequence[ir.Node], inputs: dict[int, ir.Value], suffix: str,
              task: str | None) -> tuple[dict[int, ir.Value], list[str]]:
        """Copies of ``nodes`` (in order) named ``<name>@<suffix>``, with CopyOf'd parameters.

        Args:
            nodes: the subgraph, topologically sorted.
            inputs: ``id(value) -> replacement`` for the values the copies read instead of the
                originals' inputs (the subgraph's input, typically a slice or the stacked tensor).
            suffix: the copy's suffix (a task name, ``copy1``, ``seg.shared``).
            task: the task owning the copies (tags them ``mtc.task``), or None for shared copies.

        Returns:
            ``id(original output) -> copy's output`` for every output, and the copies' names.
        """
        mapping = dict(inputs)
        names: list[str] = []
        for node in nodes:
            new_inputs: list[ir.Value | None] = []
            for i, v in enumerate(node.inputs):
                if v is None:
                    new_inputs.append(None)
                elif id(v) in mapping:
                    new_inputs.append(mapping[id(v)])
                elif i > 0 and is_param(v):
                    state = i in _STATE_INPUTS.get(node.op_type, ())
                    key = id(v)
                    copied = self.copy_param(v, f"{v.name}@{suffix}", origin(node), state)
                    mapping[key] = copied
                    new_inputs.append(copied)
                else:
                    new_inputs.append(v)
            c = ir.node(node.op_type, new_inputs, domain=node.domain, name=f"{node.name}@{suffix}",
                        attributes=dict(node.attributes), num_outputs=len(node.outputs))
            c.metadata_props.update(node.metadata_props)
            if task is not None:
                c.metadata_props[TASK_KEY] = task
            for o, co in zip(node.outputs, c.outputs, strict=True):
                co.name = f"{o.name}@{suffix}"
                if o.dtype is not None:
                    co.dtype = o.dtype
                co.shape = o.shape
                mapping[id(o)] = co
            self.g.append(c)
            names.append(node_name(c))
        return mapping, names

    # ------------------------------------------------------------------ choice nodes
    def gate(self, name: str, options: Sequence[str], values: Sequence[Sequence[ir.Value]], like: ir.Value,
             out_name: str, *, depth: int, logits: bool = True, origin_: str | None = None) -> ir.Node:
        """A ``Gate`` choosing per task among ``options``; ``values[k][i]`` is option k for task i.

        With ``logits``, a zero ``[T, K]`` initializer ``<name>.policy`` is its last input
        (Gumbel-softmax over zeros: AutoMTL's and BMTAS's initialisation).
        """
        T, K = len(self.tasks), len(options)
        if len(values) != K or any(len(v) != T for v in values):
            raise MtcError(f"gate '{name}': expected {K} options x {T} tasks of inputs", pass_name=self.pass_name)
        ins: list[ir.Value | None] = [v for per in values for v in per]
        if logits:
            ins.append(self.init(f"{name}.policy", np.zeros((T, K), np.float32)))
        gate = ir.node("Gate", ins, domain=sg.DOMAIN, name=f"{name}.gate",
                       attributes={"choice": ir.AttrString("choice", name),
                                   "tasks": ir.AttrStrings("tasks", self.tasks),
                                   "options": ir.AttrStrings("options", list(options)),
                                   "depth": ir.AttrInt64("depth", depth)})
        if origin_:
            gate.metadata_props[ORIGIN_KEY] = origin_
        self.finish(gate, out_name, like)
        return gate

    def uses_of(self, v: ir.Value) -> list[tuple[ir.Node, int]]:
        """``v``'s readers before a rewrite replaces it; its existing task slices (the heads') are
        forgotten, so the rewrite's own options get slices of their own."""
        for t in self.tasks:
            self.slices.pop((id(v), t), None)
        return list(v.uses())

    def redirect(self, old: ir.Value, new: ir.Value, uses: Iterable[tuple[ir.Node, int]], was_output: bool) -> None:
        """Point ``uses`` (taken with :meth:`uses_of`) and, if it was one, the graph output at ``new``."""
        for user, idx in uses:
            user.replace_input_with(idx, new)
            if is_mtc(user, "TaskSlice"):  # a head's slice now slices the choice's output
                self.slices[(id(new), user.attributes["task"].as_string())] = user.outputs[0]
        if was_output:
            outs = self.g.outputs
            outs[[i for i, v in enumerate(outs) if v is old][0]] = new

    def finish(self, n: ir.Node, out_name: str, like: ir.Value) -> None:
        """Name ``n``'s output, give it ``like``'s type and shape, and append ``n`` to the graph."""
        out = n.outputs[0]
        out.name = out_name
        if like.dtype is not None:
            out.dtype = like.dtype
        out.shape = like.shape
        self.g.append(n)
        self.log.append(n)

    def init(self, name: str, arr: np.ndarray) -> ir.Value:
        """A float32 initializer."""
        v = ir.Value(name=name, const_value=ir.tensor(arr.astype(np.float32), name=name))
        v.dtype = ir.DataType.FLOAT
        v.shape = ir.Shape(list(arr.shape))
        self.g.register_initializer(v)
        return v

    def const(self, name: str, arr: np.ndarray) -> ir.Value:
        """An integer constant shared by every task's copy of a node (created once)."""
        if name in self.g.initializers:
            return self.g.initializers[name]
        v = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
        v.dtype = ir.DataType.INT64
        v.shape = ir.Shape(list(arr.shape))
        self.g.register_initializer(v)
        return v


def subgraph_between(model: ir.Model, x: ir.Value, y: ir.Value) -> list[ir.Node]:
    """The nodes on paths from value ``x`` to value ``y`` (a block between two cut points), in order.

    Raises:
        MtcError: a node of the block reads an activation from outside it (then ``x`` is not a cut
            point that dominates ``y``).
    """
    producer = y.producer()
    if producer is None:
        raise MtcError(f"'{y.name}' is not computed by a node")
    back: set[int] = set()
    stack = [producer]
    while stack:
        n = stack.pop()
        if id(n) in back:
            continue
        back.add(id(n))
        for v in n.inputs:
            if v is None or v is x or v.is_initializer() or v.const_value is not None:
                continue
            p = v.producer()
            if p is not None:
                stack.append(p)
    nodes = [n for n in model.graph if id(n) in back]
    inside = {id(o) for n in nodes for o in n.outputs}
    for n in nodes:
        for v in n.inputs:
            if v is None or v is x or id(v) in inside or v.is_initializer() or v.const_value is not None:
                continue
            if v.producer() is None and v.is_graph_input():
                raise MtcError(f"the block from '{x.name}' to '{y.name}' reads the graph input '{v.name}' directly",
                               node=n.name, op=n.op_type)
            raise MtcError(f"the block from '{x.name}' to '{y.name}' reads '{v.name}' from outside it "
                           f"('{x.name}' is not a cut point before '{y.name}')", node=n.name, op=n.op_type)
    for n in nodes:
        for o in n.outputs:
            if o is y:
                continue
            for user, _ in o.uses():
                if id(user) not in back:
                    raise MtcError(f"'{o.name}' inside the block from '{x.name}' to '{y.name}' is read outside it",
                                   node=user.name, op=user.op_type)
            if o.is_graph_output():
                raise MtcError(f"'{o.name}' inside the block from '{x.name}' to '{y.name}' is a graph output")
    return nodes


def numel(t: ir.TensorProtocol) -> int:
    return math.prod(t.shape.numpy())
