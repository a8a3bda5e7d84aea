"""Small CNN backbones written as ONNX text, for the pass tests (feature finding, heads)."""

from __future__ import annotations

import numpy as np


class Net:
    """Builds an ONNX-text model layer by layer, tracking the current tensor and its shape.

    Every layer method returns the name of the tensor it produced; ``text()`` renders the model
    with the given (or the current) tensors as outputs. Weights are random, from ``seed``.
    """

    def __init__(self, *, c: int = 3, hw: tuple[int, int] = (8, 8), seed: int = 0, batch: str = "N") -> None:
        self.rng = np.random.default_rng(seed)
        self.batch = batch
        self.shapes: dict[str, tuple] = {"x": (batch, c, *hw)}
        self.cur = "x"
        self.lines: list[str] = []
        self.inits: list[str] = []
        self.k = 0

    # ------------------------------------------------------------------ plumbing
    def _name(self, tag: str) -> str:
        self.k += 1
        return f"{tag}{self.k}"

    def _init(self, tag: str, arr: np.ndarray, dtype: str = "float") -> str:
        name = self._name(tag)
        vals = ", ".join(repr(float(v)) if dtype == "float" else str(int(v)) for v in arr.ravel())
        shape = ",".join(str(d) for d in arr.shape)
        self.inits.append(f"{dtype}[{shape}] {name} = {{{vals}}}")
        return name

    def _op(self, tag: str, op: str, inputs: list[str], shape: tuple, attrs: str = "") -> str:
        out = self._name(tag)
        a = f" <{attrs}>" if attrs else ""
        self.lines.append(f"[{out}] {out} = {op}{a} ({', '.join(inputs)})")  # node named like its output
        self.shapes[out] = shape
        self.cur = out
        return out

    @property
    def shape(self) -> tuple:
        return self.shapes[self.cur]

    # ------------------------------------------------------------------ layers
    def conv(self, c_out: int, *, k: int = 3, stride: int = 1, x: str | None = None) -> str:
        x = x or self.cur
        n, c, h, w = self.shapes[x]
        wt = self._init("w", self.rng.standard_normal((c_out, c, k, k)) * np.sqrt(2.0 / (c * k * k)))
        b = self._init("b", self.rng.standard_normal(c_out) * 0.1)
        p = k // 2
        ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
        attrs = f"kernel_shape = [{k}, {k}], pads = [{p}, {p}, {p}, {p}], strides = [{stride}, {stride}]"
        return self._op("conv", "Conv", [x, wt, b], (n, c_out, ho, wo), attrs)

    def relu(self, x: str | None = None) -> str:
        x = x or self.cur
        return self._op("relu", "Relu", [x], self.shapes[x])

    def res(self) -> str:
        """conv-relu-conv, plus the block's input, then relu (channels kept)."""
        x = self.cur
        c = self.shape[1]
        self.conv(c)
        self.relu()
        y = self.conv(c)
        self._op("add", "Add", [y, x], self.shapes[x])
        return self.relu()

    def maxpool(self) -> str:
        n, c, h, w = self.shape
        attrs = "kernel_shape = [2, 2], strides = [2, 2]"
        return self._op("pool", "MaxPool", [self.cur], (n, c, h // 2, w // 2), attrs)

    def se(self) -> str:
        """Squeeze-and-excite: the map times sigmoid(conv(global pool)): stays spatial."""
        x = self.cur
        n, c, h, w = self.shape
        s = self._op("sq", "GlobalAveragePool", [x], (n, c, 1, 1))
        self.conv(c, k=1, x=s)
        g = self._op("sig", "Sigmoid", [self.cur], (n, c, 1, 1))
        return self._op("se", "Mul", [x, g], (n, c, h, w))

    def gap(self) -> str:
        n, c = self.shape[:2]
        return self._op("gap", "GlobalAveragePool", [self.cur], (n, c, 1, 1))

    def reducemean(self) -> str:
        n, c = self.shape[:2]
        axes = self._init("axes", np.array([-2, -1]), "int64")
        return self._op("mean", "ReduceMean", [self.cur, axes], (n, c, 1, 1), "keepdims = 1")

    def avgpool_full(self) -> str:
        """Caffe-style global pooling: an AveragePool whose kernel is the whole map."""
        n, c, h, w = self.shape
        return self._op("avg", "AveragePool", [self.cur], (n, c, 1, 1), f"kernel_shape = [{h}, {w}]")

    def flatten(self) -> str:
        n, *rest = self.shape
        return self._op("flat", "Flatten", [self.cur], (n, int(np.prod(rest))), "axis = 1")

    def gemm(self, k: int) -> str:
        n, c = self.shape
        wt = self._init("fcw", self.rng.standard_normal((k, c)) / np.sqrt(c))
        b = self._init("fcb", np.zeros(k))
        return self._op("fc", "Gemm", [self.cur, wt, b], (n, k), "transB = 1")

    def reshape4(self) -> str:
        n, c = self.shape
        shp = self._init("shape", np.array([0, c, 1, 1]), "int64")
        return self._op("r4", "Reshape", [self.cur, shp], (n, c, 1, 1))

    # ------------------------------------------------------------------ rendering
    def _decl(self, name: str) -> str:
        return f"float[{','.join(str(d) for d in self.shapes[name])}] {name}"

    def text(self, outputs: list[str] | None = None) -> str:
        outs = outputs or [self.cur]
        inits = f" <{', '.join(self.inits)}>" if self.inits else ""
        body = "\n  ".join(self.lines)
        return (
            '<ir_version: 8, opset_import: ["" : 18]>\n'
            f"g ({self._decl('x')}) => ({', '.join(self._decl(o) for o in outs)}){inits} {{\n  {body}\n}}\n"
        )

    def feeds(self, batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, *self.shapes["x"][1:])
        return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
