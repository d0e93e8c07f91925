"""Stage 2: class assignment with five frozen Norm-FC heads and the mutual-information loss
(paper §3.2; docs/method.md, "Stage 2: class assignment").

    python main.py --dataset cifar10 --resume ckpt_embed.t7        # start from the stage-1 encoder
    python main.py --resume ckpt_ul_last.t7                        # continue a stage-2 run exactly
    python main.py --test_only --resume ckpt_ul.t7                 # evaluate (ours or released)

Writes <model_dir>/ckpt_ul_last.t7 after every epoch, <model_dir>/ckpt_ul.t7 for the epoch of lowest mean
training loss (released semantics), log_ul.jsonl, and at the end eval.json, curves.png,
confusion_matrix.png and clusters.png.
"""
import csv
import json
import os
import time

import numpy as np
import torch

import datasets
from engine import distributed
from engine.cli import (
    ArgumentParser,
    check_output_dir,
    check_output_file,
    common_parser,
    non_negative_float,
    positive_float,
    positive_int,
    run_cli,
)
from engine.distributed import speed_options
from engine.lifecycle import RunLock, open_run, read_checkpoint, require_keys, run_epoch, set_lr, training_state
from engine.plots import plot_clusters, plot_confusion, plot_curves
from engine.system import keep_freed_memory, seed_everything
from lib.checkpoint import checkpoint_stage, load_network, normalization
from lib.errors import InputError
from lib.losses import aug_loss, iic_loss
from lib.optim import sgd_optimizer
from lib.protocols import clustering_metrics, hungarian_match
from lib.schedules import step_lr
from models import NETWORKS, MultiHeadNormFC

BEST, LAST, LOG = "ckpt_ul.t7", "ckpt_ul_last.t7", "log_ul.jsonl"
BEST_KEYS = ("net", "fc", "acc_list", "head_losses", "selected_head", "epoch", "nmi_list", "ari_list", "stage",
             "normalization")
TRAINING_KEYS = ("optimizer", "rng", "args", "epoch", "next_epoch", "best_loss", "best_epoch")
SAME_IMAGES = ({"cifar100", "cifar20"},)  # data sets that share their images (an encoder transfers)


def get_args_parser():
    p = ArgumentParser(description="Class assignment on a Super-AND encoder (stage 2)",
                       parents=[common_parser(datasets.DATASETS, NETWORKS)])
    p.set_defaults(lr=0.01, epochs=300)
    p.add_argument("--batch_t", default=0.1, type=positive_float, help="T_b, temperature of the consistency loss (> 0)")
    p.add_argument("--batch_m", default=1.0, type=non_negative_float, help="m_b, weight of its negatives (>= 0)")
    p.add_argument("--num_heads", default=5, type=positive_int, help="frozen Norm-FC heads (>= 1)")
    p.add_argument("--tau_c", default=0.1, type=positive_float, help="τ_c, temperature of the heads, Eq. 13 (> 0)")
    p.add_argument("--lambda_cp", default=1.0, type=non_negative_float,
                   help="λ, weight of the consistency-preserving loss (>= 0)")
    p.add_argument("--head_norm", default="released", choices=["released", "paper"],
                   help="normalize W per feature row (released code) or per class column (paper, Eq. 13)")
    p.add_argument("--export_predictions", default="", metavar="FILE.csv",
                   help="write each evaluated image's path, label, selected cluster, its probability and every "
                        "head's cluster")
    p.add_argument("--kmeans_baseline", action="store_true",
                   help="also print k-means on the raw pixels of the evaluated split (scikit-learn)")
    return p


def train_step(net, heads, images, optimizer, args):
    """One SGD step of mean-over-heads Eq. 9 + λ · Eq. 11 on a (2b, 3, H, W) batch, view 1 rows first (this
    process's b images of the global batch; the losses see all B, gathered).
    Returns the named loss parts (``head_losses``: one per head), detached and left on the device."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
        features = net(images)  # (2b, d): this process's b images (b = B for one process)
    features = distributed.gather_views(features.float())  # (2B, d), the global batch; heads and losses in float32
    batch = features.shape[0] // 2
    head_losses = torch.stack([iic_loss(p[:batch], p[batch:]) for p in heads(features)])  # (H,)
    l_assign = head_losses.mean()
    l_cp = aug_loss(features, args.batch_t, args.batch_m)  # Eq. 11, on the embeddings
    loss = l_assign + args.lambda_cp * l_cp
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "loss_assign": l_assign.detach(), "loss_cp": l_cp.detach(),
            "head_losses": head_losses.detach()}


def evaluate(net, heads, loader, num_classes, device):
    """Each head's clusters on ``loader``: (metrics, predictions (H, N), probabilities (H, N)); metrics are
    each head's ACC / NMI / ARI (%) after Hungarian matching, or None when the images have no labels."""
    features = distributed.compute_features_sharded(net, loader, device)
    with torch.no_grad():
        probs, preds = torch.stack(heads(features)).max(dim=2)  # (H, N) each
    probs, preds = probs.cpu(), preds.cpu()
    if not loader.dataset.has_labels:
        return None, preds, probs
    targets = loader.dataset.targets.numpy()
    metrics = [clustering_metrics(p.numpy(), targets, num_classes) for p in preds]
    return {f"head_{m}": [100 * x[m] for x in metrics] for m in ("acc", "nmi", "ari")}, preds, probs


def headline(result, selected):
    """The run's numbers: those of the selected head (head 0 when none is selected)."""
    h = selected or 0
    return {m: result[f"head_{m}"][h] for m in ("acc", "nmi", "ari")} if result else {}


def check_checkpoint(ckpt, path, args, num_classes):
    """A clear error for a file of another data set, class count, dimension or head count."""
    saved = ckpt.get("args", {}).get("dataset")
    if saved is not None and saved != args.dataset and {saved, args.dataset} not in SAME_IMAGES:
        raise InputError(f"{path} was trained on {saved}, not --dataset {args.dataset}")
    if checkpoint_stage(ckpt) != 2:
        return
    shapes = [tuple(v.shape) for k, v in sorted(ckpt["fc"].items()) if k.endswith(".weight")]
    if not shapes:
        raise InputError(f"{path} holds no head weights under 'fc'")
    if len(shapes) != args.num_heads:
        raise InputError(f"{path} has {len(shapes)} heads; pass --num_heads {len(shapes)}")
    dim, classes = shapes[0]
    if classes != num_classes:
        raise InputError(f"{path} has heads for {classes} clusters but --dataset {args.dataset} has "
                         f"{num_classes} classes; check --dataset (or --num_classes)")
    if dim != args.low_dim:
        raise InputError(f"{path} has heads for {dim}-dimensional embeddings; pass --low_dim {dim}")


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
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path", "label", "cluster", "probability"] + [f"head{h}" for h in heads])
        for i in range(len(dataset)):
            writer.writerow([i, dataset.paths[i] if dataset.paths else "", int(dataset.targets[i]),
                             int(preds[selected][i]), f"{float(probs[selected][i]):.6f}"]
                            + [int(preds[h][i]) for h in heads])


def report(result, selected, preds, probs, dataset, args, out_dir):
    """Console lines, eval.json, the confusion matrix, the cluster picture, optionally predictions and k-means."""
    h, num_classes = selected or 0, dataset.num_classes
    which = "lowest training loss" if selected is not None else "no head losses in the file: head 0"
    summary = {**(result or {}), "selected_head": selected, **headline(result, selected), "images": len(dataset),
               "dataset": args.dataset, "cluster_sizes": torch.bincount(preds[h], minlength=num_classes).tolist()}
    if result:
        print(f"accuracy: {[round(a, 2) for a in result['head_acc']]}")
        print(f"head {h} ({which}): ACC {summary['acc']:.2f}%  NMI {summary['nmi']:.2f}%  ARI {summary['ari']:.2f}%")
    else:
        print(f"head {h} ({which}): no labels, cluster sizes {summary['cluster_sizes']}")
    if args.kmeans_baseline and result:
        km = summary["kmeans"] = kmeans_baseline(dataset, num_classes, args.seed)
        print(f"k-means on raw pixels:    ACC {km['acc']:.2f}%  NMI {km['nmi']:.2f}%  ARI {km['ari']:.2f}%")
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(summary, f, indent=1)
    mapping = None
    if result:
        mapping, confusion = hungarian_match(preds[h], dataset.targets, num_classes)
        plot_confusion(confusion, mapping, os.path.join(out_dir, "confusion_matrix.png"),
                       f"{args.dataset}, head {h}: ACC {summary['acc']:.1f}%", dataset.class_names)
    plot_clusters(dataset, preds[h], probs[h], os.path.join(out_dir, "clusters.png"), mapping)
    if args.export_predictions:
        write_predictions(args.export_predictions, dataset, preds, probs, h)
        print(f"predictions: {args.export_predictions}")
    print(f"wrote eval.json and pictures to {out_dir}")
    return summary


def evaluation_set(args, ckpt):
    """The images stage 2 trains on and scores. Predicting on a new folder of images: an unlabelled one
    takes its cluster count from the checkpoint's heads, and every folder is normalized as the images the
    network was trained on (the checkpoint's normalization)."""
    flat_folder = args.dataset == "folder" and datasets.folder.is_flat(args.data_dir)
    if flat_folder and args.num_classes is None and "fc" in ckpt:
        args.num_classes = next(iter(ckpt["fc"].values())).shape[1]
    eval_set = datasets.from_args(args, datasets.DATASETS[args.dataset].cluster_split)
    if args.dataset == "folder" and args.test_only and "normalization" in ckpt:
        eval_set.mean, eval_set.std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
        eval_set.transform = datasets.eval_transform(eval_set.mean, eval_set.std, args.image_size)
    return eval_set


def load_encoder(args, path, ckpt, num_classes, device):
    """The network and heads from ``--resume``: (stage, net, model, heads)."""
    stage = checkpoint_stage(ckpt)
    check_checkpoint(ckpt, path, args, num_classes)
    if args.test_only and stage != 2:
        raise InputError(f"{path} is a stage-{stage} checkpoint with no heads to evaluate: train stage 2 from it "
                         f"with 'main.py --resume {args.resume}', or use super_and.py --test_only")
    if not args.test_only and stage == 2 and "next_epoch" not in ckpt:
        raise InputError(f"{path} holds no training state (a released file or a best-epoch file): evaluate it "
                         f"with --test_only, or continue from {LAST}")
    if not args.test_only and stage == 2:
        require_keys(ckpt, path, TRAINING_KEYS)
    net = NETWORKS[args.network](low_dim=args.low_dim, width=args.width).to(device)
    heads = MultiHeadNormFC(args.low_dim, num_classes, args.num_heads, args.tau_c, args.head_norm).to(device)
    load_network(net, ckpt["net"], path)
    if stage == 2:
        heads.load_state_dict(ckpt["fc"])
    distributed.broadcast_state(heads)  # drawn under the seed: rank 0's on every process
    net, model = speed_options(net, args.channels_last, args.compile, args.sync_bn)  # train `model`, save `net`
    return stage, net, model, heads


def main(args):
    device = distributed.init(args.device)  # joins the process group under torchrun
    if device.type == "cpu":
        keep_freed_memory()
    if not args.resume:
        raise InputError("stage 2 starts from a stage-1 encoder: pass --resume ckpt_embed.t7 "
                         "(or a stage-2 file to continue or, with --test_only, to evaluate)")
    check_output_dir(args.model_dir)
    if args.export_predictions:
        check_output_file(args.export_predictions, "--export_predictions")
    seed_everything(args.seed)
    path, ckpt = read_checkpoint(args.resume, args.model_dir)
    eval_set = evaluation_set(args, ckpt)
    eval_loader = datasets.make_loader(eval_set, 100, False, args.workers, device)
    stage, net, model, heads = load_encoder(args, path, ckpt, eval_set.num_classes, device)
    if args.test_only:
        result, preds, probs = evaluate(net, heads, eval_loader, eval_set.num_classes, device)
        if not distributed.is_main():  # rank 0 reports
            return None
        with RunLock(args.model_dir):
            return report(result, ckpt.get("selected_head"), preds, probs, eval_set, args, args.model_dir)
    train_set = datasets.from_args(args, datasets.DATASETS[args.dataset].cluster_split, views=2)
    if len(train_set) < args.batch_size:
        raise InputError(f"the training split has {len(train_set)} images, fewer than --batch_size {args.batch_size}")
    train_loader = datasets.make_train_loader(train_set, args, device)
    optimizer = sgd_optimizer(net, args.lr, args.momentum, args.weight_decay)  # the heads are not in it
    resumed = path if stage == 2 else None  # a stage-1 file starts a new stage-2 run
    with open_run(args.model_dir, LAST, LOG, other_files=[BEST], resumed=resumed, ckpt=ckpt,
                  position=lambda r: r["epoch"], optimizer=optimizer, args=args) as run:
        best = (ckpt["best_loss"], ckpt["best_epoch"]) if resumed else (float("inf"), None)
        if resumed and ckpt["best_epoch"] == ckpt["epoch"]:  # a kill may have come between the two saves
            run.save({k: ckpt[k] for k in BEST_KEYS if k in ckpt}, BEST)
        result = preds = probs = selected = None
        for epoch in range(ckpt["next_epoch"] if resumed else 0, args.epochs):
            result, preds, probs, selected, best = train_and_save(
                run, epoch, model, net, heads, optimizer, train_loader, eval_loader, best, args, device)
        if not distributed.is_main():  # rank 0 draws and reports
            return None
        plot_curves(run.log.read(), os.path.join(args.model_dir, "curves.png"))
        if result is None and preds is None:
            print(f"nothing to train: {path} already ran {args.epochs} epochs")
            return None
        return report(result, selected, preds, probs, eval_set, args, args.model_dir)


def train_and_save(run, epoch, model, net, heads, optimizer, train_loader, eval_loader, best, args, device):
    """One epoch of stage 2: train, evaluate, save the last and (if it is) the best epoch, log."""
    start = time.time()
    lr = step_lr(epoch, args.lr)
    set_lr(optimizer, lr)
    distributed.start_epoch(train_loader, args.seed, epoch)
    model.train()
    losses = run_epoch(train_loader, lambda images, _: train_step(model, heads, images, optimizer, args),
                       device, args.channels_last)
    result, preds, probs = evaluate(net, heads, eval_loader, eval_loader.dataset.num_classes, device)
    selected = int(np.argmin(losses["head_losses"]))  # the paper's choice: lowest training loss, no labels
    record = {"epoch": epoch, "lr": lr, **losses, **(result or {}), "selected_head": selected,
              **headline(result, selected), "seconds": time.time() - start}
    if losses["loss"] < best[0]:
        best = (losses["loss"], epoch)
    state = {"net": net.state_dict(), "fc": heads.state_dict(), "acc_list": (result or {}).get("head_acc"),
             "normalization": normalization(eval_loader.dataset),
             "head_losses": losses["head_losses"], "selected_head": selected, "epoch": epoch,
             "nmi_list": (result or {}).get("head_nmi"), "ari_list": (result or {}).get("head_ari"), "stage": 2}
    # the last epoch first: a kill between the two saves is repaired from it on resume
    run.save({**state, **training_state(optimizer, args, record, next_epoch=epoch + 1, best_loss=best[0],
                                        best_epoch=best[1])})
    if best[1] == epoch:  # released: keep the epoch of lowest mean training loss
        run.save(state, BEST)
    run.log.append(record)
    scores = f"ACC {record['acc']:.2f}% NMI {record['nmi']:.2f}% ARI {record['ari']:.2f}%" if result else "no labels"
    print(f"epoch {epoch} lr {lr:.4g} loss {losses['loss']:.4f} (assign {losses['loss_assign']:.4f} "
          f"cp {losses['loss_cp']:.4f}) head {selected}: {scores} {record['seconds']:.1f}s")
    if result:
        print(f"accuracy: {[round(a, 2) for a in result['head_acc']]}")
    return result, preds, probs, selected, best


if __name__ == "__main__":
    run_cli(main, get_args_parser())
