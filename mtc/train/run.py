"""Run directories: config, supergraph, plan, checkpoints (atomic, safetensors), JSON-lines metrics.

A checkpoint is one ``checkpoints/NAME.safetensors`` file: tensors keyed ``module/<IR name>`` (the
module's weights and statistics), ``optim/<optimizer>/<IR name>/<slot>`` (optimiser state), and
everything else as JSON in the file's metadata (``mtc``: step, optimiser hyper-parameters, schedulers,
the strategy's controls). Reading one never unpickles: a file that is not safetensors is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtc.errors import MtcError
from mtc.ir.io import atomic_write, temp_file

CONFIG = "config.json"
SUPERGRAPH = "super.mtc.onnx"
METRICS = "metrics.jsonl"
PLAN = "plan.json"
CHECKPOINT_SUFFIX = ".safetensors"
#: The metadata key of a checkpoint's JSON part, and the format it declares.
META_KEY = "mtc"
CHECKPOINT_FORMAT = "mtc.checkpoint/1"


def file_digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors and JSON metadata to a safetensors file atomically (a crash keeps the old file)."""
    from safetensors.torch import save_file

    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(dst.parent, dst.name)
    os.close(fd)
    try:
        # Own storage per tensor: safetensors refuses tensors that share memory (views, ties).
        flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        save_file(flat, tmp, metadata={META_KEY: json.dumps({"format": CHECKPOINT_FORMAT, **meta})})
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dst


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON metadata of a safetensors file, on the CPU.

    Raises:
        MtcError: the file is missing, is not a safetensors file (a pickle, say: it is never
            unpickled), is truncated, or its metadata is not mtc's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise MtcError("no such checkpoint file", file=str(p))
    try:
        with open(p, "rb") as f:
            head = f.read(8)
        if len(head) < 8 or int.from_bytes(head, "little") > p.stat().st_size:
            raise ValueError("not a safetensors file")
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MtcError(f"corrupt checkpoint, or not an mtc checkpoint or weights file (safetensors expected; "
                       f"{first})", file=str(p)) from None
    meta: dict[str, Any] = {}
    if meta_raw is not None:
        try:
            meta = json.loads(meta_raw)
        except json.JSONDecodeError:
            raise MtcError("corrupt checkpoint: its metadata is not JSON", file=str(p)) from None
        if not isinstance(meta, dict):
            raise MtcError("corrupt checkpoint: its metadata is not a JSON object", file=str(p))
    return tensors, meta


def module_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's tensors (by IR name) of a checkpoint, or all tensors of a plain weights file."""
    prefix = "module/"
    if any(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return dict(tensors)


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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MtcError(f"corrupt {name}: {e}", file=str(p)) from None

    def config(self) -> dict[str, Any]:
        cfg = self.read_json(CONFIG)
        if not isinstance(cfg, dict):
            raise MtcError(f"corrupt {CONFIG}: not a JSON object", file=str(self.file(CONFIG)))
        return dict(cfg)

    # --- metrics ------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.file(METRICS), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """The metrics log, without lines a kill cut short."""
        p = self.file(METRICS)
        if not p.exists():
            return []
        out = []
        for line in p.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict):
                out.append(r)
        return out

    def truncate_log(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keep only the log records ``keep`` accepts (a resumed run drops what it will redo)."""
        p = self.file(METRICS)
        if not p.exists():
            return
        lines = []
        for line in p.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if not isinstance(r, dict) or keep(r):
                lines.append(line)
        with atomic_write(p) as f:
            f.write("".join(k + "\n" for k in lines))

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}{CHECKPOINT_SUFFIX}"

    def save_checkpoint(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        """Write ``checkpoints/NAME.safetensors`` atomically: a crash mid-write keeps the previous one."""
        return write_tensors(self.checkpoint_path(name), tensors, meta)

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).exists()

    def load_checkpoint(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        p = self.checkpoint_path(name)
        if not p.exists():
            raise MtcError(f"no checkpoint '{name}' in the run directory", file=str(self.path))
        tensors, meta = read_tensors(p)
        if meta.get("format") != CHECKPOINT_FORMAT or "step" not in meta:
            raise MtcError("corrupt checkpoint (not an mtc checkpoint)", file=str(p))
        return tensors, meta


# --- one process per run directory ----------------------------------------------------------------
LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class RunLock:
    """``.lock`` in a run directory while a command writes into it: a second process is refused with
    a line naming the holder; a lock whose process is gone (a kill) is taken over."""

    def __init__(self, path: Path, what: str) -> None:
        self.file = path / LOCK
        self.what = what
        self.held = False

    def _refuse_live_holder(self, host: str) -> None:
        """Raise if the lock file names a live process (or one on another host); return if stale."""
        try:
            pid_s, _, rest = self.file.read_text().partition(" ")
            holder_host, _, cmd = rest.partition(" ")
            pid = int(pid_s)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            pid, holder_host, cmd = -1, host, "?"
        if holder_host == host and pid > 0 and _alive(pid):
            raise MtcError(f"the run directory is in use by process {pid} ({cmd.strip()}): wait for it to end "
                           f"or stop it (a stale lock is removed automatically)",
                           file=str(self.file.parent)) from None
        if holder_host != host and pid > 0:
            raise MtcError(f"the run directory is in use by process {pid} on {holder_host} ({cmd.strip()}); "
                           f"delete {self.file} if that process is gone", file=str(self.file.parent)) from None

    def probe(self) -> None:
        """Refuse now if another live process holds the lock (before reading what it may be writing)."""
        import socket

        if self.file.exists():
            self._refuse_live_holder(socket.gethostname())

    def __enter__(self) -> RunLock:
        import socket

        host = socket.gethostname()
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_live_holder(host)
                with contextlib.suppress(FileNotFoundError):
                    self.file.unlink()  # stale: its process was killed
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {host} {self.what}\n")
            self.held = True
            return self
        raise MtcError("cannot take the run directory's lock", file=str(self.file.parent))

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.file.unlink()
            self.held = False


@contextlib.contextmanager
def session(run: RunDir, *, what: str, checkpoint: str):
    """A command's time in a run directory: locked, and removed again if the command created it
    and fails before writing its first checkpoint (nothing half-made is left)."""
    import shutil

    created = not run.path.exists()
    run.path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run.path, what)
    ok = False
    try:
        with lock:
            yield run
            ok = True
    finally:
        if not ok and created and not run.has_checkpoint(checkpoint) \
                and not any(run.path.rglob(f"*{CHECKPOINT_SUFFIX}")):
            shutil.rmtree(run.path, ignore_errors=True)


def differing(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``--option VALUE (run: OLD)`` for every key whose value changed (for --resume). Both sides are
    compared as config.json holds them (a tuple option equals the list read back)."""

    def as_json(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    out = []
    for k in sorted(set(recorded) | set(current)):
        if as_json(recorded.get(k)) != as_json(current.get(k)):
            out.append(f"--{k.replace('_', '-')} {current.get(k)!r} (the run has {recorded.get(k)!r})")
    return out
