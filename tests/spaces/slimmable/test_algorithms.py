"""ECMT's equations and algorithms against oracles computed here: Eq. 4 and Eq. 5 by hand, Algorithm
2's invariants (every model of the pool within the budget, a higher preference never a narrower
decoder), Algorithm 3's shapes, and the hypervolume of a hand-computed 2-D front."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtc.errors import MtcError
from mtc.passes.prune import width_count
from mtc.spaces.slimmable import evolution as evo
from mtc.spaces.slimmable.config import DECODER, ENCODER, WidthChoice, WidthSpace
from mtc.spaces.slimmable.control import auto_reference, dirichlet_preferences, hypervolume, resolve_budget
from mtc.spaces.slimmable.options import DEFAULT_RATIOS, parse_macs, parse_preference, parse_ratios
from mtc.spaces.slimmable.predictor import AccuracyPredictor, spearman, train_predictor


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small convolutions: one intra-op thread beats two when the cores are shared (and is no
    slower on a dedicated machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


RATIOS = DEFAULT_RATIOS  # 0.3 .. 1.0


def _space(enc: int = 4, dec: int = 2, tasks=("a", "b", "c"), size: int = 20) -> WidthSpace:
    choices = [WidthChoice(f"e{i}", size, ENCODER, None, tuple(width_count(size, r) for r in RATIOS))
               for i in range(enc)]
    for t in tasks:
        choices += [WidthChoice(f"{t}{i}", size, DECODER, t, tuple(width_count(size, r) for r in RATIOS))
                    for i in range(dec)]
    return WidthSpace(RATIOS, choices, list(tasks))


def _cost(space: WidthSpace):
    """A stand-in cost: sum of the squared kept counts (monotone in every width, like MACs)."""
    def cost(cfg: np.ndarray) -> int:
        return int(sum(c.counts[int(k)] ** 2 for c, k in zip(space.choices, cfg, strict=True)))
    return cost


# --------------------------------------------------------------------------------------- parsing
def test_width_lists_ranges_and_errors():
    assert parse_ratios("0.3:1.0:0.1") == RATIOS
    assert parse_ratios("1.0, 0.5,0.5") == (0.5, 1.0)
    for bad, msg in (("", "empty"), ("0,0.5", "outside"), ("0.5,1.2", "outside"), ("a,b", "not a comma")):
        with pytest.raises(ValueError, match=msg):
            parse_ratios(bad)


def test_budgets_and_preferences_parse():
    assert parse_macs("0.6GMAC") == pytest.approx(0.6e9)
    assert parse_macs("600M") == 600e6 and parse_macs("2.5MMACs") == 2.5e6 and parse_macs("1e3") == 1000
    with pytest.raises(MtcError, match="not a MAC count"):
        parse_macs("lots")
    assert parse_preference("seg=0.8,depth=0.2", ["seg", "depth", "normal"]) == {"seg": 0.8, "depth": 0.2,
                                                                                 "normal": 0.0}
    with pytest.raises(MtcError, match="'edge' is not a task"):
        parse_preference("edge=1", ["seg", "depth"])
    with pytest.raises(MtcError, match="finite number >= 0"):
        parse_preference("seg=-0.1", ["seg", "depth"])


def test_strategy_options_survive_config_json_so_resume_accepts_them():
    """``mtc search --resume`` compares the options with config.json: each value, default or parsed
    from the command line, must read back from JSON as itself (a tuple reads back as a list)."""
    import json

    from mtc.spaces import resolve_options
    from mtc.spaces.slimmable.options import STRATEGY_OPTIONS
    from mtc.train.run import differing

    for given in ({}, {"budgets": "40%,2.5e6", "hv_ref": "2,3.5"}):
        opts = resolve_options(STRATEGY_OPTIONS, given, what="ecmt")
        assert differing(json.loads(json.dumps(opts)), opts) == [], given
    assert resolve_options(STRATEGY_OPTIONS, {"hv_ref": "2,3.5"}, what="ecmt")["hv_ref"] == [2.0, 3.5]


def test_width_count_rounds_like_the_pruner():
    assert [width_count(16, r) for r in RATIOS] == [5, 6, 8, 10, 11, 13, 14, 16]  # round(16 r), halves up
    assert width_count(64, 0.3, 8) == 16  # 19.2 -> 19 -> nearest multiple of 8
    assert width_count(5, 0.3, 8) == 5  # smaller than round_to: whole
    assert width_count(3, 0.1) == 1


# ----------------------------------------------------------------------------------------- Eq. 4
def test_eq4_recomputed_on_min_max_normalised_preferences():
    # τ = (0.8, 0.2): normalised (1, 0) -> ω = (1.0, 0.3)
    np.testing.assert_allclose(evo.eq4([0.8, 0.2], RATIOS), [1.0, 0.3])
    # τ = (0.1, 0.4, 0.9): normalised (0, 0.375, 1) -> 0.3 + 0.7 * 0.375 = 0.5625 -> nearest ratio 0.6
    np.testing.assert_allclose(evo.eq4([0.1, 0.4, 0.9], RATIOS), [0.3, 0.5625, 1.0])
    space = _space()
    assert [space.ratios[k] for k in evo.decoder_indices(space, [0.1, 0.4, 0.9])] == [0.3, 0.6, 1.0]
    # all equal: every task is the most preferred
    np.testing.assert_allclose(evo.eq4([0.3, 0.3, 0.3], (0.6, 0.8, 1.0)), [1.0, 1.0, 1.0])
    # the sum need not be 1 (the paper: any value in [0, 1] per task)
    np.testing.assert_allclose(evo.eq4([0.5, 1.0, 0.0], (0.5, 1.0)), [0.75, 1.0, 0.5])


def test_a_higher_preference_never_gives_a_narrower_decoder_at_a_fixed_budget():
    space = _space()
    cost = _cost(space)
    lo, hi = cost(space.smallest()), cost(space.full())
    rng = np.random.default_rng(0)
    for _ in range(150):
        budget = float(rng.uniform(lo, hi))
        tau = rng.uniform(0, 1, 3)
        i = int(rng.integers(3))
        before = evo.set_decoders(space, tau, cost, budget)
        for bump in (0.05, 0.2, 0.6):
            t2 = tau.copy()
            t2[i] = min(1.0, t2[i] + bump)
            after = evo.set_decoders(space, t2, cost, budget)
            assert after.indices[i] >= before.indices[i], (budget, tau, i, bump)
            assert cost(evo.with_decoders(space, 0, after.indices)) <= budget


# ----------------------------------------------------------------------------------------- Eq. 5
def test_eq5_moves_k_encoder_groups_by_eta_towards_the_budget():
    space = _space(enc=6)
    cost = _cost(space)
    cfg = evo.with_decoders(space, 2, [3, 3, 3])  # every encoder group at 0.5
    rng = np.random.default_rng(1)
    budget = cost(space.full())
    new, moved = evo.mutate(space, cfg, cost, budget, rng, groups=2, eta=0.1)
    assert len(moved) == 2 and set(moved) <= set(space.encoder.tolist())
    for g in range(len(space)):
        # sign(F_user - F) = +1: each moved group goes 0.5 -> 0.6, nothing else changes
        want = RATIOS[2] + 0.1 if g in moved else RATIOS[cfg[g]]
        assert space.ratios[new[g]] == pytest.approx(want)
    # η = 0.2: two grid steps
    new2, moved2 = evo.mutate(space, cfg, cost, budget, rng, groups=1, eta=0.2)
    assert space.ratios[new2[moved2[0]]] == pytest.approx(0.7)
    # at the budget, sign(F_user - F) = 0: nothing moves
    same, none = evo.mutate(space, cfg, cost, cost(cfg), rng, groups=3)
    assert none == [] and np.array_equal(same, cfg)
    # a move that would leave the budget is not made
    tight = cost(cfg) + 1
    kept, moved3 = evo.mutate(space, cfg, cost, tight, rng, groups=3)
    assert moved3 == [] and np.array_equal(kept, cfg)


def test_algorithm_2_keeps_every_model_within_the_budget_and_returns_the_best_predicted():
    space = _space()
    cost = _cost(space)
    lo, hi = cost(space.smallest()), cost(space.full())
    seen: list[np.ndarray] = []

    def predict(cfgs: np.ndarray) -> np.ndarray:
        seen.extend(cfgs)
        r = np.asarray(space.ratios)[cfgs]
        enc = r[:, space.encoder].mean(1, keepdims=True)
        return np.concatenate([1.0 - enc * r[:, space.decoders[t]].mean(1, keepdims=True) for t in space.tasks], 1)

    rng = np.random.default_rng(3)
    for budget in np.linspace(lo, hi, 6):
        seen.clear()
        res = evo.search(space, [0.2, 0.9, 0.5], budget, cost, predict, rng, pool=12, cycles=15)
        assert len(seen) == 12 + 15  # the pool, then one mutant per cycle, each scored once
        assert all(cost(c) <= budget for c in seen)
        assert res.macs == cost(res.config) <= budget and res.preferred == 1
        # the decoders are Eq. 4's (capped only when the budget forces it)
        assert np.array_equal(res.config[space.decoders["b"]], np.full(2, res.decoders.indices[1]))
        # the returned model is the pool's best on the preferred task (the predictor's lowest loss)
        assert res.predicted[1] <= predict(res.config[None])[0, 1] + 1e-12
    with pytest.raises(MtcError, match="below the smallest sub-network.*to"):
        evo.search(space, [1, 0, 0], lo - 1, cost, predict, rng)
    with pytest.raises(MtcError, match="above the largest sub-network"):
        evo.search(space, [1, 0, 0], hi + 1, cost, predict, rng)


def test_evolution_improves_on_the_pool_it_starts_from():
    space = _space(enc=8)
    cost = _cost(space)
    budget = 0.6 * cost(space.full())
    w = np.linspace(1, 3, 8)  # some encoder groups matter more than others

    def predict(cfgs: np.ndarray) -> np.ndarray:
        r = np.asarray(space.ratios)[cfgs][:, space.encoder]
        return np.repeat(-(r * w).sum(1, keepdims=True), 3, axis=1)

    # the pool holds the widest uniform encoder that fits; Eq. 5 grows groups into the slack left
    start = evo.search(space, [1, 1, 1], budget, cost, predict, np.random.default_rng(0), pool=1, cycles=0)
    end = evo.search(space, [1, 1, 1], budget, cost, predict, np.random.default_rng(0), pool=1, cycles=30)
    assert len(set(start.config[space.encoder].tolist())) == 1
    assert end.predicted[0] < start.predicted[0] and end.macs <= budget


# ------------------------------------------------------------------------------------- predictor
def test_predictor_is_algorithm_3():
    net = AccuracyPredictor(7, ["seg", "depth"])
    layers = [m for m in net.model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(7, 100), (100, 100), (100, 50)]
    assert [type(m).__name__ for m in net.model] == ["Linear", "ReLU"] * 3
    assert {t: (h.in_features, h.out_features) for t, h in net.heads.items()} == {"seg": (50, 1), "depth": (50, 1)}
    out = net(torch.rand(5, 7))
    assert set(out) == {"seg", "depth"} and all(v.shape == (5,) for v in out.values())


def test_predictor_learns_a_ranking_of_width_vectors():
    rng = np.random.default_rng(0)
    x = rng.choice(RATIOS, size=(120, 6)).astype(np.float32)
    y = np.stack([2.0 - x[:, :4].mean(1) - 0.5 * x[:, 4], 0.3 - 0.1 * x.mean(1) - 0.1 * x[:, 5]], 1)
    pred, curve = train_predictor(x[:80], y[:80], ["a", "b"], epochs=40, seed=0)
    assert curve[-1] < curve[0]
    p = pred(x[80:])
    assert p.shape == (40, 2)
    assert spearman(p[:, 0], y[80:, 0]) > 0.8 and spearman(p[:, 1], y[80:, 1]) > 0.8


# -------------------------------------------------------------------------------------------- HV
def test_hypervolume_of_a_hand_computed_front():
    front = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    # the union of [1,4]x[3,4], [2,4]x[2,4], [3,4]x[1,4]: columns of heights 1, 2, 3
    assert hypervolume(front, [4.0, 4.0]) == pytest.approx(6.0)
    # a dominated point adds nothing, a point beyond the reference neither
    more = np.vstack([front, [[2.5, 2.5], [0.5, 5.0]]])
    assert hypervolume(more, [4.0, 4.0]) == pytest.approx(6.0)
    assert hypervolume(np.array([[1.0, 1.0]]), [2.0, 3.0]) == pytest.approx(2.0)
    assert hypervolume(np.array([[5.0, 5.0]]), [4.0, 4.0]) == 0.0


def test_preferences_reference_point_and_budgets():
    p = dirichlet_preferences(3, 20, 0.2, seed=0)
    assert p.shape == (20, 3) and np.allclose(p.sum(1), 1) and (p >= 0).all()
    assert np.array_equal(p, dirichlet_preferences(3, 20, 0.2, seed=0))
    assert auto_reference(np.array([[1.0, 2.0], [3.0, 0.5]])) == pytest.approx([3.3, 2.2])
    assert resolve_budget("50%", 1000) == 500 and resolve_budget("2KMAC", 10) == 2000
