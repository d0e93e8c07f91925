"""WideResNet-28-2 (Zagoruyko & Komodakis, 2016), the backbone of the paper's semi-supervised
experiments (§4.4, Table 4; docs/method.md, "Semi-supervised methods (Table 4)").

Written here because torchvision has no WideResNet-28-2 for 32x32 inputs (its wide_resnet50_2 is the
ImageNet bottleneck network). The network of the semi-supervised literature, as in Oliver et al.,
"Realistic evaluation of deep semi-supervised learning algorithms" (2018): a 3x3 conv to 16 channels,
three groups of (28 − 4) / 6 = 4 pre-activation wide basic blocks with 16k, 32k, 64k channels (k = 2;
strides 1, 2, 2), a final BN + activation and a global average pool: a 128-dimensional feature, about
1.47 M parameters. Every activation is LeakyReLU(0.1), that study's choice (the original WRN uses ReLU),
since its Π-model and Mean Teacher numbers are the ones Table 4 sets beside. No dropout (that study's
WRN has none). RGB alone, one trunk, no Sobel trunk: the literature's network at its parameter count
(docs/method.md). Like the default backbone, the feature is projected by ``linear`` to ``low_dim`` and
L2-normalized, so both stages and the fine-tuning take it unchanged.
"""
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.1  # Oliver et al. (2018), their WRN-28-2's LeakyReLU slope


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: BN-act-conv3x3(stride)-BN-act-conv3x3, plus the shortcut.

    Where the shape changes the shortcut is a strided 1x1 conv of the *activated* input (the original
    WRN code's order), else the identity of the raw input.
    """

    def __init__(self, in_planes, planes, stride=1, slope=LEAKY_SLOPE):
        super().__init__()
        self.slope = slope
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal = stride == 1 and in_planes == planes
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, inputs):
        activated = F.leaky_relu(self.bn1(inputs), self.slope)
        out = self.conv1(activated)
        out = self.conv2(F.leaky_relu(self.bn2(out), self.slope))
        return out + (inputs if self.equal else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-k trunk on RGB -> global average pool -> Linear(64k, low_dim) -> L2 normalize.

    Args:
        depth: 6n + 4 layers (28: n = 4 blocks per group).
        widen_factor: k (2).
        low_dim: d, the embedding dimension (128 in the paper).
        width: the scripts' ``--width``, read as a fraction of its default 64: 64 gives the network's own
            16, 16k, 32k, 64k channels; a smaller value narrows every layer in proportion (quick tests only).
        slope: the LeakyReLU slope (0.1, Oliver et al. 2018; 0 would be the original WRN's ReLU).
    """

    def __init__(self, depth=28, widen_factor=2, low_dim=128, width=64, slope=LEAKY_SLOPE):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WideResNet has 6n + 4 layers, not {depth}")
        blocks = (depth - 4) // 6
        channels = [max(1, round(c * width / 64)) for c in (16, 16 * widen_factor, 32 * widen_factor,
                                                             64 * widen_factor)]
        self.low_dim = low_dim
        self.slope = slope
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        in_planes = channels[0]
        for group, (planes, stride) in enumerate(zip(channels[1:], (1, 2, 2)), start=1):
            layers = []
            for block_stride in [stride] + [1] * (blocks - 1):
                layers.append(WideBasicBlock(in_planes, planes, block_stride, slope))
                in_planes = planes
            setattr(self, f"layer{group}", nn.Sequential(*layers))
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, low_dim)
        self.feature_dim = in_planes
        for module in self.modules():  # He initialization of the convolutions (WRN paper)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu", a=slope)

    def features(self, images):
        """The pooled trunk feature, (B, 64k) before the projection."""
        out = self.conv1(images)
        for group in (1, 2, 3):
            out = getattr(self, f"layer{group}")(out)  # (B, 16k|32k|64k, 32|16|8, 32|16|8) at 32x32 input
        out = F.leaky_relu(self.bn(out), self.slope)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # global: any --image_size reaches the same linear

    def forward(self, images):
        return F.normalize(self.linear(self.features(images)), dim=1)  # (B, low_dim)


def wrn28_2(low_dim=128, width=64):
    """WideResNet-28-2 (Table 4's backbone) with the scripts' constructor signature."""
    return WideResNet(28, 2, low_dim, width)
