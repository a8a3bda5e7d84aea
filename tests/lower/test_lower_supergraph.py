"""The lowered supergraph: modes, gradients, and fixed policies against hand-built networks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKBONES, parse

from mtc.frontends import import_model
from mtc.ir.names import fix_names
from mtc.ir.shapes import infer_shapes
from mtc.lower import lower
from mtc.spaces import compile_supergraph
from mtc.spaces.automtl import Policy, lower_supergraph, policy_parameters, set_mode, vcns_of

# x -> [conv a + bn a] -> relu -> [conv b (stride 2) + bn b] -> relu -> r ; [conv c (1x1)] ; add(r, c) -> relu
SMALL = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N,2,6,6] x) => (float[N,4,3,3] y)
<float[4,2,3,3] a_w = {%s}, float[4] a_s = {1,1,1,1}, float[4] a_b = {0,0,0,0}, float[4] a_m = {0,0,0,0},
 float[4] a_v = {1,1,1,1},
 float[4,4,3,3] b_w = {%s}, float[4] b_s = {1,1,1,1}, float[4] b_b = {0,0,0,0}, float[4] b_m = {0,0,0,0},
 float[4] b_v = {1,1,1,1}, float[4,4,1,1] c_w = {%s}>
{
  ca = Conv <pads = [1, 1, 1, 1]> (x, a_w)
  ba = BatchNormalization (ca, a_s, a_b, a_m, a_v)
  ra = Relu (ba)
  cb = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (ra, b_w)
  bb = BatchNormalization (cb, b_s, b_b, b_m, b_v)
  rb = Relu (bb)
  cc = Conv (rb, c_w)
  s = Add (rb, cc)
  y = Relu (s)
}
"""


def _small_backbone():
    rng = np.random.default_rng(0)
    vals = [",".join(f"{v:.4f}" for v in rng.standard_normal(n) * 0.3) for n in (72, 144, 16)]
    m = parse(SMALL % tuple(vals))
    for n in m.graph:
        n.name = n.outputs[0].name  # VCNs are named after their weighted node: ca, cb, cc
    fix_names(m)
    infer_shapes(m)
    return m


def _compiled(tasks="t1:regress:2,t2:class:3,t3:regress:1"):
    m = _small_backbone()
    compile_supergraph(m, tasks=tasks, head_width=8)
    return m


def _perturb(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.copy_(b.abs() + 0.5 * torch.rand(b.shape, generator=g) if "var" in name or "_v" in name
                        else b + 0.1 * torch.randn(b.shape, generator=g))


def _param(module, name):
    inits = module.named_initializers()
    if name in inits:
        return inits[name]
    raise KeyError(name)


def _hand_task(module, model, policy, task, x):
    """The task's network written out by hand from the chosen options' tensors."""
    P = lambda n: _param(module, n)  # noqa: E731
    vcns = {v.name: v for v in vcns_of(model)}
    bn_names = {"ca": ("a_s", "a_b", "a_m", "a_v"), "cb": ("b_s", "b_b", "b_m", "b_v")}

    def option(c, name, conv_w, inp, stride, pad):
        if c == 2:  # skip
            if vcns[name].skip == "identity":
                return inp
            base = f"{name}@{task}.skip"
            y = F.conv2d(inp, P(f"{base}.weight"), stride=stride)
            return F.batch_norm(y, P(f"{base}.bn.mean"), P(f"{base}.bn.var"), P(f"{base}.bn.scale"),
                                P(f"{base}.bn.bias"), False, 0.0, 1e-5)
        sfx = "" if c == 0 else f"@{task}"
        y = F.conv2d(inp, P(conv_w + sfx), stride=stride, padding=pad)
        if name in bn_names:
            s, b, m, v = (P(n + sfx) for n in bn_names[name])
            y = F.batch_norm(y, m, v, s, b, False, 0.0, 1e-5)
        return y

    def unit(name, conv_w, inp, stride, pad):
        if policy is None:  # warmup: the average of the three options
            return sum(option(c, name, conv_w, inp, stride, pad) for c in range(3)) / 3
        return option(policy.choices[name][task], name, conv_w, inp, stride, pad)

    ra = F.relu(unit("ca", "a_w", x, 1, 1))
    rb = F.relu(unit("cb", "b_w", ra, 2, 1))
    y = F.relu(rb + unit("cc", "c_w", rb, 1, 0))
    pooled = y.mean((2, 3))
    return F.linear(pooled, P(f"head@{task}/fc.weight"), P(f"head@{task}/fc.bias"))


@pytest.mark.parametrize("seed", range(6))
def test_fixed_policy_matches_hand_built_network(seed):
    model = _compiled()
    policy = Policy.random(model, seed=seed)
    module = lower_supergraph(model, mode="fixed", policy=policy).eval()
    _perturb(module, seed)
    x = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(seed))
    outs = module(x)
    for task, out in zip(["t1", "t2", "t3"], outs, strict=True):
        ref = _hand_task(module, model, policy, task, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_warmup_averages_the_three_options():
    model = _compiled()
    module = lower_supergraph(model, mode="warmup").eval()
    _perturb(module, 7)
    x = torch.randn(3, 2, 6, 6)
    for task, out in zip(["t1", "t2", "t3"], module(x), strict=True):
        torch.testing.assert_close(out, _hand_task(module, model, None, task, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["warmup", "gumbel"])
def test_gradients_reach_every_option_and_logit(mode):
    model = _compiled()
    module = lower_supergraph(model, mode=mode, tau=5.0).train()
    x = torch.randn(4, 2, 6, 6)
    loss = sum((o ** 2).mean() for o in module(x))
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    logits = policy_parameters(module)
    assert len(logits) == len(vcns_of(model))
    if mode == "warmup":
        # the policy is not used in warmup: only the logits lack gradients
        assert sorted(missing) == sorted(n for n, p in module.named_parameters() if any(p is q for q in logits.values()))
    else:
        assert missing == []


def test_gumbel_hard_is_one_hot_and_tau_anneals():
    model = _compiled()
    module = lower_supergraph(model, mode="gumbel", tau=1.0, hard=True)
    module(torch.randn(2, 2, 6, 6))
    for w in module.controls.weights.values():
        assert torch.all((w == 0) | (w == 1)) and torch.all(w.sum(-1) == 1)
    set_mode(module, "gumbel", tau=0.5, hard=False)
    assert module.controls.tau == 0.5


def test_all_shared_equals_backbone_plus_heads_and_costs_one_pass():
    plain = import_model(BACKBONES / "tiny_resnet.onnx")
    compile_supergraph(plain, tasks="seg,depth,normal", head_width=8,
                       passes=["canonicalize", "cut-at-feature", "attach-heads"])
    sup = plain.clone()
    compile_supergraph(sup, tasks="seg,depth,normal", head_width=8, passes=["vcn"])
    ref_mod = lower(plain).eval()
    fixed = lower_supergraph(sup, mode="fixed", policy=Policy.uniform(sup, "shared")).eval()
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(fixed(x), ref_mod(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # one backbone pass plus heads: no more executed nodes than the plain network
    assert fixed.num_nodes <= ref_mod.num_nodes
    # all task-specific runs three backbones
    spec = lower_supergraph(sup, mode="fixed", policy=Policy.uniform(sup, "specific"))
    backbone_nodes = sum(1 for n in plain.graph if "mtc.task" not in n.metadata_props)
    assert spec.num_nodes >= ref_mod.num_nodes + 2 * backbone_nodes


def test_fixed_needs_matching_policy():
    from mtc.errors import MtcError

    model = _compiled()
    bad = Policy({"nope": {"t1": 0}})
    with pytest.raises(MtcError, match="policy does not match the supergraph"):
        lower_supergraph(model, mode="fixed", policy=bad)


def test_batched_copies_equal_per_task_copies_and_keep_running_stats():
    model = _compiled()
    a = lower_supergraph(model, mode="gumbel", tau=1.0, batch_copies=True)
    b = lower_supergraph(model, mode="gumbel", tau=1.0, batch_copies=False)
    ops_a = [type_ for type_ in (n.op_type for n in a.model.graph)]
    assert ops_a.count("TaskConv") >= 3  # the specific copies and the down-sampling skips
    assert "TaskConv" not in [n.op_type for n in b.model.graph]
    b.load_state_dict(a.state_dict(), strict=False)
    for name, t in b.named_initializers().items():
        t.data.copy_(a.named_initializers()[name].data)  # copies too: they are addressed by IR name
    copies = [n.outputs[0].name for n in a.model.graph if n.op_type == "CopyOf"]
    x = torch.randn(4, 2, 6, 6)
    for mod in (a, b):
        mod.train()
        set_mode(mod, "warmup")
        for _ in range(2):
            loss = sum((o ** 2).mean() for o in mod(x))
            loss.backward()
    for k in copies:
        ta, tb = a.named_initializers()[k], b.named_initializers()[k]
        torch.testing.assert_close(ta, tb)  # running statistics updated alike
        if ta.grad is not None:
            torch.testing.assert_close(ta.grad, tb.grad, rtol=1e-4, atol=1e-6)
    a.eval()
    b.eval()
    for oa, ob in zip(a(x), b(x), strict=True):
        torch.testing.assert_close(oa, ob, rtol=1e-5, atol=1e-6)


# x -> [1x1 conv p, stride 2, 4 -> 6 channels + bn] -> relu -> [3x3 depthwise conv d, stride 2 + bn] -> relu
SKIPS = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N,4,6,6] x) => (float[N,6,2,2] y)
<float[6,4,1,1] p_w = {%s}, float[6] p_s = {1,1,1,1,1,1}, float[6] p_b = {0,0,0,0,0,0},
 float[6] p_m = {0,0,0,0,0,0}, float[6] p_v = {1,1,1,1,1,1},
 float[6,1,3,3] d_w = {%s}, float[6] d_s = {1,1,1,1,1,1}, float[6] d_b = {0,0,0,0,0,0},
 float[6] d_m = {0,0,0,0,0,0}, float[6] d_v = {1,1,1,1,1,1}>
{
  cp = Conv <strides = [2, 2]> (x, p_w)
  bp = BatchNormalization (cp, p_s, p_b, p_m, p_v)
  rp = Relu (bp)
  cd = Conv <group = 6, pads = [1, 1, 1, 1], strides = [2, 2]> (rp, d_w)
  bd = BatchNormalization (cd, d_s, d_b, d_m, d_v)
  y = Relu (bd)
}
"""


def _skips_compiled():
    rng = np.random.default_rng(1)
    vals = [",".join(f"{v:.4f}" for v in rng.standard_normal(n) * 0.3) for n in (24, 54)]
    m = parse(SKIPS % tuple(vals))
    for n in m.graph:
        n.name = n.outputs[0].name
    fix_names(m)
    infer_shapes(m)
    compile_supergraph(m, tasks="t1:regress:2,t2:class:3", head_width=8)
    return m


def test_skips_are_cheaper_than_their_units():
    model = _skips_compiled()
    vcns = {v.name: v for v in vcns_of(model)}
    # a 1x1 unit skips for free: strided slice + channel gather, no parameters
    assert vcns["cp"].skip == "select" and vcns["cp"].skip_params == vcns["cp"].skip_macs == 0
    # a depthwise 3x3 unit skips through a depthwise 1x1 conv + BN: 1/9 of the conv's MACs
    assert vcns["cd"].skip == "downsample"
    assert vcns["cd"].skip_macs * 9 == 6 * 2 * 2 * 9
    assert model.graph.initializers["cd@t1.skip.weight"].shape == ir.Shape([6, 1, 1, 1])
    for v in vcns.values():
        assert v.skip_macs < v.macs


def _skips_hand(module, policy, task, x):
    P = lambda n: _param(module, n)  # noqa: E731

    def bn(y, pre, sfx=""):
        s, b, m, v = (P(f"{pre}_{k}{sfx}") for k in "sbmv")
        return F.batch_norm(y, m, v, s, b, False, 0.0, 1e-5)

    def option(c, name, inp):
        if c == 2 and name == "cp":
            return inp[:, [0, 1, 2, 3, 0, 1], ::2, ::2]  # select: channel c reads c mod 4
        if c == 2:
            base = f"cd@{task}.skip"
            y = F.conv2d(inp, P(f"{base}.weight"), stride=2, groups=6)
            return F.batch_norm(y, P(f"{base}.bn.mean"), P(f"{base}.bn.var"), P(f"{base}.bn.scale"),
                                P(f"{base}.bn.bias"), False, 0.0, 1e-5)
        sfx = "" if c == 0 else f"@{task}"
        if name == "cp":
            return bn(F.conv2d(inp, P("p_w" + sfx), stride=2), "p", sfx)
        return bn(F.conv2d(inp, P("d_w" + sfx), stride=2, padding=1, groups=6), "d", sfx)

    def unit(name, inp):
        if policy is None:
            return sum(option(c, name, inp) for c in range(3)) / 3
        return option(policy.choices[name][task], name, inp)

    y = F.relu(unit("cd", F.relu(unit("cp", x))))
    return F.linear(y.mean((2, 3)), P(f"head@{task}/fc.weight"), P(f"head@{task}/fc.bias"))


@pytest.mark.parametrize("mode", ["warmup", "fixed"])
def test_select_and_grouped_skips_match_hand_built_network(mode):
    model = _skips_compiled()
    policy = None
    if mode == "fixed":
        policy = Policy.uniform(model, "shared")
        policy.choices["cp"]["t1"] = policy.choices["cd"]["t1"] = 2
        policy.choices["cp"]["t2"], policy.choices["cd"]["t2"] = 2, 1
    module = lower_supergraph(model, mode=mode, policy=policy).eval()
    if mode == "warmup":  # the T select skips run once, on the stacked tensor
        assert any(str(n.name).endswith(".stacked") and n.op_type == "Gather" for n in module.model.graph)
    _perturb(module, 3)
    x = torch.randn(3, 4, 6, 6)
    for task, out in zip(["t1", "t2"], module(x), strict=True):
        torch.testing.assert_close(out, _skips_hand(module, policy, task, x), rtol=1e-5, atol=1e-6)
