"""Export in memory: per-task and fused graphs against the fixed-policy lowering in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import BACKBONES

from mtc.export import graph as eg
from mtc.export.api import VerificationError, export_graphs, verify, write_verified
from mtc.export.resize import resize_as_matmul
from mtc.frontends import import_model
from mtc.ir import supergraph as sg
from mtc.ir.cost import model_cost
from mtc.spaces import compile_supergraph
from mtc.spaces.automtl import Policy, vcns_of
from mtc.tasks.spec import tasks_of

TASKS = {2: "a:regress:1,b:class:2", 3: "a:regress:1,b:class:2,c:seg:3"}
NAMES = ("tiny_resnet", "tiny_densenet", "tiny_mobilenetv2")
_cache: dict[tuple[str, int], ir.Model] = {}


def supergraph(name: str, n_tasks: int) -> ir.Model:
    key = (name, n_tasks)
    if key not in _cache:
        m = import_model(str(BACKBONES / f"{name}.onnx"))
        compile_supergraph(m, tasks=TASKS[n_tasks], head_width=8)
        _cache[key] = m
    return _cache[key]


def reference(name: str, n_tasks: int, tasks: list[str]) -> ir.Model:
    """The backbone with the heads of ``tasks`` (no search space), outputs restricted to ``tasks``."""
    from mtc.passes.canonicalize import remove_dead

    m = import_model(str(BACKBONES / f"{name}.onnx"))
    compile_supergraph(m, tasks=TASKS[n_tasks], head_width=8, passes="canonicalize,cut-at-feature,attach-heads")
    outs = {o.name: o for o in m.graph.outputs}
    m.graph.outputs.clear()
    m.graph.outputs.extend(outs[t] for t in tasks)
    remove_dead(m)
    return m


def perturbed(model: ir.Model, policy: Policy, seed: int = 0):
    """The fixed lowering with every float weight and statistic perturbed (copies differ from shared)."""
    module = eg.fixed_module(model, policy)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in module.ir_state().items():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=g) * 0.1 * (v.abs().mean() + 0.05))
                if "var" in k:
                    v.abs_().add_(0.05)
    return module


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def check_exported(m: ir.Model, outputs: list[str]) -> None:
    onnx.checker.check_model(ir.to_proto(m), full_check=True)
    assert not [n for n in m.graph if n.domain == sg.DOMAIN]
    assert sg.DOMAIN not in m.opset_imports and m.opset_imports[""] >= 17
    assert len(m.graph.inputs) == 1
    assert [o.name for o in m.graph.outputs] == outputs
    assert all(n.name for n in m.graph) and len({n.name for n in m.graph}) == len(list(m.graph))


@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_random_policies_match_the_lowering(name, n_tasks):
    model = supergraph(name, n_tasks)
    before = ir.to_proto(model).SerializeToString()
    tasks = [t.name for t in tasks_of(model) or []]
    for seed in (n_tasks, 10 + n_tasks):
        policy = Policy.random(model, seed=seed)
        module = perturbed(model, policy, seed)
        ex = export_graphs(model, policy, module, fold_bn=seed > 10, resize_matmul=seed < 10)
        for t, m in ex.tasks.items():
            check_exported(m, [t])
            assert max(verify(m, module).values()) <= 1e-4
        assert ex.fused is not None
        check_exported(ex.fused, tasks)
        diffs = verify(ex.fused, module)
        assert set(diffs) == set(tasks) and max(diffs.values()) <= 1e-4
        # task-specific copies carry their trained (perturbed) weights, not the shared ones
        copies = {k: v for k, v in ex.fused.graph.initializers.items() if "@" in k and k.split("@")[0] in
                  ex.fused.graph.initializers}
        for k, v in copies.items():
            shared = ex.fused.graph.initializers[k.split("@")[0]].const_value.numpy()
            assert not np.array_equal(v.const_value.numpy(), shared), k
    assert ir.to_proto(model).SerializeToString() == before  # the input model is never mutated


def test_copies_are_named_after_copyof_outputs():
    model = supergraph("tiny_resnet", 2)
    policy = Policy.uniform(model, "specific")
    module = perturbed(model, policy)
    ex = export_graphs(model, policy, module, fused=False)
    inits = ex.tasks["a"].graph.initializers
    for name, t in module.named_initializers().items():
        if name.endswith("@a") and name in inits:
            np.testing.assert_array_equal(inits[name].const_value.numpy(), t.detach().numpy())
    assert any(k.endswith("@a") for k in inits) and not any(k.endswith("@b") for k in inits)
    origins = [n.metadata_props.get("mtc.origin") for n in ex.tasks["a"].graph if n.op_type == "Conv"]
    assert all(origins)


def test_fold_bn_removes_batchnorms_and_stays_exact():
    model = supergraph("tiny_resnet", 3)
    policy = Policy.random(model, seed=5)
    module = perturbed(model, policy, 5)
    plain = export_graphs(model, policy, module)
    folded = export_graphs(model, policy, module, fold_bn=True)
    for t in plain.tasks:
        assert ops(plain.tasks[t]).count("BatchNormalization") > 0
        convs_bn = [n for n in folded.tasks[t].graph if n.op_type == "BatchNormalization"
                    and (p := n.inputs[0].producer()) is not None and p.op_type == "Conv"]
        assert not convs_bn
        assert max(verify(folded.tasks[t], module).values()) <= 1e-4
    assert max(verify(folded.fused, module).values()) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_all_shared_task_is_the_backbone_with_its_head(name):
    model = supergraph(name, 3)
    ex = export_graphs(model, Policy.uniform(model, "shared"), resize_matmul=False)
    for t in ("a", "b", "c"):
        assert ops(ex.tasks[t]) == ops(reference(name, 3, [t]))
    # the fused all-shared model computes each backbone op once: backbone + every head
    assert ops(ex.fused) == ops(reference(name, 3, ["a", "b", "c"]))
    assert not any("[" in str(n.name) for n in ex.fused.graph)
    # by default the seg head's bilinear Resize becomes two MatMuls, in the reference alike
    fast = export_graphs(model, Policy.uniform(model, "shared"))
    ref = reference(name, 3, ["a", "b", "c"])
    assert resize_as_matmul(ref) == 1
    assert ops(fast.fused) == ops(ref) and "Resize" not in ops(fast.fused)


@pytest.mark.parametrize("name", NAMES)
def test_skipping_vcns_exports_fewer_macs(name):
    model = supergraph(name, 2)
    base = model_cost(reference(name, 2, ["a"]))[1]
    vcns = [r.name for r in vcns_of(model)]
    rng = np.random.default_rng(0)
    for k in (1, 2, 4, len(vcns)):
        for _ in range(3):
            policy = Policy.uniform(model, "shared")
            skipped = rng.choice(vcns, size=k, replace=False)
            for v in skipped:
                policy.choices[str(v)]["a"] = 2
            ex = export_graphs(model, policy, fused=False)
            assert model_cost(ex.tasks["a"])[1] < base, sorted(skipped)
            assert model_cost(ex.tasks["b"])[1] == model_cost(reference(name, 2, ["b"]))[1]


def test_fused_shares_the_common_prefix():
    model = supergraph("tiny_resnet", 2)
    vcns = [r.name for r in vcns_of(model)]
    policy = Policy.uniform(model, "shared")
    for v in vcns[len(vcns) // 2:]:
        policy.choices[v]["b"] = 1  # b diverges half-way
    ex = export_graphs(model, policy)
    assert ex.fused is not None
    convs = [n for n in ex.fused.graph if n.op_type == "Conv"]
    first = [n.name for n in convs if n.name.startswith(vcns[0])]
    assert first == [vcns[0]]  # computed once for both tasks
    per_task = sum(ops(m).count("Conv") for m in ex.tasks.values())
    assert len(convs) < per_task
    assert max(verify(ex.fused, eg.fixed_module(model, policy)).values()) <= 1e-4


def test_write_verified_leaves_nothing_on_mismatch(tmp_path):
    model = supergraph("tiny_resnet", 2)
    policy = Policy.random(model, seed=1)
    ex = export_graphs(model, policy, perturbed(model, policy))
    out = write_verified(ex, tmp_path / "ok")
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["a.onnx", "b.onnx", "fused.onnx"]
    assert max(out["fused"]["diff"].values()) <= 1e-4
    # corrupt one weight of task b's model: verification fails and no file appears
    bad = ex.tasks["b"]
    w = next(v for v in bad.graph.initializers.values() if v.const_value is not None and v.const_value.size > 8)
    w.const_value = ir.tensor(w.const_value.numpy() + 1.0, name=w.name)
    with pytest.raises(VerificationError, match="'b'"):
        write_verified(ex, tmp_path / "bad")
    assert not list((tmp_path / "bad").rglob("*.onnx*"))


def test_large_models_go_to_external_data(tmp_path, monkeypatch):
    # Exports above the protobuf limit are written with external data and checked by path; a
    # lowered threshold makes the tiny models "large".
    import mtc.ir.io as io

    model = supergraph("tiny_resnet", 2)
    policy = Policy.random(model, seed=2)
    ex = export_graphs(model, policy, perturbed(model, policy))
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    out = write_verified(ex, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.onnx", "a.onnx.data", "b.onnx", "b.onnx.data", "fused.onnx", "fused.onnx.data"]
    assert (tmp_path / "fused.onnx").stat().st_size < (tmp_path / "fused.onnx.data").stat().st_size
    onnx.checker.check_model(str(tmp_path / "fused.onnx"), full_check=True)
    assert max(out["fused"]["diff"].values()) <= 1e-4
    assert verify(tmp_path / "a.onnx", ex.module)["a"] <= 1e-4


@pytest.mark.parametrize("fold_bn", [False, True])
def test_report_compares_like_with_like(fold_bn):
    # all shared: each task's model is the backbone with its head, so the report must show the same
    # cost on both sides, with or without BatchNorm folding
    from mtc.export.report import deployment_report

    model = supergraph("tiny_resnet", 2)
    ex = export_graphs(model, Policy.uniform(model, "shared"), fold_bn=fold_bn)
    rep = deployment_report(model, ex, repeat=1)
    for t in ("a", "b"):
        row = rep["tasks"][t]
        assert row["exported"]["macs"] == row["backbone"]["macs"]
        assert row["exported"]["params"] == row["backbone"]["params"]
    assert rep["fused"]["macs"] < rep["fused"]["sum_of_tasks"]["macs"]
