"""The paper's Fig. 3: Grad-CAM of a stage-2 checkpoint's selected head over both trunks of the backbone, for
the most confident correct and wrong assignments of each class (docs/method.md, "Class activation maps").

    python tools/gradcam.py --resume ckpt_ul.t7 --model_dir runs/cifar10 --dataset cifar10 --out gradcam.png
    python tools/gradcam.py --resume ckpt_ul.t7 --model_dir runs/mine --dataset folder --data_dir photos/

Clusters are matched to the labels by the Hungarian method on the images shown; an unlabelled folder gets the
most confident images of each cluster instead. The network (ResNet-18 or -101, its width and embedding
dimension) is read from the checkpoint's weights; τ_c, the heads' normalization and the image size from the
arguments it was trained with where it holds them (every checkpoint of main.py), else from the flags below;
an --image_size given that differs from the trained one is used, and said in one line.

The attribution's target is the logit v·Ŵ_c/τ_c of the assigned cluster c (Eq. 13 before its softmax),
the score Grad-CAM is defined on; the probability would saturate at the confident images the figure shows
(its gradient is p_c (1 - p_c) times smaller). The argmax, and so the assigned cluster, is the same.
"""
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from captum.attr import LayerAttribution, LayerGradCam  # noqa: E402
from torch import nn  # noqa: E402

import datasets  # noqa: E402
import main as stage2  # noqa: E402
from engine.checks import evaluation_image_size  # noqa: E402
from engine.cli import (  # noqa: E402
    MAX_IMAGE_SIZE,
    ArgumentParser,
    check_output_file,
    image_size,
    int_between,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
)
from engine.lifecycle import atomic_file, read_checkpoint  # noqa: E402
from engine.system import choose_device  # noqa: E402
from lib.checkpoint import checkpoint_stage, load_network, strip_prefix  # noqa: E402
from lib.errors import InputError  # noqa: E402
from lib.protocols import cluster_accuracy, compute_features, hungarian_match  # noqa: E402
from models import NETWORKS, MultiHeadNormFC  # noqa: E402
from models.heads import NORMS  # noqa: E402

# main.py's defaults, for files without 'args'
DEFAULTS = {key: stage2.get_args_parser().get_default(key) for key in ("tau_c", "head_norm", "image_size")}
MAX_PER_CLASS = 16  # images per row: the picture grows with it (two panels an image), its memory too


def get_args_parser():
    p = ArgumentParser(description="Grad-CAM of a stage-2 checkpoint's selected head (the paper's Fig. 3)")
    p.add_argument("--resume", "-r", required=True, metavar="CKPT",
                   help="stage-2 checkpoint (ckpt_ul.t7 or ckpt_ul_last.t7): a name inside --model_dir, else a path")
    p.add_argument("--model_dir", default="checkpoint/", help="the run folder the checkpoint is looked up in")
    p.add_argument("--dataset", default="cifar10", choices=list(datasets.DATASETS),
                   help="the images to explain (stage 2's split of it); 'folder' reads your own from --data_dir")
    p.add_argument("--data_dir", default="./data", help="where data sets are read; with --dataset folder, the folder")
    p.add_argument("--subset", default=None, type=positive_int, help="use only the first N images")
    p.add_argument("--out", default="gradcam.png", help="the picture to write (PNG)")
    p.add_argument("--per_class", default=2, type=int_between(1, MAX_PER_CLASS),
                   help=f"correct and wrong images shown per class (per cluster without labels; 1 to {MAX_PER_CLASS})")
    p.add_argument("--head", default=None, type=non_negative_int,
                   help="the head to explain (default: the checkpoint's selected head, else head 0)")
    p.add_argument("--tau_c", default=None, type=positive_float,
                   help=f"τ_c of the heads (default: the checkpoint's, else {DEFAULTS['tau_c']})")
    p.add_argument("--head_norm", default=None, choices=list(NORMS),
                   help=f"how the heads' W is normalized (default: the checkpoint's, else {DEFAULTS['head_norm']})")
    p.add_argument("--image_size", default=None, type=image_size,
                   help=f"side of the network input, 8 to {MAX_IMAGE_SIZE} pixels (default: the size the checkpoint "
                        f"was trained at, else {DEFAULTS['image_size']})")
    p.add_argument("--workers", default=0, type=non_negative_int, help="data-loading processes")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    return p


def architecture(state):
    """(network name, width, low_dim) of a backbone state dict: bottleneck blocks (``conv3``) are ResNet-101's."""
    if "conv1_sobel.weight" not in state:  # e.g. wrn28_2, on RGB alone
        raise InputError("the checkpoint's network has no Sobel trunk: Fig. 3's maps over both trunks need the "
                         "two-trunk ResNet (--network resnet18 or resnet101)")
    network = "resnet101" if "layer1.0.conv3.weight" in state else "resnet18"
    try:
        return network, state["conv1.weight"].shape[0], state["linear.weight"].shape[0]
    except KeyError as err:
        raise InputError(f"the checkpoint's network has no {err.args[0]!r}: not a backbone of this method") from None


def load_heads(ckpt, path, low_dim, tau_c, head_norm):
    """The frozen heads of a stage-2 file, checked against the network's embedding dimension."""
    if checkpoint_stage(ckpt) != 2:
        raise InputError(f"{path} is not a stage-2 checkpoint (no heads 'fc'): pass a ckpt_ul.t7 of main.py")
    fc = ckpt["fc"]
    shapes = {tuple(v.shape) for v in fc.values() if hasattr(v, "shape")}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InputError(f"{path} holds no heads of one shape under 'fc' (found shapes {sorted(shapes)})")
    dim, classes = next(iter(shapes))
    if dim != low_dim:
        raise InputError(f"{path}: its heads take {dim}-dimensional embeddings, its network gives {low_dim}")
    heads = MultiHeadNormFC(low_dim, classes, len(fc), tau_c, head_norm)
    if set(fc) != set(heads.state_dict()):
        raise InputError(f"{path}: its heads are named {sorted(fc)[:3]}..., not heads.<i>.weight")
    heads.load_state_dict(fc)
    return heads


def main(args):
    check_output_file(args.out, "--out", args.model_dir)
    device = choose_device(args.device)
    path, ckpt = read_checkpoint(args.resume, args.model_dir)
    trained = (ckpt.get("args") or {}).get("dataset")
    if trained is not None and args.dataset != "folder" and not datasets.same_images(trained, args.dataset):
        raise InputError(f"{path} was trained on {trained}, not --dataset {args.dataset}; pass --dataset {trained} "
                         "(or --dataset folder for your own images)")
    args = evaluation_image_size(args, ckpt, None)  # the trained size, or one line saying the flag's differs
    saved = {**DEFAULTS, **{k: v for k, v in (ckpt.get("args") or {}).items() if k in DEFAULTS}}
    for key in DEFAULTS:  # a flag given overrides the checkpoint
        if getattr(args, key) is None:
            setattr(args, key, saved[key])
    network, width, low_dim = architecture(strip_prefix(ckpt["net"]))
    heads = load_heads(ckpt, path, low_dim, args.tau_c, args.head_norm).to(device)
    head = args.head if args.head is not None else (ckpt.get("selected_head") or 0)
    if head >= len(heads.heads):
        raise InputError(f"--head {head}: {path} has {len(heads.heads)} heads (0 to {len(heads.heads) - 1})")
    net = NETWORKS[network](low_dim=low_dim, width=width)
    load_network(net, ckpt["net"], path)
    net.to(device).eval()

    num_clusters = heads.heads[0].weight.shape[1]
    args.num_classes = None  # datasets.from_args reads it: only an unlabelled folder takes the heads' count
    if args.dataset == "folder" and datasets.folder.is_flat(args.data_dir):
        args.num_classes = num_clusters
    dataset = datasets.from_args(args, datasets.DATASETS[args.dataset].cluster_split,
                                 normalization=ckpt.get("normalization"))  # normalized as in training
    if dataset.num_classes != num_clusters:
        raise InputError(f"{path} has heads for {num_clusters} clusters but --dataset {args.dataset} has "
                         f"{dataset.num_classes} classes; check --dataset")
    preds, probs = predict(net, heads.heads[head], dataset, device, workers=args.workers)
    mapping = None
    if dataset.has_labels:
        mapping, _ = hungarian_match(preds, dataset.targets, num_clusters)
        acc = 100 * cluster_accuracy(preds, dataset.targets.numpy(), num_clusters)
        print(f"head {head}: ACC {acc:.2f}% on {len(dataset)} images of {args.dataset}")
    result = gradcam_figure(net, heads, head, dataset, mapping, args.per_class, args.out,
                            predictions=(preds, probs), device=device)
    print(f"wrote {args.out}: {len(result['indexes'])} images, Grad-CAM over trunk A (RGB) and B (Sobel)")
    return result


# ---- Grad-CAM and the figure ----

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
    picture = io.BytesIO()  # drawn whole, then written whole: a failed write (a full disk) is an OSError
    fig.savefig(picture, dpi=DPI, format="png")
    plt.close(fig)
    with atomic_file(path, "wb") as f:
        f.write(picture.getvalue())


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


if __name__ == "__main__":
    run_cli(main, get_args_parser())
