"""Kernels of the supergraph's ``ai.mtc`` ops (docs/supergraph.md).

``Gate``, ``Mask`` and ``Width`` ask the module's :class:`~mtc.lower.controls.Controls` at every step
how to mix options, which channels each task keeps and how wide each site is; the others
(``Fork``, ``TaskSlice``, ``Regroup``, ``CopyOf``, ``Stack``, and the search-form ``Unstack`` and
``TaskConv``) are fixed functions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mtc.ir import memory
from mtc.ir import supergraph as sg
from mtc.lower.controls import Controls
from mtc.lower.registry import BuildNode, Kernel, register_op


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
    # A copy starts as the shared weights: materialise it as its own parameter, addressed by the
    # copy's IR name (``conv1.weight@seg``) like every other weight.
    src = memory.copy(np.asarray(node.const(0)))
    node.add_parameter("value", torch.from_numpy(src), buffer=bool(node.attr("buffer", 0)),
                       ir_name=node.output_names[0])
    return lambda p: p


@register_op("Stack", domain=sg.DOMAIN)
def _stack(node: BuildNode) -> Kernel:
    # One value per task (each N rows) restacked task-major: how a space's per-task results
    # rejoin the streams.
    return lambda *xs: torch.cat(xs, 0)


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


def _controls(node: BuildNode) -> Controls:
    c = getattr(node.module, "controls", None)
    return c if isinstance(c, Controls) else Controls()


@register_op("Gate", domain=sg.DOMAIN, foldable=False, shape_probe=False)
def _gate(node: BuildNode) -> Kernel:
    tasks = list(node.attr("tasks"))
    options = list(node.attr("options"))
    T, K = len(tasks), len(options)
    choice = str(node.attr("choice"))
    # After stack-gate-inputs, an option may come in as one stacked tensor instead of T slices.
    stacked = [bool(s) for s in node.attr("stacked", [0] * K)]
    counts = [1 if s else T for s in stacked]
    n_opts = sum(counts)
    has_logits = node.num_inputs == n_opts + 1
    if node.num_inputs not in (n_opts, n_opts + 1):
        raise node.error(f"expected {n_opts} option inputs (+ logits), got {node.num_inputs}")
    if has_logits:
        node.weight(n_opts)  # the logits train
    controls = _controls(node)
    inv_k = 1.0 / K
    starts = [sum(counts[:k]) for k in range(K)]

    def option(args: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
        a = args[starts[k]]
        return a.view(T, -1, *a.shape[1:]) if stacked[k] else torch.stack(args[starts[k]:starts[k] + T])

    def gate(*args: torch.Tensor) -> torch.Tensor:
        logits = args[n_opts] if has_logits else None
        w = controls.gate_weights(choice, logits, T, K)
        if w is None:
            out = option(args, 0)
            for k in range(1, K):
                out = out + option(args, k)
            out = out * inv_k
        else:
            first = option(args, 0)
            shape = (T,) + (1,) * (first.dim() - 1)
            out = first * w[:, 0].view(shape)
            for k in range(1, K):  # fused multiply-adds
                out = torch.addcmul(out, option(args, k), w[:, k].view(shape))
        return out.reshape(-1, *out.shape[2:])

    return gate


def _block_view(x: torch.Tensor, blocks: int, axis: int) -> tuple[torch.Tensor, list[int]]:
    """``x`` as ``[blocks, N, ...]`` and the broadcast shape of a per-block channel vector."""
    xs = x.view(blocks, -1, *x.shape[1:])
    shape = [blocks] + [1] * (xs.dim() - 1)
    shape[axis + 1 if axis >= 0 else xs.dim() + axis] = x.shape[axis]
    return xs, shape


@register_op("Mask", domain=sg.DOMAIN, foldable=False, shape_probe=False)
def _mask(node: BuildNode) -> Kernel:
    choice = str(node.attr("choice"))
    axis = int(node.attr("axis", 1))
    T = int(node.attr("tasks"))
    node.buffer(1)  # the mask initializer is state, not a trained weight
    controls = _controls(node)

    def mask(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        xs, shape = _block_view(x, T, axis)
        return (xs * controls.mask(choice, m).to(x.dtype).view(shape)).reshape(x.shape)

    return mask


@register_op("Width", domain=sg.DOMAIN, foldable=False, shape_probe=False)
def _width(node: BuildNode) -> Kernel:
    choice = str(node.attr("choice"))
    axis = int(node.attr("axis", 1))
    channels = int(node.attr("channels"))
    blocks = int(node.attr("blocks", 1))
    controls = _controls(node)
    ar = torch.arange(channels)

    def width(x: torch.Tensor) -> torch.Tensor:
        ws = controls.width(choice, channels, blocks)
        if ws is None or all(w >= channels for w in ws):
            return x
        keep = (ar.to(x.device).view(1, -1) < torch.tensor(ws, device=x.device).view(-1, 1)).to(x.dtype)
        xs, shape = _block_view(x, blocks, axis)
        return (xs * keep.view(shape)).reshape(x.shape)

    return width
