"""Class activation maps of the selected stage-2 head (the paper's Fig. 3; docs/method.md, "Class activation
maps (Fig. 3)"): Grad-CAM over both trunks of the backbone, computed by captum's ``LayerGradCam``.

    preds, probs = predict(net, heads.heads[h], dataset, device)
    mapping, _ = hungarian_match(preds, dataset.targets, num_classes)       # None for unlabelled images
    result = gradcam_figure(net, heads, h, dataset, mapping, 2, "gradcam.png", predictions=(preds, probs))

The attribution's target is the logit v·Ŵ_c/τ_c of the assigned cluster c (Eq. 13 before its softmax),
the score Grad-CAM is defined on; the probability would saturate at the confident images the figure shows
(its gradient is p_c (1 - p_c) times smaller). The argmax, and so the assigned cluster, is the same.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from captum.attr import LayerAttribution, LayerGradCam  # noqa: E402
from torch import nn  # noqa: E402

from lib.protocols import compute_features  # noqa: E402

TRUNKS = {"layer4": "RGB", "layer4_sobel": "Sobel"}  # the last stage of trunk A (RGB) and trunk B (Sobel)
PANEL, LABEL_WIDTH, TOP = 1.1, 1.4, 0.5  # inches: one overlay, the row's label column, the figure's title
DPI = 80


class HeadLogits(nn.Module):
    """The network and one frozen head as one classifier: image -> logits v·Ŵ/τ_c (B, C), the argument of
    the head's softmax (Eq. 13), v the L2-normalized embedding."""

    def __init__(self, net, head):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, images):
        features = self.net(images)  # (B, d)
        return features @ self.head.normalized_weight().to(features.dtype) / self.head.temperature  # (B, C)


def predict(net, head, dataset, device, batch_size=100, workers=0):
    """One head's cluster and its probability for every image of ``dataset``: (preds (N,), probs (N,)) as
    numpy arrays, in data set order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    features = compute_features(net, loader, device)
    with torch.no_grad():
        probs, preds = head(features).max(dim=1)
    return preds.cpu().numpy(), probs.float().cpu().numpy()


def _most_confident(members, probs, count):
    """The ``count`` members of highest probability, highest first (ties: lower index first)."""
    return members[np.argsort(-probs[members], kind="stable")][:count].tolist()


def select_cases(preds, probs, targets, mapping, per_class, num_clusters=None):
    """Which images the figure shows, one row per class (clusters in Hungarian order) or per cluster.

    With labels (``mapping``: cluster -> class), the row of class c holds the images the head ASSIGNED to c
    (its cluster ``mapping⁻¹(c)``): ``success``, the ``per_class`` most confident whose true class is c, and
    ``failure``, the ``per_class`` most confident whose true class is another. Without (``mapping`` None),
    the row of cluster k holds its ``per_class`` most confident images under ``success`` and no failures.
    Returns [{"class": c or None, "cluster": k, "success": [indexes], "failure": [indexes]}, ...].
    """
    preds, probs = np.asarray(preds), np.asarray(probs, dtype=np.float64)
    if mapping is None:
        clusters = range(num_clusters if num_clusters is not None else int(preds.max()) + 1)
        return [{"class": None, "cluster": k, "success": _most_confident(np.flatnonzero(preds == k), probs, per_class),
                 "failure": []} for k in clusters]
    mapping, targets = np.asarray(mapping), np.asarray(targets)
    assigned = mapping[preds]  # (N,) the class each image was assigned to
    correct = assigned == targets
    rows = []
    for c in range(len(mapping)):
        mine = assigned == c
        rows.append({"class": c, "cluster": int(np.flatnonzero(mapping == c)[0]),
                     "success": _most_confident(np.flatnonzero(mine & correct), probs, per_class),
                     "failure": _most_confident(np.flatnonzero(mine & ~correct), probs, per_class)})
    return rows


def class_activation_maps(net, head, images, clusters, batch_size=64):
    """Grad-CAM (captum ``LayerGradCam``, ReLU as in Grad-CAM) of each image's ``clusters`` logit at the last
    stage of each trunk, upsampled (bilinear) to the image's size: {"layer4": (N, H, W), "layer4_sobel":
    (N, H, W)} float32 numpy arrays, non-negative. ``images``: (N, 3, H, W) normalized network inputs."""
    was_training = net.training
    net.eval()  # BatchNorm with its running statistics, as at evaluation
    model = HeadLogits(net, head)
    device = next(net.parameters()).device
    maps = {name: [] for name in TRUNKS}
    try:
        with torch.enable_grad():
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].to(device)
                target = torch.as_tensor(clusters[start:start + batch_size], dtype=torch.long, device=device)
                for name in TRUNKS:
                    cam = LayerGradCam(model, getattr(net, name))
                    attr = cam.attribute(batch, target=target, relu_attributions=True)  # (B, 1, h, w)
                    attr = LayerAttribution.interpolate(attr, tuple(batch.shape[-2:]), interpolate_mode="bilinear")
                    maps[name].append(attr[:, 0].detach().float().cpu())
    finally:
        net.train(was_training)
    size = tuple(images.shape[-2:])
    return {name: (torch.cat(parts).numpy() if parts else np.zeros((0, *size), np.float32))
            for name, parts in maps.items()}


def _shown(image, mean, std):
    """A normalized (3, H, W) input as the (H, W, 3) picture the network saw, in [0, 1]."""
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _scaled(heat):
    """One map on [0, 1] for display (each map by its own maximum; an all-zero map stays zero)."""
    top = heat.max()
    return heat / top if top > 0 else heat


def figure_inches(num_rows, per_class, labelled=True):
    """(width, height) of the picture in inches: a label column and two panels (the two trunks) per image,
    ``per_class`` successes and, with labels, as many failures per row."""
    images = per_class * (2 if labelled else 1)
    return LABEL_WIDTH + 2 * images * PANEL, TOP + num_rows * (PANEL + 0.25)


def plot_gradcam(rows, pictures, maps, probs, targets, path, per_class, class_names=None, title=""):
    """Draw ``rows`` (``select_cases``): per image two panels, the picture under its trunk-A map (RGB, layer4)
    and under its trunk-B map (Sobel, layer4_sobel). ``pictures``, ``maps[name]``, ``probs``: dicts from
    image index to the (H, W, 3) picture, (H, W) map and the assigned cluster's probability."""
    labelled = rows[0]["class"] is not None
    names = list(class_names or [str(c) for c in range(len(rows))])
    width, height = figure_inches(len(rows), per_class, labelled)
    columns = 1 + 2 * per_class * (2 if labelled else 1)
    fig, axes = plt.subplots(len(rows), columns, figsize=(width, height), squeeze=False,
                             gridspec_kw={"width_ratios": [LABEL_WIDTH / PANEL] + [1] * (columns - 1)})
    for ax_row, row in zip(axes, rows):
        if labelled:
            label = f"class {names[row['class']]}\n(cluster {row['cluster']})"
            slots = [("success", i) for i in row["success"] + [None] * (per_class - len(row["success"]))]
            slots += [("failure", i) for i in row["failure"] + [None] * (per_class - len(row["failure"]))]
        else:
            label = f"cluster {row['cluster']}"
            slots = [("cluster", i) for i in row["success"] + [None] * (per_class - len(row["success"]))]
        if not row["success"] + row["failure"]:
            label += "\nno image assigned"
        ax_row[0].text(0, 0.5, label, va="center", fontsize=8)
        for slot, (kind, index) in enumerate(slots):
            pair = ax_row[1 + 2 * slot: 3 + 2 * slot]
            if index is None:
                continue
            for ax, name in zip(pair, TRUNKS):
                ax.imshow(pictures[index], interpolation="nearest")
                ax.imshow(_scaled(maps[name][index]), cmap="jet", alpha=0.5, vmin=0, vmax=1,
                          interpolation="bilinear")
            if kind == "cluster":
                text, colour = f"p {probs[index]:.2f}", "black"
            else:
                text = f"true {names[targets[index]]}, as {names[row['class']]}\np {probs[index]:.2f}"
                colour = "darkgreen" if kind == "success" else "firebrick"
            # the image's caption spans its pair of panels; the last line names each panel's trunk
            pair[0].set_title(f"{text}\n{TRUNKS['layer4']}", fontsize=6, pad=1, color=colour, loc="left")
            pair[1].set_title(TRUNKS["layer4_sobel"], fontsize=6, pad=1, loc="left")
        for ax in ax_row:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def gradcam_figure(net, heads, head, dataset, mapping, per_class, path, *, predictions=None, device=None,
                   class_names=None):
    """Fig. 3 for head ``head`` of ``heads`` (``models.MultiHeadNormFC``, frozen) on ``dataset`` (items
    {"image", "target", ...} through the evaluation transform; targets -1 or ``mapping`` None: no labels),
    written to ``path`` (PNG): rows = classes (clusters), columns = the ``per_class`` most confident correct
    images and the ``per_class`` most confident wrong ones (``select_cases``), each image with the Grad-CAM
    of its assigned cluster over trunk A (RGB) and trunk B (Sobel).

    predictions: (preds, probs) of this head on ``dataset`` when already computed (``predict``).
    Returns {"rows": select_cases(...), "indexes": (M,) the images shown, "clusters": (M,) their assigned
    clusters, "probs": (M,), "maps": {"layer4": (M, H, W), "layer4_sobel": (M, H, W)}}.
    """
    device = device or next(net.parameters()).device
    fc = heads.heads[head]
    preds, probs = predictions if predictions is not None else predict(net, fc, dataset, device)
    preds, probs = np.asarray(preds), np.asarray(probs)
    targets = dataset.targets.numpy()
    rows = select_cases(preds, probs, targets, mapping, per_class, num_clusters=fc.weight.shape[1])
    indexes = np.array(sorted({i for row in rows for i in row["success"] + row["failure"]}), dtype=np.int64)
    if len(indexes) == 0:
        raise ValueError("no image to show: the data set is empty")
    images = torch.stack([dataset[int(i)]["image"] for i in indexes])  # (M, 3, H, W)
    maps = class_activation_maps(net, fc, images, preds[indexes])
    mean, std = dataset.mean or (0.0,) * 3, dataset.std or (1.0,) * 3
    pictures = {int(i): _shown(image, mean, std) for i, image in zip(indexes, images)}
    by_index = {name: dict(zip(indexes.tolist(), trunk_maps)) for name, trunk_maps in maps.items()}
    what = ("most confident correct (green) and wrong (red) assignments per class" if mapping is not None
            else "most confident images per cluster")
    plot_gradcam(rows, pictures, by_index, dict(zip(indexes.tolist(), probs[indexes])), targets, path, per_class,
                 class_names if class_names is not None else dataset.class_names,
                 f"Grad-CAM of head {head}: {what}; each image: trunk A (RGB) | trunk B (Sobel)")
    return {"rows": rows, "indexes": indexes, "clusters": preds[indexes], "probs": probs[indexes], "maps": maps}
