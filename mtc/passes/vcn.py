"""The ``vcn`` pass: turn every operator with parameters into a virtual computation node (VCN).

AutoMTL (section 4): per task, each VCN offers the shared operator, a task-specific copy and a skip.
The graph is rewritten into the stacked-stream supergraph described in docs/supergraph.md::

    before:  x ─ conv3 ─ bn3 ─ y ─► ...                  (one stream)

    after:   input ─ Fork ─ ... x (stacked: one stream per task) ─ conv3 ─ bn3 ─ y.shared
             y.shared ─ TaskSlice(t) ──────────────────────────────────────┐ shared_t
             x ─ TaskSlice(t) ─ conv3@t ─ bn3@t  (weights CopyOf conv3's)   ├ specific_t   ─ Gate ─ y ─► ...
             x ─ TaskSlice(t) ─ conv3@t.skip  (Identity, 1x1 conv + BN, or select) ┘ skip_t        ▲ conv3.policy [T, 3]

A weighted operator (Conv, ConvTranspose, Gemm, MatMul with a weight initializer) and the
normalisation directly after it (BatchNormalization, LayerNormalization, InstanceNormalization)
form one unit that a task picks as a whole, so tasks that share stay on one stream and share
computation when deployed. ``per_task_norm=True`` reproduces AutoMTL instead: the shared option
runs the shared operator followed by the task's own copy of the normalisation, so every task's
stream diverges at the first normalisation (nothing stays shared at inference). A normalisation
with parameters that follows no weighted operator (DenseNet's pre-activation BN) is a VCN by itself.
Task heads (nodes tagged ``mtc.task``) read their task's slice of the feature.
"""

from __future__ import annotations

import math
from typing import TypeGuard

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.cost import node_cost
from mtc.ir.names import ORIGIN_KEY, origin
from mtc.ir.shapes import static_dims
from mtc.passes.base import Pass, PassResult
from mtc.passes.manager import register_pass
from mtc.tasks.heads import TASK_KEY

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
NORMS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization"}
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _param_tensor(v: ir.Value | None) -> ir.TensorProtocol | None:
    """The floating-point tensor ``v`` holds as an initializer, or None when it is no parameter."""
    if v is None or not v.is_initializer():
        return None
    t = v.const_value
    return t if t is not None and t.dtype in _FLOATS else None


def _is_param(v: ir.Value | None) -> TypeGuard[ir.Value]:
    return _param_tensor(v) is not None


def _has_params(node: ir.Node) -> bool:
    return any((t := _param_tensor(v)) is not None and len(t.shape) > 0 for v in node.inputs[1:])


def _node_name(n: ir.Node) -> str:
    assert n.name is not None  # onnx_ir names every node a graph holds
    return n.name


@register_pass
class Vcn(Pass):
    """Rewrite every parameterised operator into a VCN with shared / task-specific / skip options."""

    name = "vcn"
    options = ("per_task_norm", "seed")

    def __init__(self, *, per_task_norm: bool = False, seed: int = 0) -> None:
        self.per_task_norm = per_task_norm
        self.seed = seed

    def requires(self, model: ir.Model) -> None:
        if sg.is_supergraph(model):
            return
        if not sg.tasks_of(model):
            raise MtcError("no tasks: run attach-heads first", pass_name=self.name)
        if len(model.graph.inputs) != 1:
            raise MtcError(f"expected one graph input, found {len(model.graph.inputs)}", pass_name=self.name)
        x = model.graph.inputs[0]
        if x.shape is None or any(not isinstance(d, int) for d in list(x.shape)[1:]):
            raise MtcError(f"input '{x.name}' needs static non-batch dimensions", pass_name=self.name)

    def call(self, model: ir.Model) -> PassResult:
        if sg.is_supergraph(model):
            return PassResult(model, False)  # already compiled: nothing to rewrite
        self.g = model.graph
        self.tasks = [t.name for t in sg.tasks_of(model) or []]
        self.rng = np.random.default_rng(self.seed)
        self.slices: dict[tuple[int, str], ir.Value] = {}
        model.opset_imports[sg.DOMAIN] = sg.DOMAIN_VERSION

        backbone = [n for n in self.g if TASK_KEY not in n.metadata_props]
        self._fork()
        units = self._units(backbone)
        records = [self._rewrite(unit, depth) for depth, unit in enumerate(units, start=1)]
        self._slice_heads()
        self.g.sort()
        sg.set_vcns(model, records)
        model.metadata_props[sg.FORMAT_KEY] = sg.FORMAT
        model.metadata_props[sg.OPTIONS_KEY] = (
            f'{{"per_task_norm": {str(self.per_task_norm).lower()}, "vcn_seed": {self.seed}}}'
        )
        return PassResult(model, True)

    # ------------------------------------------------------------------ structure
    def _fork(self) -> None:
        x = self.g.inputs[0]
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

    def _units(self, backbone: list[ir.Node]) -> list[list[ir.Node]]:
        units: list[list[ir.Node]] = []
        absorbed: set[int] = set()
        for n in backbone:
            if id(n) in absorbed or n.domain not in ("", "ai.onnx") or not _has_params(n):
                continue
            data = n.inputs[0] if n.inputs else None
            if data is None or data.is_initializer() or data.const_value is not None:
                continue  # a weight-only computation, not a layer on activations
            unit = [n]
            out = n.outputs[0]
            if n.op_type in WEIGHTED and not out.is_graph_output():
                users = list(out.uses())
                if len(users) == 1 and users[0].node.op_type in NORMS and users[0].idx == 0 \
                        and TASK_KEY not in users[0].node.metadata_props:
                    unit.append(users[0].node)
                    absorbed.add(id(users[0].node))
            units.append(unit)
        return units

    def _slice(self, v: ir.Value, task: str) -> ir.Value:
        key = (id(v), task)
        if key not in self.slices:
            # Value names of slices use brackets: `@` names belong to task copies of nodes.
            n = ir.node("TaskSlice", [v], domain=sg.DOMAIN, name=f"{v.name}[{task}].slice",
                        attributes={"task": ir.AttrString("task", task),
                                    "index": ir.AttrInt64("index", self.tasks.index(task)),
                                    "tasks": ir.AttrInt64("tasks", len(self.tasks))})
            out = n.outputs[0]
            out.name = f"{v.name}[{task}]"
            if v.dtype is not None:
                out.dtype = v.dtype
            out.shape = v.shape
            self.g.append(n)
            self.slices[key] = out
        return self.slices[key]

    def _copy_param(self, p: ir.Value, name: str, origin_: str | None, state: bool = False) -> ir.Value:
        n = ir.node("CopyOf", [p], domain=sg.DOMAIN, name=f"{name}.copy",
                    attributes={"buffer": ir.AttrInt64("buffer", int(state))})
        if origin_:
            n.metadata_props[ORIGIN_KEY] = origin_
        t = _param_tensor(p)
        assert t is not None  # callers copy only parameters (_is_param)
        out = n.outputs[0]
        out.name = name
        if p.dtype is not None:
            out.dtype = p.dtype
        out.shape = ir.Shape(t.shape.numpy())  # a tensor's shape is always static
        self.g.append(n)
        return out

    def _clone(self, unit: list[ir.Node], x: ir.Value, suffix: str, task: str) -> tuple[ir.Value, list[str]]:
        """A copy of the unit's nodes on ``x`` with CopyOf'd parameters; returns output and names."""
        cur = x
        names: list[str] = []
        for node in unit:
            inputs: list[ir.Value | None] = [cur]
            for i, v in enumerate(node.inputs[1:], start=1):
                state = node.op_type == "BatchNormalization" and i in (3, 4)  # running statistics
                inputs.append(self._copy_param(v, f"{v.name}@{suffix}", origin(node), state) if _is_param(v) else v)
            c = ir.node(node.op_type, inputs, domain=node.domain, name=f"{node.name}@{suffix}",
                        attributes=dict(node.attributes), num_outputs=1)
            c.metadata_props.update(node.metadata_props)
            c.metadata_props[TASK_KEY] = task
            out = c.outputs[0]
            out.name = f"{node.outputs[0].name}@{suffix}"
            if node.outputs[0].dtype is not None:
                out.dtype = node.outputs[0].dtype
            out.shape = node.outputs[0].shape
            self.g.append(c)
            assert c.name is not None  # the graph keeps the name given above
            names.append(c.name)
            cur = out
        return cur, names

    # ------------------------------------------------------------------ the rewrite
    def _rewrite(self, unit: list[ir.Node], depth: int) -> sg.VcnRecord:
        head, last = unit[0], unit[-1]
        x, y = head.inputs[0], last.outputs[0]
        assert x is not None  # _units only takes nodes whose first input is an activation
        name = head.name
        assert name is not None  # onnx_ir names every node a graph holds
        params = sum(node_cost(n).params for n in unit)
        macs = sum(node_cost(n).macs for n in unit)
        uses = list(y.uses())
        was_output = y.is_graph_output()
        y_name = y.name
        assert x.name is not None and y_name is not None  # onnx_ir names every value a graph holds

        norm_shared = self.per_task_norm and len(unit) > 1
        shared, specific, skips = [], [], []
        copies: dict[str, list[str]] = {}
        skip_kind, skip_params, skip_macs = "identity", 0, 0
        for t in self.tasks:
            spec, names = self._clone(unit, self._slice(x, t), t, t)
            specific.append(spec)
            copies.setdefault(t, []).extend(names)
            sk, skip_kind, skip_params, skip_macs = self._skip(x, y, self._slice(x, t), name, t, head)
            skips.append(sk)
        # The unit's own output now feeds only the gate's shared option.
        y.name = f"{y_name}.shared"
        for t in self.tasks:
            if norm_shared:
                # AutoMTL: the shared operator, then this task's own normalisation.
                s_out, s_names = self._clone(unit[1:], self._slice(unit[0].outputs[0], t), f"{t}.shared", t)
                shared.append(s_out)
                copies[t].extend(s_names)
            else:
                shared.append(self._slice(y, t))

        policy_name = f"{name}.policy"
        policy = ir.Value(name=policy_name, const_value=ir.tensor(np.zeros((len(self.tasks), 3), np.float32),
                                                                  name=policy_name))
        policy.dtype = ir.DataType.FLOAT
        policy.shape = ir.Shape([len(self.tasks), 3])
        self.g.register_initializer(policy)
        gate = ir.node("Gate", [*shared, *specific, *skips, policy], domain=sg.DOMAIN, name=f"{name}.gate",
                       attributes={"vcn": ir.AttrString("vcn", name),
                                   "tasks": ir.AttrStrings("tasks", self.tasks),
                                   "depth": ir.AttrInt64("depth", depth)})
        head_origin = origin(head)
        if head_origin:
            gate.metadata_props[ORIGIN_KEY] = head_origin
        self._finish(gate, y_name, y)
        out = gate.outputs[0]
        assert gate.name is not None  # the graph keeps the name given above
        for user, idx in uses:
            user.replace_input_with(idx, out)
        if was_output:
            outs = self.g.outputs
            outs[[i for i, v in enumerate(outs) if v is y][0]] = out
        if norm_shared:
            # The shared normalisation is replaced by the per-task copies above.
            for n in reversed(unit[1:]):
                self.g.remove(n, safe=True)
        return sg.VcnRecord(
            name=name, depth=depth, nodes=[_node_name(n) for n in unit], input=x.name, output=y_name,
            gate=gate.name, policy=policy_name, skip=skip_kind, params=params, macs=macs,
            skip_params=skip_params, skip_macs=skip_macs, copies=copies,
        )

    def _skip(self, x: ir.Value, y: ir.Value, xt: ir.Value, name: str, task: str,
              head: ir.Node) -> tuple[ir.Value, str, int, int]:
        """The skip option, always cheaper than the unit it replaces (AutoMTL: a task skips an
        operator "for improved model efficiency").

        - ``identity`` when input and output shapes agree;
        - ``downsample`` for a Conv with a kernel larger than 1x1: a strided 1x1 Conv with the
          unit's ``group`` + BatchNormalization (a depthwise unit gets a depthwise skip);
        - ``select`` otherwise (1x1 Convs, Gemm/MatMul): no parameters and no MACs; the spatial
          stride is a strided ``Slice`` (the samples a strided 1x1 Conv would read) and channel
          ``c`` of the output is input channel ``c mod C_in`` (a ``Gather``), so fewer channels
          keep the first ones and more channels repeat them.
        """
        xs, ys = static_dims(x), static_dims(y)
        base = f"{name}@{task}.skip"
        meta = {ORIGIN_KEY: origin(head) or name, TASK_KEY: task}
        where = dict(pass_name=self.name, node=head.name, op=head.op_type, origin=origin(head))
        if xs is None or ys is None:
            raise MtcError(f"the skip option needs static shapes, got {x.name}={xs} and {y.name}={ys}", **where)
        if xs == ys:
            n = ir.node("Identity", [xt], name=base)
            n.metadata_props.update(meta)
            self._finish(n, base, y)
            return n.outputs[0], "identity", 0, 0
        if len(xs) != len(ys) or len(xs) not in (2, 4):
            raise MtcError(f"no skip for a unit from {list(xs)} to {list(ys)}", **where)
        strides = []
        for a, b_ in zip(xs[2:], ys[2:], strict=True):
            s = next((s for s in range(1, a + 1) if (a - 1) // s + 1 == b_), None)
            if s is None:
                raise MtcError(f"the skip cannot map {list(xs)} to {list(ys)} by striding "
                               "(upsampling units have no skip yet)", **where)
            strides.append(s)
        cin, cout = xs[1], ys[1]
        w = head.inputs[1] if head.op_type == "Conv" and len(head.inputs) > 1 else None
        kernel = math.prod(w.shape.numpy()[2:]) if w is not None and w.shape is not None else 1
        if kernel > 1 and len(xs) == 4:
            return self._conv_skip(xt, y, base, meta, head, cin, cout, strides, ys)
        cur = xt
        if any(s > 1 for s in strides):
            k = len(strides)
            ins = [cur] + [self._const(f"{name}.skip.{what}", np.array(v, np.int64))
                           for what, v in (("starts", [0] * k), ("ends", list(xs[2:])),
                                           ("axes", list(range(2, 2 + k))), ("steps", strides))]
            n = ir.node("Slice", ins, name=f"{base}.stride" if cin != cout else base)
            n.metadata_props.update(meta)
            self._finish(n, n.name or base, y)
            n.outputs[0].shape = ir.Shape([y.shape[0] if y.shape is not None else xs[0], cin, *ys[2:]])
            cur = n.outputs[0]
        if cin != cout:
            idx = self._const(f"{name}.skip.channels", np.arange(cout, dtype=np.int64) % cin)
            n = ir.node("Gather", [cur, idx], name=base, attributes={"axis": ir.AttrInt64("axis", 1)})
            n.metadata_props.update(meta)
            self._finish(n, base, y)
            cur = n.outputs[0]
        return cur, "select", 0, 0

    def _conv_skip(self, xt: ir.Value, y: ir.Value, base: str, meta: dict[str, str], head: ir.Node,
                   cin: int, cout: int, strides: list[int], ys: tuple[int, ...]) -> tuple[ir.Value, str, int, int]:
        group = head.attributes["group"].as_int() if "group" in head.attributes else 1
        w = self._init(f"{base}.weight", self._kaiming((cout, cin // group, 1, 1), cout))
        conv = ir.node("Conv", [xt, w], name=base,
                       attributes={"strides": ir.AttrInt64s("strides", strides),
                                   "kernel_shape": ir.AttrInt64s("kernel_shape", [1, 1]),
                                   "group": ir.AttrInt64("group", group)})
        conv.metadata_props.update(meta)
        self._finish(conv, base + ".conv", y)
        bn_in = [conv.outputs[0]] + [
            self._init(f"{base}.bn.{k}", np.full(cout, v, np.float32))
            for k, v in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))
        ]
        bn = ir.node("BatchNormalization", bn_in, name=f"{base}.bn")
        bn.metadata_props.update(meta)
        self._finish(bn, base, y)
        macs = math.prod(ys[1:]) * (cin // group)
        return bn.outputs[0], "downsample", cout * (cin // group) + 2 * cout, macs

    def _finish(self, n: ir.Node, out_name: str, like: ir.Value) -> None:
        out = n.outputs[0]
        out.name = out_name
        if like.dtype is not None:
            out.dtype = like.dtype
        out.shape = like.shape
        self.g.append(n)

    def _init(self, name: str, arr: np.ndarray) -> ir.Value:
        v = ir.Value(name=name, const_value=ir.tensor(arr.astype(np.float32), name=name))
        v.dtype = ir.DataType.FLOAT
        v.shape = ir.Shape(list(arr.shape))
        self.g.register_initializer(v)
        return v

    def _const(self, name: str, arr: np.ndarray) -> ir.Value:
        """An integer constant shared by every task's copy of a node (created once)."""
        if name in self.g.initializers:
            return self.g.initializers[name]
        v = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
        v.dtype = ir.DataType.INT64
        v.shape = ir.Shape(list(arr.shape))
        self.g.register_initializer(v)
        return v

    def _kaiming(self, shape: tuple[int, ...], fan: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan)).astype(np.float32)

    def _slice_heads(self) -> None:
        for n in list(self.g):
            task = n.metadata_props.get(TASK_KEY)
            if task is None or n.domain == sg.DOMAIN:
                continue
            for i, v in enumerate(n.inputs):
                if v is None:
                    continue
                p = v.producer()
                if p is None:
                    continue
                if TASK_KEY in p.metadata_props or (p.domain == sg.DOMAIN and p.op_type in ("TaskSlice", "CopyOf")):
                    continue
                if v.is_initializer():
                    continue
                n.replace_input_with(i, self._slice(v, task))
