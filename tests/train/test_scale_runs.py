"""Trainer runs with the scale options: every weighting trains a lowered two-task network and
resumes exactly; batches prepared by worker processes are bitwise those of the trainer's own
process; --amp (bfloat16 on the CPU) trains and its loss falls."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKBONES

from mtc.spaces import OptimizerSpec, Stage, Update
from mtc.tasks.spec import TaskSpec
from mtc.train.loop import Batcher
from mtc.train.run import RunDir
from mtc.train.trainer import Stopped, TrainConfig, Trainer

TASKS = [TaskSpec("a", "regress", 1), TaskSpec("b", "class", 2)]


class Data(torch.utils.data.Dataset):
    """Two learnable tasks on fixed random images (a pure function of the index)."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.a = self.x.mean((1, 2, 3)).unsqueeze(-1) * 10
        self.b = (self.x[:, 0].mean((1, 2)) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {"a": self.a[i], "b": self.b[i]}


_MODEL = None


def _module():
    global _MODEL
    from mtc.frontends import import_model
    from mtc.lower.module import lower
    from mtc.passes.pipeline import prepare_multitask

    if _MODEL is None:
        m = import_model(BACKBONES / "tiny_resnet.onnx", input_shape=(1, 3, 32, 32))
        prepare_multitask(m, tasks="a:regress:1,b:class:2", head_width=8)
        _MODEL = m
    torch.manual_seed(0)
    return lower(_MODEL.clone() if hasattr(_MODEL, "clone") else _MODEL)


def _trainer(run, module, *, steps=6, **cfg):
    weights = {k: p for k, p in module.named_initializers().items() if isinstance(p, torch.nn.Parameter)}
    config = TrainConfig(batch_size=4, checkpoint_every=3, log_every=1, **cfg)
    return Trainer(run, module, TASKS, optimizers=[OptimizerSpec("weights", weights, 1e-3)],
                   streams={"train": Data()}, stages=[Stage("train", steps, [Update("train", ("weights",))])],
                   config=config, name="train", progress=False)


def _weights(module):
    return {k: v.detach().clone() for k, v in module.ir_state().items()}


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa", "gradnorm", "pcgrad"])
def test_every_weighting_trains_and_resumes_exactly(tmp_path, weighting):
    # 24 samples / batch 4: a data epoch is 6 steps, so 14 steps reach DWA's third epoch
    ref = _module()
    t = _trainer(RunDir(tmp_path / "ref"), ref, steps=14, weighting=weighting)
    t.run()
    recs = RunDir(tmp_path / "ref").records()
    assert all("weighting" in r or weighting == "pcgrad" for r in recs)
    if weighting == "dwa":
        assert recs[0]["weighting"] == {"a": 1.0, "b": 1.0} and recs[-1]["weighting"] != {"a": 1.0, "b": 1.0}
    if weighting == "gradnorm":
        assert sum(recs[-1]["weighting"].values()) == pytest.approx(2.0)
        assert not recs[-1]["gradnorm_layer"].startswith("head")
    killed = _module()
    with pytest.raises(Stopped):
        _trainer(RunDir(tmp_path / "k"), killed, steps=14, weighting=weighting).run(stop_after=7)
    again = _module()
    _trainer(RunDir(tmp_path / "k"), again, steps=14, weighting=weighting).run(resume=True)
    a, b = _weights(ref), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a), weighting
    wa, wb = t.weighting.state()[0], RunDir(tmp_path / "k").load_checkpoint("train")[0]
    assert all(torch.equal(v, wb[k]) for k, v in wa.items())


def test_equal_weighting_checkpoint_has_no_weighting_entries(tmp_path):
    module = _module()
    _trainer(RunDir(tmp_path / "r"), module, steps=3).run()
    tensors, meta = RunDir(tmp_path / "r").load_checkpoint("train")
    assert "weighting" not in meta and not any(k.startswith("weighting") for k in tensors)


def test_workers_give_bitwise_the_same_batches():
    ds = Data(n=22)
    plain = Batcher(ds, TASKS, 4, 7, "train")
    pooled = Batcher(ds, TASKS, 4, 7, "train", workers=2)
    try:
        for step in [*range(12), 3, 4, 20, 21]:  # across epochs, and out of sequence (a restart)
            x0, t0 = plain.batch(step)
            x1, t1 = pooled.batch(step)
            assert torch.equal(x0, x1) and t0.keys() == t1.keys()
            assert all(torch.equal(t0[k], t1[k]) for k in t0)
    finally:
        pooled.close()


def test_a_training_with_workers_ends_bitwise_where_one_without_ends(tmp_path):
    a, b = _module(), _module()
    _trainer(None, a, steps=5).run()
    _trainer(None, b, steps=5, workers=2).run()
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_data_in_a_worker_is_one_line():
    from mtc.errors import MtcError

    class Bad(Data):
        def __getitem__(self, i):
            if i == 5:
                raise ValueError("boom")
            return super().__getitem__(i)

    b = Batcher(Bad(n=8), TASKS, 8, 0, "train", workers=1, spec="bad:data")
    with pytest.raises(MtcError, match=r"--data 'bad:data': sample 5 \(stream 'train'\) cannot be read"):
        b.batch(0)
    b.close()


def test_amp_bf16_on_cpu_trains_and_its_loss_falls(tmp_path):
    module = _module()
    t = _trainer(RunDir(tmp_path / "amp"), module, steps=24, amp="bf16")
    seen = []
    real = module.forward

    def spy(*xs):
        out = real(*xs)
        seen.append({o.dtype for o in out})
        return out

    module.forward = spy  # type: ignore[method-assign]
    t.run()
    assert seen and all(s == {torch.bfloat16} for s in seen)  # the network ran in bfloat16
    recs = [r for r in RunDir(tmp_path / "amp").records() if "loss" in r]
    first = sum(recs[0]["loss"].values())
    last = sum(sum(r["loss"].values()) for r in recs[-6:]) / 6
    assert last < 0.7 * first, (first, last)


def test_fp16_gradient_scaler_path_trains_and_resumes_exactly(tmp_path):
    # The CLI offers --amp fp16 on CUDA only; the trainer's scaler path is the same on the CPU.
    from mtc.errors import MtcError

    ref = _module()
    t = _trainer(RunDir(tmp_path / "a"), ref, steps=6, amp="fp16")
    t.run()
    meta = RunDir(tmp_path / "a").load_checkpoint("train")[1]
    assert meta["scaler"]["scale"] == t.scaler.get_scale()
    with pytest.raises(Stopped):
        _trainer(RunDir(tmp_path / "b"), _module(), steps=6, amp="fp16").run(stop_after=4)
    again = _module()
    _trainer(RunDir(tmp_path / "b"), again, steps=6, amp="fp16").run(resume=True)
    a, b = _weights(ref), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MtcError, match="--amp fp16 does not combine with --weighting gradnorm"):
        _trainer(None, _module(), amp="fp16", weighting="gradnorm")
