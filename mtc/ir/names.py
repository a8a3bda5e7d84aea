"""Stable, readable names: no node or value is anonymous and none is duplicated."""

from __future__ import annotations

import contextlib
import gc
import re
from collections import Counter
from collections.abc import Iterator

import onnx_ir as ir

from mtc.errors import MtcError

ORIGIN_KEY = "mtc.origin"
#: ``metadata_props`` key naming the task a node belongs to (heads and task-owned options).
TASK_KEY = "mtc.task"
#: Set by a front end on nodes whose names are machine-made and should follow their origin.
RENAME_KEY = "mtc.rename"

_SAFE = re.compile(r"[^A-Za-z0-9_.@/:\-]+")


def unique(base: str, taken: set[str]) -> str:
    """``base``, or ``base_<k>`` with the smallest k not in ``taken`` (which is not updated)."""
    if base not in taken:
        return base
    k = 1
    while f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"


def fix_names(model: ir.Model) -> bool:
    """Name every anonymous node ``<op>_<k>`` and every anonymous value after its producer.

    Duplicated names get a numeric suffix; existing unique names are kept, so names stay stable
    across runs and graph-regression snapshots can rely on them. Returns whether anything changed.
    """
    g = model.graph
    changed = False
    # Names given by the source are reserved up front, so a generated name never displaces one.
    taken_nodes: set[str] = {n.name for n in g if n.name}
    seen: set[str] = set()
    counters: Counter[str] = Counter()
    for node in g:
        name = node.name or ""
        if name and name not in seen:
            seen.add(name)
            continue
        if name:  # a later duplicate
            node.name = unique(name, taken_nodes)
        else:
            op = node.op_type.lower()
            while f"{op}_{counters[op]}" in taken_nodes:
                counters[op] += 1
            node.name = f"{op}_{counters[op]}"
            counters[op] += 1
        taken_nodes.add(node.name)
        seen.add(node.name)
        changed = True

    taken_values: set[str] = set()
    for v in list(g.inputs) + list(g.initializers.values()):
        if v.name:
            taken_values.add(v.name)
    for node in g:
        for i, out in enumerate(node.outputs):
            if not out.name or out.name in taken_values:
                suffix = "" if len(node.outputs) == 1 else f"_{i}"
                out.name = unique(f"{node.name}{suffix}:out" if out.name else f"{node.name}{suffix}", taken_values)
                changed = True
            taken_values.add(out.name)
    return changed


def head_prefix(task: str) -> str:
    """``head@{task}``: the prefix of a task head's node and initializer names, and its origin."""
    return f"head@{task}"


def origin(node: ir.Node) -> str | None:
    """The front-end layer a node came from, if recorded."""
    return node.metadata_props.get(ORIGIN_KEY)


def name_after_origin(model: ir.Model) -> bool:
    """Rename nodes marked with ``mtc.rename`` after their origin (e.g. the PyTorch module path).

    A module that produced one node lends it its path (``layers.0.conv1.0``); several nodes of one
    module get the op as suffix (``layers.0/relu``, ``layers.0/relu_1``).
    """
    nodes = [n for n in model.graph if n.metadata_props.get(RENAME_KEY)]
    if not nodes:
        return False
    per_origin = Counter(n.metadata_props.get(ORIGIN_KEY) for n in model.graph)
    taken: set[str] = {n.name for n in model.graph if n.name is not None and not n.metadata_props.get(RENAME_KEY)}
    for n in nodes:
        o = n.metadata_props[ORIGIN_KEY]
        base = o if per_origin[o] == 1 else f"{o}/{n.op_type.lower()}"
        n.name = unique(base, taken)
        taken.add(n.name)
        del n.metadata_props[RENAME_KEY]
    # Activations follow their producer, so branch points and features read like the model.
    g = model.graph
    values = {v.name for v in g.inputs} | set(g.initializers) | {o.name for n in g for o in n.outputs}
    for n in nodes:
        if len(n.outputs) == 1 and not n.outputs[0].is_graph_output() and n.name not in values:
            values.discard(n.outputs[0].name)
            n.outputs[0].name = n.name
            values.add(n.name)
    return True


def node_error(message: str, node: ir.Node | None = None, *, pass_name: str | None = None,
               file: str | None = None) -> MtcError:
    """An :class:`MtcError` naming ``node`` (name, op type, origin) and the pass that found it."""
    return MtcError(
        message,
        file=file,
        pass_name=pass_name,
        node=node.name if node is not None else None,
        op=node.op_type if node is not None else None,
        origin=origin(node) if node is not None else None,
    )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building large object graphs.

    Cloning and lowering a supergraph allocate tens of thousands of small IR objects; each
    collection the allocations trigger walks every live IR object again (a quarter of the lowering's
    time on mobilenetv2). The objects are collected normally once the block ends.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
