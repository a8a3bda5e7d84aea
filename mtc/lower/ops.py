"""ONNX ops as PyTorch kernels.

Each builder runs once per node when the module is built: it reads attributes (with the ONNX spec
defaults), consumes the inputs that are attribute-like and known at build time (shapes, axes, pads,
scales), precomputes everything that does not depend on the input values, and returns a kernel that
only does tensor work. Fast paths call ``torch.nn.functional`` directly where its semantics are
exactly ONNX's; general paths follow the ONNX spec for the remaining attribute combinations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from mtc.lower.registry import BuildNode, Kernel, as_ints, register_op
from mtc.lower.registry import operands as _operands
from mtc.lower.tensors import torch_dtype

# --- helpers ----------------------------------------------------------------------------------------


def _onnx_dtype(code: int) -> torch.dtype:
    dt = torch_dtype(ir.DataType(code))
    if dt is None:
        raise TypeError(f"ONNX element type {ir.DataType(code).name} has no torch equivalent")
    return dt


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _attr_or_input(node: BuildNode, name: str, index: int, make: Callable[..., Kernel]) -> Kernel:
    """An operand that moved from an attribute to an input in later opsets (axes, split)."""
    if name in node.attrs or not node.has_input(index):
        return make(node.attrs.get(name), runtime=False)
    return _operands(node, [index], make)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX pads ``[b1, b2, ..., e1, e2, ...]`` over trailing axes -> F.pad's last-axis-first pairs."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[n + i])]
    return out


def _same_pads(in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int], mode: str) -> list[int]:
    """Explicit pads for ``auto_pad`` SAME_UPPER / SAME_LOWER (output size ``ceil(in / stride)``)."""
    begin, end = [], []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def _spatial_attrs(node: BuildNode, nd: int) -> tuple[list[int], list[int], list[int]]:
    strides = as_ints(node.attr("strides")) or [1] * nd
    dilations = as_ints(node.attr("dilations")) or [1] * nd
    pads = as_ints(node.attr("pads")) or [0] * (2 * nd)
    return strides, dilations, pads


def _auto_pad(node: BuildNode) -> str:
    mode = node.attr("auto_pad", "NOTSET")
    return mode.decode() if isinstance(mode, bytes) else mode


def _ones_like_shape(n: int) -> tuple[int, ...]:
    return (1,) * n


def _elementwise(fn: Callable[..., Any]) -> Callable[[BuildNode], Kernel]:
    def build(node: BuildNode) -> Kernel:
        return fn

    return build


# --- constants and shapes ---------------------------------------------------------------------------


@register_op("Constant")
def _constant(node: BuildNode) -> Any:
    a = node.attrs
    if "value" in a:
        v = a["value"]
    elif "value_float" in a:
        v = np.array(a["value_float"], dtype=np.float32)
    elif "value_floats" in a:
        v = np.array(a["value_floats"], dtype=np.float32)
    elif "value_int" in a:
        v = np.array(a["value_int"], dtype=np.int64)
    elif "value_ints" in a:
        v = np.array(a["value_ints"], dtype=np.int64)
    elif "value_string" in a:
        v = np.array(a["value_string"], dtype=object)
    elif "value_strings" in a:
        v = np.array(a["value_strings"], dtype=object)
    else:
        raise node.error("Constant without a supported value attribute")
    return node.folded(np.asarray(v))


def _shape_range(node: BuildNode) -> slice:
    start = node.attr("start", 0)
    end = node.attr("end")
    return slice(start, end)


@register_op("Shape")
def _shape(node: BuildNode) -> Any:
    sl = _shape_range(node)
    static = node.static_shape(0)
    if static is not None:
        return node.folded(np.array(static[sl], dtype=np.int64))

    def shape(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.shape[sl], dtype=torch.int64, device=x.device)

    return shape


@register_op("Size")
def _size(node: BuildNode) -> Any:
    static = node.static_shape(0)
    if static is not None:
        return node.folded(np.array(math.prod(static), dtype=np.int64))
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register_op("ConstantOfShape")
def _constant_of_shape(node: BuildNode) -> Any:
    value = node.attr("value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    if node.is_const(0):
        shape = as_ints(node.const(0))
        return node.folded(np.full(shape, fill[0], dtype=fill.dtype))
    dtype = torch.from_numpy(fill).dtype
    v = fill[0].item()
    return lambda s: torch.full(s.tolist(), v, dtype=dtype, device=s.device)


@register_op("Range")
def _range(node: BuildNode) -> Kernel:
    def rng(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        dtype = start.dtype
        s, lim, d = start.item(), limit.item(), delta.item()
        n = max(math.ceil((lim - s) / d), 0)
        # Computed as start + i * delta, as the spec defines it (arange accumulates differently).
        i = torch.arange(n, dtype=torch.float64 if dtype.is_floating_point else torch.int64, device=start.device)
        return (i * d + s).to(dtype)

    return rng


@register_op("Identity")
def _identity(node: BuildNode) -> Kernel:
    return lambda x: x


@register_op("Cast")
def _cast(node: BuildNode) -> Kernel:
    dtype = _onnx_dtype(node.attr("to"))
    return lambda x: x.to(dtype)


@register_op("CastLike")
def _cast_like(node: BuildNode) -> Kernel:
    dtype = node.dtype(1)
    if dtype is not None:
        node.consume(1)
        return lambda x: x.to(dtype)
    return lambda x, t: x.to(t.dtype)


# --- elementwise ------------------------------------------------------------------------------------

_UNARY: dict[str, Callable[..., Any]] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "HardSwish": F.hardswish,
}
for _name, _fn in _UNARY.items():
    register_op(_name)(_elementwise(_fn))


@register_op("Softplus")
def _softplus(node: BuildNode) -> Kernel:
    # F.softplus switches to the identity above a threshold; the exact form keeps parity.
    return lambda x: torch.where(x > 20, x, torch.log1p(torch.exp(x)))


@register_op("IsInf")
def _isinf(node: BuildNode) -> Kernel:
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)
    if pos and neg:
        return torch.isinf
    if pos:
        return torch.isposinf
    if neg:
        return torch.isneginf
    return lambda x: torch.zeros_like(x, dtype=torch.bool)


@register_op("LeakyRelu")
def _leaky_relu(node: BuildNode) -> Kernel:
    alpha = float(node.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@register_op("Elu")
def _elu(node: BuildNode) -> Kernel:
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@register_op("Celu")
def _celu(node: BuildNode) -> Kernel:
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@register_op("Selu")
def _selu(node: BuildNode) -> Kernel:
    alpha = float(node.attr("alpha", 1.67326319217681884765625))
    gamma = float(node.attr("gamma", 1.05070102214813232421875))
    return lambda x: gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@register_op("ThresholdedRelu")
def _thresholded_relu(node: BuildNode) -> Kernel:
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros((), dtype=x.dtype, device=x.device))


@register_op("Shrink")
def _shrink(node: BuildNode) -> Kernel:
    bias, lambd = float(node.attr("bias", 0.0)), float(node.attr("lambd", 0.5))

    def shrink(x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)

    return shrink


@register_op("HardSigmoid")
def _hard_sigmoid(node: BuildNode) -> Kernel:
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@register_op("Gelu")
def _gelu(node: BuildNode) -> Kernel:
    approximate = node.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


@register_op("Swish")
def _swish(node: BuildNode) -> Kernel:
    alpha = float(node.attr("alpha", 1.0))
    if alpha == 1.0:
        return F.silu
    return lambda x: x * torch.sigmoid(alpha * x)


@register_op("PRelu")
def _prelu(node: BuildNode) -> Kernel:
    node.weight(1)
    return lambda x, slope: torch.where(x < 0, x * slope, x)


@register_op("Clip", since_version=1)
def _clip_attr(node: BuildNode) -> Kernel:
    lo = float(node.attr("min", -3.4028234663852886e38))
    hi = float(node.attr("max", 3.4028234663852886e38))
    return lambda x: torch.clamp(x, lo, hi)


@register_op("Clip", since_version=11)
def _clip(node: BuildNode) -> Kernel:
    consts = [node.is_const(i) or not node.has_input(i) for i in (1, 2)]
    if all(consts):
        lo = node.const(1)
        hi = node.const(2)
        lo_v = None if lo is None else np.asarray(lo).item()
        hi_v = None if hi is None else np.asarray(hi).item()
        if lo_v is not None and hi_v is not None and isinstance(lo_v, float) and lo_v <= hi_v:
            # hardtanh is what F.relu6 uses: the same values and the same gradient at the bounds.
            return lambda x: F.hardtanh(x, lo_v, hi_v) if x.is_floating_point() else torch.clamp(x, lo_v, hi_v)
        if lo_v is not None and hi_v is not None and lo_v > hi_v:
            return lambda x: torch.full_like(x, hi_v)  # ONNX: min > max gives max everywhere
        if lo_v is None and hi_v is None:
            return lambda x: x
        return lambda x: torch.clamp(x, lo_v, hi_v)
    has_lo, has_hi = node.has_input(1), node.has_input(2)

    def clip(x: torch.Tensor, *bounds: torch.Tensor) -> torch.Tensor:
        it = iter(bounds)
        lo = next(it) if has_lo else None
        hi = next(it) if has_hi else None
        if lo is not None and hi is not None and bool(lo > hi):
            return torch.full_like(x, hi.item())
        if lo is None and hi is None:
            return x
        return torch.clamp(x, lo, hi)

    return clip


def _is_int_dtype(dt: torch.dtype | None) -> bool | None:
    if dt is None:
        return None
    return not (dt.is_floating_point or dt.is_complex)


def _binary(op: Callable[[Any, Any], Any]) -> Callable[[BuildNode], Kernel]:
    def build(node: BuildNode) -> Kernel:
        return op

    return build


register_op("Add")(_binary(torch.add))
register_op("Sub")(_binary(torch.sub))
register_op("Mul")(_binary(torch.mul))
register_op("Equal")(_binary(torch.eq))
register_op("Greater")(_binary(torch.gt))
register_op("Less")(_binary(torch.lt))
register_op("GreaterOrEqual")(_binary(torch.ge))
register_op("LessOrEqual")(_binary(torch.le))
register_op("And")(_binary(torch.logical_and))
register_op("Or")(_binary(torch.logical_or))
register_op("Xor")(_binary(torch.logical_xor))
register_op("BitwiseAnd")(_binary(torch.bitwise_and))
register_op("BitwiseOr")(_binary(torch.bitwise_or))
register_op("BitwiseXor")(_binary(torch.bitwise_xor))
register_op("BitwiseNot")(_elementwise(torch.bitwise_not))
register_op("Where")(_elementwise(torch.where))


@register_op("Div")
def _div(node: BuildNode) -> Kernel:
    is_int = _is_int_dtype(node.dtype(0))
    if is_int is False:
        return torch.div
    if is_int:
        return lambda a, b: torch.div(a, b, rounding_mode="trunc")

    def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_floating_point():
            return torch.div(a, b)
        return torch.div(a, b, rounding_mode="trunc")

    return div


@register_op("Pow")
def _pow(node: BuildNode) -> Kernel:
    if node.is_const(1) and np.asarray(node.inputs[1].value).size == 1 and not node.inputs[1].param_candidate:
        e = np.asarray(node.const(1)).item()
        if e == 2:
            return lambda x: x * x
        return lambda x: torch.pow(x, e).to(x.dtype)
    return lambda x, y: torch.pow(x, y).to(x.dtype)


@register_op("Mod")
def _mod(node: BuildNode) -> Kernel:
    return torch.fmod if node.attr("fmod", 0) else torch.remainder


def _variadic(op: Callable[[Any, Any], Any]) -> Callable[[BuildNode], Kernel]:
    def build(node: BuildNode) -> Kernel:
        def run(*xs: torch.Tensor) -> torch.Tensor:
            out = xs[0]
            for x in xs[1:]:
                out = op(out, x)
            return out

        return run

    return build


register_op("Max")(_variadic(torch.maximum))
register_op("Min")(_variadic(torch.minimum))
register_op("Sum")(_variadic(torch.add))


@register_op("Mean")
def _mean(node: BuildNode) -> Kernel:
    add = _variadic(torch.add)(node)
    return lambda *xs: add(*xs) / len(xs)


# --- convolution ------------------------------------------------------------------------------------


def _conv_nd(node: BuildNode) -> int:
    for i in (1, 0):
        r = node.rank(i)
        if r is not None:
            return r - 2
    ks = node.attr("kernel_shape")
    if ks is not None:
        return len(ks)
    raise node.error("cannot tell the number of spatial dims (no shapes known for X or W)")


def _kernel_from_weight(node: BuildNode) -> list[int] | None:
    w = node.static_shape(1)
    return list(w[2:]) if w is not None else None


@register_op("Conv")
def _conv(node: BuildNode) -> Kernel:
    node.weight(1, 2)
    nd = _conv_nd(node)
    if nd not in _CONV:
        raise node.error(f"{nd}-d convolution is not supported (1-d to 3-d are)")
    conv = _CONV[nd]
    strides, dilations, pads = _spatial_attrs(node, nd)
    groups = int(node.attr("group", 1))
    auto_pad = _auto_pad(node)
    if auto_pad == "VALID":
        pads = [0] * (2 * nd)
    kernel = as_ints(node.attr("kernel_shape")) or _kernel_from_weight(node)
    strides_t, dil_t = tuple(strides), tuple(dilations)

    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        xshape = node.shape(0)
        if kernel is not None and xshape is not None and None not in xshape[2:]:
            pads = _same_pads(xshape[2:], kernel, strides, dilations, auto_pad)  # type: ignore[arg-type]
        else:
            def conv_same(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
                p = _same_pads(x.shape[2:], w.shape[2:], strides, dilations, auto_pad)
                return conv(F.pad(x, _torch_pad(p)), w, b, strides_t, 0, dil_t, groups)

            return conv_same

    if pads[:nd] == pads[nd:]:
        padding = tuple(pads[:nd])

        def conv_sym(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
            return conv(x, w, b, strides_t, padding, dil_t, groups)

        return conv_sym
    tpad = _torch_pad(pads)

    def conv_asym(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return conv(F.pad(x, tpad), w, b, strides_t, 0, dil_t, groups)

    return conv_asym


@register_op("ConvTranspose")
def _conv_transpose(node: BuildNode) -> Kernel:
    node.weight(1, 2)
    nd = _conv_nd(node)
    if nd not in _CONV_T:
        raise node.error(f"{nd}-d transposed convolution is not supported (1-d to 3-d are)")
    convt = _CONV_T[nd]
    strides, dilations, pads = _spatial_attrs(node, nd)
    groups = int(node.attr("group", 1))
    out_pad = as_ints(node.attr("output_padding")) or [0] * nd
    out_shape = as_ints(node.attr("output_shape"))
    auto_pad = _auto_pad(node)
    kernel = as_ints(node.attr("kernel_shape")) or _kernel_from_weight(node)

    def pads_for(in_sizes: Sequence[int], k: Sequence[int]) -> list[int]:
        if out_shape is None and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            return [0] * (2 * nd) if auto_pad == "VALID" else pads
        target = out_shape[-nd:] if out_shape is not None else [n * s for n, s in zip(in_sizes, strides, strict=True)]
        begin, end = [], []
        for i in range(nd):
            total = strides[i] * (in_sizes[i] - 1) + out_pad[i] + (k[i] - 1) * dilations[i] + 1 - target[i]
            if auto_pad == "SAME_UPPER":
                b, e = total // 2, total - total // 2
            else:
                b, e = total - total // 2, total // 2
            begin.append(b)
            end.append(e)
        return begin + end

    def run_with(p: list[int]) -> Kernel:
        if p[:nd] == p[nd:] and all(v >= 0 for v in p) and all(
            o < max(s, d) for o, s, d in zip(out_pad, strides, dilations, strict=True)
        ):
            args = (tuple(strides), tuple(p[:nd]), tuple(out_pad), groups, tuple(dilations))
            return lambda x, w, b=None: convt(x, w, b, args[0], args[1], args[2], args[3], args[4])
        # Asymmetric or negative pads: full transposed conv, then crop / extend, then the bias.
        crop = [-v for v in p[:nd]] + [o - e for o, e in zip(out_pad, p[nd:], strict=True)]
        tcrop = _torch_pad(crop)

        def general(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
            y = F.pad(convt(x, w, None, tuple(strides), 0, 0, groups, tuple(dilations)), tcrop)
            return y if b is None else y + b.reshape((1, -1) + _ones_like_shape(nd))

        return general

    needs_input = out_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER")
    if not needs_input:
        return run_with(pads_for([], []))
    xshape = node.shape(0)
    if kernel is not None and xshape is not None and None not in xshape[2:]:
        return run_with(pads_for(xshape[2:], kernel))  # type: ignore[arg-type]

    def dynamic(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        k = run_with(pads_for(list(x.shape[2:]), list(w.shape[2:])))
        return k(x, w) if b is None else k(x, w, b)

    return dynamic


# --- normalization ----------------------------------------------------------------------------------


@register_op("BatchNormalization", since_version=1)
def _batch_norm(node: BuildNode) -> Kernel:
    """Inference unless the node asks for training (ONNX ``training_mode``) or the module trains.

    A node in training mode (``training_mode=1``, or no ``is_test`` before opset 7) computes what
    the ONNX spec says, running statistics as outputs included (biased batch variance). A node in
    inference mode follows the module: in ``module.train()`` it normalises with batch statistics and
    updates its running statistics in place like ``torch.nn.BatchNorm`` (torch momentum =
    1 - ONNX momentum, unbiased variance for the running variance), so that a lowered network trains
    exactly like the PyTorch network it was exported from.
    """
    node.weight(1, 2)
    node.buffer(3, 4)
    eps = float(node.attr("epsilon", 1e-5))
    momentum = float(node.attr("momentum", 0.9))
    module = node.module
    if node.opset >= 14:
        onnx_training = bool(node.attr("training_mode", 0))
    elif node.opset >= 7:
        onnx_training = node.num_outputs > 1 and any(node.outputs_used[1:])
    else:
        onnx_training = not node.attr("is_test", 0)
    if node.opset < 9 and node.attr("spatial", 1) == 0:
        raise node.error("BatchNormalization with spatial=0 is not supported")

    if onnx_training:
        n_out = node.num_outputs

        def bn_onnx_train(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rm: torch.Tensor,
                          rv: torch.Tensor) -> Any:
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            y = F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
            outs = (y, rm * momentum + mean * (1 - momentum), rv * momentum + var * (1 - momentum), mean, var)
            return outs[0] if n_out == 1 else outs[:n_out]

        return bn_onnx_train

    torch_momentum = 1.0 - momentum

    def bn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
        if module.training:
            return F.batch_norm(x, rm, rv, w, b, True, torch_momentum, eps)
        return F.batch_norm(x, rm, rv, w, b, False, 0.0, eps)

    return bn


@register_op("InstanceNormalization")
def _instance_norm(node: BuildNode) -> Kernel:
    node.weight(1, 2)
    eps = float(node.attr("epsilon", 1e-5))
    return lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=eps)


@register_op("GroupNormalization", since_version=18)
def _group_norm(node: BuildNode) -> Kernel:
    node.weight(1, 2)
    eps = float(node.attr("epsilon", 1e-5))
    groups = int(node.attr("num_groups"))
    per_group = node.opset < 21

    def gn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if per_group:  # opset 18: one scale per group
            c = x.shape[1] // groups
            w, b = w.repeat_interleave(c), b.repeat_interleave(c)
        return F.group_norm(x, groups, w, b, eps)

    return gn


@register_op("LayerNormalization", since_version=17)
def _layer_norm(node: BuildNode) -> Kernel:
    node.weight(1, 2)
    axis = int(node.attr("axis", -1))
    eps = float(node.attr("epsilon", 1e-5))
    stash = int(node.attr("stash_type", 1))
    n_out = node.num_outputs
    xshape = node.shape(0)
    wshape = node.shape(1)
    extra_outputs = n_out > 1 and any(node.outputs_used[1:])
    if not extra_outputs and xshape is not None and wshape is not None and None not in wshape:
        norm_shape = tuple(xshape[_axis(axis, len(xshape)):])
        if tuple(wshape) == norm_shape and None not in norm_shape:
            shape_t = tuple(int(d) for d in norm_shape)  # type: ignore[arg-type]

            def ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> Any:
                y = F.layer_norm(x, shape_t, w, b, eps)
                return y if n_out == 1 else (y,) + (None,) * (n_out - 1)

            return ln

    def ln_general(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> Any:
        a = _axis(axis, x.dim())
        dims = tuple(range(a, x.dim()))
        xs = x.to(torch.float32) if stash == 1 and x.dtype != torch.float64 else x
        mean = xs.mean(dims, keepdim=True)
        var = ((xs - mean) ** 2).mean(dims, keepdim=True)
        inv = torch.rsqrt(var + eps)
        y = ((xs - mean) * inv).to(x.dtype) * w
        if b is not None:
            y = y + b
        if n_out == 1:
            return y
        return (y, mean, inv)[:n_out]

    return ln_general


@register_op("LRN")
def _lrn(node: BuildNode) -> Kernel:
    size = int(node.attr("size"))
    alpha, beta, bias = float(node.attr("alpha", 1e-4)), float(node.attr("beta", 0.75)), float(node.attr("bias", 1.0))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2

    def lrn(x: torch.Tensor) -> torch.Tensor:
        sq = F.pad((x * x).movedim(1, -1), [before, after])
        s = sq.unfold(-1, size, 1).sum(-1).movedim(-1, 1)
        return x / (bias + (alpha / size) * s) ** beta

    return lrn


@register_op("MeanVarianceNormalization")
def _mvn(node: BuildNode) -> Kernel:
    axes = tuple(as_ints(node.attr("axes")) or [0, 2, 3])

    def mvn(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(axes, keepdim=True)
        var = ((x - mean) ** 2).mean(axes, keepdim=True)
        return (x - mean) / (var.sqrt() + 1e-9)

    return mvn


@register_op("LpNormalization")
def _lp_norm(node: BuildNode) -> Kernel:
    axis, p = int(node.attr("axis", -1)), int(node.attr("p", 2))

    def lpn(x: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)
        return x / torch.where(n == 0, torch.ones_like(n), n)  # a zero vector stays zero

    return lpn


def _dropout(node: BuildNode) -> Kernel:
    """Identity in inference; in ``module.train()`` (or ONNX ``training_mode`` true) it drops."""
    module = node.module
    n_out = node.num_outputs
    want_mask = n_out > 1 and node.outputs_used[1]

    def make(ratio_v: Any, training_v: Any, runtime: bool = False) -> Kernel:
        ratio = 0.5 if ratio_v is None else float(np.asarray(ratio_v).item())
        forced = False if training_v is None else bool(np.asarray(training_v).item())

        def dropout(x: torch.Tensor) -> Any:
            if not (forced or module.training) or ratio == 0.0:
                y = x
                mask = torch.ones_like(x, dtype=torch.bool) if want_mask else None
            elif not want_mask:
                y, mask = F.dropout(x, ratio, True), None
            else:
                mask = torch.rand_like(x, dtype=torch.float32) >= ratio
                y = x * mask / (1.0 - ratio)
            return y if n_out == 1 else (y, mask)

        return dropout

    if node.opset >= 12:
        return _operands(node, [1, 2], make)
    if node.opset < 7 and node.attr("is_test", 0):
        return make(0.0, None)
    return make(node.attr("ratio", 0.5), None)


register_op("Dropout", foldable=False)(_dropout)


# --- pooling ----------------------------------------------------------------------------------------


def _pool_out_size(n: int, k: int, s: int, d: int, pb: int, pe: int, ceil: bool) -> int:
    span = (k - 1) * d + 1
    if ceil:
        out = -(-(n + pb + pe - span) // s) + 1
        if (out - 1) * s >= n + pb:  # windows starting in the right padding are dropped
            out -= 1
        return out
    return (n + pb + pe - span) // s + 1


def _pool_geometry(node: BuildNode, nd: int) -> tuple[list[int], list[int], list[int], list[int], bool, str]:
    kernel = as_ints(node.attr("kernel_shape"))
    if kernel is None:
        raise node.error("kernel_shape is required")
    strides, dilations, pads = _spatial_attrs(node, nd)
    ceil = bool(node.attr("ceil_mode", 0))
    return kernel, strides, dilations, pads, ceil, _auto_pad(node)


def _pool_pads(in_sizes: Sequence[int], kernel: list[int], strides: list[int], dilations: list[int],
               pads: list[int], auto_pad: str) -> list[int]:
    if auto_pad == "VALID":
        return [0] * (2 * len(kernel))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(in_sizes, kernel, strides, dilations, auto_pad)
    return pads


class _Pool:
    """Max or average pooling for any pads, dilations and ceil mode (ONNX semantics)."""

    def __init__(self, kind: str, kernel: list[int], strides: list[int], dilations: list[int], pads: list[int],
                 ceil: bool, count_include_pad: bool) -> None:
        self.kind, self.kernel, self.strides, self.dilations = kind, kernel, strides, dilations
        self.pads, self.ceil, self.include_pad = pads, ceil, count_include_pad
        self.nd = len(kernel)

    def fast(self) -> Kernel | None:
        """A direct torch call when its semantics are ONNX's for these attributes."""
        nd, k, s, d, p = self.nd, self.kernel, self.strides, self.dilations, self.pads
        if nd not in _MAX_POOL or p[:nd] != p[nd:]:
            return None
        pad = tuple(p[:nd])
        if any(pi * 2 > (ki - 1) * di + 1 for pi, ki, di in zip(pad, k, d, strict=True)):
            return None
        kt, st, dt, ceil = tuple(k), tuple(s), tuple(d), self.ceil
        if self.kind == "max":
            max_fn = _MAX_POOL[nd]
            return lambda x: max_fn(x, kt, st, pad, dt, ceil)
        if any(di != 1 for di in d) or ceil or any(pi * 2 > ki for pi, ki in zip(pad, k, strict=True)):
            return None
        avg_fn: Any = _AVG_POOL[nd]
        include = self.include_pad
        return lambda x: avg_fn(x, kt, st, pad, False, include)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        nd, k, s, d = self.nd, self.kernel, self.strides, self.dilations
        sizes = x.shape[2:]
        outs = [_pool_out_size(n, k[i], s[i], d[i], self.pads[i], self.pads[nd + i], self.ceil)
                for i, n in enumerate(sizes)]
        # Pad so that exactly `outs` windows fit: the explicit pads, plus what ceil mode overhangs.
        begin = list(self.pads[:nd])
        end = []
        for i, n in enumerate(sizes):
            need = (outs[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1
            end.append(max(need - n - begin[i], 0))
        tpad = _torch_pad(begin + end)
        if self.kind == "max":
            low = torch.finfo(x.dtype).min if x.is_floating_point() else torch.iinfo(x.dtype).min
            xp = F.pad(x, tpad, value=float("-inf") if x.is_floating_point() else low)
            if nd in _MAX_POOL:
                y = _MAX_POOL[nd](xp, tuple(k), tuple(s), 0, tuple(d), False)
            else:
                raise NotImplementedError(f"{nd}-d max pooling")
            return y[tuple([slice(None), slice(None)] + [slice(0, o) for o in outs])]
        total = self._window_sum(F.pad(x, tpad))
        total = total[tuple([slice(None), slice(None)] + [slice(0, o) for o in outs])]
        count = self._counts(sizes, outs, x)
        return total / count

    def _window_sum(self, xp: torch.Tensor) -> torch.Tensor:
        nd = self.nd
        flat = xp.reshape((-1, 1) + tuple(xp.shape[2:]))
        w = torch.ones((1, 1) + tuple(self.kernel), dtype=xp.dtype, device=xp.device)
        y = _CONV[nd](flat, w, None, tuple(self.strides), 0, tuple(self.dilations))
        return y.reshape(tuple(xp.shape[:2]) + tuple(y.shape[2:]))

    def _counts(self, sizes: Sequence[int], outs: list[int], x: torch.Tensor) -> torch.Tensor:
        """Elements per window: inside the input, or inside input + explicit pads."""
        nd = self.nd
        total = None
        for i, n in enumerate(sizes):
            lo = -self.pads[i] if self.include_pad else 0
            hi = n + self.pads[nd + i] if self.include_pad else n
            starts = np.arange(outs[i]) * self.strides[i] - self.pads[i]
            taps = starts[:, None] + np.arange(self.kernel[i])[None, :] * self.dilations[i]
            cnt = ((taps >= lo) & (taps < hi)).sum(1).astype(np.float64)
            shape = [1] * nd
            shape[i] = outs[i]
            c = cnt.reshape(shape)
            total = c if total is None else total * c
        return torch.as_tensor(total, dtype=x.dtype, device=x.device)


def _build_pool(node: BuildNode, kind: str) -> Kernel:
    rank = node.rank(0)
    kernel = as_ints(node.attr("kernel_shape"))
    nd = len(kernel) if kernel else (rank - 2 if rank else 2)
    kernel_, strides, dilations, pads, ceil, auto_pad = _pool_geometry(node, nd)
    include = bool(node.attr("count_include_pad", 0))
    n_out = node.num_outputs
    if kind == "max" and n_out > 1 and node.outputs_used[1]:
        return _max_pool_with_indices(node, nd, kernel_, strides, dilations, pads, ceil, auto_pad)

    def wrap(k: Kernel) -> Kernel:
        return k if n_out == 1 else (lambda x: (k(x), None))

    xshape = node.shape(0)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if xshape is None or None in xshape[2:]:
            def dyn(x: torch.Tensor) -> torch.Tensor:
                p = _pool_pads(x.shape[2:], kernel_, strides, dilations, pads, auto_pad)
                return _Pool(kind, kernel_, strides, dilations, p, ceil, include)(x)

            return wrap(dyn)
        pads = _pool_pads(xshape[2:], kernel_, strides, dilations, pads, auto_pad)  # type: ignore[arg-type]
    elif auto_pad == "VALID":
        pads = [0] * (2 * nd)
    pool = _Pool(kind, kernel_, strides, dilations, pads, ceil, include)
    return wrap(pool.fast() or pool)


def _max_pool_with_indices(node: BuildNode, nd: int, kernel: list[int], strides: list[int], dilations: list[int],
                           pads: list[int], ceil: bool, auto_pad: str) -> Kernel:
    """MaxPool with its Indices output: flat indices into the whole input tensor, as ONNX has them."""
    xshape = node.shape(0)
    if auto_pad != "NOTSET" or pads[:nd] != pads[nd:] or nd not in _MAX_POOL:
        raise node.error("MaxPool's Indices output is supported only with symmetric explicit pads")
    if any(p * 2 > (k - 1) * d + 1 for p, k, d in zip(pads[:nd], kernel, dilations, strict=True)):
        raise node.error("MaxPool's Indices output is not supported with pads over half the window")
    column_major = bool(node.attr("storage_order", 0))
    if column_major and nd != 2:
        raise node.error("storage_order=1 is supported for 2-d MaxPool only")
    fn = _MAX_POOL[nd]
    args = (tuple(kernel), tuple(strides), tuple(pads[:nd]), tuple(dilations), ceil)
    del xshape

    def max_pool_idx(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, idx = fn(x, *args, return_indices=True)
        if column_major:
            h, w = x.shape[2], x.shape[3]
            idx = (idx % w) * h + idx // w
        plane = math.prod(x.shape[2:])
        base = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[:2] + (1,) * nd) * plane
        return y, idx + base

    return max_pool_idx


@register_op("MaxPool")
def _max_pool(node: BuildNode) -> Kernel:
    return _build_pool(node, "max")


@register_op("AveragePool")
def _avg_pool(node: BuildNode) -> Kernel:
    return _build_pool(node, "avg")


@register_op("GlobalAveragePool")
def _global_avg_pool(node: BuildNode) -> Kernel:
    def gap(x: torch.Tensor) -> torch.Tensor:
        return x.mean(tuple(range(2, x.dim())), keepdim=True)

    return gap


@register_op("GlobalMaxPool")
def _global_max_pool(node: BuildNode) -> Kernel:
    def gmp(x: torch.Tensor) -> torch.Tensor:
        return x.amax(tuple(range(2, x.dim())), keepdim=True)

    return gmp


# --- reductions -------------------------------------------------------------------------------------


def _reduce(fn: Callable[[torch.Tensor, tuple[int, ...] | None, bool], torch.Tensor],
            axes_input_since: int) -> Callable[[BuildNode], Kernel]:
    def build(node: BuildNode) -> Kernel:
        keep = bool(node.attr("keepdims", 1))
        noop = bool(node.attr("noop_with_empty_axes", 0)) and node.opset >= axes_input_since

        def make(axes_v: Any, runtime: bool = False) -> Kernel:
            axes = as_ints(axes_v)
            if not axes:
                if noop:
                    return lambda x: x
                return lambda x: fn(x, tuple(range(x.dim())), keep)
            ax = tuple(axes)
            return lambda x: fn(x, ax, keep)

        if node.opset >= axes_input_since:
            return _operands(node, [1], make)
        return make(node.attr("axes"))

    return build


def _extreme(x: torch.Tensor, dims: tuple[int, ...], keep: bool, largest: bool) -> torch.Tensor:
    if x.numel() == 0:  # ONNX: the reduction of an empty set is the identity element
        dims_n = {_axis(d, x.dim()) for d in dims}
        shape = [1 if i in dims_n else n for i, n in enumerate(x.shape) if keep or i not in dims_n]
        if x.dtype == torch.bool:
            fill: Any = not largest
        elif x.is_floating_point():
            fill = -math.inf if largest else math.inf
        else:
            info = torch.iinfo(x.dtype)
            fill = info.min if largest else info.max
        return torch.full(shape, fill, dtype=x.dtype, device=x.device)
    return x.amax(dims, keepdim=keep) if largest else x.amin(dims, keepdim=keep)


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted((_axis(d, x.dim()) for d in dims), reverse=True):
        x = x.prod(d, keepdim=keep)
    return x


_REDUCERS: dict[str, tuple[Callable[[torch.Tensor, Any, bool], torch.Tensor], int]] = {
    "ReduceMean": (lambda x, d, k: x.mean(d, keepdim=k), 18),
    "ReduceSum": (lambda x, d, k: x.sum(d, keepdim=k), 13),
    "ReduceMax": (lambda x, d, k: _extreme(x, d, k, True), 18),
    "ReduceMin": (lambda x, d, k: _extreme(x, d, k, False), 18),
    "ReduceProd": (_prod, 18),
    "ReduceL1": (lambda x, d, k: x.abs().sum(d, keepdim=k), 18),
    "ReduceL2": (lambda x, d, k: (x * x).sum(d, keepdim=k).sqrt(), 18),
    "ReduceSumSquare": (lambda x, d, k: (x * x).sum(d, keepdim=k), 18),
    "ReduceLogSum": (lambda x, d, k: x.sum(d, keepdim=k).log(), 18),
    "ReduceLogSumExp": (lambda x, d, k: torch.logsumexp(x, d, keepdim=k), 18),
}
for _name, (_fn, _since) in _REDUCERS.items():
    register_op(_name)(_reduce(_fn, _since))


def _arg_reduce(largest: bool) -> Callable[[BuildNode], Kernel]:
    def build(node: BuildNode) -> Kernel:
        axis = int(node.attr("axis", 0))
        keep = bool(node.attr("keepdims", 1))
        last = bool(node.attr("select_last_index", 0))
        fn = torch.argmax if largest else torch.argmin

        def arg(x: torch.Tensor) -> torch.Tensor:
            if not last:
                return fn(x, axis, keepdim=keep)
            a = _axis(axis, x.dim())
            return x.shape[a] - 1 - fn(x.flip(a), a, keepdim=keep)

        return arg

    return build


register_op("ArgMax")(_arg_reduce(True))
register_op("ArgMin")(_arg_reduce(False))


# --- linear algebra ---------------------------------------------------------------------------------


@register_op("Gemm")
def _gemm(node: BuildNode) -> Kernel:
    node.weight(1, 2)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    ta, tb = int(node.attr("transA", 0)), int(node.attr("transB", 0))
    cshape = node.shape(2)
    if alpha == 1.0 and beta == 1.0 and not ta and tb and (not node.has_input(2) or (cshape is not None and len(cshape) == 1)):
        return F.linear

    def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        y = (a.t() if ta else a) @ (b.t() if tb else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c if beta == 1.0 else c * beta)
        return y

    return gemm


@register_op("MatMul")
def _matmul(node: BuildNode) -> Kernel:
    node.weight(0, 1)
    return torch.matmul


@register_op("Einsum")
def _einsum(node: BuildNode) -> Kernel:
    eq = node.attr("equation")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    return lambda *xs: torch.einsum(eq, *xs)


@register_op("Det")
def _det(node: BuildNode) -> Kernel:
    return torch.linalg.det


# --- tensor manipulation ----------------------------------------------------------------------------


@register_op("Flatten")
def _flatten(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis", 1))
    static = node.static_shape(0)
    if static is not None:
        a = _axis(axis, len(static))
        target = (math.prod(static[:a]), math.prod(static[a:]))
        return lambda x: x.reshape(target)

    def flatten(x: torch.Tensor) -> torch.Tensor:
        a = _axis(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return flatten


def _reshape_target(in_shape: Sequence[int], shape: list[int], allowzero: bool) -> list[int]:
    out = [in_shape[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        total = math.prod(in_shape)
        out[out.index(-1)] = total // known if known else 0
    return out


@register_op("Reshape", since_version=5)
def _reshape(node: BuildNode) -> Kernel:
    allowzero = bool(node.attr("allowzero", 0))
    if node.is_const(1):
        shape = as_ints(node.const(1)) or []
        static = node.static_shape(0)
        if static is not None:
            target = tuple(_reshape_target(static, shape, allowzero))
            return lambda x: x.reshape(target)
        if allowzero or 0 not in shape:
            t = tuple(shape)
            return lambda x: x.reshape(t)
        return lambda x: x.reshape(_reshape_target(x.shape, shape, allowzero))
    return lambda x, s: x.reshape(_reshape_target(x.shape, s.tolist(), allowzero))


@register_op("Transpose")
def _transpose(node: BuildNode) -> Kernel:
    perm = as_ints(node.attr("perm"))
    if perm is None:
        return lambda x: x.permute(tuple(reversed(range(x.dim()))))
    p = tuple(perm)
    return lambda x: x.permute(p)


@register_op("Concat")
def _concat(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis"))
    return lambda *xs: torch.cat(xs, axis)


@register_op("Split")
def _split(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis", 0))
    num = int(node.attr("num_outputs", node.num_outputs))

    def make(split_v: Any, runtime: bool = False) -> Kernel:
        split = as_ints(split_v)
        if split:
            return lambda x: torch.split(x, split, axis)

        def split_even(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.split(x, -(-x.shape[axis] // num), axis)

        return split_even

    if node.opset >= 13:
        return _operands(node, [1], make)
    return make(node.attr("split"))


def _slice_index(dims: Sequence[int] | None, rank: int, starts: list[int], ends: list[int], axes: list[int],
                 steps: list[int]) -> tuple[Any, ...] | None:
    """An indexing tuple for positive steps; ``None`` when a negative step needs the dim sizes."""
    idx: list[Any] = [slice(None)] * rank
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = _axis(a, rank)
        if st > 0:
            idx[a] = slice(s, e, st)
        elif dims is None:
            return None
        else:
            r = range(dims[a])[slice(s, e, st)]
            idx[a] = torch.arange(r.start, r.stop, r.step) if len(r) else slice(0, 0)
    return tuple(idx)


@register_op("Slice", since_version=1)
def _slice_v1(node: BuildNode) -> Kernel:
    starts, ends = as_ints(node.attr("starts")) or [], as_ints(node.attr("ends")) or []
    axes = as_ints(node.attr("axes")) or list(range(len(starts)))
    return _slice_kernel(node, starts, ends, axes, [1] * len(starts))


@register_op("Slice", since_version=10)
def _slice(node: BuildNode) -> Kernel:
    if all(node.is_const(i) or not node.has_input(i) for i in (1, 2, 3, 4)):
        starts, ends = as_ints(node.const(1)) or [], as_ints(node.const(2)) or []
        axes = as_ints(node.const(3)) or list(range(len(starts)))
        steps = as_ints(node.const(4)) or [1] * len(starts)
        return _slice_kernel(node, starts, ends, axes, steps)
    present = [node.has_input(i) for i in (3, 4)]

    def dyn_slice(x: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        it = iter(rest)
        axes = next(it).tolist() if present[0] else list(range(len(starts)))
        steps = next(it).tolist() if present[1] else [1] * len(starts)
        idx = _slice_index(x.shape, x.dim(), starts.tolist(), ends.tolist(), axes, steps)
        return _apply_index(x, idx)  # type: ignore[arg-type]

    return dyn_slice


def _apply_index(x: torch.Tensor, idx: tuple[Any, ...]) -> torch.Tensor:
    tensors = [i for i, v in enumerate(idx) if isinstance(v, torch.Tensor)]
    if not tensors:
        return x[idx]
    plain = tuple(slice(None) if isinstance(v, torch.Tensor) else v for v in idx)
    y = x[plain]
    for a in tensors:
        y = y.index_select(a, idx[a].to(y.device))
    return y


def _slice_kernel(node: BuildNode, starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> Kernel:
    rank = node.rank(0)
    dims = node.static_shape(0)
    if rank is not None:
        idx = _slice_index(dims, rank, starts, ends, axes, steps)
        if idx is not None:
            if not any(isinstance(v, torch.Tensor) for v in idx):
                return lambda x: x[idx]
            return lambda x: _apply_index(x, idx)
    return lambda x: _apply_index(x, _slice_index(x.shape, x.dim(), starts, ends, axes, steps))  # type: ignore[arg-type]


@register_op("Gather")
def _gather(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis", 0))
    if node.is_const(1) and np.asarray(node.inputs[1].value).ndim == 0:
        i = int(np.asarray(node.const(1)))
        return lambda x: x.select(axis, i)

    def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = _axis(axis, x.dim())
        return x[(slice(None),) * a + (idx,)]

    return gather


@register_op("GatherElements")
def _gather_elements(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis", 0))

    def ge(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = _axis(axis, x.dim())
        return torch.gather(x, a, torch.where(idx < 0, idx + x.shape[a], idx))

    return ge


@register_op("Squeeze")
def _squeeze(node: BuildNode) -> Kernel:
    def make(axes_v: Any, runtime: bool = False) -> Kernel:
        axes = as_ints(axes_v)
        if not axes:
            return lambda x: x.squeeze()
        ax = tuple(axes)
        return lambda x: x.squeeze(ax)

    return _attr_or_input(node, "axes", 1, make)


@register_op("Unsqueeze")
def _unsqueeze(node: BuildNode) -> Kernel:
    static = node.static_shape(0)
    rank = node.rank(0)

    def make(axes_v: Any, runtime: bool = False) -> Kernel:
        axes = as_ints(axes_v)
        if axes is None:
            raise node.error("Unsqueeze needs axes")

        def targets(r: int) -> list[int]:
            return sorted(_axis(a, r + len(axes)) for a in axes)

        if static is not None:
            shape = list(static)
            for a in targets(len(static)):
                shape.insert(a, 1)
            t = tuple(shape)
            return lambda x: x.reshape(t)
        ts = targets(rank) if rank is not None else None

        def unsqueeze(x: torch.Tensor) -> torch.Tensor:
            for a in ts if ts is not None else targets(x.dim()):
                x = x.unsqueeze(a)
            return x

        return unsqueeze

    return _attr_or_input(node, "axes", 1, make)


@register_op("Expand")
def _expand(node: BuildNode) -> Kernel:
    def target(in_shape: Sequence[int], shape: list[int]) -> list[int]:
        return list(torch.broadcast_shapes(tuple(in_shape), tuple(shape)))

    if node.is_const(1):
        shape = as_ints(node.const(1)) or []
        static = node.static_shape(0)
        if static is not None:
            t = tuple(target(static, shape))
            return lambda x: x.expand(t)
        return lambda x: x.expand(target(x.shape, shape))
    return lambda x, s: x.expand(target(x.shape, s.tolist()))


@register_op("Tile")
def _tile(node: BuildNode) -> Kernel:
    if node.is_const(1):
        reps = tuple(as_ints(node.const(1)) or [])
        return lambda x: x.repeat(reps)
    return lambda x, r: x.repeat(tuple(r.tolist()))


@register_op("Trilu")
def _trilu(node: BuildNode) -> Kernel:
    upper = bool(node.attr("upper", 1))
    fn = torch.triu if upper else torch.tril
    if node.has_input(1):
        if node.is_const(1):
            k = int(np.asarray(node.const(1)).item())
            return lambda x: fn(x, k)
        return lambda x, k: fn(x, int(k.item()))
    return lambda x: fn(x, 0)


@register_op("CumSum")
def _cumsum(node: BuildNode) -> Kernel:
    exclusive, reverse = bool(node.attr("exclusive", 0)), bool(node.attr("reverse", 0))

    def cumsum(x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        a = _axis(int(axis.item()), x.dim())
        y = x.flip(a) if reverse else x
        c = torch.cumsum(y, a, dtype=x.dtype)
        if exclusive:
            c = c - y
        return c.flip(a) if reverse else c

    return cumsum


@register_op("DepthToSpace")
def _depth_to_space(node: BuildNode) -> Kernel:
    b = int(node.attr("blocksize"))
    mode = node.attr("mode", "DCR")

    def d2s(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (b * b), h * b, w * b)

    return d2s


@register_op("SpaceToDepth")
def _space_to_depth(node: BuildNode) -> Kernel:
    b = int(node.attr("blocksize"))
    perm = (0, 1, 3, 5, 2, 4) if node.attr("mode", "DCR") == "CRD" else (0, 3, 5, 1, 2, 4)

    def s2d(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b).permute(perm)
        return y.reshape(n, c * b * b, h // b, w // b)

    return s2d


# --- softmax family ---------------------------------------------------------------------------------


def _softmax_like(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[[BuildNode], Kernel]:
    def build(node: BuildNode) -> Kernel:
        if node.opset >= 13:
            axis = int(node.attr("axis", -1))
            return lambda x: fn(x, axis)
        axis = int(node.attr("axis", 1))

        def coerced(x: torch.Tensor) -> torch.Tensor:
            # Before opset 13 the input is viewed as 2-D [prod(:axis), prod(axis:)].
            a = _axis(axis, x.dim())
            return fn(x.reshape(math.prod(x.shape[:a]), -1), 1).reshape(x.shape)

        return coerced

    return build


def _hardmax(x: torch.Tensor, axis: int) -> torch.Tensor:
    a = _axis(axis, x.dim())
    return F.one_hot(x.argmax(a), x.shape[a]).movedim(-1, a).to(x.dtype)


register_op("Softmax")(_softmax_like(lambda x, a: torch.softmax(x, a)))
register_op("LogSoftmax")(_softmax_like(lambda x, a: torch.log_softmax(x, a)))
register_op("Hardmax")(_softmax_like(_hardmax))


# --- padding ----------------------------------------------------------------------------------------


def _pad_indices(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source indices along one axis for reflect / edge / wrap padding (negative pads crop)."""
    idx = np.arange(-before, n + after)
    if mode == "edge":
        return np.clip(idx, 0, n - 1)
    if mode == "wrap":
        return np.mod(idx, n)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


def _pad_general(x: torch.Tensor, pads: list[int], axes: list[int], mode: str, value: Any) -> torch.Tensor:
    k = len(axes)
    if mode == "constant":
        full = [0] * (2 * x.dim())
        for i, a in enumerate(axes):
            full[a], full[x.dim() + a] = pads[i], pads[k + i]
        return F.pad(x, _torch_pad(full), value=value)
    for i, a in enumerate(axes):
        b, e = pads[i], pads[k + i]
        if b == 0 and e == 0:
            continue
        idx = _pad_indices(x.shape[a], b, e, mode)
        x = x.index_select(a, torch.as_tensor(idx, device=x.device))
    return x


@register_op("Pad", since_version=1)
def _pad(node: BuildNode) -> Kernel:
    mode = node.attr("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise node.error(f"Pad mode '{mode}' is not supported")
    rank = node.rank(0)
    static = node.static_shape(0)

    def make(pads_v: Any, value_v: Any, axes_v: Any, runtime: bool = False) -> Kernel:
        pads = as_ints(pads_v) or []
        flat = np.asarray(0.0 if value_v is None else value_v).reshape(-1)
        value = flat[0].item() if flat.size else 0
        axes = as_ints(axes_v)

        def resolve_axes(r: int) -> list[int]:
            return [_axis(a, r) for a in axes] if axes is not None else list(range(r))

        if rank is None:
            return lambda x: _pad_general(x, pads, resolve_axes(x.dim()), mode, value)
        ax = resolve_axes(rank)
        if mode == "constant":
            full = [0] * (2 * rank)
            for i, a in enumerate(ax):
                full[a], full[rank + a] = pads[i], pads[len(ax) + i]
            tp = _torch_pad(full)
            # F.pad takes pairs from the last dim backwards: drop the leading dims' zero pairs.
            while tp and tp[-1] == 0 and tp[-2] == 0:
                tp = tp[:-2]
            return lambda x: F.pad(x, tp, value=value)
        if static is None:
            return lambda x: _pad_general(x, pads, ax, mode, value)
        plans = []
        for i, a in enumerate(ax):
            b, e = pads[i], pads[len(ax) + i]
            if b or e:
                plans.append((a, torch.as_tensor(_pad_indices(static[a], b, e, mode))))

        def pad_static(x: torch.Tensor) -> torch.Tensor:
            for a, idx in plans:
                x = x.index_select(a, idx.to(x.device))
            return x

        return pad_static

    if node.opset < 11:
        return make(node.attr("pads", node.attr("paddings")), node.attr("value", 0.0), None)
    return _operands(node, [1, 2, 3], make)


# --- resize -----------------------------------------------------------------------------------------


@register_op("Resize", since_version=10)
def _resize(node: BuildNode) -> Kernel:
    from mtc.lower.resize import build_resize

    return build_resize(node)


@register_op("Upsample", since_version=7)
def _upsample(node: BuildNode) -> Kernel:
    from mtc.lower.resize import build_resize

    return build_resize(node, upsample=True)


# --- sequences (exporters without optimisation emit them for torch.split / chunk) ----------------------


@register_op("SplitToSequence")
def _split_to_sequence(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis", 0))
    keep = bool(node.attr("keepdims", 1))

    def make(split_v: Any, runtime: bool = False) -> Kernel:
        if split_v is not None:
            arr = np.asarray(split_v)
            sizes: Any = int(arr) if arr.ndim == 0 else as_ints(arr)
            return lambda x: list(torch.split(x, sizes, axis))
        if keep:
            return lambda x: list(torch.split(x, 1, axis))
        return lambda x: list(torch.unbind(x, axis))

    return _operands(node, [1], make)


@register_op("SequenceAt")
def _sequence_at(node: BuildNode) -> Kernel:
    if node.is_const(1):
        i = int(np.asarray(node.const(1)).item())
        return lambda seq: seq[i]
    return lambda seq, i: seq[int(i.item())]


@register_op("SequenceConstruct")
def _sequence_construct(node: BuildNode) -> Kernel:
    return lambda *xs: list(xs)


@register_op("SequenceLength")
def _sequence_length(node: BuildNode) -> Kernel:
    return lambda seq: torch.tensor(len(seq), dtype=torch.int64)


@register_op("ConcatFromSequence")
def _concat_from_sequence(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis"))
    new_axis = bool(node.attr("new_axis", 0))
    return (lambda seq: torch.stack(list(seq), axis)) if new_axis else (lambda seq: torch.cat(list(seq), axis))


# --- further ops (covered by the ONNX node tests) -----------------------------------------------------


@register_op("RMSNormalization", since_version=23)
def _rms_norm(node: BuildNode) -> Kernel:
    node.weight(1)
    axis = int(node.attr("axis", -1))
    eps = float(node.attr("epsilon", 1e-5))
    stash = int(node.attr("stash_type", 1))

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(_axis(axis, x.dim()), x.dim()))
        xs = x.to(torch.float32) if stash == 1 and x.dtype != torch.float64 else x
        y = xs * torch.rsqrt((xs * xs).mean(dims, keepdim=True) + eps)
        return y.to(x.dtype) * w

    return rms


@register_op("LpPool", since_version=11)
def _lp_pool(node: BuildNode) -> Kernel:
    p = float(node.attr("p", 2))
    kernel = as_ints(node.attr("kernel_shape"))
    if not kernel:
        raise node.error("kernel_shape is required")
    nd = len(kernel)
    kernel_, strides, dilations, pads, ceil, auto_pad = _pool_geometry(node, nd)

    def lp(x: torch.Tensor) -> torch.Tensor:
        pp = _pool_pads(x.shape[2:], kernel_, strides, dilations, pads, auto_pad)
        pool = _Pool("avg", kernel_, strides, dilations, pp, ceil, True)
        sizes = x.shape[2:]
        outs = [_pool_out_size(n, kernel_[i], strides[i], dilations[i], pp[i], pp[nd + i], ceil)
                for i, n in enumerate(sizes)]
        end = [max((o - 1) * s + (k - 1) * d + 1 - n - b, 0)
               for o, s, k, d, n, b in zip(outs, strides, kernel_, dilations, sizes, pp[:nd], strict=True)]
        total = pool._window_sum(F.pad(x.abs() ** p, _torch_pad(list(pp[:nd]) + end)))
        return total[(slice(None), slice(None), *(slice(0, o) for o in outs))] ** (1.0 / p)

    return lp


@register_op("GlobalLpPool")
def _global_lp_pool(node: BuildNode) -> Kernel:
    p = float(node.attr("p", 2))

    def glp(x: torch.Tensor) -> torch.Tensor:
        return (x.abs() ** p).sum(tuple(range(2, x.dim())), keepdim=True) ** (1.0 / p)

    return glp


@register_op("TopK", since_version=10)
def _topk(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis", -1))
    largest = bool(node.attr("largest", 1))
    # `sorted=0` leaves the order unspecified: sorted output is a valid answer.

    def make(k_v: Any, runtime: bool = False) -> Kernel:
        k = int(np.asarray(k_v).reshape(-1)[0])

        def topk(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # A stable sort keeps ONNX's tie order (the lower index first).
            vals, idx = torch.sort(x, dim=axis, descending=largest, stable=True)
            sl = [slice(None)] * x.dim()
            sl[_axis(axis, x.dim())] = slice(0, k)
            return vals[tuple(sl)], idx[tuple(sl)]

        return topk

    return _operands(node, [1], make)


@register_op("CumProd")
def _cumprod(node: BuildNode) -> Kernel:
    exclusive, reverse = bool(node.attr("exclusive", 0)), bool(node.attr("reverse", 0))

    def cumprod(x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        a = _axis(int(axis.item()), x.dim())
        y = x.flip(a) if reverse else x
        if exclusive:
            ones = torch.ones_like(y.narrow(a, 0, 1))
            y = torch.cat([ones, y.narrow(a, 0, y.shape[a] - 1)], a)
        c = torch.cumprod(y, a, dtype=x.dtype)
        return c.flip(a) if reverse else c

    return cumprod


@register_op("OneHot")
def _one_hot(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis", -1))

    def one_hot(indices: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        d = int(depth.reshape(-1)[0].item())
        idx = indices.to(torch.int64)
        idx = torch.where(idx < 0, idx + d, idx)
        valid = (idx >= 0) & (idx < d)
        hot = F.one_hot(torch.where(valid, idx, torch.zeros_like(idx)), d).bool() & valid.unsqueeze(-1)
        out = torch.where(hot, values[1], values[0])
        return out.movedim(-1, _axis(axis, out.dim()))

    return one_hot


@register_op("EyeLike")
def _eye_like(node: BuildNode) -> Kernel:
    k = int(node.attr("k", 0))
    dtype_code = node.attr("dtype")

    def eye(x: torch.Tensor) -> torch.Tensor:
        dtype = _onnx_dtype(dtype_code) if dtype_code is not None else x.dtype
        ones = torch.ones(x.shape, dtype=torch.int64, device=x.device)
        return ones.triu(k).tril(k).to(dtype)

    return eye


register_op("NonZero")(_elementwise(lambda x: torch.nonzero(x).t()))


@register_op("GatherND")
def _gather_nd(node: BuildNode) -> Kernel:
    b = int(node.attr("batch_dims", 0))

    def gather_nd(data: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        k = indices.shape[-1]
        batch = math.prod(data.shape[:b])
        d = data.reshape((batch, *data.shape[b:]))
        ix = indices.reshape(batch, -1, k)
        ix = torch.where(ix < 0, ix + torch.tensor(d.shape[1:k + 1], device=ix.device), ix)
        bidx = torch.arange(batch, device=data.device)[:, None].expand(batch, ix.shape[1])
        out = d[(bidx, *(ix[..., i] for i in range(k)))]
        return out.reshape(tuple(indices.shape[:-1]) + tuple(data.shape[b + k:]))

    return gather_nd


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@register_op("ScatterElements")
def _scatter_elements(node: BuildNode) -> Kernel:
    axis = int(node.attr("axis", 0))
    reduction = node.attr("reduction", "none")

    def scatter(data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        a = _axis(axis, data.dim())
        idx = torch.where(indices < 0, indices + data.shape[a], indices)
        if reduction == "none":
            return data.scatter(a, idx, updates)
        return data.scatter_reduce(a, idx, updates, _SCATTER_REDUCE[reduction], include_self=True)

    return scatter


@register_op("ScatterND")
def _scatter_nd(node: BuildNode) -> Kernel:
    reduction = node.attr("reduction", "none")

    def scatter_nd(data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        k = indices.shape[-1]
        lead = data.shape[:k]
        strides = torch.tensor([math.prod(lead[i + 1:]) for i in range(k)], device=data.device)
        idx = torch.where(indices < 0, indices + torch.tensor(lead, device=data.device), indices)
        linear = (idx * strides).sum(-1).reshape(-1)
        flat = data.reshape((math.prod(lead), *data.shape[k:]))
        upd = updates.reshape((-1, *data.shape[k:]))
        if reduction == "none":
            out = flat.index_copy(0, linear, upd)
        else:
            expanded = linear.reshape((-1,) + (1,) * (flat.dim() - 1)).expand_as(upd)
            out = flat.scatter_reduce(0, expanded, upd, _SCATTER_REDUCE[reduction], include_self=True)
        return out.reshape(data.shape)

    return scatter_nd


@register_op("Compress")
def _compress(node: BuildNode) -> Kernel:
    axis = node.attr("axis")

    def compress(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        keep = torch.nonzero(cond.reshape(-1)).reshape(-1)
        if axis is None:
            return x.reshape(-1).index_select(0, keep)
        return x.index_select(_axis(int(axis), x.dim()), keep)

    return compress


@register_op("CenterCropPad")
def _center_crop_pad(node: BuildNode) -> Kernel:
    axes_attr = as_ints(node.attr("axes"))

    def make(shape_v: Any, runtime: bool = False) -> Kernel:
        target = as_ints(shape_v) or []

        def ccp(x: torch.Tensor) -> torch.Tensor:
            axes = [_axis(a, x.dim()) for a in axes_attr] if axes_attr else list(range(x.dim()))
            for a, t in zip(axes, target, strict=True):
                n = x.shape[a]
                if t < n:
                    x = x.narrow(a, (n - t) // 2, t)
                elif t > n:
                    pad = [0, 0] * (x.dim() - 1 - a) + [(t - n) // 2, t - n - (t - n) // 2]
                    x = F.pad(x, pad)
            return x

        return ccp

    return _operands(node, [1], make)


@register_op("AffineGrid", since_version=20)
def _affine_grid(node: BuildNode) -> Kernel:
    align = bool(node.attr("align_corners", 0))

    def make(size_v: Any, runtime: bool = False) -> Kernel:
        size = as_ints(size_v) or []
        return lambda theta: F.affine_grid(theta, size, align_corners=align)

    return _operands(node, [1], make)


@register_op("GridSample", since_version=16)
def _grid_sample(node: BuildNode) -> Kernel:
    mode = node.attr("mode", "linear" if node.opset >= 20 else "bilinear")
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode)
    padding = node.attr("padding_mode", "zeros")
    align = bool(node.attr("align_corners", 0))
    return lambda x, grid: F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align)
