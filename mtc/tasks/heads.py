"""Task heads built as IR subgraphs, so they lower, train and export like the backbone.

Dense kinds get AutoMTL's DeepLab ASPP head (as in AdaShare/AutoMTL's ``ASPPHeadNode``): four
parallel branches, one per atrous rate r (6, 12, 18, 24)::

    feature ─┬─ Conv3x3(dilation r, pad r) ─ Relu ─ Conv1x1 ─ Relu ─ Conv1x1(→ channels) ─┐
             ├─ ... (one branch per rate) ...                                             ├─ Add ─ Add ─ Add ─ Resize(input_hw) ─► task
             └─ ...                                                                       ┘

``Resize`` is bilinear with ``coordinate_transformation_mode="half_pixel"``: it equals PyTorch's
``F.interpolate(mode="bilinear", align_corners=False)`` also for an output side of 1, where
``pytorch_half_pixel`` differs. Global kinds (``class``, ``regress``) get
``GlobalAveragePool → Flatten → Gemm(transB=1)``.

Names: nodes ``head@{task}/aspp{r}/conv1``, ``head@{task}/add1``, ``head@{task}/resize``,
``head@{task}/fc``; initializers ``head@{task}/aspp{r}/conv1.weight`` / ``.bias``; each node's
intermediate output is named like the node; the head's output is named after the task. Every node
carries ``metadata_props`` ``mtc.origin = head@{task}`` and ``mtc.task = {task}``.

Initialisation is reproducible: each weight comes from a NumPy generator seeded with
``[seed, crc32(initializer name)]``; the name holds the task, so tasks get different weights, and
the same inputs give byte-identical files whatever order weights are read in. Convolutions are
Kaiming-uniform (fan_out, ReLU gain: the variance of torchvision DeepLab's Kaiming-normal,
``std = sqrt(2 / (C_out k_h k_w))``, at a third of its drawing time), the linear layer is PyTorch's ``nn.Linear`` default (uniform ±1/sqrt(fan_in)), and biases
are zero. Weights are lazy, cached ``ir.LazyTensor`` objects, drawn when first read (saving,
lowering), so building heads spends no time in the random generator (5 heads of width 256 on a
512-channel feature hold 25 M weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir.names import ORIGIN_KEY, TASK_KEY
from mtc.ir.names import head_prefix as _head_prefix
from mtc.ir.seeded import SeededTensor
from mtc.tasks.kinds import get_kind
from mtc.tasks.spec import TaskSpec

__all__ = ["DEFAULT_RATES", "DEFAULT_WIDTH", "TASK_KEY", "build_head", "head_prefix"]

#: DeepLabv3's ASPP width; AutoMTL used 1024 (with dropout 0.5).
DEFAULT_WIDTH = 256
DEFAULT_RATES = (6, 12, 18, 24)


def head_prefix(task: TaskSpec | str) -> str:
    """``head@{task}``: the prefix of the head's node and initializer names, and its origin."""
    return _head_prefix(task.name if isinstance(task, TaskSpec) else task)



class _Builder:
    """Builds one head's nodes and initializers, checking names stay unique.

    Nothing touches the graph before :meth:`commit`, so a head that fails half-way (a name clash)
    leaves the graph as it was; :meth:`discard` unhooks the nodes made so far from the feature.
    """

    def __init__(self, graph: ir.Graph, task: TaskSpec, seed: int, batch: int | str | None) -> None:
        self.graph = graph
        self.task = task
        self.prefix = head_prefix(task)
        self.seed = seed
        self.batch = batch
        self.meta = {ORIGIN_KEY: self.prefix, TASK_KEY: task.name}
        self.node_names = {n.name for n in graph if n.name}
        self.value_names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        self.value_names |= {o.name for n in graph for o in n.outputs if o.name}
        self.nodes: list[ir.Node] = []
        self.inits: list[ir.Value] = []

    def commit(self) -> None:
        for v in self.inits:
            self.graph.register_initializer(v)
        self.graph.extend(self.nodes)

    def discard(self) -> None:
        for n in self.nodes:
            for i in range(len(n.inputs)):
                n.replace_input_with(i, None)
        self.nodes.clear()
        self.inits.clear()

    def _claim(self, name: str, names: set[str], what: str) -> str:
        if name in names:
            raise MtcError(
                f"--tasks: task '{self.task.name}': the model already has a {what} named '{name}'; rename the task"
            )
        names.add(name)
        return name

    def init(self, name: str, array: np.ndarray) -> ir.Value:
        """Register a constant initializer ``{prefix}/{name}``."""
        full = self._claim(f"{self.prefix}/{name}", self.value_names, "tensor")
        return self._register(full, ir.tensor(array, name=full))

    def random_init(self, name: str, shape: tuple[int, ...], recipe: str) -> ir.Value:
        """Register a float32 initializer drawn (lazily, once) by ``recipe`` (:mod:`mtc.ir.seeded`)."""
        full = self._claim(f"{self.prefix}/{name}", self.value_names, "tensor")
        return self._register(full, SeededTensor(recipe, self.seed, shape, full))

    def _register(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        v = ir.Value(name=name, const_value=tensor)
        v.shape = ir.Shape([int(d) for d in tensor.shape.numpy()])
        v.dtype = tensor.dtype
        self.inits.append(v)
        return v

    def node(
        self,
        op: str,
        name: str,
        inputs: Sequence[ir.Value | None],
        shape: Sequence[int | str | None],
        attributes: dict | None = None,
        *,
        out: str | None = None,
    ) -> ir.Value:
        node_name = self._claim(f"{self.prefix}/{name}", self.node_names, "node")
        out_name = self._claim(out or node_name, self.value_names, "tensor")
        n = ir.node(op, list(inputs), attributes or {}, name=node_name, metadata_props=dict(self.meta))
        y = n.outputs[0]
        y.name = out_name
        y.dtype = ir.DataType.FLOAT
        y.shape = ir.Shape(list(shape))
        self.nodes.append(n)
        return y

    def conv(
        self, name: str, x: ir.Value, c_in: int, c_out: int, hw: tuple, *, k: int = 1, rate: int = 1
    ) -> ir.Value:
        w = self.random_init(f"{name}.weight", (c_out, c_in, k, k), "kaiming_uniform")
        b = self.init(f"{name}.bias", np.zeros(c_out, dtype=np.float32))
        pad = rate * (k - 1) // 2
        attrs = {
            "kernel_shape": [k, k],
            "strides": [1, 1],
            "pads": [pad] * 4,
            "dilations": [rate, rate],
            "group": 1,
        }
        return self.node("Conv", name, [x, w, b], [self.batch, c_out, *hw], attrs)


def _check_feature(feature: ir.Value, task: TaskSpec, dense: bool) -> tuple[int, tuple, int | str | None]:
    """The feature's channels, spatial dims and batch dim; MtcError when a head cannot attach."""
    where = f"task '{task.name}' ({task.kind}) cannot attach to tensor '{feature.name}'"
    if feature.dtype is not None and feature.dtype != ir.DataType.FLOAT:
        raise MtcError(f"{where}: heads are float32, the tensor is {feature.dtype.name.lower()}")
    if feature.shape is None:
        raise MtcError(f"{where}: its shape is unknown (run shape inference first)")
    dims = [d if isinstance(d, int) else d.value for d in feature.shape]
    if dense and len(dims) != 4:
        raise MtcError(
            f"{where}: a dense head needs an (N, C, H, W) feature map, the tensor has shape {dims}"
        )
    if len(dims) < 2:
        raise MtcError(f"{where}: a head needs an (N, C, ...) tensor, the tensor has shape {dims}")
    c = dims[1]
    if not isinstance(c, int) or c <= 0:
        raise MtcError(f"{where}: its channel dimension is not static (shape {dims})")
    return c, tuple(dims[2:]), dims[0]


def build_head(
    graph: ir.Graph,
    feature: ir.Value,
    task: TaskSpec,
    *,
    input_hw: tuple[int, int],
    width: int = DEFAULT_WIDTH,
    rates: Sequence[int] = DEFAULT_RATES,
    seed: int = 0,
    opset: int = 18,
    dropout: float = 0.0,
) -> ir.Value:
    """Append ``task``'s head to ``graph``, reading ``feature``; return the head's output value.

    The output (named ``task.name``) is not added to ``graph.outputs``: the caller decides.

    Args:
        graph: the graph to extend (nodes appended at its end, initializers registered).
        feature: the backbone tensor the head reads; ``(N, C, H, W)`` for dense kinds, ``(N, C, ...)``
            (pooled) or ``(N, C)`` (used as is) for global kinds. ``C`` must be static.
        task: the task (its kind picks the head; its channels size the output).
        input_hw: the network input's (H, W); dense outputs are resized to it.
        width: channels of the ASPP branches (256: DeepLabv3; AutoMTL used 1024).
        rates: atrous rates, one branch each.
        seed: base seed of the weight initialisation.
        opset: the graph's default-domain opset (17: ``Resize`` gets full ``sizes`` computed from
            ``Shape``; 18+: ``sizes`` of H, W with ``axes=[2, 3]``).
        dropout: if > 0, a ``Dropout`` of this ratio after each ReLU of the ASPP branches (active
            only in training; AutoMTL used 0.5).

    Returns:
        The head's output: ``(N, channels, H_in, W_in)`` for dense kinds, ``(N, channels)`` else.

    Raises:
        MtcError: the feature cannot take the head (shape, dtype), or a name is already taken.
        ValueError: invalid options (width, rates, input_hw, dropout, opset).
    """
    kind = get_kind(task.kind)
    problem = kind.channels_problem(task.channels)
    if problem:
        raise MtcError(f"--tasks: task '{task.name}': {problem}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if not rates or any(int(r) <= 0 for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"rates must be distinct positive integers, got {tuple(rates)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    graph_opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx"))
    if opset < 17 or (graph_opset is not None and opset > graph_opset):
        raise ValueError(
            f"opset {opset} is not usable here (graph opset: {graph_opset}; heads need 17 or newer)"
        )
    if kind.dense and (
        len(input_hw) != 2 or any(not isinstance(s, int | np.integer) or s <= 0 for s in input_hw)
    ):
        raise ValueError(f"input_hw must be two positive ints, got {input_hw}")
    c_in, spatial, batch = _check_feature(feature, task, kind.dense)
    b = _Builder(graph, task, seed, batch)
    try:
        if kind.dense:
            out_hw = (int(input_hw[0]), int(input_hw[1]))
            y = _aspp_head(
                b, feature, c_in, spatial, out_hw, width=width, rates=rates, opset=opset, dropout=dropout
            )
        else:
            y = _global_head(b, feature, c_in, spatial, task.channels)
    except BaseException:
        b.discard()
        raise
    b.commit()
    return y


def _aspp_head(
    b: _Builder,
    feature: ir.Value,
    c_in: int,
    spatial: tuple,
    out_hw: tuple[int, int],
    *,
    width: int,
    rates: Sequence[int],
    opset: int,
    dropout: float,
) -> ir.Value:
    task, batch = b.task, b.batch
    ratio = None
    if dropout > 0:
        ratio = b.init("dropout.ratio", np.array(dropout, dtype=np.float32))

    def act(name: str, x: ir.Value, c: int) -> ir.Value:
        y = b.node("Relu", name, [x], [batch, c, *spatial])
        if ratio is not None:
            y = b.node("Dropout", name.replace("relu", "drop"), [y, ratio], [batch, c, *spatial])
        return y

    branches = []
    for r in rates:
        p = f"aspp{int(r)}"
        y = b.conv(f"{p}/conv1", feature, c_in, width, spatial, k=3, rate=int(r))
        y = act(f"{p}/relu1", y, width)
        y = b.conv(f"{p}/conv2", y, width, width, spatial)
        y = act(f"{p}/relu2", y, width)
        branches.append(b.conv(f"{p}/conv3", y, width, task.channels, spatial))
    # Summed left to right, like ``fc1(x) + fc2(x) + fc3(x) + fc4(x)`` in AutoMTL.
    needs_resize = tuple(spatial) != out_hw
    y = branches[0]
    for i, other in enumerate(branches[1:], start=1):
        last = i == len(branches) - 1 and not needs_resize
        y = b.node(
            "Add", f"add{i}", [y, other], [batch, task.channels, *spatial], out=task.name if last else None
        )
    if not needs_resize:
        if len(branches) == 1:  # a lone branch still has to be called after the task
            y = b.node("Identity", "out", [y], [batch, task.channels, *out_hw], out=task.name)
        return y
    attrs: dict[str, Any] = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    if opset >= 18:
        sizes = b.init("resize.sizes", np.array(out_hw, dtype=np.int64))
        attrs["axes"] = [2, 3]
    else:
        nc = b.node("Shape", "resize/shape", [y], [2], {"start": 0, "end": 2})
        nc.dtype = ir.DataType.INT64
        hw = b.init("resize.hw", np.array(out_hw, dtype=np.int64))
        sizes = b.node("Concat", "resize/sizes", [nc, hw], [4], {"axis": 0})
        sizes.dtype = ir.DataType.INT64
    return b.node(
        "Resize", "resize", [y, None, None, sizes], [batch, task.channels, *out_hw], attrs, out=task.name
    )


def _global_head(b: _Builder, feature: ir.Value, c_in: int, spatial: tuple, channels: int) -> ir.Value:
    x = feature
    if spatial:
        x = b.node("GlobalAveragePool", "pool", [x], [b.batch, c_in, *([1] * len(spatial))])
        x = b.node("Flatten", "flatten", [x], [b.batch, c_in], {"axis": 1})
    w = b.random_init("fc.weight", (channels, c_in), "linear_uniform")
    bias = b.init("fc.bias", np.zeros(channels, dtype=np.float32))
    return b.node("Gemm", "fc", [x, w, bias], [b.batch, channels], {"transB": 1}, out=b.task.name)
