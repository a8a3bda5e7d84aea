"""The ``vcn`` pass of the AutoMTL space: every operator with parameters becomes a virtual computation
node (VCN), an op choice of format 2 with the options ``shared``, ``specific`` and ``skip``.

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
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.cost import node_cost
from mtc.ir.names import ORIGIN_KEY, TASK_KEY, origin
from mtc.ir.shapes import static_dims
from mtc.passes.base import Pass, PassResult
from mtc.passes.manager import register_pass
from mtc.passes.streams import Streams, has_params, node_name

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
NORMS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization"}
#: the three options of a VCN, in the order of the policy logits (AutoMTL: P = 0, 1, 2)
OPTIONS = ("shared", "specific", "skip")
SPACE = "automtl"
SPACE_VERSION = 1


@register_pass
class Vcn(Pass):
    """Rewrite every parameterised operator into a VCN with shared / task-specific / skip options."""

    name = "vcn"
    options = ("per_task_norm", "seed")

    def __init__(self, *, per_task_norm: bool = False, seed: int = 0) -> None:
        self.per_task_norm = per_task_norm
        self.seed = seed

    def requires(self, model: ir.Model) -> None:
        if any(c.kind == "op" and c.info.get("space") == SPACE for c in sg.choices_of(model)):
            return
        if not sg.task_names(model):
            raise MtcError("no tasks: run attach-heads first", pass_name=self.name)
        if len(model.graph.inputs) != 1:
            raise MtcError(f"expected one graph input, found {len(model.graph.inputs)}", pass_name=self.name)
        x = model.graph.inputs[0]
        if x.shape is None or any(not isinstance(d, int) for d in list(x.shape)[1:]):
            raise MtcError(f"input '{x.name}' needs static non-batch dimensions", pass_name=self.name)

    def call(self, model: ir.Model) -> PassResult:
        if any(c.kind == "op" and c.info.get("space") == SPACE for c in sg.choices_of(model)):
            return PassResult(model, False)  # already compiled: nothing to rewrite
        self.g = model.graph
        self.s = Streams(model, pass_name=self.name)
        self.tasks = self.s.tasks
        self.rng = np.random.default_rng(self.seed)

        backbone = [n for n in self.g if TASK_KEY not in n.metadata_props and n.domain not in (sg.DOMAIN,)]
        self.s.ensure_streams()
        units = self._units(backbone)
        records = [self._rewrite(unit, depth) for depth, unit in enumerate(units, start=1)]
        self.g.sort()
        sg.add_choices(model, records)
        sg.set_space(model, SPACE, SPACE_VERSION, {"per_task_norm": self.per_task_norm, "vcn_seed": self.seed})
        return PassResult(model, True)

    # ------------------------------------------------------------------ structure
    def _units(self, backbone: list[ir.Node]) -> list[list[ir.Node]]:
        units: list[list[ir.Node]] = []
        absorbed: set[int] = set()
        for n in backbone:
            if id(n) in absorbed or n.domain not in ("", "ai.onnx") or not has_params(n):
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

    def _clone(self, unit: list[ir.Node], x: ir.Value, suffix: str, task: str) -> tuple[ir.Value, list[str]]:
        """A copy of the unit's nodes on ``x`` with CopyOf'd parameters; returns output and names."""
        head = unit[0]
        assert head.inputs[0] is not None
        mapping, names = self.s.clone(unit, {id(head.inputs[0]): x}, suffix, task)
        return mapping[id(unit[-1].outputs[0])], names

    # ------------------------------------------------------------------ the rewrite
    def _rewrite(self, unit: list[ir.Node], depth: int) -> sg.ChoicePoint:
        head, last = unit[0], unit[-1]
        x, y = head.inputs[0], last.outputs[0]
        assert x is not None  # _units only takes nodes whose first input is an activation
        name = node_name(head)
        params = sum(node_cost(n).params for n in unit)
        macs = sum(node_cost(n).macs for n in unit)
        uses = self.s.uses_of(y)
        was_output = y.is_graph_output()
        y_name = y.name
        assert x.name is not None and y_name is not None  # onnx_ir names every value a graph holds

        norm_shared = self.per_task_norm and len(unit) > 1
        shared, specific, skips = [], [], []
        copies: dict[str, list[str]] = {}
        skip_nodes: dict[str, list[str]] = {}
        norm_copies: dict[str, list[str]] = {}
        skip_kind, skip_params, skip_macs = "identity", 0, 0
        no_skip = self._no_skip(x, y, head)
        for t in self.tasks:
            spec, names = self._clone(unit, self.s.slice(x, t), t, t)
            specific.append(spec)
            copies[t] = names
            if no_skip is not None:
                continue
            xt = self.s.slice(x, t)
            mark = len(self.s.log)
            sk, skip_kind, skip_params, skip_macs = self._skip(x, y, xt, name, t, head)
            skip_nodes[t] = [node_name(n) for n in self.s.log[mark:] if n.domain != sg.DOMAIN]
            skips.append(sk)
        # The unit's own output now feeds only the gate's shared option.
        y.name = f"{y_name}.shared"
        for t in self.tasks:
            if norm_shared:
                # AutoMTL: the shared operator, then this task's own normalisation.
                s_out, s_names = self._clone(unit[1:], self.s.slice(unit[0].outputs[0], t), f"{t}.shared", t)
                shared.append(s_out)
                norm_copies[t] = s_names
            else:
                shared.append(self.s.slice(y, t))

        options, values = (OPTIONS, [shared, specific, skips]) if no_skip is None else (OPTIONS[:2], [shared, specific])
        gate = self.s.gate(name, options, values, y, y_name, depth=depth, origin_=origin(head))
        out = gate.outputs[0]
        self.s.redirect(y, out, uses, was_output)
        stacked_nodes = [node_name(n) for n in unit]
        if norm_shared:
            # The shared normalisation is replaced by the per-task copies above.
            for n in reversed(unit[1:]):
                self.g.remove(n, safe=True)
            stacked_nodes = stacked_nodes[:1]
        info: dict = {"space": SPACE, "unit": [node_name(n) for n in unit]}
        if no_skip is not None:
            info["no_skip"] = no_skip
        shared_info = {"task_nodes": norm_copies} if norm_shared else {}
        records = [
            sg.OptionRecord("shared", sg.STACKED, stacked_nodes, entry=[name], params=params, macs=macs,
                            info=shared_info),
            sg.OptionRecord("specific", sg.PER_TASK, copies, params=params, macs=macs),
        ]
        if no_skip is None:
            records.append(sg.OptionRecord("skip", sg.PER_TASK, skip_nodes, params=skip_params, macs=skip_macs,
                                           info={"skip": skip_kind}))
        return sg.ChoicePoint(kind="op", name=name, node=node_name(gate), input=x.name, output=y_name, depth=depth,
                              logits=f"{name}.policy", info=info, options=records)

    # ------------------------------------------------------------------ skips
    @staticmethod
    def _channel_axis(head: ir.Node, rank: int) -> int:
        """Where a unit keeps its channels: axis 1 (Conv, BN, Gemm), the last for MatMul and
        LayerNormalization (channels-last blocks: Linear over the last axis of [N, H, W, C])."""
        if head.op_type == "MatMul" or (head.op_type == "LayerNormalization" and rank > 2):
            return rank - 1
        return 1

    @staticmethod
    def _conv_geometry(head: ir.Node, axis: int) -> tuple[int, int, int]:
        """(stride, effective kernel, leading pad) of spatial axis ``axis`` (0-based among them)."""
        def attr(key: str, default: list[int]) -> list[int]:
            a = head.attributes.get(key)
            return [int(v) for v in a.as_ints()] if a is not None else default

        w = head.inputs[1] if len(head.inputs) > 1 else None
        k = int(w.shape.numpy()[2 + axis]) if w is not None and w.shape is not None and len(w.shape) > 2 + axis else 1
        strides, dil, pads = attr("strides", []), attr("dilations", []), attr("pads", [])
        s = strides[axis] if axis < len(strides) else 1
        d = dil[axis] if axis < len(dil) else 1
        p = pads[axis] if axis < len(pads) else 0
        return s, d * (k - 1) + 1, p

    def _spatial(self, xs: tuple[int, ...], ys: tuple[int, ...], head: ir.Node,
                 ch: int) -> list[tuple[str, int, int]] | str:
        """Per spatial axis, how the skip maps the input's size to the output's: ``("same",)``,
        ``("grid", start, step)`` (the samples a strided 1x1 conv at the kernel's centre would read)
        or ``("up",)`` (nearest upsampling); a string when no skip can match (the reason)."""
        plan: list[tuple[str, int, int]] = []
        spatial = [ax for ax in range(1, len(xs)) if ax != ch]
        for i, ax in enumerate(spatial):
            a, b = xs[ax], ys[ax]
            if a == b:
                plan.append(("same", 0, 1))
            elif b > a:
                plan.append(("up", 0, 1))
            else:
                # The first stride that samples b of a positions from 0 (a same-padded strided unit)...
                s0 = next((s for s in range(1, a + 1) if (a - 1) // s + 1 == b), None)
                if s0 is not None:
                    plan.append(("grid", 0, s0))
                    continue
                # ... else the positions the unit's kernel centres fall on (a convolution without
                # padding, a strided stem on an odd size).
                if head.op_type != "Conv":
                    return f"axis {ax} goes from {a} to {b}, which no strided sampling of a {head.op_type} matches"
                s, k, p = self._conv_geometry(head, i)
                start = (k - 1) // 2 - p
                if start < 0 or start + (b - 1) * s > a - 1:
                    return f"axis {ax} goes from {a} to {b}: the kernel centres fall outside the input"
                plan.append(("grid", start, s))
        return plan

    def _no_skip(self, x: ir.Value, y: ir.Value, head: ir.Node) -> str | None:
        """Why the unit can have no skip (None when it can)."""
        xs, ys = static_dims(x), static_dims(y)
        if xs is None or ys is None:
            return f"the skip needs static shapes, got {x.name}={xs} and {y.name}={ys}"
        if xs == ys:
            return None
        if len(xs) != len(ys):
            return f"the unit maps rank {len(xs)} to rank {len(ys)}"
        plan = self._spatial(xs, ys, head, self._channel_axis(head, len(xs)))
        return plan if isinstance(plan, str) else None

    def _skip(self, x: ir.Value, y: ir.Value, xt: ir.Value, name: str, task: str,
              head: ir.Node) -> tuple[ir.Value, str, int, int]:
        """The skip option, always cheaper than the unit it replaces (AutoMTL: a task skips an
        operator "for improved model efficiency"). :meth:`_no_skip` says first whether there is one.

        - ``identity`` when input and output shapes agree;
        - ``downsample`` for a Conv with a kernel larger than 1x1: a strided 1x1 Conv with the
          unit's ``group`` + BatchNormalization (a depthwise unit gets a depthwise skip), after a
          crop to the unit's kernel centres when the unit has no padding;
        - ``select`` otherwise (1x1 Convs, Gemm/MatMul, channels-last Linear layers, upsampling
          units): no parameters and no MACs. The spatial sampling is a strided ``Slice`` (the
          samples a strided 1x1 conv would read) or a nearest ``Resize`` up to the output's size,
          and channel ``c`` of the output is input channel ``c mod C_in`` (a ``Gather`` on the
          channel axis), so fewer channels keep the first ones and more channels repeat them.
        """
        xs, ys = static_dims(x), static_dims(y)
        assert xs is not None and ys is not None  # _no_skip checked
        base = f"{name}@{task}.skip"
        meta = {ORIGIN_KEY: origin(head) or name, TASK_KEY: task}
        if xs == ys:
            n = ir.node("Identity", [xt], name=base)
            n.metadata_props.update(meta)
            self.s.finish(n, base, y)
            return n.outputs[0], "identity", 0, 0
        ch = self._channel_axis(head, len(xs))
        plan = self._spatial(xs, ys, head, ch)
        assert not isinstance(plan, str)  # _no_skip checked
        spatial = [ax for ax in range(1, len(xs)) if ax != ch]
        cin, cout = xs[ch], ys[ch]
        w = head.inputs[1] if head.op_type == "Conv" and len(head.inputs) > 1 else None
        kernel = math.prod(w.shape.numpy()[2:]) if w is not None and w.shape is not None else 1
        grid = [(ax, st, step) for ax, (kind, st, step) in zip(spatial, plan, strict=True) if kind == "grid"]
        up = any(kind == "up" for kind, _, _ in plan)
        cur = xt
        batch = y.shape[0] if y.shape is not None else xs[0]
        if kernel > 1 and len(xs) == 4 and ch == 1 and not up:
            offsets = [st for _, st, _ in grid]
            if any(offsets):
                # a crop to the kernel centres, then the strided 1x1 conv samples them
                axes = [ax for ax, _, _ in grid]
                ends = [st + (ys[ax] - 1) * step + 1 for ax, st, step in grid]
                cur = self._slice_node(cur, name, base + ".crop", meta, y, axes, offsets, ends, [1] * len(axes),
                                       [batch, cin, *[e - o for e, o in zip(ends, offsets, strict=True)]])
            strides = [step if kind == "grid" else 1 for kind, _, step in plan]
            return self._conv_skip(cur, y, base, meta, head, cin, cout, strides, ys)
        if grid and any(step > 1 or st > 0 for _, st, step in grid):
            axes = [ax for ax, _, _ in grid]
            shape: list[Any] = list(xs)
            shape[0] = batch
            for ax, _, _ in grid:
                shape[ax] = ys[ax]
            cur = self._slice_node(cur, name, f"{base}.stride" if (cin != cout or up) else base, meta, y, axes,
                                   [st for _, st, _ in grid], [st + (ys[ax] - 1) * step + 1 for ax, st, step in grid],
                                   [step for _, _, step in grid], shape)
        if up:
            axes = [ax for ax, (kind, _, _) in zip(spatial, plan, strict=True) if kind != "same"]
            sizes = self.s.const(f"{name}.skip.sizes", np.array([ys[ax] for ax in axes], np.int64))
            rz = ir.node("Resize", [cur, None, None, sizes], name=f"{base}.up" if cin != cout else base,
                         attributes={"mode": ir.AttrString("mode", "nearest"),
                                     "axes": ir.AttrInt64s("axes", axes),
                                     "coordinate_transformation_mode": ir.AttrString(
                                         "coordinate_transformation_mode", "asymmetric"),
                                     "nearest_mode": ir.AttrString("nearest_mode", "floor")})
            rz.metadata_props.update(meta)
            self.s.finish(rz, rz.name or base, y)
            rz.outputs[0].shape = ir.Shape([batch] + [xs[ch] if i == ch else ys[i] for i in range(1, len(xs))])
            cur = rz.outputs[0]
        if cin != cout:
            idx = self.s.const(f"{name}.skip.channels", np.arange(cout, dtype=np.int64) % cin)
            n = ir.node("Gather", [cur, idx], name=base, attributes={"axis": ir.AttrInt64("axis", ch)})
            n.metadata_props.update(meta)
            self.s.finish(n, base, y)
            cur = n.outputs[0]
        return cur, "select", 0, 0

    def _slice_node(self, x: ir.Value, name: str, node_name_: str, meta: dict[str, str], like: ir.Value,
                    axes: list[int], starts: list[int], ends: list[int], steps: list[int],
                    shape: list[Any]) -> ir.Value:
        k = len(axes)
        suffix = "" if all(s == 0 for s in starts) and node_name_.endswith((".stride", ".skip")) else ".c"
        tag = f"{name}.skip{suffix}"
        ins = [x] + [self.s.const(f"{tag}.{what}", np.array(v, np.int64))
                     for what, v in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
        del k
        n = ir.node("Slice", ins, name=node_name_)
        n.metadata_props.update(meta)
        self.s.finish(n, node_name_, like)
        n.outputs[0].shape = ir.Shape(shape)
        return n.outputs[0]

    def _conv_skip(self, xt: ir.Value, y: ir.Value, base: str, meta: dict[str, str], head: ir.Node,
                   cin: int, cout: int, strides: list[int], ys: tuple[int, ...]) -> tuple[ir.Value, str, int, int]:
        group = head.attributes["group"].as_int() if "group" in head.attributes else 1
        w = self.s.init(f"{base}.weight", self._kaiming((cout, cin // group, 1, 1), cout))
        conv = ir.node("Conv", [xt, w], name=base,
                       attributes={"strides": ir.AttrInt64s("strides", strides),
                                   "kernel_shape": ir.AttrInt64s("kernel_shape", [1, 1]),
                                   "group": ir.AttrInt64("group", group)})
        conv.metadata_props.update(meta)
        self.s.finish(conv, base + ".conv", y)
        bn_in = [conv.outputs[0]] + [
            self.s.init(f"{base}.bn.{k}", np.full(cout, v, np.float32))
            for k, v in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))
        ]
        bn = ir.node("BatchNormalization", bn_in, name=f"{base}.bn")
        bn.metadata_props.update(meta)
        self.s.finish(bn, base, y)
        macs = math.prod(ys[1:]) * (cin // group)
        return bn.outputs[0], "downsample", cout * (cin // group) + 2 * cout, macs


    def _kaiming(self, shape: tuple[int, ...], fan: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan)).astype(np.float32)
