"""The ``ecmt`` strategy: sandwich training with CI-KD (Algorithm 1), the accuracy predictor
(Algorithm 3), and the controllability figures (HV over drawn preferences, Algorithm 2's search
against random encoders, the marginal preference sweep).

One step of Algorithm 1 is one trainer update with ``b`` passes over the same batch (the trainer's
``Update.passes``): the largest network, the smallest, and ``b - 2`` random non-uniform ones. Each
pass adds its ground-truth task losses (L_co, weighted by ``--task-weights`` ρ_n) and backpropagates;
every child also adds ``λ / (b - 1) · MSE(ẑ, ẑ^(i))``, so the step's gradient is that of
``Σ L_co + λ L_kd`` with L_kd of Eq. 3; one optimiser step follows. ẑ is the encoder feature (the
tensor the heads read) averaged over its kept channels, detached for the largest network.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from mtc.errors import MtcError
from mtc.ir.plan import Plan
from mtc.spaces import OptimizerSpec, SearchHost, Stage, Strategy, Update
from mtc.spaces.slimmable import evolution as evo
from mtc.spaces.slimmable.config import WidthSpace
from mtc.spaces.slimmable.control import auto_reference, dirichlet_preferences, hypervolume, resolve_budget
from mtc.spaces.slimmable.cost import CostModel
from mtc.spaces.slimmable.lowering import (
    SlimControls,
    calibration_batches,
    controls_of,
    lower_supernet,
    norm_stats,
    recalibrate,
)
from mtc.spaces.slimmable.options import STRATEGY_OPTIONS
from mtc.spaces.slimmable.predictor import spearman, train_predictor
from mtc.spaces.slimmable.sites import feature_site

if TYPE_CHECKING:
    from mtc.lower.module import GraphModule

CONTROL = "controllability.json"
MEASURED = "measured"  # strategy state: measurements so far (a resumed search does not redo them)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinite floats as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def full_plan(space: WidthSpace, **info: Any) -> Plan:
    return space.to_plan(space.full(), info=info)


def bound_full(model: Any, space: WidthSpace) -> Any:
    """The supergraph bound at full width: the plain network the width groups were found on."""
    from mtc.spaces import bind_plan

    return bind_plan(model, full_plan(space))


def primary_metric(kind: str) -> tuple[str, bool]:
    """A task kind's first metric and whether higher is better."""
    from mtc.tasks.kinds import get_kind

    m = get_kind(kind).metrics[0]
    return m.name, m.higher_is_better


class Measurer:
    """Measures sub-networks of one supernet: configure, recalibrate BatchNorm, evaluate on val.

    Results are cached by configuration (and saved in the strategy state every few new ones, so a
    resumed search does not measure them again).
    """

    def __init__(self, host: SearchHost, module: GraphModule, space: WidthSpace, calib: list[torch.Tensor]) -> None:
        self.host = host
        self.module = module
        self.ws = space
        self.calib = calib
        self.stats = norm_stats(module.model)
        self.controls = controls_of(module)
        saved = host.state(MEASURED) or {}
        self.cache: dict[str, dict[str, Any]] = dict(saved)
        self._new = 0

    @staticmethod
    def key(cfg: np.ndarray) -> str:
        return ",".join(str(int(k)) for k in cfg)

    def __call__(self, cfg: np.ndarray) -> dict[str, Any]:
        k = self.key(cfg)
        if k not in self.cache:
            self.controls.capture = False
            self.controls.set(self.ws, cfg)
            recalibrate(self.module, self.stats, self.calib)
            scores = self.host.evaluate(self.module)
            self.cache[k] = {"losses": [float(scores[t]["loss"]) for t in self.ws.tasks], "metrics": scores}
            self._new += 1
            if self._new % 10 == 0:
                self.flush()
        return self.cache[k]

    def flush(self) -> None:
        self.host.save_state(MEASURED, self.cache)


class EcmtSearch(Strategy):
    """ECMT (Aich et al.): see the module docstring."""

    name = "ecmt"
    help = "ECMT: sandwich-rule supernet training with CI-KD, accuracy predictor, HV over preferences"
    options = STRATEGY_OPTIONS

    # ------------------------------------------------------------------ the supernet training
    def build(self, host: SearchHost) -> GraphModule:
        self.host = host
        o = self.opts
        self.ws = WidthSpace.of(self.model)
        self.module = lower_supernet(self.model, device=host.device)
        self.controls: SlimControls = controls_of(self.module)
        self.b = int(o["sandwich"])
        self.kd_weight = float(o["kd_weight"])
        self.has_feature = feature_site(self.model) is not None
        if self.kd_weight > 0 and not self.has_feature:
            raise MtcError("CI-KD needs the encoder feature (mtc.feature) in the supergraph; pass --kd-weight 0")
        self.reference = bound_full(self.model, self.ws)
        self.cost = CostModel(self.reference, self.ws)
        largest = self.cost.macs(self.ws.full())
        smallest = self.cost.macs(self.ws.smallest())
        self.budgets = [resolve_budget(b, largest) for b in o["budgets"]]
        for text, b in zip(o["budgets"], self.budgets, strict=True):
            if not smallest <= b <= largest:
                raise MtcError(f"--budgets: {text} ({b:,.0f} MACs) is outside the sub-networks' range "
                               f"({smallest:,} to {largest:,} MACs)")
        self._configs: list[np.ndarray] = []
        self._pass = 0
        self._z: torch.Tensor | None = None
        self._kd: list[float] = []
        return self.module

    def optimizers(self, module: GraphModule) -> list[OptimizerSpec]:
        o = self.opts
        params = {k: p for k, p in module.named_initializers().items() if isinstance(p, torch.nn.Parameter)}
        poly = float(o["poly"])
        return [OptimizerSpec("weights", params, float(o["lr"]), weight_decay=float(o["weight_decay"]),
                              poly_steps=int(o["steps"]) if poly > 0 else 0, poly_power=poly)]

    def sandwich(self, step: int) -> list[np.ndarray]:
        """The ``b`` configurations of one step: largest, smallest, ``b - 2`` random (seeded by step)."""
        rng = np.random.default_rng([self.host.seed, 0x5A4D, step])
        return [self.ws.full(), self.ws.smallest()] + [self.ws.random(rng) for _ in range(self.b - 2)]

    def _before(self, step: int) -> dict[str, Any]:
        self._configs = self.sandwich(step)
        return {}

    def _setup(self, i: int) -> None:
        self._pass = i
        self.controls.set(self.ws, self._configs[i])
        self.controls.capture = self.has_feature
        self.controls.feature = None

    def _passes(self, step: int) -> list[Any]:
        return [lambda i=i: self._setup(i) for i in range(self.b)]

    def _feature(self) -> torch.Tensor:
        f = self.controls.feature
        assert f is not None  # the feature's Slim node ran in this pass
        x, kept = f
        return x.sum(dim=1) / kept  # the channel average over the kept channels (Eq. 3's ẑ)

    def kd_term(self, step: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """CI-KD for the current pass: nothing for the largest network (its ẑ is kept, detached);
        ``λ / (b - 1) · MSE(ẑ, ẑ^(i))`` for child ``i``."""
        if not self.has_feature:
            return None, {}
        z = self._feature()
        if self._pass == 0:
            self._z = z.detach()
            self._kd = []
            return None, {}
        assert self._z is not None
        mse = F.mse_loss(z, self._z)
        self._kd.append(float(mse.detach()))
        rec = {"kd": sum(self._kd) / len(self._kd)}
        if self.kd_weight <= 0:
            return None, rec
        return (self.kd_weight / (self.b - 1)) * mse, rec

    def stages(self) -> list[Stage]:
        return [Stage("sandwich", int(self.opts["steps"]),
                      [Update("train", ("weights",), extra_loss=self.kd_term, passes=self._passes)], self._before)]

    def derive(self, module: GraphModule) -> Plan:
        return full_plan(self.ws, note="the supernet at full width; mtc export RUN --budget B --preference "
                                          "T=V,.. exports a sub-network")

    def eval_mode(self, module: GraphModule) -> None:
        # The end-of-search metrics are the largest network's, with its recalibrated statistics.
        self.controls.capture = False
        self.controls.set(self.ws, self.ws.full())
        recalibrate(module, norm_stats(module.model), self._calib())

    def _calib(self) -> list[torch.Tensor]:
        if not hasattr(self, "_calib_batches"):
            self._calib_batches = calibration_batches(
                self.host.train, self.host.tasks, batches=int(self.opts["calib_batches"]),
                batch_size=int(self.host.config.batch_size), seed=self.host.seed, device=self.host.device)
        return self._calib_batches

    # ------------------------------------------------------------------ after training
    def finish(self, host: SearchHost, module: GraphModule, plan: Plan) -> Plan:
        o = self.opts
        space, tasks = self.ws, self.ws.tasks
        measure = Measurer(host, module, space, self._calib())
        m = int(o["predictor_samples"])
        if m == 0:  # the supernet only: its extremes
            host.write_json(CONTROL, {"tasks": tasks, "ratios": list(space.ratios),
                                      "extremes": self._extremes(measure)})
            measure.flush()
            return plan
        if m < 2:
            raise MtcError("--predictor-samples: the predictor needs at least 2 sub-networks (or 0: none)")
        # Algorithm 3's data: every uniform width, then random non-uniform sub-networks.
        rng = np.random.default_rng([host.seed, 0xA3])
        configs = [space.full(k) for k in range(len(space.ratios))][:m]
        while len(configs) < m:
            configs.append(space.random(rng))
        losses = []
        for i, cfg in enumerate(configs):
            losses.append(measure(cfg)["losses"])
            if i % 20 == 0:
                host.log({"stage": "ecmt-predictor-data", "step": i, "of": m})
        measure.flush()
        y = np.asarray(losses, dtype=np.float64)
        x = np.stack([space.vector(c) for c in configs])
        order = np.random.default_rng([host.seed, 0xB0]).permutation(m)
        n_hold = min(m - 2, max(1, int(round(m * float(o["predictor_holdout"])))))
        hold, fit = order[:n_hold], order[n_hold:]
        predictor, curve = train_predictor(x[fit], y[fit], tasks, epochs=int(o["predictor_epochs"]),
                                           lr=float(o["predictor_lr"]), batch_size=int(o["predictor_batch"]),
                                           seed=host.seed)
        pred_hold = predictor(x[hold])
        rank = {t: spearman(pred_hold[:, j], y[hold, j]) for j, t in enumerate(tasks)}
        l1 = {t: float(np.mean(np.abs(pred_hold[:, j] - y[hold, j]))) for j, t in enumerate(tasks)}
        predictor.save(host.file("."), {"choices": [c.name for c in space.choices], "ratios": list(space.ratios),
                                        "samples": m, "train": int(len(fit)), "holdout": int(len(hold)),
                                        "holdout_spearman": rank, "holdout_l1": l1, "train_curve": curve})
        host.log({"stage": "ecmt-predictor", "step": m, "holdout_spearman": rank, "holdout_l1": l1})

        def predict(cfgs: np.ndarray) -> np.ndarray:
            return predictor(np.stack([space.vector(c) for c in cfgs]))

        ref = list(auto_reference(y)) if o["hv_ref"] == "auto" else list(o["hv_ref"])
        if len(ref) != len(tasks):
            raise MtcError(f"--hv-ref: {len(ref)} values for {len(tasks)} tasks")
        report = self._controllability(host, measure, predict, ref, y)
        report["predictor"] = {"samples": m, "holdout": int(len(hold)), "holdout_spearman": rank,
                               "holdout_l1": l1}
        report["extremes"] = self._extremes(measure)
        measure.flush()
        host.write_json(CONTROL, json_safe(report))
        try:
            from mtc.spaces.slimmable.plots import plot_controllability, plot_marginal, plot_predictor

            plot_controllability(host.file("controllability.png"), report, tasks)
            plot_marginal(host.file("marginal.png"), report, tasks)
            plot_predictor(host.file("predictor.png"), pred_hold, y[hold], tasks, rank)
        except ImportError:  # matplotlib is optional: the JSON is always written
            pass
        return plan

    def _extremes(self, measure: Measurer) -> dict[str, Any]:
        space = self.ws
        return {"largest": measure(space.full())["metrics"], "smallest": measure(space.smallest())["metrics"],
                "macs": {"largest": self.cost.macs(space.full()), "smallest": self.cost.macs(space.smallest())}}

    def _controllability(self, host: SearchHost, measure: Measurer, predict: Any, ref: list[float],
                         y: np.ndarray) -> dict[str, Any]:
        o = self.opts
        space, tasks = self.ws, self.ws.tasks
        prefs = dirichlet_preferences(len(tasks), int(o["preferences"]), float(o["alpha"]), host.seed)
        budgets = []
        for bi, (text, budget) in enumerate(zip(o["budgets"], self.budgets, strict=True)):
            rows: list[dict[str, Any]] = []
            for pi, tau in enumerate(prefs):
                rng = np.random.default_rng([host.seed, 0xE5, bi, pi])
                res = evo.search(space, tau, budget, self.cost.macs, predict, rng, pool=int(o["pool"]),
                                 cycles=int(o["cycles"]), groups=int(o["mutate"]), eta=float(o["eta"]))
                rand = evo.random_encoder(space, tau, budget, self.cost.macs, rng)
                got, got_r = measure(res.config), measure(rand)
                rows.append({
                    "preference": [float(v) for v in tau],
                    "decoders": [space.ratios[int(k)] for k in res.decoders.indices],
                    "decoder_cap": None if res.decoders.cap is None else space.ratios[res.decoders.cap],
                    "ecmt": {"ratios": space.vector(res.config).tolist(), "macs": res.macs,
                             "predicted": res.predicted.tolist(), "losses": got["losses"], "metrics": got["metrics"]},
                    "random": {"ratios": space.vector(rand).tolist(), "macs": self.cost.macs(rand),
                               "predicted": predict(rand[None])[0].tolist(), "losses": got_r["losses"],
                               "metrics": got_r["metrics"]},
                })
            host.log({"stage": "ecmt-hv", "step": bi, "budget": budget})
            pts = np.array([r["ecmt"]["losses"] for r in rows])
            pts_r = np.array([r["random"]["losses"] for r in rows])
            pref_i = [int(np.argmax(r["preference"])) for r in rows]

            def mean_pref(key: str, field: str, rows: list[dict[str, Any]] = rows,
                          pref_i: list[int] = pref_i) -> float:
                return float(np.mean([r[key][field][i] for r, i in zip(rows, pref_i, strict=True)]))

            budgets.append({
                "budget": text, "macs": budget, "hv": hypervolume(pts, ref), "hv_random": hypervolume(pts_r, ref),
                "preferred_loss": {"ecmt": {"predicted": mean_pref("ecmt", "predicted"),
                                            "measured": mean_pref("ecmt", "losses")},
                                   "random": {"predicted": mean_pref("random", "predicted"),
                                              "measured": mean_pref("random", "losses")}},
                "fits": all(r["ecmt"]["macs"] <= budget and r["random"]["macs"] <= budget for r in rows),
                "rows": rows})
        sweep = self._sweep(host, measure, predict)
        return {"tasks": tasks, "ratios": list(space.ratios), "choices": [c.name for c in space.choices],
                "reference_point": ref, "reference": "auto: 1.1 x the largest loss per task among the predictor's "
                "sub-networks" if o["hv_ref"] == "auto" else "given (--hv-ref)",
                "preferences": {"count": len(prefs), "alpha": float(o["alpha"])},
                "cost": "MACs per sample of the sliced network (mtc.ir.cost)",
                "budgets": budgets, "sweep": sweep}

    def _sweep(self, host: SearchHost, measure: Measurer, predict: Any) -> dict[str, Any]:
        """Fig. 7: each task's preference on a grid, the others random; the decoders by Eq. 4 with the
        largest and the smallest encoder, and at the first budget with Algorithm 2's encoder."""
        o = self.opts
        space, tasks = self.ws, self.ws.tasks
        levels = np.linspace(0.0, 1.0, int(o["sweep_levels"]))
        kinds = {t.name: t.kind for t in host.tasks}
        out: dict[str, Any] = {"levels": levels.tolist(), "budget": self.budgets[0], "tasks": {}}
        for ti, t in enumerate(tasks):
            metric, higher = primary_metric(kinds[t])
            runs: dict[str, list[dict[str, Any]]] = {"largest": [], "smallest": [], "searched": []}
            for li, level in enumerate(levels):
                for r in range(int(o["sweep_repeats"])):
                    rng = np.random.default_rng([host.seed, 0x57, ti, li, r])
                    tau = rng.uniform(0.0, 1.0, len(tasks))
                    tau[ti] = level
                    dec = evo.decoder_indices(space, tau)
                    cfgs = {"largest": evo.with_decoders(space, space.top, dec),
                            "smallest": evo.with_decoders(space, 0, dec)}
                    res = evo.search(space, tau, self.budgets[0], self.cost.macs, predict, rng,
                                     pool=int(o["pool"]), cycles=int(o["cycles"]), groups=int(o["mutate"]),
                                     eta=float(o["eta"]))
                    cfgs["searched"] = res.config
                    for name, cfg in cfgs.items():
                        got = measure(cfg)
                        runs[name].append({"level": float(level), "preference": tau.tolist(),
                                           "decoder": space.ratios[int(dec[ti])] if name != "searched"
                                           else space.ratios[int(res.decoders.indices[ti])],
                                           "loss": got["losses"][ti], "metric": got["metrics"][t][metric],
                                           "macs": self.cost.macs(cfg)})
            entry: dict[str, Any] = {"metric": metric, "higher_is_better": higher}
            for name, rows in runs.items():
                lv = np.array([r["level"] for r in rows])
                sign = 1.0 if higher else -1.0
                entry[name] = {
                    "spearman_metric": spearman(lv, sign * np.array([r["metric"] for r in rows])),
                    "spearman_loss": spearman(lv, np.array([r["loss"] for r in rows])),
                    "spearman_decoder": spearman(lv, np.array([r["decoder"] for r in rows])),
                    "mean_loss": [float(np.mean([r["loss"] for r in rows if r["level"] == v])) for v in levels],
                    "mean_metric": [float(np.mean([r["metric"] for r in rows if r["level"] == v])) for v in levels],
                    "rows": rows}
            out["tasks"][t] = entry
            host.log({"stage": "ecmt-sweep", "step": ti, "task": t})
        return out


def describe(space: WidthSpace, cost: CostModel) -> str:
    lo, hi = cost.macs(space.smallest()), cost.macs(space.full())
    n_dec = {t: len(v) for t, v in space.decoders.items()}
    return (f"{len(space.encoder)} encoder and {sum(n_dec.values())} decoder width choices "
            f"({', '.join(f'{t} {n}' for t, n in n_dec.items())}), ratios {', '.join(f'{r:g}' for r in space.ratios)}; "
            f"sub-networks from {lo:,} to {hi:,} MACs ({100 * lo / max(1, hi):.0f}% to 100%)")
