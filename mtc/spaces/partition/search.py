"""The partition space's strategies: ``random`` (random P) and ``es`` (evolution strategies).

Both are outer loops (:meth:`~mtc.spaces.Strategy.search`): each candidate P becomes a plan
(:func:`~mtc.spaces.partition.plan_from_p`: the solver's masks per site) and is scored by the proxy
(:mod:`.proxy`: distillation or a short training).

``es`` follows Mania et al.'s basic random search as Newell et al. use it: θ is P's upper triangle
(diagonal included, N(N+1)/2 numbers in [0, 1]); each step draws ``directions`` Gaussian directions
δ_k and scores θ ± ν δ_k (clipped to [0, 1]): 2 × 16 = 32 evaluations per step; with ``top`` b > 0
only the b directions with the best max(r+, r-) count (V1-t). The update is

    θ ← clip(θ + α [ 1/(b σ_R) Σ_k (r+_k - r-_k) δ_k  -  2 λ θ_diag ], 0, 1)

with σ_R the standard deviation of the 2b rewards used, α = ``es_lr`` (0.1) and λ =
``diag_penalty``: the L2 penalty λ ||diag(P)||² on channel use, whose gradient is added to the
estimate (Newell et al.: "an additional L2 weight regularization term is added to the parameters on
the diagonal of P"). ``random_samples`` random P are scored first, for the Fig. 5 map; with
``init`` = ``best-random`` ES starts from the best of them (a warm start: the paper does not say
where its ES starts; the default is a random P of the seed).

Outputs: ``samples.jsonl`` (one line per scored P: its kind, step, P, mean channel use, proxy score
and per-task metrics), ``samples.png`` (the paper's Fig. 5: proxy score against mean channel use,
random samples grey, the ES samples over them coloured by step), and ``plan.json``: the best P's
plan (for ``es``: the highest ``score - λ ||diag(P)||²``; for ``random``: the highest score).
A resumed search reuses every sample already scored (``strategy_state.json``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.spaces import SearchHost, Strategy
from mtc.spaces.partition import plan_from_p
from mtc.spaces.partition.options import ES_OPTIONS, RANDOM_OPTIONS
from mtc.spaces.partition.solver import as_matrix, mean_use, random_p, symmetric

SAMPLES = "samples.jsonl"
WARM = "best-random"  # --init: start ES from the best random sample
FIGURE = "samples.png"


def best_sample(records: list[dict[str, Any]], value: Any = None) -> dict[str, Any]:
    """The record with the highest ``value(record)`` (default: its score); the earliest on a tie."""
    key = value or (lambda r: float(r["score"]))
    return max(records, key=lambda r: (key(r), -r["index"]))


def to_theta(p: np.ndarray) -> np.ndarray:
    """P's upper triangle, diagonal included (row-major)."""
    return np.asarray(p, dtype=np.float64)[np.triu_indices(p.shape[0])]


def from_theta(theta: np.ndarray, n: int) -> np.ndarray:
    """The symmetric P of an upper triangle (:func:`to_theta`)."""
    u = np.zeros((n, n))
    u[np.triu_indices(n)] = theta
    return symmetric(u)


def diag_mask(n: int) -> np.ndarray:
    """Which entries of θ are P's diagonal."""
    r, c = np.triu_indices(n)
    return r == c


def es_update(theta: np.ndarray, deltas: np.ndarray, r_plus: np.ndarray, r_minus: np.ndarray, *, lr: float,
              diag_penalty: float, top: int = 0) -> np.ndarray:
    """One step of Mania et al.'s random search with the L2 penalty on the diagonal (module docstring).

    Args:
        theta: ``[D]``; deltas: ``[K, D]``; r_plus, r_minus: ``[K]`` rewards of θ ± ν δ_k.
    """
    k = len(deltas)
    order = np.argsort(-np.maximum(r_plus, r_minus), kind="stable")
    use = order[: top] if 0 < top < k else order
    rs = np.concatenate([r_plus[use], r_minus[use]])
    sigma = float(rs.std())
    sigma = sigma if sigma > 1e-12 else 1.0
    g = ((r_plus[use] - r_minus[use])[:, None] * deltas[use]).sum(0) / (len(use) * sigma)
    n = int(round((np.sqrt(8 * len(theta) + 1) - 1) / 2))
    g = g - 2.0 * diag_penalty * theta * diag_mask(n)
    return np.clip(theta + lr * g, 0.0, 1.0)


class _PartitionSearch(Strategy):
    """What both strategies share: scoring a P, the samples file, the figure and the plan."""

    kind = "random"

    def search(self, host: SearchHost) -> Plan:
        self.host = host
        self.names = sg.task_names(self.model)
        self.n = len(self.names)
        o = self.opts
        self.check()  # bad options before any work or any file
        self.proxy: Any = None
        if o["proxy"] == "distill":
            from mtc.spaces.partition.proxy import Distiller

            self.proxy = Distiller(self.model, host.train, host.val, o, seed=host.seed, device=host.device,
                                   log=host.log)
        elif o["baselines"]:
            raise MtcError("--baselines: only the distillation proxy uses teachers (--proxy distill)")
        saved = host.state("samples") or []
        self.samples: list[dict[str, Any]] = list(saved)
        self.done = {s["key"]: s for s in self.samples}
        self.run_search()
        best = self.best()
        plan = plan_from_p(self.model, np.asarray(best["P"]), seed=host.seed, backward=str(o["backward_mask"]),
                           solver_iters=int(o["solver_iters"]),
                           info={"strategy": self.name, "proxy": o["proxy"], "score": best["score"],
                                 "sample": best["index"]})
        self._figure()
        host.log({"stage": "search-end", "best": best["index"], "score": best["score"],
                  "mean_use": best["mean_use"]})
        return plan

    def check(self) -> None:
        """Refuse bad options (one line) before the teachers are trained."""

    def run_search(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def objective(self, rec: dict[str, Any]) -> float:
        return float(rec["score"])

    def best(self) -> dict[str, Any]:
        if not self.samples:
            raise MtcError("the search scored no sample")
        return best_sample(self.samples, self.objective)

    def evaluate(self, p: np.ndarray, *, key: str, kind: str, step: int | None = None) -> dict[str, Any]:
        """Score one P (or return its score from a resumed run)."""
        if key in self.done:
            return self.done[key]
        o = self.opts
        plan = plan_from_p(self.model, p, seed=self.host.seed, backward=str(o["backward_mask"]),
                           solver_iters=int(o["solver_iters"]))
        if self.proxy is not None:
            res = self.proxy.score(plan)
        else:
            from mtc.spaces.partition.proxy import short_train_score

            res = short_train_score(self.host, plan, o, tag=f"short:{key}")
        rec = {"index": len(self.samples), "key": key, "kind": kind, "step": step, "P": np.round(p, 6).tolist(),
               "mean_use": round(mean_use(p), 6), "score": round(float(res["score"]), 6),
               "tasks": {t: {k: round(float(v), 6) for k, v in m.items()} for t, m in res["tasks"].items()},
               "channels": {c: {t: len(ch) for t, ch in per.items()} for c, per in plan.masks.items()}}
        if "distill_loss" in res:
            rec["distill_loss"] = res["distill_loss"]
        self.samples.append(rec)
        self.done[key] = rec
        self._write()
        self.host.log({"stage": "sample", **{k: rec[k] for k in ("index", "kind", "step", "mean_use", "score")}})
        return rec

    def _write(self) -> None:
        self.host.save_state("samples", self.samples)  # first: it makes the run directory
        path = self.host.file(SAMPLES)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "key"}) + "\n" for r in self.samples))
        tmp.replace(path)

    def _figure(self) -> None:
        try:
            from mtc.spaces.partition.plots import plot_samples
        except ImportError:  # matplotlib is optional: samples.jsonl is always written
            return
        plot_samples(self.host.file(FIGURE), self.samples, best=self.best()["index"])

    def random_samples(self, count: int, use: tuple[float, float]) -> None:
        for i in range(count):
            rng = np.random.default_rng([int(self.host.seed), 0x5A4D, i])
            self.evaluate(random_p(self.n, rng, use=use), key=f"random:{i}", kind="random")


class RandomSearch(_PartitionSearch):
    """Random P (Newell et al.'s map of the space), each scored by the proxy."""

    name = "random"
    help = "random P, each scored by distillation (the paper's Fig. 5 map)"
    options = RANDOM_OPTIONS

    def check(self) -> None:
        lo, hi = float(self.opts["use_min"]), float(self.opts["use_max"])
        if lo > hi:
            raise MtcError(f"--use-min {lo:g} is above --use-max {hi:g}")

    def run_search(self) -> None:
        self.random_samples(int(self.opts["samples"]), (float(self.opts["use_min"]), float(self.opts["use_max"])))


class EvolutionSearch(_PartitionSearch):
    """Evolution strategies over P (module docstring)."""

    name = "es"
    help = "evolution strategies over P with an L2 penalty on its diagonal"
    options = ES_OPTIONS

    def objective(self, rec: dict[str, Any]) -> float:
        d = np.diag(np.asarray(rec["P"]))
        return float(rec["score"]) - float(self.opts["diag_penalty"]) * float(d @ d)

    def best(self) -> dict[str, Any]:
        es = [r for r in self.samples if r["kind"] == "es"]
        if not es:
            return super().best()
        return best_sample(es, self.objective)

    def check(self) -> None:
        if str(self.opts["init"]) == WARM:
            if int(self.opts["random_samples"]) < 1:
                raise MtcError(f"--init {WARM} starts from the best of the --random-samples: give at least one")
        elif self.opts["init"]:
            as_matrix(str(self.opts["init"]), self.n, what="--init")

    def run_search(self) -> None:
        o = self.opts
        n = self.n
        self.random_samples(int(o["random_samples"]), (0.0, 1.0))
        if str(o["init"]) == WARM:
            theta = to_theta(np.asarray(best_sample([r for r in self.samples if r["kind"] == "random"])["P"]))
        elif o["init"]:
            theta = to_theta(as_matrix(str(o["init"]), n, what="--init"))
        else:
            theta = to_theta(random_p(n, np.random.default_rng([int(self.host.seed), 0x1E5])))
        state = self.host.state("es") or {}
        start = int(state.get("step", 0))
        if start:
            theta = np.asarray(state["theta"], dtype=np.float64)
        nu, k = float(o["noise"]), int(o["directions"])
        for step in range(start, int(o["es_steps"])):
            rng = np.random.default_rng([int(self.host.seed), 0xE5, step])
            deltas = rng.standard_normal((k, len(theta)))
            rp, rm = np.zeros(k), np.zeros(k)
            for j in range(k):
                for sign, r in ((1, rp), (-1, rm)):
                    p = from_theta(np.clip(theta + sign * nu * deltas[j], 0.0, 1.0), n)
                    rec = self.evaluate(p, key=f"es:{step}:{j}:{'+' if sign > 0 else '-'}", kind="es", step=step)
                    r[j] = self.objective(rec)
            theta = es_update(theta, deltas, rp, rm, lr=float(o["es_lr"]), diag_penalty=float(o["diag_penalty"]),
                              top=int(o["top"]))
            self.host.save_state("es", {"step": step + 1, "theta": theta.tolist()})
            self.host.log({"stage": "es-step", "step": step, "mean_use": round(float(np.mean(theta[diag_mask(n)])), 6),
                           "reward": round(float(np.mean(np.concatenate([rp, rm]))), 6)})
