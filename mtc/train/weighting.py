"""Task loss weighting (``--weighting``): how the trainer turns the task losses of one update into
the gradients its optimisers step.

Every update of every stage (a search strategy's, a post-train's, a baseline's) goes through one
:class:`Weighting`: :meth:`Weighting.backward` instead of ``loss.backward()``, :meth:`Weighting.step`
after the optimisers stepped. ``λ_i`` (``--task-weights``) multiply each task's loss first.

- ``equal``: ``Σ λ_i L_i`` (what mtc always did; bitwise the same).
- ``uncertainty``: Kendall, Gal and Cipolla, "Multi-task learning using uncertainty to weigh losses
  for scene geometry and semantics" (CVPR 2018), Eq. 7 with learned ``s_i = log σ_i²``:
  ``½ e^{-s_i} L_i + ½ s_i`` for a regression task, ``e^{-s_i} L_i + ½ s_i`` for a classification
  task (a kind with integer labels: ``seg``, ``class``); ``s_i`` start at 0.
- ``dwa``: Liu, Johns and Davison, "End-to-end multi-task learning with attention" (CVPR 2019),
  Eq. 7: ``w_k = K exp(r_k / T) / Σ_i exp(r_i / T)``, ``r_k = L̄_k(e-1) / L̄_k(e-2)``, T = 2, where
  ``L̄_k(e)`` is task k's mean loss over data epoch ``e``; ``w_k = 1`` in the first two epochs. A
  *data epoch* of a step-based training is ``len(data set) // batch size`` consecutive steps of one
  update's stream (its batch stream's own epoch: every sample once), counted per stage and stream.
- ``gradnorm``: Chen et al., "GradNorm: gradient normalization for adaptive loss balancing in deep
  multitask networks" (ICML 2018): learned ``w_i`` (start 1), ``G_i = ‖∇_W w_i L_i‖₂`` on the weights
  ``W`` of the last layer shared by all tasks, ``L_grad = Σ_i |G_i − Ḡ · r_i^α|`` with
  ``r_i = L̃_i / mean(L̃)``, ``L̃_i = L_i(t) / L_i(0)``, the target held constant; the network trains on
  ``Σ w_i L_i`` (``w`` constant there), ``w`` on ``∇_w L_grad``, then ``Σ w_i = T``. α = 1.5.
  The last shared layer is found from the network itself: of the layer weights (parameters of two
  or more dimensions) that every task's loss reaches with a non-zero gradient, the one the graph
  reads last (:func:`last_shared`).
- ``pcgrad``: Yu et al., "Gradient surgery for multi-task learning" (NeurIPS 2020), Algorithm 1:
  per-task gradients ``g_i`` of the parameters the update steps; on the shared ones (reached by two
  or more tasks) each ``g_i`` is projected, for ``j ≠ i`` in a random order, onto the normal plane
  of ``g_j`` whenever ``g_i · g_j < 0``; the update is ``Σ_i g_i^PC`` (task-specific parameters get
  their own gradient). The random order is a pure function of (seed, stage, stream, step, pass).

The learned parameters (``uncertainty``'s ``s_i``, ``gradnorm``'s ``w_i``) have their own Adam
optimiser (learning rate ``--weighting-lr``, default the trainer's first optimiser's) and learn in
every update, the objective of every update being the weighted loss. Their values, optimiser state
and the statistics (``dwa``'s epoch means, ``gradnorm``'s ``L(0)`` and layer) are part of the
checkpoint, so a resumed run continues exactly.

Under several processes, :attr:`Weighting.mean` averages a tensor over them (identity in one
process): the losses and per-task gradients the weightings read are the global batch's.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mtc.errors import MtcError

WEIGHTINGS = ("equal", "uncertainty", "dwa", "gradnorm", "pcgrad")


@dataclass
class UpdateInfo:
    """What a weighting knows of the update it runs in."""

    key: str  # "stage/stream": the statistics' scope (dwa's epochs)
    step: int  # the stage's local step
    epoch: int  # the stream's data epoch at this step
    params: list[torch.nn.Parameter]  # the parameters the update's optimisers step
    module: torch.nn.Module
    seed: int = 0
    pass_index: int = 0  # which of the update's forward passes (Update.passes)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Weighting:
    """``equal``: the fixed weights λ_i; the base of the others (see the module docstring)."""

    tasks: list[str]
    classification: dict[str, bool]
    lam: dict[str, float]
    lr: float = 1e-3
    mean: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity, repr=False)
    #: how a total loss is backpropagated (a float16 run scales it first)
    backprop: Callable[[torch.Tensor], None] = field(default=torch.Tensor.backward, repr=False)

    name = "equal"
    #: whether it backpropagates through :attr:`backprop` alone (and so works with a gradient scaler)
    scalable = True
    #: whether the gradients it leaves are already the global batch's (averaged over the ranks)
    global_grads = False

    def __post_init__(self) -> None:
        self.params: dict[str, torch.nn.Parameter] = self.make_params()
        self.opt = torch.optim.Adam(list(self.params.values()), lr=self.lr) if self.params else None

    def make_params(self) -> dict[str, torch.nn.Parameter]:
        return {}

    def local_params(self) -> list[torch.nn.Parameter]:
        """Its learned parameters whose gradients are the local batch's (to average over ranks)."""
        return list(self.params.values())

    def to(self, device: torch.device | str) -> Weighting:
        with torch.no_grad():
            for p in self.params.values():
                p.data = p.data.to(device)
        return self

    # --- the update -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    def backward(self, losses: dict[str, torch.Tensor], term: torch.Tensor | None,
                 info: UpdateInfo) -> dict[str, Any]:
        """Backpropagate the weighted losses (+ ``term``) into ``.grad``; returns what to log."""
        loss = torch.stack([self.lam[k] * v for k, v in losses.items()]).sum()
        if term is not None:
            loss = loss + term
        self.backprop(loss)
        return {}

    def step(self, stepper: Callable[[torch.optim.Optimizer], Any] | None = None) -> None:
        """After the update's optimisers stepped: the weighting's own step (through ``stepper``, a
        gradient scaler's ``step``, when given)."""
        if self.opt is not None:
            if stepper is not None:
                stepper(self.opt)
            else:
                self.opt.step()

    # --- checkpoints -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {}

    def load_stats(self, data: dict[str, Any]) -> None:
        pass

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"weighting/{k}": p.detach() for k, p in self.params.items()}
        meta: dict[str, Any] = {"name": self.name, "stats": self.stats()}
        if self.opt is not None:
            names = list(self.params)
            sd = self.opt.state_dict()
            slots: dict[str, list[str]] = {}
            for idx, st in sd["state"].items():
                for slot, val in st.items():
                    t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
                    tensors[f"weighting-optim/{names[idx]}/{slot}"] = t
                    slots.setdefault(names[idx], []).append(slot)
            meta["slots"] = slots
            meta["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("name") != self.name:
            raise KeyError(f"weighting '{meta.get('name')}' in the checkpoint, '{self.name}' given")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"weighting/{k}"])
        if self.opt is not None:
            names = list(self.params)
            state = {names.index(n): {s: tensors[f"weighting-optim/{n}/{s}"] for s in slots}
                     for n, slots in meta["slots"].items()}
            groups = [dict(g) | {"params": list(range(len(names)))} for g in meta["param_groups"]]
            self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.load_stats(meta.get("stats", {}))


class Uncertainty(Weighting):
    """Kendall et al.: learned log-variances ``s_i``."""

    name = "uncertainty"

    def make_params(self) -> dict[str, torch.nn.Parameter]:
        return {f"log_var/{t}": torch.nn.Parameter(torch.zeros(())) for t in self.tasks}

    def factor(self, task: str) -> float:
        """The loss's factor in front of ``e^{-s}``: 1 for classification, ½ for regression."""
        return 1.0 if self.classification[task] else 0.5

    def backward(self, losses: dict[str, torch.Tensor], term: torch.Tensor | None,
                 info: UpdateInfo) -> dict[str, Any]:
        parts = []
        for k, v in losses.items():
            s = self.params[f"log_var/{k}"]
            parts.append(self.factor(k) * torch.exp(-s) * (self.lam[k] * v.float()) + 0.5 * s)
        loss = torch.stack(parts).sum()
        if term is not None:
            loss = loss + term
        self.backprop(loss)
        return {"weighting": {k: self.factor(k) * math.exp(-float(self.params[f"log_var/{k}"].detach()))
                              for k in losses},
                "log_var": {k: float(self.params[f"log_var/{k}"].detach()) for k in losses}}


class DWA(Weighting):
    """Liu et al.: weights from the ratio of the last two data epochs' mean losses."""

    name = "dwa"
    temperature: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scopes: dict[str, dict[str, Any]] = {}

    def weights(self, key: str, epoch: int) -> dict[str, float]:
        st = self.scopes.setdefault(key, {"epoch": epoch, "sum": dict.fromkeys(self.tasks, 0.0), "n": 0,
                                          "hist": []})
        if epoch != st["epoch"]:
            if st["n"]:
                st["hist"] = (st["hist"] + [{k: v / st["n"] for k, v in st["sum"].items()}])[-2:]
            st.update(epoch=epoch, sum=dict.fromkeys(self.tasks, 0.0), n=0)
        return dwa_weights(st["hist"], self.tasks, self.temperature)

    def backward(self, losses: dict[str, torch.Tensor], term: torch.Tensor | None,
                 info: UpdateInfo) -> dict[str, Any]:
        w = self.weights(info.key, info.epoch)
        if info.pass_index == 0:
            st = self.scopes[info.key]
            values = self.mean(torch.stack([v.detach().float() for v in losses.values()]))
            for k, v in zip(losses, values.tolist(), strict=True):
                st["sum"][k] += v
            st["n"] += 1
        loss = torch.stack([(self.lam[k] * w[k]) * v for k, v in losses.items()]).sum()
        if term is not None:
            loss = loss + term
        self.backprop(loss)
        return {"weighting": w}

    def stats(self) -> dict[str, Any]:
        return {"scopes": self.scopes}

    def load_stats(self, data: dict[str, Any]) -> None:
        self.scopes = {k: dict(v) for k, v in data.get("scopes", {}).items()}


def dwa_weights(hist: Sequence[dict[str, float]], tasks: Sequence[str], temperature: float) -> dict[str, float]:
    """Liu et al. Eq. 7 from the mean losses of the last two epochs (``hist[-2]``, ``hist[-1]``)."""
    if len(hist) < 2:
        return dict.fromkeys(tasks, 1.0)
    prev, last = hist[-2], hist[-1]
    r = [last[k] / prev[k] if prev[k] > 0 else 1.0 for k in tasks]
    e = [math.exp(x / temperature) for x in r]
    z = sum(e)
    return {k: len(tasks) * v / z for k, v in zip(tasks, e, strict=True)}


def _read_order(module: torch.nn.Module) -> dict[int, int]:
    """id(parameter) -> index of the first step of the interpreter that reads it (graph order)."""
    steps = getattr(module, "_steps", None)
    slots = getattr(module, "_param_slots", None)
    params = dict(module.named_parameters(recurse=False))
    if steps is None or slots is None:
        return {id(p): i for i, p in enumerate(module.parameters())}
    first: dict[int, int] = {}
    for k, (_fn, ins, _out, _free) in enumerate(steps):
        for s in ins:
            first.setdefault(s, k)
    return {id(params[attr]): first.get(slot, -1) for slot, attr in slots if attr in params}


def _nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool((g != 0).any())


def last_shared(module: torch.nn.Module, losses: dict[str, torch.Tensor]) -> str | None:
    """The IR name (or attribute name) of the last layer weights every task's loss reaches.

    Layer weights are the trainable parameters of two or more dimensions (convolutions, matrices);
    a weight is shared when each task's loss has a non-zero gradient on it; of those, the one read
    last in the graph's execution order. None when no task loss reaches any (a batch without
    labels) or no weight is shared.
    """
    names = _param_names(module)
    cands = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2 and id(p) in names]
    live = [v for v in losses.values() if v.requires_grad]
    if not cands or len(live) < len(losses):
        return None
    reach = [True] * len(cands)
    for v in live:
        grads = torch.autograd.grad(v, cands, retain_graph=True, allow_unused=True)
        reach = [r and _nonzero(g) for r, g in zip(reach, grads, strict=True)]
    order = _read_order(module)
    shared = [p for p, r in zip(cands, reach, strict=True) if r]
    if not shared:
        return None
    best = max(shared, key=lambda p: (order.get(id(p), -1), names[id(p)]))
    return names[id(best)]


def _param_names(module: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> its IR name (a GraphModule's) or its attribute name."""
    named = getattr(module, "named_initializers", None)
    if callable(named):
        return {id(p): k for k, p in named().items() if isinstance(p, torch.nn.Parameter)}
    return {id(p): k for k, p in module.named_parameters()}


def _param_by_name(module: torch.nn.Module, name: str) -> torch.nn.Parameter:
    for p in module.parameters():
        if _param_names(module).get(id(p)) == name:
            return p
    raise KeyError(f"the network has no parameter '{name}' (the checkpoint's GradNorm layer)")


class GradNorm(Weighting):
    """Chen et al.: learned task weights whose gradient norms on the last shared layer are balanced."""

    name = "gradnorm"
    scalable = False
    alpha: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layer: str | None = None
        self.initial: dict[str, float] | None = None

    def make_params(self) -> dict[str, torch.nn.Parameter]:
        return {f"w/{t}": torch.nn.Parameter(torch.ones(())) for t in self.tasks}

    def backward(self, losses: dict[str, torch.Tensor], term: torch.Tensor | None,
                 info: UpdateInfo) -> dict[str, Any]:
        keys = list(losses)
        scaled = {k: self.lam[k] * v for k, v in losses.items()}
        w = torch.stack([self.params[f"w/{k}"] for k in keys])
        record: dict[str, Any] = {}
        if len(keys) > 1:
            if self.layer is None:
                self.layer = last_shared(info.module, scaled)
                if self.layer is None and all(v.requires_grad for v in scaled.values()):
                    raise MtcError("--weighting gradnorm needs a layer that every task's loss reaches; this "
                                   "network has none (use another --weighting)")
            values = self.mean(torch.stack([v.detach().float() for v in scaled.values()]))
            if self.initial is None:
                self.initial = dict(zip(keys, values.tolist(), strict=True))
            if self.layer is not None:
                layer = _param_by_name(info.module, self.layer)
                norms = []
                for k in keys:
                    (g,) = torch.autograd.grad(scaled[k], [layer], retain_graph=True, allow_unused=True)
                    norms.append(torch.zeros(()) if g is None else self.mean(g.float()).norm().cpu())
                n = torch.stack(norms).to(w.device)
                g_w = w * n
                ratio = torch.tensor([values[i].item() / self.initial[k] if self.initial[k] > 0 else 1.0
                                      for i, k in enumerate(keys)], device=w.device)
                target = (g_w.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
                l_grad = (g_w - target).abs().sum()
                grads = torch.autograd.grad(l_grad, [self.params[f"w/{k}"] for k in keys])
                for k, g in zip(keys, grads, strict=True):
                    p = self.params[f"w/{k}"]
                    p.grad = g if p.grad is None else p.grad + g
                record = {"gradnorm_layer": self.layer, "l_grad": float(l_grad.detach())}
        wd = w.detach()
        loss = torch.stack([wd[i].to(v.dtype) * v for i, v in enumerate(scaled.values())]).sum()
        if term is not None:
            loss = loss + term
        self.backprop(loss)
        return {"weighting": dict(zip(keys, wd.tolist(), strict=True)), **record}

    def local_params(self) -> list[torch.nn.Parameter]:
        return []  # their gradients come from the averaged norms and losses

    def step(self, stepper: Callable[[torch.optim.Optimizer], Any] | None = None) -> None:
        super().step(stepper)
        with torch.no_grad():  # renormalise: Σ w_i = T
            w = torch.stack(list(self.params.values()))
            scale = len(self.params) / w.sum()
            for p in self.params.values():
                p.mul_(scale)

    def stats(self) -> dict[str, Any]:
        return {"layer": self.layer, "initial": self.initial}

    def load_stats(self, data: dict[str, Any]) -> None:
        self.layer = data.get("layer")
        self.initial = data.get("initial")


def pcgrad(grads: Sequence[torch.Tensor], order: Callable[[int], Sequence[int]]) -> torch.Tensor:
    """Yu et al. Algorithm 1 on flat per-task gradients: ``Σ_i g_i^PC``.

    Args:
        grads: one flat gradient per task.
        order: ``order(i)`` the tasks ``j`` (``≠ i``) in the random order task ``i`` is projected on.
    """
    out = torch.zeros_like(grads[0])
    for i, gi in enumerate(grads):
        pc = gi.clone()
        for j in order(i):
            gj = grads[j]
            dot = torch.dot(pc, gj)
            if dot < 0:
                pc = pc - dot / torch.dot(gj, gj) * gj
        out = out + pc
    return out


class PCGrad(Weighting):
    """Yu et al.: project conflicting task gradients on the shared parameters."""

    name = "pcgrad"
    scalable = False
    global_grads = True

    def backward(self, losses: dict[str, torch.Tensor], term: torch.Tensor | None,
                 info: UpdateInfo) -> dict[str, Any]:
        keys = list(losses)
        params = [p for p in info.params if p.requires_grad]
        per_task: list[list[torch.Tensor]] = []
        reached = [False] * len(params)  # a parameter no loss reaches keeps no gradient (as with backward())
        for k in keys:
            v = self.lam[k] * losses[k]
            grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) if v.requires_grad \
                else [None] * len(params)
            reached = [r or g is not None for r, g in zip(reached, grads, strict=True)]
            per_task.append([self.mean(g) if g is not None else torch.zeros_like(p)
                             for g, p in zip(grads, params, strict=True)])
        shared = [sum(_nonzero(per_task[t][i]) for t in range(len(keys))) >= 2 for i in range(len(params))]
        rng = np.random.default_rng([info.seed, zlib.crc32(info.key.encode()), info.step, info.pass_index])
        perms = [[int(j) for j in rng.permutation(len(keys)) if j != i] for i in range(len(keys))]
        merged: list[torch.Tensor] = [torch.stack([per_task[t][i] for t in range(len(keys))]).sum(0)
                                      for i in range(len(params))]
        idx = [i for i, s in enumerate(shared) if s]
        conflicts = 0
        if idx:
            flat = [torch.cat([per_task[t][i].reshape(-1).float() for i in idx]) for t in range(len(keys))]
            conflicts = sum(int(torch.dot(flat[a], flat[b]) < 0) for a in range(len(flat))
                            for b in range(a + 1, len(flat)))
            out = pcgrad(flat, lambda i: perms[i])
            off = 0
            for i in idx:
                n = params[i].numel()
                merged[i] = out[off:off + n].view_as(params[i]).to(params[i].dtype)
                off += n
        if term is not None and term.requires_grad:  # extra terms (regularisers) are not projected
            extra = torch.autograd.grad(term, params, allow_unused=True)
            merged = [m if e is None else m + self.mean(e) for m, e in zip(merged, extra, strict=True)]
            reached = [r or e is not None for r, e in zip(reached, extra, strict=True)]
        for p, g, r in zip(params, merged, reached, strict=True):
            if r:
                p.grad = g.clone() if p.grad is None else p.grad + g
        return {"pcgrad_conflicts": conflicts}


_KINDS: dict[str, type[Weighting]] = {c.name: c for c in (Weighting, Uncertainty, DWA, GradNorm, PCGrad)}


def make_weighting(name: str, tasks: Sequence[Any], lam: dict[str, float], *, lr: float = 1e-3,
                   gradnorm_alpha: float = 1.5, dwa_temperature: float = 2.0) -> Weighting:
    """The weighting called ``name`` for ``tasks`` (:class:`~mtc.tasks.spec.TaskSpec`)."""
    from mtc.tasks.kinds import get_kind

    cls = _KINDS.get(name)
    if cls is None:
        raise MtcError(f"unknown --weighting '{name}' (expected one of {', '.join(WEIGHTINGS)})")
    classification = {t.name: bool(get_kind(t.kind).integer_targets) for t in tasks}
    w = cls([t.name for t in tasks], classification, dict(lam), lr=lr)
    if isinstance(w, GradNorm):
        if not gradnorm_alpha >= 0:
            raise MtcError(f"--gradnorm-alpha must be >= 0, got {gradnorm_alpha}")
        w.alpha = gradnorm_alpha
    if isinstance(w, DWA):
        if not dwa_temperature > 0:
            raise MtcError(f"--dwa-temperature must be > 0, got {dwa_temperature}")
        w.temperature = dwa_temperature
    return w
