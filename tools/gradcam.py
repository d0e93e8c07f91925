"""The paper's Fig. 3: Grad-CAM of a stage-2 checkpoint's selected head over both trunks of the backbone, for
the most confident correct and wrong assignments of each class (docs/method.md, "Class activation maps").

    python tools/gradcam.py --resume ckpt_ul.t7 --model_dir runs/cifar10 --dataset cifar10 --out gradcam.png
    python tools/gradcam.py --resume ckpt_ul.t7 --model_dir runs/mine --dataset folder --data_dir photos/

Clusters are matched to the labels by the Hungarian method on the images shown; an unlabelled folder gets the
most confident images of each cluster instead. The network (ResNet-18 or -101, its width and embedding
dimension) is read from the checkpoint's weights; τ_c, the heads' normalization and the image size from the
arguments it was trained with where it holds them (every checkpoint of main.py), else from the flags below;
an --image_size given that differs from the trained one is used, and said in one line.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root

import datasets
from engine.checks import evaluation_image_size, image_size
from engine.cli import ArgumentParser, check_output_file, non_negative_int, positive_float, positive_int, run_cli
from engine.gradcam import gradcam_figure, predict
from engine.lifecycle import read_checkpoint
from engine.system import choose_device
from lib.checkpoint import checkpoint_stage, load_network, strip_prefix
from lib.errors import InputError
from lib.protocols import cluster_accuracy, hungarian_match
from models import NETWORKS, MultiHeadNormFC

DEFAULTS = {"tau_c": 0.1, "head_norm": "released", "image_size": 32}  # main.py's, for files without 'args'


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
    p.add_argument("--per_class", default=2, type=positive_int,
                   help="correct and wrong images shown per class (per cluster without labels)")
    p.add_argument("--head", default=None, type=non_negative_int,
                   help="the head to explain (default: the checkpoint's selected head, else head 0)")
    p.add_argument("--tau_c", default=None, type=positive_float,
                   help=f"τ_c of the heads (default: the checkpoint's, else {DEFAULTS['tau_c']})")
    p.add_argument("--head_norm", default=None, choices=["released", "paper", "none"],
                   help=f"how the heads' W is normalized (default: the checkpoint's, else {DEFAULTS['head_norm']})")
    p.add_argument("--image_size", default=None, type=image_size,
                   help=f"side of the network input, 8 to 512 pixels (default: the size the checkpoint was trained "
                        f"at, else {DEFAULTS['image_size']})")
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


if __name__ == "__main__":
    run_cli(main, get_args_parser())
