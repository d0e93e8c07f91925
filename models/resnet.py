"""The "ResNet with Sobel" backbone of Super-AND (paper §3.1; docs/method.md, "Backbone").

Two CIFAR-style ResNet trunks side by side: trunk A sees the normalized RGB image, trunk B a fixed
Sobel edge map of it. Their pooled features are concatenated, projected to ``low_dim`` by one
linear layer and L2-normalized. Parameter names follow the released checkpoints exactly
(``conv1``, ``layer1_sobel``, ``shortcut.0``, ``sobel.1``, ...) so released weights load 1:1.
"""
import torch
import torch.nn.functional as F
from torch import nn


def shortcut(in_planes, out_planes, stride):
    """Identity, or a strided 1x1 conv + BN (``shortcut.0``, ``shortcut.1``) where the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, inputs):
        out = F.relu(self.bn1(self.conv1(inputs)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(inputs))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, inputs):
        out = F.relu(self.bn1(self.conv1(inputs)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(inputs))


def sobel_filter():
    """The fixed, non-trainable Sobel input of trunk B: grey = mean of RGB, then two 3x3 edge filters."""
    grey = nn.Conv2d(3, 1, 1)
    edges = nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        grey.weight.fill_(1.0 / 3.0)
        grey.bias.zero_()
        edges.weight.copy_(torch.tensor([
            [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],   # horizontal gradient
            [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]],   # vertical gradient
        ]).unsqueeze(1))
        edges.bias.zero_()
    sobel = nn.Sequential(grey, edges)
    for parameter in sobel.parameters():
        parameter.requires_grad = False
    return sobel


class SobelResNet(nn.Module):
    """Two ResNet trunks (RGB and Sobel) -> concat -> Linear(., low_dim) -> L2 normalize.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        num_blocks: blocks per stage, e.g. [2, 2, 2, 2] for ResNet-18.
        low_dim: d, the embedding dimension (128 in the paper).
        width: channels of the first stage (64 in the paper; smaller only for quick tests).
    """

    def __init__(self, block, num_blocks, low_dim=128, width=64):
        super().__init__()
        self.low_dim = low_dim
        widths = [width, 2 * width, 4 * width, 8 * width]
        for suffix, in_channels in (("", 3), ("_sobel", 2)):  # trunk A on RGB, trunk B on Sobel
            setattr(self, "conv1" + suffix, nn.Conv2d(in_channels, width, 3, 1, 1, bias=False))
            setattr(self, "bn1" + suffix, nn.BatchNorm2d(width))
            in_planes = width
            for stage, (planes, blocks) in enumerate(zip(widths, num_blocks), start=1):
                layers = []
                for stride in [1 if stage == 1 else 2] + [1] * (blocks - 1):
                    layers.append(block(in_planes, planes, stride))
                    in_planes = planes * block.expansion
                setattr(self, f"layer{stage}{suffix}", nn.Sequential(*layers))
        self.linear = nn.Linear(2 * widths[3] * block.expansion, low_dim)
        self.sobel = sobel_filter()

    def _trunk(self, inputs, suffix):
        conv, bn = getattr(self, "conv1" + suffix), getattr(self, "bn1" + suffix)
        out = F.relu(bn(conv(inputs)))
        for stage in range(1, 5):
            out = getattr(self, f"layer{stage}{suffix}")(out)
        # released: a 4x4 average pool, which is global at 32x32 input; pooling over the whole map is the
        # same operation there and lets other --image_size values (STL-10 at 96) reach the same linear layer
        out = F.avg_pool2d(out, out.shape[-2:])
        return out.flatten(1)

    def forward(self, images):
        rgb = self._trunk(images, "")
        edges = self._trunk(self.sobel(images), "_sobel")
        out = self.linear(torch.cat([rgb, edges], dim=1))  # (B, low_dim)
        return F.normalize(out, dim=1)


def resnet18(low_dim=128, width=64):
    return SobelResNet(BasicBlock, [2, 2, 2, 2], low_dim, width)


def resnet101(low_dim=128, width=64):
    return SobelResNet(Bottleneck, [3, 4, 23, 3], low_dim, width)


NETWORKS = {"resnet18": resnet18, "resnet101": resnet101}
