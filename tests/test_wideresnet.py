"""WideResNet-28-2 (models/wideresnet.py; docs/method.md, "Semi-supervised methods (Table 4)"): its size,
its layout, its unit-norm embedding, gradients everywhere and BatchNorm's train/eval behaviour."""
import pytest
import torch
import torch.nn.functional as F

from models import NETWORKS, WideResNet, wrn28_2
from models.wideresnet import LEAKY_SLOPE, WideBasicBlock

pytestmark = pytest.mark.usefixtures("one_thread")

# 3x3 conv 3->16; groups of 4 blocks at 32, 64, 128 channels (BN + conv + BN + conv, 1x1 shortcut conv in
# each group's first block); final BN (two parameters per channel)
TRUNK_PARAMETERS = (
    3 * 16 * 9
    + (2 * 16 + 16 * 32 * 9 + 2 * 32 + 32 * 32 * 9 + 16 * 32) + 3 * (2 * 32 + 32 * 32 * 9 + 2 * 32 + 32 * 32 * 9)
    + (2 * 32 + 32 * 64 * 9 + 2 * 64 + 64 * 64 * 9 + 32 * 64) + 3 * (2 * 64 + 64 * 64 * 9 + 2 * 64 + 64 * 64 * 9)
    + (2 * 64 + 64 * 128 * 9 + 2 * 128 + 128 * 128 * 9 + 64 * 128)
    + 3 * (2 * 128 + 128 * 128 * 9 + 2 * 128 + 128 * 128 * 9)
    + 2 * 128)


@pytest.fixture(scope="module")
def full_net():
    torch.manual_seed(0)
    return NETWORKS["wrn28_2"](low_dim=128, width=64)  # the scripts' call, their defaults


def small_net(low_dim=16, seed=0):
    torch.manual_seed(seed)
    return wrn28_2(low_dim=low_dim, width=16)  # a quarter of the channels: 4, 8, 16, 32


def test_parameter_count(full_net):
    trunk = sum(p.numel() for name, p in full_net.named_parameters() if not name.startswith("linear."))
    assert TRUNK_PARAMETERS == 1_466_320
    assert trunk == TRUNK_PARAMETERS
    assert 1.4e6 <= trunk <= 1.6e6
    assert full_net.linear.weight.shape == (128, 128)  # 64k = 128 features -> low_dim
    assert sum(p.numel() for p in full_net.parameters()) == TRUNK_PARAMETERS + 128 * 128 + 128


def test_layout_depth_28_widen_2(full_net):
    convs = [m for m in full_net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 25  # + the linear layer and the 3 shortcut convs: the 28 of WRN-28
    for group, channels, stride in ((1, 32, 1), (2, 64, 2), (3, 128, 2)):
        blocks = list(getattr(full_net, f"layer{group}"))
        assert len(blocks) == 4 and all(isinstance(b, WideBasicBlock) for b in blocks)
        assert blocks[0].conv1.stride == (stride, stride) and blocks[0].shortcut is not None
        assert all(b.conv2.out_channels == channels and b.shortcut is None for b in blocks[1:])
    assert not any(isinstance(m, torch.nn.Dropout) for m in full_net.modules())
    assert full_net.slope == LEAKY_SLOPE == 0.1
    assert {name.split(".")[0] for name, _ in full_net.named_parameters()} == {
        "conv1", "layer1", "layer2", "layer3", "bn", "linear"}  # RGB only: no Sobel trunk


def test_output_shape_and_unit_norm(full_net):
    full_net.eval()
    with torch.no_grad():
        out = full_net(torch.randn(3, 3, 32, 32))
        features = full_net.features(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 128) and features.shape == (3, 128)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)
    small = small_net(low_dim=7).eval()
    with torch.no_grad():
        for size in (32, 24):  # the global pool takes any --image_size
            out = small(torch.randn(2, 3, size, size))
            assert out.shape == (2, 7) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-6)


def test_forward_matches_a_hand_composition():
    """The block is pre-activation: BN-LReLU-conv-BN-LReLU-conv plus the shortcut (a 1x1 conv of the
    activated input where the shape changes, the raw input where it does not)."""
    torch.manual_seed(1)
    block = WideBasicBlock(4, 6, stride=2).eval()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 8, 8)

    def bn(layer, t):
        return ((t - layer.running_mean.view(1, -1, 1, 1)) / torch.sqrt(layer.running_var.view(1, -1, 1, 1) + 1e-5)
                * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))

    def lrelu(t):
        return torch.where(t > 0, t, 0.1 * t)
    a = lrelu(bn(block.bn1, x))
    h = F.conv2d(a, block.conv1.weight, stride=2, padding=1)
    h = F.conv2d(lrelu(bn(block.bn2, h)), block.conv2.weight, padding=1)
    expected = h + F.conv2d(a, block.shortcut.weight, stride=2)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)
        same = WideBasicBlock(6, 6).eval()
        y = torch.randn(2, 6, 4, 4)
        inner = same.conv2(lrelu(same.bn2(same.conv1(lrelu(same.bn1(y))))))
        assert torch.allclose(same(y), inner + y, atol=1e-6)


def test_every_parameter_gets_a_gradient():
    net = small_net().train()
    out = net(torch.randn(4, 3, 32, 32))
    (out * torch.randn_like(out)).sum().backward()
    parameters = list(net.named_parameters())
    assert len(parameters) == 1 + 3 * (4 * 6 + 1) + 2 + 2  # conv1; blocks (2 BN x 2 + 2 convs) + shortcuts; bn; linear
    for name, p in parameters:
        assert p.requires_grad, name
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_batchnorm_train_and_eval_modes():
    net = small_net()
    x = torch.randn(6, 3, 32, 32)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    net.train()
    with torch.no_grad():
        first = net(x)
        alone = net(x[:2])  # batch statistics: an image's embedding depends on its batch
    assert not torch.allclose(first[:2], alone, atol=1e-4)
    changed = {k for k, v in net.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert changed == set(before)  # every running mean, var and counter moved
    assert int(net.bn.num_batches_tracked) == 2
    net.eval()
    frozen = {k: v.clone() for k, v in net.state_dict().items() if k in before}
    with torch.no_grad():
        whole = net(x)
        part = net(x[:2])  # running statistics: independent of the batch
    assert torch.allclose(whole[:2], part, atol=1e-6)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in frozen.items())


def test_width_scales_channels_and_bad_depth_is_refused():
    assert [getattr(small_net(), f"layer{g}")[0].conv2.out_channels for g in (1, 2, 3)] == [8, 16, 32]
    assert small_net().conv1.out_channels == 4
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=27)
