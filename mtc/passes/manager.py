"""Run a named pipeline of passes, timing each and verifying the graph after each."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir.verify import verify
from mtc.passes.base import Pass

#: name -> factory taking the pass's keyword options. Passes register here as they are written.
REGISTRY: dict[str, Callable[..., Pass]] = {}
#: modules whose import registers passes (spaces register theirs when :mod:`mtc.spaces` loads them)
PASS_MODULES = ("mtc.passes.fold", "mtc.passes.canonicalize", "mtc.passes.feature", "mtc.passes.heads",
                "mtc.passes.choices", "mtc.passes.specialize", "mtc.passes.search_form", "mtc.passes.prune")


def _load_all() -> None:
    import importlib

    for m in PASS_MODULES:
        importlib.import_module(m)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to ``--passes`` by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    nodes: int


@dataclass
class PipelineResult:
    model: ir.Model
    records: list[PassRecord] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)


def resolve(names: str | Sequence[str], options: dict[str, dict] | None = None) -> list[Pass]:
    """Build passes from ``a,b,c`` (or a list), with per-pass keyword options."""
    _load_all()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        if n not in REGISTRY:
            raise MtcError(f"--passes: unknown pass '{n}' (known: {', '.join(sorted(REGISTRY))})")
        out.append(REGISTRY[n](**(options or {}).get(n, {})))
    return out


class PassManager:
    """Runs passes in order; after each, runs the verifier and optionally dumps the graph.

    Args:
        passes: the pipeline.
        dump_dir: write the graph as ONNX text after each pass (``NN-name.onnx.txt``).
        dump_after: only dump after the passes named here (all when empty).
        verify_each: run :func:`mtc.ir.verify.verify` after every pass.
    """

    def __init__(self, passes: Sequence[Pass], *, dump_dir: str | Path | None = None,
                 dump_after: Sequence[str] = (), verify_each: bool = True) -> None:
        self.passes = list(passes)
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.dump_after = set(dump_after)
        unknown = self.dump_after - {p.name for p in self.passes}
        if unknown:
            raise MtcError(f"--dump-after: {', '.join(sorted(unknown))} is not in the pipeline")
        self.verify_each = verify_each

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(map(repr, self.passes))}])"

    def run(self, model: ir.Model) -> PipelineResult:
        result = PipelineResult(model)
        for i, p in enumerate(self.passes):
            t0 = time.perf_counter()
            r = p(model)
            model = r.model
            dt = time.perf_counter() - t0
            if self.verify_each:
                verify(model, pass_name=p.name)
            result.records.append(PassRecord(p.name, dt, bool(r.modified), model.graph.num_nodes()))
            if self.dump_dir is not None and (not self.dump_after or p.name in self.dump_after):
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                (self.dump_dir / f"{i:02d}-{p.name}.onnx.txt").write_text(ir.to_onnx_text(model))
        result.model = model
        return result
