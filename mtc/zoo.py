"""Reference architectures written from PyTorch primitives.

They are the project's own stand-ins for the usual CNN families (no torchvision here): the bundled
ONNX backbones are exported from the ``tiny_*`` nets, and the tests and benchmarks use the blocks to
exercise every construct a backbone can contain (residual adds, depthwise convs, squeeze-excite,
concats, dilation, upsampling decoders, channel shuffles, LayerNorm+GELU).

``REFERENCE`` maps a name to ``(factory, input_shape)``; factories take a ``seed`` and return a
module in eval mode with deterministic weights and non-trivial BatchNorm statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """ResNet basic block; a strided 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride, dilation=dilation)
        self.conv2 = _conv_bn(cout, cout, 3, 1, dilation=dilation)
        self.down = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + idt)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool, two 1x1 convs, a sigmoid gate multiplied in."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(c // r, 4), 1)
        self.fc2 = nn.Conv2d(max(c // r, 4), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, ReLU6 (Clip), 1x1 project, optional SE."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4, se: bool = False) -> None:
        super().__init__()
        hid = cin * expand
        self.expand = _conv_bn(cin, hid, 1)
        self.dw = _conv_bn(hid, hid, 3, stride, groups=hid)
        self.se = SqueezeExcite(hid) if se else None
        self.project = _conv_bn(hid, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.expand(x))
        y = F.relu6(self.dw(y))
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


class DenseBlock(nn.Module):
    """DenseNet block (BN-ReLU-Conv, concatenated) followed by a pooling transition."""

    def __init__(self, cin: int, growth: int, layers: int, cout: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DenseLayer(cin + i * growth, growth) for i in range(layers)])
        self.trans = nn.Sequential(nn.BatchNorm2d(cin + layers * growth), nn.ReLU(),
                                   nn.Conv2d(cin + layers * growth, cout, 1, bias=False), nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trans(self.layers(x))


class ChannelShuffle(nn.Module):
    """ShuffleNetV2 unit: split channels, transform one half, concat, shuffle (Reshape/Transpose)."""

    def __init__(self, c: int, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        h = c // 2
        self.branch = nn.Sequential(_conv_bn(h, h, 1), nn.ReLU(), _conv_bn(h, h, 3, groups=h), _conv_bn(h, h, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = y.shape
        return y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class LayerNormGELU(nn.Module):
    """ConvNeXt-style block: depthwise 7x7, channels-last LayerNorm, MLP with GELU, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class Head(nn.Module):
    def __init__(self, c: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _stem(c: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn(3, c, 3, 2), nn.ReLU())


class TinyResNet(nn.Module):
    """A ResNet-18-shaped net at toy width: stem, max-pool, four stages of basic blocks, classifier."""

    def __init__(self, widths: tuple[int, ...] = (16, 24, 32, 48), classes: int = 10) -> None:
        super().__init__()
        self.stem = _stem(widths[0])
        self.pool = nn.MaxPool2d(3, 2, 1)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.head = Head(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.pool(self.stem(x))))


class TinyMobileNetV2(nn.Module):
    """MobileNetV2-style: inverted residuals with depthwise convs and ReLU6, SE in the last stage."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3, 2), nn.ReLU6())
        cfg = [(16, 16, 1, False), (16, 24, 2, False), (24, 24, 1, False), (24, 32, 2, False),
               (32, 32, 1, False), (32, 48, 2, True), (48, 48, 1, True)]
        self.blocks = nn.Sequential(*[InvertedResidual(a, b, s, se=se) for a, b, s, se in cfg])
        self.last = nn.Sequential(_conv_bn(48, 96, 1), nn.ReLU6())
        self.head = Head(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.blocks(self.stem(x))))


class TinyDenseNet(nn.Module):
    """DenseNet-style: dense blocks of concatenated features with pooling transitions."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = _stem(16)
        self.block1 = DenseBlock(16, 8, 3, 24)
        self.block2 = DenseBlock(24, 8, 3, 32)
        self.block3 = DenseBlock(32, 8, 3, 40)
        self.norm = nn.Sequential(nn.BatchNorm2d(40), nn.ReLU())
        self.head = Head(40, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block3(self.block2(self.block1(self.stem(x))))))


# --- single-construct reference nets for the lowering oracles -------------------------------------


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem(8)
        self.b1 = BasicBlock(8, 16, 2)
        self.b2 = BasicBlock(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.b1(self.stem(x)))


class InvertedResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 8, 3, 2), nn.ReLU6())
        self.b1 = InvertedResidual(8, 16, 2)
        self.b2 = InvertedResidual(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.b1(self.stem(x)))


class SqueezeExciteNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem(16)
        self.se = SqueezeExcite(16)
        self.conv = _conv_bn(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(self.se(self.stem(x))))


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem(8)
        self.block = DenseBlock(8, 8, 3, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


class DilatedNet(nn.Module):
    """DeepLab-style output stride: dilated residual blocks instead of striding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem(16)
        self.b1 = BasicBlock(16, 16, dilation=2)
        self.b2 = BasicBlock(16, 16, dilation=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.b1(self.stem(x)))


class DecoderNet(nn.Module):
    """Encoder then a decoder with transposed conv and bilinear and nearest Resize."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(_conv_bn(3, 16, 3, 2), nn.ReLU())
        self.enc2 = nn.Sequential(_conv_bn(16, 32, 3, 2), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(32, 16, 4, 2, 1)
        self.fuse = _conv_bn(32, 16, 3)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d = F.relu(self.fuse(torch.cat([self.up1(e2), e1], 1)))
        d = d + F.interpolate(F.relu(e1), scale_factor=1.0, mode="nearest")
        return F.interpolate(self.out(d), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ChannelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem(16)
        self.u1 = ChannelShuffle(16)
        self.u2 = ChannelShuffle(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u2(self.u1(self.stem(x)))


class LayerNormGELUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.block = LayerNormGELU(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights and BN statistics far from the identity, so parity tests mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
                if m.weight is not None:
                    m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
                    if m.bias is not None:  # LayerNorm(bias=False) has a weight but no bias
                        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def build(name: str, seed: int = 0) -> nn.Module:
    """Instantiate reference net ``name`` with deterministic weights, in eval mode."""
    factory, _ = REFERENCE[name]
    torch.manual_seed(seed)
    return _init(factory(), seed)


REFERENCE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "tiny_resnet": (TinyResNet, (1, 3, 64, 64)),
    "tiny_mobilenetv2": (TinyMobileNetV2, (1, 3, 64, 64)),
    "tiny_densenet": (TinyDenseNet, (1, 3, 64, 64)),
    "residual": (ResidualNet, (1, 3, 32, 32)),
    "inverted_residual": (InvertedResidualNet, (1, 3, 32, 32)),
    "squeeze_excite": (SqueezeExciteNet, (1, 3, 32, 32)),
    "dense": (DenseNet, (1, 3, 32, 32)),
    "dilated": (DilatedNet, (1, 3, 32, 32)),
    "decoder": (DecoderNet, (1, 3, 32, 32)),
    "channel_shuffle": (ChannelShuffleNet, (1, 3, 32, 32)),
    "layernorm_gelu": (LayerNormGELUNet, (1, 3, 32, 32)),
}

#: The nets bundled as ONNX backbones in ``backbones/``.
BACKBONES = ("tiny_resnet", "tiny_mobilenetv2", "tiny_densenet")


# Factories for `mtc import pkg.module:factory`: e.g. `mtc import mtc.zoo:tiny_resnet`.
def tiny_resnet() -> nn.Module:
    return build("tiny_resnet")


def tiny_mobilenetv2() -> nn.Module:
    return build("tiny_mobilenetv2")


def tiny_densenet() -> nn.Module:
    return build("tiny_densenet")


# --- reference nets for the channel analysis and pruning (docs/channels.md) -----------------------


class ChannelsLastNet(nn.Module):
    """ConvNeXt-style channels-last stage: a patchify conv, an NHWC residual MLP with LayerNorm and
    Linear layers over the last axis, a Linear that changes the width, back to NCHW for a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.proj = nn.Linear(16, 24)
        self.out = nn.Conv2d(24, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).permute(0, 2, 3, 1)
        y = y + self.fc2(F.gelu(self.fc1(self.norm(y))))
        y = F.relu(self.proj(y))
        return self.out(y.permute(0, 3, 1, 2))


class StemNoPadNet(nn.Module):
    """A stride-2 stem without padding (33x33 -> 16x16), a residual block, a 2x2/2 conv without padding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 0, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = BasicBlock(16, 16)
        self.down = nn.Sequential(nn.Conv2d(16, 24, 2, 2, 0), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.block(self.stem(x)))


class ConcatNet(nn.Module):
    """Concat-heavy: an inception block (1x1, 3x3, double 3x3, pool + 1x1), a dense concat with its
    input, a three-way chunk that cuts across the concat's pieces, a gate between two chunks, and a
    concat that repeats a tensor, fused by a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem(8)
        self.b1 = _conv_bn(8, 4, 1)
        self.b2 = _conv_bn(8, 6, 3)
        self.b3 = nn.Sequential(_conv_bn(8, 4, 3), nn.ReLU(), _conv_bn(4, 4, 3))
        self.b4 = _conv_bn(8, 2, 1)
        self.fuse = _conv_bn(24, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        inc = torch.cat([F.relu(self.b1(s)), F.relu(self.b2(s)), F.relu(self.b3(s)),
                         F.relu(self.b4(F.max_pool2d(s, 3, 1, 1)))], 1)
        p, q, r = torch.cat([s, inc], 1).chunk(3, 1)  # 8 | b1 + b2[:4] | b2[4:] + b3 + b4
        return F.relu(self.fuse(torch.cat([p * torch.sigmoid(q), r, p], 1)))


class GroupedNet(nn.Module):
    """Grouped convolutions: a ResNeXt block (1x1, 3x3 in 4 groups, 1x1, residual), a grouped conv that
    widens each of its 2 groups (8 -> 12), a depthwise conv with channel multiplier 2, a conv with one
    output channel (group 1, not depthwise) gating the features, and a conv with one input channel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem(16)
        self.reduce = _conv_bn(16, 32, 1)
        self.grouped = _conv_bn(32, 32, 3, groups=4)
        self.expand = _conv_bn(32, 16, 1)
        self.mid = _conv_bn(16, 16, 1)
        self.widen = _conv_bn(16, 24, 3, groups=2)
        self.dw2 = _conv_bn(24, 48, 3, groups=24)
        self.gate = nn.Conv2d(48, 1, 1)
        self.spread = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(52, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = F.relu(s + self.expand(F.relu(self.grouped(F.relu(self.reduce(s))))))
        z = F.relu(self.dw2(F.relu(self.widen(F.relu(self.mid(y))))))
        g = torch.sigmoid(self.gate(z))
        return self.out(torch.cat([z * g, self.spread(g)], 1))


class DeconvNet(nn.Module):
    """ConvTranspose decoder: two strided encoder convs, a transposed conv, a skip concat and fusion
    conv, a grouped transposed conv (4 groups) and a depthwise transposed conv, an output conv."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(_conv_bn(3, 16, 3, 2), nn.ReLU())
        self.enc2 = nn.Sequential(_conv_bn(16, 32, 3, 2), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(32, 24, 4, 2, 1)
        self.bn1 = nn.BatchNorm2d(24)
        self.fuse = _conv_bn(40, 16, 3)
        self.up2 = nn.ConvTranspose2d(16, 8, 2, 2, groups=4)
        self.up3 = nn.ConvTranspose2d(8, 8, 3, 1, 1, groups=8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        d = F.relu(self.bn1(self.up1(self.enc2(e1))))
        d = F.relu(self.fuse(torch.cat([d, e1], 1)))
        return self.out(F.relu(self.up3(F.relu(self.up2(d)))))


class FlattenGemmNet(nn.Module):
    """A classifier without global pooling: conv features [12, 4, 4] flattened into two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(3, 8, 3, 2), nn.ReLU(), _conv_bn(8, 12, 3, 2), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(self.features(x), 1))))


REFERENCE.update({
    "channels_last": (ChannelsLastNet, (1, 3, 32, 32)),
    "stem_nopad": (StemNoPadNet, (1, 3, 33, 33)),
    "concat_heavy": (ConcatNet, (1, 3, 32, 32)),
    "grouped": (GroupedNet, (1, 3, 32, 32)),
    "deconv_decoder": (DeconvNet, (1, 3, 32, 32)),
    "flatten_gemm": (FlattenGemmNet, (1, 3, 32, 32)),
})
