"""Oracle: the lowered module trains like the PyTorch module it was exported from.

A few SGD steps in train mode on a fixed batch, from the same initial weights, for the lowered module
and for the PyTorch module: the loss goes down, every parameter gets a gradient, and the BatchNorm
running statistics (ONNX momentum semantics, PyTorch's unbiased running variance) and the weights
afterwards match PyTorch's.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from mtc import zoo
from mtc.lower import lower
from mtc.lower.reference import EXPORTERS_WITH_BN, export_reference

STEPS = 3
LR = 0.05
BATCH = 4


def _train(module: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> list[float]:
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS + 1):
        opt.zero_grad(set_to_none=True)
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.mse_loss(out, target)
        losses.append(float(loss.detach()))
        if len(losses) > STEPS:
            break
        loss.backward()
        opt.step()
    return losses


def _batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (BATCH, *zoo.REFERENCE[name][1][1:])
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        out_shape = zoo.build(name).eval()(x[:1]).shape[1:]
    return x, torch.randn((BATCH, *out_shape), generator=g)


@pytest.mark.parametrize("exporter", EXPORTERS_WITH_BN)
@pytest.mark.parametrize("name", list(zoo.REFERENCE))
def test_sgd_steps_match_pytorch(name: str, exporter: str) -> None:
    module, model = export_reference(name, exporter, batch=BATCH)
    lowered = lower(model)
    x, target = _batch(name)
    reference = zoo.build(name)  # the same initial weights and statistics

    losses = _train(lowered, x, target)
    ref_losses = _train(reference, x, target)
    assert losses[-1] < losses[0], losses
    assert losses == pytest.approx(ref_losses, rel=1e-4)

    state = reference.state_dict()
    inits = lowered.named_initializers()
    stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert all(k in inits for k in stats), sorted(set(stats) - set(inits))
    for k in stats:
        torch.testing.assert_close(inits[k], state[k], atol=1e-5, rtol=0, msg=k)
    for k, v in inits.items():
        torch.testing.assert_close(v.detach(), state[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["tiny_mobilenetv2", "decoder", "layernorm_gelu", "channel_shuffle"])
def test_gradients_reach_every_parameter(name: str) -> None:
    _, model = export_reference(name, "dynamo-bn", batch=BATCH)
    lowered = lower(model).train()
    x, _ = _batch(name)
    out = lowered(x)[0]
    out.square().mean().backward()
    params = dict(lowered.named_parameters())
    assert params
    missing = [k for k, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def test_eval_mode_leaves_statistics_alone() -> None:
    _, model = export_reference("residual", "torchscript", batch=2)
    lowered = lower(model).eval()
    before = {k: v.clone() for k, v in lowered.named_buffers()}
    lowered(torch.randn(2, 3, 32, 32))
    for k, v in lowered.named_buffers():
        assert torch.equal(v, before[k]), k


def test_trained_weights_go_back_into_the_graph() -> None:
    from mtc.lower.verify import run_lowered, run_onnxruntime

    _, model = export_reference("tiny_resnet", "dynamo-bn", dynamic_batch=True)
    lowered = lower(model)
    x, target = _batch("tiny_resnet")
    _train(lowered, x, target)
    trained = lowered.to_model()
    assert trained is not model
    # The copy carries the trained weights: onnxruntime on it agrees with the lowered module.
    xs = [x[:2].numpy()]
    got = run_lowered(lowered, xs)[0]
    ref = run_onnxruntime(trained, xs)[0]
    assert abs(got - ref).max() <= 1e-4 * abs(ref).max()
    # ...and the source model is untouched.
    fresh = run_lowered(lower(model), xs)[0]
    assert abs(fresh - got).max() > 1e-3


def test_copies_and_pickles_keep_state_and_mode() -> None:
    _, model = export_reference("squeeze_excite", "torchscript", batch=BATCH)
    lowered = lower(model)
    x, target = _batch("squeeze_excite")
    _train(lowered, x, target)
    lowered.eval()
    for clone in (copy.deepcopy(lowered), pickle.loads(pickle.dumps(lowered))):
        assert not clone.training
        torch.testing.assert_close(clone(x)[0], lowered(x)[0])
        # A copy trains independently of the original.
        clone.train()
        clone(x)
        assert not torch.equal(dict(clone.named_buffers())["stem_0_1_running_mean"],
                               dict(lowered.named_buffers())["stem_0_1_running_mean"])
