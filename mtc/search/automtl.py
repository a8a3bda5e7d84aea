"""AutoMTL's policy search pieces (paper section 5): the regulariser, the temperature schedule,
deriving a discrete policy, and the task-correlation matrix.

Notation follows the paper: L VCNs at depths l = 1..L (topological order), N tasks, per task and
VCN a distribution π over (shared, specific, skip).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtc.errors import MtcError
from mtc.ir.supergraph import OPTIONS, Policy

#: AutoMTL Table 1 defaults (NYUv2 / CityScapes rows) and section 5.
DEFAULTS = {
    "weight_lr": 1e-3,
    "policy_lr": 1e-2,
    "lr_decay": 0.5,
    "lr_decay_every": 4000,
    "lambda_reg": 1e-3,
    "tau0": 5.0,
}

#: Policy-logit updates behind Table 1's λ_reg: 20,000 policy-train iterations (section 6.1), of
#: which the authors' implementation spends 100 of every 500 on the policy (the rest on weights).
#: See :meth:`SearchOptions.effective_lambda_reg`.
PAPER_POLICY_STEPS = 4_000
LAMBDA_REG_SCALINGS = ("budget", "none")


def distributions(logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """π per VCN: softmax of its ``[tasks, 3]`` logits."""
    return {v: F.softmax(t, dim=-1) for v, t in logits.items()}


def policy_regularizer(logits: Mapping[str, torch.Tensor], depths: Mapping[str, int]) -> torch.Tensor:
    """AutoMTL Eq. 3: Σ_i Σ_l (L − l)/L [softplus(P'(1) − P'(0)) + softplus(P'(2) − P'(0))].

    ``P'`` is evaluated as the policy distribution π (the softmax of the logits), the quantity the
    Gumbel samples are drawn from; bottom VCNs (small l) weigh most, so sharing is pushed there.

    Args:
        logits: VCN name -> ``[tasks, 3]`` logits.
        depths: VCN name -> depth l (1-based); L is the largest depth.
    """
    if not logits:
        raise MtcError("the supergraph has no VCNs: nothing to regularise")
    big_l = max(depths[v] for v in logits)
    total: torch.Tensor | None = None
    for v, t in logits.items():
        p = F.softmax(t, dim=-1)
        term = F.softplus(p[:, 1] - p[:, 0]) + F.softplus(p[:, 2] - p[:, 0])
        w = (big_l - depths[v]) / big_l
        contrib = w * term.sum()
        total = contrib if total is None else total + contrib
    assert total is not None
    return total


@dataclass(frozen=True)
class TauSchedule:
    """Gumbel-softmax temperature: τ0 = 5 (paper) annealed geometrically toward ``tau_min``.

    τ(s) = max(tau_min, τ0 · decay^s) for policy-train step s. The default decay brings τ from 5 to
    about 0.5 over ``steps`` steps, so late samples are close to one-hot.
    """

    tau0: float = 5.0
    tau_min: float = 0.1
    decay: float | None = None
    steps: int = 1000

    def __call__(self, step: int) -> float:
        decay = self.decay if self.decay is not None else (0.1) ** (1.0 / max(1, self.steps))
        return max(self.tau_min, self.tau0 * decay ** step)


def derive_policy(logits: Mapping[str, torch.Tensor], tasks: list[str]) -> Policy:
    """The most probable option per task and VCN (deterministic)."""
    return Policy({v: {t: int(i) for t, i in zip(tasks, torch.argmax(x, dim=-1).tolist(), strict=True)}
                   for v, x in logits.items()})


def sample_policy(logits: Mapping[str, torch.Tensor], tasks: list[str], generator: torch.Generator) -> Policy:
    """One policy drawn from π (for ``--sample K``)."""
    out: dict[str, dict[str, int]] = {}
    for v, x in logits.items():
        p = F.softmax(x.detach().float(), dim=-1)
        idx = torch.multinomial(p, 1, generator=generator).squeeze(-1).tolist()
        out[v] = {t: int(i) for t, i in zip(tasks, idx, strict=True)}
    return Policy(out)


def task_correlation(logits: Mapping[str, torch.Tensor], tasks: list[str]) -> np.ndarray:
    """Cosine similarity of the tasks' policies (AutoMTL Appendix D): each task's π over all VCNs
    flattened into one vector; entry (i, j) compares tasks i and j."""
    vecs = torch.stack([torch.cat([F.softmax(x.detach().float(), -1)[i] for x in logits.values()])
                        for i in range(len(tasks))])
    vecs = F.normalize(vecs, dim=-1)
    return (vecs @ vecs.T).numpy()


def policy_json(logits: Mapping[str, torch.Tensor], tasks: list[str], chosen: Policy) -> dict:
    """``policy.json``: per task, per VCN, the distribution π and the chosen option."""
    pis = distributions({v: x.detach().float() for v, x in logits.items()})
    return {
        "options": list(OPTIONS),
        "tasks": {
            t: {v: {"pi": [round(float(p), 6) for p in pis[v][i].tolist()],
                    "chosen": OPTIONS[chosen.choices[v][t]]}
                for v in logits}
            for i, t in enumerate(tasks)
        },
    }


def sharing_fraction(policy: Policy, a: str, b: str) -> float:
    """Fraction of VCNs where tasks ``a`` and ``b`` both choose the shared operator."""
    n = len(policy.choices)
    return sum(1 for per in policy.choices.values() if per[a] == 0 and per[b] == 0) / n if n else math.nan


# ------------------------------------------------------------------------------------------------
# The search driver: pre-train, then policy-train (weights and policy alternately).


@dataclass
class SearchOptions:
    """Every constant of the search; defaults follow AutoMTL (Table 1, section 5) where it gives one.

    Step counts default to a small CPU budget (the paper used 10,000 + 20,000 iterations).
    """

    pretrain_steps: int = 200
    policy_steps: int = 400
    batch_size: int = 8
    weight_lr: float = DEFAULTS["weight_lr"]
    policy_lr: float = DEFAULTS["policy_lr"]
    lr_decay: float = DEFAULTS["lr_decay"]
    lr_decay_every: int = int(DEFAULTS["lr_decay_every"])
    lambda_reg: float = DEFAULTS["lambda_reg"]
    lambda_reg_scaling: str = "budget"  # or "none"; see effective_lambda_reg
    task_weights: dict[str, float] | None = None
    tau0: float = DEFAULTS["tau0"]
    tau_min: float = 0.1
    tau_decay: float | None = None
    hard: bool = False
    policy_fraction: float = 0.5  # the share of the training data kept for the policy (train2)
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    sample: int = 0  # --sample K: draw K policies and keep the best on validation
    eval_batches: int = 4
    amp: bool = False  # bfloat16 autocast on CUDA

    def __post_init__(self) -> None:
        if self.lambda_reg_scaling not in LAMBDA_REG_SCALINGS:
            raise MtcError(f"unknown λ_reg scaling '{self.lambda_reg_scaling}' (expected "
                           f"{' or '.join(LAMBDA_REG_SCALINGS)})")
        if self.lambda_reg < 0:
            raise MtcError(f"--lambda-reg must be >= 0, got {self.lambda_reg}")

    def effective_lambda_reg(self) -> float:
        """The weight of L_reg per policy step.

        ``budget`` (default): ``λ_reg · 4,000 / policy_steps``. The logits train with Adam, whose
        steps are normalised by the gradient's RMS, which the noisy task losses dominate; the
        regulariser's steady gradient therefore moves the logits in proportion to λ_reg times the
        number of policy updates. Table 1's λ_reg was used over about 4,000 policy updates
        (``PAPER_POLICY_STEPS``), so a shorter search gets the same total pull from a
        proportionally larger weight (at the default 400 steps, 0.01). Without it, the paper's 0.001
        over 400 steps changes no choice at all (docs/search.md). ``none``: λ_reg as given.
        """
        if self.lambda_reg_scaling == "none":
            return self.lambda_reg
        return self.lambda_reg * PAPER_POLICY_STEPS / max(1, self.policy_steps)


def run_search(run: Any, model: Any, train: Any, val: Any, opts: SearchOptions, *, device: str = "cpu",
               resume: bool = False, progress: bool = True, stop_after: int | None = None) -> Policy:
    """AutoMTL stages 1 and 2 on supergraph ``model``; writes policy.json, plots and checkpoints.

    ``stop_after`` ends the process-equivalent early after that many global steps (tests use it to
    simulate a kill between checkpoints).
    """
    import time

    from mtc.ir import supergraph as sg
    from mtc.lower.supergraph import lower_supergraph, policy_parameters, set_mode
    from mtc.train.loop import Batcher, check_finite, evaluate, step_seed, task_losses
    from mtc.train.loop import autocast_forward as _forward

    amp = opts.amp
    tasks = sg.tasks_of(model) or []
    names = [t.name for t in tasks]
    depths = {v.name: v.depth for v in sg.vcns_of(model)}
    weights = {t: (opts.task_weights or {}).get(t, 1.0) for t in names}
    module = lower_supergraph(model, mode="warmup", tau=opts.tau0, hard=opts.hard, device=device)
    logits = policy_parameters(module)
    logit_ids = {id(p) for p in logits.values()}
    weight_params = [p for p in module.parameters() if id(p) not in logit_ids]
    opt_w = torch.optim.Adam(weight_params, lr=opts.weight_lr)
    opt_p = torch.optim.Adam(list(logits.values()), lr=opts.policy_lr)
    sched = torch.optim.lr_scheduler.StepLR(opt_w, step_size=opts.lr_decay_every, gamma=opts.lr_decay)
    lambda_reg = opts.effective_lambda_reg()
    tau = TauSchedule(opts.tau0, opts.tau_min, opts.tau_decay, max(1, opts.policy_steps))

    # AutoMTL's train1/train2: the weights and the policy learn from disjoint parts of the data.
    n = len(train)
    perm = np.random.default_rng([opts.seed, 7]).permutation(n)
    cut = max(1, min(n - 1, int(round(n * (1 - opts.policy_fraction)))))
    from torch.utils.data import Subset

    train1, train2 = Subset(train, perm[:cut].tolist()), Subset(train, perm[cut:].tolist())
    b_all = Batcher(train, tasks, opts.batch_size, opts.seed, "pretrain")
    b1 = Batcher(train1, tasks, opts.batch_size, opts.seed, "weights")
    b2 = Batcher(train2, tasks, opts.batch_size, opts.seed, "policy")

    total = opts.pretrain_steps + opts.policy_steps
    g = 0  # global step
    if resume and run.has_checkpoint("search"):
        state = run.load_checkpoint("search")
        module.load_state_dict(state["module"])
        opt_w.load_state_dict(state["opt_w"])
        opt_p.load_state_dict(state["opt_p"])
        sched.load_state_dict(state["sched"])
        g = int(state["step"])
        run.truncate_log("pretrain" if g <= opts.pretrain_steps else "policy",
                         g if g <= opts.pretrain_steps else g - opts.pretrain_steps)

    def checkpoint() -> None:
        run.save_checkpoint("search", {"module": module.state_dict(), "opt_w": opt_w.state_dict(),
                                       "opt_p": opt_p.state_dict(), "sched": sched.state_dict(), "step": g})

    bar = _progress(progress, total, g)
    t0 = time.perf_counter()
    module.train()
    while g < total:
        if stop_after is not None and g >= stop_after:
            if bar is not None:
                bar.stop()
            return derive_policy(logits, names)  # simulated kill: nothing more is written
        torch.manual_seed(step_seed(opts.seed, "search", g))
        if g < opts.pretrain_steps:
            stage, s = "pretrain", g
            set_mode(module, "warmup")
            images, targets = b_all.batch(s, device)
            losses = task_losses(_forward(module, images, amp), targets, tasks)
            check_finite(losses, stage, s)
            loss = torch.stack([weights[k] * v for k, v in losses.items()]).sum()
            opt_w.zero_grad(set_to_none=True)
            loss.backward()
            opt_w.step()
            sched.step()
            record: dict[str, Any] = {"stage": stage, "step": s,
                                      "loss": {k: float(v.detach()) for k, v in losses.items()}}
        else:
            stage, s = "policy", g - opts.pretrain_steps
            set_mode(module, "gumbel", tau=tau(s), hard=opts.hard)
            # weights on train1 (policy frozen) ...
            images, targets = b1.batch(s, device)
            losses = task_losses(_forward(module, images, amp), targets, tasks)
            check_finite(losses, stage, s)
            loss = torch.stack([weights[k] * v for k, v in losses.items()]).sum()
            opt_w.zero_grad(set_to_none=True)
            opt_p.zero_grad(set_to_none=True)
            loss.backward()
            opt_w.step()
            sched.step()
            # ... then the policy on train2 (weights frozen), with the regulariser of Eq. 3
            images, targets = b2.batch(s, device)
            plosses = task_losses(_forward(module, images, amp), targets, tasks)
            check_finite(plosses, stage, s)
            reg = policy_regularizer(logits, depths)
            ploss = torch.stack([weights[k] * v for k, v in plosses.items()]).sum() + lambda_reg * reg
            opt_w.zero_grad(set_to_none=True)
            opt_p.zero_grad(set_to_none=True)
            ploss.backward()
            opt_p.step()
            record = {"stage": stage, "step": s, "tau": tau(s), "reg": float(reg.detach()), "lambda_reg": lambda_reg,
                      "loss": {k: float(v.detach()) for k, v in losses.items()},
                      "policy_loss": {k: float(v.detach()) for k, v in plosses.items()}}
        g += 1
        if s % opts.log_every == 0 or g == total:
            record["elapsed_s"] = round(time.perf_counter() - t0, 3)
            run.log(record)
        if bar is not None:
            bar.update(g, stage, {k: float(v.detach()) for k, v in losses.items()})
        if g % opts.checkpoint_every == 0 or g == total:
            checkpoint()
    if bar is not None:
        bar.stop()

    policy = derive_policy(logits, names)
    if opts.sample > 0:
        policy = _best_sampled(model, module, logits, names, val, opts, device, policy)
    _write_policy_outputs(run, logits, names, policy)
    scores = evaluate(module.eval(), val, tasks, max_batches=opts.eval_batches, device=device)
    run.log({"stage": "search-end", "step": total, "val": scores})
    return policy


def _best_sampled(model: Any, module: Any, logits: Any, names: list[str], val: Any, opts: SearchOptions,
                  device: str, mode_policy: Policy) -> Policy:
    """Draw K policies, score each briefly on validation with the searched weights, keep the best."""
    from mtc.ir import supergraph as sg
    from mtc.lower.supergraph import lower_supergraph
    from mtc.train.loop import evaluate

    tasks = sg.tasks_of(model) or []
    gen = torch.Generator().manual_seed(opts.seed)
    candidates = [mode_policy] + [sample_policy(logits, names, gen) for _ in range(opts.sample)]
    best, best_loss = mode_policy, math.inf
    trained = module.state_dict()
    for cand in candidates:
        fixed = lower_supergraph(model, mode="fixed", policy=cand, device=device)
        state = fixed.state_dict()
        fixed.load_state_dict({k: trained[k] for k in state if k in trained and trained[k].shape == state[k].shape},
                              strict=False)
        scores = evaluate(fixed, val, tasks, max_batches=opts.eval_batches, device=device)
        total = sum(s["loss"] for s in scores.values())
        if total < best_loss:
            best, best_loss = cand, total
    return best


def _write_policy_outputs(run: Any, logits: Any, names: list[str], policy: Policy) -> None:
    run.write_json("policy.json", {**policy_json(logits, names, policy), "policy": policy.to_json()})
    corr = task_correlation(logits, names)
    run.write_json("task_correlation.json", {"tasks": names, "matrix": np.round(corr, 6).tolist()})
    try:
        from mtc.search.plots import plot_correlation, plot_policy

        plot_policy(run.file("policy.png"), logits, names)
        plot_correlation(run.file("task_correlation.png"), corr, names)
    except ImportError:  # matplotlib is optional: JSON is always written
        pass


class _Bar:
    def __init__(self, total: int, start: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeRemainingColumn(), transient=False)
        self.p.start()
        self.t = self.p.add_task("search", total=total, completed=start)

    def update(self, g: int, stage: str, losses: dict[str, float]) -> None:
        desc = f"{stage} " + " ".join(f"{k}={v:.3f}" for k, v in losses.items())
        self.p.update(self.t, completed=g, description=desc)

    def stop(self) -> None:
        self.p.stop()


def _progress(enabled: bool, total: int, start: int) -> _Bar | None:
    return _Bar(total, start) if enabled else None
