"""Evaluation protocols (docs/method.md, "Weighted kNN", "Hungarian ACC, NMI, ARI") against slow
loops written from their definitions, in float64 at tight tolerance."""
import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from lib.protocols import (
    cluster_accuracy,
    clustering_metrics,
    compute_features,
    confusion_matrix,
    hungarian_match,
    knn_accuracy,
    weighted_knn_predict,
    weighted_knn_scores,
)

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def knn_scores_reference(features, bank, labels, num_classes, k, sigma):
    """Every labelled bank row sorted by its dot product with the query; the k first vote for
    their label with weight exp(sim / σ). Rows labelled −1 have no label and are not candidates."""
    out = []
    rows = [(row, int(y)) for row, y in zip(bank.double().tolist(), labels.tolist()) if y >= 0]
    for q in features.double().tolist():
        sims = sorted(((sum(a * b for a, b in zip(q, row)), y) for row, y in rows), reverse=True)[:k]
        votes = [0.0] * num_classes
        for sim, y in sims:
            votes[y] += math.exp(sim / sigma)
        out.append(votes)
    return torch.tensor(out, dtype=torch.float64)


def knn_accuracy_reference(features, bank, labels, targets, num_classes, k, sigma, topk):
    """Top-n accuracy in percent: the query's label is among the n classes of highest score, i.e.
    fewer than n classes score strictly more than it."""
    scores = knn_scores_reference(features, bank, labels, num_classes, k, sigma).tolist()
    out = []
    for n in topk:
        hits = 0
        for row, t in zip(scores, targets.tolist()):
            above = sum(v > row[t] for v in row)
            tied = sum(v == row[t] for v in row) - 1  # e.g. classes without a vote, like the label's
            assert above >= n or above + tied < n  # precondition: no tie decides the answer
            hits += above < n
        out.append(100.0 * hits / len(scores))
    return out


def _knn_data(seed, q=9, n=25, d=5, c=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    return (unit(torch.randn(q, d, generator=g, dtype=dtype), dim=1),
            unit(torch.randn(n, d, generator=g, dtype=dtype), dim=1),
            torch.randint(0, c, (n,), generator=g), c)


def _clustered(seed, q=40, n=120, d=6, c=8, spread=1.5, unlabelled=0.0):
    """Queries and bank rows around c random class centres, so that kNN is right often but not always."""
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    centres = torch.randn(c, d, generator=g, dtype=torch.float64)
    targets = torch.randint(0, c, (q,), generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    features = unit(centres[targets] + spread * torch.randn(q, d, generator=g, dtype=torch.float64), dim=1)
    bank = unit(centres[labels] + spread * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    labels = labels.masked_fill(torch.rand(n, generator=g) < unlabelled, -1)
    return features, bank, labels, targets, c


@pytest.mark.parametrize("k,sigma", [(5, 0.1), (1, 0.1), (10, 0.5)])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_weighted_knn_scores_match_loop(k, sigma, chunk_size):
    features, bank, labels, c = _knn_data(0)
    scores = weighted_knn_scores(features, bank, labels, c, k=k, sigma=sigma, chunk_size=chunk_size)
    ref = knn_scores_reference(features, bank, labels, c, k, sigma)
    assert scores.shape == (9, c) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, ref, **TIGHT)


def test_weighted_knn_scores_follow_the_input_dtype():
    features, bank, labels, c = _knn_data(0, dtype=torch.float32)
    scores = weighted_knn_scores(features, bank, labels, c, k=5, sigma=0.1)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), knn_scores_reference(features, bank, labels, c, 5, 0.1),
                               rtol=1e-5, atol=1e-6)
    assert weighted_knn_scores(features.double(), bank.double(), labels, c, k=5).dtype == torch.float64


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_unlabelled_bank_rows_do_not_vote(chunk_size):
    features, bank, labels, _, c = _clustered(5, unlabelled=0.4)
    assert 20 < (labels == -1).sum() < 80
    nearest = (features @ bank.T).topk(7, dim=1).indices
    assert (labels[nearest] == -1).any(1).float().mean() > 0.5  # unlabelled rows are among the nearest
    for k in (7, 200):  # 200: more than the labelled rows, every one of them votes
        scores = weighted_knn_scores(features, bank, labels, c, k=k, sigma=0.1, chunk_size=chunk_size)
        torch.testing.assert_close(scores, knn_scores_reference(features, bank, labels, c, k, 0.1), **TIGHT)
        # the same as a bank that never held the unlabelled rows
        keep = labels >= 0
        torch.testing.assert_close(scores, weighted_knn_scores(features, bank[keep], labels[keep], c, k=k), **TIGHT)


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
    torch.testing.assert_close(scores, ref, **TIGHT)
    pred = weighted_knn_predict(features, bank, labels, c, k=200, sigma=0.1)
    assert pred.tolist() == ref.argmax(1).tolist()


@pytest.mark.parametrize("unlabelled", [0.0, 0.3])
# k large enough that every class gets votes: among classes without a vote, topk's order decides
@pytest.mark.parametrize("seed,k,sigma", [(0, 200, 0.1), (1, 60, 0.1), (3, 80, 0.2)])
def test_knn_accuracy_matches_loop(seed, k, sigma, unlabelled):
    features, bank, labels, targets, c = _clustered(seed, unlabelled=unlabelled)
    top1, top5 = knn_accuracy(features, bank, labels, targets, c, k=k, sigma=sigma)
    ref1, ref5 = knn_accuracy_reference(features, bank, labels, targets, c, k, sigma, (1, 5))
    assert 0 < ref1 < ref5 < 100  # precondition: neither accuracy is trivial, and top-5 adds hits
    assert top1 == pytest.approx(ref1, abs=1e-12) and top5 == pytest.approx(ref5, abs=1e-12)
    assert knn_accuracy(features, bank, labels, targets, c, k=k, sigma=sigma, topk=(2,)) == \
        pytest.approx(knn_accuracy_reference(features, bank, labels, targets, c, k, sigma, (2,)), abs=1e-12)
    # float32 inputs: the same ranking here; the share of hits is a float32 mean (exact to ~1e-7)
    top1_32, top5_32 = knn_accuracy(features.float(), bank.float(), labels, targets, c, k=k, sigma=sigma)
    assert top1_32 == pytest.approx(ref1, abs=1e-4) and top5_32 == pytest.approx(ref5, abs=1e-4)


def test_knn_accuracy_top5_with_fewer_than_five_classes_counts_every_class():
    features, bank, labels, targets, c = _clustered(3, c=4)
    top1, top5 = knn_accuracy(features, bank, labels, targets, c, k=30)
    assert top5 == 100.0
    assert top1 == pytest.approx(knn_accuracy_reference(features, bank, labels, targets, c, 30, 0.1, (1,))[0])


def test_knn_accuracy_equals_ranking_the_scores_in_float32():
    # top-1 and top-5 read from one ranking of the float32 scores, to the last bit
    features, bank, labels, targets, c = _clustered(4, q=200, n=500, c=10)
    features, bank = features.float(), bank.float()
    scores = weighted_knn_scores(features, bank, labels, c)
    ranked = scores.topk(5, dim=1).indices
    top1 = (ranked[:, 0] == targets).float().mean().item() * 100
    top5 = (ranked == targets.unsqueeze(1)).any(1).float().mean().item() * 100
    assert knn_accuracy(features, bank, labels, targets, c) == (top1, top5)


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


@pytest.mark.parametrize("batches", ["dict", "tuple"])
def test_compute_features_in_loader_order_and_network_dtype(batches):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.BatchNorm1d(4)).double().train()
    images = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    chunks = [images[:4], images[4:8], images[8:]]
    loader = [{"image": x, "target": torch.zeros(len(x)), "index": torch.arange(len(x))} if batches == "dict"
              else (x, torch.zeros(len(x)), torch.arange(len(x))) for x in chunks]
    feats = compute_features(net, loader, torch.device("cpu"))
    assert feats.dtype == torch.float64 and feats.shape == (10, 4)
    assert net.training  # the mode is restored
    with torch.no_grad():
        expected = net.eval()(images)  # eval mode: BatchNorm's running statistics, one batch = many
    torch.testing.assert_close(feats, expected, **TIGHT)



def _knn_turns_at(k, last_class_wins):
    """One query against a one-hot bank (row j's similarity is the query's j-th entry, so each rank's weight
    exp(sim / σ) is set by hand: 1 - 1e-4 rank at σ = 0.1), whose weighted-kNN prediction is its label, 0,
    exactly for the K of one side of ``k``: with ``last_class_wins`` False for every K >= k, True for every
    K <= k. Returns (features, bank, labels, targets, votes), ``votes[K - 1]`` the class votes of the K nearest
    rows summed by hand."""
    n = 2 * k
    weights = 1 - 1e-4 * torch.arange(1, n + 1, dtype=torch.float64)  # a pair (a, b) leaves a ahead by 1e-4
    if not last_class_wins:  # 1, 0, 1, 0, ... (class 1 ahead), 2 at rank k - 1, then 0 (ahead from rank k on)
        labels = [r % 2 for r in range(1, k - 1)] + [2] + [0] * (n - k + 1)
    else:  # 0, 2, 0, 2, ... (class 0 ahead) to rank k, then 2 (ahead from rank k + 1 on)
        labels = [(r + 1) % 2 * 2 for r in range(1, k + 1)] + [2] * (n - k)
    labels = torch.tensor(labels)
    votes = (torch.nn.functional.one_hot(labels, 3) * weights[:, None]).cumsum(0)
    return (0.1 * weights.log())[None], torch.eye(n, dtype=torch.float64), labels, torch.tensor([0]), votes


def test_knn_defaults_are_k_200_and_sigma_0_1():
    """docs/method.md's K = 200 and σ = 0.1 as every kNN function's defaults (super_and.py passes neither): one
    query right for exactly K >= 200, another for exactly K <= 200, so that any other default K gets one wrong."""
    for last_class_wins in (False, True):
        features, bank, labels, targets, votes = _knn_turns_at(200, last_class_wins)
        k = torch.arange(1, len(votes) + 1)
        assert torch.equal(votes.argmax(1) == 0, k <= 200 if last_class_wins else k >= 200), \
            "test set-up: the hand-set weights do not make K = 200 the turning point"
        torch.testing.assert_close(weighted_knn_scores(features, bank, labels, 3), votes[199:200], **TIGHT,
                                   msg="weighted_knn_scores' defaults are not K = 200, σ = 0.1")
        assert weighted_knn_predict(features, bank, labels, 3).tolist() == [0], \
            "weighted_knn_predict's default K is not 200"
        assert knn_accuracy(features, bank, labels, targets, 3)[0] == 100.0, "knn_accuracy's default K is not 200"
