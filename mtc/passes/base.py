"""Our pass base class: a thin wrapper over ``onnx_ir.passes`` so that API churn stops here."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

__all__ = ["Pass", "PassResult"]


class Pass(InPlacePass):
    """A named, in-place rewrite of an IR model.

    Subclasses set ``name`` (kebab-case), take keyword-only options in ``__init__`` (stored as
    attributes listed in ``options``), do the work in ``call(model) -> PassResult(model, modified)``
    and check preconditions in ``requires(model)``, raising :class:`mtc.errors.MtcError` that
    names the offending node.
    """

    name: str = "pass"
    #: attribute names shown by ``repr`` (the pass's options)
    options: tuple[str, ...] = ()

    def requires(self, model: ir.Model) -> None:  # noqa: D401 - hook
        """Check preconditions; raise MtcError naming the node on failure."""

    def call(self, model: ir.Model) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, model: ir.Model | PassResult, /) -> PassResult:
        # onnx_ir wraps precondition failures in its own error type; we want our MtcError to reach
        # the user unchanged, so run the hooks ourselves.
        m = model.model if isinstance(model, PassResult) else model
        self.requires(m)
        result = self.call(m)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name} returned {type(result).__name__}, expected PassResult")
        return result

    def _option_values(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.options}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._option_values().items())
        return f"{type(self).__name__}({opts})"
