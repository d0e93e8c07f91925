"""Schedules and optimizer of both stages (docs/method.md, "Optimizer and schedules"): exact values
of the released formulas at the epochs where they change, and one SGD step computed by hand."""
import pytest
import torch
from torch import nn

from lib.optim import sgd_optimizer
from lib.schedules import num_anchors, scaled, step_lr, ue_weight
from models import MultiHeadNormFC, resnet18

# epoch -> factor of the base rate: lr for epoch < 80, then lr · 0.1^((epoch − 80) // 40), so the
# first decay is at 120 (not 80) and epoch 299 of stage 2 is in its fifth decayed step
LR_FACTORS = {0: 1, 1: 1, 79: 1, 80: 1, 119: 1, 120: 0.1, 159: 0.1, 160: 0.01, 199: 0.01,
              200: 1e-3, 240: 1e-4, 280: 1e-5, 299: 1e-5}


@pytest.mark.parametrize("base_lr", [0.03, 0.01])
@pytest.mark.parametrize("epoch", sorted(LR_FACTORS))
def test_step_lr(epoch, base_lr):
    assert step_lr(epoch, base_lr) == pytest.approx(base_lr * LR_FACTORS[epoch], rel=1e-12, abs=0)


def test_step_lr_is_the_released_expression_to_the_last_bit():
    for epoch in range(300):
        for base_lr in (0.03, 0.01):
            expected = base_lr if epoch < 80 else base_lr * 0.1 ** ((epoch - 80) // 40)
            assert step_lr(epoch, base_lr) == expected


@pytest.mark.parametrize("epoch,weight", [(0, 0.0), (79, 0.0), (80, 0.2), (159, 0.2), (160, 0.4), (199, 0.4)])
def test_ue_weight(epoch, weight):
    assert ue_weight(epoch) == pytest.approx(weight, rel=1e-12, abs=0)


@pytest.mark.parametrize("round_index,anchors", [(0, 0), (1, 12500), (2, 25000), (3, 37500), (4, 50000)])
def test_num_anchors_per_round(round_index, anchors):
    assert num_anchors(50000, 0.25, round_index) == anchors


@pytest.mark.parametrize("n,rate,round_index,anchors", [
    (10, 0.25, 1, 2),     # 2.5: floored, not rounded up
    (10, 0.25, 3, 7),     # 7.5: floored, where round() would give 8
    (999, 0.25, 1, 249),  # 249.75
    (1000, 0.07, 1, 70),  # 70.00000000000001 in floating point
    (105000, 0.25, 3, 78750),
])
def test_num_anchors_floors_the_product(n, rate, round_index, anchors):
    assert num_anchors(n, rate, round_index) == anchors
    assert isinstance(num_anchors(n, rate, round_index), int)


def test_optimizer_settings():
    net = nn.Linear(3, 2)
    opt = sgd_optimizer(net, lr=0.03, momentum=0.9, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.SGD)
    (group,) = opt.param_groups
    assert group["nesterov"] is True
    assert group["momentum"] == 0.9 and group["dampening"] == 0
    assert group["weight_decay"] == 5e-4
    assert group["lr"] == 0.03


def _trained_names(net, opt):
    ids = {id(p) for group in opt.param_groups for p in group["params"]}
    return {name for name, p in net.named_parameters() if id(p) in ids}


def test_optimizer_trains_every_parameter_but_the_sobel_layers():
    net = resnet18(low_dim=16, width=4)
    opt = sgd_optimizer(net, 0.03, 0.9, 5e-4)
    names = {name for name, _ in net.named_parameters()}
    sobel = {name for name in names if name.startswith("sobel.")}
    assert sobel == {"sobel.0.weight", "sobel.0.bias", "sobel.1.weight", "sobel.1.bias"}
    assert _trained_names(net, opt) == names - sobel
    norms = [name for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) > 20  # both trunks, their shortcuts included
    for name in norms:  # every BatchNorm's weight and bias is trained (and decayed)
        assert {f"{name}.weight", f"{name}.bias"} <= _trained_names(net, opt)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names) - 4  # no parameter twice


def test_optimizer_leaves_out_the_stage_two_heads():
    net, heads = resnet18(low_dim=16, width=4), MultiHeadNormFC(16, 10)
    both = nn.ModuleDict({"net": net, "heads": heads})  # even when they sit in the module given
    opt = sgd_optimizer(both, 0.01, 0.9, 5e-4)
    trained = _trained_names(both, opt)
    assert not any(name.startswith("heads.") for name in trained)
    assert trained == {"net." + name for name in _trained_names(net, sgd_optimizer(net, 0.01, 0.9, 5e-4))}
    with pytest.raises(ValueError):  # the heads alone: nothing to train
        sgd_optimizer(heads, 0.01, 0.9, 5e-4)


def test_two_steps_equal_hand_computed_nesterov_with_weight_decay():
    lr, momentum, decay = 0.1, 0.9, 0.05
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = sgd_optimizer(nn.ParameterList([w]), lr, momentum, decay)
    grads = [[0.3, 0.1, -0.4], [-0.2, 0.6, 0.0]]
    p, buf = [1.0, -2.0, 0.5], None
    for grad in grads:
        w.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        # by hand: d = g + λ p; b = d (first step) or μ b + d; p ← p − lr (d + μ b)
        d = [g + decay * x for g, x in zip(grad, p)]
        buf = d if buf is None else [momentum * b + di for b, di in zip(buf, d)]
        p = [x - lr * (di + momentum * b) for x, di, b in zip(p, d, buf)]
        assert w.tolist() == pytest.approx(p, rel=1e-14, abs=1e-15)


def test_schedule_scale_keeps_the_released_phases_in_a_shorter_run():
    """--schedule_scale s: the learning rate's steps and the UE weight's at s times the released epochs (rounded,
    at least 1); s = 1 is the released schedule at every epoch."""
    for epoch in range(400):
        assert step_lr(epoch, 0.03, 1.0) == step_lr(epoch, 0.03)
        assert ue_weight(epoch, 1.0) == ue_weight(epoch)
    # 0.1: 80 -> 8, 40 -> 4: lr x0.1 at 12, 16, ...; UE 0.2 from epoch 8, 0.4 from 16 (300 epochs -> 30)
    assert [step_lr(e, 1.0, 0.1) for e in (0, 11, 12, 15, 16, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])
    assert [ue_weight(e, 0.1) for e in (0, 7, 8, 15, 16)] == pytest.approx([0, 0, 0.2, 0.2, 0.4])
    assert [scaled(80, s) for s in (1, 0.1, 0.05, 0.001)] == [80, 8, 4, 1]
