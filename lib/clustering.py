"""The sequential alternatives of Table 3: the stage-1 embedding clustered by k-means or by hierarchical
(agglomerative, Ward) clustering, scored like stage 2 (docs/method.md, "The paper's experiments",
"Sequential clustering")."""
import numpy as np
import torch

from .protocols import clustering_metrics

METHODS = ("kmeans", "agglomerative")
# Ward without a connectivity graph needs the condensed distance matrix, N (N - 1) / 2 float64 values:
# 1.6 GB at N = 20,000 (10 GB at CIFAR-10's 50,000), and O(N^2) time; above this N a k-NN graph is used
DENSE_LIMIT = 20_000
NEIGHBOURS = 10  # k of the k-nearest-neighbour connectivity graph (the paper does not say; docs/method.md)


def _as_array(features):
    if torch.is_tensor(features):
        features = features.detach().cpu().numpy()
    return np.ascontiguousarray(features, dtype=np.float64)


def cluster_embedding(features, num_classes, method, seed=0, dense_limit=DENSE_LIMIT, n_neighbors=NEIGHBOURS):
    """Cluster labels (N,) of an (N, d) embedding, and whether a connectivity graph was used.

    Args:
        features: (N, d) embeddings (tensor or array), computed in float64.
        num_classes: C, the number of clusters.
        method: 'kmeans' (scikit-learn KMeans, 10 initializations, ``seed``) or 'agglomerative' (Ward).
        dense_limit: above this N, Ward is restricted to the k-nearest-neighbour graph of the embedding
            (``sklearn.neighbors.kneighbors_graph``, ``n_neighbors``, the point itself excluded).
    Returns (labels (N,) int64, connectivity: bool).
    """
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.neighbors import kneighbors_graph
    x = _as_array(features)
    if method == "kmeans":
        return KMeans(num_classes, n_init=10, random_state=seed % 2**32).fit_predict(x).astype(np.int64), False
    if method != "agglomerative":
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    connectivity = None
    if len(x) > dense_limit:
        connectivity = kneighbors_graph(x, n_neighbors=min(n_neighbors, len(x) - 1), include_self=False)
    model = AgglomerativeClustering(n_clusters=num_classes, linkage="ward", connectivity=connectivity)
    return model.fit_predict(x).astype(np.int64), connectivity is not None


def sequential_scores(features, targets, num_classes, method, seed=0, dense_limit=DENSE_LIMIT,
                      n_neighbors=NEIGHBOURS):
    """{'acc', 'nmi', 'ari'} as fractions (``lib.protocols.clustering_metrics``: Hungarian ACC, NMI, ARI) of
    ``cluster_embedding``'s clusters against ``targets`` (N,), plus 'connectivity' (bool) and 'method'."""
    labels, connected = cluster_embedding(features, num_classes, method, seed, dense_limit, n_neighbors)
    targets = targets.cpu().numpy() if torch.is_tensor(targets) else np.asarray(targets)
    return {**clustering_metrics(labels, targets, num_classes), "method": method, "connectivity": connected}
