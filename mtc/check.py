"""Graph-regression snapshots behind ``mtc check`` (keys documented in docs/check.md).

A snapshot is a small, deterministic, JSON-ready summary of a model: opsets, node counts by op,
interface, parameters and MACs (per part for a supergraph), VCNs and tasks. It holds only ints,
strings, booleans and lists of strings, so comparing two snapshots is exact and a golden file
diffs cleanly in review. Paths, timings and anything else that varies between machines stay out.

Keys are added here as analyses land (channel groups, masks, branch points, slimmable widths);
bump :data:`SCHEMA_VERSION` when an existing key changes meaning, so old goldens fail loudly
instead of being compared against numbers that mean something else.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir

from mtc.errors import MtcError

#: Version of the snapshot layout; a golden with another version is refused (regenerate it).
SCHEMA_VERSION = 2

_Path = tuple[str, ...]


# ---------------------------------------------------------------------------------------- snapshot
def _op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _interface(values: Any) -> dict[str, str]:
    """``name -> "float[N,3,64,64]"``: one string per value, so a change reads as one diff line."""
    from mtc.ir.shapes import dims

    out = {}
    for v in values:
        d = dims(v)
        shape = "?" if d is None else ",".join("?" if x is None else str(x) for x in d)
        dtype = v.dtype.name.lower() if v.dtype is not None else "?"
        out[v.name] = f"{dtype}[{shape}]"
    return out


def snapshot(model: ir.Model) -> dict[str, Any]:
    """Summarise ``model`` for graph-regression checks.

    Args:
        model: a plain model (imported backbone) or a compiled supergraph.

    Returns:
        A JSON-ready dict of ints, strings, booleans and lists of strings (no floats), with the
        same content for the same graph on every run and machine. Common keys: ``schema``,
        ``kind`` (``"model"`` or ``"supergraph"``), ``opset``, ``ops``, ``nodes``,
        ``initializers``, ``inputs``, ``outputs``, ``params.total``, ``macs.total``. A plain model
        adds ``branch_points``; a supergraph adds ``tasks``, ``feature``, ``space``, ``options``,
        ``choices``, per-part ``params``, the ``macs`` per task and at the two sharing extremes, and
        what its space adds (AutoMTL: ``vcns``, ``params.specific``, ``params.skip``).
    """
    from mtc.ir import supergraph as sg
    from mtc.ir.cost import model_cost

    nodes = list(model.graph)
    params, macs, _ = model_cost(model)
    # "" and "ai.onnx" name the same domain; spell it out so the key reads well in a diff.
    opset = {(d or "ai.onnx"): int(v) for d, v in model.opset_imports.items()}
    snap: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "opset": dict(sorted(opset.items())),
        "ops": dict(sorted(Counter(_op_key(n) for n in nodes).items())),
        "nodes": len(nodes),
        "initializers": len(model.graph.initializers),
        "inputs": _interface(model.graph.inputs),
        "outputs": _interface(model.graph.outputs),
        "params": {"total": int(params)},
        "macs": {"total": int(macs)},
    }
    if sg.is_supergraph(model):
        snap["kind"] = "supergraph"
        _add_supergraph(snap, model)
    else:
        from mtc.ir.cuts import branch_points

        snap["kind"] = "model"
        cuts = branch_points(model)
        snap["branch_points"] = {"count": len(cuts), "names": cuts}
    # Channel groups, masks, branch and slim keys are added by their passes' analyses once they
    # exist; no placeholder numbers here, so a golden never pins a value nothing computes.
    return snap


def _add_supergraph(snap: dict[str, Any], model: ir.Model) -> None:
    from mtc.ir import supergraph as sg
    from mtc.spaces import get_space

    sup = sg.summarize_supergraph(model)
    snap["tasks"] = [f"{t['name']}:{t['kind']}:{t['channels']}" for t in sup["tasks"]]
    snap["feature"] = model.metadata_props.get(sg.FEATURE_KEY, "")
    spaces = sup["space"].get("spaces", [sup["space"]] if sup["space"] else [])
    snap["space"] = "+".join(str(s["name"]) for s in spaces)
    # Options are recorded by the passes as JSON scalars; floats would make equality inexact.
    snap["options"] = {k: v for s in spaces for k, v in sorted(s.get("options", {}).items())
                       if isinstance(v, bool | int | str)}
    snap["choices"] = {k: v for k, v in sup["choices"].items() if v}
    p = sup["params"]
    snap["params"].update({"shared": p["shared"], "options": p["options"], "heads": p["heads"],
                           "heads_per_task": dict(p["heads_per_task"])})
    m = sup["macs"]
    snap["macs"].update({
        "all_shared": m["total"]["all_shared"],
        "all_specific": m["total"]["all_specific"],
        "per_task": {t: dict(v) for t, v in m["per_task"].items()},
    })
    # Each space adds what it knows (AutoMTL: VCN counts, skips, units, copies and skips' params).
    for s in spaces:
        extra = get_space(str(s["name"])).snapshot(model)
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(snap.get(k), dict):
                snap[k].update(v)
            else:
                snap[k] = v


# ----------------------------------------------------------------------------------------- compare
def _flatten(d: dict[str, Any], prefix: _Path = ()) -> Iterator[tuple[_Path, Any]]:
    for k, v in d.items():
        path = (*prefix, str(k))
        if isinstance(v, dict) and v:
            yield from _flatten(v, path)
        else:
            yield path, v


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return json.dumps(v, sort_keys=True)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _diff_line(key: str, old: Any, new: Any) -> str:
    if _is_int(old) and _is_int(new):
        return f"{key}: {old} -> {new} ({new - old:+d})"
    if isinstance(old, list) and isinstance(new, list):
        removed = [x for x in old if x not in new]
        added = [x for x in new if x not in old]
        if removed or added:
            parts = []
            if removed:
                parts.append("removed " + ", ".join(_fmt(x) for x in removed))
            if added:
                parts.append("added " + ", ".join(_fmt(x) for x in added))
            return f"{key}: " + "; ".join(parts)
        return f"{key}: order changed: {_fmt(old)} -> {_fmt(new)}"
    return f"{key}: {_fmt(old)} -> {_fmt(new)}"


def compare(golden: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Readable differences between two snapshots, one line each, sorted by key.

    Nested keys are joined with dots (``ops.ai.mtc::Gate``, ``params.shared``).

    Args:
        golden: the expected snapshot (from the golden file).
        current: the snapshot of the model under check.

    Returns:
        Lines such as ``params.shared: 143136 -> 143200 (+64)``, ``ops.Relu: added (3)``,
        ``ops.Sigmoid: removed (was 2)`` or ``tasks: added normal:normal:3``; empty when equal.
    """
    old = dict(_flatten(golden))
    new = dict(_flatten(current))
    lines = []
    # What kind of model it is and the layout version explain every other line: list them first.
    for path in sorted(old.keys() | new.keys(), key=lambda p: (p[0] not in ("schema", "kind"), p)):
        key = ".".join(path)
        if path not in new:
            lines.append(f"{key}: removed (was {_fmt(old[path])})")
        elif path not in old:
            lines.append(f"{key}: added ({_fmt(new[path])})")
        elif old[path] != new[path] or type(old[path]) is not type(new[path]):
            lines.append(_diff_line(key, old[path], new[path]))
    return lines


# ------------------------------------------------------------------------------------ golden files
def dumps_golden(snap: dict[str, Any]) -> str:
    """The canonical text of a golden file: indent 2, sorted keys, trailing newline."""
    return json.dumps(snap, indent=2, sort_keys=True) + "\n"


def write_golden(path: str | os.PathLike[str], snap: dict[str, Any]) -> Path:
    """Write ``snap`` to ``path`` atomically (a crash never leaves a half-written golden)."""
    from mtc.ir.io import atomic_write

    dst = Path(path)
    with atomic_write(dst) as f:
        f.write(dumps_golden(snap))
    return dst


def read_golden(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a golden snapshot.

    Raises:
        MtcError: naming the file when it is missing (hint: ``--update``), not valid JSON, not a
            JSON object, or of another schema version.
    """
    p = Path(path)
    if not p.exists():
        raise MtcError("golden file does not exist; run `mtc check` with --update to create it", file=str(p))
    if p.is_dir():
        raise MtcError("is a directory, expected a golden .json file", file=str(p))
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MtcError(f"golden file is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                       "fix it or regenerate it with --update", file=str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise MtcError(f"cannot read golden file ({type(e).__name__}: {e})", file=str(p)) from None
    if not isinstance(data, dict):
        raise MtcError(f"golden file holds a JSON {type(data).__name__}, expected an object with "
                       f"\"schema\": {SCHEMA_VERSION}", file=str(p))
    schema = data.get("schema")
    if schema != SCHEMA_VERSION or not _is_int(schema):
        raise MtcError(f"golden file has schema {json.dumps(schema)}, this mtc writes schema {SCHEMA_VERSION}; "
                       "regenerate it with --update", file=str(p))
    return data


# ------------------------------------------------------------------------------------ model source
def load_model(
    src: str,
    *,
    tasks: str | None = None,
    feature: str | None = None,
    head_width: int = 256,
    seed: int = 0,
    input_shape: str | None = None,
    opset: int | None = None,
    exporter: str = "dynamo",
    space: str | None = None,
    space_options: dict[str, Any] | None = None,
) -> ir.Model:
    """The model ``mtc check`` summarises.

    Without ``tasks``: a ``.onnx`` supergraph is read as it is, anything else is imported (as
    ``mtc inspect`` does). With ``tasks``: ``src`` is a backbone, imported and compiled with
    :func:`~mtc.spaces.compile_supergraph` in memory, so CI can check
    "backbone + tasks -> supergraph" without storing the supergraph.

    Raises:
        MtcError: a bad task spec or source, compile errors, or ``tasks`` given for a file that is
            already a supergraph.
    """
    from mtc.frontends import import_model, parse_input_shape
    from mtc.ir import io
    from mtc.ir import supergraph as sg
    from mtc.ir.opset import TARGET_OPSET

    task_list = None
    if tasks is not None:
        from mtc.tasks.spec import parse_tasks

        task_list = parse_tasks(tasks)  # a bad spec fails before any import work
    shape = parse_input_shape(input_shape)
    if src.endswith(".onnx") and shape is None:
        m = io.load(src)
        if sg.is_supergraph(m):
            if task_list is not None:
                raise MtcError("is already a compiled supergraph; drop --tasks (and the compile options) "
                               "or pass the backbone", file=src)
            return m
    m = import_model(src, input_shape=shape, opset=opset or TARGET_OPSET, exporter=exporter, seed=seed)
    if task_list is not None:
        from mtc.spaces import DEFAULT_SPACE, compile_supergraph

        m = compile_supergraph(m, tasks=task_list, feature=feature, head_width=head_width, seed=seed,
                               space=space or DEFAULT_SPACE, **(space_options or {})).model
    return m
