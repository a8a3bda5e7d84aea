"""Lowering of the supergraph's ``ai.mtc`` ops, and the modes of a lowered supergraph.

A lowered supergraph runs in one of three modes (``set_mode``):

- ``warmup``: every VCN outputs the average of its three options for every task (AutoMTL's
  pre-train stage), so all weights are trained.
- ``gumbel``: every VCN mixes its options with Gumbel-softmax weights from the policy logits, at
  temperature ``tau``; ``hard=True`` gives straight-through one-hot samples.
- ``fixed``: a discrete policy. :func:`lower_supergraph` builds this mode from the ``specialize``
  pass, so unchosen options cost nothing and identical task streams run once.

Stacked activations hold one block of ``N`` rows per task (or per group of identical streams after
``specialize``), so ops without parameters and shared operators run once on all streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.lower.module import GraphModule, lower
from mtc.lower.registry import BuildNode, Kernel, register_op

MODES = ("warmup", "gumbel", "fixed")


@dataclass
class GateState:
    """Run-time switches read by every Gate kernel of one module."""

    mode: str = "warmup"
    tau: float = 5.0
    hard: bool = False
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # last sampled per VCN, for inspection
    # One Gumbel-softmax call per forward pass for all VCNs with the same task count (many tiny
    # calls per gate cost more than the mixing itself on small nets).
    order: list[str] = field(default_factory=list)
    fresh: bool = True
    sampled: torch.Tensor | None = None

    def sample(self, logits: list[torch.Tensor]) -> torch.Tensor:
        if self.fresh or self.sampled is None:
            self.sampled = F.gumbel_softmax(torch.stack(logits), tau=self.tau, hard=self.hard, dim=-1)
            self.fresh = False
        return self.sampled


def _state(module: Any) -> GateState:
    st = getattr(module, "mtc_gates", None)
    if st is None:
        st = GateState()
        object.__setattr__(module, "mtc_gates", st)
    return st


@register_op("Fork", domain=sg.DOMAIN)
def _fork(node: BuildNode) -> Kernel:
    t = len(node.attr("tasks"))
    return lambda x: x.repeat(t, *([1] * (x.dim() - 1)))


@register_op("TaskSlice", domain=sg.DOMAIN)
def _task_slice(node: BuildNode) -> Kernel:
    i, t = int(node.attr("index")), int(node.attr("tasks"))

    def task_slice(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // t
        return x.narrow(0, i * n, n)

    return task_slice


@register_op("Regroup", domain=sg.DOMAIN)
def _regroup(node: BuildNode) -> Kernel:
    groups = int(node.attr("groups"))
    index = [int(i) for i in node.attr("index")]
    contiguous = index == list(range(index[0], index[0] + len(index)))
    idx = torch.tensor(index)

    def regroup(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // groups
        if contiguous:
            return x.narrow(0, index[0] * n, len(index) * n)
        blocks = x.reshape(groups, n, *x.shape[1:])
        return blocks.index_select(0, idx.to(x.device)).reshape(len(index) * n, *x.shape[1:])

    return regroup


@register_op("CopyOf", domain=sg.DOMAIN, foldable=False)
def _copy_of(node: BuildNode) -> Kernel:
    # A task-specific copy starts as the shared weights: materialise it as its own parameter.
    src = np.array(node.const(0), copy=True)
    attr = node.add_parameter("value", torch.from_numpy(src), buffer=bool(node.attr("buffer", 0)))
    copies = getattr(node.module, "mtc_copies", None)
    if copies is None:
        copies = {}
        object.__setattr__(node.module, "mtc_copies", copies)
    copies[node.output_names[0]] = attr
    return lambda p: p


@register_op("Unstack", domain=sg.DOMAIN)
def _unstack(node: BuildNode) -> Kernel:
    # All task streams of a stacked tensor at once: views whose backward is one stack, where T
    # separate slices would each scatter into a zero-filled gradient of the whole tensor.
    t = int(node.attr("tasks"))
    return lambda x: x.view(t, -1, *x.shape[1:]).unbind(0)


@register_op("TaskConv", domain=sg.DOMAIN, foldable=False, shape_probe=False)
def _task_conv(node: BuildNode) -> Kernel:
    """T task-specific copies of a 2-d Conv (+ BatchNormalization) as one grouped convolution.

    Inputs: the stacked input ``[T*N, C, H, W]``, then T weights, then (if ``has_bn``) T scales, T
    biases, T running means, T running variances. The streams move into channel blocks
    (``[N, T*C, H, W]``), one convolution with ``T * group`` groups computes every copy, and one
    batch norm over ``T * C_out`` channels normalises each task's block with its own statistics.
    """
    T = int(node.attr("tasks"))
    groups = int(node.attr("group", 1)) * T
    strides = tuple(int(v) for v in node.attr("strides"))
    pads = tuple(int(v) for v in node.attr("pads"))
    dil = tuple(int(v) for v in node.attr("dilations"))
    has_bn = bool(node.attr("has_bn", 0))
    eps = float(node.attr("epsilon", 1e-5))
    torch_momentum = 1.0 - float(node.attr("momentum", 0.9))
    node.weight(*range(1, 1 + T))
    if has_bn:
        node.weight(*range(1 + T, 1 + 3 * T))
        node.buffer(*range(1 + 3 * T, 1 + 5 * T))
    module = node.module

    def task_conv(x: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // T
        xc = x.view(T, n, *x.shape[1:]).transpose(0, 1).reshape(n, T * x.shape[1], *x.shape[2:])
        y = F.conv2d(xc, torch.cat(p[:T]), None, strides, pads, dil, groups)
        if has_bn:
            means, variances = p[3 * T:4 * T], p[4 * T:5 * T]
            rm, rv = torch.cat(means), torch.cat(variances)
            y = F.batch_norm(y, rm, rv, torch.cat(p[T:2 * T]), torch.cat(p[2 * T:3 * T]),
                             module.training, torch_momentum, eps)
            if module.training:
                with torch.no_grad():  # the per-task buffers keep the updated statistics
                    for buf, new in zip(means, rm.chunk(T), strict=True):
                        buf.copy_(new)
                    for buf, new in zip(variances, rv.chunk(T), strict=True):
                        buf.copy_(new)
        c = y.shape[1] // T
        return y.view(n, T, c, *y.shape[2:]).transpose(0, 1).reshape(T * n, c, *y.shape[2:])

    return task_conv


@register_op("Gate", domain=sg.DOMAIN, foldable=False, shape_probe=False)
def _gate(node: BuildNode) -> Kernel:
    tasks = list(node.attr("tasks"))
    T = len(tasks)
    vcn = str(node.attr("vcn"))
    # After _prepare_search, the shared option may come in as the stacked tensor itself.
    stacked = bool(node.attr("stacked_shared", 0))
    stacked_spec = bool(node.attr("stacked_specific", 0))
    stacked_skip = bool(node.attr("stacked_skip", 0))
    n_shared = 1 if stacked else T
    n_spec = 1 if stacked_spec else T
    n_skip = 1 if stacked_skip else T
    node.weight(n_shared + n_spec + n_skip)  # the policy logits train
    state = _state(node.module)
    third = 1.0 / 3.0
    module = node.module
    assert isinstance(module, GraphModule)  # GraphModule builds its nodes with module=self
    logits_name = node.inputs[-1].name
    position = len(state.order)
    state.order.append(logits_name)
    cache: list[list[torch.Tensor]] = []

    def all_logits() -> list[torch.Tensor]:
        # Resolved on first use: parameters exist only once the module is built.
        if not cache:
            inits = module.named_initializers()
            cache.append([inits[n] for n in state.order])
        return cache[0]

    def as_stack(xs: tuple[torch.Tensor, ...], is_stacked: bool) -> torch.Tensor:
        return xs[0].view(T, -1, *xs[0].shape[1:]) if is_stacked else torch.stack(xs)

    def gate(*args: torch.Tensor) -> torch.Tensor:
        opts = args[:-1]  # the logits (last) are sampled for all gates at once by state.sample
        shared = as_stack(opts[:n_shared], stacked)
        specific = as_stack(opts[n_shared:n_shared + n_spec], stacked_spec)
        skip = as_stack(opts[n_shared + n_spec:], stacked_skip)
        if state.mode == "warmup":
            out = (shared + specific + skip) * third
        elif state.mode == "gumbel":
            w = state.sample(all_logits())[position]
            state.weights[vcn] = w.detach()
            shape = (T,) + (1,) * (shared.dim() - 1)
            # two fused multiply-adds instead of three products and two sums
            out = torch.addcmul(torch.addcmul(shared * w[:, 0].view(shape), specific, w[:, 1].view(shape)),
                                skip, w[:, 2].view(shape))
        else:
            raise RuntimeError(f"mode '{state.mode}' needs a specialised module: use lower_supergraph(mode='fixed')")
        return out.reshape(-1, *out.shape[2:])

    return gate


def set_mode(module: GraphModule, mode: str, *, tau: float | None = None, hard: bool | None = None) -> None:
    """Switch a lowered supergraph between ``warmup`` and ``gumbel`` (``fixed`` is built separately)."""
    if mode not in ("warmup", "gumbel"):
        raise MtcError(f"mode '{mode}' cannot be switched to at run time (expected warmup or gumbel)")
    st = _state(module)
    st.mode = mode
    if tau is not None:
        st.tau = float(tau)
    if hard is not None:
        st.hard = bool(hard)


def lower_supergraph(
    model: ir.Model,
    *,
    mode: str = "warmup",
    policy: sg.Policy | None = None,
    tau: float = 5.0,
    hard: bool = False,
    device: torch.device | str | None = None,
    batch_copies: bool = True,
) -> GraphModule:
    """Lower a supergraph in ``mode``; ``fixed`` needs ``policy`` and specialises a clone first.

    In the search modes, ``batch_copies`` runs each VCN's task-specific copies (and down-sampling
    skips) as one grouped convolution instead of one convolution per task.
    """
    if not sg.is_supergraph(model):
        raise MtcError("not a supergraph: compile the backbone with mtc compile first")
    if mode not in MODES:
        raise MtcError(f"unknown mode '{mode}' (expected one of {', '.join(MODES)})")
    if mode == "fixed":
        if policy is None:
            raise MtcError("mode 'fixed' needs a policy")
        from mtc.passes.specialize import Specialize

        model = model.clone()
        Specialize(policy=policy)(model)
        return lower(model, device=device)
    model = model.clone()
    _prepare_search(model, batch_copies=batch_copies)
    module = lower(model, device=device)
    set_mode(module, mode, tau=tau, hard=hard)
    state = _state(module)

    def new_pass(_mod: Any, _args: Any) -> None:
        state.fresh = True

    module.register_forward_pre_hook(new_pass)
    return module


def _through_identity(v: ir.Value | None) -> ir.Value | None:
    p = v.producer() if v is not None else None
    return p.inputs[0] if p is not None and p.op_type == "Identity" and p.domain == "" else v


def _unstacked_source(values: list[ir.Value | None]) -> ir.Value | None:
    """The stacked tensor when ``values`` are exactly its Unstack outputs in task order."""
    producer = values[0].producer() if values and values[0] is not None else None
    if producer is None or producer.op_type != "Unstack":
        return None
    if any(v is None or v.producer() is not producer or v.index() != i for i, v in enumerate(values)):
        return None
    return producer.inputs[0]


def _batch_copies(g: ir.Graph, outs: list[ir.Value | None]) -> ir.Value | None:
    """Replace T per-task ``Conv [+ BatchNormalization]`` chains on one tensor's Unstack outputs
    by one ``TaskConv``; returns its stacked output, or None when the chains do not match."""
    chains: list[tuple[ir.Node, ir.Node | None]] = []
    for v in outs:
        last = v.producer() if v is not None else None
        if last is None:
            return None
        bn = last if last.op_type == "BatchNormalization" and last.domain == "" else None
        conv = bn.inputs[0].producer() if bn is not None and bn.inputs[0] is not None else last
        if conv is None or conv.op_type != "Conv" or conv.domain != "" or len(conv.inputs) != 2:
            return None
        if bn is not None and (len(bn.outputs) != 1 or len(bn.inputs) != 5):
            return None
        chains.append((conv, bn))
    src = _unstacked_source([c.inputs[0] for c, _ in chains])
    if src is None or src.shape is None or len(src.shape) != 4:
        return None
    ref_conv, ref_bn = chains[0]

    def attrs_of(n: ir.Node | None) -> dict[str, Any]:
        return {} if n is None else {k: a.value for k, a in n.attributes.items()}

    ca, ba = attrs_of(ref_conv), attrs_of(ref_bn)
    for conv, bn in chains:
        if attrs_of(conv) != ca or attrs_of(bn) != ba or (bn is None) != (ref_bn is None):
            return None
        if any(len(list(o.uses())) != 1 for o in conv.outputs):
            return None
    if str(ca.get("auto_pad", "NOTSET")) != "NOTSET":
        return None
    pads = [int(p) for p in ca.get("pads", [0, 0, 0, 0])]
    if pads[:2] != pads[2:]:
        return None
    t = len(chains)
    inputs: list[ir.Value | None] = [src, *(c.inputs[1] for c, _ in chains)]
    attributes: dict[str, Any] = {
        "tasks": ir.AttrInt64("tasks", t),
        "group": ir.AttrInt64("group", int(ca.get("group", 1))),
        "strides": ir.AttrInt64s("strides", [int(x) for x in ca.get("strides", [1, 1])]),
        "pads": ir.AttrInt64s("pads", pads[:2]),
        "dilations": ir.AttrInt64s("dilations", [int(x) for x in ca.get("dilations", [1, 1])]),
        "has_bn": ir.AttrInt64("has_bn", int(ref_bn is not None)),
    }
    if ref_bn is not None:
        if int(ba.get("training_mode", 0)):
            return None
        for k in range(1, 5):
            inputs += [bn.inputs[k] for _, bn in chains if bn is not None]
        attributes["epsilon"] = ir.AttrFloat32("epsilon", float(ba.get("epsilon", 1e-5)))
        attributes["momentum"] = ir.AttrFloat32("momentum", float(ba.get("momentum", 0.9)))
    last = chains[-1][1] or chains[-1][0]
    node = ir.node("TaskConv", inputs, domain=sg.DOMAIN, name=f"{ref_conv.name}.batched", attributes=attributes)
    out = node.outputs[0]
    out.name = f"{ref_conv.name}.batched"
    if src.dtype is not None:
        out.dtype = src.dtype
    g.insert_after(last, node)
    return out


def _row_independent(node: ir.Node) -> bool:
    """A stateless node that treats every row (axis 0) alike, with constant side inputs: it may
    run once on a stacked tensor instead of once per task."""
    if node.domain != "" or len(node.outputs) != 1 or node.op_type not in ("Identity", "Slice", "Gather"):
        return False
    if any(v is None or v.const_value is None for v in node.inputs[1:]):
        return False
    if node.op_type == "Gather":
        return node.attributes["axis"].as_int() > 0 if "axis" in node.attributes else False
    if node.op_type == "Slice":
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        return axes is not None and axes.const_value is not None and bool((axes.const_value.numpy() > 0).all())
    return True


def _batch_stateless(g: ir.Graph, outs: list[ir.Value | None]) -> ir.Value | None:
    """T identical row-independent chains on one tensor's Unstack outputs (parameter-free skips)
    become one chain on the stacked tensor; returns its output, or None when they do not match."""
    chains: list[list[ir.Node]] = []
    for v in outs:
        chain: list[ir.Node] = []
        p = v.producer() if v is not None else None
        while p is not None and _row_independent(p):
            chain.insert(0, p)
            p = p.inputs[0].producer() if p.inputs[0] is not None else None
        if not chain:
            return None
        chains.append(chain)

    def sig(n: ir.Node) -> tuple[Any, ...]:
        return (n.op_type, tuple(sorted((k, str(a.value)) for k, a in n.attributes.items())),
                tuple(id(v) for v in n.inputs[1:]))

    ref = chains[0]
    if any([sig(n) for n in c] != [sig(n) for n in ref] for c in chains[1:]):
        return None
    src = _unstacked_source([c[0].inputs[0] for c in chains])
    if src is None:
        return None
    cur = src
    last = max((c[-1] for c in chains), key=g.index)
    for n in ref:
        c = ir.node(n.op_type, [cur, *n.inputs[1:]], name=f"{n.name}.stacked", attributes=dict(n.attributes))
        out = c.outputs[0]
        out.name = c.name
        if src.dtype is not None:
            out.dtype = src.dtype
        g.insert_after(last, c)
        last, cur = c, out
    return cur


def _prepare_search(model: ir.Model, *, batch_copies: bool = True) -> None:
    """Lowering-only rewrites for the search modes (the file keeps the simple per-task form).

    All T slices of one stacked tensor become one ``Unstack``; a Gate whose shared options are
    exactly those slices reads the stacked tensor instead, so no per-task restacking happens.
    """
    from mtc.passes.canonicalize import remove_dead

    g = model.graph
    slices: dict[int, dict[int, ir.Node]] = {}
    sources: dict[int, ir.Value] = {}
    for n in g:
        if n.domain == sg.DOMAIN and n.op_type == "TaskSlice":
            src = n.inputs[0]
            assert src is not None
            slices.setdefault(id(src), {})[n.attributes["index"].as_int()] = n
            sources[id(src)] = src
    unstacked: dict[int, ir.Node] = {}  # id(stacked value) -> its Unstack node
    for key, by_index in slices.items():
        first = next(iter(by_index.values()))
        t = first.attributes["tasks"].as_int()
        if sorted(by_index) != list(range(t)):
            continue
        src = sources[key]
        u = ir.node("Unstack", [src], domain=sg.DOMAIN, name=f"{src.name}.unstack",
                    attributes={"tasks": ir.AttrInt64("tasks", t)}, num_outputs=t)
        g.insert_before(min(by_index.values(), key=lambda n: g.index(n)), u)
        for i in range(t):
            old = by_index[i].outputs[0]
            new = u.outputs[i]
            new.name, new.shape = old.name, old.shape
            if old.dtype is not None:
                new.dtype = old.dtype
            old.name = None
            old.replace_all_uses_with(new)
            g.remove(by_index[i], safe=True)
        unstacked[key] = u
    for gate in list(g):
        if gate.domain != sg.DOMAIN or gate.op_type != "Gate":
            continue
        t = len(gate.attributes["tasks"].as_strings())
        shared_src = _unstacked_source(list(gate.inputs[:t]))
        spec_src = _batch_copies(g, list(gate.inputs[t:2 * t])) if batch_copies else None
        skip_src = _unstacked_source([_through_identity(v) for v in gate.inputs[2 * t:3 * t]])
        if skip_src is None:
            skip_src = _batch_stateless(g, list(gate.inputs[2 * t:3 * t]))
        if skip_src is None and batch_copies:
            skip_src = _batch_copies(g, list(gate.inputs[2 * t:3 * t]))
        if shared_src is None and spec_src is None and skip_src is None:
            continue
        attrs = dict(gate.attributes)
        inputs: list[ir.Value | None] = list(gate.inputs[:t]) if shared_src is None else [shared_src]
        inputs += list(gate.inputs[t:2 * t]) if spec_src is None else [spec_src]
        inputs += list(gate.inputs[2 * t:3 * t]) if skip_src is None else [skip_src]
        inputs.append(gate.inputs[3 * t])
        for flag, src in (("stacked_shared", shared_src), ("stacked_specific", spec_src), ("stacked_skip", skip_src)):
            if src is not None:
                attrs[flag] = ir.AttrInt64(flag, 1)
        new_gate = ir.node("Gate", inputs, domain=sg.DOMAIN, name=gate.name, attributes=attrs)
        out = gate.outputs[0]
        new_out = new_gate.outputs[0]
        g.insert_before(gate, new_gate)
        name = out.name
        out.name = None
        new_out.name, new_out.shape = name, out.shape
        if out.dtype is not None:
            new_out.dtype = out.dtype
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        gate.name = None
        g.remove(gate, safe=True)
    remove_dead(model)


def policy_parameters(module: GraphModule) -> dict[str, torch.nn.Parameter]:
    """The policy logits of every VCN, by VCN name (``{vcn}.policy`` initializers)."""
    out = {}
    for name, t in module.named_initializers().items():
        if name.endswith(".policy") and isinstance(t, torch.nn.Parameter):
            out[name[: -len(".policy")]] = t
    return out
