"""Stage 1: Super-AND embedding learning (REFERENCE §3).

    python super_and.py --dataset cifar10                 # 5 rounds x 200 epochs, as released
    python super_and.py --dataset digits --subset 256 --rounds 2 --epochs 1 --workers 0
    python super_and.py --resume ckpt_embed.t7            # continue a run exactly where it stopped
    python super_and.py --test_only --resume ckpt_embed.t7

Writes <model_dir>/ckpt_embed.t7 after every epoch and one JSON line per epoch to <model_dir>/log.jsonl.
"""
import os
import time

import torch

import datasets
from lib.checkpoint import checkpoint_stage, load_checkpoint, load_network, resolve_path, save_checkpoint
from lib.losses import and_loss, aug_loss, ue_loss
from lib.memory_bank import MemoryBank
from lib.neighbourhoods import AnchorNeighbourhoods
from lib.protocols import compute_features, weighted_knn_scores
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
from lib.schedules import num_anchors, step_lr, ue_weight
from models import NETWORKS

CKPT = "ckpt_embed.t7"


def get_args_parser():
    p = ArgumentParser(description="Super-AND embedding learning (stage 1)")
    p.add_argument("--dataset", default="cifar10", choices=list(datasets.DATASETS), help="data set")
    p.add_argument("--network", default="resnet18", choices=list(NETWORKS), help="two-trunk backbone")
    p.add_argument("--low_dim", default=128, type=int, help="d, embedding dimension")
    p.add_argument("--width", default=64, type=int,
                   help="channels of the first ResNet stage (64 as released; smaller only for quick CPU runs)")
    p.add_argument("--npc_t", default=0.1, type=float, help="τ, memory-bank temperature")
    p.add_argument("--npc_m", default=0.5, type=float, help="m, memory-bank momentum")
    p.add_argument("--ANs_select_rate", default=0.25, type=float,
                   help="share of samples that become anchors, per round")
    p.add_argument("--ANs_size", default=1, type=int, help="neighbours per anchor")
    p.add_argument("--lr", default=0.03, type=float, help="base learning rate")
    p.add_argument("--momentum", default=0.9, type=float, help="SGD momentum (Nesterov)")
    p.add_argument("--weight_decay", "--wd", default=5e-4, type=float, help="weight decay")
    p.add_argument("--epochs", default=200, type=int, help="epochs per round")
    p.add_argument("--rounds", default=5, type=int, help="rounds of neighbourhood discovery")
    p.add_argument("--batch_t", default=0.1, type=float, help="T_b, temperature of the AUG loss")
    p.add_argument("--batch_m", default=1.0, type=float, help="m_b, weight of the AUG loss's negatives")
    p.add_argument("--batch_size", default=128, type=int, help="images per step (2x views)")
    p.add_argument("--model_dir", default="checkpoint/", help="where the checkpoint and log go")
    p.add_argument("--resume", "-r", default="", help="checkpoint to continue (path, or name inside --model_dir)")
    p.add_argument("--test_only", action="store_true", help="only print the kNN accuracy of --resume")
    p.add_argument("--seed", default=1567010775, type=int, help="random seed")
    add_run_arguments(p)
    return p


def train_step(net, npc, ans, images, indexes, optimizer, weight, args):
    """One SGD step of AND + AUG + w·UE on a (2B, 3, H, W) batch, view 1 rows first.

    Returns the detached (loss, AND, AUG, UE) values as one tensor, left on the device.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
        features = net(images)  # (2B, d), one forward so BatchNorm sees all 2B views
    logits = npc(features.float())  # (2B, N), float32 whatever the network ran in
    neighbours, is_anchor = ans.lookup(indexes)
    l_and = and_loss(logits, indexes, neighbours, is_anchor)
    l_aug = aug_loss(logits, args.batch_t, args.batch_m)  # released: on the logits rows
    with torch.set_grad_enabled(weight > 0):  # UE is logged even while its weight is 0
        l_ue = ue_loss(logits, indexes)
    loss = l_and + l_aug + weight * l_ue if weight > 0 else l_and + l_aug
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    npc.update(indexes, features.detach().float())  # after the backward pass, as released
    return torch.stack([loss, l_and, l_aug, l_ue]).detach()


def train_one_epoch(net, npc, ans, loader, optimizer, weight, args, device):
    """One epoch of AND + AUG + w·UE. Returns the mean of each loss part."""
    net.train()

    def step(images, batch):
        indexes = batch[3].to(device, non_blocking=True)
        return train_step(net, npc, ans, images, indexes, optimizer, weight, args)

    means = run_epoch(loader, step, 4, device, args.channels_last)
    return dict(zip(["loss", "loss_and", "loss_aug", "loss_ue"], means))


def evaluate(net, npc, test_loader, train_labels, num_classes, device):
    """Weighted kNN (K = 200, σ = 0.1) of the test features against the memory bank: top-1, top-5 (%)."""
    features = compute_features(net, test_loader, device)
    scores = weighted_knn_scores(features, npc.memory, train_labels, num_classes)
    targets = test_loader.dataset.targets.to(scores.device)
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    top1 = (ranked[:, 0] == targets).float().mean().item() * 100
    top5 = (ranked == targets.unsqueeze(1)).any(1).float().mean().item() * 100
    return top1, top5


def check_stage1_checkpoint(ckpt, path, args, num_samples):
    """A clear error for a file of another stage, data set, size or dimension."""
    if checkpoint_stage(ckpt) != 1:
        raise InputError(f"{path} is a stage-2 checkpoint (ckpt_ul.t7); evaluate it with "
                         "'main.py --test_only --resume' or pass a ckpt_embed.t7 here")
    saved = ckpt.get("args", {}).get("dataset")
    if saved is not None and saved != args.dataset:
        raise InputError(f"{path} was trained on {saved}, not --dataset {args.dataset}")
    memory = ckpt["npc"]["memory"]
    if memory.shape[1] != args.low_dim:
        raise InputError(f"{path} has a {memory.shape[1]}-dimensional memory bank; pass --low_dim {memory.shape[1]}")
    if memory.shape[0] != num_samples:
        raise InputError(f"{path} has a memory bank of {memory.shape[0]} images but the {args.dataset} "
                         f"training split here has {num_samples}; check --dataset and --subset")


def main(args):
    device = choose_device(args.device)
    if args.test_only and not args.resume:
        raise InputError("--test_only needs the checkpoint to evaluate: pass --resume PATH")
    seed_everything(args.seed)
    train_set = datasets.build_dataset(args.dataset, args.data_dir, train=True, views=2, subset=args.subset)
    test_set = datasets.build_dataset(args.dataset, args.data_dir, train=False, subset=args.subset)
    num_samples, num_classes = len(train_set), datasets.num_classes(args.dataset)
    train_loader = datasets.make_train_loader(train_set, args, device)
    test_loader = datasets.make_loader(test_set, 100, False, args.workers, device)

    net = NETWORKS[args.network](low_dim=args.low_dim, width=args.width).to(device)
    net, model = speed_options(net, args.channels_last, args.compile)  # train with `model`, save `net`
    npc = MemoryBank(num_samples, args.low_dim, args.npc_t, args.npc_m).to(device)
    ans = AnchorNeighbourhoods(num_samples, args.ANs_size).to(device)
    optimizer = sgd_optimizer(net, args.lr, args.momentum, args.weight_decay)  # kept across rounds
    train_labels = train_set.targets.to(device)
    start_round, start_epoch, ckpt = 0, 0, None
    out_path = os.path.join(args.model_dir, CKPT)

    if args.resume:
        path = resolve_path(args.resume, args.model_dir)
        ckpt = load_checkpoint(path)
        check_stage1_checkpoint(ckpt, path, args, num_samples)
        load_network(net, ckpt["net"], path)
        npc.memory.copy_(ckpt["npc"]["memory"])
        if "ANs_discovery" in ckpt:
            ans.load_state_dict(ckpt["ANs_discovery"])
        if args.test_only:
            top1, top5 = evaluate(net, npc, test_loader, train_labels, num_classes, device)
            print(f"kNN top-1 {top1:.2f}%  top-5 {top5:.2f}%")
            print(f"accuracy: {top1:.2f}")
            return top1
        if "next" not in ckpt:  # released files: the broken released resume is not reproduced
            raise InputError(f"{path} holds no training state (a released or converted file): evaluate it "
                             "with --test_only, or start stage 2 from it with main.py --resume")
        if os.path.exists(out_path) and not os.path.samefile(out_path, path):
            raise InputError(f"{out_path} exists and is not the file being resumed; choose another --model_dir")
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start_round, start_epoch = ckpt["next"]["round"], ckpt["next"]["epoch"]
        changed = {k: (v, getattr(args, k)) for k, v in ckpt["args"].items()
                   if k not in ("resume", "workers", "device", "data_dir", "model_dir")
                   and getattr(args, k, v) != v}
        if changed:
            print("note: resuming with changed arguments: " + ", ".join(
                f"--{k} {old} -> {new}" for k, (old, new) in changed.items()))
        print(f"resuming {path} at round {start_round}, epoch {start_epoch}")
    elif os.path.exists(out_path):
        raise InputError(f"{out_path} already exists; continue that run with --resume {CKPT} "
                         "or choose another --model_dir")

    if num_samples < args.batch_size:
        raise InputError(f"the training split has {num_samples} images, fewer than --batch_size {args.batch_size}")
    os.makedirs(args.model_dir, exist_ok=True)
    log = JsonLog(os.path.join(args.model_dir, "log.jsonl"))
    if ckpt is not None:
        done = (ckpt["round"], ckpt["epoch"])
        log.rewind(lambda r: (r["round"], r["epoch"]) < done, ckpt.get("log_record"))
    top1 = ckpt.get("acc", 0.0) * 100 if ckpt else 0.0
    for round_index in range(start_round, args.rounds):
        first_epoch = start_epoch if round_index == start_round else 0
        if round_index > 0 and first_epoch == 0:  # §3: anchors at the start of every round >= 1
            count = num_anchors(num_samples, args.ANs_select_rate, round_index)
            consistency = ans.discover(npc.memory, args.npc_t, count, train_labels)
            print(f"round {round_index}: {count} anchors, neighbourhood label consistency {consistency:.4f}")
        for epoch in range(first_epoch, args.epochs):
            start = time.time()
            lr = step_lr(epoch, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            weight = ue_weight(epoch)
            losses = train_one_epoch(model, npc, ans, train_loader, optimizer, weight, args, device)
            top1, top5 = evaluate(net, npc, test_loader, train_labels, num_classes, device)
            record = {"round": round_index, "epoch": epoch, "lr": lr, **losses, "ue_weight": weight,
                      "anchors": len(ans.anchor_indexes), "consistency": float(ans.consistency),
                      "knn_top1": top1, "knn_top5": top5, "seconds": time.time() - start}
            last = epoch == args.epochs - 1
            save_checkpoint({
                "net": net.state_dict(), "npc": npc.state_dict(), "ANs_discovery": ans.state_dict(),
                "acc": top1 / 100, "round": round_index, "epoch": epoch,
                "next": {"round": round_index + last, "epoch": 0 if last else epoch + 1},
                "optimizer": optimizer.state_dict(), "args": vars(args), "rng": rng_state(),
                "log_record": record, "stage": 1, "num_samples": num_samples,
            }, out_path)
            log.append(record)
            print(f"round {round_index} epoch {epoch} lr {lr:.4g} loss {losses['loss']:.4f} "
                  f"(and {losses['loss_and']:.4f} aug {losses['loss_aug']:.4f} ue {losses['loss_ue']:.4f} "
                  f"x{weight:.1f}) kNN top-1 {top1:.2f}% top-5 {top5:.2f}% {record['seconds']:.1f}s")
            print(f"accuracy: {top1:.2f}")
    return top1


if __name__ == "__main__":
    run_cli(main, get_args_parser())
