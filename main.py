"""Stage 2: class assignment with five frozen Norm-FC heads and the mutual-information loss (REFERENCE §4).

    python main.py --dataset cifar10 --resume ckpt_embed.t7        # start from the stage-1 encoder
    python main.py --resume ckpt_ul_last.t7                        # continue a stage-2 run exactly
    python main.py --test_only --resume ckpt_ul.t7                 # evaluate (ours or released)

Writes <model_dir>/ckpt_ul_last.t7 after every epoch, <model_dir>/ckpt_ul.t7 for the epoch of lowest
mean training loss (released semantics), log.jsonl, curves.png and confusion_matrix.png.
"""
import csv
import json
import os
import time

import numpy as np
import torch

import datasets
from lib.checkpoint import checkpoint_stage, load_checkpoint, load_network, resolve_path, save_checkpoint
from lib.losses import aug_loss, iic_loss
from lib.plots import plot_confusion, plot_curves
from lib.protocols import clustering_metrics, compute_features, hungarian_match
from lib.runtime import (
    ArgumentParser,
    InputError,
    JsonLog,
    add_run_arguments,
    choose_device,
    rng_state,
    run_cli,
    run_epoch,
    seed_everything,
    set_rng_state,
    sgd_optimizer,
    speed_options,
)
from lib.schedules import step_lr
from models import NETWORKS, MultiHeadNormFC

BEST, LAST = "ckpt_ul.t7", "ckpt_ul_last.t7"
SAME_IMAGES = ({"cifar100", "cifar20"},)  # data sets that share their images (an encoder transfers)


def get_args_parser():
    p = ArgumentParser(description="Class assignment on a Super-AND encoder (stage 2)")
    p.add_argument("--dataset", default="cifar10", choices=list(datasets.DATASETS), help="data set")
    p.add_argument("--network", default="resnet18", choices=list(NETWORKS), help="two-trunk backbone")
    p.add_argument("--low_dim", default=128, type=int, help="d, embedding dimension")
    p.add_argument("--width", default=64, type=int,
                   help="channels of the first ResNet stage (64 as released; smaller only for quick CPU runs)")
    p.add_argument("--lr", default=0.01, type=float, help="base learning rate")
    p.add_argument("--momentum", default=0.9, type=float, help="SGD momentum (Nesterov)")
    p.add_argument("--weight_decay", "--wd", default=5e-4, type=float, help="weight decay")
    p.add_argument("--epochs", default=300, type=int, help="training epochs")
    p.add_argument("--batch_t", default=0.1, type=float, help="T_b, temperature of the consistency loss")
    p.add_argument("--batch_m", default=1.0, type=float, help="m_b, weight of its negatives")
    p.add_argument("--batch_size", default=128, type=int, help="images per step (2x views)")
    p.add_argument("--num_heads", default=5, type=int, help="frozen Norm-FC heads")
    p.add_argument("--tau_c", default=0.1, type=float, help="τ_c, temperature of the heads (Eq. 13)")
    p.add_argument("--lambda_cp", default=1.0, type=float, help="λ, weight of the consistency-preserving loss")
    p.add_argument("--head_norm", default="released", choices=["released", "paper"],
                   help="normalize W per feature row (released code) or per class column (paper, Eq. 13)")
    p.add_argument("--model_dir", default="checkpoint/", help="where checkpoints, log and pictures go")
    p.add_argument("--resume", "-r", default="",
                   help="stage-1 file to start from, stage-2 file to continue, or (with --test_only) to evaluate")
    p.add_argument("--test_only", action="store_true", help="only evaluate --resume (a stage-2 file)")
    p.add_argument("--export_predictions", default="", metavar="FILE.csv",
                   help="write index, label and each head's cluster for every evaluated image")
    p.add_argument("--kmeans_baseline", action="store_true",
                   help="also print k-means on the raw pixels of the evaluated split (scikit-learn)")
    p.add_argument("--seed", default=1567010775, type=int, help="random seed")
    add_run_arguments(p)
    return p


def train_step(net, heads, images, optimizer, args):
    """One SGD step of mean-over-heads Eq. 9 + λ · Eq. 11 on a (2B, 3, H, W) batch, view 1 rows first.

    Returns the detached (loss, assign, cp, per-head losses...) values as one tensor on the device.
    """
    batch = images.shape[0] // 2
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
        features = net(images)
    features = features.float()  # (2B, d); heads and losses in float32
    head_losses = torch.stack([iic_loss(p[:batch], p[batch:]) for p in heads(features)])  # (H,)
    l_assign = head_losses.mean()
    l_cp = aug_loss(features, args.batch_t, args.batch_m)  # Eq. 11, on the embeddings
    loss = l_assign + args.lambda_cp * l_cp
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.cat([torch.stack([loss, l_assign, l_cp]), head_losses]).detach()


def train_one_epoch(net, heads, loader, optimizer, args, device):
    """One epoch of stage 2. Returns the mean loss, its two parts and each head's mean loss."""
    net.train()
    means = run_epoch(loader, lambda images, _: train_step(net, heads, images, optimizer, args),
                      3 + len(heads.heads), device, args.channels_last)
    return {"loss": means[0], "loss_assign": means[1], "loss_cp": means[2], "head_losses": means[3:]}


def evaluate(net, heads, loader, num_classes, device):
    """Each head's argmax cluster on ``loader`` and its ACC / NMI / ARI (percent) after Hungarian matching."""
    features = compute_features(net, loader, device)
    with torch.no_grad():
        preds = [p.argmax(1).cpu() for p in heads(features)]
    targets = loader.dataset.targets
    metrics = [clustering_metrics(p.numpy(), targets.numpy(), num_classes) for p in preds]
    result = {f"head_{m}": [100 * x[m] for x in metrics] for m in ("acc", "nmi", "ari")}
    return result, preds


def headline(result, selected):
    """The run's numbers: those of the selected head (head 0 when none is selected)."""
    h = 0 if selected is None else selected
    return {"acc": result["head_acc"][h], "nmi": result["head_nmi"][h], "ari": result["head_ari"][h]}


def check_heads(fc_state, path, args, num_classes):
    shapes = [tuple(v.shape) for k, v in sorted(fc_state.items()) if k.endswith(".weight")]
    if not shapes:
        raise InputError(f"{path} holds no head weights under 'fc'")
    if len(shapes) != args.num_heads:
        raise InputError(f"{path} has {len(shapes)} heads; pass --num_heads {len(shapes)}")
    dim, classes = shapes[0]
    if classes != num_classes:
        raise InputError(f"{path} has heads for {classes} clusters but --dataset {args.dataset} has "
                         f"{num_classes} classes; check --dataset")
    if dim != args.low_dim:
        raise InputError(f"{path} has heads for {dim}-dimensional embeddings; pass --low_dim {dim}")


def check_dataset(ckpt, path, args):
    saved = ckpt.get("args", {}).get("dataset")
    if saved is not None and saved != args.dataset and {saved, args.dataset} not in SAME_IMAGES:
        raise InputError(f"{path} was trained on {saved}, not --dataset {args.dataset}")


def kmeans_baseline(dataset, num_classes, seed):
    """k-means on the raw (normalized, flattened) pixels of the evaluated images."""
    from sklearn.cluster import KMeans
    pixels = torch.stack([dataset[i][0] for i in range(len(dataset))]).flatten(1).numpy()
    preds = KMeans(num_classes, n_init=10, random_state=seed % 2**32).fit_predict(pixels)
    return {k: 100 * v for k, v in clustering_metrics(preds, dataset.targets.numpy(), num_classes).items()}


def report(result, selected, preds, dataset, num_classes, args, out_dir):
    """Console lines, eval.json, the confusion matrix, and optionally the predictions and k-means."""
    head = headline(result, selected)
    print(f"accuracy: {[round(a, 2) for a in result['head_acc']]}")
    which = "lowest training loss" if selected is not None else "no head losses in the file: head 0"
    h = selected or 0
    print(f"head {h} ({which}): ACC {head['acc']:.2f}%  NMI {head['nmi']:.2f}%  ARI {head['ari']:.2f}%")
    summary = {**result, "selected_head": selected, **head, "images": len(dataset), "dataset": args.dataset}
    if args.kmeans_baseline:
        summary["kmeans"] = kmeans_baseline(dataset, num_classes, args.seed)
        km = summary["kmeans"]
        print(f"k-means on raw pixels:    ACC {km['acc']:.2f}%  NMI {km['nmi']:.2f}%  ARI {km['ari']:.2f}%")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(summary, f, indent=1)
    targets = dataset.targets
    mapping, confusion = hungarian_match(preds[h], targets, num_classes)
    picture = os.path.join(out_dir, "confusion_matrix.png")
    plot_confusion(confusion, mapping, picture, f"{args.dataset}, head {h}: ACC {head['acc']:.1f}%")
    if args.export_predictions:
        with open(args.export_predictions, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "label"] + [f"head{i}" for i in range(len(preds))])
            for i in range(len(dataset)):
                writer.writerow([i, int(targets[i])] + [int(p[i]) for p in preds])
        print(f"predictions: {args.export_predictions}")
    print(f"wrote {os.path.join(out_dir, 'eval.json')} and {picture}")
    return summary


def main(args):
    device = choose_device(args.device)
    if not args.resume:
        raise InputError("stage 2 starts from a stage-1 encoder: pass --resume ckpt_embed.t7 "
                         "(or a stage-2 file to continue or, with --test_only, to evaluate)")
    seed_everything(args.seed)
    num_classes = datasets.num_classes(args.dataset)
    eval_set = datasets.build_dataset(args.dataset, args.data_dir, train=True, subset=args.subset)
    eval_loader = datasets.make_loader(eval_set, 100, False, args.workers, device)
    path = resolve_path(args.resume, args.model_dir)
    ckpt = load_checkpoint(path)
    stage = checkpoint_stage(ckpt)
    check_dataset(ckpt, path, args)
    net = NETWORKS[args.network](low_dim=args.low_dim, width=args.width).to(device)
    heads = MultiHeadNormFC(args.low_dim, num_classes, args.num_heads, args.tau_c, args.head_norm).to(device)
    load_network(net, ckpt["net"], path)
    net, model = speed_options(net, args.channels_last, args.compile)  # train with `model`, save `net`

    if args.test_only:
        if stage != 2:
            raise InputError(f"{path} is a stage-1 checkpoint with no heads to evaluate: train stage 2 "
                             f"from it with 'main.py --resume {args.resume}', or use super_and.py --test_only")
        check_heads(ckpt["fc"], path, args, num_classes)
        heads.load_state_dict(ckpt["fc"])
        result, preds = evaluate(net, heads, eval_loader, num_classes, device)
        return report(result, ckpt.get("selected_head"), preds, eval_set, num_classes, args, args.model_dir)

    train_set = datasets.build_dataset(args.dataset, args.data_dir, train=True, views=2, subset=args.subset)
    if len(train_set) < args.batch_size:
        raise InputError(f"the training split has {len(train_set)} images, fewer than --batch_size {args.batch_size}")
    train_loader = datasets.make_train_loader(train_set, args, device)
    optimizer = sgd_optimizer(net, args.lr, args.momentum, args.weight_decay)  # the heads are not in it
    best_path, last_path = os.path.join(args.model_dir, BEST), os.path.join(args.model_dir, LAST)
    start_epoch, best_loss, best_epoch = 0, float("inf"), None
    if stage == 2:
        if "next_epoch" not in ckpt:
            raise InputError(f"{path} holds no training state (a released file or a best-epoch file): "
                             f"evaluate it with --test_only, or continue from {LAST}")
        check_heads(ckpt["fc"], path, args, num_classes)
        heads.load_state_dict(ckpt["fc"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start_epoch, best_loss, best_epoch = ckpt["next_epoch"], ckpt["best_loss"], ckpt["best_epoch"]
        if not os.path.exists(last_path) or not os.path.samefile(last_path, path):
            if os.path.exists(last_path):
                raise InputError(f"{last_path} exists and is not the file being resumed; choose another --model_dir")
        print(f"resuming {path} at epoch {start_epoch}")
    elif os.path.exists(last_path) or os.path.exists(best_path):
        raise InputError(f"{args.model_dir} already holds a stage-2 run; continue it with --resume {LAST} "
                         "or choose another --model_dir")

    os.makedirs(args.model_dir, exist_ok=True)
    log = JsonLog(os.path.join(args.model_dir, "log.jsonl"))
    if stage == 2:
        log.rewind(lambda r: r["epoch"] < ckpt["epoch"], ckpt.get("log_record"))
    result = preds = selected = None
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        lr = step_lr(epoch, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = train_one_epoch(model, heads, train_loader, optimizer, args, device)
        result, preds = evaluate(net, heads, eval_loader, num_classes, device)
        selected = int(np.argmin(losses["head_losses"]))  # the paper's choice: lowest training loss
        record = {"epoch": epoch, "lr": lr, **losses, **result, "selected_head": selected,
                  **headline(result, selected), "seconds": time.time() - start}
        if losses["loss"] < best_loss:
            best_loss, best_epoch = losses["loss"], epoch
        state = {"net": net.state_dict(), "fc": heads.state_dict(), "acc_list": result["head_acc"],
                 "head_losses": losses["head_losses"], "selected_head": selected, "epoch": epoch,
                 "nmi_list": result["head_nmi"], "ari_list": result["head_ari"], "stage": 2}
        if best_epoch == epoch:  # released: keep the epoch of lowest mean training loss
            save_checkpoint(state, best_path)
        save_checkpoint({**state, "next_epoch": epoch + 1, "best_loss": best_loss, "best_epoch": best_epoch,
                         "optimizer": optimizer.state_dict(), "args": vars(args), "rng": rng_state(),
                         "log_record": record}, last_path)
        log.append(record)
        print(f"epoch {epoch} lr {lr:.4g} loss {losses['loss']:.4f} (assign {losses['loss_assign']:.4f} "
              f"cp {losses['loss_cp']:.4f}) head {selected}: ACC {record['acc']:.2f}% NMI {record['nmi']:.2f}% "
              f"ARI {record['ari']:.2f}% {record['seconds']:.1f}s")
        print(f"accuracy: {[round(a, 2) for a in result['head_acc']]}")
    records = log.read()
    if records:
        plot_curves(records, os.path.join(args.model_dir, "curves.png"))
    if result is not None:
        return report(result, selected, preds, eval_set, num_classes, args, args.model_dir)
    print(f"nothing to train: {path} already ran {args.epochs} epochs")
    return None


if __name__ == "__main__":
    run_cli(main, get_args_parser())
