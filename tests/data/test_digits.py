"""``digits``: scikit-learn's 8x8 digits as class tasks at the backbone's resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from mtc.data import load_data, make_loader
from mtc.errors import MtcError
from mtc.tasks.spec import parse_tasks

SK = load_digits()
TASKS = parse_tasks("digit:class,parity:class:2,ge5:class:2")


def test_labels_match_sklearn_and_split_is_disjoint():
    train, val = load_data("digits", TASKS, (3, 16, 16), 0)
    src_t, src_v = train.source_index, val.source_index
    assert len(train) + len(val) == 1797 and len(val) == round(0.2 * 1797)
    assert not set(src_t) & set(src_v)
    for ds, src in ((train, src_t), (val, src_v)):
        for i in (0, 7, len(ds) - 1):
            x, t = ds[i]
            d = int(SK.target[src[i]])
            assert (int(t["digit"]), int(t["parity"]), int(t["ge5"])) == (d, d % 2, int(d >= 5))
            assert t["digit"].dtype == torch.int64 and t["digit"].shape == ()
            ref = F.interpolate(torch.tensor(SK.images[src[i]] / 16.0, dtype=torch.float32)[None, None],
                                size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32
            assert torch.allclose(x[0], ref, atol=1e-6) and torch.equal(x[0], x[2])
    again, _ = load_data("digits", TASKS, (3, 16, 16), 0)
    assert torch.equal(again[5][0], train[5][0])
    other, _ = load_data("digits", TASKS, (3, 16, 16), 1)
    assert list(other.source_index) != list(src_t)


def test_rotated_task_rotates_inputs():
    tasks = parse_tasks("digit:class,rotated:class:4")
    train, _ = load_data("digits", tasks, (1, 8, 8), 0)  # 8x8: the bilinear resize is the identity
    ks = []
    for i in range(40):
        x, t = train[i]
        k = int(t["rotated"])
        ks.append(k)
        src = train.source_index[i]
        assert np.allclose(x[0].numpy(), np.rot90(SK.images[src] / 16.0, k))
        assert int(t["digit"]) == SK.target[src]
    assert set(ks) == {0, 1, 2, 3}
    plain, _ = load_data("digits", parse_tasks("digit:class"), (1, 8, 8), 0)
    assert np.allclose(plain[0][0][0].numpy(), SK.images[plain.source_index[0]] / 16.0)  # upright
    binary, _ = load_data("digits?rotations=2", parse_tasks("rotated:class:2"), (1, 8, 8), 0)
    assert {int(binary[i][1]["rotated"]) for i in range(40)} == {0, 1}


def test_partial_labels_and_loader():
    train, _ = load_data("digits?label_fraction=0.25&partial_tasks=parity", TASKS, (1, 8, 8), 0)
    _, t = next(iter(make_loader(train, TASKS, 200, shuffle=False)))
    missing = (t["parity"] == -1).float().mean().item()
    assert 0.6 < missing < 0.9 and (t["digit"] >= 0).all()


@pytest.mark.parametrize(
    "tasks,spec,needle",
    [
        ("odd:class", "digits", "no task 'odd' (known: digit, parity, ge5, rotated)"),
        ("digit:regress", "digits", "must be of kind class"),
        ("digit:class:5", "digits", "at least 10 channels"),
        ("rotated:class:2", "digits", "at least 4 channels"),
        ("digit:class", "digits?rotations=3", "rotations must be 2 or 4"),
        ("digit:class", "digits?val_fraction=0", "empty split"),
    ],
)
def test_errors(tasks, spec, needle):
    with pytest.raises(MtcError) as e:
        load_data(spec, parse_tasks(tasks), (1, 8, 8), 0)
    assert needle in str(e.value) and str(e.value).startswith(f"--data '{spec}'"), str(e.value)
