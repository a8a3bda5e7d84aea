"""Single-task models of an ``mtc baseline`` run, as the branched space uses them.

``mtc baseline`` writes ``baselines.json`` (tasks and kinds) and one run directory per task,
``single-<task>/``, whose ``checkpoints/train.safetensors`` holds the model's tensors keyed
``module/<IR name>``: the backbone's initializer names, which are the names of ``copy0`` of every
block in a branched supergraph, and the task's head (``head@<task>/...``). The RSA strategy reads
the encoders (``--baselines``); ``mtc train --init-from-baselines`` starts each group's copy of a
block from one of its tasks' models. Files are read as safetensors only (never unpickled).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.names import TASK_KEY, head_prefix
from mtc.ir.plan import Plan
from mtc.spaces.baselines import baseline_tasks, single_task_weights
from mtc.spaces.branched.blocks import Blocks, branched_choices, plan_levels
from mtc.spaces.branched.trees import members

if TYPE_CHECKING:
    import torch



def copy_name(name: str, k: int) -> str:
    """The IR name of copy ``k`` of initializer ``name`` (``copy0`` is the original)."""
    return name if k == 0 else f"{name}@copy{k}"


def block_tensors(model: ir.Model) -> list[list[str]]:
    """Per block, the initializers its original nodes (``copy0``) read: weights and statistics."""
    nodes = {n.name: n for n in model.graph}
    out = []
    for c in branched_choices(model):
        names: list[str] = []
        for nn in c.options[0].nodes:
            assert isinstance(nn, str)
            for v in nodes[nn].inputs:
                if v is not None and v.is_initializer() and v.const_value is not None and v.name not in names:
                    if v.const_value.dtype.is_floating_point() and len(v.const_value.shape) > 0:
                        names.append(str(v.name))
        out.append(names)
    return out


def head_tensors(model: ir.Model, task: str) -> list[str]:
    prefix = head_prefix(task) + "/"
    out: list[str] = []
    for n in model.graph:
        if n.metadata_props.get(TASK_KEY) != task or not (n.name or "").startswith(prefix):
            continue
        for v in n.inputs:
            if v is not None and v.is_initializer() and v.const_value is not None and v.name not in out:
                if v.const_value.dtype.is_floating_point() and len(v.const_value.shape) > 0:
                    out.append(str(v.name))
    return out


def _shape(model: ir.Model, name: str) -> tuple[int, ...]:
    t = model.graph.initializers[name].const_value
    assert t is not None
    return tuple(int(d) for d in t.shape.numpy())


def load_single_task(model: ir.Model, directory: str | Path, *, heads: bool = False,
                     flag: str = "--baselines") -> dict[str, dict[str, torch.Tensor]]:
    """Each task's single-task weights (by IR name) from an ``mtc baseline`` run directory.

    Args:
        model: the branched supergraph (its tasks and encoder are what the baselines must match).
        directory: the baseline run directory.
        heads: also require and return every task's head.
        flag: the option named in errors.

    Raises:
        MtcError: not a baseline run, another task set, or another backbone (naming the tensor).
    """
    d = Path(directory)
    mine = baseline_tasks(model, d, flag=flag)
    encoder = [n for names_ in block_tensors(model) for n in names_]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for t in mine:
        path, tensors = single_task_weights(d, t, flag=flag)
        want = encoder + (head_tensors(model, t) if heads else [])
        for name in want:
            if name not in tensors:
                what = "another backbone" if name in encoder else "another head"
                raise MtcError(f"{flag}: the single-task model of '{t}' has no tensor '{name}' (trained on {what}?)",
                               file=str(path))
            if tuple(tensors[name].shape) != _shape(model, name):
                what = "another backbone" if name in encoder else "another head width"
                raise MtcError(f"{flag}: the single-task model of '{t}' has '{name}' of shape "
                               f"{tuple(tensors[name].shape)}, the supergraph {_shape(model, name)} (trained on "
                               f"{what}?)", file=str(path))
        out[t] = {n: tensors[n] for n in want}
    return out


def per_copy_encoders(model: ir.Model, single: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The search form's block weights when copy ``i`` of every block is task ``i``'s encoder."""
    tasks = sg.task_names(model)
    out: dict[str, torch.Tensor] = {}
    for names in block_tensors(model):
        for i, t in enumerate(tasks):
            for n in names:
                out[copy_name(n, i)] = single[t][n]
    return out


def init_from_single(model: ir.Model, plan: Plan, blocks: Blocks,
                     single: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A tree's initial weights: each group's copy of a block from its first task's single-task
    model, and every head from its task's model."""
    out: dict[str, torch.Tensor] = {}
    per_block = block_tensors(model)
    for choice, p, names in zip(blocks.choices, plan_levels(plan, blocks), per_block, strict=True):
        for b in p:
            first = blocks.tasks[members(b)[0]]
            copy = int(plan.ops[choice][first].removeprefix("copy"))
            for n in names:
                out[copy_name(n, copy)] = single[first][n]
    for t in blocks.tasks:
        for n in head_tensors(model, t):
            out[n] = single[t][n]
    return out
