"""Stage 2: class assignment with five frozen Norm-FC heads and the mutual-information loss
(paper §3.2; docs/method.md, "Stage 2: class assignment").

    python main.py --dataset cifar10 --resume ckpt_embed.t7        # start from the stage-1 encoder
    python main.py --resume ckpt_ul_last.t7                        # continue a stage-2 run exactly
    python main.py --test_only --resume ckpt_ul.t7                 # evaluate (ours or released)
    python main.py --dataset cifar10 --init random                 # from a random network (Table 2)
    python main.py --test_only --resume ckpt_embed.t7 --cluster kmeans  # sequential clustering (Table 3)

Writes <model_dir>/ckpt_ul_last.t7 after every epoch, <model_dir>/ckpt_ul.t7 for the epoch of lowest mean
training loss (released semantics), log_ul.jsonl (with Fig. 4's diagnostics), and at the end eval.json and
the pictures (curves, confusion matrix, clusters, mutual information, per-class accuracy; the last section).

Under torchrun every process trains on its share of each batch and the losses see the whole batch, gathered
(engine/distributed.py); the code below reads as one process.
"""
import csv
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import datasets
from datasets.folder import printable
from engine import checks, cli, distributed
from engine.distributed import speed_options
from engine.files import (
    ASSIGN_LOG,
    BEST,
    CLUSTERS,
    CONFUSION,
    CURVES,
    EMBED_CKPT,
    EVAL,
    LAST,
    MUTUAL_INFORMATION,
    PER_CLASS,
)
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
    hungarian_match,
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
    p = cli.ArgumentParser(description="Class assignment on a Super-AND encoder (stage 2)", now=("cluster",),
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
    --batch_t and --batch_m are stage 1's). A resume keeps the file's heads; the report's flags are the
    command's own."""
    p = cli.ArgumentParser(add_help=False, now=("export_predictions", "kmeans_baseline"), fixed=("num_heads",))
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
                  position=lambda r: r["epoch"], optimizer=state.optimizer, args=args,
                  now=get_args_parser().now) as run:
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


# ---- what a run (or joint.py's) leaves at its end: the scores on the console, eval.json, the pictures (PNG,
# matplotlib Agg: training curves, Fig. 4's mutual information and per-class accuracy, the confusion matrix,
# the clusters of the selected head), optionally a CSV of the predictions and k-means on the raw pixels.
# ``clusters`` is what ``evaluate`` gives: {"metrics": each head's ACC / NMI / ARI in % (None without
# labels), "preds": (H, N) cluster of each image per head, "probs": (H, N) its probability} ----

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


CLUSTER_ROWS, PER_ROW = 20, 8  # clusters.png: the largest 20 clusters, 8 images each


def plot_clusters(dataset, preds, probs, path, mapping=None):
    """``clusters.png``: one row per cluster (the largest ``CLUSTER_ROWS``), its ``PER_ROW`` most confident images,
    its size and, with labels, its matched class and purity. The images are laid out in one array and
    drawn once (a grid of axes, one per image, takes about a second to lay out)."""
    plt = pyplot()
    preds, probs = np.asarray(preds), np.asarray(probs, dtype=np.float64)
    rows = cluster_summary(preds, probs, dataset.targets.numpy(), mapping, dataset.num_classes, PER_ROW)
    rows = sorted(rows, key=lambda r: -r["size"])[:CLUSTER_ROWS]
    names = list(dataset.class_names or [str(c) for c in range(dataset.num_classes)])
    height, width = np.asarray(dataset.data[0]).shape[:2]
    gap, label = max(1, height // 8), int(2.5 * width)  # pixels between images; the text column's width
    cell_h, cell_w = height + gap, width + gap
    canvas = np.full((len(rows) * cell_h - gap, label + PER_ROW * cell_w - gap, 3), 255, dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(1.1 * (PER_ROW + 2.5), 1.1 * len(rows) + 0.3))
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


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
