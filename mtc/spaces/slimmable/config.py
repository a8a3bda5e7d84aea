"""Width configurations of a slimmable supergraph (no torch).

A *configuration* gives every width choice (one per channel dependency group of the encoder and of
each task's decoder) a ratio from the width list ω, stored as an index into ω. It turns into a
format-2 plan (kept channel counts) and into the accuracy predictor's input (the ratios, encoder
first, then each task's decoder in task order: the paper's A^(ζ)).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import ALL_TASKS, PLAN_FORMAT, Plan
from mtc.spaces.slimmable.options import SPACE, VERSION

ENCODER = "encoder"
DECODER = "decoder"


@dataclass(frozen=True)
class WidthChoice:
    """One width choice: a dependency group and the channel count each ratio of ω keeps.

    Attributes:
        name: the choice point's name (the group's name).
        channels: the group's size.
        part: ``encoder`` or ``decoder``.
        task: the decoder's task (None in the encoder).
        counts: kept channels per ratio of ω (ascending, possibly repeated for small groups).
    """

    name: str
    channels: int
    part: str
    task: str | None
    counts: tuple[int, ...]


class WidthSpace:
    """The width choices of a slimmable supergraph and its width list ω.

    ``config`` arrays hold one index into :attr:`ratios` per choice, in :attr:`choices` order
    (encoder choices first, then each task's decoder choices in task order).
    """

    def __init__(self, ratios: Sequence[float], choices: Sequence[WidthChoice], tasks: Sequence[str]) -> None:
        self.ratios = tuple(float(r) for r in ratios)
        self.tasks = list(tasks)
        enc = [c for c in choices if c.part == ENCODER]
        dec = [c for t in self.tasks for c in choices if c.part == DECODER and c.task == t]
        self.choices: list[WidthChoice] = enc + dec
        self.index = {c.name: i for i, c in enumerate(self.choices)}
        self.encoder = np.array([i for i, c in enumerate(self.choices) if c.part == ENCODER], dtype=np.int64)
        self.decoders = {t: np.array([i for i, c in enumerate(self.choices) if c.task == t], dtype=np.int64)
                         for t in self.tasks}
        self.top = len(self.ratios) - 1

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def of(cls, model: ir.Model) -> WidthSpace:
        """The width space a slimmable compile recorded in ``model``.

        Raises:
            MtcError: the model holds no slimmable width choices.
        """
        info = next((s for s in sg.space_of(model).get("spaces", []) if s.get("name") == SPACE), None)
        if info is None:
            raise MtcError(f"the supergraph was not compiled with --space {SPACE}")
        ratios = tuple(float(r) for r in info["options"]["width_list"])
        out = []
        for c in sg.choices_of(model, "width"):
            if c.info.get("space") != SPACE:
                continue
            counts = tuple(int(n) for n in c.info["counts"])
            out.append(WidthChoice(c.name, c.channels, str(c.info["part"]), c.info.get("task"), counts))
        if not out:
            raise MtcError("the supergraph has no slimmable width choices (no prunable channel group)")
        return cls(ratios, out, sg.task_names(model))

    def __len__(self) -> int:
        return len(self.choices)

    # --- configurations -------------------------------------------------------------------------
    def full(self, ratio: int | None = None) -> np.ndarray:
        """Every choice at ratio index ``ratio`` (default: the largest)."""
        return np.full(len(self.choices), self.top if ratio is None else int(ratio), dtype=np.int64)

    def smallest(self) -> np.ndarray:
        return self.full(0)

    def random(self, rng: np.random.Generator) -> np.ndarray:
        """A random non-uniform configuration: every choice its own ratio, uniform over ω."""
        return rng.integers(0, len(self.ratios), size=len(self.choices)).astype(np.int64)

    def counts(self, config: np.ndarray) -> dict[str, int]:
        """Kept channels per choice."""
        return {c.name: c.counts[int(k)] for c, k in zip(self.choices, config, strict=True)}

    def vector(self, config: np.ndarray) -> np.ndarray:
        """The predictor's input: the ratio of every choice (encoder, then decoders), float32."""
        return np.asarray(self.ratios, dtype=np.float32)[np.asarray(config, dtype=np.int64)]

    def nearest(self, ratio: float) -> int:
        """The index of the ratio of ω nearest to ``ratio`` (ties: the larger)."""
        r = np.asarray(self.ratios)
        d = np.abs(r - ratio)
        return int(np.flatnonzero(d <= d.min() + 1e-9)[-1])

    def ratios_of(self, config: np.ndarray) -> dict[str, float]:
        return {c.name: self.ratios[int(k)] for c, k in zip(self.choices, config, strict=True)}

    # --- plans ------------------------------------------------------------------------------------
    def to_plan(self, config: np.ndarray, info: Mapping[str, Any] | None = None) -> Plan:
        """The format-2 plan of ``config`` (widths as kept channel counts, ``{"*": N}``)."""
        widths = {name: {ALL_TASKS: n} for name, n in self.counts(config).items()}
        extra = {"ratios": self.ratios_of(config), **(info or {})}
        return Plan(space=SPACE, version=VERSION, widths=widths, info=extra)

    def from_plan(self, plan: Plan, *, source: str | None = None) -> np.ndarray:
        """The configuration of a plan: each choice's ratio (the plan's ``info.ratios`` when it
        records them, else the smallest ratio of ω that keeps the plan's count).

        Raises:
            MtcError: a choice missing or with a count no ratio of ω keeps.
        """
        ratios = plan.info.get("ratios") if isinstance(plan.info.get("ratios"), Mapping) else {}
        out = np.zeros(len(self.choices), dtype=np.int64)
        for i, c in enumerate(self.choices):
            per = plan.widths.get(c.name)
            if per is None or ALL_TASKS not in per:
                raise MtcError(f"the widths do not fit the supergraph: no width for choice '{c.name}'", file=source)
            n = per[ALL_TASKS]
            r = ratios.get(c.name) if ratios else None
            if isinstance(r, int | float) and any(abs(r - x) < 1e-9 for x in self.ratios):
                k = self.nearest(float(r))
                if c.counts[k] == n:
                    out[i] = k
                    continue
            ks = [k for k, m in enumerate(c.counts) if m == n]
            if not ks:
                raise MtcError(f"the widths do not fit the supergraph: choice '{c.name}' keeps {n} channels, "
                               f"expected one of {sorted(set(c.counts))}", file=source)
            out[i] = ks[0]
        return out

    def read_widths(self, data: Any, model: ir.Model, *, source: str | None = None) -> np.ndarray:
        """A configuration from a ``--widths`` document: a plan (``mtc.plan/1``), or
        ``{"widths": {choice: ratio, "*": default ratio}}`` with ratios from ω.

        Raises:
            MtcError: one line naming what does not fit (an unknown choice, a ratio not in ω, a
                choice without a ratio, a plan that does not match the supergraph).
        """
        if isinstance(data, Mapping) and data.get("format") == PLAN_FORMAT:
            from mtc.spaces import read_plan

            return self.from_plan(read_plan(data, model, source=source), source=source)
        if not isinstance(data, Mapping) or not isinstance(data.get("widths"), Mapping):
            raise MtcError("--widths: expected a plan (\"format\": \"mtc.plan/1\") or {\"widths\": {choice: ratio}}",
                           file=source)
        table = data["widths"]
        default = table.get(ALL_TASKS)
        out = np.zeros(len(self.choices), dtype=np.int64)
        for name in table:
            if name != ALL_TASKS and name not in self.index:
                raise MtcError(f"--widths: '{name}' is not a width choice of the supergraph (see mtc inspect)",
                               file=source)
        for i, c in enumerate(self.choices):
            r = table.get(c.name, default)
            if r is None:
                raise MtcError(f"--widths: no ratio for choice '{c.name}' (give it or a default \"*\")", file=source)
            if isinstance(r, bool) or not isinstance(r, int | float) or not any(abs(r - x) < 1e-9 for x in self.ratios):
                allowed = ", ".join(f"{x:g}" for x in self.ratios)
                raise MtcError(f"--widths: choice '{c.name}': ratio {r!r} is not in the width list ({allowed})",
                               file=source)
            out[i] = self.nearest(float(r))
        return out

    def read_widths_file(self, path: str | Path, model: ir.Model) -> np.ndarray:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MtcError(f"--widths: cannot read the file: {e}", file=str(p)) from None
        return self.read_widths(data, model, source=str(p))
