"""The run's pictures: training curves and the confusion matrix of the selected head (PNG, matplotlib Agg)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(records, path):
    """Loss parts and per-head Hungarian accuracy per epoch, from the stage-2 log records."""
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total"), ("loss_assign", "class assignment (Eq. 9)"),
                       ("loss_cp", "consistency preserving (Eq. 11)")):
        ax_loss.plot(epochs, [r[key] for r in records], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="mean training loss", title="losses")
    ax_loss.legend()
    heads = len(records[0]["head_acc"])
    for h in range(heads):
        ax_acc.plot(epochs, [r["head_acc"][h] for r in records], marker=".", label=f"head {h}")
    ax_acc.plot(epochs, [r["acc"] for r in records], "k--", label="selected (lowest loss)")
    ax_acc.set(xlabel="epoch", ylabel="ACC (%)", title="Hungarian accuracy, training split")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion, mapping, path, title, class_names=None):
    """Rows: true class; columns: clusters, ordered by the class the Hungarian matching gave them."""
    num_classes = confusion.shape[0]
    order = np.argsort(mapping)  # cluster matched to class 0 first, ...
    matrix = confusion[order].T  # (class, cluster in matched order)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * num_classes, 0.8 + 0.45 * num_classes))
    ax.imshow(matrix, cmap="Blues")
    if num_classes <= 20:
        for i in range(num_classes):
            for j in range(num_classes):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    names = class_names or [str(c) for c in range(num_classes)]
    ax.set_yticks(range(num_classes), names, fontsize=8)
    ax.set_xticks(range(num_classes), [str(c) for c in order], fontsize=8)
    ax.set(xlabel="cluster (matched order)", ylabel="true class", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
