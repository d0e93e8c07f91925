"""What a run of main.py or joint.py leaves at its end: the scores on the console, eval.json, the pictures
(PNG, matplotlib Agg: training curves, Fig. 4's mutual information and per-class accuracy, the confusion
matrix, the clusters of the selected head), optionally a CSV of the predictions and k-means on the raw
pixels.

``clusters`` is what ``main.evaluate`` gives: {"metrics": each head's ACC / NMI / ARI in %
(None without labels), "preds": (H, N) cluster of each image per head, "probs": (H, N) its probability}.
"""
import csv
import json
import os

import numpy as np
import torch

from datasets.folder import printable
from lib.protocols import clustering_metrics, hungarian_match, selected_metrics

from .files import CLUSTERS, CONFUSION, CURVES, EVAL, MUTUAL_INFORMATION, PER_CLASS
from .lifecycle import atomic_file


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported when a run first draws (not when a script starts: about a
    second of every start otherwise)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(records, path):
    """Loss parts and per-head Hungarian accuracy per epoch, from the stage-2 log records."""
    plt = pyplot()
    if not records:
        return
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total"), ("loss_assign", "class assignment (Eq. 9)"),
                       ("loss_cp", "consistency preserving (Eq. 11)")):
        ax_loss.plot(epochs, [r[key] for r in records], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="mean training loss", title="losses")
    ax_loss.legend()
    if "head_acc" in records[0]:
        for h in range(len(records[0]["head_acc"])):
            ax_acc.plot(epochs, [r["head_acc"][h] for r in records], marker=".", label=f"head {h}")
        ax_acc.plot(epochs, [r["acc"] for r in records], "k--", label="selected (lowest loss)")
        ax_acc.set(xlabel="epoch", ylabel="ACC (%)", title="Hungarian accuracy, training split")
    else:  # no labels: each head's loss instead
        for h in range(len(records[0]["head_losses"])):
            ax_acc.plot(epochs, [r["head_losses"][h] for r in records], marker=".", label=f"head {h}")
        ax_acc.set(xlabel="epoch", ylabel="class-assignment loss", title="per head (no labels)")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


FIG4_EPOCHS = (0, 5, 20, 100, 200, 300)  # the epochs of the paper's per-class accuracy (Fig. 4(b))


def plot_run(records, out_dir, dataset):
    """The pictures drawn from a stage-2 log at the end of a run on ``dataset``'s images: curves.png,
    mutual_information.png and per_class_accuracy.png (each where its log keys exist)."""
    plot_curves(records, os.path.join(out_dir, CURVES))
    plot_mutual_information(records, os.path.join(out_dir, MUTUAL_INFORMATION), dataset.num_classes)
    plot_per_class_accuracy(records, os.path.join(out_dir, PER_CLASS), dataset.class_names)


def plot_mutual_information(records, path, num_classes=None):
    """Fig. 4(a): H(y) and H(y|ŷ) per epoch (left, right), each head thin and the mean over heads thick, with
    log C, the largest H(y), dotted; the epochs whose record lacks them (older logs) are left out."""
    plt = pyplot()
    records = [r for r in records if "h_y" in r]
    if not records:
        return
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "h_y", "H(y): spread over the clusters"),
                           (axes[1], "h_y_given_yhat", "H(y|ŷ): disagreement of the two views")):
        values = np.array([r[key] for r in records])  # (epochs, heads)
        for h in range(values.shape[1]):
            ax.plot(epochs, values[:, h], lw=0.8, alpha=0.6, label=f"head {h}")
        ax.plot(epochs, values.mean(1), "k", lw=2, marker=".", label="mean over heads")
        ax.set(xlabel="epoch", ylabel="nats", title=title)
    if num_classes:
        axes[0].axhline(np.log(num_classes), color="gray", ls=":", label="log C")
    axes[0].legend(fontsize=8)
    fig.suptitle("I(y, ŷ) = H(y) − H(y|ŷ), summed over each epoch's training steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_per_class_accuracy(records, path, class_names=None, epochs=FIG4_EPOCHS):
    """Fig. 4(b): the selected head's per-class accuracy (Hungarian-matched) at the paper's ``epochs`` where
    the log has them, and at its last epoch."""
    plt = pyplot()
    by_epoch = {r["epoch"]: r for r in records if "class_acc" in r}
    if not by_epoch:
        return
    shown = sorted({e for e in epochs if e in by_epoch} | {max(by_epoch)})
    num_classes = len(by_epoch[shown[0]]["class_acc"])
    names = list(class_names or [str(c) for c in range(num_classes)])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * num_classes + 2), 4))
    width = 0.8 / len(shown)
    for i, epoch in enumerate(shown):
        values = [np.nan if a is None else a for a in by_epoch[epoch]["class_acc"]]
        ax.bar(np.arange(num_classes) + (i - (len(shown) - 1) / 2) * width, values, width,
               label=f"epoch {epoch} (ACC {by_epoch[epoch]['acc']:.1f}%)")
    ax.set_xticks(range(num_classes), names, rotation=45 if num_classes > 10 else 0, fontsize=8)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="per-class accuracy of the selected head")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_as_drawn(confusion, mapping):
    """The matrix as ``plot_confusion`` draws it: row i = true class i, column j = the cluster matched to
    class j (so a perfect clustering is diagonal). Returns (matrix, cluster order of the columns)."""
    order = np.argsort(mapping)  # the cluster matched to class 0 first, ...
    return confusion[order].T, order  # confusion is (cluster, class)


def plot_confusion(confusion, mapping, path, title, class_names=None):
    """Rows: true class (named); columns: clusters, ordered by the class the Hungarian matching gave them."""
    plt = pyplot()
    num_classes = confusion.shape[0]
    matrix, order = confusion_as_drawn(confusion, mapping)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * num_classes, 0.8 + 0.45 * num_classes))
    ax.imshow(matrix, cmap="Blues")
    if num_classes <= 20:
        for i in range(num_classes):
            for j in range(num_classes):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    names = list(class_names or [str(c) for c in range(num_classes)])
    ax.set_yticks(range(num_classes), names, fontsize=8)
    ax.set_xticks(range(num_classes), [str(c) for c in order], fontsize=8)
    ax.set(xlabel="cluster (matched order)", ylabel="true class", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cluster_summary(preds, probs, targets, mapping, num_clusters, per_row=8):
    """For each cluster: its size, its ``per_row`` most confident images (indexes, highest probability
    first), and where labels exist its matched class and purity (share of its images of that class)."""
    rows = []
    for c in range(num_clusters):
        members = np.flatnonzero(preds == c)
        best = members[np.argsort(-probs[members], kind="stable")][:per_row]
        row = {"cluster": c, "size": len(members), "images": best.tolist()}
        if mapping is not None:
            row["class"] = int(mapping[c])
            row["purity"] = float((targets[members] == mapping[c]).mean()) if len(members) else 0.0
        rows.append(row)
    return rows


def plot_clusters(dataset, preds, probs, path, mapping=None, per_row=8, max_rows=20):
    """``clusters.png``: one row per cluster (the largest ``max_rows``), its most confident images,
    its size and, with labels, its matched class and purity. The images are laid out in one array and
    drawn once (a grid of axes, one per image, takes about a second to lay out)."""
    plt = pyplot()
    preds, probs = np.asarray(preds), np.asarray(probs, dtype=np.float64)
    rows = cluster_summary(preds, probs, dataset.targets.numpy(), mapping, dataset.num_classes, per_row)
    rows = sorted(rows, key=lambda r: -r["size"])[:max_rows]
    names = list(dataset.class_names or [str(c) for c in range(dataset.num_classes)])
    height, width = np.asarray(dataset.data[0]).shape[:2]
    gap, label = max(1, height // 8), int(2.5 * width)  # pixels between images; the text column's width
    cell_h, cell_w = height + gap, width + gap
    canvas = np.full((len(rows) * cell_h - gap, label + per_row * cell_w - gap, 3), 255, dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(1.1 * (per_row + 2.5), 1.1 * len(rows) + 0.3))
    for i, row in enumerate(rows):
        for j, index in enumerate(row["images"]):
            top, left = i * cell_h, label + j * cell_w
            canvas[top:top + height, left:left + width] = np.asarray(dataset.data[index])
        text = f"cluster {row['cluster']}\n{row['size']} images"
        if "class" in row:
            text += f"\n{names[row['class']]}\npurity {100 * row['purity']:.0f}%"
        ax.text(0, i * cell_h + height / 2, text, va="center", ha="left", fontsize=8)
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    inches = 1.1 * len(rows) + 0.3
    fig.suptitle("most confident images per cluster (selected head)", fontsize=9, y=1 - 0.05 / inches, va="top")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / inches)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def kmeans_baseline(dataset, num_classes, seed):
    """k-means on the raw (normalized, flattened) pixels of the evaluated images."""
    from sklearn.cluster import KMeans
    pixels = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).flatten(1).numpy()
    preds = KMeans(num_classes, n_init=10, random_state=seed % 2**32).fit_predict(pixels)
    return {k: 100 * v for k, v in clustering_metrics(preds, dataset.targets.numpy(), num_classes).items()}


def write_predictions(path, dataset, preds, probs, selected):
    """One row per image: index, path (own folders), label (-1: none), the selected head's cluster and
    probability, then every head's cluster."""
    heads = range(len(preds))
    with atomic_file(path, "w", newline="") as f:  # whole or not at all
        writer = csv.writer(f)
        writer.writerow(["index", "path", "label", "cluster", "probability"] + [f"head{h}" for h in heads])
        for i in range(len(dataset)):
            # a path of bytes that are not UTF-8 or with a newline in it, escaped: one line per image
            writer.writerow([i, printable(dataset.paths[i]) if dataset.paths else "", int(dataset.targets[i]),
                             int(preds[selected][i]), f"{float(probs[selected][i]):.6f}"]
                            + [int(preds[h][i]) for h in heads])


def write_report(clusters, selected, dataset, args):
    """Console lines, <model_dir>/eval.json, confusion_matrix.png (with labels) and clusters.png, and with
    the flags the predictions CSV and k-means; returns the summary written to eval.json."""
    metrics, preds, probs = clusters["metrics"], clusters["preds"], clusters["probs"]
    head, num_classes, out_dir = selected or 0, dataset.num_classes, args.model_dir
    which = "lowest training loss" if selected is not None else "no head losses in the file: head 0"
    summary = {**(metrics or {}), "selected_head": selected, **selected_metrics(metrics, selected),
               "images": len(dataset), "dataset": args.dataset,
               "cluster_sizes": torch.bincount(preds[head], minlength=num_classes).tolist()}
    if metrics:
        print(f"accuracy: {[round(a, 2) for a in metrics['head_acc']]}")
        print(f"head {head} ({which}): ACC {summary['acc']:.2f}%  NMI {summary['nmi']:.2f}%  "
              f"ARI {summary['ari']:.2f}%")
    else:
        print(f"head {head} ({which}): no labels, cluster sizes {summary['cluster_sizes']}")
    if args.kmeans_baseline and metrics:
        km = summary["kmeans"] = kmeans_baseline(dataset, num_classes, args.seed)
        print(f"k-means on raw pixels:    ACC {km['acc']:.2f}%  NMI {km['nmi']:.2f}%  ARI {km['ari']:.2f}%")
    with atomic_file(os.path.join(out_dir, EVAL)) as f:  # whole or not at all
        json.dump(summary, f, indent=1)
    mapping = None
    if metrics:
        mapping, confusion = hungarian_match(preds[head], dataset.targets, num_classes)
        plot_confusion(confusion, mapping, os.path.join(out_dir, CONFUSION),
                       f"{args.dataset}, head {head}: ACC {summary['acc']:.1f}%", dataset.class_names)
    plot_clusters(dataset, preds[head], probs[head], os.path.join(out_dir, CLUSTERS), mapping)
    if args.export_predictions:
        write_predictions(args.export_predictions, dataset, preds, probs, head)
        print(f"predictions: {args.export_predictions}")
    print(f"wrote {EVAL} and pictures to {out_dir}")
    return summary
