"""Seeded initializers: new weights that are a recipe and a seed until someone reads them.

The heads ``attach-heads`` builds hold tens of millions of fresh weights (five ASPP heads on a
512-channel feature: 25 M). Each is a :class:`SeededTensor`: drawn, once, when first read (by the
lowering, by export), from a NumPy generator seeded with ``[seed, crc32(name)]``. A supergraph file
stores such an initializer as a node ``ai.mtc::Init`` (its recipe, seed, shape and position) instead
of its bytes, and :func:`mtc.ir.io.load` turns the node back into the same lazy initializer; so
saving a supergraph does not draw or write weights nobody trained yet (deeplab_resnet34 with five
tasks: 85 MB instead of 189 MB), and every reader gets bit-identical values.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import memory

DOMAIN = "ai.mtc"
INIT_OP = "Init"


def rng(seed: int, name: str) -> np.random.Generator:
    """The generator of initializer ``name`` under base ``seed``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def _fan_out(shape: tuple[int, ...]) -> int:
    return shape[0] * math.prod(shape[2:])


def kaiming_normal(g: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Kaiming normal, fan_out mode, ReLU gain: std = sqrt(2 / (C_out * prod(kernel)))."""
    std = math.sqrt(2.0 / _fan_out(shape))
    w = memory.empty(shape, np.float32)
    g.standard_normal(dtype=np.float32, out=w)
    w *= np.float32(std)
    return w


def kaiming_uniform(g: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Kaiming uniform, fan_out mode, ReLU gain: U(-b, b) with b = sqrt(6 / (C_out * prod(kernel))),
    the variance of :func:`kaiming_normal` (He et al. 2015 fix only the variance; PyTorch's
    ``kaiming_uniform_``). The heads' default: a uniform draw costs a third of a normal one, and the
    heads' draw was most of the time from a prototxt to a trainable module (82 MB on mobilenetv2)."""
    bound = math.sqrt(6.0 / _fan_out(shape))
    w = memory.empty(shape, np.float32)
    g.random(dtype=np.float32, out=w)
    w *= np.float32(2.0 * bound)
    w -= np.float32(bound)
    return w


def linear_uniform(g: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """``nn.Linear``'s default weight: uniform in ±1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(shape[1])
    return g.uniform(-bound, bound, shape)


#: recipe name -> draw(generator, shape)
RECIPES: dict[str, Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]] = {
    "kaiming_normal": kaiming_normal,
    "kaiming_uniform": kaiming_uniform,
    "linear_uniform": linear_uniform,
}


def draw(recipe: str, seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if recipe not in RECIPES:
        raise MtcError(f"initializer '{name}': unknown recipe '{recipe}' (known: {', '.join(sorted(RECIPES))})")
    return RECIPES[recipe](rng(seed, name), shape).astype(np.float32, copy=False)


class DrawnTensor(ir.LazyTensor):
    """A float32 initializer computed by ``fn`` (fresh memory, same values on every call) when first
    read, and cached; or drawn afresh for a reader that takes ownership (:meth:`owned_array`)."""

    def __init__(self, fn: Callable[[], np.ndarray], shape: tuple[int, ...], name: str) -> None:
        self._fn = fn
        dims = tuple(int(d) for d in shape)
        super().__init__(lambda: ir.tensor(fn(), name=name), dtype=ir.DataType.FLOAT, shape=ir.Shape(list(dims)),
                         cache=True, name=name)

    @property
    def drawn(self) -> bool:
        """Whether the values were read (and are cached)."""
        return self._tensor is not None

    def owned_array(self) -> tuple[np.ndarray, bool]:
        """The values, and whether the caller owns the array (may hand it to torch without a copy).

        Not yet read: a new draw that is not cached (the lowering copies nothing, and the model does
        not keep a second copy of the weights); read before: the cached array, not owned.
        """
        if self._tensor is not None:
            return self._tensor.numpy(), False
        return self._fn(), True


class SeededTensor(DrawnTensor):
    """A float32 initializer drawn by ``recipe`` from ``rng(seed, name)`` when first read."""

    def __init__(self, recipe: str, seed: int, shape: tuple[int, ...], name: str) -> None:
        self.recipe = recipe
        self.seed = int(seed)
        dims = tuple(int(d) for d in shape)
        super().__init__(lambda: draw(recipe, self.seed, name, dims), dims, name)


def encode(model: ir.Model) -> ir.Model:
    """A copy of ``model`` whose seeded initializers are ``ai.mtc::Init`` nodes (for saving)."""
    seeded = [(i, v) for i, v in enumerate(model.graph.initializers.values())
              if isinstance(v.const_value, SeededTensor)]
    if not seeded:
        return model
    m = model.clone()
    g = m.graph
    inits = list(g.initializers.values())
    first = next(iter(g), None)
    for i, _ in seeded:
        v = inits[i]
        t = v.const_value
        assert isinstance(t, SeededTensor)
        spec = json.dumps({"recipe": t.recipe, "seed": t.seed, "shape": [int(d) for d in t.shape.numpy()],
                           "position": i}, separators=(",", ":"))
        node = ir.node(INIT_OP, [], domain=DOMAIN, name=f"{v.name}.init", attributes={"spec": ir.AttrString("spec", spec)})
        out = node.outputs[0]
        name = v.name
        assert name is not None
        del g.initializers[name]
        v.replace_all_uses_with(out, replace_graph_outputs=True)
        out.name = name
        out.dtype = ir.DataType.FLOAT
        out.shape = ir.Shape([int(d) for d in t.shape.numpy()])
        if first is not None:
            g.insert_before(first, node)
        else:
            g.append(node)
    m.opset_imports.setdefault(DOMAIN, 2)
    return m


def decode(model: ir.Model, *, file: str | None = None) -> None:
    """Turn ``ai.mtc::Init`` nodes back into seeded initializers, in their recorded order (in place)."""
    g = model.graph
    nodes = [n for n in g if n.domain == DOMAIN and n.op_type == INIT_OP]
    if not nodes:
        return
    restored: list[tuple[int, ir.Value]] = []
    for n in nodes:
        try:
            spec = json.loads(n.attributes["spec"].as_string())
            recipe, seed, shape, pos = str(spec["recipe"]), int(spec["seed"]), tuple(spec["shape"]), int(spec["position"])
        except (KeyError, ValueError, TypeError) as e:
            raise MtcError(f"a seeded initializer with a bad spec ({type(e).__name__}: {e})", file=file,
                           node=n.name, op=INIT_OP) from None
        if recipe not in RECIPES:
            raise MtcError(f"unknown weight recipe '{recipe}'", file=file, node=n.name, op=INIT_OP)
        out = n.outputs[0]
        name = out.name
        assert name is not None
        v = ir.Value(name=None, const_value=SeededTensor(recipe, seed, shape, name))
        v.dtype = ir.DataType.FLOAT
        v.shape = ir.Shape(list(shape))
        out.name = None
        v.name = name
        out.replace_all_uses_with(v, replace_graph_outputs=True)
        g.remove(n, safe=True)
        restored.append((pos, v))
    # Back in their recorded positions, so the model is the one that was saved.
    others = list(g.initializers.values())
    g.initializers.clear()
    order: list[ir.Value | None] = [None] * (len(others) + len(restored))
    for pos, v in restored:
        if 0 <= pos < len(order) and order[pos] is None:
            order[pos] = v
        else:
            others.append(v)
    it = iter(others)
    for i in range(len(order)):
        if order[i] is None:
            order[i] = next(it, None)
    for v in [o for o in order if o is not None] + list(it):
        g.register_initializer(v)
