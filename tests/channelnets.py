"""Helpers for the channel-analysis and pruning tests: hand-built graphs, the bundled backbones and
the zoo's reference nets (imported once per session), and an oracle of the tests' own.

The oracle here is written apart from both the pruner (mtc.passes.prune) and the export's oracle
(mtc.export.prune): it walks every weighted node of the original model and zeroes the weights
that read removed positions, taking the removed positions from the analysis's per-axis unit table
(not from the groups' consumer lists the export's oracle uses).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from conftest import BACKBONES, rel_err, run_ort
from onnx import TensorProto, helper

from mtc.ir.channels import Channels, analyze
from mtc.ir.shapes import infer_shapes

ROOT = Path(__file__).resolve().parents[1]
#: every bundled backbone file
BACKBONE_FILES = sorted(p.name for p in BACKBONES.glob("*.onnx")) + sorted(p.name for p in BACKBONES.glob("*.prototxt"))
#: the big ones (ImageNet-sized inputs): fewer examples, batch 1
BIG = {"deeplab_resnet34.prototxt", "deeplab_resnet34_adashare.prototxt", "mnasnet.prototxt", "mobilenetv2.prototxt"}


@functools.cache
def backbone(name: str) -> tuple[ir.Model, Channels]:
    from mtc.frontends import import_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = import_model(str(BACKBONES / name))
    return m, analyze(m)


@functools.cache
def zoo_net(name: str) -> tuple[ir.Model, Channels]:
    """A reference net exported with the TorchScript exporter (fast) through the import pipeline."""
    from mtc import zoo
    from mtc.frontends import canonicalize_import
    from mtc.lower.reference import export_module

    m = export_module(zoo.build(name), zoo.REFERENCE[name][1], "torchscript", dynamic_batch=True)
    m = canonicalize_import(m, file=name)
    return m, analyze(m)


def net(key: str) -> tuple[ir.Model, Channels]:
    """``zoo:NAME`` or a backbone file name."""
    return zoo_net(key[4:]) if key.startswith("zoo:") else backbone(key)


# --- hand-built graphs ----------------------------------------------------------------------------


class Builder:
    """A tiny graph builder over onnx.helper with seeded random weights; ``model()`` infers shapes."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0

    def w(self, *shape: int, name: str | None = None, value: np.ndarray | None = None) -> str:
        name = name or f"w{len(self.inits)}"
        arr = value if value is not None else self.rng.standard_normal(shape).astype(np.float32) * 0.5
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
        return name

    def ints(self, *vals: int) -> str:
        return self.w(name=f"c{len(self.inits)}", value=np.array(vals, dtype=np.int64))

    def op(self, op: str, *inputs: str, name: str | None = None, outputs: int = 1, **attrs) -> str:
        self.k += 1
        name = name or f"{op.lower()}{self.k}"
        outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs  # type: ignore[return-value]

    def conv(self, x: str, cin: int, cout: int, k: int = 1, group: int = 1, bias: bool = True,
             name: str | None = None) -> str:
        ins = [x, self.w(cout, cin // group, k, k)] + ([self.w(cout)] if bias else [])
        return self.op("Conv", *ins, name=name, group=group, pads=[k // 2] * 4)

    def bn(self, x: str, c: int) -> str:
        return self.op("BatchNormalization", x, self.w(c), self.w(c), self.w(c),
                       self.w(value=np.abs(self.rng.standard_normal(c)).astype(np.float32) + 0.5))

    def model(self, inputs: dict[str, list[int | str]], outputs: list[str],
              domains: dict[str, int] | None = None) -> ir.Model:
        g = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], self.inits)
        opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
        proto = helper.make_model(g, opset_imports=opsets, ir_version=9)
        m = ir.from_proto(proto)
        infer_shapes(m)
        return m


# --- the tests' own oracle ------------------------------------------------------------------------


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.value)


def zero_removed_inputs(model: ir.Model, channels: Channels, keep: dict[int, tuple[int, ...]]) -> ir.Model:
    """A copy of ``model`` whose weighted nodes ignore every removed channel (weights zeroed)."""
    out = model.clone()
    kept_units = channels.unit_mask(keep)
    for node in out.graph:
        op = node.op_type
        if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        consts = [ir.convenience.get_const_tensor(v) if v is not None else None for v in node.inputs[:2]]
        if op == "MatMul" and consts[0] is not None and consts[1] is None:
            data, w_i = node.inputs[1], 0
            rank = len(data.shape)
            axis = rank - 2
        else:
            data, w_i = node.inputs[0], 1
            rank = len(data.shape)
            axis = {"Conv": 1, "ConvTranspose": 1, "MatMul": rank - 1}.get(op, 0 if _attr(node, "transA", 0) else 1)
        if consts[w_i] is None:
            continue
        mask = channels.position_mask(data.name, axis, kept_units)
        if mask is None or mask.all():
            continue
        W = consts[w_i].numpy().copy()
        gone = ~mask
        if op == "Conv":
            groups = _attr(node, "group", 1)
            cin_g = W.shape[1]
            per_out = W.shape[0] // groups
            # Output row o of group o // per_out reads input channel (o // per_out) * cin_g + j at column j.
            for o in range(W.shape[0]):
                base = (o // per_out) * cin_g
                W[o, gone[base:base + cin_g]] = 0
        elif op == "ConvTranspose":
            W[gone] = 0
        elif op == "Gemm":
            if _attr(node, "transB", 0):
                W[:, gone] = 0
            else:
                W[gone] = 0
        elif w_i == 1:
            W[gone] = 0
        else:
            W[:, gone] = 0
        name = f"{node.inputs[w_i].name}.zeroed.{node.name}"
        v = ir.Value(name=name, shape=ir.Shape(W.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(W, name=name))
        out.graph.register_initializer(v)
        old = node.inputs[w_i]
        node.replace_input_with(w_i, v)
        if old is not None and old.name in out.graph.initializers and not old.uses():
            del out.graph.initializers[old.name]
    return out


def feeds(model: ir.Model, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for v in model.graph.inputs:
        shape = [batch if not isinstance(d, int) else d for d in v.shape]
        out[v.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def compare(original: ir.Model, pruned: ir.Model, channels: Channels, keep: dict[int, tuple[int, ...]],
            batch: int = 2) -> float:
    """Worst relative difference between ``pruned`` and the zeroed oracle over all outputs."""
    x = feeds(original, batch)
    ref = run_ort(zero_removed_inputs(original, channels, keep), x)
    got = run_ort(pruned, x)
    assert len(ref) == len(got)
    worst = 0.0
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape
        worst = max(worst, rel_err(a, b))
    return worst


__all__ = ["BACKBONE_FILES", "BIG", "Builder", "backbone", "compare", "feeds", "net", "zero_removed_inputs",
           "zoo_net"]
