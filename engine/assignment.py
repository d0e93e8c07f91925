"""Stage 2's pieces around its training step (main.py): where the encoder comes from (a stage-1 file, a
stage-2 file to continue or evaluate, or a random network: ``--init random``), each head's clusters, the
sequential clusterings of Table 3 (``--cluster``) and the diagnostics of Fig. 4 each epoch logs
(docs/method.md, "The paper's experiments").
"""
import json
import os

import numpy as np
import torch

import datasets
from lib.checkpoint import checkpoint_stage, load_network
from lib.clustering import cluster_embedding
from lib.errors import InputError
from lib.protocols import clustering_metrics, hungarian_match
from models import NETWORKS, MultiHeadNormFC

from . import checks, distributed
from .distributed import speed_options
from .lifecycle import RunLock, atomic_file
from .report import head_metrics

INITS = ("encoder", "random")  # --init: the stage-1 encoder of --resume, or a randomly initialized network


def check_flags(args):
    """The combinations of --resume, --init, --cluster and --test_only that need no file to refuse."""
    if args.cluster and not args.test_only:
        raise InputError(f"--cluster {args.cluster} clusters a stage-1 embedding once and trains nothing: "
                         "add --test_only (with --resume ckpt_embed.t7)")
    if args.cluster and (args.export_predictions or args.kmeans_baseline):
        raise InputError("--cluster writes its scores to eval.json and nothing else: drop "
                         f"{'--export_predictions' if args.export_predictions else '--kmeans_baseline'}")
    if args.cluster and args.init == "random":
        raise InputError("--cluster clusters the embedding of a stage-1 file, --init random has none: drop one")
    if args.resume:
        return
    if args.cluster or args.test_only:
        raise InputError(f"--{'cluster' if args.cluster else 'test_only'} needs a file to evaluate: pass --resume "
                         f"{'ckpt_embed.t7' if args.cluster else 'ckpt_ul.t7'}")
    if args.init != "random":
        raise InputError("stage 2 starts from a stage-1 encoder: pass --resume ckpt_embed.t7 (or a stage-2 file "
                         "to continue or, with --test_only, to evaluate), or --init random for a random network")


def check_file(args, path, ckpt):
    """--init random and --cluster against the file of --resume (``path``, None: no file)."""
    if path is None:
        return
    stage = checkpoint_stage(ckpt)
    if args.init == "random" and stage == 1:
        raise InputError(f"--init random contradicts --resume {path}, a stage-1 encoder to start from: drop one")
    if args.init == "random" and ckpt.get("init", "encoder") != "random":
        raise InputError(f"--init random: {path} holds a stage-2 run that started from an encoder; drop --init")
    if args.cluster and stage != 1:
        raise InputError(f"--cluster clusters a stage-1 embedding; {path} is a stage-{stage} checkpoint: pass a "
                         "ckpt_embed.t7")
    saved = ckpt.get("args", {}).get("dataset")
    if args.cluster and saved is not None and not datasets.same_images(saved, args.dataset):
        raise InputError(f"{path} was trained on {saved}, not --dataset {args.dataset}")
    if stage == 2 and args.test_only and ckpt.get("head_norm", args.head_norm) != args.head_norm:
        # evaluated as trained (continuing with another --head_norm is a changed argument, noted on resume)
        raise InputError(f"{path} has heads normalized '{ckpt['head_norm']}': pass --head_norm {ckpt['head_norm']}")


def load_encoder(args, path, ckpt, num_classes, device):
    """The network and heads stage 2 works on: (net, model, heads), as in ``main.Stage2``. From the file of
    --resume (a stage-1 encoder, or a stage-2 run with its heads), or with ``path`` None the random network
    drawn under the seed (--init random); the heads are drawn after the network in both cases."""
    if path is not None:
        checks.stage2_checkpoint(ckpt, path, args, num_classes)
    net = NETWORKS[args.network](low_dim=args.low_dim, width=args.width).to(device)
    heads = MultiHeadNormFC(args.low_dim, num_classes, args.num_heads, args.tau_c, args.head_norm).to(device)
    if path is not None:
        load_network(net, ckpt["net"], path)
    if path is not None and checkpoint_stage(ckpt) == 2:
        heads.load_state_dict(ckpt["fc"])
    if path is None:
        distributed.broadcast_state(net)  # drawn under the seed: rank 0's on every process
    distributed.broadcast_state(heads)  # likewise
    return (*speed_options(net, args.channels_last, args.compile, args.sync_bn), heads)


def evaluate(net, heads, loader, device):
    """Each head's clusters of ``loader``'s images, as engine/report.py takes them."""
    features = distributed.compute_features_sharded(net, loader, device)
    with torch.no_grad():
        probs, preds = torch.stack(heads(features)).max(dim=2)  # (H, N) each
    return {"metrics": head_metrics(preds.cpu(), loader.dataset), "preds": preds.cpu(), "probs": probs.cpu()}


def sequential(args, path, ckpt, dataset, loader, device):
    """Table 3's sequential rows: the stage-1 network's embedding of ``loader``'s images (evaluation
    transform, eval mode) clustered by --cluster (lib/clustering.py) into as many clusters as classes;
    scored like stage 2 (%) and written to <model_dir>/eval.json. Returns that summary (None off rank 0)."""
    if not dataset.has_labels:
        raise InputError(f"--cluster scores the clusters against labels; --dataset {args.dataset} here has none")
    net = NETWORKS[args.network](low_dim=args.low_dim, width=args.width).to(device)
    load_network(net, ckpt["net"], path)
    features = distributed.compute_features_sharded(net, loader, device)
    if not distributed.is_main():
        return None
    labels, connected = cluster_embedding(features, dataset.num_classes, args.cluster, args.seed)
    scores = clustering_metrics(labels, dataset.targets.numpy(), dataset.num_classes)
    summary = {**{k: 100 * v for k, v in scores.items()}, "method": args.cluster, "connectivity": connected,
               "images": len(dataset), "dataset": args.dataset, "encoder": str(path),
               "cluster_sizes": np.bincount(labels, minlength=dataset.num_classes).tolist()}
    print(f"{args.cluster} on the stage-1 embedding of {len(dataset)} images: ACC {summary['acc']:.2f}%  "
          f"NMI {summary['nmi']:.2f}%  ARI {summary['ari']:.2f}%")
    with RunLock(args.model_dir), atomic_file(os.path.join(args.model_dir, "eval.json")) as f:  # whole or none
        json.dump(summary, f, indent=1)
    print(f"wrote eval.json to {args.model_dir}")
    return summary


def class_accuracy(preds, targets, num_classes):
    """Per-class accuracy (%) of (N,) clusters after Hungarian matching: of the images of class c, the share
    assigned to the cluster matched to c (None for a class with no image)."""
    mapping, confusion = hungarian_match(preds, targets, num_classes)  # confusion: (cluster, class)
    cluster_of = np.argsort(mapping)  # the cluster matched to each class
    counts = confusion.sum(0)
    return [100 * float(confusion[cluster_of[c], c]) / int(counts[c]) if counts[c] else None
            for c in range(num_classes)]


def epoch_diagnostics(entropies, clusters, selected, dataset):
    """Fig. 4's numbers of an epoch for its log record: each head's H(y), H(y|ŷ) and their difference
    (``lib.diagnostics.EpochEntropies`` over the epoch's steps; reset here for the next epoch) and, with
    labels, the mean accuracy over the heads and the selected head's per-class accuracy."""
    record = entropies.compute()
    entropies.reset()
    metrics = clusters["metrics"]
    if metrics:
        record["mean_head_acc"] = float(np.mean(metrics["head_acc"]))
        record["class_acc"] = class_accuracy(clusters["preds"][selected], dataset.targets, dataset.num_classes)
    return record
