"""The joint model of Table 3: both stages' losses optimized together, from a random network (docs/method.md,
"The joint model (Table 3)").

    python joint.py --dataset cifar10 --model_dir joint/              # 5 rounds x 200 epochs, as stage 1
    python joint.py --resume ckpt_joint.t7 --model_dir joint/         # continue a run exactly
    python joint.py --test_only --resume ckpt_joint.t7                # evaluate it again (main.py --test_only too)

Each step adds stage 1's losses (AND + AUG + w·UE on the memory-bank logits, anchors discovered at the start
of every round) and stage 2's (the heads' mean Eq. 9 + λ · Eq. 11 on the embeddings) and takes one SGD step
of the network. Writes <model_dir>/ckpt_joint.t7 after every epoch (net, bank, anchors, heads and the
training state), one JSON line per epoch to log_joint.jsonl, and at the end eval.json, confusion_matrix.png
and clusters.png, scored as stage 2 scores its heads (main.py's report).
"""
import time
from dataclasses import dataclass

import torch

import datasets
import main as stage2
import super_and as stage1
from engine import cli, distributed
from engine.distributed import speed_options
from engine.files import JOINT_CKPT, JOINT_LOG
from engine.lifecycle import (
    RunLock,
    open_run,
    read_checkpoint,
    require_keys,
    resume_arguments,
    run_epoch,
    set_lr,
    training_state,
)
from engine.script import open_script
from lib.checkpoint import normalization
from lib.errors import InputError
from lib.memory_bank import MemoryBank
from lib.neighbourhoods import AnchorNeighbourhoods
from lib.optim import sgd_optimizer
from lib.protocols import select_head, selected_metrics
from lib.schedules import step_lr, ue_weight
from models import NETWORKS, MultiHeadNormFC

CKPT, LOG = JOINT_CKPT, JOINT_LOG
def get_args_parser():
    p = cli.ArgumentParser(description="The joint model of Table 3: both stages' losses at once, from a random "
                                       "network", parents=[cli.common_parser(datasets.DATASETS, NETWORKS),
                                                           stage1.method_flags(), stage2.heads_flags(),
                                                           cli.schedule_flag()])
    p.set_defaults(lr=0.03, epochs=200)  # stage 1's: a network trained from random weights
    return p


@dataclass
class Joint:
    """What the epochs of the joint model work on: stage 1's network, bank and anchors, stage 2's heads."""
    net: torch.nn.Module  # saved
    model: torch.nn.Module  # trained: ``net``, compiled with --compile
    bank: MemoryBank  # checkpoint key ``npc``
    neighbourhoods: AnchorNeighbourhoods  # checkpoint key ``ANs_discovery``
    heads: MultiHeadNormFC  # frozen, checkpoint key ``fc``
    optimizer: torch.optim.Optimizer  # the network's parameters
    train_loader: object  # stage 1's images, two views
    eval_loader: object  # stage 2's images, one view, in order: the clusters the metrics score
    labels: torch.Tensor  # of the training images, for the anchors' label consistency
    device: torch.device
    round: int = 0
    clusters: dict | None = None  # the last epoch's ``stage2.evaluate``
    selected_head: int | None = None


def train_step(state, images, indexes, weight, args):
    """One SGD step of (AND + AUG + w·UE) + (mean-over-heads Eq. 9 + λ · Eq. 11) on a (2B, 3, H, W) batch of
    the images ``indexes`` (B,), view 1 rows first. Returns the named loss parts, detached, on the device."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
        features = state.model(images)  # (2B, d)
    features, indexes = distributed.gather_views(features.float()), distributed.gather(indexes)
    loss_1, parts_1 = stage1.losses(state, features, indexes, weight, args)
    loss, parts_2 = stage2.losses(state.heads, features, args, stage1_loss=loss_1)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.bank.update(indexes, features.detach())
    return {"loss": loss.detach(), **parts_1, **parts_2}


def build(args, device):
    """The data, network, bank, anchors, heads and optimizer of a run."""
    info = datasets.DATASETS[args.dataset]
    train_set = datasets.from_args(args, info.embed_split, views=2)
    eval_set = datasets.from_args(args, info.cluster_split)
    if not args.test_only:
        stage1.check_flags(args, len(train_set))
    net = NETWORKS[args.network](low_dim=args.low_dim, width=args.width).to(device)
    net, model = speed_options(net, args.channels_last, args.compile, args.sync_bn)
    bank = distributed.broadcast_state(MemoryBank(len(train_set), args.low_dim, args.npc_t, args.npc_m).to(device))
    heads = distributed.broadcast_state(MultiHeadNormFC(args.low_dim, eval_set.num_classes, args.num_heads,
                                                        args.tau_c, args.head_norm).to(device))
    return Joint(net, model, bank, AnchorNeighbourhoods(len(train_set), args.ANs_size).to(device), heads,
                 sgd_optimizer(net, args.lr, args.momentum, args.weight_decay),
                 datasets.make_train_loader(train_set, args, device),
                 datasets.make_loader(eval_set, 100, False, args.workers, device), train_set.targets.to(device),
                 device)


def read_joint(args):
    """Read ``--resume``, a file of this script: (path, ckpt, the arguments to use). Continuing it, the flags
    left out are the file's (``resume_arguments``; --rounds may grow, as stage 1's)."""
    path, ckpt = read_checkpoint(args.resume, args.model_dir)
    if not ckpt.get("joint"):
        raise InputError(f"{path} is not a checkpoint of joint.py (which starts from a random network); "
                         f"pass its {CKPT}")
    require_keys(ckpt, path, ["fc", "ANs_discovery"] + ([] if args.test_only else list(stage1.TRAINING_KEYS)))
    if not args.test_only:
        args = resume_arguments(args, ckpt, path, get_args_parser(), free=("rounds",))
    return path, ckpt, args


def load_joint(args, state, path, ckpt):
    """The file ``ckpt`` of --resume (``read_joint``) into the network, bank, anchors and heads."""
    stage1.check_bank(ckpt, path, args, len(state.bank.memory))
    saved = ckpt["args"].get("num_heads")
    if saved != args.num_heads:
        raise InputError(f"{path} was trained with --num_heads {saved}, not {args.num_heads}")
    stage1.restore(state, ckpt, path)
    state.heads.load_state_dict(ckpt["fc"])


def main(args):
    if args.test_only and not args.resume:
        raise InputError(f"--test_only needs the checkpoint to evaluate: pass --resume {CKPT}")
    device = open_script(args)
    if args.export_predictions:
        cli.check_output_file(args.export_predictions, "--export_predictions", args.model_dir)
    path, ckpt, args = read_joint(args) if args.resume else (None, None, args)
    state = build(args, device)
    if path:
        load_joint(args, state, path, ckpt)
    eval_set = state.eval_loader.dataset
    if args.test_only:
        clusters = stage2.evaluate(state.net, state.heads, state.eval_loader, device)
        if not distributed.is_main():
            return None
        with RunLock(args.model_dir):
            return stage2.write_report(clusters, ckpt.get("selected_head"), eval_set, args)
    start = (ckpt["next"]["round"], ckpt["next"]["epoch"]) if ckpt else (0, 0)
    with open_run(args.model_dir, CKPT, LOG, resumed=path, ckpt=ckpt, position=stage1.position,
                  optimizer=state.optimizer, args=args, now=get_args_parser().now) as run:
        for round_index in range(start[0], args.rounds):
            first_epoch = start[1] if round_index == start[0] else 0
            stage1.start_round(state, round_index, first_epoch, args)
            for epoch in range(first_epoch, args.epochs):
                train_and_save(run, state, epoch, args)
        if state.clusters is None:  # every epoch was done (killed before the report): score the checkpoint
            print(f"nothing to train: {path} already ran {start[0]} rounds of {args.epochs} epochs (--rounds "
                  f"{args.rounds}); evaluating it (a larger --rounds goes on)")
            state.clusters = stage2.evaluate(state.net, state.heads, state.eval_loader, device)  # every process
            state.selected_head = ckpt["selected_head"]
        if not distributed.is_main():
            return None
        return stage2.write_report(state.clusters, state.selected_head, eval_set, args)


def train_and_save(run, state, epoch, args):
    """One epoch of the joint model in round ``state.round``: train, score the heads, checkpoint, log; returns
    the log record."""
    start = time.time()
    lr = step_lr(epoch, args.lr, args.schedule_scale)
    set_lr(state.optimizer, lr)
    weight = ue_weight(epoch, args.schedule_scale)
    distributed.start_epoch(state.train_loader, args.seed, state.round * args.epochs + epoch)
    state.model.train()
    losses = run_epoch(state.train_loader, lambda images, batch: train_step(
        state, images, batch["index"].to(state.device, non_blocking=True), weight, args),
        state.device, args.channels_last)
    clusters = stage2.evaluate(state.net, state.heads, state.eval_loader, state.device)
    metrics = clusters["metrics"] or {}
    selected = select_head(losses["head_losses"])
    record = {"round": state.round, "epoch": epoch, "lr": lr, **losses, "ue_weight": weight,
              "anchors": len(state.neighbourhoods.anchor_indexes), **metrics, "selected_head": selected,
              **selected_metrics(metrics, selected), "seconds": time.time() - start}
    state.clusters, state.selected_head = clusters, selected
    run.save({**stage1.saved_state(state, epoch, args), "fc": state.heads.state_dict(),
              "acc_list": metrics.get("head_acc"), "nmi_list": metrics.get("head_nmi"),
              "ari_list": metrics.get("head_ari"), "head_losses": losses["head_losses"], "selected_head": selected,
              "normalization": normalization(state.eval_loader.dataset), "joint": True,
              **training_state(state.optimizer, args, record)})
    run.log.append(record)
    print(f"round {state.round} epoch {epoch}: stage 1 and {losses['loss_and']:.4f} aug {losses['loss_aug']:.4f} "
          f"ue {losses['loss_ue']:.4f} x{weight:.1f}")
    stage2.print_epoch(record)
    return record


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
