"""The ResNet-18-with-Sobel backbone (docs/method.md, "Backbone"), the stage-2 heads (Eq. 13) and loading the
released checkpoint layout (tests/fixtures/released_checkpoint_layout.json)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib.checkpoint import load_checkpoint, load_network, strip_prefix
from lib.errors import InputError
from models import MultiHeadNormFC, resnet18

DTYPES = {"float32": torch.float32, "int64": torch.int64}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def full_net():
    torch.manual_seed(0)
    return resnet18()  # low_dim 128, width 64: the released network


def small_net(low_dim=16, seed=0):
    torch.manual_seed(seed)
    return resnet18(low_dim=low_dim, width=8)


def test_output_shape_and_unit_rows():
    net = resnet18(width=8)  # default low_dim = 128
    x = torch.randn(3, 3, 32, 32)
    for mode in (net.train, net.eval):
        mode()
        out = net(x)
        assert out.shape == (3, 128)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert small_net(low_dim=16)(x).shape == (3, 16)


def test_full_width_output_and_linear(full_net):
    assert full_net.linear.in_features == 1024 and full_net.linear.out_features == 128
    assert full_net.linear.bias is not None
    full_net.eval()
    with torch.no_grad():
        out = full_net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 128)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_sobel_layers_are_fixed_and_exact():
    net = small_net()
    grey, edges = net.sobel[0], net.sobel[1]
    assert grey.weight.shape == (1, 3, 1, 1) and edges.weight.shape == (2, 1, 3, 3)
    assert torch.equal(grey.weight, torch.full((1, 3, 1, 1), 1.0 / 3.0))
    assert torch.equal(grey.bias, torch.zeros(1))
    horizontal = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    vertical = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
    assert torch.equal(edges.weight[0, 0], horizontal)
    assert torch.equal(edges.weight[1, 0], vertical)
    assert torch.equal(edges.bias, torch.zeros(2))
    assert edges.padding == (1, 1) and edges.stride == (1, 1)
    for p in net.sobel.parameters():
        assert not p.requires_grad
    # functionally: grey = mean of RGB, then the two 3x3 filters with zero padding
    x = torch.randn(2, 3, 8, 8)
    mean = x.mean(1, keepdim=True)
    expected = F.conv2d(mean, torch.stack([horizontal, vertical]).unsqueeze(1), padding=1)
    torch.testing.assert_close(net.sobel(x), expected, rtol=1e-5, atol=1e-5)
    assert net.conv1_sobel.in_channels == 2 and net.conv1.in_channels == 3


def test_every_trainable_parameter_gets_a_gradient():
    net = small_net()
    net.train()
    x = torch.randn(4, 3, 32, 32)
    out = net(x)
    (out * torch.randn_like(out)).sum().backward()
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"sobel.0.weight", "sobel.0.bias", "sobel.1.weight", "sobel.1.bias"}
    assert len(trainable) > 100  # both trunks, every BatchNorm, the linear layer
    for name, p in trainable:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for name, p in net.named_parameters():
        if name in frozen:
            assert p.grad is None, name


def test_both_trunks_are_used():
    # the output depends on both trunks: changing the last conv of either one changes it
    net = small_net().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = net(x)
        net.layer4[1].conv2.weight.mul_(0.0)
        after_rgb = net(x)
        net.layer4_sobel[1].conv2.weight.mul_(0.0)
        after_sobel = net(x)
    assert not torch.allclose(base, after_rgb)
    assert not torch.allclose(after_rgb, after_sobel)


def test_state_dict_matches_released_layout(full_net, layout):
    expected = layout["ckpt_embed.t7"]["net"]
    ours = {"module." + key: value for key, value in full_net.state_dict().items()}
    assert set(ours) == set(expected)
    for key, spec in expected.items():
        assert list(ours[key].shape) == spec["shape"], key
        assert ours[key].dtype == DTYPES[spec["dtype"]], key
    # stage 2 saves the same network
    assert set(layout["ckpt_ul.t7"]["net"]) == set(expected)


def _random_like_layout(entries, generator):
    out = {}
    for key, spec in entries.items():
        dtype = DTYPES[spec["dtype"]]
        if dtype == torch.int64:
            out[key] = torch.randint(0, 1000, spec["shape"], generator=generator, dtype=torch.int64)
        else:
            out[key] = torch.randn(spec["shape"], generator=generator, dtype=dtype)
    return out


def test_legacy_released_checkpoint_loads_one_to_one(full_net, layout, tmp_path):
    g = torch.Generator().manual_seed(5)
    net_state = _random_like_layout(layout["ckpt_embed.t7"]["net"], g)
    n = 100  # a small bank: the memory's shape is not what this test is about
    released = {
        "net": net_state,
        "npc": {"params": torch.tensor([0.1, 0.5]), "memory": torch.randn(n, 128, generator=g)},
        "ANs_discovery": {"samples_num": torch.tensor(n), "anchor_indexes": torch.arange(n),
                          "instance_indexes": torch.zeros(0, dtype=torch.long), "position": torch.arange(n),
                          "neighbours": torch.randint(0, n, (n, 1), generator=g),
                          "entropy": torch.rand(n, generator=g), "consistency": torch.tensor(0.5)},
        "acc": 0.89, "round": 4, "epoch": 199,
    }
    path = tmp_path / "ckpt_embed.t7"
    torch.save(released, path, _use_new_zipfile_serialization=False)  # PyTorch 1.1's format
    with open(path, "rb") as f:
        assert f.read(2) != b"PK"  # really not a zip archive
    ckpt = load_checkpoint(str(path))
    assert ckpt["round"] == 4 and ckpt["epoch"] == 199
    load_network(full_net, ckpt["net"], str(path))
    state = full_net.state_dict()
    assert len(state) == len(net_state)
    for key, value in net_state.items():
        assert torch.equal(state[key[len("module."):]], value), key
    # the same weights load without the prefix as well
    other = small_net()
    other_state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in other.state_dict().items()}
    load_network(other, strip_prefix({"module." + k: v for k, v in other_state.items()}), "x")
    load_network(other, other_state, "x")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in other_state.items())


def test_load_network_rejects_another_low_dim():
    source = small_net(low_dim=16)
    target = small_net(low_dim=32, seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = {"module." + k: v for k, v in source.state_dict().items()}
    with pytest.raises(InputError, match="low_dim"):
        load_network(target, state, "ckpt_embed.t7")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing loaded


# ---------------------------------------------------------------------------------------------
# Stage-2 heads
# ---------------------------------------------------------------------------------------------

def heads_reference(v, weight, temperature, norm):
    """softmax(v · Ŵ / τ_c): 'released' divides each row of W by its norm, 'paper' each column."""
    w = weight.double().tolist()
    d, c = len(w), len(w[0])
    if norm == "released":
        row_norm = [math.sqrt(sum(x * x for x in row)) for row in w]
        w_hat = [[w[i][j] / row_norm[i] for j in range(c)] for i in range(d)]
    else:
        col_norm = [math.sqrt(sum(w[i][j] ** 2 for i in range(d))) for j in range(c)]
        w_hat = [[w[i][j] / col_norm[j] for j in range(c)] for i in range(d)]
    out = []
    for row in v.double().tolist():
        logits = [sum(row[i] * w_hat[i][j] for i in range(d)) / temperature for j in range(c)]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        out.append([e / sum(exps) for e in exps])
    return torch.tensor(out, dtype=torch.float64)


def test_heads_shapes_frozen_and_layout(layout):
    torch.manual_seed(0)
    heads = MultiHeadNormFC(128, 10)
    state = heads.state_dict()
    assert set(state) == {f"heads.{i}.weight" for i in range(5)}
    assert set(state) == set(layout["ckpt_ul.t7"]["fc"])
    for i in range(5):
        w = heads.heads[i].weight
        assert w.shape == (128, 10) and not w.requires_grad
    assert not any(p.requires_grad for p in heads.parameters())
    # each head is its own N(0, 1) draw
    assert not torch.equal(heads.heads[0].weight, heads.heads[1].weight)
    all_w = torch.stack([h.weight for h in heads.heads])
    assert abs(all_w.mean().item()) < 0.1 and all_w.std().item() == pytest.approx(1.0, abs=0.1)
    v = F.normalize(torch.randn(4, 128), dim=1)
    out = heads(v)
    assert isinstance(out, list) and len(out) == 5
    for p in out:
        assert p.shape == (4, 10)
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(1), torch.ones(4))


@pytest.mark.parametrize("norm", ["released", "paper"])
def test_heads_match_manual_computation(norm):
    torch.manual_seed(1)
    heads = MultiHeadNormFC(12, 5, temperature=0.1, norm=norm)
    v = F.normalize(torch.randn(3, 12), dim=1)
    out = heads(v)
    for head, p in zip(heads.heads, out):
        torch.testing.assert_close(p.double(), heads_reference(v, head.weight, 0.1, norm), rtol=1e-5, atol=1e-6)
    # and the other normalization gives clearly different probabilities on the same weights
    other = "paper" if norm == "released" else "released"
    assert (out[0].double() - heads_reference(v, heads.heads[0].weight, 0.1, other)).abs().max() > 1e-2


def test_released_heads_normalize_rows_not_classes():
    torch.manual_seed(2)
    released = MultiHeadNormFC(128, 10, norm="released").heads[0]
    w_hat = released.normalized_weight()
    torch.testing.assert_close(w_hat.norm(dim=1), torch.ones(128))  # each feature dimension
    # class prototypes have norm about sqrt(low_dim / classes), not 1
    assert w_hat.norm(dim=0).mean().item() == pytest.approx(math.sqrt(128 / 10), rel=0.1)
    paper = MultiHeadNormFC(128, 10, norm="paper").heads[0]
    torch.testing.assert_close(paper.normalized_weight().norm(dim=0), torch.ones(10))
