"""The sequential rows of Table 3 (lib/clustering.py; docs/method.md, "Sequential clustering"): the scores are
scikit-learn's clusterings, called directly on the same embedding, scored by Hungarian ACC, NMI and ARI, and
Ward switches to a k-nearest-neighbour connectivity graph above the size limit."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import kneighbors_graph

from lib.clustering import cluster_embedding, sequential_scores


def embedding(n=150, classes=4, d=6, seed=0):
    """Unit-norm points around ``classes`` centres (an embedding like stage 1's), with their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 2
    targets = rng.integers(classes, size=n)
    x = centres[targets] + rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True), targets


def scores_reference(labels, targets, classes):
    """Hungarian ACC by scipy on the count matrix, NMI and ARI by scikit-learn."""
    counts = np.zeros((classes, classes))
    for p, t in zip(labels, targets):
        counts[p, t] += 1
    rows, cols = linear_sum_assignment(-counts)
    return {"acc": counts[rows, cols].sum() / len(labels), "nmi": normalized_mutual_info_score(targets, labels),
            "ari": adjusted_rand_score(targets, labels)}


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_scores_equal_scikit_learn_called_directly(method):
    x, targets = embedding()
    if method == "kmeans":
        direct = KMeans(4, n_init=10, random_state=3).fit_predict(x)
    else:
        direct = AgglomerativeClustering(n_clusters=4, linkage="ward").fit_predict(x)
    result = sequential_scores(torch.from_numpy(x).float().double(), torch.from_numpy(targets), 4, method, seed=3)
    expected = scores_reference(direct, targets, 4)
    for key in ("acc", "nmi", "ari"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12)
    assert result["connectivity"] is False
    assert 0.5 < result["acc"] <= 1.0  # the clusters are found (not a chance-level partition)


def test_connectivity_graph_above_the_limit():
    x, targets = embedding(n=120, seed=1)
    labels, connected = cluster_embedding(x, 4, "agglomerative", dense_limit=119, n_neighbors=3)
    assert connected
    graph = kneighbors_graph(x, n_neighbors=3, include_self=False)
    direct = AgglomerativeClustering(n_clusters=4, linkage="ward", connectivity=graph).fit_predict(x)
    np.testing.assert_array_equal(labels, direct)
    dense = AgglomerativeClustering(n_clusters=4, linkage="ward").fit_predict(x)
    assert normalized_mutual_info_score(dense, labels) < 0.99  # on these points the graph changes the merges
    # at the limit itself the full distance matrix is still used
    labels_at_limit, connected_at_limit = cluster_embedding(x, 4, "agglomerative", dense_limit=120)
    assert not connected_at_limit
    np.testing.assert_array_equal(labels_at_limit, dense)
    result = sequential_scores(x, targets, 4, "agglomerative", dense_limit=10, n_neighbors=3)
    assert result["connectivity"]
    assert result["acc"] == pytest.approx(scores_reference(direct, targets, 4)["acc"], abs=1e-12)


def test_unknown_method():
    with pytest.raises(ValueError, match="kmeans"):
        cluster_embedding(np.zeros((5, 2)), 2, "spectral")
