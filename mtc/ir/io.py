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
    tmpdir = Path(tempfile.mkdtemp(prefix=".mtc-", dir=dst.parent))
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
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
