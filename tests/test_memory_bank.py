"""The memory bank (NPC) of stage 1 (docs/method.md, "Memory bank") against slow loops, and its
released checkpoint layout (docs/method.md, "Checkpoint formats")."""
import math

import pytest
import torch

from lib.memory_bank import MemoryBank


@pytest.mark.parametrize("dim", [128, 27])
def test_init_is_uniform_in_minus_s_s(dim):
    torch.manual_seed(0)
    bank = MemoryBank(2000, dim)
    s = 1.0 / math.sqrt(dim / 3)
    memory = bank.memory
    assert memory.shape == (2000, dim)
    assert memory.dtype == torch.float32
    assert memory.min() >= -s and memory.max() <= s
    # it fills the whole range (not e.g. [0, s] or [-s/2, s/2]) and is centred
    assert memory.min() < -0.99 * s and memory.max() > 0.99 * s
    assert abs(memory.mean().item()) < 0.01 * s
    # uniform: variance s² / 3, and a quarter of the entries in each quarter of the range
    assert memory.var().item() == pytest.approx(s * s / 3, rel=0.02)
    quarter = ((memory > s / 2).float().mean().item())
    assert quarter == pytest.approx(0.25, abs=0.01)
    # not normalized at initialization (released behaviour)
    assert not torch.allclose(memory.norm(dim=1), torch.ones(2000))


def test_logits_value():
    torch.manual_seed(1)
    bank = MemoryBank(11, 6, temperature=0.07)
    features = torch.randn(8, 6)
    logits = bank(features)
    assert logits.shape == (8, 11)
    expected = torch.empty(8, 11, dtype=torch.float64)
    for r in range(8):
        for n in range(11):
            expected[r, n] = sum(float(features[r, d]) * float(bank.memory[n, d]) for d in range(6)) / 0.07
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_features_only():
    torch.manual_seed(2)
    bank = MemoryBank(9, 5, temperature=0.1)
    features = torch.randn(6, 5, requires_grad=True)
    grad_logits = torch.randn(6, 9)
    (grad,) = torch.autograd.grad(bank(features), features, grad_outputs=grad_logits)
    torch.testing.assert_close(grad, grad_logits @ bank.memory / 0.1, rtol=1e-5, atol=1e-6)
    # the memory is a constant for autograd: a buffer, no parameter, never gets a gradient
    assert list(bank.parameters()) == []
    assert not bank.memory.requires_grad
    before = bank.memory.clone()
    bank(features).mul(grad_logits).sum().backward()
    assert bank.memory.grad is None
    assert torch.equal(bank.memory, before)  # the forward pass does not write the bank


def _update_reference(memory, indexes, view2, m):
    out = memory.clone()
    for row, i in enumerate(indexes.tolist()):
        v = [m * float(memory[i, d]) + (1 - m) * float(view2[row, d]) for d in range(memory.shape[1])]
        norm = math.sqrt(sum(x * x for x in v))
        out[i] = torch.tensor([x / norm for x in v], dtype=memory.dtype)
    return out


@pytest.mark.parametrize("momentum", [0.5, 0.8])
def test_update_uses_view_two_once_per_slot(momentum):
    torch.manual_seed(3)
    bank = MemoryBank(12, 4, momentum=momentum)
    old = bank.memory.clone()
    indexes = torch.tensor([7, 2, 10])
    view1, view2 = torch.randn(3, 4), torch.randn(3, 4)
    bank.update(indexes, torch.cat([view1, view2]))  # (2B, d), view 1 rows first
    expected = _update_reference(old, indexes, view2, momentum)
    torch.testing.assert_close(bank.memory, expected, rtol=1e-5, atol=1e-6)
    untouched = [i for i in range(12) if i not in indexes.tolist()]
    assert torch.equal(bank.memory[untouched], old[untouched])
    torch.testing.assert_close(bank.memory[indexes].norm(dim=1), torch.ones(3))
    # view 1 played no part: a reference fed view 1 is far from the result
    wrong = _update_reference(old, indexes, view1, momentum)
    assert (bank.memory[indexes] - wrong[indexes]).abs().max() > 1e-2


def test_update_with_one_view_matches_second_view_of_two():
    torch.manual_seed(4)
    a = MemoryBank(10, 5)
    b = MemoryBank(10, 5)
    b.load_state_dict(a.state_dict())
    indexes = torch.tensor([0, 9, 4, 5])
    feats = torch.randn(8, 5)
    a.update(indexes, feats)
    b.update(indexes, feats[4:])
    assert torch.equal(a.memory, b.memory)


def test_params_buffer_and_state_dict():
    bank = MemoryBank(7, 3, temperature=0.1, momentum=0.5)
    state = bank.state_dict()
    assert set(state) == {"memory", "params"}
    torch.testing.assert_close(state["params"], torch.tensor([0.1, 0.5]))
    assert state["params"].dtype == torch.float32 and state["memory"].dtype == torch.float32
    assert state["memory"].shape == (7, 3)
    other = MemoryBank(7, 3, temperature=0.2, momentum=0.9)
    torch.testing.assert_close(other.state_dict()["params"], torch.tensor([0.2, 0.9]))
    other.load_state_dict(state)
    assert torch.equal(other.memory, bank.memory)
    # buffers follow the module: .double() converts the bank like any other state
    assert bank.double().memory.dtype == torch.float64


def test_float64_bank_stays_float64_and_matches_the_loops():
    torch.manual_seed(5)
    bank = MemoryBank(12, 4, temperature=0.07, momentum=0.8).double()
    assert bank.memory.dtype == torch.float64
    features = torch.randn(6, 4, dtype=torch.float64)
    logits = bank(features)
    assert logits.dtype == torch.float64
    expected = torch.tensor([[sum(float(f[d]) * float(m[d]) for d in range(4)) / 0.07 for m in bank.memory]
                             for f in features], dtype=torch.float64)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    old = bank.memory.clone()
    indexes = torch.tensor([3, 11, 0])
    bank.update(indexes, features)  # (2B, d): view 2 is the second half
    assert bank.memory.dtype == torch.float64
    expected = _update_reference(old, indexes, features[3:], 0.8)
    torch.testing.assert_close(bank.memory, expected, rtol=1e-12, atol=1e-12)
    # a float32 round trip of the features would move the slots by about 1e-8
    rounded = _update_reference(old, indexes, features[3:].float().double(), 0.8)
    assert (bank.memory - rounded).abs().max() > 1e-10


def test_bfloat16_features_update_a_float32_bank_in_float32():
    torch.manual_seed(6)
    bank = MemoryBank(10, 8)
    old = bank.memory.clone()
    indexes = torch.tensor([1, 7])
    features = torch.randn(4, 8).bfloat16()
    bank.update(indexes, features)
    assert bank.memory.dtype == torch.float32
    expected = torch.nn.functional.normalize(old[indexes] * 0.5 + features[2:].float() * 0.5, dim=1)
    assert torch.equal(bank.memory[indexes], expected)
