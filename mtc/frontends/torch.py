"""PyTorch front end: call ``pkg.module:factory`` and export the module through torch.onnx."""

from __future__ import annotations

import contextlib
import importlib
import io as _io
import os
import sys
import tempfile
import warnings
from pathlib import Path

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import io
from mtc.ir.names import ORIGIN_KEY, RENAME_KEY
from mtc.ir.opset import TARGET_OPSET


def resolve_factory(spec: str):
    """Import ``pkg.module:attr`` and return the attribute; MtcError naming the spec otherwise."""
    if ":" not in spec:
        raise MtcError(f"expected pkg.module:factory, got '{spec}'", file=spec)
    mod_name, attr = spec.split(":", 1)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # Users may name a module in the working directory, but after the installed packages: a
        # file there named like a library (matplotlib.py) must not replace the library.
        sys.path.append(cwd)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise MtcError(f"cannot import module '{mod_name}': {e}", file=spec) from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MtcError(f"module '{mod_name}' has no attribute '{attr}'", file=spec)
        obj = getattr(obj, part)
    return obj


def load_torch(
    spec: str,
    input_shape: tuple[int, ...],
    *,
    opset: int = TARGET_OPSET,
    exporter: str = "dynamo",
) -> ir.Model:
    """Export the module returned by ``spec``'s factory and read the result into the IR.

    The batch dimension is exported as symbolic (``N``) so the graph trains at any batch size;
    the other dimensions are fixed by ``input_shape``.
    """
    import torch

    factory = resolve_factory(spec)
    try:
        module = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    except Exception as e:
        raise MtcError(f"factory raised {type(e).__name__}: {e}", file=spec) from None
    if not isinstance(module, torch.nn.Module):
        raise MtcError(f"factory returned {type(module).__name__}, expected a torch.nn.Module", file=spec)
    module = module.eval()
    # A batch of 1 invites the tracer to specialise the batch dimension; trace with 2.
    shape = (max(2, input_shape[0]),) + tuple(input_shape[1:])
    x = torch.randn(*shape)
    with tempfile.TemporaryDirectory(prefix="mtc-export-") as tmp:
        out = Path(tmp) / "model.onnx"
        sink = _io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    batch = torch.export.Dim("N", min=1)
                    torch.onnx.export(module, (x,), str(out), dynamo=True, opset_version=max(opset, 18),
                                      input_names=["input"], output_names=None,
                                      dynamic_shapes=({0: batch},), verbose=False,
                                      optimize=False)  # the optimizer would fold BN into Conv
                elif exporter == "torchscript":
                    torch.onnx.export(module, (x,), str(out), dynamo=False, opset_version=min(opset, 17),
                                      input_names=["input"], dynamic_axes={"input": {0: "N"}},
                                      do_constant_folding=False)  # keep BN: mtc trains it
                else:
                    raise MtcError(f"unknown exporter '{exporter}' (expected dynamo or torchscript)", file=spec)
        except MtcError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MtcError(f"torch.onnx.export failed ({exporter}): {first}", file=spec) from None
        model = io.load(out)  # reads external data into memory, so the directory can go
    _name_from_modules(model)
    return model


_SCOPES = "pkg.torch.onnx.name_scopes"


def _name_from_modules(model: ir.Model) -> None:
    """Record the PyTorch module each node came from as ``mtc.origin``; drop exporter metadata.

    The dynamo exporter names nodes after aten ops (``node_conv2d_3``) and attaches module scopes,
    class names and stack traces with absolute paths (which would make files machine-dependent).
    We keep the module path only, and mark dynamo-named nodes so that :func:`name_after_origin`
    renames them once import has folded away the exporter's helper nodes. TorchScript names
    (``/layers/layers.0/Conv``) are kept; their scope becomes the origin.
    """
    import ast

    for node in model.graph:
        md = node.metadata_props
        path = ""
        dynamo = _SCOPES in md
        if dynamo:
            try:
                scopes = ast.literal_eval(md[_SCOPES])
                path = scopes[-2] if len(scopes) >= 2 else ""
            except (ValueError, SyntaxError):
                path = ""
        elif node.name is not None and node.name.startswith("/"):
            path = node.name.rsplit("/", 1)[0].lstrip("/")
        md.clear()
        if path:
            md[ORIGIN_KEY] = path
            if dynamo:
                md[RENAME_KEY] = "1"
