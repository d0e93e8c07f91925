"""Evaluation protocols: weighted kNN for the embedding (stage 1), Hungarian-matched clustering (stage 2)."""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


@torch.no_grad()
def weighted_knn_scores(features, bank, bank_labels, num_classes, k=200, sigma=0.1, chunk_size=1024):
    """Class votes of the weighted kNN (REFERENCE §3): each of the k most similar bank rows votes
    for its label with weight exp(similarity / σ). Returns (Q, num_classes) float scores."""
    k = min(k, bank.shape[0])
    bank_labels = bank_labels.to(bank.device)
    scores = torch.empty(features.shape[0], num_classes, device=bank.device)
    for start in range(0, features.shape[0], chunk_size):
        query = features[start:start + chunk_size].to(bank.device, bank.dtype)
        sim, idx = (query @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(query.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / sigma).exp())
        scores[start:start + chunk_size] = votes
    return scores


def weighted_knn_predict(features, bank, bank_labels, num_classes, k=200, sigma=0.1):
    """Top-1 weighted-kNN prediction (Q,) of each query row against the (N, d) bank."""
    return weighted_knn_scores(features, bank, bank_labels, num_classes, k, sigma).argmax(1)


def confusion_matrix(preds, targets, num_classes):
    """(num_classes, num_classes) counts, rows = cluster, columns = label, in one bincount."""
    preds, targets = torch.as_tensor(preds).long().cpu(), torch.as_tensor(targets).long().cpu()
    flat = preds * num_classes + targets
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes).numpy()


def hungarian_match(preds, targets, num_classes):
    """The one-to-one cluster -> class map maximizing matches. Returns (mapping (C,), confusion)."""
    confusion = confusion_matrix(preds, targets, num_classes)
    clusters, classes = linear_sum_assignment(confusion, maximize=True)
    mapping = np.empty(num_classes, dtype=np.int64)
    mapping[clusters] = classes
    return mapping, confusion


def cluster_accuracy(preds, targets, num_classes):
    """Accuracy (fraction) after Hungarian matching of clusters to classes."""
    mapping, confusion = hungarian_match(preds, targets, num_classes)
    return float(confusion[np.arange(num_classes), mapping].sum() / confusion.sum())


def clustering_metrics(preds, targets, num_classes):
    """{'acc', 'nmi', 'ari'} as fractions: Hungarian accuracy and scikit-learn's NMI and ARI."""
    preds, targets = np.asarray(preds), np.asarray(targets)
    return {"acc": cluster_accuracy(preds, targets, num_classes),
            "nmi": float(normalized_mutual_info_score(targets, preds)),
            "ari": float(adjusted_rand_score(targets, preds))}


@torch.no_grad()
def compute_features(net, loader, device, amp=False):
    """Embeddings (N, d) of an evaluation loader, in loader order, with the network in eval mode."""
    was_training = net.training
    net.eval()
    feats = []
    for images, _, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats.append(net(images.to(device, non_blocking=True)).float())
    net.train(was_training)
    return torch.cat(feats)
