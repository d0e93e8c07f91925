"""Stage 2: class assignment with five frozen Norm-FC heads and the mutual-information loss
(paper §3.2; docs/method.md, "Stage 2: class assignment").

    python main.py --dataset cifar10 --resume ckpt_embed.t7        # start from the stage-1 encoder
    python main.py --resume ckpt_ul_last.t7                        # continue a stage-2 run exactly
    python main.py --test_only --resume ckpt_ul.t7                 # evaluate (ours or released)
    python main.py --dataset cifar10 --init random                 # from a random network (Table 2)
    python main.py --test_only --resume ckpt_embed.t7 --cluster kmeans  # sequential clustering (Table 3)

Writes <model_dir>/ckpt_ul_last.t7 after every epoch, <model_dir>/ckpt_ul.t7 for the epoch of lowest mean
training loss (released semantics), log_ul.jsonl (with Fig. 4's diagnostics), and at the end eval.json and
the pictures of engine/report.py (curves, confusion matrix, clusters, mutual information, per-class accuracy).

Under torchrun every process trains on its share of each batch and the losses see the whole batch, gathered
(engine/distributed.py); the code below reads as one process.
"""
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import datasets
from engine import checks, cli, distributed
from engine.distributed import speed_options
from engine.files import ASSIGN_LOG, BEST, EMBED_CKPT, EVAL, LAST
from engine.lifecycle import (
    RunLock,
    atomic_file,
    open_run,
    read_checkpoint,
    require_keys,
    resume_arguments,
    run_epoch,
    set_lr,
    training_state,
)
from engine.report import plot_run, write_report
from engine.script import open_script
from lib.checkpoint import checkpoint_kind, checkpoint_stage, load_network, normalization
from lib.clustering import METHODS, cluster_embedding
from lib.diagnostics import EpochEntropies
from lib.errors import InputError
from lib.losses import aug_loss, iic_loss
from lib.optim import sgd_optimizer
from lib.protocols import (
    class_accuracy,
    clustering_metrics,
    head_clusters,
    head_metrics,
    select_head,
    selected_metrics,
)
from lib.schedules import step_lr
from models import NETWORKS, MultiHeadNormFC
from models.heads import NORMS

LOG = ASSIGN_LOG
BEST_KEYS = ("net", "fc", "acc_list", "head_losses", "selected_head", "epoch", "nmi_list", "ari_list", "stage",
             "normalization", "args", "init", "head_norm")
# what a resumable file holds beyond BEST_KEYS (engine.lifecycle.training_state and the position)
TRAINING_KEYS = ("optimizer", "rng", "args", "epoch", "next_epoch", "best_loss", "best_epoch")
INITS = ("encoder", "random")  # --init: the stage-1 encoder of --resume, or a randomly initialized network


def get_args_parser():
    p = cli.ArgumentParser(description="Class assignment on a Super-AND encoder (stage 2)",
                           parents=[cli.common_parser(datasets.DATASETS, NETWORKS), heads_flags(), cli.schedule_flag()])
    p.set_defaults(lr=0.01, epochs=300)
    p.add_argument("--batch_t", default=0.1, type=cli.positive_float,
                   help="T_b, temperature of the consistency loss (> 0)")
    p.add_argument("--batch_m", default=1.0, type=cli.non_negative_float, help="m_b, weight of its negatives (>= 0)")
    p.add_argument("--init", default="encoder", choices=list(INITS),
                   help="start from the stage-1 encoder of --resume, or from a random network (Table 2)")
    p.add_argument("--cluster", default=None, choices=list(METHODS),
                   help="with --test_only and a stage-1 --resume: cluster its embedding instead (Table 3)")
    return p


def heads_flags():
    """Stage 2's flags for the heads, λ and the report, as a parent parser (joint.py takes them too; its
    --batch_t and --batch_m are stage 1's)."""
    p = cli.ArgumentParser(add_help=False)
    p.add_argument("--num_heads", default=5, type=cli.positive_int, help="frozen Norm-FC heads (>= 1)")
    p.add_argument("--tau_c", default=0.1, type=cli.positive_float, help="τ_c, temperature of the heads, Eq. 13 (> 0)")
    p.add_argument("--lambda_cp", default=1.0, type=cli.non_negative_float,
                   help="λ, weight of the consistency-preserving loss (>= 0)")
    p.add_argument("--head_norm", default="released", choices=list(NORMS),
                   help="W normalized per feature row (released), per class column (paper, Eq. 13) or not (Table 3)")
    p.add_argument("--export_predictions", default="", metavar="FILE.csv",
                   help="write each evaluated image's path, label, selected cluster, its probability and every "
                        "head's cluster")
    p.add_argument("--kmeans_baseline", action="store_true",
                   help="also print k-means on the raw pixels of the evaluated split (scikit-learn)")
    return p


@dataclass
class Stage2:
    """What the epochs of stage 2 work on, and what they leave for the report."""
    net: torch.nn.Module  # saved
    model: torch.nn.Module  # trained: ``net``, compiled with --compile
    heads: MultiHeadNormFC  # frozen
    optimizer: torch.optim.Optimizer  # the network's parameters, not the heads
    train_loader: object
    eval_loader: object  # the same images, one view, in order: the clusters the metrics score
    device: torch.device
    best_loss: float = float("inf")  # released: the best epoch is the one of lowest mean training loss
    best_epoch: int | None = None
    clusters: dict | None = None  # the last epoch's ``evaluate``
    selected_head: int | None = None  # the last epoch's
    init: str = "encoder"  # where the run's network came from (--init), kept in its checkpoints
    entropies: EpochEntropies = field(default_factory=EpochEntropies)  # Fig. 4, summed over an epoch's steps


def losses(heads, features, args, entropies=None, stage1_loss=0):
    """Stage 2's objective on the whole batch's float32 ``features`` (2B, d), view 1 rows first: the heads'
    mean Eq. 9 + λ · Eq. 11 on the embeddings, added to ``stage1_loss`` (the joint model's stage-1 losses;
    0 here). The heads' outputs go to ``entropies`` (an EpochEntropies). Returns (the loss to minimize, its
    named parts detached; ``head_losses``: one per head)."""
    batch = features.shape[0] // 2
    outputs = heads(features)
    head_losses = torch.stack([iic_loss(p[:batch], p[batch:]) for p in outputs])  # (H,)
    if entropies is not None:
        entropies.update(outputs)
    l_assign = head_losses.mean()
    l_cp = aug_loss(features, args.batch_t, args.batch_m)  # Eq. 11, on the embeddings
    loss = stage1_loss + l_assign + args.lambda_cp * l_cp
    return loss, {"loss_assign": l_assign.detach(), "loss_cp": l_cp.detach(), "head_losses": head_losses.detach()}


def train_step(state, images, args, entropies=None):
    """One SGD step of ``losses`` on a (2B, 3, H, W) batch, view 1 rows first; the heads' outputs added to
    ``entropies``. Returns the named loss parts, detached and left on the device."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
        features = state.model(images)  # (2B, d)
    features = distributed.gather_views(features.float())  # heads and losses in float32
    loss, parts = losses(state.heads, features, args, entropies)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    return {"loss": loss.detach(), **parts}


def evaluate(net, heads, loader, device):
    """Each head's clusters of ``loader``'s images: {"metrics": each head's ACC / NMI / ARI in % (None without
    labels), "preds": (H, N) cluster of each image per head, "probs": (H, N) its probability}."""
    features = distributed.compute_features_sharded(net, loader, device)
    with torch.no_grad():
        probs, preds = head_clusters(heads(features))
    dataset, preds = loader.dataset, preds.cpu()
    metrics = head_metrics(preds, dataset.targets.numpy(), dataset.num_classes) if dataset.has_labels else None
    return {"metrics": metrics, "preds": preds, "probs": probs.cpu()}


def check_flags(args):
    """The combinations of --resume, --init, --cluster and --test_only that need no file to refuse."""
    if args.cluster and not args.test_only:
        raise InputError(f"--cluster {args.cluster} clusters a stage-1 embedding once and trains nothing: "
                         f"add --test_only (with --resume {EMBED_CKPT})")
    if args.cluster and (args.export_predictions or args.kmeans_baseline):
        raise InputError(f"--cluster writes its scores to {EVAL} and nothing else: drop "
                         f"{'--export_predictions' if args.export_predictions else '--kmeans_baseline'}")
    if args.cluster and args.init == "random":
        raise InputError("--cluster clusters the embedding of a stage-1 file, --init random has none: drop one")
    if args.resume:
        return
    if args.cluster or args.test_only:
        raise InputError(f"--{'cluster' if args.cluster else 'test_only'} needs a file to evaluate: pass --resume "
                         f"{EMBED_CKPT if args.cluster else BEST}")
    if args.init != "random":
        raise InputError(f"stage 2 starts from a stage-1 encoder: pass --resume {EMBED_CKPT} (or a stage-2 file "
                         "to continue or, with --test_only, to evaluate), or --init random for a random network")


def read_start(args):
    """The file of --resume (None and {} without one: --init random), checked against --init and --cluster
    (``check_file``); a stage-2 run to continue gives the flags left out (``resume_arguments``; --epochs may
    grow: the schedule does not depend on it). Returns (path, checkpoint, the arguments to use)."""
    if not args.resume:
        return None, {}, args
    path, ckpt = read_checkpoint(args.resume, args.model_dir)
    if not args.test_only and "fc" in ckpt and "next_epoch" in ckpt:  # its own run, going on
        args = resume_arguments(args, ckpt, path, get_args_parser(), free=("epochs",))
    check_file(args, path, ckpt)
    return path, ckpt, args


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
        raise InputError(f"--cluster clusters a stage-1 embedding; {path} is {checkpoint_kind(ckpt)}: pass a "
                         f"{EMBED_CKPT}")
    saved = ckpt.get("args", {}).get("dataset")
    if args.cluster and saved is not None and not datasets.same_images(saved, args.dataset):
        raise InputError(f"{path} was trained on {saved}, not --dataset {args.dataset}")
    if stage == 2 and args.test_only and ckpt.get("head_norm", args.head_norm) != args.head_norm:
        # evaluated as trained (continuing with another --head_norm is a changed argument, noted on resume)
        raise InputError(f"{path} has heads normalized '{ckpt['head_norm']}': pass --head_norm {ckpt['head_norm']}")


def check_checkpoint(ckpt, path, args, num_classes):
    """A stage-1 file to start from or a stage-2 file of the same images (with --test_only, also of a folder
    of new images), with heads of --num_heads, ``num_classes`` clusters and --low_dim; with training state to
    continue it, heads to evaluate it."""
    saved, stage = ckpt.get("args", {}).get("dataset"), checkpoint_stage(ckpt)
    new_images = args.test_only and args.dataset == "folder"  # predicting the trained clusters of one's own images
    if saved is not None and not datasets.same_images(saved, args.dataset) and not new_images:
        raise InputError(f"{path} was trained on {saved}, not --dataset {args.dataset}")
    if stage == 2:
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
    if args.test_only and stage != 2:
        raise InputError(f"{path} is {checkpoint_kind(ckpt)} with no heads to evaluate: train stage 2 from it "
                         f"with 'main.py --resume {args.resume}', or use super_and.py --test_only")
    if not args.test_only and ckpt.get("joint"):
        raise InputError(f"{path} is a joint-model file: continue it with 'joint.py --resume {args.resume}', or "
                         "evaluate it here with --test_only")
    if not args.test_only and stage == 2 and "next_epoch" not in ckpt:
        raise InputError(f"{path} holds no training state (a released file or a best-epoch file): evaluate it "
                         f"with --test_only, or continue from {LAST}")
    if not args.test_only and stage == 2:
        require_keys(ckpt, path, TRAINING_KEYS)


def cluster_images(args, ckpt):
    """The images stage 2 clusters (the split it scores; its training images are the same, two views) and
    ``datasets.from_args``'s options for both: an unlabelled folder without --num_classes takes the file's
    cluster count; with --test_only a folder is normalized as the network's training images were. Training
    on an unlabelled folder makes K clusters, 2 <= K <= its images (after --subset). Returns (images, options)."""
    folder = args.dataset == "folder"
    flat = folder and datasets.folder.is_flat(args.data_dir)
    heads = next(iter(ckpt["fc"].values())).shape[1] if flat and args.num_classes is None and "fc" in ckpt else None
    options = {"num_classes": heads, "normalization": ckpt["normalization"]
               if folder and args.test_only and "normalization" in ckpt else None}
    checks.folder_before_cache(args, labelled_for=args.cluster and f"--cluster {args.cluster}",
                               clustering=not args.test_only, num_classes=heads)  # before the folder's cache
    images = datasets.from_args(args, datasets.DATASETS[args.dataset].cluster_split, **options)
    if folder and images.class_names is None and not args.test_only:
        datasets.folder.check_cluster_count(images.num_classes, len(images), args.data_dir)
    return images, options


def load_encoder(args, path, ckpt, num_classes, device):
    """The network and heads stage 2 works on: (net, model, heads), as in ``Stage2``. From the file of
    --resume (a stage-1 encoder, or a stage-2 run with its heads), or with ``path`` None the random network
    drawn under the seed (--init random); the heads are drawn after the network in both cases."""
    if path is not None:
        check_checkpoint(ckpt, path, args, num_classes)
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
    with RunLock(args.model_dir), atomic_file(os.path.join(args.model_dir, EVAL)) as f:  # whole or none
        json.dump(summary, f, indent=1)
    print(f"wrote {EVAL} to {args.model_dir}")
    return summary


def main(args):
    check_flags(args)
    device = open_script(args)
    if args.export_predictions:
        cli.check_output_file(args.export_predictions, "--export_predictions", args.model_dir)
    path, ckpt, args = read_start(args)
    args = checks.check_image_size(args, ckpt, device, get_args_parser().get_default("image_size"))
    eval_set, options = cluster_images(args, ckpt)
    eval_loader = datasets.make_loader(eval_set, 100, False, args.workers, device)
    if args.cluster:
        return sequential(args, path, ckpt, eval_set, eval_loader, device)
    net, model, heads = load_encoder(args, path, ckpt, eval_set.num_classes, device)
    if args.test_only:
        clusters = evaluate(net, heads, eval_loader, device)
        if not distributed.is_main():  # rank 0 reports
            return None
        with RunLock(args.model_dir):
            return write_report(clusters, ckpt.get("selected_head"), eval_set, args)
    split = datasets.DATASETS[args.dataset].cluster_split  # the same images, two views
    train_set = datasets.from_args(args, split, views=2, num_classes=options["num_classes"])
    if len(train_set) < args.batch_size:
        raise InputError(f"the training split has {len(train_set)} images, fewer than --batch_size {args.batch_size}")
    state = Stage2(net, model, heads, sgd_optimizer(net, args.lr, args.momentum, args.weight_decay),
                   datasets.make_train_loader(train_set, args, device), eval_loader, device,
                   init=ckpt.get("init", "encoder") if path else "random")
    resumed = path if path and checkpoint_stage(ckpt) == 2 else None  # a stage-1 file starts a new stage-2 run
    with open_run(args.model_dir, LAST, LOG, other_files=[BEST], resumed=resumed, ckpt=ckpt,
                  position=lambda r: r["epoch"], optimizer=state.optimizer, args=args) as run:
        if resumed:
            state.best_loss, state.best_epoch = ckpt["best_loss"], ckpt["best_epoch"]
            if ckpt["best_epoch"] == ckpt["epoch"]:  # a kill may have come between the two saves
                run.save({k: ckpt[k] for k in BEST_KEYS if k in ckpt}, BEST)
        for epoch in range(ckpt["next_epoch"] if resumed else 0, args.epochs):
            train_and_save(run, state, epoch, args)
        if state.clusters is None:  # every epoch was done (killed before the report): score the checkpoint
            print(f"nothing to train: {path} already ran {ckpt['next_epoch']} epochs (--epochs {args.epochs}); "
                  "evaluating it")
            state.clusters, state.selected_head = evaluate(net, heads, eval_loader, device), ckpt["selected_head"]
        if not distributed.is_main():  # rank 0 draws and reports
            return None
        plot_run(run.log.read(), args.model_dir, eval_set)
        return write_report(state.clusters, state.selected_head, eval_set, args)


def diagnostics(entropies, clusters, selected, dataset):
    """Fig. 4's numbers of an epoch for its log record: each head's H(y), H(y|ŷ) and their difference (summed
    over the epoch's steps; ``entropies`` reset for the next epoch) and, with labels, the mean accuracy over
    the heads and the selected head's per-class accuracy."""
    record = entropies.compute()
    entropies.reset()
    if clusters["metrics"]:
        record["mean_head_acc"] = float(np.mean(clusters["metrics"]["head_acc"]))
        record["class_acc"] = class_accuracy(clusters["preds"][selected], dataset.targets, dataset.num_classes)
    return record


def train_and_save(run, state, epoch, args):
    """One epoch of stage 2: train, evaluate, save the last (and best) epoch, log; returns the log record."""
    start = time.time()
    lr = step_lr(epoch, args.lr, args.schedule_scale)
    set_lr(state.optimizer, lr)
    distributed.start_epoch(state.train_loader, args.seed, epoch)
    state.model.train()
    losses = run_epoch(state.train_loader, lambda images, _: train_step(state, images, args, state.entropies),
                       state.device, args.channels_last)
    clusters = evaluate(state.net, state.heads, state.eval_loader, state.device)
    metrics = clusters["metrics"] or {}
    selected = select_head(losses["head_losses"])
    record = {"epoch": epoch, "lr": lr, **losses, **metrics, "selected_head": selected,
              **selected_metrics(metrics, selected),
              **diagnostics(state.entropies, clusters, selected, state.eval_loader.dataset),
              "seconds": time.time() - start}
    state.clusters, state.selected_head = clusters, selected
    if losses["loss"] < state.best_loss:
        state.best_loss, state.best_epoch = losses["loss"], epoch
    saved = {"net": state.net.state_dict(), "fc": state.heads.state_dict(), "acc_list": metrics.get("head_acc"),
             "normalization": normalization(state.eval_loader.dataset), "head_losses": losses["head_losses"],
             "selected_head": selected, "epoch": epoch, "nmi_list": metrics.get("head_nmi"),
             "ari_list": metrics.get("head_ari"), "stage": 2, "args": vars(args), "init": state.init,
             "head_norm": args.head_norm}
    # the last epoch first: a kill between the two saves is repaired from it on resume
    run.save({**saved, **training_state(state.optimizer, args, record, next_epoch=epoch + 1,
                                        best_loss=state.best_loss, best_epoch=state.best_epoch)})
    if state.best_epoch == epoch:
        run.save(saved, BEST)
    run.log.append(record)
    print_epoch(record)
    return record


def print_epoch(record):
    """The console line(s) of a stage-2 epoch, from its log record."""
    scores = f"ACC {record['acc']:.2f}% NMI {record['nmi']:.2f}% ARI {record['ari']:.2f}%" if "acc" in record \
        else "no labels"
    print(f"epoch {record['epoch']} lr {record['lr']:.4g} loss {record['loss']:.4f} (assign "
          f"{record['loss_assign']:.4f} cp {record['loss_cp']:.4f}) head {record['selected_head']}: {scores} "
          f"{record['seconds']:.1f}s")
    if "head_acc" in record:
        print(f"accuracy: {[round(a, 2) for a in record['head_acc']]}")


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
