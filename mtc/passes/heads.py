"""The ``attach-heads`` pass: one task head per task on the backbone's feature map."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import onnx_ir as ir

from mtc.errors import MtcError
from mtc.ir.names import node_error
from mtc.ir.opset import opset_of
from mtc.ir.shapes import dims, format_shape
from mtc.ir.supergraph import FEATURE_KEY, TASKS_KEY, tasks_json
from mtc.passes.base import Pass, PassResult
from mtc.passes.manager import register_pass
from mtc.tasks.heads import DEFAULT_RATES, DEFAULT_WIDTH, TASK_KEY, build_head, head_prefix
from mtc.tasks.kinds import get_kind
from mtc.tasks.spec import TaskSpec, format_tasks, parse_tasks, tasks_of

__all__ = ["TASKS_KEY", "AttachHeads", "tasks_json", "tasks_of"]

_PASS = "attach-heads"


def _positive_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and int(x) > 0


def _fail(msg: str, node: ir.Node | None = None) -> MtcError:
    return node_error(msg, node, pass_name=_PASS)


@register_pass
class AttachHeads(Pass):
    """Rewrites the feature output into one head per task; the heads' outputs become the outputs.

    Heads come from :func:`mtc.tasks.heads.build_head`: dense kinds get a DeepLab ASPP head
    resized to the input resolution, global kinds pooling and a linear layer. The graph outputs
    are the heads' outputs in task order, each named after its task, and the task list is
    recorded as JSON in ``model.metadata_props["mtc.tasks"]``::

        before: x [N,3,H,W] -> backbone -> feat [N,C,h,w]            (the only output)
        after:  x -> backbone -> feat ─┬─ head@seg/... -> Resize -> seg [N,13,H,W]
                                       └─ head@cls/pool -> Flatten -> head@cls/fc -> cls [N,10]

    Running again with the same tasks finds the heads in place (the recorded task list, and the
    outputs named after the tasks in order) and returns ``modified=False``, so a pipeline can be
    re-run on its own output; with other tasks, or on head nodes (``mtc.task``) without a recorded
    task list, it raises: heads are attached once, to a backbone. A task whose output name or
    ``head@task/`` prefix is taken by the backbone is refused before anything is built.

    Args:
        tasks: the task list, as :class:`TaskSpec` objects or a ``--tasks`` string.
        width: channels of the ASPP branches (256, DeepLabv3; AutoMTL used 1024).
        rates: atrous rates of the ASPP branches, one branch each.
        seed: base seed of the heads' weight initialisation.
    """

    name = _PASS
    options = ("tasks", "width", "rates", "seed")

    def __init__(
        self,
        *,
        tasks: Sequence[TaskSpec] | str,
        width: int = DEFAULT_WIDTH,
        rates: Sequence[int] = DEFAULT_RATES,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(tasks, str):
            tasks = parse_tasks(tasks)
        tasks = list(tasks)
        if not tasks:
            raise MtcError("--tasks: no tasks given (expected e.g. seg,depth)")
        seen: set[str] = set()
        for t in tasks:
            if not isinstance(t, TaskSpec):
                raise MtcError(f"--tasks: expected TaskSpec items, got {type(t).__name__}")
            if t.name in seen:
                raise MtcError(f"--tasks: duplicate task name '{t.name}'")
            seen.add(t.name)
            problem = get_kind(t.kind).channels_problem(t.channels)
            if problem:
                raise MtcError(f"--tasks: task '{t.name}': {problem}")
        if not _positive_int(width):
            raise MtcError(f"{_PASS}: width must be a positive integer, got {width!r}")
        if not rates or not all(_positive_int(r) for r in rates) or len(set(rates)) != len(rates):
            raise MtcError(f"{_PASS}: rates must be distinct positive integers, got {tuple(rates)!r}")
        self.tasks = tasks
        self.width = int(width)
        self.rates = tuple(int(r) for r in rates)
        self.seed = int(seed)

    # ------------------------------------------------------------------ preconditions
    def _attached(self, model: ir.Model) -> bool:
        """True if these heads are already attached; raise if other (or unrecorded) heads are."""
        recorded = tasks_of(model)
        if recorded is None:
            head = next((n for n in model.graph if n.metadata_props.get(TASK_KEY)), None)
            if head is None:
                return False
            raise _fail(
                f"--tasks {format_tasks(self.tasks)}: the graph already has a head for task "
                f"'{head.metadata_props[TASK_KEY]}' but no task list (metadata '{TASKS_KEY}'); "
                "attach-heads runs once, on a backbone cut at its feature",
                head,
            )
        if recorded == self.tasks and [v.name for v in model.graph.outputs] == [t.name for t in self.tasks]:
            return True
        raise _fail(
            f"--tasks {format_tasks(self.tasks)}: the graph already has heads ({format_tasks(recorded)}); "
            "attach-heads runs once, on a backbone cut at its feature"
        )

    def _feature(self, model: ir.Model) -> ir.Value:
        g = model.graph
        outs = list(g.outputs)
        recorded = model.metadata_props.get(FEATURE_KEY)
        if len(outs) != 1:
            names = ", ".join(repr(v.name) for v in outs) or "none"
            raise _fail(
                f"expected exactly one graph output, the feature map, but the graph has {len(outs)} ({names}); "
                "run cut-at-feature first"
            )
        feat = outs[0]
        if recorded is not None and recorded != feat.name:
            raise _fail(
                f"the graph output '{feat.name}' is not the recorded feature '{recorded}' "
                f"(metadata '{FEATURE_KEY}'); run cut-at-feature again"
            )
        if feat.producer() is None:
            raise _fail(f"the graph output '{feat.name}' is not produced by a node: there is no backbone")
        return feat

    def _input_hw(self, model: ir.Model) -> tuple[int, int] | None:
        """Static (H, W) of the one (N, C, H, W) graph input, or None if there is none."""
        acts = [v for v in model.graph.inputs if not v.is_initializer()]
        if len(acts) != 1:
            return None
        d = dims(acts[0])
        if d is None or len(d) != 4:
            return None
        h, w = d[2], d[3]
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            return None
        return h, w

    def _check(self, model: ir.Model) -> ir.Value:
        feat = self._feature(model)
        d = dims(feat)
        given = (feat.meta.get(FEATURE_KEY) or {}).get("given", False)
        where = f"--feature '{feat.name}'" if given else f"the feature '{feat.name}' (see --feature)"
        dense = [t for t in self.tasks if get_kind(t.kind).dense]
        for t in dense:
            if d is None or len(d) != 4:
                raise _fail(
                    f"task '{t.name}' ({t.kind}) is dense and needs an (N, C, H, W) feature map, but {where} "
                    f"has shape {format_shape(feat)}; choose a spatial tensor with --feature",
                    feat.producer(),
                )
        if dense and self._input_hw(model) is None:
            ins = ", ".join(f"'{v.name}' {format_shape(v)}" for v in model.graph.inputs) or "none"
            raise _fail(
                f"task '{dense[0].name}' ({dense[0].kind}) is dense and is resized to the input resolution, "
                f"which needs one (N, C, H, W) graph input with static H, W (inputs: {ins}); "
                "pass --input-shape"
            )
        if d is None or len(d) < 2 or not isinstance(d[1], int):
            raise _fail(
                f"heads need an (N, C, ...) feature with static channels C, but {where} has shape "
                f"{format_shape(feat)}",
                feat.producer(),
            )
        self._check_names(model)
        return feat

    def _check_names(self, model: ir.Model) -> None:
        """Each task's output name and ``head@task/`` prefix must be free in the backbone."""
        g = model.graph
        values = {v.name for v in g.inputs} | set(g.initializers) | {o.name for n in g for o in n.outputs}
        names = {x for x in values | {n.name for n in g} if x}
        for t in self.tasks:
            prefix = head_prefix(t) + "/"
            taken = next((n for n in sorted(names) if n == t.name or n.startswith(prefix)), None)
            if taken is not None:
                raise _fail(
                    f"--tasks: task '{t.name}': the backbone already has a tensor or node named '{taken}'; "
                    "rename the task"
                )

    def requires(self, model: ir.Model) -> None:
        if not self._attached(model):
            self._check(model)

    # ------------------------------------------------------------------ rewrite
    def call(self, model: ir.Model) -> PassResult:
        if self._attached(model):
            return PassResult(model, False)
        feat = self._check(model)
        g = model.graph
        hw = self._input_hw(model) or (1, 1)  # only dense heads read it, and those need an input
        opset = opset_of(model)
        nodes_before = set(g)
        inits_before = set(g.initializers)
        try:
            outs = [
                build_head(
                    g, feat, t, input_hw=hw, width=self.width, rates=self.rates, seed=self.seed, opset=opset
                )
                for t in self.tasks
            ]
        except BaseException:
            # Leave the backbone as it was: take out the heads built before the failure.
            new = [n for n in g if n not in nodes_before]
            for n in new:
                for i in range(len(n.inputs)):
                    n.replace_input_with(i, None)
            g.remove(new)
            for k in [k for k in g.initializers if k not in inits_before]:
                del g.initializers[k]
            raise
        g.outputs.clear()
        g.outputs.extend(outs)
        model.metadata_props[TASKS_KEY] = tasks_json(self.tasks)
        if FEATURE_KEY not in model.metadata_props and feat.name:
            model.metadata_props[FEATURE_KEY] = feat.name
        return PassResult(model, True)
