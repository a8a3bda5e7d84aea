"""make_loader (deterministic batches, missing targets filled) and split (train1 / train2)."""

from __future__ import annotations

import pytest
import torch

from mtc.data import load_data, make_loader, split
from mtc.errors import MtcError
from mtc.tasks.kinds import get_kind
from mtc.tasks.spec import parse_tasks

TASKS = parse_tasks("seg:seg:5,depth,n:class:4")


class Partial(torch.utils.data.Dataset):
    """Sample i has seg when i is even and depth when i % 3 == 0; class never."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        t = {}
        if i % 2 == 0:
            t["seg"] = torch.full((4, 4), i % 5, dtype=torch.long)
        if i % 3 == 0:
            t["depth"] = torch.full((1, 4, 4), float(i + 1))
        return torch.full((1, 4, 4), float(i), dtype=torch.float64), t


def _batches(loader):
    return [(x.clone(), {k: None if v is None else v.clone() for k, v in t.items()}) for x, t in loader]


def test_loader_fills_missing_targets_and_casts_images():
    loader = make_loader(Partial(), TASKS, 4, shuffle=False)
    x, t = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (4, 1, 4, 4)
    assert set(t) == {"seg", "depth", "n"} and t["n"] is None
    assert (t["seg"][1] == 255).all() and (t["seg"][0] == 0).all() and (t["seg"][2] == 2).all()
    assert torch.isnan(t["depth"][1]).all() and (t["depth"][3] == 4.0).all()
    # the kinds' losses skip what was filled in
    seg_pred = torch.randn(4, 5, 4, 4, requires_grad=True)
    loss = get_kind("seg").loss(seg_pred, t["seg"])
    loss.backward()
    assert torch.isfinite(loss) and (seg_pred.grad[1] == 0).all() and (seg_pred.grad[3] == 0).all()
    d = get_kind("depth").loss(torch.zeros(4, 1, 4, 4), t["depth"])
    assert d.item() == pytest.approx((1.0 + 4.0) / 2)


def test_loader_is_deterministic_per_seed_and_epoch():
    ds = Partial()
    a = make_loader(ds, TASKS, 3, shuffle=True, seed=5)
    b = make_loader(ds, TASKS, 3, shuffle=True, seed=5)
    first_a, first_b = _batches(a), _batches(b)
    order = [x[:, 0, 0, 0].tolist() for x, _ in first_a]
    assert order == [x[:, 0, 0, 0].tolist() for x, _ in first_b]
    assert sorted(sum(order, [])) == list(range(10))  # a permutation, last batch short
    assert len(first_a[-1][0]) == 1
    second = [x[:, 0, 0, 0].tolist() for x, _ in _batches(a)]
    assert second != order  # a new epoch reshuffles
    a.sampler.set_epoch(1)  # ... and a resumed run can ask for that epoch's order again
    assert [x[:, 0, 0, 0].tolist() for x, _ in _batches(a)] == second
    other = make_loader(ds, TASKS, 3, shuffle=True, seed=6)
    assert [x[:, 0, 0, 0].tolist() for x, _ in _batches(other)] != order
    assert len(_batches(make_loader(ds, TASKS, 3, drop_last=True))) == 3


def test_loader_on_builtin_is_bitwise_reproducible():
    tasks = parse_tasks("seg,depth,normal")
    train, _ = load_data("scenes?n_train=6&n_val=2", tasks, (3, 16, 16), seed=1)
    runs = [_batches(make_loader(train, tasks, 4, seed=2)) for _ in range(2)]
    for (xa, ta), (xb, tb) in zip(*runs, strict=True):
        assert torch.equal(xa, xb)
        for k in ta:
            assert torch.equal(ta[k], tb[k])


def test_split_is_disjoint_seeded_and_complete():
    ds = Partial()
    a, b = split(ds, 0.3, seed=0)
    assert len(a) == 3 and len(b) == 7
    assert sorted(a.indices + b.indices) == list(range(10))
    assert split(ds, 0.3, seed=0)[0].indices == a.indices
    assert any(split(ds, 0.3, seed=s)[0].indices != a.indices for s in range(1, 5))
    assert len(split(ds, 0.01, seed=0)[0]) == 1  # each part keeps a sample
    with pytest.raises(MtcError):
        split(ds, 1.0)
    with pytest.raises(MtcError):
        make_loader(ds, TASKS, 0)


class _Turns(torch.utils.data.Dataset):
    """Sample i's target turns from shape (1,) to (3,) from the 11th read on (a changing source)."""

    def __init__(self, fixed: bool) -> None:
        self.reads = 0
        if fixed:
            self.fixed_samples = True  # on the instance: only the class's flag counts

    def __len__(self):
        return 8

    def __getitem__(self, i):
        self.reads += 1
        return torch.zeros(1, 4, 4), {"a": torch.zeros(3 if self.reads > 10 else 1)}


class _FixedTurns(_Turns):
    fixed_samples = True


def test_samples_that_do_not_change_are_checked_on_their_first_read_only(monkeypatch):
    from mtc.data import GeneratedDataset, PartialLabels, registry
    from mtc.data.common import fixed_samples
    from mtc.tasks.spec import TaskSpec
    from mtc.train.loop import Batcher

    gen = GeneratedDataset(12, lambda i: (torch.full((1, 4, 4), float(i)), {"a": torch.tensor([float(i)])}))
    assert fixed_samples(gen) and fixed_samples(PartialLabels(gen, 0.5, 0))
    assert fixed_samples(torch.utils.data.Subset(gen, [1, 2]))
    assert not fixed_samples(Partial()) and not fixed_samples(_Turns(fixed=True)) and fixed_samples(_FixedTurns(False))

    calls = []
    real = registry.sample_problem
    monkeypatch.setattr(registry, "sample_problem", lambda s, *a, **k: calls.append(1) or real(s, *a, **k))
    tasks = [TaskSpec("a", "regress", 1)]
    b = Batcher(gen, tasks, 4, 0, "train", shape=(1, 4, 4))
    for step in range(9):  # three epochs
        b.host_batch(step)
    assert len(calls) == 12  # each sample once

    # A data set that may change is checked on every read: the 11th read is caught.
    b = Batcher(_Turns(fixed=False), tasks, 4, 0, "train", shape=(1, 4, 4))
    b.host_batch(0), b.host_batch(1)
    with pytest.raises(MtcError, match=r"task 'a': target shape \(3,\)"):
        b.host_batch(2)


def test_collation_of_fully_labelled_batches_equals_the_per_sample_conversion():
    from mtc.tasks.batch import collate_targets

    g = torch.Generator().manual_seed(0)
    ints = [torch.randint(0, 5, (4, 4), generator=g, dtype=torch.int32) for _ in range(5)]
    got = collate_targets(ints, get_kind("seg"))
    assert got.dtype == torch.long and torch.equal(got, torch.stack([t.long() for t in ints]))
    mixed = [torch.tensor([1.5]), torch.tensor([2.0], dtype=torch.float64)]
    got = collate_targets(mixed, get_kind("regress"))
    assert got.dtype == torch.float32 and torch.equal(got, torch.tensor([[1.5], [2.0]]))
    with_missing = collate_targets([torch.tensor(3), None], get_kind("class"))
    assert with_missing.tolist() == [3, get_kind("class").missing_target(()).item()]
