"""Few-label training from the pretrained encoder (paper §4.4; docs/method.md, "Semi-supervised fine-tuning").

    python semi.py --dataset cifar10 --resume ckpt_ul.t7 --labels_per_class 25 --model_dir semi/   # stage-2 encoder
    python semi.py --dataset cifar10 --resume ckpt_embed.t7 --labels_per_class 25 --model_dir semi1/
    python semi.py --dataset cifar10 --from_scratch --labels_per_class 25 --model_dir scratch/     # the baseline
    python semi.py --resume ckpt_semi.t7 --model_dir semi/                                          # continue

A linear classifier on the encoder's embedding, the whole network fine-tuned with cross-entropy on K labelled
images per class (balanced, drawn by --seed, saved as labelled_indexes.json), SGD with Nesterov momentum,
lr x0.1 at epochs 80, 120 and 160 of 180. Writes ckpt_semi.t7 every epoch, log_semi.jsonl (test accuracy per
epoch) and eval_semi.json.

Under torchrun each process trains on its share of every batch (the mean loss is the whole batch's) and
tests its share of the test images, the counts summed (engine/distributed.py); the code below reads as one
process.
"""
import copy
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

import datasets
from engine import checks, distributed
from engine.cli import ArgumentParser, common_parser, non_negative_int, positive_int, run_cli
from engine.distributed import speed_options
from engine.lifecycle import open_run, read_checkpoint, require_finite, require_keys, set_lr, training_state
from engine.script import open_script
from lib.checkpoint import checkpoint_stage, load_network, normalization
from lib.errors import InputError
from lib.optim import sgd_optimizer
from models import NETWORKS

CKPT, LOG, INDEXES = "ckpt_semi.t7", "log_semi.jsonl", "labelled_indexes.json"
TRAINING_KEYS = ("classifier", "optimizer", "rng", "args", "epoch", "next_epoch", "labelled_indexes", "start")


def get_args_parser():
    p = ArgumentParser(description="Few-label fine-tuning of the Super-AND encoder (paper §4.4)",
                       parents=[common_parser(datasets.DATASETS, NETWORKS)])
    p.set_defaults(lr=0.005, epochs=180, batch_size=64, model_dir="semi/")
    p.add_argument("--labels_per_class", default=25, type=positive_int,
                   help="K labelled training images per class, balanced, drawn by --seed (>= 1)")
    p.add_argument("--from_scratch", action="store_true", help="random initialization instead of --resume")
    p.add_argument("--transfer", action="store_true",
                   help="--resume is an encoder trained on other images (another --dataset or --image_size), "
                        "fine-tuned here on purpose")
    p.add_argument("--lr_decay_start", default=80, type=non_negative_int, help="epoch of the first x0.1 (>= 0)")
    p.add_argument("--lr_decay_every", default=40, type=positive_int, help="epochs between later x0.1 (>= 1)")
    return p


def semi_lr(epoch, base_lr, start=80, every=40):
    """base_lr before ``start``, then x0.1 at ``start`` and every ``every`` epochs after it (80, 120, 160)."""
    return base_lr if epoch < start else base_lr * 0.1 ** (1 + (epoch - start) // every)


def draw_labelled(targets, per_class, num_classes, seed):
    """``per_class`` indexes of each class, drawn without replacement by ``seed``, sorted."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        if len(members) < per_class:
            raise InputError(f"--labels_per_class {per_class}: class {c} has only {len(members)} training images")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen)).tolist()


def weak_augmentation(size, mean, std):
    """The standard weak augmentation of few-label training: a random crop of the image padded by 1/8 of its
    side (reflected), a horizontal flip."""
    return transforms.Compose([transforms.RandomCrop(size, padding=size // 8, padding_mode="reflect"),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


class Classifier(nn.Module):
    """The encoder (the unit-norm embedding; checkpoint key ``net``) and a linear layer to the classes
    (``classifier``)."""

    def __init__(self, encoder, low_dim, num_classes):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(low_dim, num_classes)

    def forward(self, x):
        return self.classifier(self.encoder(x))


@dataclass
class FewLabel:
    """What the epochs of few-label training work on."""
    net: Classifier  # saved
    model: nn.Module  # trained: ``net``, compiled with --compile
    optimizer: torch.optim.Optimizer
    train_loader: object  # the labelled images, weakly augmented
    test_loader: object
    device: torch.device
    labelled: list  # indexes into the training split; with the two below, in every checkpoint
    normalization: dict
    start: str  # what the encoder started from: the --resume file or "scratch"
    accuracy: float | None = None  # the last epoch's test accuracy (%)


@torch.no_grad()
def test_accuracy(net, loader, device):
    """Top-1 accuracy (%) on ``loader``."""
    distributed.broadcast_buffers(net)  # rank 0's BatchNorm running statistics everywhere
    net.eval()
    correct = total = 0
    for batch in distributed.shard(loader):
        logits = net(batch["image"].to(device, non_blocking=True))
        correct += (logits.argmax(1).cpu() == batch["target"]).sum().item()
        total += len(batch["target"])
    correct, total = distributed.total(correct, total)
    return 100.0 * correct / max(total, 1)


def train_one_epoch(model, loader, optimizer, amp, device):
    model.train()
    total, count = torch.zeros((), device=device), 0
    for batch in loader:
        images, targets = batch["image"].to(device, non_blocking=True), batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        count += 1
    mean = distributed.average(total).item() / max(count, 1)
    return require_finite({"loss": mean})["loss"]


def load_start(args, net, train_set):
    """``--resume``: a stage-1 or stage-2 file initializes the encoder; a ckpt_semi.t7 continues, or with
    --test_only is evaluated. The file is checked against the flags first (engine/checks.py). Returns
    (path, checkpoint of a run to continue or evaluate, or None)."""
    if args.from_scratch == bool(args.resume):
        raise InputError("pass either --resume CKPT (a stage-1, stage-2 or semi.py checkpoint) or --from_scratch")
    if args.from_scratch and args.test_only:
        raise InputError("--test_only evaluates a trained classifier: pass --resume ckpt_semi.t7 (a semi.py "
                         "checkpoint) instead of --from_scratch")
    if args.from_scratch:
        return None, None
    path, ckpt = read_checkpoint(args.resume, args.model_dir)
    stage = checkpoint_stage(ckpt)
    checks.same_backbone(ckpt, path, args)
    if stage != 3:
        if args.test_only:
            raise InputError(f"{path} is a stage-{stage} checkpoint with no trained classifier: pass a "
                             f"ckpt_semi.t7 to --test_only, or fine-tune this encoder with 'semi.py --resume "
                             f"{args.resume}' first")
        note = checks.encoder_start(ckpt, path, args, args.transfer)
        if note:
            print(note)
        load_network(net.encoder, ckpt["net"], path)
        return None, None  # an encoder to start from: a new run
    checks.semi_checkpoint(ckpt, path, args, train_set.num_classes)
    if not args.test_only:
        require_keys(ckpt, path, TRAINING_KEYS)
        checks.epoch_number(ckpt, path, "next_epoch")
        per_class = ckpt["args"].get("labels_per_class", args.labels_per_class)
        checks.labelled_indexes(ckpt["labelled_indexes"], path, train_set.targets, per_class)
    load_network(net.encoder, ckpt["net"], path)
    net.classifier.load_state_dict(ckpt["classifier"])
    return path, ckpt


def labelled_loader(args, train_set, labelled, device):
    """The loader of the ``labelled`` images of ``train_set``, weakly augmented."""
    if len(labelled) < args.batch_size:
        raise InputError(f"{len(labelled)} labelled images, fewer than --batch_size {args.batch_size}")
    weak = copy.copy(train_set)  # the same images, another transform
    weak.transform = weak_augmentation(args.image_size, train_set.mean, train_set.std)
    subset = torch.utils.data.Subset(weak, labelled)
    return datasets.make_loader(subset, args.batch_size, True, args.workers, device, seed=args.seed)


def main(args):
    device = open_script(args)
    info = datasets.DATASETS[args.dataset]
    train_set, test_set = datasets.from_args(args, "train"), datasets.from_args(args, info.test_split or "train")
    if not train_set.has_labels:
        raise InputError(f"{args.dataset}: few-label training needs labelled images (sub-folders as classes)")
    encoder = NETWORKS[args.network](low_dim=args.low_dim, width=args.width)
    net = Classifier(encoder, args.low_dim, train_set.num_classes).to(device)
    path, ckpt = load_start(args, net, train_set)
    test_loader = datasets.make_loader(test_set, 100, False, args.workers, device)
    if args.test_only:
        print(f"test accuracy {test_accuracy(net, test_loader, device):.2f}%")
        return None
    labelled = ckpt["labelled_indexes"] if ckpt else draw_labelled(train_set.targets, args.labels_per_class,
                                                                   train_set.num_classes, args.seed)
    loader = labelled_loader(args, train_set, labelled, device)
    _, model = speed_options(net, args.channels_last, args.compile, args.sync_bn)
    optimizer = sgd_optimizer(net, args.lr, args.momentum, args.weight_decay)
    start = ckpt["start"] if ckpt else ("scratch" if args.from_scratch else args.resume)
    state = FewLabel(net, model, optimizer, loader, test_loader, device, labelled, normalization(train_set), start,
                     accuracy=ckpt["acc"] if ckpt else None)
    with open_run(args.model_dir, CKPT, LOG, other_files=[INDEXES], resumed=path, ckpt=ckpt,
                  position=lambda r: r["epoch"], optimizer=optimizer, args=args) as run:
        if ckpt is None and distributed.is_main():
            with open(os.path.join(args.model_dir, INDEXES), "w") as f:
                json.dump(labelled, f)
        for epoch in range(ckpt["next_epoch"] if ckpt else 0, args.epochs):
            train_and_save(run, state, epoch, args)
        summary = {"test_acc": state.accuracy, "labelled": len(labelled), "labels_per_class": len(labelled) //
                   train_set.num_classes, "start": start, "epochs": args.epochs, "dataset": args.dataset}
        if distributed.is_main():
            with open(os.path.join(args.model_dir, "eval_semi.json"), "w") as f:
                json.dump(summary, f, indent=1)
    return summary


def train_and_save(run, state, epoch, args):
    """One epoch: train, test, checkpoint, log; returns the log record."""
    start = time.time()
    lr = semi_lr(epoch, args.lr, args.lr_decay_start, args.lr_decay_every)
    set_lr(state.optimizer, lr)
    distributed.start_epoch(state.train_loader, args.seed, epoch)
    loss = train_one_epoch(state.model, state.train_loader, state.optimizer, args.amp, state.device)
    state.accuracy = test_accuracy(state.net, state.test_loader, state.device)
    record = {"epoch": epoch, "lr": lr, "loss": loss, "test_acc": state.accuracy, "seconds": time.time() - start}
    run.save({"net": state.net.encoder.state_dict(), "classifier": state.net.classifier.state_dict(), "stage": 3,
              "epoch": epoch, "acc": state.accuracy, "labelled_indexes": state.labelled,
              "normalization": state.normalization, "start": state.start,
              **training_state(state.optimizer, args, record, next_epoch=epoch + 1)})
    run.log.append(record)
    print(f"epoch {epoch} lr {lr:.4g} loss {loss:.4f} test accuracy {state.accuracy:.2f}% {record['seconds']:.1f}s")
    return record


if __name__ == "__main__":
    run_cli(main, get_args_parser())
