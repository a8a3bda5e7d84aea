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


@register_op("Gate", domain=sg.DOMAIN, foldable=False, shape_probe=False)
def _gate(node: BuildNode) -> Kernel:
    tasks = list(node.attr("tasks"))
    T = len(tasks)
    vcn = str(node.attr("vcn"))
    # After _prepare_search, the shared option may come in as the stacked tensor itself.
    stacked = bool(node.attr("stacked_shared", 0))
    stacked_skip = bool(node.attr("stacked_skip", 0))
    n_shared = 1 if stacked else T
    n_skip = 1 if stacked_skip else T
    node.weight(n_shared + T + n_skip)  # the policy logits train
    state = _state(node.module)
    third = 1.0 / 3.0

    def gate(*args: torch.Tensor) -> torch.Tensor:
        opts, logits = args[:-1], args[-1]
        specific = torch.stack(opts[n_shared:n_shared + T])
        skip = opts[-1].view(specific.shape) if stacked_skip else torch.stack(opts[n_shared + T:])
        shared = opts[0].view(specific.shape) if stacked else torch.stack(opts[:T])
        if state.mode == "warmup":
            out = (shared + specific + skip) * third
        elif state.mode == "gumbel":
            w = F.gumbel_softmax(logits, tau=state.tau, hard=state.hard, dim=-1)
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
) -> GraphModule:
    """Lower a supergraph in ``mode``; ``fixed`` needs ``policy`` and specialises a clone first."""
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
    _prepare_search(model)
    module = lower(model, device=device)
    set_mode(module, mode, tau=tau, hard=hard)
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


def _prepare_search(model: ir.Model) -> None:
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
            new.name, new.dtype, new.shape = old.name, old.dtype, old.shape
            old.name = None
            old.replace_all_uses_with(new)
            g.remove(by_index[i], safe=True)
        unstacked[key] = u
    for gate in list(g):
        if gate.domain != sg.DOMAIN or gate.op_type != "Gate":
            continue
        t = len(gate.attributes["tasks"].as_strings())
        shared_src = _unstacked_source(list(gate.inputs[:t]))
        skip_src = _unstacked_source([_through_identity(v) for v in gate.inputs[2 * t:3 * t]])
        if shared_src is None and skip_src is None:
            continue
        attrs = dict(gate.attributes)
        inputs = list(gate.inputs[:t]) if shared_src is None else [shared_src]
        inputs += list(gate.inputs[t:2 * t])
        inputs += list(gate.inputs[2 * t:3 * t]) if skip_src is None else [skip_src]
        inputs.append(gate.inputs[3 * t])
        if shared_src is not None:
            attrs["stacked_shared"] = ir.AttrInt64("stacked_shared", 1)
        if skip_src is not None:
            attrs["stacked_skip"] = ir.AttrInt64("stacked_skip", 1)
        new_gate = ir.node("Gate", inputs, domain=sg.DOMAIN, name=gate.name, attributes=attrs)
        out = gate.outputs[0]
        new_out = new_gate.outputs[0]
        g.insert_before(gate, new_gate)
        name = out.name
        out.name = None
        new_out.name, new_out.dtype, new_out.shape = name, out.dtype, out.shape
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
