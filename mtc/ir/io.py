"""Load and save models through ``onnx_ir``, atomically, with external data for large models."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from mtc.errors import MtcError

#: Above this many bytes of initializers a model is saved with external data (protobuf caps at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Read an ONNX file (external data included) into the in-memory IR.

    Raises:
        MtcError: the file is missing, is not ONNX, or is truncated.
    """
    p = Path(path)
    if not p.exists():
        raise MtcError("no such file", file=str(p))
    if p.is_dir():
        raise MtcError("is a directory, expected an ONNX file", file=str(p))
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise MtcError(f"not a valid ONNX file or truncated ({type(e).__name__}: {e})", file=str(p)) from None
    if not proto.graph.node and not proto.graph.output:
        raise MtcError("not a valid ONNX file: it holds no graph", file=str(p))
    check_graph(proto, file=str(p))
    try:
        model = ir.from_proto(proto)
        # External tensors are resolved relative to the model's directory, lazily.
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            model = ir.load(str(p))
            # Read external weights now: the file may be a temporary one, and passes replace tensors.
            for v in model.graph.initializers.values():
                if isinstance(v.const_value, ir.ExternalTensor):
                    try:
                        v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)
                    except OSError as e:
                        raise MtcError(f"external data of '{v.name}' cannot be read: {e}", file=str(p)) from None
    except Exception as e:  # onnx_ir raises several types on malformed protos
        raise MtcError(f"cannot read the graph ({type(e).__name__}: {e})", file=str(p)) from None
    from mtc.ir.seeded import decode

    decode(model, file=str(p))
    return model


#: Temporary files and folders mtc writes beside a destination before renaming it into place:
#: ``.mtc-<pid>-...``, so a later run can tell which ones a killed process left behind.
TEMP_PREFIX = ".mtc-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: str | os.PathLike[str]) -> int:
    """Remove the temporary files and folders a killed mtc process left in ``folder``."""
    n = 0
    d = Path(folder)
    if not d.is_dir():
        return 0
    for p in d.glob(TEMP_PREFIX + "*"):
        pid_s = p.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid_s.isdigit() or int(pid_s) == os.getpid() or _pid_alive(int(pid_s)):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            n += 1
    return n


def temp_dir(parent: str | os.PathLike[str], tag: str = "") -> Path:
    """A fresh temporary folder beside a destination (stale ones from killed processes go first)."""
    sweep_stale(parent)
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{tag}", dir=parent))


def temp_file(parent: str | os.PathLike[str], name: str) -> tuple[int, str]:
    """A fresh temporary file beside a destination: ``(fd, path)``, with the permissions any new file
    gets (mkstemp's are 0600)."""
    sweep_stale(parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{name}.", dir=parent)
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    return fd, tmp


def check_graph(proto: onnx.ModelProto, *, file: str | None = None) -> None:
    """The structural faults ONNX's checker reports without naming the node: a value defined twice,
    a node reading a value nothing defines, a cycle, a domain the model does not import, an op that
    is not an ONNX operator. One :class:`MtcError` naming the node and the value.
    """
    g = proto.graph
    imported = {o.domain or "" for o in proto.opset_import}
    defined: dict[str, str] = {}
    for v in g.input:
        defined[v.name] = "the graph input"
    for t in g.initializer:
        defined.setdefault(t.name, "an initializer")
    for n in g.node:
        for o in n.output:
            if not o:
                continue
            if o in defined and defined[o] not in ("the graph input", "an initializer"):
                raise MtcError(f"value '{o}' is produced twice, by {defined[o]} and by node '{n.name}' ({n.op_type})",
                               file=file, node=n.name, op=n.op_type)
            if o in defined:
                raise MtcError(f"node '{n.name}' ({n.op_type}) writes '{o}', which is already {defined[o]}", file=file,
                               node=n.name, op=n.op_type)
            defined[o] = f"node '{n.name}' ({n.op_type})"
    # Every input must be defined somewhere; order does not matter yet (a cycle is found below).
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    for n in g.node:
        for x in n.input:
            if x and x not in defined:
                raise MtcError(f"reads '{x}', which no node, graph input or initializer defines", file=file,
                               node=n.name, op=n.op_type)
        domain = n.domain if n.domain != "ai.onnx" else ""
        if domain not in imported:
            raise MtcError(f"uses domain '{n.domain}', which the model does not import (opset_import)", file=file,
                           node=n.name, op=n.op_type)
        if domain in ("", "ai.onnx.ml") and not onnx.defs.has(n.op_type, domain):
            raise MtcError(f"'{n.op_type}' is not an ONNX operator{' of ' + domain if domain else ''}", file=file,
                           node=n.name, op=n.op_type)
    for o in g.output:
        if o.name not in defined:
            raise MtcError(f"graph output '{o.name}' is not computed by any node", file=file)
    # Kahn's algorithm over node dependencies: what is left over lies on a cycle.
    deps = [{producer[x] for x in n.input if x in producer} for n in g.node]
    users: list[list[int]] = [[] for _ in g.node]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    left = [len(d) for d in deps]
    ready = [i for i, c in enumerate(left) if c == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for u in users[i]:
            left[u] -= 1
            if left[u] == 0:
                ready.append(u)
    if seen != len(g.node):
        stuck = next(n for n, c in zip(g.node, left, strict=True) if c > 0)
        raise MtcError("the graph has a cycle through this node", file=file, node=stuck.name, op=stuck.op_type)


def _nbytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def save(model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically: nothing is left half-written if anything fails.

    Args:
        model: the model.
        path: destination ``.onnx`` file.
        external_data: store initializers in ``<name>.data`` next to the file; by default only
            when they exceed :data:`EXTERNAL_DATA_THRESHOLD`.
    """
    from mtc.ir.seeded import encode

    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if model.metadata_props.get("mtc.format"):
        # A supergraph keeps its untrained new weights as recipes (mtc.ir.seeded): nothing drawn, nothing written.
        model = encode(model)
    if external_data is None:
        external_data = _nbytes(model) > EXTERNAL_DATA_THRESHOLD
    tmpdir = temp_dir(dst.parent)
    try:
        tmp = tmpdir / dst.name
        data_name = dst.name + ".data"
        if external_data:
            ir.save(model, str(tmp), external_data=data_name)
            os.replace(tmpdir / data_name, dst.parent / data_name)
        else:
            ir.save(model, str(tmp))
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return dst


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w"):
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(dst.parent, dst.name)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
