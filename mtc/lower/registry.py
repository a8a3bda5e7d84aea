"""The op registry of the PyTorch lowering.

An op is registered with a *builder*: a function called once, when the module is built, with a
:class:`BuildNode` describing the node statically (attributes as Python values, which inputs are
build-time constants and their values, input shapes and dtypes where known, the opset, the owning
module). The builder returns a *kernel*: a closure that does only tensor work each step.

Calling convention of a kernel: it receives, positionally, the values of the node's inputs that are
present (not omitted optional inputs) and that the builder did not consume with
:meth:`BuildNode.const`, in input order, followed by any tensors the builder added with
:meth:`BuildNode.add_parameter`. It returns one value for a single-output node, a sequence of values
(one per output) otherwise. A builder may instead return :meth:`BuildNode.folded` values when it can
compute the outputs at build time (``Shape`` of a statically shaped tensor, for example).

Example::

    @register_op("Relu")
    def _relu(node: BuildNode) -> Kernel:
        return torch.relu

Custom-domain ops (``ai.mtc`` task gates, channel masks, width selectors) register the same way with
``domain="ai.mtc"``; kernels read the training flag at run time from ``node.module.training``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtc.errors import MtcError

if TYPE_CHECKING:
    from torch import nn

Kernel = Callable[..., Any]
Builder = Callable[["BuildNode"], "Kernel | Folded"]

#: The default ONNX domain has two spellings.
_DEFAULT_DOMAINS = ("", "ai.onnx")


def normalize_domain(domain: str | None) -> str:
    return "" if domain in _DEFAULT_DOMAINS or domain is None else domain


@dataclass(frozen=True)
class OpSpec:
    """A registered op: its builder and how the lowering may treat it.

    Attributes:
        op_type: ONNX op type.
        domain: ONNX domain (``""`` for the default domain).
        since_version: first opset version of ``domain`` the builder handles.
        builder: the builder (see the module docstring).
        foldable: whether a node whose runtime inputs are all build-time constants may be evaluated
            once at build time (false for random and stateful ops).
        shape_probe: whether the builder's kernel may be run on meta tensors at build time to learn
            the static shapes of its outputs (false for kernels with side effects).
    """

    op_type: str
    domain: str
    since_version: int
    builder: Builder
    foldable: bool = True
    shape_probe: bool = True


_REGISTRY: dict[tuple[str, str], list[OpSpec]] = {}


def register_op(
    op_type: str,
    *,
    domain: str = "",
    since_version: int = 1,
    foldable: bool = True,
    shape_probe: bool = True,
) -> Callable[[Builder], Builder]:
    """Register the decorated builder for ``op_type`` in ``domain`` from opset ``since_version`` on.

    Several builders may be registered for one op at different ``since_version``; a node gets the
    one with the highest ``since_version`` not above its opset. Registering the same
    ``(domain, op_type, since_version)`` again replaces the earlier builder.
    """
    dom = normalize_domain(domain)

    def deco(builder: Builder) -> Builder:
        specs = _REGISTRY.setdefault((dom, op_type), [])
        specs[:] = [s for s in specs if s.since_version != since_version]
        spec = OpSpec(op_type, dom, since_version, builder, foldable, shape_probe)
        bisect.insort(specs, spec, key=lambda s: s.since_version)
        return builder

    return deco


def lookup(op_type: str, domain: str = "", version: int | None = None) -> OpSpec | None:
    """The spec for ``op_type`` at opset ``version`` of ``domain`` (the newest when ``None``)."""
    specs = _REGISTRY.get((normalize_domain(domain), op_type))
    if not specs:
        return None
    if version is None:
        return specs[-1]
    for spec in reversed(specs):
        if spec.since_version <= version:
            return spec
    return None


def supported_ops(domain: str | None = None) -> list[str]:
    """Sorted registered op types; custom-domain ops are spelled ``domain::Op``.

    Args:
        domain: only this domain's ops (bare op types) when given.
    """
    if domain is not None:
        dom = normalize_domain(domain)
        return sorted(op for (d, op) in _REGISTRY if d == dom)
    return sorted(op if not d else f"{d}::{op}" for (d, op) in _REGISTRY)


@dataclass(frozen=True)
class Folded:
    """Outputs a builder computed at build time (one array per node output)."""

    values: tuple[Any, ...]


@dataclass
class InputInfo:
    """What is known at build time about one input of a node.

    Attributes:
        name: the value's name (``""`` for an omitted optional input).
        present: false for an omitted optional input.
        value: the build-time value (numpy array) of a constant or initializer, else ``None``.
        param_candidate: the value is a float initializer that may become an ``nn.Parameter``.
        shape: the static shape, with ``None`` for unknown dims; ``None`` when the rank is unknown.
        dtype: the torch dtype if known.
    """

    name: str
    present: bool
    value: Any = None
    param_candidate: bool = False
    shape: tuple[int | None, ...] | None = None
    dtype: torch.dtype | None = None


@dataclass
class BuildNode:
    """The static view of one node that a builder receives.

    Attributes:
        name: node name.
        op_type: op type.
        domain: op domain (``""`` for the default domain).
        opset: the model's opset version for ``domain``.
        attrs: attributes as Python values (ints, floats, strings, lists, numpy arrays for tensors).
        inputs: one :class:`InputInfo` per declared input.
        output_names: names of the node's outputs (``""`` for omitted optional outputs).
        outputs_used: per output, whether anything reads it.
        origin: the front-end layer the node came from (``mtc.origin``), if any.
        module: the module being built; kernels may read ``module.training`` at run time.
    """

    name: str
    op_type: str
    domain: str
    opset: int
    attrs: dict[str, Any]
    inputs: list[InputInfo]
    output_names: list[str]
    outputs_used: list[bool]
    origin: str | None
    module: nn.Module
    consumed: set[int] = field(default_factory=set)
    roles: dict[int, str] = field(default_factory=dict)
    extra_params: list[str] = field(default_factory=list)
    _add_param: Callable[..., str] | None = None

    # --- attributes ---------------------------------------------------------------------------

    def attr(self, name: str, default: Any = None) -> Any:
        """Attribute ``name``, or ``default`` when the node does not set it."""
        return self.attrs.get(name, default)

    # --- inputs -------------------------------------------------------------------------------

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    def has_input(self, i: int) -> bool:
        """Whether input ``i`` is given (declared and not an omitted optional input)."""
        return i < len(self.inputs) and self.inputs[i].present

    def is_const(self, i: int) -> bool:
        """Whether input ``i`` has a value at build time (constant, initializer or folded)."""
        return self.has_input(i) and self.inputs[i].value is not None

    def const(self, i: int, default: Any = None) -> Any:
        """The build-time value of input ``i`` (numpy), consuming it: the kernel will not receive it.

        An omitted input gives ``default``. Raises :class:`MtcError` when the input is computed at
        run time; check :meth:`is_const` first where a runtime value is also handled.
        """
        if not self.has_input(i):
            self.consumed.add(i)
            return default
        if self.inputs[i].value is None:
            raise self.error(f"input {i} ('{self.inputs[i].name}') must be known when the module is built")
        self.consumed.add(i)
        return self.inputs[i].value

    def consume(self, i: int) -> None:
        """Drop input ``i`` from the kernel's arguments without reading it (e.g. only its shape is used)."""
        self.consumed.add(i)

    def shape(self, i: int) -> tuple[int | None, ...] | None:
        """Static shape of input ``i`` (``None`` dims unknown), or ``None`` if the rank is unknown."""
        if not self.has_input(i):
            return None
        info = self.inputs[i]
        if info.value is not None and hasattr(info.value, "shape"):
            return tuple(int(d) for d in info.value.shape)
        return info.shape

    def static_shape(self, i: int) -> tuple[int, ...] | None:
        """The fully known shape of input ``i``, else ``None``."""
        s = self.shape(i)
        if s is None or any(d is None for d in s):
            return None
        return tuple(int(d) for d in s)  # type: ignore[arg-type]

    def rank(self, i: int) -> int | None:
        s = self.shape(i)
        return None if s is None else len(s)

    def dtype(self, i: int) -> torch.dtype | None:
        if not self.has_input(i):
            return None
        info = self.inputs[i]
        if isinstance(info.value, np.ndarray) and info.value.dtype != object:
            if info.value.dtype.name == "bfloat16":
                return torch.bfloat16
            return torch.from_numpy(np.empty(0, info.value.dtype)).dtype
        return info.dtype

    def weight(self, *indices: int) -> None:
        """Mark inputs as trainable weights: float initializers there become ``nn.Parameter``s."""
        for i in indices:
            self.roles[i] = "weight"

    def buffer(self, *indices: int) -> None:
        """Mark inputs as state (BN running statistics): initializers there become buffers."""
        for i in indices:
            self.roles.setdefault(i, "buffer")

    def runtime_inputs(self) -> list[int]:
        """Indices of the inputs the kernel will receive, in order."""
        return [i for i, info in enumerate(self.inputs) if info.present and i not in self.consumed]

    # --- module state -------------------------------------------------------------------------

    def add_parameter(self, name: str, tensor: torch.Tensor, *, buffer: bool = False, persistent: bool = True,
                      ir_name: str | None = None) -> str:
        """Register a new parameter (or buffer) on the module for this node.

        The tensor is appended to the kernel's arguments (after the node's inputs), so kernels stay
        pure functions of their arguments and follow the module across devices. ``ir_name`` makes
        it addressable like an initializer (``named_initializers``, checkpoints, export).

        Returns:
            the attribute name it got on the module.
        """
        assert self._add_param is not None
        attr = self._add_param(f"{self.name}.{name}", tensor, buffer, persistent, ir_name)
        self.extra_params.append(attr)
        return attr

    # --- results ------------------------------------------------------------------------------

    def folded(self, *values: Any) -> Folded:
        """Outputs computed at build time (numpy arrays), one per output."""
        return Folded(tuple(values))

    def error(self, message: str) -> MtcError:
        """An :class:`MtcError` about this node (raise it)."""
        return MtcError(message, node=self.name, op=self.op_type, origin=self.origin)


def as_ints(values: Sequence[Any] | np.ndarray | None) -> list[int] | None:
    """A list of Python ints from an attribute or a constant input."""
    if values is None:
        return None
    return [int(v) for v in np.asarray(values).reshape(-1).tolist()]


def operands(node: BuildNode, idxs: Sequence[int], make: Callable[..., Kernel]) -> Kernel:
    """A kernel parameterised by attribute-like inputs (axes, pads, sizes) that follow the data inputs.

    ``make(*values, runtime=...)`` gets the operand values (numpy arrays, ``None`` when omitted) and
    returns a kernel of the data inputs. When every operand is known at build time ``make`` runs
    once, now; otherwise the kernel reads the operands each call and caches ``make`` by their value.
    """
    static: dict[int, Any] = {}
    dyn: list[int] = []
    for i in idxs:
        if not node.has_input(i):
            static[i] = None
        elif node.is_const(i):
            static[i] = node.const(i)
        else:
            dyn.append(i)
    if not dyn:
        return make(*[static[i] for i in idxs], runtime=False)
    n_data = len([i for i in node.runtime_inputs() if i not in dyn])
    cache: dict[tuple[Any, ...], Kernel] = {}

    def kernel(*args: Any) -> Any:
        vals = dict(static)
        key = []
        for i, t in zip(dyn, args[n_data:], strict=True):
            arr = t.detach().cpu().numpy()
            vals[i] = arr
            key.append((arr.dtype.str, arr.shape, arr.tobytes()))
        fn = cache.get(tuple(key))
        if fn is None:
            fn = cache[tuple(key)] = make(*[vals[i] for i in idxs], runtime=True)
        return fn(*args[:n_data])

    return kernel
