"""The allocation space's search form: ``ai.mtc.allocation::Allocate`` masks driven by
:class:`AllocationControls`.

In the search form each of the space's ``ai.mtc::Mask`` nodes becomes ``Allocate(x)``, whose kernel
owns the site's allocation logits ``<site>.alloc`` (``[T, K, 2]``: per task and component the
logits of "used" and "not used", initialised to ``log p_init`` and ``log (1 - p_init)``) and
multiplies each task's stream by its allocation expanded to the channels of the components. In
training, the allocation is a hard Gumbel sample whose gradient is that of the softmax relaxation at
the current temperature (straight-through); in eval mode it is the maximum-likelihood allocation
(p > 0.5). A task whose sample uses no component of a site gets zeros there (the paper).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.lower.controls import Controls
from mtc.lower.module import GraphModule
from mtc.lower.registry import BuildNode, Kernel, register_op
from mtc.lower.supergraph import lower_search
from mtc.passes.canonicalize import remove_dead

DOMAIN = "ai.mtc.allocation"
SPACE = "allocation"
LOGITS = ".alloc"


class AllocationControls(Controls):
    """Samples and maximum-likelihood allocations of every site (see the module docstring).

    Args:
        choices: the space's mask choice points.
        tasks: task names in stream order.
        p_init: the initial allocation probability.
    """

    def __init__(self, choices: Sequence[sg.ChoicePoint], tasks: Sequence[str], p_init: float = 0.5) -> None:
        self.tasks = list(tasks)
        self.p_init = float(p_init)
        self.tau = 1.0
        self.sample = True  # training draws hard samples; False: the maximum-likelihood allocation
        self.components = {c.name: [list(range(a, b)) for a, b in c.info["components"]] for c in choices}
        self.channels = {c.name: c.channels for c in choices}
        self.index: dict[str, torch.Tensor] = {}
        for name, comps in self.components.items():
            idx = torch.full((self.channels[name],), len(comps), dtype=torch.long)  # len(comps): none
            for k, chans in enumerate(comps):
                idx[chans] = k
            self.index[name] = idx
        self.logits: dict[str, torch.Tensor] = {}
        #: the last allocation each site used, [T, K] (detached)
        self.last: dict[str, torch.Tensor] = {}

    def bind(self, module: Any) -> None:
        super().bind(module)
        inits = module.named_initializers()
        self.logits = {name: inits[name + LOGITS] for name in self.components if name + LOGITS in inits}

    def initial_logits(self, choice: str) -> torch.Tensor:
        k = len(self.components[choice])
        p = torch.tensor([math.log(self.p_init), math.log1p(-self.p_init)])
        return p.expand(len(self.tasks), k, 2).clone()

    def probabilities(self) -> dict[str, torch.Tensor]:
        """Per site, ``[T, K]`` probabilities that a task uses a component."""
        return {k: F.softmax(v.detach().float(), -1)[..., 0] for k, v in self.logits.items()}

    def expected_fraction(self) -> torch.Tensor:
        """e_c: the mean allocation probability over every task, component and site (differentiable)."""
        ps = [F.softmax(v, -1)[..., 0].reshape(-1) for v in self.logits.values()]
        return torch.cat(ps).mean()

    def allocation(self, choice: str, logits: torch.Tensor, training: bool) -> torch.Tensor:
        if training and self.sample:
            a = F.gumbel_softmax(logits, tau=self.tau, hard=True, dim=-1)[..., 0]
        else:
            a = (logits[..., 0] > logits[..., 1]).to(logits.dtype)
        self.last[choice] = a.detach()
        return a

    def state(self) -> dict[str, Any]:
        return {"tau": self.tau, "sample": self.sample}

    def load_state(self, state: dict[str, Any]) -> None:
        self.tau = float(state.get("tau", self.tau))
        self.sample = bool(state.get("sample", self.sample))


def _controls(node: BuildNode) -> AllocationControls:
    c = getattr(node.module, "controls", None)
    if not isinstance(c, AllocationControls):
        raise node.error("allocation masks need the space's controls (mtc.spaces.allocation.lowering."
                         "AllocationControls)")
    return c


@register_op("Allocate", domain=DOMAIN, foldable=False, shape_probe=False)
def _allocate(node: BuildNode) -> Kernel:
    choice, T = str(node.attr("choice")), int(node.attr("tasks"))
    controls = _controls(node)
    node.add_parameter("alloc", controls.initial_logits(choice), ir_name=choice + LOGITS)
    index = controls.index[choice]
    module = node.module

    def allocate(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        a = controls.allocation(choice, logits, module.training)  # [T, K]
        a = torch.cat([a, a.new_zeros(T, 1)], 1)  # a last column for channels of no component
        m = a[:, index.to(a.device)]  # [T, C]
        xs = x.view(T, -1, *x.shape[1:])
        shape = [T, 1, m.shape[1]] + [1] * (x.dim() - 2)
        return (xs * m.to(x.dtype).view(shape)).reshape(x.shape)

    return allocate


def allocation_form(model: ir.Model) -> ir.Model:
    """A clone of ``model`` whose allocation masks are ``Allocate`` nodes (module docstring)."""
    m = model.clone()
    g = m.graph
    T = len(sg.task_names(m))
    nodes = {n.name: n for n in g}
    for c in sg.choices_of(m, "mask"):
        if c.info.get("space") != SPACE:
            continue
        mask = nodes[c.node]
        x = mask.inputs[0]
        assert x is not None
        out = mask.outputs[0]
        n = ir.node("Allocate", [x], domain=DOMAIN, name=c.node,
                    attributes={"choice": ir.AttrString("choice", c.name), "tasks": ir.AttrInt64("tasks", T)})
        g.insert_before(mask, n)
        mask.name = f"{c.node}.old"
        new = n.outputs[0]
        if out.dtype is not None:
            new.dtype = out.dtype
        new.shape = out.shape
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        out.name = f"{c.output}.old"
        new.name = c.output
        g.remove(mask, safe=True)
    remove_dead(m)
    m.opset_imports[DOMAIN] = 1
    return m


def search_network(model: ir.Model, *, p_init: float = 0.5, device: str | torch.device | None = None) -> GraphModule:
    """The search form lowered with :class:`AllocationControls`."""
    choices = [c for c in sg.choices_of(model, "mask") if c.info.get("space") == SPACE]
    if not choices:
        raise MtcError("the supergraph has no allocation sites (compile it with --space allocation)")
    controls = AllocationControls(choices, sg.task_names(model), p_init)
    return lower_search(allocation_form(model), controls, device=device)


def controls_of(module: GraphModule) -> AllocationControls:
    c = module.controls
    if not isinstance(c, AllocationControls):
        raise MtcError("the module was not lowered in the allocation space's search form")
    return c


def ml_allocation(controls: AllocationControls) -> dict[str, list[list[int]]]:
    """The maximum-likelihood allocation: site -> ``[T][K]`` 0/1 (p > 0.5)."""
    return {k: (p > 0.5).int().tolist() for k, p in controls.probabilities().items()}


def task_embeddings(allocation: dict[str, list[list[int]]], sites: Sequence[str]) -> np.ndarray:
    """Each task's concatenated binary allocation over ``sites`` (the paper's Section III-E): ``[T, ΣK]``."""
    return np.concatenate([np.asarray(allocation[s], dtype=np.float64) for s in sites], axis=1)


def cosine_similarity(emb: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of embeddings (0 where an embedding is all zero)."""
    norms = np.linalg.norm(emb, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    sim = (emb @ emb.T) / np.outer(safe, safe)
    sim[norms == 0, :] = 0.0
    sim[:, norms == 0] = 0.0
    return sim
