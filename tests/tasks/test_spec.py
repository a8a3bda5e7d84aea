"""The ``--tasks`` parser: forms, defaults, one-line errors, and property tests."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtc.errors import MtcError
from mtc.tasks.kinds import KINDS
from mtc.tasks.spec import TaskSpec, format_tasks, parse_tasks


def test_bare_kinds_take_defaults():
    assert parse_tasks("seg,depth") == [TaskSpec("seg", "seg", 13), TaskSpec("depth", "depth", 1)]
    assert parse_tasks(" normal , class ,regress,edge,keypoint") == [
        TaskSpec("normal", "normal", 3),
        TaskSpec("class", "class", 10),
        TaskSpec("regress", "regress", 1),
        TaskSpec("edge", "edge", 1),
        TaskSpec("keypoint", "keypoint", 1),
    ]


def test_explicit_forms():
    assert parse_tasks("seg:seg:13,depth:depth:1,normal:normal:3") == [
        TaskSpec("seg", "seg", 13),
        TaskSpec("depth", "depth", 1),
        TaskSpec("normal", "normal", 3),
    ]
    assert parse_tasks("sem:seg") == [TaskSpec("sem", "seg", 13)]
    assert parse_tasks("sem:seg:40,seg:19") == [TaskSpec("sem", "seg", 40), TaskSpec("seg", "seg", 19)]
    assert parse_tasks("digit_0:class:10,Sum2:regress:3") == [
        TaskSpec("digit_0", "class", 10),
        TaskSpec("Sum2", "regress", 3),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no tasks given"),
        ("   ", "no tasks given"),
        ("foo", "task 'foo' is not a kind; write foo:KIND .* in 'foo'"),
        (
            "a:segm",
            "unknown kind 'segm' \\(known: class, depth, edge, keypoint, normal, regress, seg\\) in 'a:segm'",
        ),
        ("seg,depth,seg", "duplicate task name 'seg' in 'seg'"),
        ("a:seg,a:depth", "duplicate task name 'a' in 'a:depth'"),
        ("seg:0", "channels must be a positive integer, got '0' in 'seg:0'"),
        ("a:seg:-3", "channels must be a positive integer, got '-3'"),
        ("a:seg:2.5", "channels must be a positive integer, got '2.5'"),
        ("a:seg:x", "channels must be a positive integer, got 'x'"),
        ("a:seg:99999999999", "too large"),
        ("1a:seg", "task name '1a' is not an identifier"),
        ("a-b:seg", "task name 'a-b' is not an identifier"),
        ("seg@x:seg", "is not an identifier"),
        (":seg", "empty task name"),
        ("a::3", "empty kind"),
        ("a:seg:3:4", "expected name\\[:kind\\]\\[:channels\\]"),
        ("seg,,depth", "empty item"),
        ("seg,", "empty item"),
        ("normal:4", "kind normal needs 3 channels, got 4"),
        ("seg:1", "kind seg needs at least 2 channels"),
    ],
)
def test_errors_name_the_argument_and_item(text, message):
    with pytest.raises(MtcError, match=message) as e:
        parse_tasks(text)
    assert str(e.value).startswith("--tasks: ")
    assert "\n" not in str(e.value)


_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)


@st.composite
def _task_lists(draw):
    names = draw(st.lists(_NAMES, min_size=1, max_size=6, unique=True))
    out = []
    for name in names:
        kind = draw(st.sampled_from(sorted(KINDS)))
        k = KINDS[kind]
        if k.fixed_channels is not None:
            channels = k.fixed_channels
        else:
            channels = draw(st.integers(min_value=k.min_channels, max_value=4096))
        out.append(TaskSpec(name, kind, channels))
    return out


@settings(max_examples=200, deadline=None)
@given(_task_lists())
def test_format_round_trips(tasks):
    text = format_tasks(tasks)
    assert parse_tasks(text) == tasks
    # The formatted text is canonical: formatting what it parses to gives it back.
    assert format_tasks(parse_tasks(text)) == text


_ALPHABET = string.ascii_letters + string.digits + ":,_- .@\t\n+é0"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=30))
def test_any_text_parses_or_raises_mtc_error(text):
    try:
        tasks = parse_tasks(text)
    except MtcError as e:
        assert str(e).startswith("--tasks: ") and "\n" not in str(e)
    else:
        assert tasks and len({t.name for t in tasks}) == len(tasks)
        assert all(t.kind in KINDS and t.channels > 0 for t in tasks)


@settings(max_examples=200, deadline=None)
@given(
    _task_lists(),
    st.sampled_from(
        ["dup", "bad_kind", "zero", "negative", "float", "bad_name", "empty_item", "bare_unknown"]
    ),
)
def test_invalid_specs_always_raise_mtc_error(tasks, how):
    items = [format_tasks([t]) for t in tasks]
    t0 = tasks[0]
    if how == "dup":
        items.append(f"{t0.name}:{t0.kind}")
    elif how == "bad_kind":
        items.append("zz_task:nokind")
    elif how == "zero":
        items[0] = f"{t0.name}:{t0.kind}:0"
    elif how == "negative":
        items[0] = f"{t0.name}:{t0.kind}:-{t0.channels}"
    elif how == "float":
        items[0] = f"{t0.name}:{t0.kind}:{t0.channels}.0"
    elif how == "bad_name":
        items[0] = f"9{t0.name}:{t0.kind}"
    elif how == "empty_item":
        items.insert(1, "")
    elif how == "bare_unknown":
        items.append("zz_not_a_kind")
    with pytest.raises(MtcError, match="^--tasks: "):
        parse_tasks(",".join(items))


def test_non_string_is_an_mtc_error():
    with pytest.raises(MtcError, match="expected a string"):
        parse_tasks(None)  # type: ignore[arg-type]


def test_str_of_a_spec():
    assert str(TaskSpec("sem", "seg", 40)) == "sem:seg:40"
    assert str(TaskSpec("depth", "depth", 1)) == "depth"
