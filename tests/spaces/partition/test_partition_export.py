"""Plans of the partition and allocation spaces export through the pruning API (issue 14, "Export"):
each task's ONNX physically keeps exactly its planned channels at every site (producers' outputs,
consumers' inputs, the head), has fewer MACs and a lower onnxruntime latency than the backbone with
its head, and the fused model shares the layers before the masks diverge; every file is verified
against the lowering in onnxruntime (write_verified), and checked again here against the
supergraph's own lowering with the plan's channels zeroed."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from channelnets import Builder

from mtc.ir import supergraph as sg
from mtc.ir.cost import model_cost
from mtc.ir.plan import Plan

C = 48
TASKS = "a:class:5,b:class:3"


def _backbone():
    """conv1 -> BN -> Relu -> conv2 -> BN -> Relu -> conv3 -> BN -> Relu -> conv4 -> BN -> Relu."""
    b = Builder(seed=5)
    h = "x"
    cin = 3
    for i in range(1, 5):
        h = b.conv(h, cin, C, k=3, name=f"conv{i}")
        h = b.op("Relu", b.bn(h, C), name=f"relu{i}")
        cin = C
    return b.model({"x": ["N", 3, 24, 24]}, [h])


def _compile(space: str, **opts):
    from mtc.spaces import compile_supergraph

    m = _backbone()
    compile_supergraph(m, tasks=TASKS, head_width=8, space=space, feature="relu4", **opts)
    return m


def _convs(m) -> dict[str, tuple[int, int]]:
    """Per Conv/Gemm node: (output channels, input channels) of its weight."""
    out = {}
    for n in m.graph:
        if n.op_type in ("Conv", "Gemm"):
            w = n.inputs[1].const_value
            out[n.name] = (int(w.shape[0]), int(w.shape[1]))
    return out


def _latency(path_or_bytes, x, repeat: int = 40) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    for _ in range(5):
        s.run(None, {name: x})
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        s.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _full_plan(model) -> Plan:
    tasks = sg.task_names(model)
    return Plan(space=sg.space_of(model)["name"],
                masks={c.name: {t: list(range(c.channels)) for t in tasks} for c in sg.choices_of(model, "mask")})


def _check_export(model, plan, tmp_path, want: dict[str, dict[str, int]]):
    """Export, then check channel counts, MACs, latency and outputs."""
    from mtc.export.api import export_graphs, write_verified
    from mtc.lower.supergraph import lower_fixed

    ex = export_graphs(model, plan)
    res = write_verified(ex, tmp_path / "out")
    assert set(res) == {"a", "b", "fused"}
    full = export_graphs(model, _full_plan(model))
    write_verified(full, tmp_path / "full")
    choices = {c.name: c for c in sg.choices_of(model, "mask")}
    x = np.random.default_rng(0).standard_normal((1, 3, 24, 24)).astype(np.float32)
    ref = lower_fixed(model, plan).eval()
    with torch.no_grad():
        ref_out = [o.numpy() for o in ref(torch.from_numpy(x))]
    for i, t in enumerate(sg.task_names(model)):
        m = ex.tasks[t]
        convs = _convs(m)
        for site, per in want.items():
            c = choices[site]
            for p in c.info["producers"]:
                assert convs[p][0] == per[t], (t, site, p, convs[p])
            for q in c.info["consumers"]:
                name = q if q in convs else next(k for k in convs if k.startswith(f"head@{t}/"))
                if q.startswith("head@") and not q.startswith(f"head@{t}/"):
                    continue
                assert convs[name][1] == per[t], (t, site, q, convs[name])
        assert model_cost(m)[1] < model_cost(full.tasks[t])[1]
        # the task's file against the supergraph's lowering under the plan (an independent run)
        got = ort.InferenceSession(str(tmp_path / "out" / f"{t}.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]
        np.testing.assert_allclose(got, ref_out[i], rtol=1e-4, atol=1e-5)
        fast = _latency(str(tmp_path / "out" / f"{t}.onnx"), x)
        slow = _latency(str(tmp_path / "full" / f"{t}.onnx"), x)
        assert fast < slow, (t, fast, slow)
    return ex


def test_partition_plan_exports_physically_smaller_task_models(tmp_path):
    from mtc.spaces.partition import plan_from_p

    torch.manual_seed(0)
    model = _compile("partition", sites="all")
    sites = [c.name for c in sg.choices_of(model, "mask")]
    assert len(sites) == 2  # every other layer: relu1 and relu3
    plan = plan_from_p(model, [[0.25, 0.5], [0.5, 0.4]])
    want = {s: {t: len(plan.masks[s][t]) for t in ("a", "b")} for s in sites}
    assert want[sites[0]] == {"a": 12, "b": 19}  # round(C · diag)
    ex = _check_export(model, plan, tmp_path, want)
    # fused: conv1 runs once for both tasks (before the first mask), the masked layers per task
    names = [n.name for n in ex.fused.graph if n.op_type == "Conv"]
    assert names.count("conv1") == 1 and "conv2[a]" in names and "conv2[b]" in names, names


def test_allocation_plan_exports_the_allocated_components(tmp_path):
    from mtc.spaces.allocation import components_of, plan_from_allocation

    model = _compile("allocation", sites="relu2,relu4", components="4")
    cs = sg.choices_of(model, "mask")
    assert [len(components_of(c)) for c in cs] == [4, 4]
    alloc = {cs[0].name: [[1, 0, 0, 0], [0, 1, 1, 0]], cs[1].name: [[0, 0, 1, 1], [1, 0, 0, 0]]}
    plan = plan_from_allocation(model, alloc)
    size = C // 4
    want = {cs[0].name: {"a": size, "b": 2 * size}, cs[1].name: {"a": 2 * size, "b": size}}
    assert plan.masks[cs[0].name]["b"] == list(range(size, 3 * size))
    assert plan.info["active_fraction"] == pytest.approx(6 / 16)
    _check_export(model, plan, tmp_path, want)
