"""The pass manager: named pipelines, verification after each pass, dumps, truthful `modified`."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from conftest import parse

from mtc.errors import MtcError
from mtc.ir.names import fix_names
from mtc.passes.base import Pass, PassResult
from mtc.passes.fold import FoldShapes
from mtc.passes.manager import PassManager, resolve

TEXT = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N,2,4,4] x) => (float[N,32] y) <int64[1] zero = {0}, int64[1] m1 = {-1}> {
  s = Shape (x)
  n = Gather <axis = 0> (s, zero)
  t = Concat <axis = 0> (n, m1)
  y = Reshape (x, t)
}
"""


def _model() -> ir.Model:
    m = parse(TEXT)
    fix_names(m)
    return m


class Breaker(Pass):
    """Adds a dead node: the verifier must catch it and name this pass."""

    name = "breaker"

    def call(self, model: ir.Model) -> PassResult:
        x = model.graph.inputs[0]
        model.graph.insert_before(list(model.graph)[0], ir.node("Neg", [x], name="dead"))
        return PassResult(model, True)


def test_pipeline_runs_verifies_and_dumps(tmp_path):
    pm = PassManager(resolve("fold-shapes"), dump_dir=tmp_path)
    res = pm.run(_model())
    assert res.modified and [r.name for r in res.records] == ["fold-shapes"]
    assert [n.op_type for n in res.model.graph] == ["Reshape"]
    dump = (tmp_path / "00-fold-shapes.onnx.txt").read_text()
    assert "Reshape" in dump and "Shape (" not in dump
    # A second run has nothing to do and says so.
    assert not PassManager([FoldShapes()]).run(res.model).modified


def test_verifier_names_the_breaking_pass():
    with pytest.raises(MtcError, match="pass breaker: node 'dead' \\(Neg\\): dead node"):
        PassManager([Breaker()]).run(_model())


def test_unknown_pass_and_dump_after():
    with pytest.raises(MtcError, match="unknown pass 'nope'.*fold-shapes"):
        resolve("fold-shapes,nope")
    with pytest.raises(MtcError, match="--dump-after: zzz is not in the pipeline"):
        PassManager(resolve("fold-shapes"), dump_after=["zzz"])


def test_repr_lists_options():
    assert repr(FoldShapes()) == "FoldShapes()"
    assert "FoldShapes()" in repr(PassManager([FoldShapes()]))
