"""Evaluation protocols (REFERENCE §1, §3, §4): weighted kNN and Hungarian-matched clustering."""
import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from lib.protocols import (
    cluster_accuracy,
    clustering_metrics,
    confusion_matrix,
    hungarian_match,
    weighted_knn_predict,
    weighted_knn_scores,
)


def knn_scores_reference(features, bank, labels, num_classes, k, sigma):
    """§3: the k bank rows of largest dot product vote for their label with weight exp(sim / σ)."""
    out = []
    for q in features.double().tolist():
        sims = sorted(((sum(a * b for a, b in zip(q, row)), j) for j, row in enumerate(bank.double().tolist())),
                      reverse=True)[:k]
        votes = [0.0] * num_classes
        for sim, j in sims:
            votes[int(labels[j])] += math.exp(sim / sigma)
        out.append(votes)
    return torch.tensor(out, dtype=torch.float64)


def _knn_data(seed, q=9, n=25, d=5, c=4):
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    return (unit(torch.randn(q, d, generator=g), dim=1), unit(torch.randn(n, d, generator=g), dim=1),
            torch.randint(0, c, (n,), generator=g), c)


@pytest.mark.parametrize("k,sigma", [(5, 0.1), (1, 0.1), (10, 0.5)])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_weighted_knn_scores_match_loop(k, sigma, chunk_size):
    features, bank, labels, c = _knn_data(0)
    scores = weighted_knn_scores(features, bank, labels, c, k=k, sigma=sigma, chunk_size=chunk_size)
    ref = knn_scores_reference(features, bank, labels, c, k, sigma)
    assert scores.shape == (9, c)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [1, 2])
def test_weighted_knn_predict_matches_loop(seed):
    features, bank, labels, c = _knn_data(seed, q=30, n=40)
    ref = knn_scores_reference(features, bank, labels, c, 7, 0.1)
    top2 = ref.topk(2, dim=1).values
    assert ((top2[:, 0] - top2[:, 1]) / top2[:, 0] > 1e-4).all()  # precondition: no near-ties
    pred = weighted_knn_predict(features, bank, labels, c, k=7, sigma=0.1)
    assert pred.tolist() == ref.argmax(1).tolist()
    # the weights matter: plain majority over the same 7 neighbours disagrees somewhere on this data
    majority = knn_scores_reference(features, bank, labels, c, 7, 1e6).argmax(1)
    assert (majority != ref.argmax(1)).any()


def test_weighted_knn_k_larger_than_bank():
    features, bank, labels, c = _knn_data(3, n=6)
    scores = weighted_knn_scores(features, bank, labels, c, k=200, sigma=0.1, chunk_size=2)
    ref = knn_scores_reference(features, bank, labels, c, 6, 0.1)  # every bank row votes
    torch.testing.assert_close(scores.double(), ref, rtol=1e-5, atol=1e-6)
    pred = weighted_knn_predict(features, bank, labels, c, k=200, sigma=0.1)
    assert pred.tolist() == ref.argmax(1).tolist()


def test_confusion_matrix_matches_loop():
    rng = np.random.default_rng(0)
    preds, targets = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    expected = np.zeros((5, 5), dtype=np.int64)
    for p, t in zip(preds, targets):
        expected[p, t] += 1  # rows = cluster, columns = label
    got = confusion_matrix(torch.as_tensor(preds), torch.as_tensor(targets), 5)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(confusion_matrix(preds, targets, 5), expected)  # numpy input too
    # classes that never occur still get their row and column
    np.testing.assert_array_equal(confusion_matrix([0, 0], [1, 1], 3), [[0, 2, 0], [0, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("c", [3, 10])
def test_permuted_labelling_scores_one(c):
    rng = np.random.default_rng(c)
    targets = rng.integers(0, c, 300)
    perm = np.roll(rng.permutation(c), 1)
    while (perm == np.arange(c)).all():
        perm = rng.permutation(c)
    preds = perm[targets]
    assert cluster_accuracy(preds, targets, c) == 1.0
    mapping, _ = hungarian_match(preds, targets, c)
    np.testing.assert_array_equal(mapping[preds], targets)  # the mapping undoes the permutation
    metrics = clustering_metrics(preds, targets, c)
    assert metrics["acc"] == 1.0
    assert metrics["nmi"] == pytest.approx(1.0) and metrics["ari"] == pytest.approx(1.0)


def accuracy_reference(preds, targets, c):
    """Best accuracy over every one-to-one map of clusters to classes."""
    best = 0
    for perm in itertools.permutations(range(c)):
        best = max(best, sum(int(perm[p] == t) for p, t in zip(preds, targets)))
    return best / len(targets)


@pytest.mark.parametrize("seed", range(5))
def test_cluster_accuracy_matches_all_permutations(seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 4, 60)
    noisy = np.where(rng.random(60) < 0.5, rng.permutation(4)[targets], rng.integers(0, 4, 60))
    for preds in (noisy, rng.integers(0, 4, 60)):
        expected = accuracy_reference(preds.tolist(), targets.tolist(), 4)
        assert cluster_accuracy(preds, targets, 4) == pytest.approx(expected, abs=1e-12)
        assert cluster_accuracy(torch.as_tensor(preds), torch.as_tensor(targets), 4) == pytest.approx(expected)


def nmi_reference(preds, targets):
    """I(preds; targets) / mean(H(preds), H(targets)) (scikit-learn's default, arithmetic)."""
    n = len(preds)
    joint = {}
    for p, t in zip(preds, targets):
        joint[(p, t)] = joint.get((p, t), 0) + 1
    pp = {p: sum(v for (a, _), v in joint.items() if a == p) for p in set(preds)}
    pt = {t: sum(v for (_, b), v in joint.items() if b == t) for t in set(targets)}
    mi = sum(v / n * math.log(v * n / (pp[p] * pt[t])) for (p, t), v in joint.items())
    hp = -sum(v / n * math.log(v / n) for v in pp.values())
    ht = -sum(v / n * math.log(v / n) for v in pt.values())
    return mi / ((hp + ht) / 2)


def test_clustering_metrics_equal_sklearn():
    rng = np.random.default_rng(7)
    targets = rng.integers(0, 6, 500)
    preds = np.where(rng.random(500) < 0.6, (targets + 2) % 6, rng.integers(0, 6, 500))
    metrics = clustering_metrics(preds, targets, 6)
    assert set(metrics) == {"acc", "nmi", "ari"}
    assert metrics["nmi"] == pytest.approx(normalized_mutual_info_score(targets, preds), abs=1e-12)
    assert metrics["ari"] == pytest.approx(adjusted_rand_score(targets, preds), abs=1e-12)
    assert metrics["nmi"] == pytest.approx(nmi_reference(preds.tolist(), targets.tolist()), abs=1e-9)
    assert metrics["acc"] == pytest.approx(cluster_accuracy(preds, targets, 6))
    assert 0.5 < metrics["acc"] < 1  # fractions, not percent
