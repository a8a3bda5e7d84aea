"""Reading an ``mtc baseline`` run from a space (teachers, initial weights): the run's task set is
checked against the supergraph's, and checkpoints are read as safetensors only (never unpickled).

Spaces sit below ``mtc.train`` in the layer order, so this reads the files the trainer writes
(``baselines.json``, ``single-<task>/checkpoints/train.safetensors``, ``multi/...``) directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir
import torch

from mtc.errors import MtcError
from mtc.ir import supergraph as sg

CHECKPOINT = Path("checkpoints") / "train.safetensors"


def baseline_tasks(model: ir.Model, directory: str | Path, *, flag: str = "--baselines") -> list[str]:
    """The supergraph's task names, after checking that ``directory`` is a baseline run of the same
    task set (names and kinds).

    Raises:
        MtcError: not a baseline run, a corrupt ``baselines.json``, or another task set.
    """
    d = Path(directory)
    meta = d / "baselines.json"
    if not meta.is_file():
        raise MtcError(f"{flag}: no baselines.json: not an mtc baseline run directory", file=str(d))
    try:
        info = json.loads(meta.read_text())
        theirs, kinds = list(info["tasks"]), dict(info.get("kinds", {}))
    except (ValueError, KeyError, TypeError) as e:
        raise MtcError(f"{flag}: corrupt baselines.json ({type(e).__name__}: {e})", file=str(meta)) from None
    records = sg.task_records(model) or []
    mine = [r["name"] for r in records]
    if sorted(theirs) != sorted(mine):
        raise MtcError(f"{flag}: the baselines are for tasks {', '.join(theirs)}, the supergraph has "
                       f"{', '.join(mine)} (another task set)", file=str(d))
    for r in records:
        if r["name"] in kinds and kinds[r["name"]] != r["kind"]:
            raise MtcError(f"{flag}: task '{r['name']}' is a {kinds[r['name']]} task in the baselines, a "
                           f"{r['kind']} task in the supergraph (another task set)", file=str(d))
    return mine


def module_weights(path: Path, *, flag: str = "--baselines") -> dict[str, torch.Tensor]:
    """A trainer checkpoint's module tensors by IR name (``module/`` prefix removed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MtcError(f"{flag}: not a safetensors checkpoint ({str(e).splitlines()[0] if str(e) else e})",
                       file=str(path)) from None
    return {k[len("module/"):]: v for k, v in raw.items() if k.startswith("module/")} or raw


def single_task_weights(directory: str | Path, task: str, *, flag: str = "--baselines") -> tuple[
        Path, dict[str, torch.Tensor]]:
    """The single-task model of ``task`` in a baseline run: its checkpoint path and tensors."""
    d = Path(directory)
    path = d / f"single-{task}" / CHECKPOINT
    if not path.is_file():
        raise MtcError(f"{flag}: the single-task model of '{task}' is missing ({path} not found)", file=str(d))
    return path, module_weights(path, flag=flag)
