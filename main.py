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
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import datasets
from engine import assignment, checks, cli, distributed
from engine.assignment import evaluate, load_encoder
from engine.lifecycle import RunLock, open_run, read_checkpoint, run_epoch, set_lr, training_state
from engine.report import plot_run, print_epoch, selected_metrics, write_report
from engine.script import open_script
from lib.checkpoint import checkpoint_stage, normalization
from lib.clustering import METHODS
from lib.diagnostics import EpochEntropies
from lib.errors import InputError
from lib.losses import aug_loss, iic_loss
from lib.optim import sgd_optimizer
from lib.schedules import step_lr
from models import NETWORKS, MultiHeadNormFC
from models.heads import NORMS

BEST, LAST, LOG = "ckpt_ul.t7", "ckpt_ul_last.t7", "log_ul.jsonl"
BEST_KEYS = ("net", "fc", "acc_list", "head_losses", "selected_head", "epoch", "nmi_list", "ari_list", "stage",
             "normalization", "args", "init", "head_norm")


def get_args_parser():
    p = cli.ArgumentParser(description="Class assignment on a Super-AND encoder (stage 2)",
                           parents=[cli.common_parser(datasets.DATASETS, NETWORKS), cli.schedule_flag()])
    p.set_defaults(lr=0.01, epochs=300)
    p.add_argument("--batch_t", default=0.1, type=cli.positive_float,
                   help="T_b, temperature of the consistency loss (> 0)")
    p.add_argument("--batch_m", default=1.0, type=cli.non_negative_float, help="m_b, weight of its negatives (>= 0)")
    p.add_argument("--num_heads", default=5, type=cli.positive_int, help="frozen Norm-FC heads (>= 1)")
    p.add_argument("--tau_c", default=0.1, type=cli.positive_float, help="τ_c, temperature of the heads, Eq. 13 (> 0)")
    p.add_argument("--lambda_cp", default=1.0, type=cli.non_negative_float,
                   help="λ, weight of the consistency-preserving loss (>= 0)")
    p.add_argument("--head_norm", default="released", choices=list(NORMS),
                   help="W normalized per feature row (released), per class column (paper, Eq. 13) or not (Table 3)")
    p.add_argument("--init", default="encoder", choices=list(assignment.INITS),
                   help="start from the stage-1 encoder of --resume, or from a random network (Table 2)")
    p.add_argument("--cluster", default=None, choices=list(METHODS),
                   help="with --test_only and a stage-1 --resume: cluster its embedding instead (Table 3)")
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


def train_step(state, images, args, entropies=None):
    """One SGD step of mean-over-heads Eq. 9 + λ · Eq. 11 on a (2B, 3, H, W) batch, view 1 rows first; the
    heads' outputs added to ``entropies`` (an EpochEntropies). Returns the named loss parts
    (``head_losses``: one per head), detached and left on the device."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
        features = state.model(images)  # (2B, d)
    features = distributed.gather_views(features.float())  # heads and losses in float32
    batch = features.shape[0] // 2
    outputs = state.heads(features)
    head_losses = torch.stack([iic_loss(p[:batch], p[batch:]) for p in outputs])  # (H,)
    if entropies is not None:
        entropies.update(outputs)
    l_assign = head_losses.mean()
    l_cp = aug_loss(features, args.batch_t, args.batch_m)  # Eq. 11, on the embeddings
    loss = l_assign + args.lambda_cp * l_cp
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    return {"loss": loss.detach(), "loss_assign": l_assign.detach(), "loss_cp": l_cp.detach(),
            "head_losses": head_losses.detach()}


def main(args):
    assignment.check_flags(args)
    device = open_script(args)
    if args.export_predictions:
        cli.check_output_file(args.export_predictions, "--export_predictions", args.model_dir)
    path, ckpt = read_checkpoint(args.resume, args.model_dir) if args.resume else (None, {})  # None: --init random
    assignment.check_file(args, path, ckpt)
    args, options = checks.stage2_inputs(args, ckpt, device, get_args_parser().get_default("image_size"))
    split = datasets.DATASETS[args.dataset].cluster_split
    eval_set = datasets.from_args(args, split, **options)
    checks.stage2_images(args, eval_set)
    eval_loader = datasets.make_loader(eval_set, 100, False, args.workers, device)
    if args.cluster:
        return assignment.sequential(args, path, ckpt, eval_set, eval_loader, device)
    net, model, heads = load_encoder(args, path, ckpt, eval_set.num_classes, device)
    if args.test_only:
        clusters = evaluate(net, heads, eval_loader, device)
        if not distributed.is_main():  # rank 0 reports
            return None
        with RunLock(args.model_dir):
            return write_report(clusters, ckpt.get("selected_head"), eval_set, args)
    train_set = datasets.from_args(args, split, views=2, num_classes=options["num_classes"])
    if len(train_set) < args.batch_size:
        raise InputError(f"the training split has {len(train_set)} images, fewer than --batch_size {args.batch_size}")
    train_loader = datasets.make_train_loader(train_set, args, device)
    state = Stage2(net, model, heads, sgd_optimizer(net, args.lr, args.momentum, args.weight_decay), train_loader,
                   eval_loader, device, init=ckpt.get("init", "encoder") if path else "random")
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
    selected = int(np.argmin(losses["head_losses"]))  # the paper's choice: lowest training loss, no labels
    record = {"epoch": epoch, "lr": lr, **losses, **metrics, "selected_head": selected,
              **selected_metrics(metrics, selected),
              **assignment.epoch_diagnostics(state.entropies, clusters, selected, state.eval_loader.dataset),
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


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
