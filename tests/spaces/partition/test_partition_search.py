"""The partition space's search (issue 14, "Space partition"): the distillation proxy's plumbing
against the lowered network itself, teachers from an ``mtc baseline`` run and their bad inputs, the
``random`` and ``es`` strategies' outputs (samples.jsonl, the Fig. 5 PNG, the best P as the plan),
the ES update recomputed from the samples, and the short-train proxy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from channelnets import Builder
from safetensors.torch import save_file

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan

TASKS = "digit:class,rotated:class:4"
SMALL = {"teacher_steps": 5, "distill_steps": 3, "distill_batch": 4, "score_batches": 2, "solver_iters": 50}


def _backbone():
    """Three 3x3 convs with ReLU (no BatchNorm: a student equal to its teacher computes the same)."""
    b = Builder(seed=2)
    h, cin = "x", 1
    for i in range(1, 4):
        h = b.op("Relu", b.conv(h, cin, 8, k=3, name=f"conv{i}"), name=f"relu{i}")
        cin = 8
    return b.model({"x": ["N", 1, 8, 8]}, [h])


def _compile(sites: str = "all"):
    from mtc.spaces import compile_supergraph

    m = _backbone()
    compile_supergraph(m, tasks=TASKS, head_width=8, space="partition", sites=sites, feature="relu3")
    return m


@pytest.fixture(scope="module")
def data():
    from mtc.data import load_data
    from mtc.tasks.spec import parse_tasks

    return load_data("digits", parse_tasks(TASKS), (1, 8, 8), 0)


def _opts(**kw):
    from mtc.spaces.partition.options import ES_OPTIONS

    return {**{o.name: o.default for o in ES_OPTIONS}, **SMALL, **kw}


def _baselines(model, d, *, tasks=None, drop: str | None = None):
    """An mtc baseline run directory whose every model has the supergraph's initial weights."""
    names = tasks or sg.task_names(model)
    init = {str(k): torch.from_numpy(v.const_value.numpy().copy()) for k, v in model.graph.initializers.items()
            if v.const_value is not None and v.const_value.dtype.is_floating_point()}
    d.mkdir()
    (d / "baselines.json").write_text(json.dumps({"tasks": names, "kinds": {t: "class" for t in names}}))
    for where in [f"single-{t}" for t in names] + ["multi"]:
        (d / where / "checkpoints").mkdir(parents=True)
        tensors = {f"module/{k}": v for k, v in init.items() if k != drop and not k.endswith(".mask")}
        save_file(tensors, str(d / where / "checkpoints" / "train.safetensors"))
    return d


@pytest.mark.parametrize("sites", ["all", "conv3"])
def test_a_student_equal_to_its_teachers_scores_as_the_network_itself(data, tmp_path, sites):
    """Teachers and student all hold the supergraph's weights, the student barely moves (lr 1e-12)
    and every channel is kept: the proxy's score is then each task's metric of the network itself,
    evaluated by the generic evaluation on the whole validation set."""
    from mtc.lower.supergraph import lower_fixed
    from mtc.spaces.partition import plan_from_p
    from mtc.spaces.partition.proxy import Distiller, score_of
    from mtc.tasks.spec import tasks_of
    from mtc.train.loop import evaluate

    model = _compile(sites)
    train, val = data
    base = _baselines(model, tmp_path / "base")
    d = Distiller(model, train, val, _opts(baselines=str(base), distill_lr=1e-12, score_batches=10), seed=0)
    assert (d.parts.pre is None) == (sites == "all")
    plan = plan_from_p(model, np.ones((2, 2)))
    res = d.score(plan)
    assert res["distill_loss"] < 1e-10
    full = lower_fixed(model, plan)
    want = evaluate(full, val, tasks_of(model), max_batches=10)
    for t in ("digit", "rotated"):
        assert res["tasks"][t]["top1"] == pytest.approx(want[t]["top1"])
    assert res["score"] == pytest.approx(score_of(want, tasks_of(model)))
    assert res["score"] == pytest.approx((want["digit"]["top1"] + want["rotated"]["top1"]) / 2)


def test_masks_lower_the_proxy_score_of_a_perfect_student(data, tmp_path):
    from mtc.spaces.partition import plan_from_p
    from mtc.spaces.partition.proxy import Distiller

    model = _compile()
    train, val = data
    d = Distiller(model, train, val, _opts(baselines=str(_baselines(model, tmp_path / "b")), distill_lr=1e-12),
                  seed=0)
    full = d.score(plan_from_p(model, np.ones((2, 2))))
    tiny = d.score(plan_from_p(model, np.eye(2) * 0.01))
    assert tiny["distill_loss"] > full["distill_loss"] + 1e-3


def test_teachers_of_another_task_set_or_backbone_are_refused(data, tmp_path):
    from mtc.spaces.partition.proxy import Distiller

    model = _compile()
    train, val = data
    other = _baselines(model, tmp_path / "other", tasks=["digit", "parity"])
    with pytest.raises(MtcError, match="the baselines are for tasks digit, parity, the supergraph has digit, "
                                       "rotated \\(another task set\\)"):
        Distiller(model, train, val, _opts(baselines=str(other)), seed=0)
    w = next(str(v.inputs[1].name) for v in model.graph if v.name == "conv2")
    missing = _baselines(model, tmp_path / "missing", drop=w)
    with pytest.raises(MtcError, match=f"has no tensor '{w}' \\(trained on another backbone\\?\\)"):
        Distiller(model, train, val, _opts(baselines=str(missing)), seed=0)
    with pytest.raises(MtcError, match="not an mtc baseline run directory"):
        Distiller(model, train, val, _opts(baselines=str(tmp_path)), seed=0)


def _search(model, data, tmp_path, strategy: str, **opts):
    from mtc.train.run import RunDir
    from mtc.train.search import run_search

    train, val = data
    run = RunDir(tmp_path / strategy)
    plan = run_search(run, model, train, val, {"checkpoint_every": 10**9, "log_every": 10**9, "seed": 0,
                                               "batch_size": 8, **SMALL, **opts}, strategy=strategy, progress=False)
    samples = [json.loads(line) for line in (run.path / "samples.jsonl").read_text().splitlines()]
    return plan, run, samples


def test_random_search_writes_samples_the_figure_and_the_best_p_as_plan(data, tmp_path):
    from mtc.spaces import read_plan
    from mtc.spaces.partition import plan_from_p

    model = _compile()
    plan, run, samples = _search(model, data, tmp_path, "random", samples=4, use_min=0.3, use_max=0.6)
    assert len(samples) == 4 and all(s["kind"] == "random" for s in samples)
    for s in samples:
        p = np.array(s["P"])
        assert np.allclose(p, p.T) and ((p >= 0) & (p <= 1)).all()
        assert 0.3 <= p.diagonal().min() and p.diagonal().max() <= 0.6
        assert s["mean_use"] == pytest.approx(p.diagonal().mean(), abs=1e-6)
        assert s["score"] == pytest.approx(np.mean([s["tasks"][t]["top1"] for t in ("digit", "rotated")]), abs=1e-5)
    best = max(samples, key=lambda s: s["score"])
    assert plan.info["sample"] == best["index"] and np.allclose(plan.info["P"], best["P"])
    again = plan_from_p(model, np.array(best["P"]), seed=0, solver_iters=SMALL["solver_iters"])
    assert plan.masks == again.masks
    on_disk = read_plan(run.read_json("plan.json"), model)
    assert on_disk.masks == plan.masks
    assert (run.path / "samples.png").stat().st_size > 1000


def test_es_takes_32_evaluations_per_step_and_follows_mania_et_al(data, tmp_path):
    model = _compile()
    nu, lr, lam = 0.05, 0.1, 0.5
    init = "0.5 0.5; 0.5 0.5"
    plan, run, samples = _search(model, data, tmp_path, "es", es_steps=1, directions=16, random_samples=2,
                                 noise=nu, es_lr=lr, diag_penalty=lam, init=init)
    es = [s for s in samples if s["kind"] == "es"]
    assert len(samples) == 2 + 32 and len(es) == 32 and all(s["step"] == 0 for s in es)
    # θ ± ν δ_k in order (+, -) per direction: recover δ_k and recompute the update
    theta0 = np.array([0.5, 0.5, 0.5])
    tri = np.triu_indices(2)
    plus = np.array([np.array(s["P"])[tri] for s in es[0::2]])
    minus = np.array([np.array(s["P"])[tri] for s in es[1::2]])
    inside = ((plus > 0) & (plus < 1) & (minus > 0) & (minus < 1)).all(1)
    assert inside.all()  # ν small: no direction is clipped
    np.testing.assert_allclose((plus + minus) / 2, np.tile(theta0, (16, 1)), atol=2e-6)
    deltas = (plus - minus) / (2 * nu)

    def reward(s):
        d = np.diag(np.array(s["P"]))
        return s["score"] - lam * float(d @ d)

    rp = np.array([reward(s) for s in es[0::2]])
    rm = np.array([reward(s) for s in es[1::2]])
    sigma = np.concatenate([rp, rm]).std()
    g = ((rp - rm)[:, None] * deltas).sum(0) / (16 * sigma) - 2 * lam * theta0 * np.array([1, 0, 1])
    want = np.clip(theta0 + lr * g, 0, 1)
    state = run.read_json("strategy_state.json")["es"]
    assert state["step"] == 1
    np.testing.assert_allclose(state["theta"], want, atol=1e-4)
    best = max(es, key=lambda s: (reward(s), -s["index"]))
    assert plan.info["sample"] == best["index"]
    assert (run.path / "samples.png").is_file()


def test_es_from_best_random_starts_at_the_best_random_sample(data, tmp_path):
    model = _compile()
    nu = 1e-3
    plan, run, samples = _search(model, data, tmp_path, "es", es_steps=1, directions=2, random_samples=5,
                                 noise=nu, init="best-random")
    rnd = [s for s in samples if s["kind"] == "random"]
    es = [s for s in samples if s["kind"] == "es"]
    assert len(rnd) == 5 and len(es) == 4
    best = max(rnd, key=lambda s: (s["score"], -s["index"]))
    tri = np.triu_indices(2)
    theta0 = np.array(best["P"])[tri]
    # θ0 ± ν δ_0 with δ_0 the step's first direction, drawn as the search draws it, clipped to [0, 1]
    delta = np.random.default_rng([0, 0xE5, 0]).standard_normal((2, 3))[0]
    np.testing.assert_allclose(np.array(es[0]["P"])[tri], np.clip(theta0 + nu * delta, 0, 1), atol=2e-6)
    np.testing.assert_allclose(np.array(es[1]["P"])[tri], np.clip(theta0 - nu * delta, 0, 1), atol=2e-6)


def test_short_train_proxy_scores_each_sample_by_a_short_training(data, tmp_path):
    model = _compile()
    plan, run, samples = _search(model, data, tmp_path, "random", samples=2, proxy="short-train", short_steps=3)
    assert len(samples) == 2 and all("distill_loss" not in s for s in samples)
    assert isinstance(plan, Plan) and plan.info["proxy"] == "short-train"
    with pytest.raises(MtcError, match="only the distillation proxy uses teachers"):
        _search(model, data, tmp_path / "x", "random", samples=1, proxy="short-train", baselines=str(tmp_path))
