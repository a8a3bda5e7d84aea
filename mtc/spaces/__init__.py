"""Search spaces as plug-ins (docs/spaces.md).

A space is one folder under ``mtc/spaces/`` registered by name with :func:`register_space`. It
provides the passes that insert its choice points, its options (declared once as :class:`Option`:
the CLI makes click options of them), how to read and check its plans, and its *strategies*, the
search algorithms for it. Nothing in ``train/``, ``export/`` or ``cli.py`` names a space: they go
through this registry.

The trainer and a strategy talk through the small interface defined here (:class:`Stage`,
:class:`Update`, :class:`OptimizerSpec`, :class:`SearchHost`): a gradient-based strategy declares
its module, optimisers, data streams and stages and the trainer runs them; a strategy that is not
gradient-based overrides :meth:`Strategy.search` and calls the host for inner trainings.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan

if TYPE_CHECKING:
    import torch

    from mtc.lower.module import GraphModule
    from mtc.passes.base import Pass
    from mtc.passes.manager import PipelineResult

DEFAULT_SPACE = "automtl"
#: The spaces shipped with mtc (imported on first use of the registry).
BUILTIN = ("mtc.spaces.automtl", "mtc.spaces.branched", "mtc.spaces.slimmable", "mtc.spaces.partition",
           "mtc.spaces.allocation")


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class Option:
    """An option of a space (compile) or a strategy (search), declared once.

    Attributes:
        name: the Python name (``per_task_norm``); the CLI spells it ``--per-task-norm``.
        default: its value when not given; its type is the option's type (a bool is a flag).
        help: one line, with the paper's value where the paper gives one.
        low, high: the allowed range (inclusive unless ``low_open``/``high_open``).
        choices: the allowed values of a string option.
        parse: turns the command-line text into the value (for structured options).
        metavar: how the CLI shows the value.
    """

    name: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """``value`` validated (and converted when it is command-line text).

        Raises:
            MtcError: a value of the wrong type, outside the range, NaN, or not a choice.
        """
        if isinstance(value, str) and self.parse is not None:
            try:
                value = self.parse(value)
            except (ValueError, TypeError) as e:
                raise MtcError(f"{self.flag}: {e}") from None
        d = self.default
        if isinstance(value, str) and self.parse is None and isinstance(d, int | float) and not isinstance(d, bool):
            # Command-line text: when strategies declare one name with different types, the CLI
            # passes the text through and each strategy's option converts it.
            try:
                value = int(value) if isinstance(d, int) else float(value)
            except ValueError:
                what = "an integer" if isinstance(d, int) else "a number"
                raise MtcError(f"{self.flag}: expected {what}, got {value!r}") from None
        if isinstance(d, bool):
            if not isinstance(value, bool):
                raise MtcError(f"{self.flag}: expected true or false, got {value!r}")
        elif isinstance(d, int) and self.parse is None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise MtcError(f"{self.flag}: expected an integer, got {value!r}")
        elif isinstance(d, float) and self.parse is None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise MtcError(f"{self.flag}: expected a number, got {value!r}")
            value = float(value)
            if math.isnan(value):
                raise MtcError(f"{self.flag}: expected a number, got nan")
        if self.choices is not None and value not in self.choices:
            raise MtcError(f"{self.flag}: '{value}' is not one of {', '.join(self.choices)}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            lo, hi = self.low, self.high
            if lo is not None and (value < lo or (self.low_open and value == lo)):
                raise MtcError(f"{self.flag}: {value} is out of range ({self.range_text()})")
            if hi is not None and (value > hi or (self.high_open and value == hi)):
                raise MtcError(f"{self.flag}: {value} is out of range ({self.range_text()})")
        return value

    def range_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


def resolve_options(declared: Sequence[Option], given: dict[str, Any], *, what: str) -> dict[str, Any]:
    """Every declared option's value: ``given`` (validated) or the default.

    Raises:
        MtcError: an option that ``what`` does not declare, or a bad value.
    """
    by_name = {o.name: o for o in declared}
    unknown = [k for k in given if k not in by_name]
    if unknown:
        flag = "--" + unknown[0].replace("_", "-")
        known = ", ".join(o.flag for o in declared) or "none"
        raise MtcError(f"{flag} does not apply to {what} (its options: {known})")
    return {o.name: o.check(given[o.name]) if o.name in given else o.default for o in declared}


# --------------------------------------------------------------------------- trainer <-> strategy
@dataclass
class OptimizerSpec:
    """An optimiser over named parameters (IR names), Adam by default, with a step decay."""

    name: str
    params: dict[str, torch.nn.Parameter]
    lr: float
    decay: float = 1.0  # multiply the learning rate by this every `decay_every` of its steps
    decay_every: int = 0  # 0: never
    kind: str = "adam"  # adam | sgd
    weight_decay: float = 0.0  # L2 weight decay (torch's Adam/SGD ``weight_decay``)
    poly_steps: int = 0  # > 0: poly schedule, lr · (1 - step / poly_steps) ^ poly_power (instead of the decay)
    poly_power: float = 0.9


@dataclass
class Update:
    """One optimisation update within a step: a batch from ``stream``, the weighted task losses
    plus ``extra_loss``, backward, then a step of the named optimisers (all gradients cleared first).

    ``extra_loss(step) -> (loss term or None, record)`` adds terms such as a regulariser and what
    to log of them. ``record`` is the log key of the task losses (``loss``, ``policy_loss``).

    ``passes(step)``, when set, makes the update accumulate gradients over several forward passes
    of the one batch before its optimiser step (the sandwich rule of slimmable networks): it
    returns one callable per pass, each run before its pass to configure the module (say, the
    sub-network's widths); every pass adds its task losses and ``extra_loss`` and backpropagates.
    The first pass's task losses are logged under ``record``, every pass's under ``passes``.
    """

    stream: str
    optimizers: tuple[str, ...]
    extra_loss: Callable[[int], tuple[Any, dict[str, Any]]] | None = None
    record: str = "loss"
    passes: Callable[[int], Sequence[Callable[[], Any]]] | None = None


@dataclass
class Stage:
    """``steps`` steps of ``updates``; ``before_step(step)`` sets modes, temperatures, samples and
    returns what to log (e.g. ``{"tau": 2.3}``)."""

    name: str
    steps: int
    updates: list[Update]
    before_step: Callable[[int], dict[str, Any]] | None = None


class SearchHost(Protocol):
    """What the trainer offers a strategy (implemented by :mod:`mtc.train.search`)."""

    model: ir.Model
    tasks: list[Any]
    train: Any
    val: Any
    device: str
    seed: int
    options: dict[str, Any]
    config: Any  # the generic training knobs (mtc.train.trainer.TrainConfig)

    def file(self, name: str) -> Path: ...
    def write_json(self, name: str, data: Any) -> Path: ...
    def run_stages(self, strategy: Strategy, module: GraphModule) -> None: ...
    def evaluate(self, module: Any, *, max_batches: int | None = None) -> dict[str, dict[str, float]]: ...
    def train_plan(self, plan: Plan, *, steps: int, tag: str, lr: float = 1e-3,
                   init: dict[str, torch.Tensor] | None = None) -> dict[str, Any]: ...
    def state(self, key: str) -> Any: ...
    def save_state(self, key: str, value: Any) -> None: ...
    def log(self, record: dict[str, Any]) -> None: ...


class Strategy:
    """A search algorithm for one space (see the module docstring).

    Subclasses set ``name``, ``help`` and ``options`` (every constant of the paper, with its
    default), and either implement the gradient hooks (:meth:`build`, :meth:`optimizers`,
    :meth:`streams`, :meth:`stages`, :meth:`derive`) or override :meth:`search`.
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, space: Space, model: ir.Model, opts: dict[str, Any]) -> None:
        self.space = space
        self.model = model
        self.opts = opts

    # --- gradient-based strategies -------------------------------------------------------------
    def build(self, host: SearchHost) -> GraphModule:
        raise NotImplementedError

    def optimizers(self, module: GraphModule) -> list[OptimizerSpec]:
        raise NotImplementedError

    def streams(self, train: Any) -> dict[str, Any]:
        return {"train": train}

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def derive(self, module: GraphModule) -> Plan:
        raise NotImplementedError

    def finish(self, host: SearchHost, module: GraphModule, plan: Plan) -> Plan:
        """After the stages: write the strategy's outputs; may replace the plan (return it)."""
        return plan

    def eval_mode(self, module: GraphModule) -> None:
        """Put the module in the mode the end-of-search metrics are measured in."""

    # --- the search ----------------------------------------------------------------------------
    def search(self, host: SearchHost) -> Plan:
        """Run the search; the default is the gradient-based flow: build, run the stages, derive."""
        module = self.build(host)
        host.run_stages(self, module)
        plan = self.derive(module)
        plan = self.finish(host, module, plan)
        self.eval_mode(module)
        steps = sum(s.steps for s in self.stages())
        host.log({"stage": "search-end", "step": steps, "val": host.evaluate(module)})
        return plan


@dataclass(frozen=True)
class StrategyInfo:
    """A strategy as the registry knows it before its code is imported (so the CLI starts fast).

    Attributes:
        name: ``mtc search --strategy NAME``.
        help: one line.
        options: its options (the class's ``options``).
        target: ``module:Class`` of the :class:`Strategy` subclass.
    """

    name: str
    help: str
    options: tuple[Option, ...]
    target: str

    def load(self) -> type[Strategy]:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


@dataclass
class ExportChoice:
    """What a space's export options chose (:meth:`Space.export_choice`).

    Attributes:
        plan: the plan to export.
        weights: its network's weights by IR name.
        info: what the deployment report shows and records of the choice (JSON), e.g. the budget
            asked and the MACs predicted.
        weights_source: the file the weights were derived from (its digest is recorded).
    """

    plan: Plan
    weights: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    weights_source: str | None = None


class Space:
    """A search space (see the module docstring). Subclasses set the class attributes."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    help: ClassVar[str] = ""
    compile_options: ClassVar[tuple[Option, ...]] = ()
    #: options ``mtc export RUN_DIR`` takes for a run of this space (see :meth:`export_choice`)
    export_options: ClassVar[tuple[Option, ...]] = ()
    default_strategy: ClassVar[str] = ""
    strategies: ClassVar[dict[str, StrategyInfo]]

    def passes(self, model: ir.Model, options: dict[str, Any], *, seed: int) -> list[Pass]:
        """The passes that insert this space's choice points into a backbone with heads."""
        raise NotImplementedError

    def read_plan(self, data: Any, model: ir.Model, *, source: str | None = None) -> Plan:
        """A plan of this space from its JSON document (older forms may be read here too)."""
        return Plan.from_json(data, source=source)

    def check_plan(self, plan: Plan, model: ir.Model, *, source: str | None = None) -> None:
        """Checks beyond :meth:`Plan.validate` (a tree's partitions refine, say)."""

    def bind_passes(self, model: ir.Model, plan: Plan) -> list[Pass]:
        """Passes rewriting this space's own ops into format 2's generic ones before ``specialize``."""
        return []

    def snapshot(self, model: ir.Model) -> dict[str, Any]:
        """Keys this space adds to ``mtc check`` snapshots (ints, strings, bools and lists only)."""
        return {}

    def summary(self, model: ir.Model) -> dict[str, Any]:
        """What ``mtc inspect`` shows of the space."""
        return {}

    def describe_plan(self, model: ir.Model, plan: Plan) -> str:
        """A plan as text for a person (``mtc search`` prints it); empty: nothing beyond the counts."""
        return ""

    def init_from_baselines(self, model: ir.Model, plan: Plan, baselines: str | Path) -> dict[str, torch.Tensor]:
        """Initial weights (by IR name) of ``plan``'s network taken from the single-task models of an
        ``mtc baseline`` run (``mtc train --init-from-baselines DIR``).

        Raises:
            MtcError: the space does not map single-task models onto its plans (the default), or the
                baselines do not fit the supergraph.
        """
        raise MtcError(f"--init-from-baselines: space '{self.name}' cannot start its plans from single-task "
                       "models")

    def train_network(self, model: ir.Model, plan: Plan, *, device: str | None = None) -> GraphModule | None:
        """The network that trains ``plan`` (``mtc train``, :meth:`SearchHost.train_plan`) when the
        space needs its own (per-task gradient masks, frozen layers); None, the default: the
        specialised form, lowered. It must compute the plan's function with the specialised form's
        IR names for its weights (export binds the weights it leaves into the specialised form);
        parameters that must not train have ``requires_grad`` off."""
        return None

    def export_choice(self, run: Any, model: ir.Model, options: dict[str, Any], *, device: str = "cpu",
                      deployed: Callable[[Plan], ir.Model] | None = None) -> ExportChoice:
        """The plan and weights ``mtc export RUN_DIR`` writes when given this space's
        :attr:`export_options` (``options``: their values, validated; those not given at their
        defaults), instead of the run's ``plan.json`` and final checkpoint.

        Args:
            run: the run directory (a :class:`mtc.train.run.RunDir`: ``config()``, ``file()``,
                ``load_checkpoint()``; its config names the data).
            model: the run's supergraph.
            device: where to compute (e.g. BatchNorm recalibration).
            deployed: the fused model ``mtc export`` writes for a plan, with the command's rewrites
                (for cost models that must count what is deployed).

        Raises:
            MtcError: the options do not fit the run (one line).
        """
        raise MtcError(f"space '{self.name}' has no export options")

    def strategy(self, name: str | None) -> type[Strategy]:
        key = name or self.default_strategy
        if key not in self.strategies:
            raise MtcError(f"--strategy: '{key}' is not a strategy of space '{self.name}' "
                           f"(its strategies: {', '.join(sorted(self.strategies))})")
        return self.strategies[key].load()


_SPACES: dict[str, Space] = {}
_loaded = False


def register_space(cls: type[Space]) -> type[Space]:
    """Class decorator: make a space available by its ``name`` (``mtc compile --space NAME``)."""
    if "strategies" not in cls.__dict__:
        cls.strategies = {}
    _SPACES[cls.name] = cls()
    return cls


def register_strategy(space: type[Space] | str, name: str, help: str, options: tuple[Option, ...],
                      target: str) -> None:
    """Add a strategy to a space (``mtc search --strategy NAME``); its class loads on first use."""
    sp = _SPACES[space] if isinstance(space, str) else _SPACES[space.name]
    type(sp).strategies[name] = StrategyInfo(name, help, options, target)


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for m in BUILTIN:
            importlib.import_module(m)


def spaces() -> dict[str, Space]:
    """Every registered space, by name."""
    _ensure_loaded()
    return dict(_SPACES)


def get_space(name: str) -> Space:
    _ensure_loaded()
    if name not in _SPACES:
        raise MtcError(f"--space: unknown search space '{name}' (known: {', '.join(sorted(_SPACES))})")
    return _SPACES[name]


def space_of_model(model: ir.Model, *, file: str | None = None) -> Space:
    """The space that compiled a supergraph (its first one, when several composed)."""
    sg.check_format(model, file=file)
    name = sg.space_of(model).get("name")
    if not name:
        raise MtcError("the supergraph records no search space (metadata 'mtc.space')", file=file)
    return get_space(str(name))


def all_strategy_options() -> dict[str, list[tuple[str, str, Option]]]:
    """Option name -> every (space, strategy, option) declaring it (the CLI's union of options)."""
    out: dict[str, list[tuple[str, str, Option]]] = {}
    for sp in spaces().values():
        for st in sp.strategies.values():
            for o in st.options:
                out.setdefault(o.name, []).append((sp.name, st.name, o))
    return out


def strategy_names() -> list[tuple[str, str, str]]:
    """(space, strategy, help) of every registered strategy."""
    return [(sp.name, st.name, st.help) for sp in spaces().values() for st in sp.strategies.values()]


def all_export_options() -> dict[str, list[tuple[str, Option]]]:
    """Option name -> every (space, option) declaring it for ``mtc export``."""
    out: dict[str, list[tuple[str, Option]]] = {}
    for sp in spaces().values():
        for o in sp.export_options:
            out.setdefault(o.name, []).append((sp.name, o))
    return out


def all_compile_options() -> dict[str, list[tuple[str, Option]]]:
    out: dict[str, list[tuple[str, Option]]] = {}
    for sp in spaces().values():
        for o in sp.compile_options:
            out.setdefault(o.name, []).append((sp.name, o))
    return out


# ---------------------------------------------------------------------------------------- plans
def model_spaces(model: ir.Model, *, file: str | None = None) -> list[Space]:
    """The registered spaces that inserted choice points into ``model``, in order. Choice points of
    the generic passes used on their own (``manual``) belong to no space."""
    sg.check_format(model, file=file)
    info = sg.space_of(model)
    names = [str(s["name"]) for s in info.get("spaces", [info] if info else [])]
    reg = spaces()
    return [reg[n] for n in dict.fromkeys(names) if n in reg]


def read_plan(data: Any, model: ir.Model, *, source: str | None = None) -> Plan:
    """A plan for ``model`` from its JSON document, validated (generic and space checks).

    Raises:
        MtcError: not a plan of the supergraph's spaces, or one that does not fit it.
    """
    owners = model_spaces(model, file=source)
    plan = owners[0].read_plan(data, model, source=source) if owners else Plan.from_json(data, source=source)
    plan.validate(model, source=source)
    for sp in owners:
        sp.check_plan(plan, model, source=source)
    return plan


def bind_plan(model: ir.Model, plan: Plan) -> ir.Model:
    """The specialised form of ``model`` under ``plan`` (a clone; ``model`` is not modified)."""
    from mtc.passes.specialize import Specialize

    m = model.clone()
    for sp in model_spaces(model):
        for p in sp.bind_passes(m, plan):
            p(m)
    Specialize(plan=plan)(m)
    return m


def train_network(model: ir.Model, plan: Plan, *, device: str | None = None) -> GraphModule:
    """The network that trains ``plan``: the first of the supergraph's spaces that brings its own
    (:meth:`Space.train_network`), else the specialised form lowered."""
    for sp in model_spaces(model):
        net = sp.train_network(model, plan, device=device)
        if net is not None:
            return net
    from mtc.lower.module import lower

    return lower(bind_plan(model, plan), device=device)


# -------------------------------------------------------------------------------------- compile
@dataclass
class CompileOptions:
    """The options of ``mtc compile`` that every space shares."""

    tasks: Any
    feature: str | None = None
    head_width: int = 256
    seed: int = 0
    space: str = DEFAULT_SPACE
    space_options: dict[str, Any] = field(default_factory=dict)


def compile_supergraph(
    model: ir.Model,
    *,
    tasks: str | Sequence[Any],
    feature: str | None = None,
    head_width: int = 256,
    seed: int = 0,
    space: str = DEFAULT_SPACE,
    passes: str | Sequence[str] | None = None,
    dump_dir: str | Path | None = None,
    dump_after: Sequence[str] = (),
    **space_options: Any,
) -> PipelineResult:
    """Compile an imported backbone into a supergraph of ``space`` (in place).

    The generic passes (``canonicalize``, ``cut-at-feature``, ``attach-heads``) run first, then
    the space's own. ``passes`` (names) runs a different pipeline; the space's passes are named
    by their own names (AutoMTL: ``vcn``). Keyword arguments beyond these are the space's compile
    options (AutoMTL: ``per_task_norm``).

    Raises:
        MtcError: an unknown space, option or pass, or any pass's diagnostic.
    """
    from mtc.passes.manager import PassManager, resolve
    from mtc.passes.pipeline import GENERIC_PIPELINE, prepare_options

    sp = get_space(space)
    opts = resolve_options(sp.compile_options, space_options, what=f"space '{sp.name}'")
    generic = prepare_options(tasks=tasks, feature=feature, head_width=head_width, seed=seed)
    own = sp.passes(model, opts, seed=seed)
    if passes is None:
        pipeline = resolve(list(GENERIC_PIPELINE), generic) + own
    else:
        names = [n.strip() for n in passes.split(",") if n.strip()] if isinstance(passes, str) else list(passes)
        by_name = {p.name: p for p in own}
        pipeline = []
        for n in names:
            if n in by_name:
                pipeline.append(by_name[n])
            else:
                pipeline.extend(resolve([n], generic))
    from mtc.ir.names import gc_paused

    pm = PassManager(pipeline, dump_dir=dump_dir, dump_after=dump_after)
    with gc_paused():
        return pm.run(model)
