"""Run directories: config, supergraph, checkpoints (atomic), JSON-lines metrics."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from mtc.errors import MtcError
from mtc.ir.io import atomic_write

CONFIG = "config.json"
SUPERGRAPH = "super.mtc.onnx"
METRICS = "metrics.jsonl"


def file_digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` a checkpoint file onto the CPU (whatever it holds).

    Raises:
        MtcError: the file is missing or cannot be unpickled (corrupt, truncated, not torch).
    """
    p = Path(path)
    if not p.is_file():
        raise MtcError("no such checkpoint file", file=str(p))
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MtcError(f"corrupt checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                       file=str(p)) from None


class RunDir:
    """Everything a run writes lives in one directory, so any command can continue from it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # --- config -------------------------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.file(name)) as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        return self.file(name)

    def read_json(self, name: str) -> Any:
        p = self.file(name)
        if not p.exists():
            raise MtcError(f"{name} not found: is this an mtc run directory?", file=str(self.path))
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise MtcError(f"corrupt {name}: {e}", file=str(p)) from None

    def config(self) -> dict[str, Any]:
        return dict(self.read_json(CONFIG))

    # --- metrics ------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.file(METRICS), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_log(self, stage: str, step: int) -> None:
        """Drop log lines written after a checkpoint, so a resumed run's log has no duplicates."""
        p = self.file(METRICS)
        if not p.exists():
            return
        order = {"pretrain": 0, "policy": 1, "train": 2}
        keep = []
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if r.get("stage") not in order or (order[r["stage"]], r.get("step", 0)) <= (order[stage], step):
                keep.append(line)
        with atomic_write(p) as f:
            f.write("".join(k + "\n" for k in keep))

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> Path:
        """Write ``checkpoints/NAME.pt`` atomically: a crash mid-write keeps the previous one."""
        dst = self.checkpoint_path(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dst.parent)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return dst

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).exists()

    def load_checkpoint(self, name: str) -> dict[str, Any]:
        p = self.checkpoint_path(name)
        if not p.exists():
            raise MtcError(f"no checkpoint '{name}' in the run directory", file=str(self.path))
        state = read_checkpoint(p)
        if not isinstance(state, dict) or "module" not in state:
            raise MtcError("corrupt checkpoint (not an mtc checkpoint)", file=str(p))
        return state
