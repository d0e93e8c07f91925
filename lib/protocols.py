"""Evaluation protocols (docs/method.md, "Evaluation"): weighted kNN for the embedding of stage 1
("Weighted kNN"), Hungarian-matched accuracy, NMI and ARI for the clusters of stage 2 ("Hungarian
ACC, NMI, ARI")."""
import numpy as np
import torch


@torch.no_grad()
def weighted_knn_scores(features, bank, bank_labels, num_classes, k=200, sigma=0.1, chunk_size=1024):
    """Class votes of the weighted kNN (docs/method.md, "Weighted kNN").

    Each of the k bank rows of largest dot product with a query votes for its label with weight
    exp(similarity / σ). Bank rows labelled −1 (images without a label, e.g. STL-10's unlabeled
    split in the bank of stage 1) are left out before the search: the k neighbours are the k
    nearest labelled rows. Computed in the promoted dtype of ``features`` and ``bank``.

    Args:
        features: (Q, d) query embeddings.
        bank: (N, d) the memory bank (stage 1 does not recompute the training features).
        bank_labels: (N,) long, −1 for no label.
        num_classes: C.
        k: K = 200; fewer when the bank holds fewer labelled rows.
        sigma: σ = 0.1.
        chunk_size: queries per (chunk x N) block of similarities.
    Returns (Q, C) scores.
    """
    bank_labels = bank_labels.to(bank.device)
    labelled = bank_labels >= 0
    if not labelled.all():
        bank, bank_labels = bank[labelled], bank_labels[labelled]
    k = min(k, bank.shape[0])
    dtype = torch.promote_types(features.dtype, bank.dtype)
    bank = bank.to(dtype)
    scores = torch.empty(features.shape[0], num_classes, dtype=dtype, device=bank.device)
    for start in range(0, features.shape[0], chunk_size):
        query = features[start:start + chunk_size].to(bank.device, dtype)
        sim, idx = (query @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(query.shape[0], num_classes, dtype=dtype, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / sigma).exp())
        scores[start:start + chunk_size] = votes
    return scores


def weighted_knn_predict(features, bank, bank_labels, num_classes, k=200, sigma=0.1):
    """Top-1 weighted-kNN prediction (Q,) of each query row against the (N, d) bank."""
    return weighted_knn_scores(features, bank, bank_labels, num_classes, k, sigma).argmax(1)


@torch.no_grad()
def knn_accuracy(features, bank, bank_labels, targets, num_classes, k=200, sigma=0.1, topk=(1, 5)):
    """Weighted-kNN accuracies in percent, one per entry of ``topk`` (docs/method.md, "Weighted kNN").

    A query counts as correct at top-n when its label is among the n classes of highest score
    (n capped at C). Bank rows labelled −1 do not vote (see ``weighted_knn_scores``). The share of
    hits is averaged in the dtype of the scores (float32 in training, as the released code).

    Args:
        features: (Q, d) embeddings of the test split.
        bank: (N, d) the memory bank; bank_labels: (N,) its labels, −1 for none.
        targets: (Q,) labels of the queries.
        num_classes, k, sigma: as in ``weighted_knn_scores``.
        topk: the n of each accuracy returned, (1, 5) for top-1 and top-5.
    Returns a tuple of floats, e.g. (top1 %, top5 %).
    """
    scores = weighted_knn_scores(features, bank, bank_labels, num_classes, k, sigma)
    targets = torch.as_tensor(targets).to(scores.device)
    ranked = scores.topk(min(max(topk), num_classes), dim=1).indices  # (Q, n) classes, best first
    hits = ranked == targets.unsqueeze(1)
    return tuple(hits[:, :n].any(1).to(scores.dtype).mean().item() * 100 for n in topk)


def confusion_matrix(preds, targets, num_classes):
    """(num_classes, num_classes) counts, rows = cluster, columns = label, in one bincount."""
    preds, targets = torch.as_tensor(preds).long().cpu(), torch.as_tensor(targets).long().cpu()
    flat = preds * num_classes + targets
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes).numpy()


def hungarian_match(preds, targets, num_classes):
    """The one-to-one cluster -> class map maximizing matches. Returns (mapping (C,), confusion)."""
    confusion = confusion_matrix(preds, targets, num_classes)
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize takes a second to import

    clusters, classes = linear_sum_assignment(confusion, maximize=True)
    mapping = np.empty(num_classes, dtype=np.int64)
    mapping[clusters] = classes
    return mapping, confusion


def cluster_accuracy(preds, targets, num_classes):
    """Accuracy (fraction) after Hungarian matching of clusters to classes."""
    mapping, confusion = hungarian_match(preds, targets, num_classes)
    return float(confusion[np.arange(num_classes), mapping].sum() / confusion.sum())


def class_accuracy(preds, targets, num_classes):
    """Per-class accuracy (%) of (N,) clusters after Hungarian matching: of the images of class c, the share
    assigned to the cluster matched to c (None for a class with no image)."""
    mapping, confusion = hungarian_match(preds, targets, num_classes)  # confusion: (cluster, class)
    cluster_of = np.argsort(mapping)  # the cluster matched to each class
    counts = confusion.sum(0)
    return [100 * float(confusion[cluster_of[c], c]) / int(counts[c]) if counts[c] else None
            for c in range(num_classes)]


def head_clusters(outputs):
    """Each head's cluster of each image and its probability: the argmax of the heads' (N, C) probabilities
    ``outputs`` (a list, one per head). Returns (probs (H, N), preds (H, N))."""
    return torch.stack(outputs).max(dim=2)


def head_metrics(preds, targets, num_classes):
    """Each head's ACC / NMI / ARI (%) after Hungarian matching of its (N,) clusters ``preds[h]`` to the
    labels ``targets`` (numpy, (N,)): {"head_acc": [one per head], "head_nmi": [...], "head_ari": [...]}."""
    scores = [clustering_metrics(p.numpy(), targets, num_classes) for p in preds]
    return {f"head_{m}": [100 * x[m] for x in scores] for m in ("acc", "nmi", "ari")}


def selected_metrics(metrics, selected):
    """The run's numbers: ACC, NMI and ARI of the selected head (head 0 when none is selected); {} without labels."""
    head = selected or 0
    return {m: metrics[f"head_{m}"][head] for m in ("acc", "nmi", "ari")} if metrics else {}


def select_head(head_losses):
    """The head a run reports (§3.2): the one of lowest training loss, chosen without labels."""
    return int(np.argmin(head_losses))


def clustering_metrics(preds, targets, num_classes):
    """{'acc', 'nmi', 'ari'} as fractions: Hungarian accuracy and scikit-learn's NMI and ARI."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # a second to import

    preds, targets = np.asarray(preds), np.asarray(targets)
    return {"acc": cluster_accuracy(preds, targets, num_classes),
            "nmi": float(normalized_mutual_info_score(targets, preds)),
            "ari": float(adjusted_rand_score(targets, preds))}


@torch.no_grad()
def compute_features(net, loader, device, amp=False):
    """Embeddings (N, d) of an evaluation loader, in loader order, with the network in eval mode.

    Batches are dicts with an ``"image"`` entry, or (images, targets, indexes) tuples. The
    embeddings come back in the network's dtype, bfloat16 under ``amp`` lifted to float32.
    """
    was_training = net.training
    net.eval()
    feats = []
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(images.to(device, non_blocking=True))
        feats.append(out.to(torch.promote_types(out.dtype, torch.float32)))
    net.train(was_training)
    return torch.cat(feats)
