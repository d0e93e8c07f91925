"""The Π-model and Mean Teacher pieces (lib/semi_supervised.py; docs/method.md, "Semi-supervised methods
(Table 4)"): the ramp-up at the epochs where it changes, the consistency loss against a float64 hand
computation, the EMA update bit for bit, and that unlabelled images' labels cannot reach the loss."""
import copy
import math

import pytest
import torch
from torch import nn

from lib import semi_supervised as ss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rampup_by_hand():
    assert ss.RAMPUP_SHAPE == 5.0 and ss.RAMPUP_EPOCHS == 80
    assert ss.sigmoid_rampup(0, 80) == math.exp(-5.0)
    assert ss.sigmoid_rampup(40, 80) == math.exp(-5.0 * 0.25)  # mid: t = 0.5
    assert ss.sigmoid_rampup(60, 80) == math.exp(-5.0 * 0.0625)  # t = 0.75
    assert ss.sigmoid_rampup(79, 80) == math.exp(-5.0 * (1 / 80) ** 2)
    assert ss.sigmoid_rampup(80, 80) == 1.0  # end
    assert ss.sigmoid_rampup(300, 80) == 1.0  # past the end: clipped
    assert ss.sigmoid_rampup(-3, 80) == math.exp(-5.0)  # before the start: clipped
    assert ss.sigmoid_rampup(2.5, 5) == math.exp(-5.0 * 0.25)  # fractional epochs (per-step ramp-up)
    assert ss.sigmoid_rampup(0, 0) == 1.0  # no ramp-up
    assert ss.sigmoid_rampup(10) == math.exp(-5.0 * (70 / 80) ** 2)  # the default length, 80
    values = [ss.sigmoid_rampup(e, 80) for e in range(0, 81)]
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly increasing up to the end
    assert ss.consistency_weight(40, 100.0, 80) == 100.0 * math.exp(-1.25)
    assert ss.consistency_weight(90, 30.0, 80) == 30.0


def test_ema_decay_switches_at_the_end_of_the_rampup():
    assert ss.EMA_DECAY_DURING_RAMPUP == 0.99 and ss.EMA_DECAY_AFTER_RAMPUP == 0.999
    assert ss.ema_decay(0, 80) == 0.99 and ss.ema_decay(79.9, 80) == 0.99
    assert ss.ema_decay(80, 80) == 0.999 and ss.ema_decay(500, 80) == 0.999


def test_consistency_loss_against_float64_hand_computation():
    torch.manual_seed(0)
    a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    total = 0.0
    for i in range(5):
        za = [math.exp(v) for v in a[i].tolist()]
        zb = [math.exp(v) for v in b[i].tolist()]
        pa, pb = [v / sum(za) for v in za], [v / sum(zb) for v in zb]
        total += sum((x - y) ** 2 for x, y in zip(pa, pb))
    expected = total / (4 * 5)  # averaged over the C = 4 classes and the B = 5 images
    got = ss.consistency_loss(a, b)
    assert got.dtype == torch.float64
    assert abs(got.item() - expected) < 1e-15
    assert ss.consistency_loss(a, a).item() == 0.0
    with pytest.raises(ValueError, match="shapes"):
        ss.consistency_loss(a, b[:4])


def test_consistency_gradient_flows_only_where_the_caller_lets_it():
    torch.manual_seed(1)
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ss.consistency_loss(student, teacher.detach()).backward()  # Mean Teacher: the teacher is a constant
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    # the gradient by hand: d/dlogits of mean((p - q)²) = J_softmaxᵀ · 2(p − q) / (C·B)
    p, q = torch.softmax(student.detach(), 1), torch.softmax(teacher.detach(), 1)
    g = 2 * (p - q) / 15
    expected = p * (g - (g * p).sum(1, keepdim=True))
    assert torch.allclose(student.grad, expected, atol=1e-15)
    student.grad = None
    ss.consistency_loss(student, teacher).backward()  # Π-model: both passes carry gradient
    assert teacher.grad.abs().sum() > 0


def test_semi_supervised_loss_by_hand():
    torch.manual_seed(2)
    logits, targets = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([2, 0])  # the first 2 rows are labelled
    parts = ss.semi_supervised_loss(logits, labels, targets, weight=7.0)
    log_p = torch.log_softmax(logits, 1)
    expected_class = -(log_p[0, 2] + log_p[1, 0]) / 6  # summed over the labelled rows, divided by B = 6
    assert abs(parts["class"].item() - expected_class.item()) < 1e-15
    assert parts["consistency"].item() == ss.consistency_loss(logits, targets).item()
    assert parts["loss"].item() == (parts["class"] + 7.0 * parts["consistency"]).item()
    empty = ss.semi_supervised_loss(logits, torch.zeros(0, dtype=torch.long), targets, weight=1.0)
    assert empty["class"].item() == 0.0  # an all-unlabelled batch: the consistency term alone
    with pytest.raises(ValueError, match="7 labels for a batch of 6"):
        ss.semi_supervised_loss(logits, torch.zeros(7, dtype=torch.long), targets, 1.0)


def _tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


def test_unlabelled_labels_never_reach_the_loss():
    """A batch of 3 labelled and 5 unlabelled images whose true labels are all known: the step's loss and
    every gradient are bit-identical when the unlabelled images' true labels are shuffled (the caller
    passes only the labelled ones), and they do change when a labelled image's label changes."""
    torch.manual_seed(3)
    images = torch.randn(8, 3, 6, 6)
    true_labels = torch.tensor([1, 4, 0, 2, 3, 3, 1, 0])
    labelled = 3

    def step(all_labels):
        net = _tiny_net(4)
        teacher = copy.deepcopy(net)
        logits = net(images)
        with torch.no_grad():
            target = teacher(images + 0.1)
        parts = ss.semi_supervised_loss(logits, all_labels[:labelled], target, weight=ss.consistency_weight(
            10, 100.0))
        parts["loss"].backward()
        return parts["loss"].detach(), [p.grad.clone() for p in net.parameters()]

    loss, grads = step(true_labels)
    shuffled = true_labels.clone()
    shuffled[labelled:] = true_labels[labelled:][torch.tensor([4, 2, 0, 3, 1])]
    assert not torch.equal(shuffled, true_labels)
    loss2, grads2 = step(shuffled)
    assert torch.equal(loss, loss2) and all(torch.equal(g, h) for g, h in zip(grads, grads2))
    changed = true_labels.clone()
    changed[0] = 3
    loss3, _ = step(changed)
    assert not torch.equal(loss, loss3)


def test_ema_update_bit_for_bit():
    student, teacher = _tiny_net(5), _tiny_net(6)
    student.train()
    with torch.no_grad():
        student(torch.randn(4, 3, 6, 6))  # moves the student's BatchNorm statistics
        for p in student.parameters():  # and every parameter away from the teacher's (BN's start at 1, 0)
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    alpha = 0.99
    ss.ema_update(teacher, student, alpha)
    student_state = student.state_dict()
    for name, parameter in teacher.named_parameters():
        expected = before[name] * alpha + student_state[name] * (1.0 - alpha)
        assert torch.equal(parameter, expected), name
        assert not torch.equal(parameter, before[name])
        # and in float64, to float32's precision
        exact = before[name].double() * alpha + student_state[name].double() * (1 - alpha)
        assert torch.allclose(parameter.double(), exact, rtol=0, atol=1e-6)
    for name, buffer in teacher.named_buffers():
        assert torch.equal(buffer, student_state[name]), name  # running statistics copied
    assert int(teacher[1].num_batches_tracked) == 1
    ss.ema_update(teacher, student, 1.0)  # α = 1 keeps the teacher
    assert all(torch.equal(p, teacher.state_dict()[n]) for n, p in teacher.named_parameters())
    ss.ema_update(teacher, student, 0.0)  # α = 0 copies the student
    assert all(torch.equal(p, student_state[n]) for n, p in teacher.named_parameters())
    with pytest.raises(ValueError, match="EMA decay"):
        ss.ema_update(teacher, student, 1.5)
