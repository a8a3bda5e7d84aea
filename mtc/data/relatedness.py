"""``relatedness``: two regression tasks with controlled relatedness ρ (Gumbel-Matrix, App. A1).

The generator of Maziarz et al. (after Ma et al.'s MMoE):

1. two orthogonal unit vectors ``u1, u2`` in R^d;
2. ``w1 = c u1``, ``w2 = c (ρ u1 + sqrt(1 - ρ²) u2)``, so ``cos(w1, w2) = ρ``;
3. ``x ~ N(0, I_d)``;
4. ``y_i = w_iᵀx + Σ_{k=1..m} sin(α_k w_iᵀx + β_k) + ε_i``, ``ε_i ~ N(0, 0.01)``,

with the paper's constants ``d = 128, c = 1, m = 6, α_k = k, β_k = (k - 1)²``. The paper writes the
noise as N(0, 0.01); we read 0.01 as the variance (``noise_var``), i.e. a standard deviation of 0.1.

More than two tasks (2k of them, k pairs; the paper's Appendix A3 uses two pairs): task ``2j`` and
``2j + 1`` form pair ``j`` with its own orthogonal ``u_{2j}, u_{2j+1}`` (``u1, u2`` of pair 0 are the
two-task problem's), so ``ρ`` holds inside every pair and tasks of different pairs are unrelated
(their weight vectors are orthogonal: ρ = 0 across pairs).

Image-shaped input: ``x`` fills the ``(C, H, W)`` input in row-major order and repeats (tiles) until
the image is full, so ``d`` may be smaller than ``C·H·W`` (``d=0`` means ``d = C·H·W``: a plain
reshape). Every pixel is a copy of one coordinate of ``x``; the targets depend on ``x`` alone.
Note that ``w_iᵀx`` is a position-dependent linear map, which a translation-invariant CNN has to
learn through its padding; small inputs (e.g. ``(1, 8, 16)`` with ``d=128``) make that easy.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset

from mtc.data.common import TRAIN, VAL, GeneratedDataset, as_sample, check_positive, rng, wrap_partial
from mtc.errors import MtcError
from mtc.tasks.spec import TaskSpec

__all__ = ["RelatednessProblem", "make_relatedness"]


class RelatednessProblem:
    """The two weight vectors and the target function; shared by the train and val sets.

    Args:
        d: input dimension.
        rho: relatedness ρ in [0, 1] (cosine of the angle between ``w1`` and ``w2``).
        c: scale of the weight vectors.
        m: number of sine terms.
        alphas, betas: the sine frequencies and phases (length ``m``).
        seed: seed of ``u1, u2``.
    """

    def __init__(
        self, d: int, rho: float, c: float, m: int, alphas: np.ndarray, betas: np.ndarray, seed: int,
        pairs: int = 1,
    ) -> None:
        g = rng(seed, 0x7E1A)
        # Draw order: pair 0's two vectors first, so the two-task problem is unchanged by ``pairs``.
        us: list[np.ndarray] = []
        for _ in range(2 * pairs):
            b = g.standard_normal(d)
            for u in us:  # Gram-Schmidt against every earlier vector
                b = b - (b @ u) * u
            us.append(b / np.linalg.norm(b))
        self.u1, self.u2 = us[0], us[1]
        self.us = us
        s = math.sqrt(max(0.0, 1.0 - rho * rho))
        #: one weight vector per task: pair j is (c u_2j, c (ρ u_2j + sqrt(1 - ρ²) u_2j+1))
        self.ws = [w for j in range(pairs) for w in (c * us[2 * j], c * (rho * us[2 * j] + s * us[2 * j + 1]))]
        self.w1, self.w2 = self.ws[0], self.ws[1]
        self.alphas = alphas
        self.betas = betas

    def clean(self, x: np.ndarray) -> tuple[float, ...]:
        """The noise-free targets of input ``x`` (shape ``(d,)``, or ``(n, d)`` for arrays of n),
        one per task."""
        out = []
        for w in self.ws:
            s = x @ w
            out.append(s + np.sin(np.multiply.outer(s, self.alphas) + self.betas).sum(-1))
        return tuple(out)


def _sequence(name: str, text: str, m: int, default: np.ndarray) -> np.ndarray:
    if not text:
        return default
    try:
        vals = np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise MtcError(f"option {name} must be {m} comma-separated numbers, got '{text}'") from None
    if len(vals) != m:
        raise MtcError(f"option {name} needs m = {m} values, got {len(vals)}")
    return vals


def make_relatedness(
    tasks: list[TaskSpec],
    input_shape: tuple[int, int, int],
    seed: int,
    *,
    rho: float = 0.5,
    d: int = 128,
    c: float = 1.0,
    m: int = 6,
    alphas: str = "",
    betas: str = "",
    noise_var: float = 0.01,
    n_train: int = 8000,
    n_val: int = 2000,
    label_fraction: float = 1.0,
    partial_tasks: str = "",
) -> tuple[Dataset, Dataset]:
    """Train and val sets of the synthetic two-task regression.

    Args:
        tasks: two tasks of kind ``regress`` with 1 channel (the first gets ``w1``), or 2k of them:
            k pairs, ρ inside each pair, unrelated across pairs (Appendix A3: two pairs).
        input_shape: ``(C, H, W)``; ``x`` is tiled into it.
        seed: seeds ``u1, u2`` and every sample.
        rho: task relatedness ρ in [0, 1] (the paper sweeps it; 0.5 is our middle default).
        d: input dimension (paper: 128); 0 means ``C·H·W``; at most ``C·H·W``.
        c: weight scale (paper: 1).
        m: sine terms (paper: 6).
        alphas: comma-separated ``α_1..α_m`` (default: ``α_k = k``, the paper's).
        betas: comma-separated ``β_1..β_m`` (default: ``β_k = (k-1)²``, the paper's).
        noise_var: variance of ε (paper: 0.01).
        n_train, n_val: samples per split.
        label_fraction: share of training samples that keep each task's target.
        partial_tasks: comma-separated tasks ``label_fraction`` applies to (default: all).
    """
    names = ", ".join(f"{t.name} ({t.kind}:{t.channels})" for t in tasks)
    if len(tasks) < 2 or len(tasks) % 2 or any(t.kind != "regress" or t.channels != 1 for t in tasks):
        raise MtcError(
            f"relatedness needs exactly two tasks of kind regress with 1 channel "
            f"(e.g. --tasks y1:regress,y2:regress), or pairs of them (4, 6, ... tasks), got {names or 'none'}"
        )
    if not 0.0 <= rho <= 1.0:
        raise MtcError(f"option rho must lie in [0, 1], got {rho}")
    size = math.prod(input_shape)
    d = size if d == 0 else check_positive("d", d)
    if d > size:
        raise MtcError(f"option d={d} exceeds the input size C*H*W = {size} of {tuple(input_shape)}; pass ?d={size} or less")
    if m < 0:
        raise MtcError(f"option m must be >= 0, got {m}")
    if noise_var < 0:
        raise MtcError(f"option noise_var must be >= 0, got {noise_var}")
    k = np.arange(1, m + 1, dtype=np.float64)
    pairs = len(tasks) // 2
    if 2 * pairs > d:
        raise MtcError(f"option d={d} is too small for {pairs} pairs of tasks: they need {2 * pairs} orthogonal "
                       "directions")
    problem = RelatednessProblem(
        d, rho, c, m, _sequence("alphas", alphas, m, k), _sequence("betas", betas, m, (k - 1.0) ** 2), seed,
        pairs=pairs,
    )
    std = math.sqrt(noise_var)
    reps = -(-size // d)
    names_ = [t.name for t in tasks]

    def maker(split: int):
        def make(i: int):
            g = rng(seed, split, i)
            x = g.standard_normal(d)
            # The first two noise draws are the two-task problem's, whatever the number of pairs.
            eps = g.standard_normal(len(names_)) * std
            ys = problem.clean(x)
            image = np.tile(x, reps)[:size].reshape(input_shape)
            targets = {t: np.array([y + e], dtype=np.float32) for t, y, e in zip(names_, ys, eps, strict=True)}
            return as_sample(image, targets)

        return make

    train = GeneratedDataset(check_positive("n_train", n_train), maker(TRAIN))
    val = GeneratedDataset(check_positive("n_val", n_val), maker(VAL))
    train.problem = val.problem = problem  # type: ignore[attr-defined]  # for tests and analysis
    return wrap_partial(train, tasks, seed, label_fraction, partial_tasks), val
