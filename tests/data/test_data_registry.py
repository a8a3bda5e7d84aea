"""The ``--data`` spec: parsing, plug-in factories, and one-line errors for bad input."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch

from mtc.data import builtin_names, load_data, parse_data_spec, parse_value, register_data
from mtc.data.registry import BUILTINS
from mtc.errors import MtcError
from mtc.tasks.spec import parse_tasks

SHAPE = (3, 16, 16)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Write a module with the given source on sys.path; return its (unique) name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(source: str) -> str:
        name = f"mtc_test_plugin_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield make
    for n in names:
        sys.modules.pop(n, None)


GOOD = """
import torch

class DS(torch.utils.data.Dataset):
    def __init__(self, n, shape, extra=None, image_shape=None):
        self.n, self.shape, self.extra, self.image_shape = n, shape, extra, image_shape
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        t = {"a": torch.tensor([float(i)])}
        if i % 2:
            t["b"] = torch.tensor(i % 3)
        if self.extra:
            t[self.extra] = torch.tensor([0.0])
        return torch.zeros(self.image_shape or self.shape), t

def factory(tasks, input_shape, seed, n: int = 6, scale: float = 1.0, extra: str = "", flag: bool = False,
            image_c: int = 0):
    shape = (image_c, *input_shape[1:]) if image_c else None
    factory.calls = (tasks, input_shape, seed, n, scale, extra, flag)
    return DS(n, input_shape, extra or None, shape), DS(3, input_shape)

def loose(tasks, input_shape, seed, **options):
    loose.options = options
    return DS(2, input_shape), DS(2, input_shape)

def raises(tasks, input_shape, seed):
    raise ValueError("no such file: data.npz")

def not_pair(tasks, input_shape, seed):
    return [1, 2, 3]

NOT_CALLABLE = 3
"""

TASKS = parse_tasks("a:regress,b:class:3")


def test_parse_spec_and_values():
    s = parse_data_spec(" scenes?n_train=10&fov=50.5&cache=true&name=x,y&& ")
    assert s.target == "scenes"
    assert s.options == {"n_train": "10", "fov": "50.5", "cache": "true", "name": "x,y"}
    assert parse_data_spec("pkg.mod:make").options == {}
    assert [parse_value(v) for v in ("3", "-2", "0.5", "1e-3", "true", "No", "abc", "")] == [
        3, -2, 0.5, 1e-3, True, False, "abc", ""
    ]


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("", "no data set given"),
        ("?n=1", "no data set name"),
        ("scenes?n_train", "has no value"),
        ("scenes?1x=2", "not an identifier"),
        ("scenes?a=1&a=2", "given twice"),
    ],
)
def test_bad_spec_syntax(spec, needle):
    with pytest.raises(MtcError) as e:
        parse_data_spec(spec)
    assert needle in str(e.value) and "--data" in str(e.value) and "\n" not in str(e.value)


def test_plugin_factory_gets_tasks_shape_seed_and_typed_options(plugin):
    mod = plugin(GOOD)
    train, val = load_data(f"{mod}:factory?n=4&scale=2&extra=&flag=1", TASKS, (1, *SHAPE), seed=7)
    calls = sys.modules[mod].factory.calls
    assert calls[0] == TASKS and calls[1] == SHAPE and calls[2] == 7  # the batch dim was dropped
    assert calls[3:] == (4, 2.0, "", True)
    assert isinstance(calls[4], float)
    assert len(train) == 4 and len(val) == 3
    load_data(f"{mod}:loose?x=1&y=z", TASKS, SHAPE, 0)
    assert sys.modules[mod].loose.options == {"x": 1, "y": "z"}


def test_register_data_name(plugin):
    mod = plugin(GOOD)
    register_data("mine_test", f"{mod}:factory")
    try:
        assert "mine_test" in builtin_names()
        train, _ = load_data("mine_test?n=2", TASKS, SHAPE, 0)
        assert len(train) == 2
    finally:
        BUILTINS.pop("mine_test")


def _error(spec, tasks=TASKS, shape=SHAPE) -> str:
    with pytest.raises(MtcError) as e:
        load_data(spec, tasks, shape, 0)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--data '"), msg
    return msg


def test_errors_name_spec_and_problem(plugin):
    mod = plugin(GOOD)
    msg = _error("no_such_module_xyz:f")
    assert "cannot import module 'no_such_module_xyz'" in msg and "no_such_module_xyz:f" in msg
    assert "has no attribute" in _error(f"{mod}:nope")
    assert "not a callable" in _error(f"{mod}:NOT_CALLABLE")
    assert "unknown data set 'nosuch'" in _error("nosuch") and "scenes" in _error("nosuch")
    msg = _error(f"{mod}:raises")
    assert "factory raised ValueError: no such file: data.npz" in msg
    assert "(train, val) pair" in _error(f"{mod}:not_pair")
    msg = _error(f"{mod}:factory?bogus=1")
    assert "unknown option 'bogus'" in msg and "scale" in msg
    assert "option n expects int, got 'many'" in _error(f"{mod}:factory?n=many")
    assert "option scale expects float" in _error(f"{mod}:factory?scale=x")
    assert "the train set is empty" in _error(f"{mod}:factory?n=0")


def test_error_unknown_task_target(plugin):
    mod = plugin(GOOD)
    msg = _error(f"{mod}:factory?extra=zzz")
    assert "task 'zzz'" in msg and "not in --tasks" in msg and "train sample 0" in msg


def test_error_image_shape(plugin):
    mod = plugin(GOOD)
    msg = _error(f"{mod}:factory?image_c=1")
    assert "(1, 16, 16)" in msg and "(3, 16, 16)" in msg and "image shape" in msg


def test_error_module_failing_at_import(plugin):
    mod = plugin("raise RuntimeError('boom at import')\n")
    msg = _error(f"{mod}:f")
    assert f"cannot import module '{mod}'" in msg and "boom at import" in msg


def test_error_target_format(plugin):
    mod = plugin(
        """
        import torch
        def f(tasks, input_shape, seed, bad: str = "shape"):
            c, h, w = input_shape
            tgt = {
                "shape": {"s": torch.zeros(h + 1, w, dtype=torch.long)},
                "float": {"s": torch.zeros(h, w)},
                "label": {"s": torch.full((h, w), 7)},
                "depth": {"d": torch.zeros(1, h, w, dtype=torch.long)},
            }[bad]
            return [(torch.zeros(input_shape), tgt)], [(torch.zeros(input_shape), {})]
        """
    )
    tasks = parse_tasks("s:seg:5,d:depth")
    assert "task 's'" in _error(f"{mod}:f?bad=shape", tasks) and "target shape (17, 16)" in _error(
        f"{mod}:f?bad=shape", tasks
    )
    assert "labels must be integers" in _error(f"{mod}:f?bad=float", tasks)
    assert "labels must lie in [0, 5)" in _error(f"{mod}:f?bad=label", tasks)
    assert "targets must be float" in _error(f"{mod}:f?bad=depth", tasks)


def test_builtin_factory_errors_are_prefixed():
    msg = _error("relatedness", parse_tasks("seg,depth"))
    assert "exactly two tasks of kind regress" in msg and "seg (seg:13)" in msg
    assert "unknown option 'rhoo'" in _error("relatedness?rhoo=1", parse_tasks("a:regress,b:regress"))


def test_plain_lists_are_datasets(plugin):
    mod = plugin(
        """
        import numpy as np
        def f(tasks, input_shape, seed):
            s = (np.zeros(input_shape, dtype=np.float32), {"a": np.array([1.0], dtype=np.float32)})
            return [s, s], [s]
        """
    )
    train, val = load_data(f"{mod}:f", TASKS, SHAPE, 0)
    assert len(train) == 2 and torch.as_tensor(val[0][0]).shape == SHAPE
