"""Oracle: the ONNX backend node tests, with mtc's lowering as the backend.

The node tests (single ops and their function expansions, with reference outputs) are generated in
memory by the ``onnx`` package. Every test whose graph uses only ops in the lowering's registry is
included; the exclusions below say why each left-out group cannot pass. The session summary prints
how many node tests ran and passed.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import onnx
import onnx.backend.base
import onnx.backend.test
import onnx_ir as ir
import pytest
import torch
from onnx.backend.test.loader import load_model_tests

from mtc.lower import lower
from mtc.lower.module import to_numpy, to_torch
from mtc.lower.registry import lookup, normalize_domain

#: Node tests left out, as regular expressions over test names, each with the reason.
EXCLUDE: dict[str, str] = {
    r"^test_\w*_uint(16|32|64)": "torch has no add/compare/min/max/div/mod/sort kernels for uint16, uint32, uint64",
    r"^test_bitwise_not_3d": "uint16 input: torch has no bitwise_not for uint16",
    r"FLOAT8|FLOAT4E2M1|U?INT4|U?INT2": "float8 / 4-bit / 2-bit element types have no torch equivalent with ONNX's "
                                        "saturating casts",
    r"^test_training_dropout(_default|_default_mask|_mask)?$": "random: the mask comes from torch's generator, "
                                                              "not numpy's (the zero-ratio variants run)",
    r"^test_equal_string": "string tensors have no torch equivalent",
    r"^test_attention_\w*_(bf16|fp16)_expanded$": "half-precision: intermediate products round differently from "
                                                  "the reference by one ulp",
}


class MtcRep(onnx.backend.base.BackendRep):
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        xs = [to_torch(x) if x is not None else None for x in inputs]
        with torch.no_grad():
            outs = self.module(*xs)
        return tuple(to_numpy(o) for o in outs)


class MtcBackend(onnx.backend.base.Backend):
    """Lowers the test model with mtc and runs it in eval mode (the node tests' inference semantics)."""

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> MtcRep:
        return MtcRep(lower(ir.from_proto(model)).eval())

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


def _supported(model: onnx.ModelProto) -> bool:
    opsets = {normalize_domain(o.domain): o.version for o in model.opset_import}
    return all(lookup(n.op_type, n.domain, opsets.get(normalize_domain(n.domain), 1)) for n in model.graph.node)


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the generators divide by zero on purpose
    with np.errstate(all="ignore"):
        _CASES = load_model_tests(kind="node")

INCLUDED = sorted(c.name for c in _CASES if _supported(c.model))
EXCLUDED = sorted(n for n in INCLUDED if any(re.search(p, n) for p in EXCLUDE))

backend_test = onnx.backend.test.BackendTest(MtcBackend, __name__)
backend_test.include("^(" + "|".join(INCLUDED) + ")_cpu$")
for _pattern in EXCLUDE:
    # Patterns ending in `$` name whole tests; the runner appends the device suffix to names.
    backend_test.exclude(_pattern[:-1] + "_cpu$" if _pattern.endswith("$") else _pattern)

# Only the node tests, and only those for registry ops on CPU: the excluded ones stay, skipped with
# their reason; model-zoo tests and other devices are not generated at all.
OnnxBackendNodeModelTest = backend_test.test_cases["OnnxBackendNodeModelTest"]
_keep = {f"{n}_cpu" for n in INCLUDED}
for _attr in [a for a in vars(OnnxBackendNodeModelTest) if a.startswith("test_") and a not in _keep]:
    delattr(OnnxBackendNodeModelTest, _attr)


def test_exclusions_are_explained_and_used() -> None:
    for pattern, reason in EXCLUDE.items():
        assert reason.strip(), pattern
        assert any(re.search(pattern, n) for n in INCLUDED), f"exclusion {pattern!r} matches no included test"
    # Exclusions stay exceptions: the bulk of the included tests runs.
    assert len(EXCLUDED) < len(INCLUDED) // 5


def test_core_ops_have_node_tests() -> None:
    """The ops common CNN backbones need are all covered by included, non-excluded node tests."""
    core = ["conv", "convtranspose", "batchnorm", "relu", "leakyrelu", "clip", "sigmoid", "hardsigmoid",
            "hardswish", "tanh", "erf", "add", "sub", "mul", "div", "pow", "sqrt", "maxpool", "averagepool",
            "globalaveragepool", "globalmaxpool", "reduce_mean", "gemm", "matmul", "flatten", "reshape",
            "transpose", "concat", "split", "slice", "gather", "squeeze", "unsqueeze", "resize", "constant_pad",
            "reflect_pad", "edge_pad",
            "softmax", "layer_normalization", "dropout", "identity"]
    running = set(INCLUDED) - set(EXCLUDED)
    missing = [op for op in core if not any(n.startswith(f"test_{op}") for n in running)]
    assert not missing


# --- the summary line ---------------------------------------------------------------------------

_NODE_TESTS = "::OnnxBackendNodeModelTest::"


class _NodeTestSummary:
    """A plugin printing how many node tests ran and passed, registered once this module runs."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        stats = terminalreporter.stats
        passed = sum(1 for r in stats.get("passed", []) if _NODE_TESTS in r.nodeid and r.when == "call")
        failed = sum(1 for r in stats.get("failed", []) if _NODE_TESTS in r.nodeid and r.when == "call")
        excluded = sum(1 for r in stats.get("skipped", []) if _NODE_TESTS in r.nodeid)
        terminalreporter.write_line(
            f"ONNX backend node tests with the mtc lowering as backend: {passed + failed} ran, {passed} passed, "
            f"{failed} failed, {excluded} excluded (EXCLUDE in {__name__.rsplit('.', 1)[-1]}.py)"
        )


@pytest.fixture(scope="module", autouse=True)
def _node_test_summary(request: pytest.FixtureRequest) -> None:
    pm = request.config.pluginmanager
    if not pm.has_plugin("mtc-lower-node-tests"):
        pm.register(_NodeTestSummary(), "mtc-lower-node-tests")
