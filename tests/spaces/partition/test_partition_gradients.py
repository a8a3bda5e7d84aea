"""Backward masks (Newell et al.: weights outside a task's m_b get no update from it) on a small
hand-built graph, against an independent oracle: the network written again in plain torch, each
task's gradient taken alone (autograd on its own loss) and masked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from channelnets import Builder

from mtc.ir import supergraph as sg
from mtc.ir.plan import Plan
from mtc.spaces import compile_supergraph, read_plan
from mtc.spaces.partition.lowering import training_network
from mtc.train.posttrain import TrainOptions, run_train
from mtc.train.run import RunDir, read_tensors

# conv1 (4 channels) -> BN -> Relu -> [site] -> conv2 (1x1, 3) -> Relu -> each task's head
FORWARD = {"a": [0, 1, 2], "b": [2, 3]}
BACKWARD = {"a": [0, 1], "b": [3]}  # channel 2: both read it, neither updates it


def _graph():
    b = Builder(seed=3)
    h = b.conv("x", 2, 4, k=3, name="conv1")
    h = b.op("Relu", b.bn(h, 4), name="relu1")
    h = b.conv(h, 4, 3, k=1, name="conv2")
    b.op("Relu", h, name="relu2")
    m = b.model({"x": ["N", 2, 6, 6]}, ["relu2"])
    names = {n.name: [v.name for v in n.inputs] for n in m.graph}
    return m, names


def _supergraph():
    m, names = _graph()
    compile_supergraph(m, tasks="a:regress:1,b:regress:1", head_width=4, space="partition", sites="conv1",
                       feature="relu2")
    return m, names


def _plan(model, backward=BACKWARD) -> Plan:
    c = sg.choices_of(model, "mask")[0]
    plan = Plan(space="partition", masks={c.name: FORWARD}, info={"backward": {c.name: backward}})
    return read_plan(plan.to_json(), model)


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 2, 6, 6, generator=g)
        self.a = self.x.mean((1, 2, 3)).unsqueeze(1) * 3
        self.b = self.x[:, 0].std((1, 2)).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.a[i], "b": self.b[i]}


def _oracle_grads(w: dict[str, torch.Tensor], names, x, targets) -> dict[str, torch.Tensor]:
    """Σ_t (the gradient of task t's loss alone, zeroed on the weights outside t's backward mask)."""
    w1, b1 = names["conv1"][1:3]
    bn_s, bn_b = names[next(k for k in names if k.startswith("batchnormalization"))][1:3]
    w2, b2 = names["conv2"][1:3]
    params = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in ("a", "b"):
        y = F.conv2d(x, params[w1], params[b1], padding=1)
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
        y = (y - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
        y = y * params[f"{bn_s}@{t}"][None, :, None, None] + params[f"{bn_b}@{t}"][None, :, None, None]
        mf = torch.zeros(4)
        mf[FORWARD[t]] = 1
        h = torch.relu(y) * mf[None, :, None, None]
        z = torch.relu(F.conv2d(h, params[w2], params[b2]))
        out = z.mean((2, 3)) @ params[f"head@{t}/fc.weight"].T + params[f"head@{t}/fc.bias"]
        loss = F.mse_loss(out, targets[t])
        keys = [k for k in params if not k.startswith("head@") or k.startswith(f"head@{t}/")]
        grads = torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True)
        mb = torch.zeros(4)
        mb[BACKWARD[t]] = 1
        for k, gr in zip(keys, grads, strict=True):
            if gr is None:
                continue
            if k in (w1, b1):
                gr = gr * mb.view(-1, *([1] * (gr.dim() - 1)))  # the filters that make the channels
            elif k in (f"{bn_s}@{t}", f"{bn_b}@{t}"):
                gr = gr * mb
            elif k == w2:
                gr = gr * mb.view(1, -1, 1, 1)  # the input slices that read them
            total[k] += gr
    return total


def test_backward_masks_give_each_task_only_its_own_gradient():
    model, names = _supergraph()
    plan = _plan(model)
    net = training_network(model, plan, frozen=[]).train()
    data = Data()
    x = data.x[:8]
    targets = {"a": data.a[:8], "b": data.b[:8]}
    outs = net(x)
    loss = F.mse_loss(outs[0], targets["a"]) + F.mse_loss(outs[1], targets["b"])
    loss.backward()
    got = {k: v.grad for k, v in net.named_initializers().items() if isinstance(v, torch.nn.Parameter)}
    want = _oracle_grads({k: v.detach() for k, v in net.named_initializers().items()
                          if isinstance(v, torch.nn.Parameter)}, names, x, targets)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    w1 = names["conv1"][1]
    assert not got[w1][2].any() and got[w1][0].abs().sum() > 0  # channel 2 is nobody's to update


@pytest.mark.parametrize("kind", ["adam"])
def test_weights_outside_every_backward_mask_get_no_update_and_no_momentum(tmp_path, kind):
    """Trained with the generic trainer (mtc train's path): channel 2's weights do not move and the
    optimiser keeps no moments for them; channel 3 (only b updates it) moves exactly as when a's
    loss is left out."""
    model, names = _supergraph()
    plan = _plan(model)
    w1, w2 = names["conv1"][1], names["conv2"][1]
    init = training_network(model, plan, frozen=[]).ir_state()

    def train(where, weights=None):
        run_train(RunDir(tmp_path / where), model, plan, Data(), Data(8, 1),
                  TrainOptions(steps=5, batch_size=8, checkpoint_every=5, task_weights=weights), progress=False)
        return read_tensors(tmp_path / where / "checkpoints" / "train.safetensors")[0]

    both = train("both")
    only_b = train("b", {"a": 0.0, "b": 1.0})
    assert torch.equal(both[f"module/{w1}"][2], init[w1][2])
    assert torch.equal(both[f"module/{w2}"][:, 2], init[w2][:, 2])
    for slot in ("exp_avg", "exp_avg_sq"):
        assert not both[f"optim/weights/{w1}/{slot}"][2].any()
        assert not both[f"optim/weights/{w2}/{slot}"][:, 2].any()
        # channel 3's filter only ever sees b's gradient (and a's head does not change that)
        torch.testing.assert_close(both[f"optim/weights/{w1}/{slot}"][3], only_b[f"optim/weights/{w1}/{slot}"][3])
    torch.testing.assert_close(both[f"module/{w1}"][3], only_b[f"module/{w1}"][3])
    assert not torch.equal(both[f"module/{w1}"][0], init[w1][0])  # a's own channels do train


def test_forward_only_masks_train_like_the_specialised_network():
    """Without backward masks the space has no network of its own: mtc train lowers the plan's
    specialised form, whose gradients are zero outside each task's forward mask anyway."""
    from mtc.spaces import get_space

    model, _ = _supergraph()
    c = sg.choices_of(model, "mask")[0]
    plan = Plan(space="partition", masks={c.name: FORWARD})
    assert get_space("partition").train_network(model, plan) is None
    with_back = _plan(model, backward=FORWARD)  # the same masks written out: still nothing to separate
    assert get_space("partition").train_network(model, with_back) is None


def test_backward_mask_must_lie_inside_the_forward_mask():
    from mtc.errors import MtcError

    model, _ = _supergraph()
    with pytest.raises(MtcError, match="subset of the task's forward channels"):
        _plan(model, backward={"a": [0, 3], "b": [3]})
    np.testing.assert_equal(len(sg.choices_of(model, "mask")), 1)
