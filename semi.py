"""Few-label training from the pretrained encoder (paper §4.4, Table 4; docs/method.md, "Semi-supervised
fine-tuning" and "Semi-supervised methods (Table 4)").

    python semi.py --dataset cifar10 --resume ckpt_ul.t7 --model_dir semi/                  # stage-2 encoder
    python semi.py --dataset cifar10 --resume ckpt_embed.t7 --model_dir semi1/              # stage-1 encoder
    python semi.py --dataset cifar10 --from_scratch --model_dir scratch/                    # the baseline
    python semi.py --dataset svhn --resume ckpt_ul.t7 --method mean_teacher --model_dir mt/  # Table 4's methods
    python semi.py --resume ckpt_semi.t7 --model_dir semi/                                  # continue

A linear classifier on the encoder's embedding, the whole network fine-tuned on K labelled images per class
(balanced, drawn by --seed, saved as labelled_indexes.json; the paper's K and lr per data set by default), SGD
with Nesterov momentum, lr x0.1 at epochs 80, 120 and 160 of 180. --method supervised (the default) trains
with cross-entropy on the labelled images; pi_model and mean_teacher add a consistency loss on two views of
every image, the unlabelled rest of the training split included (lib/semi_supervised.py); Mean Teacher's
EMA teacher is saved beside the network and its accuracy reported. Writes ckpt_semi.t7 every epoch,
log_semi.jsonl (losses and test accuracy per epoch) and eval_semi.json.

Under torchrun each process trains on its share of every batch (the mean loss is the whole batch's) and
tests its share of the test images, the counts summed (engine/distributed.py); the code below reads as one
process.
"""
import argparse
import copy
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datasets
from datasets.transforms import geometric
from engine import checks, distributed
from engine.cli import (
    ArgumentParser,
    common_parser,
    half_open_unit,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_cli,
)
from engine.distributed import speed_options
from engine.files import SEMI_CKPT, SEMI_EVAL, SEMI_INDEXES, SEMI_LOG
from engine.lifecycle import (
    atomic_file,
    open_run,
    read_checkpoint,
    require_finite,
    require_keys,
    resume_arguments,
    set_lr,
    training_state,
)
from engine.script import open_script
from lib.checkpoint import checkpoint_kind, checkpoint_stage, load_network, normalization, saved_arguments
from lib.errors import InputError
from lib.optim import sgd_optimizer
from lib.schedules import semi_lr
from lib.semi_supervised import (
    EMA_DECAY_AFTER_RAMPUP,
    EMA_DECAY_DURING_RAMPUP,
    OUTPUTS,
    RAMPUP_EPOCHS,
    consistency_weight,
    ema_decay,
    ema_update,
    semi_supervised_loss,
)
from models import NETWORKS

CKPT, LOG, INDEXES = SEMI_CKPT, SEMI_LOG, SEMI_INDEXES
TRAINING_KEYS = ("classifier", "optimizer", "rng", "args", "epoch", "next_epoch", "labelled_indexes", "start")
METHODS = ("supervised", *OUTPUTS)  # supervised, then the semi-supervised methods of lib/semi_supervised.py
# the paper's Table 4 (§4.4): (labels per class, base lr) per data set; any other data set: OTHER_DEFAULTS
PAPER_DEFAULTS = {"cifar10": (400, 0.005), "svhn": (100, 0.001)}
OTHER_DEFAULTS = (25, 0.005)


def get_args_parser():
    per_dataset = "; ".join(f"{name} {k} labels per class and lr {lr}" for name, (k, lr) in PAPER_DEFAULTS.items())
    p = ArgumentParser(description="Few-label fine-tuning of the Super-AND encoder (paper §4.4), supervised or with "
                                   "the Π-model or Mean Teacher (Table 4)",
                       epilog=f"Defaults per data set (the paper's Table 4): {per_dataset}; any other data set "
                              f"{OTHER_DEFAULTS[0]} labels per class and lr {OTHER_DEFAULTS[1]}. All: 180 epochs, "
                              "lr x0.1 at 80, 120 and 160. --labels_per_class and --lr override them.",
                       parents=[common_parser(datasets.DATASETS, NETWORKS, lr_help="base learning rate (>= 0); "
                                              "%(default)s: the data set's, listed below")],
                       now=("from_scratch", "transfer"), fixed=("method", "labels_per_class"))
    p.set_defaults(lr=None, epochs=180, batch_size=64, model_dir="semi/")
    p.add_argument("--labels_per_class", default=None, type=positive_int,
                   help="K labelled training images per class, balanced, drawn by --seed (>= 1); %(default)s: the "
                        "data set's, listed below")
    p.add_argument("--from_scratch", action="store_true", help="random initialization instead of --resume")
    p.add_argument("--transfer", action="store_true",
                   help="--resume is an encoder trained on other images (another --dataset or --image_size), "
                        "fine-tuned here on purpose")
    p.add_argument("--lr_decay_start", default=80, type=non_negative_int, help="epoch of the first x0.1 (>= 0)")
    p.add_argument("--lr_decay_every", default=40, type=positive_int, help="epochs between later x0.1 (>= 1)")
    methods = p.add_argument_group("semi-supervised methods (Table 4; docs/method.md gives each constant's source)")
    methods.add_argument("--method", default="supervised", choices=METHODS,
                         help="supervised: cross-entropy on the labelled images alone; pi_model (Laine & Aila 2017) "
                              "and mean_teacher (Tarvainen & Valpola 2017) add a consistency loss on every image, "
                              "the unlabelled rest of the training split included")
    methods.add_argument("--unlabelled_batch_size", default=None, type=positive_int,
                         help="unlabelled images per step beside the --batch_size labelled ones (>= 1); "
                              "%(default)s: --batch_size")
    methods.add_argument("--consistency_weight", default=None, type=non_negative_float,
                         help="w_max, the consistency loss's weight after the ramp-up (>= 0); %(default)s: "
                              "pi_model 100 x labelled / training images, mean_teacher 100")
    methods.add_argument("--rampup_epochs", default=RAMPUP_EPOCHS, type=non_negative_int,
                         help="epochs of the sigmoid ramp-up exp(-5 (1 - t)^2) of the consistency weight and of the "
                              "teacher's EMA decay (>= 0; 0: none)")
    methods.add_argument("--ema_decay_rampup", default=EMA_DECAY_DURING_RAMPUP, type=half_open_unit,
                         help="mean_teacher: the teacher's EMA decay during the ramp-up (in [0, 1))")
    methods.add_argument("--ema_decay", default=EMA_DECAY_AFTER_RAMPUP, type=half_open_unit,
                         help="mean_teacher: the teacher's EMA decay after the ramp-up (in [0, 1))")
    return p


# the flags each method reads beyond those of supervised training: given to another method, they contradict it
SEMI_SUPERVISED = tuple(OUTPUTS)
METHOD_FLAGS = {"unlabelled_batch_size": SEMI_SUPERVISED, "consistency_weight": SEMI_SUPERVISED,
                "rampup_epochs": SEMI_SUPERVISED, "ema_decay_rampup": ("mean_teacher",), "ema_decay": ("mean_teacher",)}


def resolve_defaults(args):
    """A copy of ``args`` with --labels_per_class and --lr, where left out, the data set's (PAPER_DEFAULTS);
    when training, a flag of another --method than the one given is one error line (--test_only evaluates
    the file's own method)."""
    defaults = get_args_parser()
    for flag, methods in METHOD_FLAGS.items():
        if args.method not in methods and getattr(args, flag) != defaults.get_default(flag) and not args.test_only:
            raise InputError(f"--{flag} is a flag of {' and '.join(methods)}, not of --method {args.method}: "
                             "leave it out or choose that method")
    per_class, lr = PAPER_DEFAULTS.get(args.dataset, OTHER_DEFAULTS)
    return argparse.Namespace(**{**vars(args), "labels_per_class": args.labels_per_class or per_class,
                                 "lr": lr if args.lr is None else args.lr})


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


def weak_augmentation(size, mean, std, augmentation="flip"):
    """The standard weak augmentation of few-label training: a random crop of the image padded by 1/8 of its
    side (reflected), then a horizontal flip, or for a data set whose registry entry says "affine" (SVHN: a
    mirrored digit is another symbol) the small affine transform of datasets/transforms.py in its place."""
    from torchvision import transforms  # here, not at import: torchvision costs a second or two to import

    return transforms.Compose([transforms.RandomCrop(size, padding=size // 8, padding_mode="reflect"),
                               geometric(augmentation), transforms.ToTensor(), transforms.Normalize(mean, std)])


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
    net: Classifier  # saved (the student, for Mean Teacher)
    model: nn.Module  # trained: ``net``, compiled with --compile
    optimizer: torch.optim.Optimizer
    train_loader: object  # the labelled images, weakly augmented (two views each for the semi-supervised methods)
    test_loader: object
    device: torch.device
    labelled: list  # indexes into the training split; with the two below, in every checkpoint
    normalization: dict
    start: str  # what the encoder started from: the --resume file or "scratch"
    accuracy: float | None = None  # the last epoch's test accuracy (%): the teacher's for Mean Teacher
    unlabelled_loader: object = None  # the rest of the training split, two views each (pi_model, mean_teacher)
    teacher: Classifier | None = None  # mean_teacher: the EMA of ``net``'s weights, saved beside it
    max_weight: float = 0.0  # w_max of the consistency loss


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


def step_losses(state, labelled, unlabelled, weight, args):
    """One step's named losses for ``args.method`` (docs/method.md, "Semi-supervised methods (Table 4)").

    supervised: cross-entropy on the labelled images (``labelled["image"]``); ``unlabelled`` is None.
    pi_model, mean_teacher: view 1 and view 2 of the B_L labelled then the B_U unlabelled images, through
        the student ``state.model`` and ``state.teacher`` as ``lib.semi_supervised.OUTPUTS`` says, compared
        by ``semi_supervised_loss`` with weight w(t) = ``weight``. Of ``unlabelled`` only its views are read:
        its labels never reach the loss.
    """
    model, device, amp = state.model, state.device, args.amp

    def on_device(name):
        parts = [labelled[name]] + ([] if unlabelled is None else [unlabelled[name]])
        return torch.cat(parts).to(device, non_blocking=True)  # (B_L + B_U, 3, H, W)

    targets = labelled["target"].to(device, non_blocking=True)  # (B_L,)
    if args.method == "supervised":
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(labelled["image"].to(device, non_blocking=True))
        return {"loss": F.cross_entropy(logits.float(), targets)}
    first, second = on_device("view1"), on_device("view2")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits, target_logits = OUTPUTS[args.method](model, state.teacher, first, second)
    return semi_supervised_loss(logits.float(), targets, target_logits.float(), weight)


def unlabelled_batches(loader):
    """The unlabelled loader's batches without end, each pass a new shuffle."""
    while True:
        yield from loader


def train_epoch(state, epoch, args):
    """One pass over the labelled images; the semi-supervised methods draw an unlabelled batch beside each
    labelled one (the unlabelled loader restarts each epoch, so a checkpoint's random state continues it).
    Returns the epoch's mean losses (and mean w(t)) by name."""
    state.model.train()
    if state.teacher is not None:
        state.teacher.train()  # batch statistics in its forward, as Mean Teacher's code (its buffers: the student's)
    steps = len(state.train_loader)
    unlabelled = None if state.unlabelled_loader is None else unlabelled_batches(state.unlabelled_loader)
    totals, count, weights = {}, 0, 0.0
    for i, batch in enumerate(state.train_loader):
        position = epoch + i / max(steps, 1)  # fractional epochs: the ramp-ups move every step
        weight = consistency_weight(position, state.max_weight, args.rampup_epochs)
        losses = step_losses(state, batch, None if unlabelled is None else next(unlabelled), weight, args)
        state.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        state.optimizer.step()
        if state.teacher is not None:
            step = epoch * steps + i  # Mean Teacher's code: α ≤ 1 − 1/(step + 1), the teacher's warm-up
            alpha = min(1.0 - 1.0 / (step + 1), ema_decay(position, args.rampup_epochs, args.ema_decay_rampup,
                                                            args.ema_decay))
            ema_update(state.teacher, state.net, alpha)
        for name, value in losses.items():
            totals[name] = totals.get(name, 0) + value.detach()
        weights += weight
        count += 1
    means = {name: distributed.average(total).item() / max(count, 1) for name, total in totals.items()}
    if state.unlabelled_loader is not None:
        means["weight"] = weights / max(count, 1)  # the epoch's mean w(t)
    return require_finite(means or {"loss": 0.0})


# ---- the checks of --resume: an encoder (stage 1 or 2) to fine-tune, or a file of this script to continue; one
# clear line for a file of another data set, size or shape, not a mismatch deep inside ``load_state_dict`` ----

def same_backbone(ckpt, path, args):
    """The file's network is the one the flags build: the saved --network, --width and --low_dim where the
    file records them (ours), the embedding layer's shape otherwise (released files, 'module.' keys)."""
    saved = saved_arguments(ckpt)
    for flag in ("network", "width", "low_dim"):
        if saved.get(flag) is not None and saved[flag] != getattr(args, flag):
            raise InputError(f"{path} holds a network of --{flag} {saved[flag]}, not {getattr(args, flag)}; "
                             f"pass --{flag} {saved[flag]}")
    linear = ckpt["net"].get("linear.weight", ckpt["net"].get("module.linear.weight"))
    if torch.is_tensor(linear) and linear.dim() == 2 and linear.shape[0] != args.low_dim:
        raise InputError(f"{path} has a {linear.shape[0]}-dimensional embedding; pass --low_dim {linear.shape[0]}")


def encoder_start(ckpt, path, args, transfer=False):
    """A stage-1 or stage-2 file to fine-tune: trained on the images of --dataset at --image_size, unless
    ``transfer`` (--transfer) says an encoder of other images is meant. Returns the one line that says such
    a transfer, or None."""
    saved = saved_arguments(ckpt)
    other = []
    if saved.get("dataset") is not None and not datasets.same_images(saved["dataset"], args.dataset):
        other.append(f"trained on {saved['dataset']}, not --dataset {args.dataset}")
    if saved.get("image_size") is not None and saved["image_size"] != args.image_size:
        other.append(f"trained at --image_size {saved['image_size']}, not {args.image_size}")
    if other and not transfer:
        raise InputError(f"{path} is an encoder {' and '.join(other)}; pass --transfer if fine-tuning it "
                         f"here is meant, else the matching flags")
    return f"transfer: {path} is an encoder {' and '.join(other)}" if other else None


def semi_checkpoint(ckpt, path, args, num_classes):
    """A ckpt_semi.t7 to continue or evaluate: the same --dataset, and the same --image_size, --subset and
    --method to continue it (its labelled indexes point into that training split; ``evaluation_image_size``
    chooses the size of an evaluation), a classifier of ``num_classes`` x --low_dim."""
    saved = saved_arguments(ckpt)
    flags = ("dataset",) if args.test_only else ("dataset", "image_size", "subset", "method")
    for flag in flags:
        if flag in saved and saved[flag] != getattr(args, flag):
            fix = f"leave --{flag} out" if saved[flag] is None else f"pass --{flag} {saved[flag]}"
            raise InputError(f"{path} was trained with --{flag} {saved[flag]}, not {getattr(args, flag)}; {fix}")
    weight = ckpt["classifier"].get("weight") if isinstance(ckpt["classifier"], dict) else None
    if not torch.is_tensor(weight) or tuple(weight.shape) != (num_classes, args.low_dim):
        shape = tuple(weight.shape) if torch.is_tensor(weight) else None
        raise InputError(f"{path} has a classifier of shape {shape}, not ({num_classes}, {args.low_dim}); "
                         "check --dataset and --low_dim")


def epoch_number(ckpt, path, key):
    """``ckpt[key]`` (where to continue) is an epoch number, an int >= 0; else one line (a corrupt file)."""
    value = ckpt.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{path}: {key!r} is {value!r}, not an epoch number (an integer >= 0): the file is "
                         "corrupt or written by another program; pass an intact checkpoint")
    return value


def labelled_indexes(indexes, path, targets, per_class):
    """A saved labelled draw: distinct integer indexes into the training split (``targets``, its labels),
    ``per_class`` of each class (the draw's --labels_per_class). Returns them as a list."""
    if not isinstance(indexes, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indexes):
        raise InputError(f"{path}: 'labelled_indexes' is not a list of integers; pass an intact checkpoint")
    targets = torch.as_tensor(targets)
    outside = [i for i in indexes if not 0 <= i < len(targets)]
    if outside:
        raise InputError(f"{path} holds labelled index {outside[0]}, outside the {len(targets)} training images "
                         "here; check --dataset and --subset")
    if len(set(indexes)) != len(indexes):
        twice = next(i for i in indexes if indexes.count(i) > 1)
        raise InputError(f"{path} holds labelled index {twice} twice: the file is corrupt; pass an intact "
                         "checkpoint")
    counts = torch.bincount(targets[list(indexes)], minlength=int(targets.max()) + 1).tolist()
    if any(count != per_class for count in counts):
        raise InputError(f"{path} holds {counts} labelled images per class, not {per_class} of each (its "
                         "--labels_per_class); check --dataset and --subset")
    return list(indexes)


def read_start(args):
    """``--resume``: read the file and check what needs no data: the network it holds, a trained classifier for
    --test_only, an encoder's data set and size. A ckpt_semi.t7 to continue gives the flags left out
    (``resume_arguments``). Returns (path, checkpoint, the arguments to use), (None, None, args) with
    --from_scratch."""
    if args.from_scratch == bool(args.resume):
        raise InputError("pass either --resume CKPT (a stage-1, stage-2 or semi.py checkpoint) or --from_scratch")
    if args.from_scratch and args.test_only:
        raise InputError("--test_only evaluates a trained classifier: pass --resume ckpt_semi.t7 (a semi.py "
                         "checkpoint) instead of --from_scratch")
    if args.from_scratch:
        return None, None, args
    path, ckpt = read_checkpoint(args.resume, args.model_dir)
    stage = checkpoint_stage(ckpt)
    if stage == 3 and not args.test_only:  # going on: --epochs may grow (the schedule does not depend on it)
        args = resume_arguments(args, ckpt, path, get_args_parser(), free=("epochs",))
    same_backbone(ckpt, path, args)
    if stage != 3 and args.test_only:
        raise InputError(f"{path} is {checkpoint_kind(ckpt)} with no trained classifier: pass a ckpt_semi.t7 "
                         f"to --test_only, or fine-tune this encoder with 'semi.py --resume {args.resume}' first")
    if stage != 3:
        note = encoder_start(ckpt, path, args, args.transfer)
        if note:
            print(note)
    return path, ckpt, args


def load_start(args, net, train_set, path, ckpt):
    """A stage-1 or stage-2 file initializes the encoder (a new run); a ckpt_semi.t7, checked against the
    training split, continues, or with --test_only is evaluated. Returns (path, checkpoint of a run to
    continue or evaluate, or None)."""
    if ckpt is None:
        return None, None
    if checkpoint_stage(ckpt) != 3:
        load_network(net.encoder, ckpt["net"], path)
        return None, None  # an encoder to start from: a new run
    semi_checkpoint(ckpt, path, args, train_set.num_classes)
    if not args.test_only:
        require_keys(ckpt, path, TRAINING_KEYS + (("teacher",) if args.method == "mean_teacher" else ()))
        epoch_number(ckpt, path, "next_epoch")
        per_class = ckpt["args"].get("labels_per_class", args.labels_per_class)
        labelled_indexes(ckpt["labelled_indexes"], path, train_set.targets, per_class)
    load_network(net.encoder, ckpt["net"], path)
    net.classifier.load_state_dict(ckpt["classifier"])
    return path, ckpt


def load_teacher(teacher, ckpt, path):
    """Mean Teacher's saved teacher into ``teacher`` (a copy of the student); one line if it does not fit."""
    saved = ckpt["teacher"]
    own = teacher.state_dict()
    if not isinstance(saved, dict) or saved.keys() != own.keys() or any(
            not torch.is_tensor(saved[k]) or saved[k].shape != own[k].shape for k in own):
        raise InputError(f"{path} holds a teacher that is not this network's; pass an intact checkpoint")
    teacher.load_state_dict(saved)


def training_loaders(args, train_set, labelled, device):
    """The loader of the ``labelled`` images of ``train_set``, weakly augmented (the data set's variant),
    and for the semi-supervised methods the loader of the other training images; both give two views of
    each image there (the consistency loss compares them), one for the supervised method."""
    if len(labelled) < args.batch_size:
        raise InputError(f"{len(labelled)} labelled images, fewer than --batch_size {args.batch_size}")
    weak = copy.copy(train_set)  # the same images, another transform
    weak.transform = weak_augmentation(args.image_size, train_set.mean, train_set.std,
                                       datasets.DATASETS[args.dataset].augmentation)
    if args.method == "supervised":
        return datasets.make_loader(torch.utils.data.Subset(weak, labelled), args.batch_size, True, args.workers,
                                    device, seed=args.seed), None
    weak.views = 2
    chosen = set(labelled)
    rest = [i for i in range(len(train_set)) if i not in chosen]  # (N - M,) the unlabelled rest
    batch = args.unlabelled_batch_size or args.batch_size
    if len(rest) < batch:
        raise InputError(f"{len(rest)} unlabelled training images, fewer than --unlabelled_batch_size {batch}")
    return (datasets.make_loader(torch.utils.data.Subset(weak, labelled), args.batch_size, True, args.workers,
                                 device, seed=args.seed),
            datasets.make_loader(torch.utils.data.Subset(weak, rest), batch, True, args.workers, device,
                                 seed=args.seed))


def default_max_weight(method, labelled, images):
    """w_max when --consistency_weight is not given: the Π-model's 100 · M/N (Laine & Aila 2017, M labelled of
    N training images), Mean Teacher's 100 (its released code); 0 for the supervised method."""
    return {"supervised": 0.0, "pi_model": 100.0 * labelled / images, "mean_teacher": 100.0}[method]


def main(args):
    if args.gpu_augment:
        raise InputError("--gpu_augment is the batched device augmentation of the two stages and joint.py; semi.py "
                         "augments its images in its loader: leave --gpu_augment out")
    device = open_script(args)
    path, ckpt, args = read_start(args)  # a run to continue: the flags left out are its own
    args = resolve_defaults(args)
    # --test_only at the size the file was trained at; the memory that size costs, before any data is read
    args = checks.check_image_size(args, ckpt, device, get_args_parser().get_default("image_size"))
    checks.folder_before_cache(args, labelled_for="few-label training", per_class=None if args.test_only else
                               args.labels_per_class, batch=None if args.test_only else args.batch_size)
    info = datasets.DATASETS[args.dataset]
    datasets.require_files(args, ["train", info.test_split])  # all there before any is read
    train_set, test_set = datasets.from_args(args, "train"), datasets.from_args(args, info.test_split or "train")
    if not train_set.has_labels:
        raise InputError(f"{args.dataset}: few-label training needs labelled images (sub-folders as classes)")
    encoder = NETWORKS[args.network](low_dim=args.low_dim, width=args.width)
    net = Classifier(encoder, args.low_dim, train_set.num_classes).to(device)
    path, ckpt = load_start(args, net, train_set, path, ckpt)
    test_loader = datasets.make_loader(test_set, 100, False, args.workers, device)
    if args.test_only:
        if "teacher" not in ckpt:
            print(f"test accuracy {test_accuracy(net, test_loader, device):.2f}%")
            return None
        teacher = copy.deepcopy(net)
        load_teacher(teacher, ckpt, path)
        print(f"test accuracy {test_accuracy(teacher, test_loader, device):.2f}% (the teacher; the student "
              f"{test_accuracy(net, test_loader, device):.2f}%)")
        return None
    labelled = ckpt["labelled_indexes"] if ckpt else draw_labelled(train_set.targets, args.labels_per_class,
                                                                   train_set.num_classes, args.seed)
    loader, unlabelled_loader = training_loaders(args, train_set, labelled, device)
    net, model = speed_options(net, args.channels_last, args.compile, args.sync_bn)
    teacher = None
    if args.method == "mean_teacher":  # starts as the student (the pretrained encoder), then its EMA
        teacher = copy.deepcopy(net).requires_grad_(False)
        if ckpt:
            load_teacher(teacher, ckpt, path)
    optimizer = sgd_optimizer(net, args.lr, args.momentum, args.weight_decay)
    start = ckpt["start"] if ckpt else ("scratch" if args.from_scratch else args.resume)
    max_weight = (args.consistency_weight if args.consistency_weight is not None
                  else default_max_weight(args.method, len(labelled), len(train_set)))
    state = FewLabel(net, model, optimizer, loader, test_loader, device, labelled, normalization(train_set), start,
                     accuracy=ckpt["acc"] if ckpt else None, unlabelled_loader=unlabelled_loader, teacher=teacher,
                     max_weight=max_weight)
    with open_run(args.model_dir, CKPT, LOG, other_files=[INDEXES], resumed=path, ckpt=ckpt,
                  position=lambda r: r["epoch"], optimizer=optimizer, args=args, now=get_args_parser().now) as run:
        for epoch in range(ckpt["next_epoch"] if ckpt else 0, args.epochs):
            train_and_save(run, state, epoch, args)
        export_indexes(args.model_dir, labelled)  # a kill came between the last save and the export
        summary = {"test_acc": state.accuracy, "labelled": len(labelled), "labels_per_class": len(labelled) //
                   train_set.num_classes, "start": start, "epochs": args.epochs, "dataset": args.dataset}
        if args.method != "supervised":
            summary["method"] = args.method
        if distributed.is_main():
            with atomic_file(os.path.join(args.model_dir, SEMI_EVAL)) as f:
                json.dump(summary, f, indent=1)
    return summary


def train_and_save(run, state, epoch, args):
    """One epoch: train, test, checkpoint, log; returns the log record. Mean Teacher reports its teacher's
    accuracy (Tarvainen & Valpola 2017) and logs the student's beside it."""
    start = time.time()
    lr = semi_lr(epoch, args.lr, args.lr_decay_start, args.lr_decay_every)
    set_lr(state.optimizer, lr)
    distributed.start_epoch(state.train_loader, args.seed, epoch)
    if state.unlabelled_loader is not None:
        distributed.start_epoch(state.unlabelled_loader, args.seed, epoch)
    losses = train_epoch(state, epoch, args)
    extra = {}
    if state.teacher is not None:
        extra["student_acc"] = test_accuracy(state.net, state.test_loader, state.device)
        state.accuracy = test_accuracy(state.teacher, state.test_loader, state.device)
    else:
        state.accuracy = test_accuracy(state.net, state.test_loader, state.device)
    record = {"epoch": epoch, "lr": lr, **losses, "test_acc": state.accuracy, **extra,
              "seconds": time.time() - start}
    teacher = {} if state.teacher is None else {"teacher": state.teacher.state_dict()}
    run.save({"net": state.net.encoder.state_dict(), "classifier": state.net.classifier.state_dict(), "stage": 3,
              "epoch": epoch, "acc": state.accuracy, "labelled_indexes": state.labelled,
              "normalization": state.normalization, "start": state.start, **teacher,
              **training_state(state.optimizer, args, record, next_epoch=epoch + 1)})
    export_indexes(args.model_dir, state.labelled)
    run.log.append(record)
    student = "" if state.teacher is None else f" (the teacher; the student {extra['student_acc']:.2f}%)"
    print(f"epoch {epoch} lr {lr:.4g} loss {losses['loss']:.4f} test accuracy {state.accuracy:.2f}%{student} "
          f"{record['seconds']:.1f}s")
    return record


def export_indexes(model_dir, labelled):
    """labelled_indexes.json, the list the checkpoint holds, written once the first checkpoint is (a run killed
    before it leaves no file that would stop the same command again); rank 0 writes it."""
    path = os.path.join(model_dir, INDEXES)
    if distributed.is_main() and not os.path.exists(path):
        with atomic_file(path) as f:
            json.dump(labelled, f)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
