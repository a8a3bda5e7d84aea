"""Caffe prototxt front end: a network description becomes an ONNX model with initialised weights.

A ``.prototxt`` holds the architecture only, so every learnable blob is drawn from the layer's
filler (``weight_filler``, ``bias_filler``, ...) with a per-layer random stream derived from
``seed``: the same file and seed always give bit-identical weights.

Both standard BVLC Caffe and the PyTorch-to-Caffe dialect of the bundled AutoMTL backbones are
read (``track_running_stats``, ``relu_param { inplace }``, ``round_mode``, an ``input:`` that the
first layer calls by another name). See ``docs/frontend-prototxt.md`` for the layer mapping.

Blob names are Caffe's, so a top may be rewritten in place (``bottom: "x" top: "x"``). The
converter keeps blob name -> current version (SSA): each top is a new ONNX value, the final
version of a blob keeps the blob's name and earlier versions are ``<blob>/<layer>``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from mtc import __version__
from mtc.errors import MtcError
from mtc.frontends import caffe_pb2 as _caffe_pb2
from mtc.ir import memory
from mtc.ir.names import ORIGIN_KEY
from mtc.ir.opset import MIN_OPSET, TARGET_OPSET
from mtc.ir.seeded import DrawnTensor

# The generated module builds its message classes at import time, out of a type checker's sight.
caffe_pb2: Any = _caffe_pb2
_Msg: TypeAlias = Any  # a caffe_pb2 message

#: Node metadata naming the Scale layer folded into a BatchNormalization node.
FOLDED_KEY = "mtc.folded"

#: Layer types the front end converts.
SUPPORTED_LAYERS = (
    "BatchNorm",
    "Clip",
    "Concat",
    "Convolution",
    "Deconvolution",
    "Dropout",
    "Eltwise",
    "Flatten",
    "InnerProduct",
    "Input",
    "Interp",
    "Pooling",
    "ReLU",
    "ReLU6",
    "Scale",
    "Sigmoid",
    "Softmax",
    "TanH",
    "Upsample",
)

FILLERS = ("bilinear", "constant", "gaussian", "msra", "positive_unitball", "uniform", "xavier")

# (min bottoms, max bottoms or None for any); every converted layer has exactly one top except Input.
_ARITY: dict[str, tuple[int, int | None]] = {
    "Input": (0, 0),
    "Eltwise": (2, None),
    "Concat": (1, None),
}

_TEST = caffe_pb2.TEST

#: Sizes above these are refused before anything is allocated (docs/errors.md).
MAX_NUM_OUTPUT = 1 << 20
MAX_BLOB_VALUES = 1 << 28


class PrototxtWarning(UserWarning):
    """A quirk of the input file that the front end worked around."""


@dataclass(eq=False)
class _Value:
    """One version of a Caffe blob (SSA value)."""

    blob: str
    producer: int  # index into the converter's layer list; -1 for a graph input
    name: str = ""  # ONNX value name
    consumers: list[int] = field(default_factory=list)
    alias_of: _Value | None = None  # Dropout: same tensor under a new blob name
    shape: tuple[int, ...] | None = None

    def source(self) -> _Value:
        v = self
        while v.alias_of is not None:
            v = v.alias_of
        return v


@dataclass(eq=False)
class _Layer:
    index: int  # position in the file: selects the layer's random stream
    proto: _Msg  # LayerParameter
    name: str
    type: str
    inputs: list[_Value] = field(default_factory=list)
    outputs: list[_Value] = field(default_factory=list)
    folded_into: _Layer | None = None  # a Scale absorbed by the BatchNorm before it
    folds: _Layer | None = None  # the Scale a BatchNorm absorbs


def load_prototxt(
    path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    opset: int = TARGET_OPSET,
) -> ir.Model:
    """Convert a Caffe network description into an ONNX model with freshly initialised weights.

    Args:
        path: the ``.prototxt`` file.
        input_shape: shape of the (single) network input; overrides the declared one. The batch
            dimension is kept as given.
        seed: seed of the weight initialisation; the same file and seed give identical weights.
        opset: default-domain opset of the returned model.

    Returns:
        The model: one graph input per declared input blob, one graph output per top that no layer
        consumes, float32 initializers named ``<layer>.weight``, ``<layer>.bias``,
        ``<layer>.running_mean``, ... and every node tagged with ``mtc.origin`` = its layer.

    Raises:
        MtcError: the file is missing or malformed, uses an unsupported layer, reads an undefined
            blob, or the input shape does not fit the network.
    """
    return _Converter(Path(path), input_shape=input_shape, seed=seed, opset=opset).convert()


def _rule_met(rule: _Msg) -> bool:
    """Whether Caffe's inference state (phase TEST, level 0, no stages) meets ``rule``."""
    if rule.HasField("phase") and rule.phase != _TEST:
        return False
    if rule.HasField("min_level") and rule.min_level > 0:
        return False
    if rule.HasField("max_level") and rule.max_level < 0:
        return False
    return not rule.stage


@dataclass(frozen=True)
class _Deferred:
    """A random blob drawn later: its shape and the function that draws it."""

    shape: tuple[int, ...]
    fn: Callable[[], np.ndarray]


def _layer_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), index])))


def _redraw(seed: int, index: int, fn: Callable[..., np.ndarray], a: float, b: float,
            shape: tuple[int, ...]) -> np.ndarray:
    """A deferred blob: the first draw from its layer's stream."""
    return fn(_layer_rng(seed, index), a, b, shape)


def _normal(rng: np.random.Generator, mean: float, std: float, shape: tuple[int, ...]) -> np.ndarray:
    """N(mean, std) drawn in float32, in place (the weights are float32 anyway)."""
    data = memory.empty(shape, np.float32)
    rng.standard_normal(dtype=np.float32, out=data)
    data *= np.float32(std)
    if mean:
        data += np.float32(mean)
    return data


def _uniform(rng: np.random.Generator, low: float, high: float, shape: tuple[int, ...]) -> np.ndarray:
    """U(low, high) drawn in float32, in place."""
    data = memory.empty(shape, np.float32)
    rng.random(dtype=np.float32, out=data)
    data *= np.float32(high - low)
    data += np.float32(low)
    return data


def _fmt_shape(shape: Sequence[int] | None) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")" if shape is not None else "(unknown)"


class _Converter:
    def __init__(self, path: Path, *, input_shape: tuple[int, ...] | None, seed: int, opset: int) -> None:
        self.path = path
        self.file = str(path)
        self.input_shape = input_shape
        self.seed = seed
        self.opset = opset
        self.layers: list[_Layer] = []
        self.graph_inputs: list[_Value] = []
        self.graph_outputs: list[_Value] = []
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.arrays: dict[str, np.ndarray | _Deferred] = {}
        self.value_info: list[onnx.ValueInfoProto] = []
        self.value_names: set[str] = set()
        self.node_names: set[str] = set()
        self.final_versions: set[int] = set()  # ids of the values that are their blob's last version

    # ------------------------------------------------------------------ diagnostics

    def _err(self, message: str, layer: _Layer | None = None) -> MtcError:
        if layer is None:
            return MtcError(message, file=self.file)
        return MtcError(message, file=self.file, node=layer.name, op=layer.type)

    def _warn(self, message: str) -> None:
        # Attribute the warning to the caller of load_prototxt, however deep in the converter it arises.
        level = 1
        frame: FrameType | None = sys._getframe(0)
        while frame is not None and frame.f_globals.get("__name__") == __name__:
            frame, level = frame.f_back, level + 1
        warnings.warn(f"{self.file}: {message}", PrototxtWarning, stacklevel=level)

    # ------------------------------------------------------------------ driver

    def convert(self) -> ir.Model:
        self._check_arguments()
        net = self._parse()
        self._select_layers(net)
        self._declare_inputs(net)
        self._resolve()
        self._plan_folds()
        self._name_values()
        self._emit_all()
        return self._build_model(net)

    def _check_arguments(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral) or self.seed < 0:
            raise MtcError(f"seed must be a non-negative integer, got {self.seed!r}", file=self.file)
        max_opset = onnx.defs.onnx_opset_version()
        if (
            isinstance(self.opset, bool)
            or not isinstance(self.opset, Integral)
            or not (MIN_OPSET <= self.opset <= max_opset)
        ):
            raise MtcError(
                f"opset must be an integer in [{MIN_OPSET}, {max_opset}], got {self.opset!r}", file=self.file
            )
        if self.input_shape is not None:
            try:
                dims = tuple(self.input_shape)
            except TypeError:
                dims = ()
            if not dims or any(isinstance(d, bool) or not isinstance(d, Integral) or d <= 0 for d in dims):
                raise MtcError(
                    f"input_shape must be a non-empty tuple of positive integers, got {self.input_shape!r}",
                    file=self.file,
                )
            self.input_shape = tuple(int(d) for d in dims)

    def _parse(self) -> _Msg:
        if not self.path.exists():
            raise self._err("no such file")
        if self.path.is_dir():
            raise self._err("is a directory, expected a .prototxt file")
        try:
            text = self.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._err(f"not a text file: byte {e.start} is not UTF-8") from None
        except OSError as e:
            raise self._err(f"cannot read: {e.strerror or e}") from None
        net = caffe_pb2.NetParameter()
        try:
            text_format.Parse(text, net)
        except text_format.ParseError as e:
            line, col = e.GetLine(), e.GetColumn()
            msg = str(e)
            if line is not None and col is not None:
                prefix = f"{line}:{col} : "
                if msg.startswith(prefix):
                    msg = msg[len(prefix) :]
            msg = msg.replace('"mtc_caffe.', '"')
            if 'no field named "layers"' in msg:
                msg += " (the V1 'layers' format is not supported: convert the file with Caffe's upgrade_net_proto_text)"
            where = f"{self.file}:{line}:{col}" if line is not None and col is not None else self.file
            raise MtcError(msg, file=where) from None
        return net

    def _select_layers(self, net: _Msg) -> None:
        """Keep the layers of the inference net, with unique names."""
        seen: set[str] = set()
        for index, proto in enumerate(net.layer):
            name = proto.name
            if proto.include and proto.exclude:
                raise self._err(f"layer #{index} ('{name}') has both include and exclude rules")
            if proto.include:
                if not any(_rule_met(r) for r in proto.include):
                    continue
            elif any(_rule_met(r) for r in proto.exclude):
                continue
            if not proto.type:
                raise self._err(f"layer #{index} ('{name}') has no type")
            if not name:
                name = f"{proto.type.lower()}_{index}"
                self._warn(f"layer #{index} ({proto.type}) has no name; calling it '{name}'")
            if name in seen:
                base, k = name, 1
                while f"{base}_{k}" in seen:
                    k += 1
                name = f"{base}_{k}"
                self._warn(f"layer name '{base}' is used twice; calling layer #{index} '{name}'")
            seen.add(name)
            if proto.blobs:
                self._warn(
                    f"layer '{name}' carries {len(proto.blobs)} blob(s); they are ignored, weights come from fillers"
                )
            self.layers.append(_Layer(index=index, proto=proto, name=name, type=proto.type))

    # ------------------------------------------------------------------ inputs

    def _declare_inputs(self, net: _Msg) -> None:
        """Graph inputs from ``input`` + ``input_shape``/``input_dim`` (Input layers come later)."""
        names = list(net.input)
        if net.input_shape and net.input_dim:
            raise self._err("give the input shapes with either input_shape or input_dim, not both")
        shapes: list[tuple[int, ...] | None]
        if net.input_shape:
            if len(net.input_shape) != len(names):
                raise self._err(f"{len(names)} input(s) but {len(net.input_shape)} input_shape entries")
            shapes = [tuple(int(d) for d in s.dim) for s in net.input_shape]
        elif net.input_dim:
            if len(net.input_dim) != 4 * len(names):
                raise self._err(
                    f"input_dim needs 4 values per input: {len(names)} input(s), {len(net.input_dim)} values"
                )
            dims = [int(d) for d in net.input_dim]
            shapes = [tuple(dims[4 * i : 4 * i + 4]) for i in range(len(names))]
        else:
            shapes = [None] * len(names)
        for name, shape in zip(names, shapes, strict=True):
            if name in (v.blob for v in self.graph_inputs):
                raise self._err(f"input '{name}' is declared twice")
            self.graph_inputs.append(_Value(blob=name, producer=-1, shape=shape))

    def _finish_inputs(self) -> None:
        """Apply ``input_shape`` and check that every input has a valid shape."""
        if self.input_shape is not None:
            if len(self.graph_inputs) != 1:
                raise self._err(
                    f"input_shape {_fmt_shape(self.input_shape)} given, but the net has "
                    f"{len(self.graph_inputs)} inputs ({', '.join(v.blob for v in self.graph_inputs) or 'none'})"
                )
            v = self.graph_inputs[0]
            if v.shape is not None and len(v.shape) != len(self.input_shape):
                raise self._err(
                    f"input_shape {_fmt_shape(self.input_shape)} has rank {len(self.input_shape)}, "
                    f"but input '{v.blob}' is declared with rank {len(v.shape)} {_fmt_shape(v.shape)}"
                )
            v.shape = self.input_shape
        if not self.graph_inputs:
            raise self._err(
                "the net declares no input: add 'input:' with 'input_shape'/'input_dim', or an Input layer"
            )
        for v in self.graph_inputs:
            if v.shape is None:
                raise self._err(f"input '{v.blob}' has no shape: declare one or pass input_shape")
            if not v.shape or any(d <= 0 for d in v.shape):
                raise self._err(
                    f"input '{v.blob}' has shape {_fmt_shape(v.shape)}: every dimension must be positive"
                )

    # ------------------------------------------------------------------ graph resolution

    def _resolve(self) -> None:
        """Bind every bottom to the version of its blob that is current there (SSA)."""
        producers: dict[str, list[int]] = {}
        readers: set[str] = set()
        for i, layer in enumerate(self.layers):
            for t in layer.proto.top:
                producers.setdefault(t, []).append(i)
            readers.update(layer.proto.bottom)

        current: dict[str, _Value] = {v.blob: v for v in self.graph_inputs}
        # Blobs nobody has consumed yet, in order of (last) production: the net outputs, as in Caffe.
        available: dict[str, None] = dict.fromkeys(current)
        quirk_used = False

        for i, layer in enumerate(self.layers):
            p = layer.proto
            if layer.type not in SUPPORTED_LAYERS:
                raise self._err(
                    f"unknown layer type '{layer.type}'; supported: {', '.join(sorted(SUPPORTED_LAYERS))}",
                    layer,
                )
            if not p.top:
                raise self._err("layer has no top", layer)
            lo, hi = _ARITY.get(layer.type, (1, 1))
            if len(p.bottom) < lo or (hi is not None and len(p.bottom) > hi):
                want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                raise self._err(f"expects {want} bottom(s), got {len(p.bottom)}", layer)
            if layer.type != "Input" and len(p.top) != 1:
                raise self._err(f"expects 1 top, got {len(p.top)}", layer)
            if len(set(p.top)) != len(p.top):
                raise self._err("names the same top twice", layer)

            for b in p.bottom:
                v = current.get(b)
                if v is None:
                    later = [j for j in producers.get(b, []) if j > i]
                    if later:
                        other = self.layers[later[0]]
                        raise self._err(
                            f"bottom '{b}' is used before it is defined: only the later layer '{other.name}' "
                            f"(#{other.index}) produces it",
                            layer,
                        )
                    sole = self.graph_inputs[0] if len(self.graph_inputs) == 1 else None
                    if not quirk_used and sole is not None and sole.blob not in readers:
                        # PyTorch-to-Caffe dialect: `input: "blob1"` while the first layer reads "data".
                        quirk_used = True
                        self._warn(
                            f"layer '{layer.name}' reads bottom '{b}', which no layer produces, and the declared "
                            f"input '{sole.blob}' is never read: binding '{b}' to input '{sole.blob}'"
                        )
                        current[b] = v = sole
                        available.pop(sole.blob, None)
                    else:
                        known = ", ".join(x.blob for x in self.graph_inputs) or "none"
                        raise self._err(
                            f"bottom '{b}' is not produced by any layer and is not a declared input (inputs: {known})",
                            layer,
                        )
                layer.inputs.append(v)
                v.consumers.append(i)
                available.pop(b, None)

            if layer.type == "Input":
                self._input_layer(layer, current, available)
                continue
            for t in p.top:
                v = _Value(blob=t, producer=i)
                if layer.type == "Dropout":
                    v.alias_of = layer.inputs[0]
                layer.outputs.append(v)
                current[t] = v
                available.pop(t, None)
                available[t] = None

        self._finish_inputs()
        for blob in available:
            v = current[blob]
            if v.producer < 0 and v.alias_of is None and not v.consumers:
                self._warn(f"input '{v.blob}' is never used")
                continue
            self.graph_outputs.append(v)
        if not self.graph_outputs:
            raise self._err("the net has no output: every top is consumed")
        self.final_versions = {id(v) for v in current.values()}

    def _input_layer(self, layer: _Layer, current: dict[str, _Value], available: dict[str, None]) -> None:
        shapes = list(layer.proto.input_param.shape)
        tops = list(layer.proto.top)
        if len(shapes) not in (0, 1, len(tops)):
            raise self._err(
                f"{len(tops)} top(s) but {len(shapes)} shapes: give 1 shape or one per top", layer
            )
        for k, t in enumerate(tops):
            if t in current:
                raise self._err(f"input '{t}' is declared twice", layer)
            s = shapes[0] if len(shapes) == 1 else (shapes[k] if shapes else None)
            v = _Value(blob=t, producer=-1, shape=tuple(int(d) for d in s.dim) if s is not None else None)
            self.graph_inputs.append(v)
            current[t] = v
            available[t] = None

    def _plan_folds(self) -> None:
        """Fold a Scale into the BatchNorm whose output it alone consumes (Caffe's BN + Scale pair)."""
        for layer in self.layers:
            if layer.type != "BatchNorm":
                continue
            out = layer.outputs[0]
            if len(out.consumers) != 1:
                continue
            nxt = self.layers[out.consumers[0]]
            if nxt.type != "Scale" or len(nxt.inputs) != 1:
                continue
            sp = nxt.proto.scale_param
            if sp.num_axes != 1 or sp.axis != 1:
                continue
            layer.folds, nxt.folded_into = nxt, layer

    def _name_values(self) -> None:
        for v in self.graph_inputs:
            v.name = self._value_name(v.blob)
        for layer in self.layers:
            for v in layer.outputs:
                # A blob rewritten in place from a graph input cannot take the input's name either.
                final = id(v) in self.final_versions and v.blob not in self.value_names
                base = v.blob if final else f"{v.blob}/{layer.name}"
                v.name = self._value_name(base)

    # ------------------------------------------------------------------ naming helpers

    def _value_name(self, base: str) -> str:
        name, k = base, 1
        while name in self.value_names:
            name = f"{base}_{k}"
            k += 1
        self.value_names.add(name)
        return name

    def _node_name(self, base: str) -> str:
        name, k = base, 1
        while name in self.node_names:
            name = f"{base}_{k}"
            k += 1
        self.node_names.add(name)
        return name

    # ------------------------------------------------------------------ emission helpers

    def _node(
        self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, layer: _Layer, **attrs: Any
    ) -> onnx.NodeProto:
        node = helper.make_node(op, list(inputs), list(outputs), name=self._node_name(name), **attrs)
        node.metadata_props.add(key=ORIGIN_KEY, value=layer.name)
        self.nodes.append(node)
        return node

    def _init(self, name: str, array: np.ndarray | _Deferred) -> str:
        unique = self._value_name(name)
        # The proto carries type and shape only; the array goes into the IR as it is after parsing
        # (copying 85 MB of weights into a proto and back cost ~0.15 s on deeplab_resnet34).
        arr = array if isinstance(array, _Deferred) else np.ascontiguousarray(array, dtype=np.float32)
        self.initializers.append(onnx.TensorProto(name=unique, data_type=TensorProto.FLOAT, dims=arr.shape))
        self.arrays[unique] = arr
        return unique

    def _const(self, name: str, array: np.ndarray, layer: _Layer) -> str:
        """A configuration constant (clip bound, coefficient, shape): a Constant node, not a parameter."""
        out = self._value_name(name)
        self._node("Constant", [], [out], name, layer, value=numpy_helper.from_array(array, out))
        return out

    def _tmp(self, name: str, shape: tuple[int, ...]) -> str:
        out = self._value_name(name)
        self.value_info.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, list(shape)))
        return out

    def _rng(self, layer: _Layer) -> np.random.Generator:
        # One stream per (seed, position of the layer in the file), hash-free: a layer's weights never
        # depend on how many numbers other layers drew. PCG64 with float32 normals (ziggurat) draws
        # deeplab_resnet34's 21 M weights ~3x faster than the legacy RandomState's float64 Box-Muller.
        return _layer_rng(self.seed, layer.index)

    def _deferred(self, layer: _Layer, fn: Callable[..., np.ndarray], a: float, b: float,
                  shape: tuple[int, ...]) -> _Deferred:
        # Seed and layer index only: a model's weights must not keep the converter alive.
        return _Deferred(shape, functools.partial(_redraw, int(self.seed), layer.index, fn, a, b, shape))

    @staticmethod
    def _draws(filler: _Msg | None, default: str) -> bool:
        """Whether a filler takes numbers from the layer's stream."""
        kind = default if filler is None else filler.type
        return kind not in ("one", "zero", "constant", "bilinear")

    def _fill(
        self, filler: _Msg, shape: tuple[int, ...], rng: np.random.Generator, default: str, layer: _Layer, what: str
    ) -> np.ndarray:
        """Draw a blob of Caffe shape ``shape`` as Caffe's filler would."""
        out = self._fill_or_defer(filler, shape, rng, default, layer, what, defer=False)
        assert isinstance(out, np.ndarray)
        return out

    def _fill_or_defer(
        self,
        filler: _Msg,
        shape: tuple[int, ...],
        rng: np.random.Generator,
        default: str,
        layer: _Layer,
        what: str,
        *,
        defer: bool,
    ) -> np.ndarray | _Deferred:
        """Draw a blob of Caffe shape ``shape`` as Caffe's filler would.

        ``defer`` (the blob is the first and last draw from ``layer``'s stream): the random fillers
        return the draw as a :class:`_Deferred`, made when the weight is first read, and by the
        lowering straight into the module's parameter (no second copy, no fill at import); the
        values are the same as drawn here, from a fresh stream for the layer.
        """
        if filler is None:
            if default == "one":
                return np.ones(shape, np.float32)
            if default == "zero":
                return np.zeros(shape, np.float32)
            filler = caffe_pb2.FillerParameter(type=default)
        kind = filler.type
        count = int(np.prod(shape, dtype=np.int64))
        if count > MAX_BLOB_VALUES:
            raise self._err(f"{what}: a blob of shape {list(shape)} holds {count:,} values, above the limit of "
                            f"{MAX_BLOB_VALUES:,} (check num_output and the input size)", layer)
        fan_in = count // shape[0] if shape and shape[0] else count
        fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
        if filler.variance_norm == caffe_pb2.FillerParameter.AVERAGE:
            n = (fan_in + fan_out) / 2.0
        elif filler.variance_norm == caffe_pb2.FillerParameter.FAN_OUT:
            n = float(fan_out)
        else:
            n = float(fan_in)
        if kind == "constant":
            data = np.full(shape, filler.value, np.float64)
        elif kind == "uniform":
            if filler.max < filler.min:
                raise self._err(f"{what}: uniform filler has max {filler.max} < min {filler.min}", layer)
            if defer:
                return self._deferred(layer, _uniform, filler.min, filler.max, shape)
            data = _uniform(rng, filler.min, filler.max, shape)
        elif kind == "gaussian":
            if defer and filler.sparse < 0:
                return self._deferred(layer, _normal, filler.mean, filler.std, shape)
            data = _normal(rng, filler.mean, filler.std, shape)
            if filler.sparse >= 0:
                if not shape:
                    raise self._err(
                        f"{what}: a sparse gaussian filler needs a blob with at least one axis", layer
                    )
                keep = rng.random(shape, dtype=np.float32) < min(1.0, filler.sparse / shape[0])
                data = data * keep
        elif kind == "xavier":
            scale = math.sqrt(3.0 / n)
            if defer:
                return self._deferred(layer, _uniform, -scale, scale, shape)
            data = _uniform(rng, -scale, scale, shape)
        elif kind == "msra":
            if defer:
                return self._deferred(layer, _normal, 0.0, math.sqrt(2.0 / n), shape)
            data = _normal(rng, 0.0, math.sqrt(2.0 / n), shape)
        elif kind == "positive_unitball":
            data = rng.random(shape).reshape(shape[0] if shape else 1, -1)
            data = (data / data.sum(axis=1, keepdims=True)).reshape(shape)
        elif kind == "bilinear":
            if len(shape) != 4 or shape[2] != shape[3]:
                raise self._err(
                    f"{what}: the bilinear filler needs a square 4D kernel, got {_fmt_shape(shape)}", layer
                )
            k = shape[3]
            f = math.ceil(k / 2.0)
            c = (k - 1) / (2.0 * f)
            taps = 1.0 - np.abs(np.arange(k) / f - c)
            data = np.broadcast_to(np.outer(taps, taps), shape).copy()
        else:
            raise self._err(f"{what}: unknown filler type '{kind}'; supported: {', '.join(FILLERS)}", layer)
        return np.asarray(data, dtype=np.float32)

    @staticmethod
    def _filler(msg: _Msg, field_name: str) -> _Msg:
        return getattr(msg, field_name) if msg.HasField(field_name) else None

    def _axis(self, axis: int, rank: int, layer: _Layer, what: str = "axis") -> int:
        if not -rank <= axis < rank:
            raise self._err(f"{what} {axis} is out of range for a rank-{rank} input", layer)
        return axis % rank

    # ------------------------------------------------------------------ emission

    def _emit_all(self) -> None:
        for layer in self.layers:
            if layer.type == "Input" or layer.folded_into is not None:
                continue
            emit = getattr(self, "_emit_" + layer.type.lower())
            emit(layer)
        for v in self.graph_outputs:
            if v.alias_of is not None:
                # A dropped Dropout whose top is a net output: keep the blob's name with an Identity.
                layer = self.layers[v.producer]
                self._node("Identity", [v.source().name], [v.name], layer.name, layer)
                v.shape = v.source().shape

    def _x(self, layer: _Layer, k: int = 0) -> tuple[str, tuple[int, ...]]:
        v = layer.inputs[k].source()
        assert v.shape is not None
        return v.name, v.shape

    def _out(self, layer: _Layer, shape: tuple[int, ...]) -> str:
        """The ONNX name of the layer's (single) top, recording its shape."""
        v = layer.outputs[0]
        v.shape = tuple(int(d) for d in shape)
        if v.alias_of is None and not any(v is o for o in self.graph_outputs):
            self.value_info.append(helper.make_tensor_value_info(v.name, TensorProto.FLOAT, list(v.shape)))
        return v.name

    def _per_axis(
        self, values: Sequence[int], nsp: int, default: int | None, what: str, layer: _Layer
    ) -> list[int]:
        vals = [int(x) for x in values]
        if not vals:
            if default is None:
                raise self._err(f"{what} is required", layer)
            return [default] * nsp
        if len(vals) == 1:
            return vals * nsp
        if len(vals) == nsp:
            return vals
        raise self._err(f"{what} has {len(vals)} values; expected 1 or {nsp} (one per spatial axis)", layer)

    def _conv_geometry(
        self, layer: _Layer, p: _Msg, nsp: int
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        if p.HasField("kernel_h") or p.HasField("kernel_w"):
            if nsp != 2:
                raise self._err(f"kernel_h/kernel_w need 2 spatial axes, the input has {nsp}", layer)
            if not (p.HasField("kernel_h") and p.HasField("kernel_w")):
                raise self._err("kernel_h and kernel_w must be given together", layer)
            if p.kernel_size:
                raise self._err("give either kernel_size or kernel_h/kernel_w, not both", layer)
            kernel = [p.kernel_h, p.kernel_w]
        else:
            kernel = self._per_axis(p.kernel_size, nsp, None, "kernel_size", layer)
        if p.HasField("stride_h") or p.HasField("stride_w"):
            if nsp != 2 or not (p.HasField("stride_h") and p.HasField("stride_w")) or p.stride:
                raise self._err("stride_h and stride_w go together, without stride, on 2D inputs", layer)
            stride = [p.stride_h, p.stride_w]
        else:
            stride = self._per_axis(p.stride, nsp, 1, "stride", layer)
        if p.HasField("pad_h") or p.HasField("pad_w"):
            if nsp != 2 or p.pad:
                raise self._err("pad_h/pad_w go without pad, on 2D inputs", layer)
            pad = [p.pad_h, p.pad_w]
        else:
            pad = self._per_axis(p.pad, nsp, 0, "pad", layer)
        dilation = self._per_axis(p.dilation, nsp, 1, "dilation", layer)
        for what, vals in (("kernel size", kernel), ("stride", stride), ("dilation", dilation)):
            if any(x <= 0 for x in vals):
                raise self._err(f"{what} must be positive, got {vals}", layer)
        return [int(x) for x in kernel], [int(x) for x in stride], [int(x) for x in pad], dilation

    def _conv_common(
        self, layer: _Layer
    ) -> tuple[str, tuple[int, ...], _Msg, list[int], list[int], list[int], list[int]]:
        x, s = self._x(layer)
        p = layer.proto.convolution_param
        if len(s) < 3:
            raise self._err(f"needs an input with spatial axes (N, C, ...), got {_fmt_shape(s)}", layer)
        if p.axis not in (1, 1 - len(s)):
            raise self._err(f"axis {p.axis} is not supported: only the channel axis 1", layer)
        if p.num_output <= 0:
            raise self._err("num_output must be positive", layer)
        if p.num_output > MAX_NUM_OUTPUT:
            raise self._err(f"num_output {p.num_output:,} is above the limit of {MAX_NUM_OUTPUT:,}", layer)
        g = p.group
        if g <= 0 or s[1] % g or p.num_output % g:
            raise self._err(
                f"group {g} must divide both the input channels {s[1]} and num_output {p.num_output}", layer
            )
        kernel, stride, pad, dilation = self._conv_geometry(layer, p, len(s) - 2)
        return x, s, p, kernel, stride, pad, dilation

    def _emit_convolution(self, layer: _Layer) -> None:
        x, s, p, kernel, stride, pad, dilation = self._conv_common(layer)
        spatial = []
        for ax, (i, k, st, pd, d) in enumerate(zip(s[2:], kernel, stride, pad, dilation, strict=True)):
            span = d * (k - 1) + 1
            if i + 2 * pd < span:
                raise self._err(
                    f"input {_fmt_shape(s)} is too small: spatial axis {ax} has {i} (+2x{pd} padding) "
                    f"but the {'dilated ' if d > 1 else ''}kernel spans {span}",
                    layer,
                )
            spatial.append((i + 2 * pd - span) // st + 1)
        self._conv_node(
            layer,
            "Conv",
            x,
            (p.num_output, s[1] // p.group, *kernel),
            (s[0], p.num_output, *spatial),
            kernel,
            stride,
            pad,
            dilation,
        )

    def _emit_deconvolution(self, layer: _Layer) -> None:
        x, s, p, kernel, stride, pad, dilation = self._conv_common(layer)
        spatial = []
        for ax, (i, k, st, pd, d) in enumerate(zip(s[2:], kernel, stride, pad, dilation, strict=True)):
            o = st * (i - 1) + d * (k - 1) + 1 - 2 * pd
            if o <= 0:
                raise self._err(
                    f"input {_fmt_shape(s)} is too small: spatial axis {ax} would have size {o} (padding {pd})",
                    layer,
                )
            spatial.append(o)
        # Caffe stores deconvolution weights (C_in, C_out / group, k...), which is ONNX's layout too.
        self._conv_node(
            layer,
            "ConvTranspose",
            x,
            (s[1], p.num_output // p.group, *kernel),
            (s[0], p.num_output, *spatial),
            kernel,
            stride,
            pad,
            dilation,
        )

    def _conv_node(
        self,
        layer: _Layer,
        op: str,
        x: str,
        wshape: tuple[int, ...],
        yshape: tuple[int, ...],
        kernel: list[int],
        stride: list[int],
        pad: list[int],
        dilation: list[int],
    ) -> None:
        p = layer.proto.convolution_param
        rng = self._rng(layer)
        # The weight is the stream's first draw; deferred unless a random bias draws after it.
        defer = not (p.bias_term and self._draws(self._filler(p, "bias_filler"), "zero"))
        w = self._fill_or_defer(self._filler(p, "weight_filler"), wshape, rng, "msra", layer, "weight_filler",
                                defer=defer)
        inputs = [x, self._init(f"{layer.name}.weight", w)]
        if p.bias_term:
            b = self._fill(self._filler(p, "bias_filler"), (p.num_output,), rng, "zero", layer, "bias_filler")
            inputs.append(self._init(f"{layer.name}.bias", b))
        self._node(
            op,
            inputs,
            [self._out(layer, yshape)],
            layer.name,
            layer,
            kernel_shape=kernel,
            strides=stride,
            pads=pad + pad,
            dilations=dilation,
            group=p.group,
        )

    def _emit_batchnorm(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        if len(s) < 2:
            raise self._err(f"needs an input with a channel axis, got {_fmt_shape(s)}", layer)
        p = layer.proto.batch_norm_param
        if p.HasField("use_global_stats") and not p.use_global_stats:
            self._warn(
                f"layer '{layer.name}': use_global_stats: false normalises with batch statistics in Caffe; "
                "the ONNX graph uses the running statistics"
            )
        if p.HasField("track_running_stats") and not p.track_running_stats:
            self._warn(
                f"layer '{layer.name}': track_running_stats: false normalises with batch statistics in "
                "PyTorch; the ONNX graph uses the running statistics"
            )
        c = s[1]
        scale_layer = layer.folds
        if scale_layer is not None:
            sp = scale_layer.proto.scale_param
            rng = self._rng(scale_layer)
            gamma = self._fill(self._filler(sp, "filler"), (c,), rng, "one", scale_layer, "filler")
            if sp.bias_term:
                beta = self._fill(
                    self._filler(sp, "bias_filler"), (c,), rng, "zero", scale_layer, "bias_filler"
                )
            else:
                beta = np.zeros((c,), np.float32)
            y = self._out(scale_layer, s)
            layer.outputs[0].shape = s
        else:
            gamma, beta = np.ones((c,), np.float32), np.zeros((c,), np.float32)
            y = self._out(layer, s)
        inputs = [
            x,
            self._init(f"{layer.name}.weight", gamma),
            self._init(f"{layer.name}.bias", beta),
            self._init(f"{layer.name}.running_mean", np.zeros((c,), np.float32)),
            self._init(f"{layer.name}.running_var", np.ones((c,), np.float32)),
        ]
        node = self._node("BatchNormalization", inputs, [y], layer.name, layer, epsilon=float(p.eps))
        if scale_layer is not None:
            node.metadata_props.add(key=FOLDED_KEY, value=scale_layer.name)

    def _emit_scale(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        p = layer.proto.scale_param
        axis = self._axis(p.axis, len(s), layer)
        n = len(s) - axis if p.num_axes == -1 else p.num_axes
        if n < 0 or axis + n > len(s):
            raise self._err(
                f"num_axes {p.num_axes} from axis {axis} does not fit a rank-{len(s)} input", layer
            )
        pshape = tuple(s[axis : axis + n])
        # Stored with trailing 1s so that ONNX broadcasting applies it along `axis` (channels: (C, 1, 1)).
        bshape = pshape + (1,) * (len(s) - axis - n)
        rng = self._rng(layer)
        gamma = self._fill(self._filler(p, "filler"), pshape, rng, "one", layer, "filler").reshape(bshape)
        y = self._out(layer, s)
        w = self._init(f"{layer.name}.weight", gamma)
        if p.bias_term:
            beta = self._fill(self._filler(p, "bias_filler"), pshape, rng, "zero", layer, "bias_filler")
            t = self._tmp(f"{layer.name}/scaled", s)
            self._node("Mul", [x, w], [t], layer.name, layer)
            self._node(
                "Add",
                [t, self._init(f"{layer.name}.bias", beta.reshape(bshape))],
                [y],
                f"{layer.name}/bias",
                layer,
            )
        else:
            self._node("Mul", [x, w], [y], layer.name, layer)

    def _emit_relu(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        slope = layer.proto.relu_param.negative_slope
        if slope:
            self._node("LeakyRelu", [x], [self._out(layer, s)], layer.name, layer, alpha=float(slope))
        else:
            self._node("Relu", [x], [self._out(layer, s)], layer.name, layer)

    def _clip(self, layer: _Layer, lo: float, hi: float) -> None:
        x, s = self._x(layer)
        if lo > hi:
            raise self._err(f"clip min {lo} is greater than max {hi}", layer)
        a = self._const(f"{layer.name}/min", np.array(lo, np.float32), layer)
        b = self._const(f"{layer.name}/max", np.array(hi, np.float32), layer)
        self._node("Clip", [x, a, b], [self._out(layer, s)], layer.name, layer)

    def _emit_relu6(self, layer: _Layer) -> None:
        self._clip(layer, 0.0, 6.0)

    def _emit_clip(self, layer: _Layer) -> None:
        p = layer.proto.clip_param
        if not (layer.proto.HasField("clip_param") and p.HasField("min") and p.HasField("max")):
            raise self._err("clip_param needs both min and max", layer)
        self._clip(layer, p.min, p.max)

    def _emit_sigmoid(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        self._node("Sigmoid", [x], [self._out(layer, s)], layer.name, layer)

    def _emit_tanh(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        self._node("Tanh", [x], [self._out(layer, s)], layer.name, layer)

    def _emit_dropout(self, layer: _Layer) -> None:
        # Inference graph: Dropout is the identity, so its top aliases its bottom (see _emit_all).
        layer.outputs[0].shape = self._x(layer)[1]

    def _emit_eltwise(self, layer: _Layer) -> None:
        p = layer.proto.eltwise_param
        ins = [self._x(layer, k) for k in range(len(layer.inputs))]
        s = ins[0][1]
        for k, (_, sk) in enumerate(ins[1:], start=1):
            if sk != s:
                raise self._err(
                    f"bottoms must have the same shape: '{layer.proto.bottom[0]}' is {_fmt_shape(s)}, "
                    f"'{layer.proto.bottom[k]}' is {_fmt_shape(sk)}",
                    layer,
                )
        op = caffe_pb2.EltwiseParameter.EltwiseOp.Name(p.operation)
        if p.coeff and op != "SUM":
            raise self._err(f"coeff applies to SUM only, the operation is {op}", layer)
        if p.coeff and len(p.coeff) != len(ins):
            raise self._err(f"{len(p.coeff)} coeff values for {len(ins)} bottoms", layer)
        y = self._out(layer, s)
        if op == "MAX":
            self._node("Max", [n for n, _ in ins], [y], layer.name, layer)
            return
        names = [n for n, _ in ins]
        if op == "SUM" and p.coeff:
            for k, c in enumerate(p.coeff):
                if c != 1.0:
                    cname = self._const(f"{layer.name}/coeff{k}", np.array(c, np.float32), layer)
                    t = self._tmp(f"{layer.name}/mul{k}", s)
                    self._node("Mul", [names[k], cname], [t], f"{layer.name}/mul{k}", layer)
                    names[k] = t
        binary = "Add" if op == "SUM" else "Mul"
        acc = names[0]
        for k in range(1, len(names)):
            last = k == len(names) - 1
            out = y if last else self._tmp(f"{layer.name}/{binary.lower()}{k}", s)
            self._node(
                binary,
                [acc, names[k]],
                [out],
                layer.name if last else f"{layer.name}/{binary.lower()}{k}",
                layer,
            )
            acc = out

    def _emit_pooling(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        p = layer.proto.pooling_param
        method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
        if method == "STOCHASTIC":
            raise self._err("STOCHASTIC pooling is not supported (MAX and AVE are)", layer)
        if len(s) != 4:
            raise self._err(f"Caffe pooling needs a 4D input (N, C, H, W), got {_fmt_shape(s)}", layer)
        has_kernel = p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w")
        if p.global_pooling:
            if has_kernel:
                raise self._err("global_pooling takes no kernel size", layer)
            if (
                p.pad
                or p.pad_h
                or p.pad_w
                or p.stride != 1
                or p.HasField("stride_h")
                or p.HasField("stride_w")
            ):
                raise self._err("global_pooling needs pad 0 and stride 1", layer)
            op = "GlobalMaxPool" if method == "MAX" else "GlobalAveragePool"
            self._node(op, [x], [self._out(layer, (s[0], s[1], 1, 1))], layer.name, layer)
            return
        if p.HasField("kernel_size"):
            if p.HasField("kernel_h") or p.HasField("kernel_w"):
                raise self._err("give either kernel_size or kernel_h/kernel_w, not both", layer)
            kernel = [p.kernel_size] * 2
        elif p.HasField("kernel_h") and p.HasField("kernel_w"):
            kernel = [p.kernel_h, p.kernel_w]
        else:
            raise self._err("kernel_size (or kernel_h and kernel_w) is required", layer)
        if p.HasField("pad_h") or p.HasField("pad_w"):
            if p.HasField("pad"):
                raise self._err("give either pad or pad_h/pad_w, not both", layer)
            pad = [p.pad_h, p.pad_w]
        else:
            pad = [p.pad] * 2
        if p.HasField("stride_h") or p.HasField("stride_w"):
            if p.HasField("stride") or not (p.HasField("stride_h") and p.HasField("stride_w")):
                raise self._err("stride_h and stride_w go together, without stride", layer)
            stride = [p.stride_h, p.stride_w]
        else:
            stride = [p.stride] * 2
        if any(k <= 0 for k in kernel) or any(st <= 0 for st in stride):
            raise self._err(f"kernel {kernel} and stride {stride} must be positive", layer)
        if any(pd >= k for pd, k in zip(pad, kernel, strict=True)):
            raise self._err(f"pad {pad} must be smaller than the kernel {kernel}", layer)
        ceil = p.round_mode == caffe_pb2.PoolingParameter.CEIL
        spatial, floors, ceils = [], [], []
        for ax, (i, k, st, pd) in enumerate(zip(s[2:], kernel, stride, pad, strict=True)):
            if i + 2 * pd < k:
                raise self._err(
                    f"input {_fmt_shape(s)} is too small: spatial axis {ax} has {i} (+2x{pd} padding) "
                    f"but the kernel is {k}",
                    layer,
                )
            floors.append((i + 2 * pd - k) // st + 1)
            ceils.append(-(-(i + 2 * pd - k) // st) + 1)
            o = ceils[-1] if ceil else floors[-1]
            # Caffe: the last window must start inside the image or its left padding.
            if pd and (o - 1) * st >= i + pd:
                o -= 1
            elif not pd and (o - 1) * st >= i:
                self._warn(
                    f"layer '{layer.name}': Caffe's ceil rounding would add an empty pooling window on axis {ax} "
                    f"(size {i}, kernel {k}, stride {st}); it is dropped, as PyTorch and ONNX do"
                )
                o -= 1
            spatial.append(o)
        y = self._out(layer, (s[0], s[1], *spatial))
        op = "MaxPool" if method == "MAX" else "AveragePool"
        # Caffe divides an average by the window clipped to the padded input: count_include_pad=1.
        extra: dict[str, Any] = {} if op == "MaxPool" else {"count_include_pad": 1}
        # onnxruntime clips ceil-mode windows as Caffe does, but ONNX shape inference does not, so
        # ceil_mode=1 is used only where every axis takes the plain ceil size and 0 where every axis
        # takes the floor size (which is what Caffe's clipping always lands on).
        if spatial == floors or spatial == ceils:
            attrs = dict(
                kernel_shape=kernel, strides=stride, pads=pad + pad, ceil_mode=int(spatial != floors)
            )
            self._node(op, [x], [y], layer.name, layer, **attrs, **extra)
            return
        # Mixed axes: floor mode, with end padding that makes room for the ceil axes' last window.
        over = [
            max(0, (o - 1) * st + k - (i + 2 * pd))
            for o, i, k, st, pd in zip(spatial, s[2:], kernel, stride, pad, strict=True)
        ]
        if op == "MaxPool":  # padding never wins a max: pads just position the windows
            ends = [pd + e for pd, e in zip(pad, over, strict=True)]
            self._node(op, [x], [y], layer.name, layer, kernel_shape=kernel, strides=stride, pads=pad + ends)
            return
        # An average must not count the extra end padding: pad Caffe's zeros explicitly, then
        # average over what lies inside the padded tensor only.
        padded = (s[0], s[1], *(i + 2 * pd for i, pd in zip(s[2:], pad, strict=True)))
        t = self._tmp(f"{layer.name}/padded", padded)
        pads = self._const(f"{layer.name}/pads", np.array([0, 0, *pad, 0, 0, *pad], np.int64), layer)
        self._node("Pad", [x, pads], [t], f"{layer.name}/pad", layer)
        self._node(
            op,
            [t],
            [y],
            layer.name,
            layer,
            kernel_shape=kernel,
            strides=stride,
            pads=[0, 0, *over],
            count_include_pad=0,
        )

    def _emit_innerproduct(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        p = layer.proto.inner_product_param
        if p.num_output <= 0:
            raise self._err("num_output must be positive", layer)
        axis = self._axis(p.axis, len(s), layer)
        if axis == 0:
            raise self._err("axis 0 (no batch axis) is not supported", layer)
        m = int(np.prod(s[:axis]))
        k = int(np.prod(s[axis:]))
        n = p.num_output
        wshape = (k, n) if p.transpose else (n, k)
        rng = self._rng(layer)
        defer = not (p.bias_term and self._draws(self._filler(p, "bias_filler"), "zero"))
        w = self._fill_or_defer(self._filler(p, "weight_filler"), wshape, rng, "msra", layer, "weight_filler",
                                defer=defer)
        inputs = [x, self._init(f"{layer.name}.weight", w)]
        if p.bias_term:
            b = self._fill(self._filler(p, "bias_filler"), (n,), rng, "zero", layer, "bias_filler")
            inputs.append(self._init(f"{layer.name}.bias", b))
        out_shape = (*s[:axis], n)
        if len(s) != 2:
            inputs[0] = self._tmp(f"{layer.name}/flatten", (m, k))
            self._node("Flatten", [x], [inputs[0]], f"{layer.name}/flatten", layer, axis=axis)
        y = self._out(layer, out_shape)
        if axis == 1:
            self._node("Gemm", inputs, [y], layer.name, layer, transB=0 if p.transpose else 1)
        else:
            t = self._tmp(f"{layer.name}/gemm", (m, n))
            self._node("Gemm", inputs, [t], layer.name, layer, transB=0 if p.transpose else 1)
            # -1 for the batch: the constant does not bake in the batch size.
            target = [-1, *s[1:axis], n]
            shp = self._const(f"{layer.name}/shape", np.array(target, np.int64), layer)
            self._node("Reshape", [t, shp], [y], f"{layer.name}/reshape", layer)

    def _emit_concat(self, layer: _Layer) -> None:
        p = layer.proto.concat_param
        ins = [self._x(layer, k) for k in range(len(layer.inputs))]
        s0 = ins[0][1]
        if p.HasField("axis"):
            axis = self._axis(p.axis, len(s0), layer)
        elif p.HasField("concat_dim"):
            axis = self._axis(p.concat_dim, len(s0), layer, "concat_dim")
        else:
            axis = self._axis(1, len(s0), layer)
        for k, (_, sk) in enumerate(ins[1:], start=1):
            if len(sk) != len(s0) or any(
                a != b for d, (a, b) in enumerate(zip(s0, sk, strict=True)) if d != axis
            ):
                raise self._err(
                    f"bottoms must match except on axis {axis}: '{layer.proto.bottom[0]}' is {_fmt_shape(s0)}, "
                    f"'{layer.proto.bottom[k]}' is {_fmt_shape(sk)}",
                    layer,
                )
        out = list(s0)
        out[axis] = sum(sk[axis] for _, sk in ins)
        self._node(
            "Concat", [n for n, _ in ins], [self._out(layer, tuple(out))], layer.name, layer, axis=axis
        )

    def _emit_flatten(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        p = layer.proto.flatten_param
        a = self._axis(p.axis, len(s), layer)
        e = self._axis(p.end_axis, len(s), layer, "end_axis")
        if e < a:
            raise self._err(f"end_axis {p.end_axis} comes before axis {p.axis}", layer)
        out = (*s[:a], int(np.prod(s[a : e + 1])), *s[e + 1 :])
        y = self._out(layer, out)
        if a == 1 and e == len(s) - 1:
            self._node("Flatten", [x], [y], layer.name, layer, axis=1)
        else:
            # 0 copies the leading axes (the batch among them) and -1 takes the flattened span, so the
            # constant does not bake in the batch size.
            target = [0] * a + [-1] + list(s[e + 1 :])
            shp = self._const(f"{layer.name}/shape", np.array(target, np.int64), layer)
            self._node("Reshape", [x, shp], [y], layer.name, layer)

    def _emit_softmax(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        axis = self._axis(layer.proto.softmax_param.axis, len(s), layer)
        self._node("Softmax", [x], [self._out(layer, s)], layer.name, layer, axis=axis)

    def _emit_interp(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        p = layer.proto.interp_param
        if len(s) != 4:
            raise self._err(f"needs a 4D input (N, C, H, W), got {_fmt_shape(s)}", layer)
        if p.pad_beg or p.pad_end:
            raise self._err("pad_beg/pad_end are not supported", layer)
        has_zoom, has_shrink = p.HasField("zoom_factor"), p.HasField("shrink_factor")
        if (has_zoom and p.zoom_factor < 1) or (has_shrink and p.shrink_factor < 1):
            raise self._err("zoom_factor and shrink_factor must be at least 1", layer)
        h, w = s[2], s[3]
        if has_shrink:
            h, w = (h - 1) // p.shrink_factor + 1, (w - 1) // p.shrink_factor + 1
        if has_zoom:
            h, w = h + (h - 1) * (p.zoom_factor - 1), w + (w - 1) * (p.zoom_factor - 1)
        if not (has_zoom or has_shrink):
            if not (p.HasField("height") and p.HasField("width")):
                raise self._err("interp_param needs zoom_factor, shrink_factor, or height and width", layer)
            h, w = p.height, p.width
        if h <= 0 or w <= 0:
            raise self._err(f"output size {h}x{w} must be positive", layer)
        out = (s[0], s[1], h, w)
        # Sizes of the spatial axes only, so that the graph stays valid for any batch size; opset 17's
        # Resize has no `axes`, so there the sizes name every axis.
        attrs: dict[str, Any] = {"axes": [2, 3]} if self.opset >= 18 else {}
        sizes = self._const(f"{layer.name}/sizes", np.array(out[2:] if attrs else out, np.int64), layer)
        # DeepLab's Interp maps corners onto corners.
        self._node(
            "Resize",
            [x, "", "", sizes],
            [self._out(layer, out)],
            layer.name,
            layer,
            mode="linear",
            coordinate_transformation_mode="align_corners",
            **attrs,
        )

    def _emit_upsample(self, layer: _Layer) -> None:
        x, s = self._x(layer)
        p = layer.proto.upsample_param
        if len(s) != 4:
            raise self._err(f"needs a 4D input (N, C, H, W), got {_fmt_shape(s)}", layer)
        if p.HasField("scale_h") or p.HasField("scale_w"):
            if not (p.HasField("scale_h") and p.HasField("scale_w")):
                raise self._err("scale_h and scale_w must be given together", layer)
            sh, sw = p.scale_h, p.scale_w
        else:
            sh = sw = p.scale
        if sh <= 0 or sw <= 0:
            raise self._err("scale must be positive", layer)
        scales = self._const(f"{layer.name}/scales", np.array([1, 1, sh, sw], np.float32), layer)
        out = (s[0], s[1], s[2] * sh, s[3] * sw)
        self._node(
            "Resize",
            [x, "", scales],
            [self._out(layer, out)],
            layer.name,
            layer,
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )

    # ------------------------------------------------------------------ model

    def _build_model(self, net: _Msg) -> ir.Model:
        inputs = [
            helper.make_tensor_value_info(v.name, TensorProto.FLOAT, list(v.shape or ()))
            for v in self.graph_inputs
        ]
        outputs = []
        for v in self.graph_outputs:
            src = v if v.alias_of is None else v.source()
            outputs.append(helper.make_tensor_value_info(v.name, TensorProto.FLOAT, list(src.shape or ())))
        graph = helper.make_graph(
            self.nodes,
            net.name or self.path.stem,
            inputs,
            outputs,
            initializer=self.initializers,
            value_info=self.value_info,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", int(self.opset))],
            producer_name="mtc",
            producer_version=__version__,
            # IR 10 is the first with node metadata_props; no newer than the opset needs, for older runtimes.
            ir_version=max(10, helper.find_min_ir_version_for([helper.make_opsetid("", int(self.opset))])),
        )
        helper.set_model_props(
            model, {"mtc.frontend": "prototxt", "mtc.source": self.path.name, "mtc.seed": str(int(self.seed))}
        )
        out = ir.from_proto(model)
        for name, value in out.graph.initializers.items():
            arr = self.arrays[name]
            if isinstance(arr, _Deferred):
                value.const_value = DrawnTensor(arr.fn, arr.shape, name)
            else:
                value.const_value = ir.Tensor(arr, name=name)
        return out
