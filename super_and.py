"""Stage 1: Super-AND embedding learning (paper §3.1; docs/method.md, "Stage 1: Super-AND").

    python super_and.py --dataset cifar10 --model_dir checkpoint/     # 5 rounds x 200 epochs, as released
    python super_and.py --resume ckpt_embed.t7                        # continue a run exactly where it stopped
    python super_and.py --test_only --resume ckpt_embed.t7            # kNN accuracy of a file, ours or released
    python super_and.py --variant lemniscate                          # Table 2's other first stages: and, lemniscate

Writes <model_dir>/ckpt_embed.t7 after every epoch and one JSON line per epoch to <model_dir>/log_embed.jsonl.

Under torchrun each process runs the network on its share of every batch; the losses, the memory bank's update
and the round's anchor discovery see the whole batch and bank on every process, so all processes keep the same
bank and anchors (engine/distributed.py). The code below reads as one process.
"""
import time
from dataclasses import dataclass

import torch

import datasets
from engine import checks, distributed
from engine.cli import (
    ArgumentParser,
    common_parser,
    half_open_unit,
    non_negative_float,
    positive_float,
    positive_int,
    run_cli,
    schedule_flag,
    unit_interval,
)
from engine.distributed import speed_options
from engine.files import EMBED_CKPT, EMBED_LOG
from engine.lifecycle import (
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
from lib.errors import InputError
from lib.losses import and_loss, aug_loss, ue_loss
from lib.memory_bank import MemoryBank
from lib.neighbourhoods import AnchorNeighbourhoods
from lib.optim import sgd_optimizer
from lib.protocols import knn_accuracy
from lib.schedules import num_anchors, step_lr, ue_weight
from models import NETWORKS

CKPT, LOG = EMBED_CKPT, EMBED_LOG
# what a resumable file holds beyond the released keys (engine.lifecycle.training_state and the position)
TRAINING_KEYS = ("optimizer", "rng", "args", "round", "epoch", "next.round", "next.epoch")
LOSSES = ("loss", "loss_and", "loss_aug", "loss_ue")  # the log's loss keys, whatever the variant
# the first stages of Table 2 (docs/method.md, "Stage-1 variants (Table 2)"): what each turns on
VARIANTS = {
    "super_and": "AND loss with anchors discovered every round, AUG and UE losses, two views per image",
    "and": "AND loss alone with anchors discovered every round, one view per image",
    "lemniscate": "the memory bank's instance loss alone (the AND loss, no anchors ever), one view per image",
}


def position(record):
    """Where a log record or a checkpoint stands in the run."""
    return record["round"], record["epoch"]


def get_args_parser():
    p = ArgumentParser(description="Super-AND embedding learning (stage 1)", fixed=("variant",),
                       parents=[common_parser(datasets.DATASETS, NETWORKS), method_flags(), schedule_flag()])
    p.set_defaults(lr=0.03, epochs=200)
    p.add_argument("--variant", default="super_and", choices=list(VARIANTS),
                   help="the first stage of Table 2: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    return p


def method_flags():
    """Stage 1's own flags, as a parent parser (joint.py takes them too)."""
    p = ArgumentParser(add_help=False)
    p.add_argument("--npc_t", default=0.1, type=positive_float, help="τ, memory-bank temperature (> 0)")
    p.add_argument("--npc_m", default=0.5, type=half_open_unit, help="m, memory-bank momentum (in [0, 1))")
    p.add_argument("--ANs_select_rate", default=0.25, type=unit_interval,
                   help="share of samples that become anchors, per round (in [0, 1]; rate x (rounds - 1) <= 1)")
    p.add_argument("--ANs_size", default=1, type=positive_int, help="neighbours per anchor (1 <= k < N)")
    p.add_argument("--rounds", default=5, type=positive_int, help="rounds of neighbourhood discovery (>= 1)")
    p.add_argument("--batch_t", default=0.1, type=positive_float, help="T_b, temperature of the AUG loss (> 0)")
    p.add_argument("--batch_m", default=1.0, type=non_negative_float,
                   help="m_b, weight of the AUG loss's negatives (>= 0)")
    return p


@dataclass
class Stage1:
    """What the epochs of stage 1 work on."""
    net: torch.nn.Module  # saved
    model: torch.nn.Module  # trained: ``net``, compiled with --compile
    bank: MemoryBank  # one embedding per training image (Eq. 2), checkpoint key ``npc``
    neighbourhoods: AnchorNeighbourhoods  # the anchors and their neighbours, checkpoint key ``ANs_discovery``
    optimizer: torch.optim.Optimizer  # one for all rounds
    train_loader: object
    test_loader: object  # None: no held-out images
    labels: torch.Tensor  # of the training images, for the kNN monitor and the anchors' label consistency
    num_classes: int
    normalization: dict
    device: torch.device
    round: int = 0  # the round the epochs belong to; the loop in ``main`` sets it


def gather_rows(features, two_views):
    """This process's feature rows -> the whole batch's, with gradients: [view 1; view 2] of every process
    (``distributed.gather_views``), or with one view every process's rows in rank order, as
    ``distributed.gather`` orders the indexes (one process: ``features``)."""
    if two_views or distributed.world_size() == 1:
        return distributed.gather_views(features)
    # [rows; rows] as two views: the gathered first half is every process's rows in rank order
    return distributed.gather_views(torch.cat([features, features]))[:features.shape[0] * distributed.world_size()]


def losses(state, features, indexes, weight, args, variant="super_and"):
    """The stage-1 losses of ``variant`` on the whole batch's float32 ``features`` (2B rows, or B with one
    view) of the images ``indexes`` (B,): (the loss to minimize, its named parts detached). Super-AND:
    AND + AUG + w·UE; AND and Lemniscate: the AND loss alone (Lemniscate's has no anchors)."""
    logits = state.bank(features)  # (2B, N)
    neighbours, is_anchor = state.neighbourhoods.lookup(indexes)
    l_and = and_loss(logits, indexes, neighbours, is_anchor)
    if variant != "super_and":  # no AUG or UE loss: not even computed
        return l_and, {"loss_and": l_and.detach()}
    l_aug = aug_loss(logits, args.batch_t, args.batch_m)  # released: on the logits rows
    with torch.set_grad_enabled(weight > 0):  # UE is logged even while its weight is 0
        l_ue = ue_loss(logits, indexes)
    loss = l_and + l_aug + weight * l_ue if weight > 0 else l_and + l_aug
    return loss, {"loss_and": l_and.detach(), "loss_aug": l_aug.detach(), "loss_ue": l_ue.detach()}


def train_step(state, images, indexes, weight, args, variant="super_and"):
    """One SGD step of ``variant``'s losses (Super-AND: AND + AUG + w·UE) on a (2B, 3, H, W) batch of the
    images ``indexes`` (B,), view 1 rows first; AND and Lemniscate take view 1 alone. Returns the named
    loss parts, detached and left on the device."""
    two_views = variant == "super_and"
    if not two_views:
        images = images[:images.shape[0] // 2]  # (B, 3, H, W): one view per image, as AND and Lemniscate train
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
        features = state.model(images)  # (2B, d), one forward so BatchNorm sees both views; (B, d) one view
    # float32 whatever the network ran in
    features, indexes = gather_rows(features.float(), two_views), distributed.gather(indexes)
    loss, parts = losses(state, features, indexes, weight, args, variant)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.bank.update(indexes, features.detach())  # after the backward pass, as released; one view: from it
    return {"loss": loss.detach(), **parts}


def evaluate(state):
    """Weighted kNN (K = 200, σ = 0.1) of the test features against the memory bank: (top-1, top-5) in %,
    or (None, None) when the images have no labels."""
    loader = state.test_loader
    if loader is None or not loader.dataset.has_labels:
        return None, None
    features = distributed.compute_features_sharded(state.net, loader, state.device)
    targets = loader.dataset.targets.to(state.device)
    return knn_accuracy(features, state.bank.memory, state.labels, targets, state.num_classes)


def check_flags(args, num_samples):
    """The flags whose range depends on the training split's size N."""
    if num_samples < args.batch_size:
        raise InputError(f"the training split has {num_samples} images, fewer than --batch_size {args.batch_size}")
    if getattr(args, "variant", "super_and") == "lemniscate":
        return  # no anchors: the anchor flags are not used
    if args.ANs_size >= num_samples:
        raise InputError(f"--ANs_size {args.ANs_size} must be smaller than the {num_samples} training images")
    last = num_anchors(num_samples, args.ANs_select_rate, args.rounds - 1)
    if last > num_samples:
        raise InputError(f"--ANs_select_rate {args.ANs_select_rate} asks for {last} anchors in round "
                         f"{args.rounds - 1}, more than the {num_samples} images; keep rate x (rounds - 1) <= 1")


def build(args, device):
    """The data, network, memory bank, anchors and optimizer of a run."""
    info = datasets.DATASETS[args.dataset]
    datasets.require_files(args, [info.embed_split, info.test_split])  # all there before any is read
    train_set = datasets.from_args(args, info.embed_split, views=2)
    test_set = datasets.from_args(args, info.test_split) if info.test_split else None
    if not args.test_only:
        check_flags(args, len(train_set))
    train_loader = datasets.make_train_loader(train_set, args, device)
    test_loader = datasets.make_loader(test_set, 100, False, args.workers, device) if test_set else None
    net = NETWORKS[args.network](low_dim=args.low_dim, width=args.width).to(device)
    net, model = speed_options(net, args.channels_last, args.compile, args.sync_bn)
    bank = distributed.broadcast_state(MemoryBank(len(train_set), args.low_dim, args.npc_t, args.npc_m).to(device))
    neighbourhoods = AnchorNeighbourhoods(len(train_set), args.ANs_size).to(device)
    optimizer = sgd_optimizer(net, args.lr, args.momentum, args.weight_decay)
    return Stage1(net, model, bank, neighbourhoods, optimizer, train_loader, test_loader,
                  train_set.targets.to(device), train_set.num_classes, normalization(train_set), device)


def check_bank(ckpt, path, args, num_samples):
    """A file's memory bank (stage 1's or the joint model's): of this data set, its ``num_samples`` training
    images and --low_dim, and finite."""
    require_keys(ckpt, path, ["npc.memory"])
    saved = ckpt.get("args", {}).get("dataset")
    if saved is not None and saved != args.dataset:
        raise InputError(f"{path} was trained on {saved}, not --dataset {args.dataset}")
    memory = ckpt["npc"]["memory"]
    if memory.shape[1] != args.low_dim:
        raise InputError(f"{path} has a {memory.shape[1]}-dimensional memory bank; pass --low_dim {memory.shape[1]}")
    if memory.shape[0] != num_samples:
        raise InputError(f"{path} has a memory bank of {memory.shape[0]} images but the {args.dataset} "
                         f"training split here has {num_samples}; check --dataset and --subset")
    if not torch.isfinite(memory).all():
        raise InputError(f"{path} holds a non-finite memory bank; it cannot be evaluated or continued")


def load_stage1(args, state, path, ckpt):
    """``--resume``'s checkpoint ``ckpt``, read from ``path``: a stage-1 file (``check_bank``) with training
    state unless --test_only, of this --variant to continue it; ``restore``d into ``state``."""
    stage = checkpoint_stage(ckpt)
    if stage != 1:
        other = "'main.py --test_only --resume'" if stage == 2 else "'semi.py --test_only --resume'"
        raise InputError(f"{path} is {checkpoint_kind(ckpt)}; evaluate it with {other}, or pass a {CKPT} here")
    check_bank(ckpt, path, args, len(state.labels))
    if not args.test_only and "next" not in ckpt:  # released files: their broken resume is not reproduced
        raise InputError(f"{path} holds no training state (a released or converted file): evaluate it with "
                         "--test_only, or start stage 2 from it with main.py --resume")
    if not args.test_only:
        require_keys(ckpt, path, TRAINING_KEYS)
    saved = ckpt.get("args", {}).get("variant", "super_and")  # files from before --variant: Super-AND
    if not args.test_only and saved != args.variant:
        raise InputError(f"{path} was trained with --variant {saved}, not {args.variant}; continue it with "
                         f"--variant {saved}, or start the other variant in another --model_dir")
    restore(state, ckpt, path)


def restore(state, ckpt, path):
    """A checked file's network, memory bank and (where it has them: not a Lemniscate file's) anchors into
    ``state`` (stage 1's or the joint model's)."""
    load_network(state.net, ckpt["net"], path)
    state.bank.memory.copy_(ckpt["npc"]["memory"])
    if "ANs_discovery" in ckpt:
        state.neighbourhoods.load_state_dict(ckpt["ANs_discovery"])


def start_round(state, round_index, first_epoch, args):
    """Enter round ``round_index`` at ``first_epoch``. §3.1: at the start of every round >= 1 (not when a run
    continues inside one) the anchors and their neighbours are discovered anew from the memory bank, more of
    them each round; Lemniscate has none. Split over the processes, the same on every one."""
    state.round = round_index
    if round_index == 0 or first_epoch > 0 or getattr(args, "variant", "super_and") == "lemniscate":
        return
    count = num_anchors(len(state.labels), args.ANs_select_rate, round_index)
    consistency = state.neighbourhoods.discover(state.bank.memory, args.npc_t, count, state.labels,
                                                collectives=distributed.ProcessGroup())
    print(f"round {round_index}: {count} anchors, neighbourhood label consistency {consistency:.4f}")


def saved_state(state, epoch, args):
    """Stage 1's part of a checkpoint (the joint model's too): the released keys of the network, the bank and
    the anchors, the epoch's position and where to continue."""
    last = epoch == args.epochs - 1
    return {"net": state.net.state_dict(), "npc": state.bank.state_dict(),
            "ANs_discovery": state.neighbourhoods.state_dict(), "round": state.round, "epoch": epoch,
            "next": {"round": state.round + last, "epoch": 0 if last else epoch + 1}}


def main(args):
    if args.test_only and not args.resume:
        raise InputError("--test_only needs the checkpoint to evaluate: pass --resume PATH")
    device = open_script(args, writes=not args.test_only)
    path, ckpt = read_checkpoint(args.resume, args.model_dir) if args.resume else (None, None)
    if ckpt is not None and not args.test_only and checkpoint_stage(ckpt) == 1 and "next" in ckpt:
        # going on: the flags left out are the file's; --rounds may grow (a round's anchors do not depend on it)
        args = resume_arguments(args, ckpt, path, get_args_parser(), free=("rounds",))
    args = checks.check_image_size(args, ckpt, device, get_args_parser().get_default("image_size"))
    state = build(args, device)
    if args.resume:
        load_stage1(args, state, path, ckpt)
    if args.test_only:
        top1, top5 = evaluate(state)
        print(f"kNN top-1 {top1:.2f}%  top-5 {top5:.2f}%" if top1 is not None else "no labels: no kNN accuracy")
        print(f"accuracy: {top1:.2f}" if top1 is not None else "accuracy: n/a")
        return top1
    start = (ckpt["next"]["round"], ckpt["next"]["epoch"]) if ckpt else (0, 0)
    top1 = ckpt["acc"] * 100 if ckpt else None
    with open_run(args.model_dir, CKPT, LOG, resumed=path, ckpt=ckpt, position=position, optimizer=state.optimizer,
                  args=args) as run:
        for round_index in range(start[0], args.rounds):
            first_epoch = start[1] if round_index == start[0] else 0
            start_round(state, round_index, first_epoch, args)
            for epoch in range(first_epoch, args.epochs):
                top1 = train_and_save(run, state, epoch, args)["knn_top1"]
        if start[0] >= args.rounds:
            print(f"nothing to train: {path} already ran {start[0]} rounds of {args.epochs} epochs (--rounds "
                  f"{args.rounds}); pass a larger --rounds to go on")
    return top1


def train_and_save(run, state, epoch, args):
    """One epoch of stage 1 in round ``state.round``: train, evaluate, checkpoint, log; returns the log record."""
    start = time.time()
    lr = step_lr(epoch, args.lr, args.schedule_scale)
    set_lr(state.optimizer, lr)
    weight = ue_weight(epoch, args.schedule_scale) if args.variant == "super_and" else None  # None: no UE loss
    distributed.start_epoch(state.train_loader, args.seed, state.round * args.epochs + epoch)
    state.model.train()
    losses = run_epoch(state.train_loader, lambda images, batch: train_step(
        state, images, batch["index"].to(state.device, non_blocking=True), weight, args, args.variant),
        state.device, args.channels_last)
    top1, top5 = evaluate(state)
    anchors = state.neighbourhoods
    record = {"round": state.round, "epoch": epoch, "lr": lr,
              **{key: losses.get(key) for key in LOSSES},  # a loss the variant does not have: null
              "ue_weight": weight,
              "anchors": len(anchors.anchor_indexes), "consistency": float(anchors.consistency),
              "knn_top1": top1, "knn_top5": top5, "seconds": time.time() - start}
    run.save({**saved_state(state, epoch, args), "acc": (top1 or 0.0) / 100, "stage": 1,
              "num_samples": len(state.bank.memory), "normalization": state.normalization,
              **training_state(state.optimizer, args, record)})
    run.log.append(record)
    knn = f"kNN top-1 {top1:.2f}% top-5 {top5:.2f}%" if top1 is not None else "no labels: no kNN"
    parts = (f"aug {record['loss_aug']:.4f} ue {record['loss_ue']:.4f} x{weight:.1f}" if weight is not None
             else f"{args.variant}: no aug, no ue")
    print(f"round {state.round} epoch {epoch} lr {lr:.4g} loss {record['loss']:.4f} (and {record['loss_and']:.4f} "
          f"{parts}) {knn} {record['seconds']:.1f}s")
    if top1 is not None:
        print(f"accuracy: {top1:.2f}")
    return record


if __name__ == "__main__":
    run_cli(main, get_args_parser())
