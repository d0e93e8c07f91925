"""Fig. 4(a)'s two entropies (lib/diagnostics.py; docs/method.md, "Fig. 4: the two entropies") against a
float64 loop written from the definitions, against pair distributions whose entropies are known in closed
form, and against Eq. 9's loss where the definitions coincide."""
import math

import pytest
import torch

from lib.diagnostics import EPS, EpochEntropies, assignment_entropies, joint_entropies
from lib.losses import iic_loss

TIGHT = {"rel": 1e-12, "abs": 1e-12}


def entropies_reference(p1, p2):
    """Loops over images and class pairs in float64: P_cc' = Σ_i (p1_ic p2_ic' + p1_ic' p2_ic) / 2, divided
    by its sum; H(y) = −Σ_c P_c log P_c, H(y|ŷ) = −Σ_cc' P_cc' log P_cc' + Σ_c' P_c' log P_c' (clamped at eps)."""
    b, c = p1.shape
    joint = [[0.0] * c for _ in range(c)]
    for i in range(b):
        for a in range(c):
            for d in range(c):
                joint[a][d] += (float(p1[i, a]) * float(p2[i, d]) + float(p1[i, d]) * float(p2[i, a])) / 2
    total = sum(map(sum, joint))
    joint = [[x / total for x in row] for row in joint]
    row = [max(sum(joint[a]), EPS) for a in range(c)]
    col = [max(sum(joint[a][d] for a in range(c)), EPS) for d in range(c)]
    h_y = -sum(p * math.log(p) for p in row)
    h_joint = -sum(max(x, EPS) * math.log(max(x, EPS)) for r in joint for x in r)
    h_yhat = -sum(p * math.log(p) for p in col)
    return h_y, h_joint - h_yhat


def soft_outputs(seed, b=12, c=5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    p1 = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64) * scale, dim=1)
    p2 = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64) * scale, dim=1)
    return p1, p2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_entropies_equal_the_loop(seed):
    p1, p2 = soft_outputs(seed)
    h_y, h_cond = assignment_entropies(p1, p2)
    ref_y, ref_cond = entropies_reference(p1, p2)
    assert float(h_y) == pytest.approx(ref_y, **TIGHT)
    assert float(h_cond) == pytest.approx(ref_cond, **TIGHT)


def one_hot_pairs(pairs, c):
    """Hard assignments: image i is in cluster a_i in view 1 and d_i in view 2."""
    a = torch.tensor([p[0] for p in pairs])
    d = torch.tensor([p[1] for p in pairs])
    return (torch.nn.functional.one_hot(a, c).double(), torch.nn.functional.one_hot(d, c).double())


def test_known_pair_distributions():
    c = 4
    # every image in the same cluster in both views, clusters equally full: H(y) = log C, H(y|ŷ) = 0
    h_y, h_cond = assignment_entropies(*one_hot_pairs([(k, k) for k in range(c)] * 3, c))
    assert float(h_y) == pytest.approx(math.log(c), abs=1e-12)
    assert float(h_cond) == pytest.approx(0.0, abs=1e-12)
    # the two views independent and uniform (every pair once): H(y|ŷ) = H(y) = log C, I = 0
    h_y, h_cond = assignment_entropies(*one_hot_pairs([(a, d) for a in range(c) for d in range(c)], c))
    assert float(h_y) == pytest.approx(math.log(c), abs=1e-12)
    assert float(h_cond) == pytest.approx(math.log(c), abs=1e-12)
    # one cluster missing, the others consistent: H(y) = log(C - 1) (a missing cluster lowers it)
    h_y, h_cond = assignment_entropies(*one_hot_pairs([(k, k) for k in range(c - 1)] * 2, c))
    assert float(h_y) == pytest.approx(math.log(c - 1), abs=1e-12)
    assert float(h_cond) == pytest.approx(0.0, abs=1e-12)
    # a known asymmetric pair distribution: pairs (0,0) x2, (0,1) x1, (1,0) x1; symmetrized P = [[1/2, 1/4],
    # [1/4, 0]] -> marginal (3/4, 1/4), H(y, ŷ) = 1/2 log 2 + 2 · 1/4 log 4, H(y|ŷ) = H(y, ŷ) − H(ŷ)
    h_y, h_cond = assignment_entropies(*one_hot_pairs([(0, 0), (0, 0), (0, 1), (1, 0)], 2))
    marginal = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(h_y) == pytest.approx(marginal, abs=1e-12)
    assert float(h_cond) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4) - marginal, abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_mutual_information_is_minus_the_loss_for_one_batch(seed):
    p1, p2 = soft_outputs(seed, b=32, c=10)
    h_y, h_cond = assignment_entropies(p1, p2)
    assert float(h_y - h_cond) == pytest.approx(-float(iic_loss(p1, p2)), **TIGHT)


def test_epoch_sums_the_joints_of_its_batches():
    """The epoch's terms are those of the joint over all its images (the loop over the concatenated
    batches), per head, not a mean of per-batch terms."""
    heads, batches, b, c = 3, 4, 6, 5
    g = torch.Generator().manual_seed(7)
    outputs = [[torch.softmax(torch.randn(2 * b, c, generator=g, dtype=torch.float64) * 2, 1) for _ in range(heads)]
               for _ in range(batches)]
    acc = EpochEntropies()
    for step in outputs:
        acc.update(step)
    result = acc.compute()
    for h in range(heads):
        p1 = torch.cat([step[h][:b] for step in outputs])
        p2 = torch.cat([step[h][b:] for step in outputs])
        ref_y, ref_cond = entropies_reference(p1, p2)
        assert result["h_y"][h] == pytest.approx(ref_y, **TIGHT)
        assert result["h_y_given_yhat"][h] == pytest.approx(ref_cond, **TIGHT)
        assert result["mutual_information"][h] == pytest.approx(ref_y - ref_cond, **TIGHT)
        per_batch_mean = sum(float(assignment_entropies(s[h][:b], s[h][b:])[0]) for s in outputs) / batches
        assert abs(result["h_y"][h] - per_batch_mean) > 1e-6  # a different quantity, by design
    acc.reset()
    acc.update(outputs[0])
    ref_y, _ = entropies_reference(outputs[0][1][:b], outputs[0][1][b:])
    assert acc.compute()["h_y"][1] == pytest.approx(ref_y, **TIGHT)


def test_float32_outputs_are_summed_in_float64():
    p1, p2 = soft_outputs(5)
    acc = EpochEntropies()
    acc.update(torch.cat([p1, p2]).float())
    assert acc.joints[0].dtype == torch.float64
    h_y, _ = joint_entropies(p1.float().double().T @ p2.float().double())
    assert acc.compute()["h_y"][0] == pytest.approx(float(h_y), **TIGHT)
