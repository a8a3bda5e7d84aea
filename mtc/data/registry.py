"""The ``--data`` spec: pick a dataset factory, pass it options, check what it returns.

A spec is ``name[?key=value&...]`` (a built-in or registered name) or
``pkg.module:factory[?key=value&...]`` (any importable callable). The factory is called as::

    factory(tasks, input_shape, seed, **options) -> (train, val)

with ``tasks`` a list of :class:`~mtc.tasks.spec.TaskSpec`, ``input_shape`` the backbone's
``(C, H, W)`` and ``seed`` an int. ``train`` and ``val`` are map-style datasets (``__len__`` and
``__getitem__``) whose samples are ``(image, {task: target})``: ``image`` a float ``(C, H, W)``
tensor, ``targets`` a dict in which a task may be absent (that sample is unlabelled for it).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mtc.errors import MtcError
from mtc.tasks.kinds import get_kind
from mtc.tasks.spec import TaskSpec

__all__ = [
    "BUILTINS",
    "DataSpec",
    "builtin_names",
    "expected_target_shapes",
    "load_data",
    "parse_data_spec",
    "parse_value",
    "register_data",
    "resolve_data_factory",
]

_ARG = "--data"
#: name -> factory, or "module:attr" imported on first use (keeps ``import mtc.data`` light)
BUILTINS: dict[str, Callable[..., Any] | str] = {
    "scenes": "mtc.data.scenes:make_scenes",
    "relatedness": "mtc.data.relatedness:make_relatedness",
    "digits": "mtc.data.digits:make_digits",
}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}
#: samples of each split whose format :func:`load_data` checks
CHECK_SAMPLES = 4
#: A data set with more samples than this is refused (a permutation of it would not fit in memory).
MAX_SAMPLES = 10**9


def builtin_names() -> list[str]:
    """The names a spec can use without ``module:``, sorted."""
    return sorted(BUILTINS)


def register_data(name: str, factory: Callable[..., Any] | str) -> None:
    """Make ``factory`` (a callable or ``"pkg.module:attr"``) available as ``--data name``."""
    if not _KEY.fullmatch(name):
        raise ValueError(f"data set name '{name}' is not an identifier")
    BUILTINS[name] = factory


class DataSpec:
    """A parsed spec: ``target`` (name or ``module:attr``) and raw ``options`` (strings)."""

    def __init__(self, text: str, target: str, options: dict[str, str]) -> None:
        self.text = text
        self.target = target
        self.options = options

    def __repr__(self) -> str:
        return f"DataSpec({self.text!r})"


def _fail(spec: str, msg: str) -> MtcError:
    return MtcError(f"{_ARG} '{spec}': {msg}")


def parse_data_spec(text: str) -> DataSpec:
    """Split ``target?key=value&...``; values stay strings (see :func:`parse_value`).

    Raises:
        MtcError: empty spec or target, a pair without ``=``, a key that is not an identifier,
            a key given twice.
    """
    if not isinstance(text, str) or not text.strip():
        raise MtcError(f"{_ARG}: no data set given (expected e.g. scenes or pkg.module:factory)")
    spec = text.strip()
    target, _, query = spec.partition("?")
    target = target.strip()
    if not target:
        raise _fail(spec, "no data set name before '?'")
    options: dict[str, str] = {}
    if query:
        for pair in query.split("&"):
            if not pair:
                continue  # tolerate "a=1&&b=2" and a trailing '&'
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq:
                raise _fail(spec, f"option '{pair}' has no value (expected key=value)")
            if not _KEY.fullmatch(key):
                raise _fail(spec, f"option name '{key}' is not an identifier")
            if key in options:
                raise _fail(spec, f"option '{key}' given twice")
            options[key] = value.strip()
    return DataSpec(spec, target, options)


def parse_value(text: str) -> int | float | bool | str:
    """A query value as int, float, bool (``true/false/yes/no/on/off``) or, failing those, str."""
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _coerce(spec: str, key: str, raw: str, default: Any) -> Any:
    """``raw`` converted to the type of ``default`` (auto-parsed when the default is None)."""
    if default is None or default is inspect.Parameter.empty:
        return parse_value(raw)
    want = type(default)
    value = parse_value(raw)
    if want is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        return raw
    else:
        return value
    raise _fail(spec, f"option {key} expects {want.__name__}, got '{raw}'")


def resolve_data_factory(spec: DataSpec | str) -> Callable[..., Any]:
    """The factory a spec names (a registered name or ``pkg.module:attr``)."""
    from mtc.frontends.torch import resolve_factory

    ds = parse_data_spec(spec) if isinstance(spec, str) else spec
    target = ds.target
    entry: Callable[..., Any] | str | None = BUILTINS.get(target)
    if entry is None and ":" not in target:
        raise _fail(
            ds.text,
            f"unknown data set '{target}' (built-in: {', '.join(builtin_names())}; or pkg.module:factory)",
        )
    path = entry if isinstance(entry, str) else target if entry is None else None
    if path is not None:
        try:
            entry = resolve_factory(path)
        except MtcError as e:
            raise _fail(ds.text, e.message) from None
        except Exception as e:  # the module itself failed (SyntaxError, an error at import time)
            mod = path.partition(":")[0]
            raise _fail(ds.text, f"cannot import module '{mod}': {type(e).__name__}: {e}") from None
    if not callable(entry):
        raise _fail(ds.text, f"'{target}' is a {type(entry).__name__}, not a callable factory")
    return entry


def _options_for(ds: DataSpec, factory: Callable[..., Any]) -> dict[str, Any]:
    """Check option names against the factory's signature and convert values to its defaults' types."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: pass values through
        return {k: parse_value(v) for k, v in ds.options.items()}
    # The first three positional parameters receive tasks, input_shape, seed.
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    taken = {p.name for p in positional[:3]}
    named = {
        p.name: p
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in taken
    }
    varkw = any(p.kind == p.VAR_KEYWORD for p in params)
    out: dict[str, Any] = {}
    for key, raw in ds.options.items():
        p = named.get(key)
        if p is None:
            if not varkw:
                known = ", ".join(sorted(named)) or "none"
                raise _fail(ds.text, f"unknown option '{key}' (options: {known})")
            out[key] = parse_value(raw)
        else:
            out[key] = _coerce(ds.text, key, raw, p.default)
    return out


def _input_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in shape)
    if len(dims) == 4:
        dims = dims[1:]  # (N, C, H, W): the batch dimension is not the data's business
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise MtcError(f"{_ARG}: the input shape must be (C, H, W) with positive sizes, got {tuple(shape)}")
    return dims  # type: ignore[return-value]


def load_data(
    spec: str,
    tasks: Sequence[TaskSpec],
    input_shape: Sequence[int],
    seed: int = 0,
) -> tuple[Any, Any]:
    """Build ``(train, val)`` from a ``--data`` spec and check that they fit the tasks and input.

    Args:
        spec: ``name[?key=value&...]`` or ``pkg.module:factory[?key=value&...]``.
        tasks: the task list (``--tasks``).
        input_shape: the backbone input, ``(C, H, W)`` (a leading batch dimension is dropped).
        seed: passed to the factory; built-ins are a deterministic function of it.

    Returns:
        The factory's train and validation datasets, unchanged.

    Raises:
        MtcError: one line naming ``--data`` and the spec: a spec that does not parse or import,
            an unknown option or a value of the wrong type, a factory that raises or returns
            something else than two non-empty map-style datasets, or (in the first
            :data:`CHECK_SAMPLES` samples of each) a sample that is not ``(image, dict)``, an
            image whose shape differs from ``input_shape``, a target for a task not in ``tasks``,
            or a target whose shape, dtype or labels do not suit its task.
    """
    ds = parse_data_spec(spec)
    shape = _input_shape(input_shape)
    factory = resolve_data_factory(ds)
    options = _options_for(ds, factory)
    task_list = list(tasks)
    try:
        result = factory(task_list, shape, int(seed), **options)
    except MtcError as e:
        raise _fail(ds.text, e.message) from None
    except (Exception, SystemExit) as e:  # a plug-in calling sys.exit() must not end mtc silently
        raise _fail(ds.text, f"factory raised {type(e).__name__}: {e}") from None
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise _fail(ds.text, f"factory returned {type(result).__name__}, expected a (train, val) pair")
    train, val = result
    for split, data in (("train", train), ("val", val)):
        _check_dataset(ds.text, split, data, task_list, shape)
    return train, val


def _check_dataset(spec: str, split: str, data: Any, tasks: list[TaskSpec], shape: tuple[int, ...]) -> None:
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise _fail(spec, f"the {split} set is a {type(data).__name__}, not a map-style dataset")
    try:
        n = len(data)
    except Exception as e:
        raise _fail(spec, f"the {split} set's __len__ raised {type(e).__name__}: {e}") from None
    if n == 0:
        raise _fail(spec, f"the {split} set is empty")
    if not isinstance(n, int) or n > MAX_SAMPLES:
        raise _fail(spec, f"the {split} set claims {n} samples; at most {MAX_SAMPLES:,} are supported "
                          "(batches draw permutations of the whole set)")
    by_name = {t.name: t for t in tasks}
    for i in range(min(n, CHECK_SAMPLES)):
        where = f"{split} sample {i}"
        try:
            sample = data[i]
        except Exception as e:
            raise _fail(spec, f"{where}: the dataset raised {type(e).__name__}: {e}") from None
        _check_sample(spec, where, sample, by_name, shape)


def sample_problem(sample: Any, tasks: Mapping[str, TaskSpec], shape: tuple[int, ...], *,
                   other_tasks: bool = False) -> tuple[str, str | None] | None:
    """What is wrong with one ``(image, {task: target})`` sample, as ``(message, task)``, or None.

    ``other_tasks``: targets of tasks not in ``tasks`` are ignored (a single-task baseline trains
    on the data of every task) instead of being a problem.
    """
    import torch

    if not isinstance(sample, tuple | list) or len(sample) != 2 or not isinstance(sample[1], Mapping):
        return "is not an (image, {task: target}) pair", None
    image, targets = sample
    try:
        image = torch.as_tensor(image)
    except Exception:
        return f"the image is a {type(image).__name__}, not a tensor", None
    if tuple(image.shape) != shape:
        return f"image shape {tuple(image.shape)} differs from the backbone input {shape} (C, H, W)", None
    if not image.is_floating_point():
        return f"the image is {image.dtype}, expected a float tensor", None
    unknown = [k for k in targets if k not in tasks]
    if unknown and not other_tasks:
        return (f"has a target for task '{unknown[0]}', which is not in --tasks ({', '.join(tasks) or 'none'})",
                unknown[0])
    for name, target in targets.items():
        if target is None or name not in tasks:
            continue
        problem = _target_problem(tasks[name], target, shape[1:])
        if problem:
            return problem, name
    return None


def _check_sample(
    spec: str, where: str, sample: Any, tasks: Mapping[str, TaskSpec], shape: tuple[int, ...]
) -> None:
    found = sample_problem(sample, tasks, shape)
    if found is not None:
        msg, task = found
        sep = " " if msg.startswith(("is ", "has ")) else ": "
        raise _fail(spec, f"{where}{sep}" + (f"task '{task}': {msg}" if task and not msg.startswith("has ") else msg))


def expected_target_shapes(task: TaskSpec, hw: Sequence[int]) -> list[tuple[int, ...]]:
    """The per-sample target shapes a task of this kind accepts (first one: the preferred)."""
    h, w = hw
    kind = get_kind(task.kind)
    c = task.channels
    if task.kind == "seg":
        return [(h, w), (1, h, w)]
    if kind.dense:
        return [(c, h, w), (h, w)] if c == 1 else [(c, h, w)]
    if kind.integer_targets:  # class
        return [(), (1,)]
    return [(c,), ()] if c == 1 else [(c,)]


def _target_problem(task: TaskSpec, target: Any, hw: Sequence[int]) -> str | None:
    import torch

    try:
        t = torch.as_tensor(target)
    except Exception:
        return f"the target is a {type(target).__name__}, not a tensor"
    shapes = expected_target_shapes(task, hw)
    if tuple(t.shape) not in shapes:
        return f"target shape {tuple(t.shape)}, expected {' or '.join(str(s) for s in shapes)} ({task.kind})"
    kind = get_kind(task.kind)
    if kind.integer_targets:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            return f"{task.kind} labels must be integers, got {t.dtype}"
        ignore = getattr(kind, "ignore_index", None)
        if t.numel() == 1:  # one class label: read it, not four tensor ops (every sample is checked)
            v = int(t)
            if v == ignore or (ignore is None and v < 0):
                return None
            lo = hi = v
        else:
            labels = t[t != ignore] if ignore is not None else t[t >= 0]
            if not labels.numel():
                return None
            lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= task.channels:
            extra = f" or {ignore}" if ignore is not None else " (or negative: missing)"
            return f"labels must lie in [0, {task.channels}){extra}, got {lo}..{hi}"
    elif not t.is_floating_point():
        return f"{task.kind} targets must be float, got {t.dtype}"
    return None
