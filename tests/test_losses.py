"""The losses of both stages (Eq. 1-3, Eq. 9, Eq. 11) against slow references written from the
equations (docs/method.md, "AND loss (Eq. 1)", "UE loss (Eq. 2)", "AUG loss (Eq. 3)",
"Class-assignment loss (Eq. 9)", "Consistency-preserving loss (Eq. 11)").

Each reference loops over rows (and classes) in float64 and builds every term of the equation
explicitly; autograd through the reference gives the reference gradient. The losses compute in
the dtype of their inputs, so float64 inputs are held to the references at 1e-12.
"""
import math
import sys

import pytest
import torch

from lib.losses import and_loss, aug_loss, iic_loss, ue_loss

EPS = sys.float_info.epsilon  # 2.22e-16, the clamp of Eq. 9 in the released code
TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def grad_of(loss_fn, x):
    x = x.detach().clone().requires_grad_(True)
    loss = loss_fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


# ---------------------------------------------------------------------------------------------
# AND loss (Eq. 1)
# ---------------------------------------------------------------------------------------------

def and_loss_reference(logits, indexes, neighbours, is_anchor):
    """Eq. 1: p = softmax(row); −log p[own] (non-anchor) or −log(p[own] + Σ p[neighbours]) (anchor);
    summed over the 2B rows, divided by 2B. Row r belongs to image r mod B (view 1 rows first)."""
    rows, n = logits.shape
    b = indexes.shape[0]
    total = logits.new_zeros(())
    for r in range(rows):
        i = r % b
        row = logits[r]
        exps = [torch.exp(row[j]) for j in range(n)]
        z = sum(exps)
        mass = exps[int(indexes[i])] / z
        if bool(is_anchor[i]):
            for nb in neighbours[i].tolist():
                mass = mass + exps[nb] / z
        total = total - torch.log(mass)
    return total / rows


def _and_inputs(seed, b=4, n=15, k=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * b, n, generator=g, dtype=torch.float64) * 3
    indexes = torch.randperm(n, generator=g)[:b]
    neighbours = torch.empty(b, k, dtype=torch.long)
    for i in range(b):  # k distinct neighbours, never the image itself (as discovery gives them)
        others = [j for j in torch.randperm(n, generator=g).tolist() if j != int(indexes[i])]
        neighbours[i] = torch.tensor(others[:k])
    is_anchor = torch.tensor([True, False, True, False])[:b]
    return logits, indexes, neighbours, is_anchor


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_and_loss_matches_reference_value_and_gradient(seed):
    logits, indexes, neighbours, is_anchor = _and_inputs(seed)
    loss, grad = grad_of(lambda x: and_loss(x, indexes, neighbours, is_anchor), logits)
    ref, ref_grad = grad_of(lambda x: and_loss_reference(x, indexes, neighbours, is_anchor), logits)
    torch.testing.assert_close(loss, ref, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)


def test_and_loss_all_anchors_and_no_anchors():
    logits, indexes, neighbours, _ = _and_inputs(3)
    for is_anchor in (torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)):
        loss, grad = grad_of(lambda x, a=is_anchor: and_loss(x, indexes, neighbours, a), logits)
        ref, ref_grad = grad_of(lambda x, a=is_anchor: and_loss_reference(x, indexes, neighbours, a), logits)
        torch.testing.assert_close(loss, ref, **TIGHT)
        torch.testing.assert_close(grad, ref_grad, **TIGHT)


def test_and_loss_non_anchor_rows_ignore_neighbour_values():
    logits, indexes, neighbours, _ = _and_inputs(4)
    is_anchor = torch.tensor([True, False, False, True])
    other = neighbours.clone()
    other[1] = (neighbours[1] + 5) % logits.shape[1]  # new neighbours for the non-anchors only
    other[2] = torch.tensor([int(indexes[2])] * neighbours.shape[1])  # even its own index
    assert not torch.equal(other[1:3], neighbours[1:3])
    loss_a, grad_a = grad_of(lambda x: and_loss(x, indexes, neighbours, is_anchor), logits)
    loss_b, grad_b = grad_of(lambda x: and_loss(x, indexes, other, is_anchor), logits)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=1e-12)
    # a non-anchor-only batch is plain instance discrimination: mean −log p[own]
    none = torch.zeros(4, dtype=torch.bool)
    log_p = torch.log_softmax(logits, dim=1)
    own = indexes.repeat(2)
    expected = -log_p[torch.arange(8), own].mean()
    torch.testing.assert_close(and_loss(logits, indexes, other, none), expected, rtol=1e-12, atol=1e-12)


def test_and_loss_anchor_row_uses_its_neighbours():
    # the anchor's loss must change when its neighbours change (guards against a no-op mask)
    logits, indexes, neighbours, _ = _and_inputs(5)
    is_anchor = torch.tensor([True, False, False, False])
    other = neighbours.clone()
    other[0] = torch.tensor([j for j in range(logits.shape[1])
                             if j != int(indexes[0]) and j not in neighbours[0].tolist()][:3])
    assert and_loss(logits, indexes, neighbours, is_anchor) != and_loss(logits, indexes, other, is_anchor)


# ---------------------------------------------------------------------------------------------
# AUG loss (Eq. 3 / Eq. 11), released batch-criterion form
# ---------------------------------------------------------------------------------------------

def aug_loss_reference(features, temperature, neg_m=1.0, detach_right=True):
    """Eq. 3, released form: rows L2-normalized; A_ij = exp(x_i · x_j / T) for j ≠ i;
    pos_i = A_i,partner (partner = i ± B); D_i = Σ_{j≠i} A_ij for m = 1. For m ≠ 1 the released
    batch criterion uses D_i = pos_i + m · Σ_{j∉{i,partner}} A_ij and weighs the negative sum by m.
    loss = −[Σ_i log(pos_i / D_i) + m Σ_i Σ_{j∉{i,partner}} log(1 − A_ij / D_i)] / 2B.
    With ``detach_right`` the right factor x_j of every inner product is a constant."""
    rows = features.shape[0]
    half = rows // 2
    units = [features[i] / torch.sqrt((features[i] ** 2).sum()) for i in range(rows)]
    total = features.new_zeros(())
    for i in range(rows):
        partner = (i + half) % rows
        a = {}
        for j in range(rows):
            if j == i:
                continue
            right = units[j].detach() if detach_right else units[j]
            a[j] = torch.exp((units[i] * right).sum() / temperature)
        pos = a[partner]
        neg_sum = sum(a[j] for j in a if j != partner)
        denom = pos + neg_m * neg_sum
        term = torch.log(pos / denom)
        for j in a:
            if j != partner:
                term = term + neg_m * torch.log(1 - a[j] / denom)
        total = total - term
    return total / rows


def _aug_features(seed, b=3, d=12):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, d, generator=g, dtype=torch.float64)
    # two "views": correlated so that the positive pair matters, with different norms per row
    views = torch.cat([base + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64),
                       base + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)])
    return views * torch.rand(2 * b, 1, generator=g, dtype=torch.float64).add(0.5) * 4


@pytest.mark.parametrize("neg_m", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("seed,b", [(0, 3), (1, 4)])
def test_aug_loss_matches_reference_value_and_gradient(seed, b, neg_m):
    features = _aug_features(seed, b=b)
    loss, grad = grad_of(lambda x: aug_loss(x, 0.1, neg_m=neg_m), features)
    ref, ref_grad = grad_of(lambda x: aug_loss_reference(x, 0.1, neg_m=neg_m), features)
    assert loss.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(loss, ref, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_aug_loss_other_temperatures(temperature):
    features = _aug_features(7, b=4, d=10)
    loss, grad = grad_of(lambda x: aug_loss(x, temperature), features)
    ref, ref_grad = grad_of(lambda x: aug_loss_reference(x, temperature), features)
    torch.testing.assert_close(loss, ref, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)


@pytest.mark.parametrize("neg_m", [1.0, 0.5])
def test_aug_loss_detaches_the_right_factor(neg_m):
    """The gradient flows only through x_i: it must differ from the fully differentiated loss."""
    features = _aug_features(3, b=4)
    _, grad = grad_of(lambda x: aug_loss(x, 0.1, neg_m=neg_m), features)
    ref_value, detached = grad_of(lambda x: aug_loss_reference(x, 0.1, neg_m=neg_m), features)
    full_value, full = grad_of(
        lambda x: aug_loss_reference(x, 0.1, neg_m=neg_m, detach_right=False), features)
    torch.testing.assert_close(ref_value, full_value)  # same value, different gradients
    gap = (detached - full).abs().max()
    assert gap > 1e-2 * full.abs().max()  # the two gradients are far apart ...
    torch.testing.assert_close(grad, detached, **TIGHT)  # ... and we follow the detached one


def test_aug_loss_is_scale_invariant_per_row():
    # rows are L2-normalized inside: rescaling a row changes nothing
    features = _aug_features(5, b=3)
    scaled = features * torch.tensor([1.0, 3.0, 0.2, 7.0, 1.0, 0.5], dtype=torch.float64).unsqueeze(1)
    torch.testing.assert_close(aug_loss(features, 0.1), aug_loss(scaled, 0.1), **TIGHT)


# ---------------------------------------------------------------------------------------------
# UE loss (Eq. 2)
# ---------------------------------------------------------------------------------------------

def ue_loss_reference(logits, indexes, own_logit=-10.0):
    """Eq. 2: each row's own-index logit set to −10, entropy of its softmax, summed over 2B rows / 2B."""
    rows, n = logits.shape
    b = indexes.shape[0]
    total = logits.new_zeros(())
    for r in range(rows):
        own = int(indexes[r % b])
        row = [logits.new_tensor(own_logit) if j == own else logits[r, j] for j in range(n)]
        exps = [torch.exp(v) for v in row]
        z = sum(exps)
        for e in exps:
            p = e / z
            total = total - p * torch.log(p)
    return total / rows


@pytest.mark.parametrize("seed,b,n", [(0, 3, 10), (1, 4, 20)])
def test_ue_loss_matches_reference_value_and_gradient(seed, b, n):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * b, n, generator=g, dtype=torch.float64) * 2
    indexes = torch.randperm(n, generator=g)[:b]
    loss, grad = grad_of(lambda x: ue_loss(x, indexes), logits)
    ref, ref_grad = grad_of(lambda x: ue_loss_reference(x, indexes), logits)
    torch.testing.assert_close(loss, ref, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)
    rows = torch.arange(2 * b)
    own = indexes.repeat(2)
    assert torch.all(grad[rows, own] == 0)  # the own logit is replaced, so it gets no gradient
    other = torch.ones_like(grad, dtype=torch.bool)
    other[rows, own] = False
    assert torch.all(grad[other] != 0)


def test_ue_loss_does_not_depend_on_the_own_logit_and_leaves_input_intact():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 12, generator=g, dtype=torch.float64)
    indexes = torch.tensor([4, 0, 9])
    before = logits.clone()
    loss = ue_loss(logits, indexes)
    assert torch.equal(logits, before)
    changed = logits.clone()
    changed[torch.arange(6), indexes.repeat(2)] = 50.0
    torch.testing.assert_close(ue_loss(changed, indexes), loss, rtol=0, atol=1e-12)
    # a uniform row (own logit aside) has the entropy of N − 1 equal logits plus one at −10
    flat = torch.zeros(6, 12, dtype=torch.float64)
    p_own = math.exp(-10) / (math.exp(-10) + 11)
    p_other = 1 / (math.exp(-10) + 11)
    expected = -(p_own * math.log(p_own) + 11 * p_other * math.log(p_other))
    assert ue_loss(flat, indexes).item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# IIC class-assignment loss (Eq. 9)
# ---------------------------------------------------------------------------------------------

def iic_loss_reference(p1, p2, eps=EPS):
    """Eq. 9: P = Σ_batch p1ᵀ p2, symmetrized, divided by its sum; row and column marginals of that
    joint; P and the marginals clamped below at eps (a clamped entry is the constant eps);
    loss = −Σ_cc' P_cc' (log P_cc' − log P_c' − log P_c)."""
    b, c = p1.shape
    joint = [[sum(p1[n, i] * p2[n, j] for n in range(b)) for j in range(c)] for i in range(c)]
    sym = [[(joint[i][j] + joint[j][i]) / 2 for j in range(c)] for i in range(c)]
    total = sum(sym[i][j] for i in range(c) for j in range(c))
    p = [[sym[i][j] / total for j in range(c)] for i in range(c)]
    row = [sum(p[i][j] for j in range(c)) for i in range(c)]
    col = [sum(p[i][j] for i in range(c)) for j in range(c)]

    def clamp(v):
        return v if v.item() >= eps else p1.new_tensor(eps)

    row = [clamp(v) for v in row]
    col = [clamp(v) for v in col]
    loss = p1.new_zeros(())
    for i in range(c):
        for j in range(c):
            pij = clamp(p[i][j])
            loss = loss - pij * (torch.log(pij) - torch.log(col[j]) - torch.log(row[i]))
    return loss


def _iic_grads(fn, p1, p2):
    a = p1.detach().clone().requires_grad_(True)
    b = p2.detach().clone().requires_grad_(True)
    loss = fn(a, b)
    ga, gb = torch.autograd.grad(loss, (a, b))
    return loss.detach(), ga, gb


@pytest.mark.parametrize("seed,b,c", [(0, 6, 3), (1, 8, 5)])
def test_iic_loss_matches_reference_value_and_gradient(seed, b, c):
    g = torch.Generator().manual_seed(seed)
    p1 = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64) * 2, dim=1)
    p2 = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64) * 2, dim=1)
    loss, g1, g2 = _iic_grads(iic_loss, p1, p2)
    ref, r1, r2 = _iic_grads(iic_loss_reference, p1, p2)
    assert loss.dtype == g1.dtype == g2.dtype == torch.float64
    torch.testing.assert_close(loss, ref, **TIGHT)
    torch.testing.assert_close(g1, r1, **TIGHT)
    torch.testing.assert_close(g2, r2, **TIGHT)
    assert not torch.allclose(r1, r2)  # p1 and p2 enter differently: both gradients are checked


@pytest.mark.parametrize("c", [2, 5, 10])
def test_iic_loss_perfect_balanced_assignment_is_minus_log_c(c):
    labels = torch.arange(c).repeat(3)  # 3 samples per class, both views agree
    onehot = torch.nn.functional.one_hot(labels, c).double()
    loss = iic_loss(onehot, onehot)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(-math.log(c), abs=1e-6)


def test_iic_loss_clamps_empty_classes_at_machine_epsilon():
    # class 3 never receives mass: its marginals and joint entries are 0 and are clamped to eps
    g = torch.Generator().manual_seed(3)
    p1 = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    p2 = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    p1[:, 3] = 0
    p2[:, 3] = 0
    p1 = p1 / p1.sum(1, keepdim=True)
    p2 = p2 / p2.sum(1, keepdim=True)
    loss, g1, g2 = _iic_grads(iic_loss, p1, p2)
    ref, r1, r2 = _iic_grads(iic_loss_reference, p1, p2)
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    torch.testing.assert_close(loss, ref, **TIGHT)
    torch.testing.assert_close(g1, r1, **TIGHT)
    torch.testing.assert_close(g2, r2, **TIGHT)
    # the floor is machine epsilon, not some larger constant: a 1e-4 floor moves the loss visibly
    assert abs(loss.item() - iic_loss_reference(p1, p2, eps=1e-4).item()) > 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_keep_the_dtype_of_their_inputs(dtype):
    logits, indexes, neighbours, is_anchor = _and_inputs(6)
    features = _aug_features(6, b=4)
    g = torch.Generator().manual_seed(6)
    p1, p2 = (torch.softmax(torch.randn(8, 3, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    cases = [
        (lambda x: and_loss(x, indexes, neighbours, is_anchor),
         lambda x: and_loss_reference(x, indexes, neighbours, is_anchor), logits),
        (lambda x: ue_loss(x, indexes), lambda x: ue_loss_reference(x, indexes), logits),
        (lambda x: aug_loss(x, 0.1), lambda x: aug_loss_reference(x, 0.1), features),
        (lambda x: iic_loss(x, p2.to(x.dtype)), lambda x: iic_loss_reference(x, p2), p1),
    ]
    for loss_fn, reference, x in cases:
        loss, grad = grad_of(loss_fn, x.to(dtype))
        assert loss.dtype == grad.dtype == dtype
        ref, ref_grad = grad_of(reference, x)
        tol = TIGHT if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(loss.double(), ref, **tol)
        torch.testing.assert_close(grad.double(), ref_grad, **tol)
