"""The executable graph: an ``nn.Module`` that interprets an ONNX graph with PyTorch kernels.

Everything that does not depend on the input values is done once, when the module is built: the
nodes are sorted topologically and resolved to kernels through the op registry, build-time
constants are propagated (shape arithmetic folds away), every value gets an integer slot in a flat
environment list, and the last use of every value is known so that it can be dropped as soon as it
is dead. A step of ``forward`` is then a loop over ``(kernel, input slots, output slots, slots to
free)`` tuples: no dictionary, name or shape work per node.
"""

from __future__ import annotations

import copy
import heapq
import keyword
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from mtc.errors import MtcError
from mtc.ir.memory import release_freed_memory
from mtc.ir.names import gc_paused
from mtc.ir.seeded import DrawnTensor
from mtc.lower import mtc_ops as _mtc_ops  # noqa: F401  (registers the ai.mtc ops)
from mtc.lower import ops as _ops  # noqa: F401  (registers the built-in ops)
from mtc.lower.controls import Controls
from mtc.lower.fusion import fuse
from mtc.lower.registry import (
    BuildNode,
    Folded,
    InputInfo,
    OpSpec,
    lookup,
    normalize_domain,
    supported_ops,
)
from mtc.lower.tensors import to_numpy, to_torch, torch_dtype

__all__ = ["GraphModule", "lower", "to_numpy", "to_torch", "torch_dtype"]

#: How fused groups (mtc.lower.fusion) are treated: pure functions of their inputs (their builders
#: come with the group, not from this spec).
_FUSED = OpSpec("fused", "", 1, lambda node: node.folded())

def _is_float(arr: Any) -> bool:
    return isinstance(arr, np.ndarray) and arr.dtype.kind == "f"


def _attr_value(attr: ir.Attr) -> Any:
    t = attr.type
    if t == ir.AttributeType.TENSOR:
        return attr.value.numpy()
    if t == ir.AttributeType.TENSORS:
        return [v.numpy() for v in attr.value]
    if t in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(attr.value)
    return attr.value


def _static_shape(value: ir.Value) -> tuple[int | None, ...] | None:
    shape = value.shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape.dims)


def _sanitize(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    if not s or s[0].isdigit() or keyword.iskeyword(s):
        s = "_" + s
    return s


@dataclass
class _Val:
    """Build-time knowledge about one graph value."""

    kind: str  # "runtime" | "const" | "init"
    value: Any = None  # numpy array for const / init
    shape: tuple[int | None, ...] | None = None
    dtype: torch.dtype | None = None
    slot: int | None = None
    init_name: str | None = None  # the initializer it came from
    roles: set[str] = field(default_factory=set)
    owned: bool = False  # ``value`` is a fresh array nothing else references: torch may take it as is


def _const_val(value: Any) -> _Val:
    """Knowledge about a build-time constant (an array, or a list of arrays for a sequence)."""
    if isinstance(value, list):
        return _Val("const", value)
    a = np.asarray(value)
    dtype = None
    if a.dtype != object:
        dtype = torch.bfloat16 if a.dtype.name == "bfloat16" else torch.from_numpy(np.empty(0, a.dtype)).dtype
    return _Val("const", a, tuple(a.shape), dtype)


def _toposort(graph: ir.Graph) -> list[ir.Node]:
    """Nodes in a topological order, keeping the file order where it is already valid."""
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    deps: list[set[int]] = []
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        d = set()
        for v in n.inputs:
            if v is None:
                continue
            p = v.producer()
            if p is not None and id(p) in index and index[id(p)] != i:
                d.add(index[id(p)])
        deps.append(d)
        for j in d:
            users[j].append(i)
    ready = [i for i, d in enumerate(deps) if not d]
    heapq.heapify(ready)
    order: list[int] = []
    remaining = [len(d) for d in deps]
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i in range(len(nodes)) if remaining[i] > 0)
        raise MtcError(
            "the graph has a cycle", node=stuck.name, op=stuck.op_type, origin=stuck.metadata_props.get("mtc.origin")
        )
    return [nodes[i] for i in order]


class GraphModule(nn.Module):
    """An ONNX graph as a trainable ``nn.Module`` (see :func:`lower`).

    Attributes:
        input_names: graph input names, in the order ``forward`` takes them.
        output_names: graph output names, in the order ``forward`` returns them.
        initializer_names: module attribute name -> original initializer name, for every parameter
            and buffer that came from an initializer.
    """

    def __init__(self, model: ir.Model, *, device: torch.device | str | None = None,
                 controls: Controls | None = None, owned: bool = False) -> None:
        super().__init__()
        if not isinstance(model, ir.Model):  # an onnx.ModelProto
            model = ir.from_proto(model)
        #: what drives the ai.mtc choice kernels at run time (mtc.lower.controls)
        self.controls: Controls = controls if controls is not None else Controls()
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.initializer_names: dict[str, str] = {}
        self._node_labels: list[tuple[str, str]] = []
        with gc_paused():
            self._build(model)
            self._model = self._skeleton(model, owned=owned)
        release_freed_memory()  # the build's transient copies and graph clones
        self.controls.bind(self)
        if device is not None:
            self.to(device)

    def _skeleton(self, model: ir.Model, *, owned: bool) -> ir.Model:
        """The graph without the arrays the module now holds as parameters and buffers.

        Keeping the source model's weight arrays next to the torch tensors would double the
        module's memory; :meth:`to_model` puts the current tensors back. A model the caller hands
        over (``owned``: a private clone) is stripped in place; any other is cloned first (the
        clone shares tensors, and the caller's model stays intact).
        """
        skel = model if owned else model.clone()
        held = set(self.initializer_names.values())
        for name, v in skel.graph.initializers.items():
            if name in held:
                v.const_value = None
        return skel

    # --- build ----------------------------------------------------------------------------------

    def _unique_attr(self, name: str) -> str:
        base = _sanitize(name)
        attr, k = base, 1
        while hasattr(self, attr) or attr in self._parameters or attr in self._buffers:
            attr = f"{base}_{k}"
            k += 1
        return attr

    def _build(self, model: ir.Model) -> None:
        graph = model.graph
        opsets = {normalize_domain(d): v for d, v in model.opset_imports.items()}
        nodes = _toposort(graph)
        self._check_supported(nodes, opsets)
        views = fuse(nodes, graph)

        vals: dict[ir.Value, _Val] = {}
        n_slots = 0

        def new_slot() -> int:
            nonlocal n_slots
            n_slots += 1
            return n_slots - 1

        for name, v in graph.initializers.items():
            if v.const_value is None:
                continue
            cv = v.const_value
            if isinstance(cv, DrawnTensor):  # fresh weights (heads, prototxt fillers): drawn straight into the module
                arr, owned = cv.owned_array()
            else:
                arr, owned = cv.numpy(), False
            # Float tensors are weights; scalars are literals that exporters lifted (GELU's 0.5).
            kind = "init" if _is_float(arr) and arr.size > 1 else "const"
            vals[v] = _Val(kind, arr, tuple(arr.shape), torch_dtype(cv.dtype), init_name=name, owned=owned)

        input_slots: list[int] = []
        for v in graph.inputs:
            if v in vals:  # an initializer listed as an input (old ONNX): a default, not a user input
                continue
            slot = new_slot()
            vals[v] = _Val("runtime", shape=_static_shape(v), dtype=torch_dtype(v.dtype), slot=slot)
            self.input_names.append(v.name or f"input{len(input_slots)}")
            input_slots.append(slot)

        # Constants and initializers used at run time get a slot when first used.
        state_vals: list[_Val] = []

        def runtime_slot(val: _Val) -> int:
            if val.slot is None:
                val.slot = new_slot()
                state_vals.append(val)
            return val.slot

        graph_outputs = set(graph.outputs)
        steps: list[tuple[Any, tuple[int, ...], Any, list[int]]] = []
        reads: list[tuple[int, ...]] = []
        extra_state: list[tuple[int, str, bool]] = []

        for view in views:
            node = view.node
            domain = normalize_domain(node.domain)
            opset = opsets.get(domain, 1) if node.version is None else node.version
            spec = _FUSED if view.builder is not None else lookup(node.op_type, domain, opset)
            assert spec is not None  # checked above
            builder = view.builder or spec.builder
            origin = node.metadata_props.get("mtc.origin")
            infos: list[InputInfo] = []
            for vin in view.inputs:
                if vin is None or (not vin.name and vin not in vals):
                    infos.append(InputInfo(name="", present=False))
                    continue
                val = vals.get(vin)
                if val is None:
                    raise MtcError(
                        f"input '{vin.name}' is neither a graph input, an initializer nor produced by a node",
                        node=node.name, op=view.op_type, origin=origin,
                    )
                infos.append(
                    InputInfo(
                        name=vin.name or "",
                        present=True,
                        value=val.value if val.kind != "runtime" else None,
                        param_candidate=val.kind == "init",
                        shape=val.shape,
                        dtype=val.dtype,
                    )
                )
            outputs = view.outputs
            bn = BuildNode(
                name=node.name or f"{node.op_type}_{len(steps)}",
                op_type=view.op_type,
                domain=domain,
                opset=opset,
                attrs={k: _attr_value(a) for k, a in node.attributes.items()},
                inputs=infos,
                output_names=[o.name or "" for o in outputs],
                outputs_used=[bool(o.uses()) or o in graph_outputs for o in outputs],
                origin=origin,
                module=self,
            )
            extra_slots: list[int] = []
            extra_tensors: list[torch.Tensor] = []

            def add_param(pname: str, tensor: torch.Tensor, buffer: bool, persistent: bool, ir_name: str | None,
                          _extra: list[int] = extra_slots, _tensors: list[torch.Tensor] = extra_tensors) -> str:
                attr = self._unique_attr(ir_name or pname)
                if buffer:
                    self.register_buffer(attr, tensor, persistent=persistent)
                else:
                    self.register_parameter(attr, nn.Parameter(tensor))
                if ir_name is not None:
                    self.initializer_names[attr] = ir_name
                slot = new_slot()
                _extra.append(slot)
                _tensors.append(tensor)
                extra_state.append((slot, attr, buffer))
                return attr

            bn._add_param = add_param
            try:
                result = builder(bn)
            except MtcError:
                raise
            except Exception as e:
                raise bn.error(f"cannot lower: {type(e).__name__}: {e}") from e

            args = bn.runtime_inputs()
            arg_vals = [vals[view.inputs[i]] for i in args]  # type: ignore[index]
            if view.op_type == "Identity" and domain == "" and view.builder is None and len(arg_vals) == 1:
                vals[outputs[0]] = arg_vals[0]  # an alias, not a step
                continue
            if isinstance(result, Folded):
                out_values: list[Any] | None = list(result.values)
            elif spec.foldable and not extra_slots and all(a.kind == "const" for a in arg_vals):
                out_values = self._fold(result, [a.value for a in arg_vals], len(outputs))
            else:
                out_values = None

            if out_values is not None:
                if len(out_values) != len(outputs):
                    raise bn.error(f"folded to {len(out_values)} values for {len(outputs)} outputs")
                for o, arr in zip(outputs, out_values, strict=True):
                    if arr is not None:
                        vals[o] = _const_val(arr)
                continue

            for i, a in zip(args, arg_vals, strict=True):
                if a.kind != "runtime":
                    a.roles.add(bn.roles.get(i, "input"))
            in_slots: tuple[int, ...] = tuple(
                [a.slot if a.kind == "runtime" and a.slot is not None else runtime_slot(a) for a in arg_vals]
                + extra_slots
            )
            out_slots = []
            for o in outputs:
                slot = new_slot()
                vals[o] = _Val("runtime", shape=_static_shape(o), dtype=torch_dtype(o.dtype), slot=slot)
                out_slots.append(slot)
            if spec.shape_probe:
                extra_vals = [_Val("const", None, tuple(t.shape), t.dtype) for t in extra_tensors]
                self._probe(result, arg_vals + extra_vals, [vals[o] for o in outputs])
            out: Any = out_slots[0] if len(outputs) == 1 else tuple(out_slots)
            steps.append((result, in_slots, out, []))
            reads.append(in_slots)
            self._node_labels.append((bn.name, view.label))

        # Graph outputs: constants among them need a slot too.
        output_slots: list[int] = []
        for v in graph.outputs:
            val = vals.get(v)
            if val is None:
                raise MtcError(f"graph output '{v.name}' is not computed by the graph")
            output_slots.append(val.slot if val.kind == "runtime" else runtime_slot(val))  # type: ignore[arg-type]
            self.output_names.append(v.name or f"output{len(output_slots) - 1}")

        param_slots, buffer_slots = self._register_state(state_vals)
        for slot, attr, is_buffer in extra_state:
            (buffer_slots if is_buffer else param_slots).append((slot, attr))

        # Free every runtime value after its last reader (or at once when nothing reads it).
        state = {s for s, _ in param_slots} | {s for s, _ in buffer_slots}
        keep = set(output_slots) | state
        last_use: dict[int, int] = {}
        for k, ins in enumerate(reads):
            for s in ins:
                last_use[s] = k
        for k, (_fn, _ins, out, _free) in enumerate(steps):
            for s in (out,) if isinstance(out, int) else out:
                last_use.setdefault(s, k)
        for s in input_slots:
            last_use.setdefault(s, -1)
        frees: dict[int, list[int]] = {}
        for s, k in last_use.items():
            if s not in keep and k >= 0:
                frees.setdefault(k, []).append(s)
        self._steps: list[tuple[Any, tuple[int, ...], Any, tuple[int, ...]]] = [
            (fn, ins, out, tuple(sorted(frees.get(k, ())))) for k, (fn, ins, out, _f) in enumerate(steps)
        ]
        self._n_slots = n_slots
        self._input_slots = tuple(input_slots)
        self._output_slots = tuple(output_slots)
        self._param_slots = tuple(param_slots)
        self._buffer_slots = tuple(buffer_slots)

    def _check_supported(self, nodes: Iterable[ir.Node], opsets: dict[str, int]) -> None:
        missing = []
        for node in nodes:
            domain = normalize_domain(node.domain)
            opset = opsets.get(domain, 1) if node.version is None else node.version
            if lookup(node.op_type, domain, opset) is None:
                missing.append(node)
        if not missing:
            return
        node = missing[0]
        domain = normalize_domain(node.domain)
        op = f"{domain}::{node.op_type}" if domain else node.op_type
        more = f" ({len(missing) - 1} more unsupported nodes)" if len(missing) > 1 else ""
        raise MtcError(
            f"op {op} is not supported by the PyTorch lowering{more}; supported ops: "
            + ", ".join(supported_ops()),
            node=node.name,
            op=node.op_type,
            origin=node.metadata_props.get("mtc.origin"),
        )

    @staticmethod
    def _fold(kernel: Any, args: list[Any], n_out: int) -> list[Any] | None:
        """Evaluate a node whose inputs are all build-time constants; ``None`` if it cannot be."""
        try:
            with torch.no_grad():
                out = kernel(*[to_torch(a) for a in args])
        except Exception:
            return None  # e.g. a dtype torch lacks: leave it to run time, where errors name the node
        outs = [out] if n_out == 1 else list(out)
        return [to_numpy(o) for o in outs]

    @staticmethod
    def _probe(kernel: Any, args: list[_Val], outs: list[_Val]) -> None:
        """Learn static output shapes by running the kernel on meta tensors."""
        if all(o.shape is not None and None not in o.shape and o.dtype is not None for o in outs):
            return
        metas = []
        for a in args:
            if a.shape is None or None in a.shape or a.dtype is None:
                return
            metas.append(torch.empty(a.shape, dtype=a.dtype, device="meta"))  # type: ignore[arg-type]
        try:
            with torch.no_grad():
                r = kernel(*metas)
        except Exception:
            return
        rs = [r] if len(outs) == 1 else list(r)
        for o, t in zip(outs, rs, strict=False):
            if isinstance(t, torch.Tensor):
                o.shape = tuple(t.shape)
                o.dtype = t.dtype

    def _register_state(self, state_vals: list[_Val]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        params: list[tuple[int, str]] = []
        buffers: list[tuple[int, str]] = []
        n_const = 0
        for val in state_vals:
            arr = val.value
            owned = val.owned and isinstance(arr, np.ndarray) and arr.flags.c_contiguous and arr.flags.writeable
            tensor = torch.from_numpy(arr) if owned else to_torch(arr)
            val.owned = False  # taken once
            trainable = val.init_name is not None and _is_float(arr) and (
                "weight" in val.roles or (val.kind == "init" and "buffer" not in val.roles)
            )
            if trainable:
                attr = self._unique_attr(val.init_name)  # type: ignore[arg-type]
                self.register_parameter(attr, nn.Parameter(tensor))
                params.append((val.slot, attr))  # type: ignore[arg-type]
                self.initializer_names[attr] = val.init_name  # type: ignore[assignment]
            elif val.init_name is not None and "buffer" in val.roles:
                attr = self._unique_attr(val.init_name)
                self.register_buffer(attr, tensor)
                buffers.append((val.slot, attr))  # type: ignore[arg-type]
                self.initializer_names[attr] = val.init_name
            else:
                # Constants follow the module across devices but are not state.
                attr = self._unique_attr(f"_const{n_const}")
                n_const += 1
                self.register_buffer(attr, tensor, persistent=False)
                buffers.append((val.slot, attr))  # type: ignore[arg-type]
        return params, buffers

    # --- run ------------------------------------------------------------------------------------

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        if len(inputs) != len(self._input_slots):
            raise TypeError(
                f"expected {len(self._input_slots)} inputs ({', '.join(self.input_names)}), got {len(inputs)}"
            )
        self.controls.begin_step()
        env: list[Any] = [None] * self._n_slots
        for s, x in zip(self._input_slots, inputs, strict=True):
            env[s] = x
        params = self._parameters
        for s, k in self._param_slots:
            env[s] = params[k]
        buffers = self._buffers
        for s, k in self._buffer_slots:
            env[s] = buffers[k]
        step = None
        try:
            for step in self._steps:
                fn, ins, out, free = step
                if out.__class__ is int:
                    env[out] = fn(*[env[i] for i in ins])
                else:
                    for s, v in zip(out, fn(*[env[i] for i in ins]), strict=True):
                        env[s] = v
                for s in free:
                    env[s] = None
        except Exception as e:
            if step is None:
                raise
            name, op = self._node_labels[self._steps.index(step)]
            raise RuntimeError(f"while executing node {name} ({op}): {e}") from e
        return tuple([env[s] for s in self._output_slots])

    # --- weights back to the graph --------------------------------------------------------------

    def named_initializers(self) -> dict[str, torch.Tensor]:
        """IR name -> the current parameter or buffer holding it: every initializer that became
        state, and every tensor a kernel added under an IR name (a ``CopyOf`` copy by its name)."""
        state: dict[str, torch.Tensor] = dict(self.named_parameters(recurse=False))
        state.update(self.named_buffers(recurse=False))
        return {orig: state[attr] for attr, orig in self.initializer_names.items()}

    def ir_state(self) -> dict[str, torch.Tensor]:
        """The module's state keyed by IR names (what checkpoints and export use)."""
        return {k: v.detach() for k, v in self.named_initializers().items()}

    def load_ir_state(self, state: dict[str, torch.Tensor], *, strict: bool = True,
                      source: str | None = None) -> None:
        """Load tensors keyed by IR names (see :meth:`ir_state`).

        Raises:
            MtcError: with ``strict``, a missing or unknown name; always, a shape mismatch (naming
                the tensor and ``source``).
        """
        own = self.named_initializers()
        if strict:
            missing = sorted(set(own) - set(state))
            extra = sorted(set(state) - set(own))
            if missing or extra:
                what = f"lacks '{missing[0]}'" if missing else f"has unknown '{extra[0]}'"
                raise MtcError(f"the weights do not fit the network: they {what} "
                               f"({len(missing)} missing, {len(extra)} unknown)", file=source)
        with torch.no_grad():
            for k, v in state.items():
                t = own.get(k)
                if t is None:
                    continue
                if tuple(t.shape) != tuple(v.shape):
                    raise MtcError(f"the weights do not fit the network: '{k}' has shape {tuple(v.shape)}, "
                                   f"expected {tuple(t.shape)}", file=source)
                t.copy_(v.to(t.dtype))

    def to_model(self) -> ir.Model:
        """A copy of the source model with the current weights and statistics as initializers."""
        model = self._model.clone()
        inits = model.graph.initializers
        for name, tensor in self.named_initializers().items():
            old = inits.get(name)
            if old is None:
                continue  # a kernel's own tensor (a CopyOf copy): not an initializer of the graph
            arr = to_numpy(tensor)
            if old.dtype is not None and old.dtype.numpy() != arr.dtype:
                arr = arr.astype(old.dtype.numpy(), copy=False)
            old.const_value = ir.Tensor(arr, name=name)
        return model

    def step_names(self) -> list[str]:
        """Names of the nodes executed per step, in execution order."""
        return [name for name, _ in self._node_labels]

    @property
    def model(self) -> ir.Model:
        """The graph the module was built from, without the weight arrays it holds (its structure,
        shapes and constants; :meth:`to_model` gives a model with the current weights)."""
        return self._model

    @property
    def num_nodes(self) -> int:
        """Nodes executed per step (after build-time folding)."""
        return len(self._steps)

    def extra_repr(self) -> str:
        return (
            f"inputs={self.input_names}, outputs={self.output_names}, steps={len(self._steps)}, "
            f"parameters={len(self._parameters)}"
        )

    # Kernels close over this module (for `training`), so copies are rebuilt rather than deep-copied.
    def __deepcopy__(self, memo: dict[int, Any]) -> GraphModule:
        new = type(self)(self.to_model(), controls=copy.copy(self.controls))
        new.load_state_dict(copy.deepcopy(self.state_dict(), memo))
        for name, p in self.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(p.requires_grad)
        new.train(self.training)
        device = next(iter(self.parameters()), None)
        if device is not None:
            new.to(device.device)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_restore, (ir.to_proto(self.to_model()).SerializeToString(), self.state_dict(), self.training))


def _restore(proto: bytes, state: dict[str, torch.Tensor], training: bool) -> GraphModule:
    import onnx

    module = GraphModule(ir.from_proto(onnx.load_from_string(proto)))
    module.load_state_dict(state)
    module.train(training)
    return module


def lower(model: ir.Model, *, device: torch.device | str | None = None,
          controls: Controls | None = None, owned: bool = False) -> GraphModule:
    """Lower ``model`` to an executable, trainable :class:`GraphModule`.

    Raises:
        MtcError: an op the registry lacks (naming the node, op, origin and the supported ops), or a
            node the registry cannot lower with its attributes.
    """
    return GraphModule(model, device=device, controls=controls, owned=owned)
