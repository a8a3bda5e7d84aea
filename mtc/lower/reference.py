"""Export PyTorch modules (the reference nets of :mod:`mtc.zoo`) for the lowering's oracles and benchmark.

Four export flavours cover what the two PyTorch exporters produce:

``torchscript``
    ``dynamo=False``, opset 17, no constant folding: BatchNormalization stays, and shape arithmetic
    (``Shape``/``Gather``/``Concat``/``Unsqueeze`` chains) survives for the lowering to fold.
``torchscript-folded``
    the exporter's defaults: BatchNormalization folded into Conv, shape arithmetic folded.
``dynamo``
    ``dynamo=True`` with the exporter's optimiser (BatchNormalization folded into Conv).
``dynamo-bn``
    ``dynamo=True`` without the optimiser: BatchNormalization, ``SplitToSequence``, ``CastLike`` and
    ``Expand`` as the exporter emits them (what mtc's PyTorch front end imports).

Every model is converted to the target opset (18) with :func:`mtc.ir.opset.convert_opset`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import onnx
import onnx_ir as ir
import torch
from torch import nn

from mtc.ir.opset import TARGET_OPSET, convert_opset

EXPORTERS = ("torchscript", "torchscript-folded", "dynamo", "dynamo-bn")
#: The flavours that keep BatchNormalization (and so train like the source module).
EXPORTERS_WITH_BN = ("torchscript", "dynamo-bn")


def export_module(
    module: nn.Module,
    input_shape: Sequence[int],
    exporter: str = "torchscript",
    *,
    dynamic_batch: bool = False,
    opset: int = TARGET_OPSET,
) -> ir.Model:
    """Export ``module`` (in eval mode) with one input of ``input_shape`` and return it at ``opset``.

    Args:
        module: the module; exported in eval mode (its mode is restored afterwards).
        input_shape: the example input's shape.
        exporter: one of :data:`EXPORTERS`.
        dynamic_batch: export the batch dimension as symbolic (``N``).
        opset: target opset of the returned model.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    was_training = module.training
    module.eval()
    shape = tuple(input_shape)
    if dynamic_batch and shape[0] == 1:
        shape = (2,) + shape[1:]  # a batch of 1 invites the tracer to specialise the dimension
    x = torch.randn(*shape)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            if exporter.startswith("torchscript"):
                buf = io.BytesIO()
                kwargs: dict = {"do_constant_folding": exporter == "torchscript-folded"}
                if exporter == "torchscript":
                    kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
                torch.onnx.export(
                    module, (x,), buf,  # type: ignore[arg-type]  # a file object is fine
                    dynamo=False, opset_version=17, input_names=["input"],
                    output_names=["output"], dynamic_axes={"input": {0: "N"}} if dynamic_batch else None, **kwargs,
                )
                model = ir.from_proto(onnx.load_from_string(buf.getvalue()))
            else:
                dyn = ({0: torch.export.Dim("N", min=1)},) if dynamic_batch else None
                prog = torch.onnx.export(
                    module, (x,), dynamo=True, opset_version=18, input_names=["input"], dynamic_shapes=dyn,
                    optimize=exporter == "dynamo",
                )
                assert prog is not None
                model = prog.model
    finally:
        module.train(was_training)
    return convert_opset(model, opset)


def export_reference(name: str, exporter: str = "torchscript", *, batch: int | None = None,
                     dynamic_batch: bool = False, seed: int = 0) -> tuple[nn.Module, ir.Model]:
    """Build reference net ``name`` from :mod:`mtc.zoo` and export it.

    Returns:
        ``(module, model)``: the PyTorch module (eval mode) and its exported ONNX model.
    """
    from mtc import zoo

    module = zoo.build(name, seed=seed)
    shape = list(zoo.REFERENCE[name][1])
    if batch is not None:
        shape[0] = batch
    return module, export_module(module, shape, exporter, dynamic_batch=dynamic_batch)
