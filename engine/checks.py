"""The input size an evaluation uses (the one the file was trained at) and the memory a size costs, checked
before any data or network is allocated; what an image folder's file names decide, before its images are
decoded."""
import argparse
import contextlib
import io
import os

import torch

import datasets
from lib.errors import InputError

# ---- the input size: the one a file was trained at, and what a size costs in memory ----


def evaluation_image_size(args, ckpt, default):
    """--test_only (and tools/gradcam.py): evaluate at the size ``ckpt`` was trained at (its ``args``), unless
    --image_size was given, i.e. differs from the flag's ``default``; then say so in one line when the sizes
    differ. Returns the arguments to use: ``args`` itself, or a copy with the trained size (``args`` is
    left alone); a file without ``args`` (released) keeps the flag."""
    trained = (ckpt.get("args") or {}).get("image_size")
    if trained is None or trained == args.image_size:
        return args
    if args.image_size == default:
        return argparse.Namespace(**{**vars(args), "image_size": trained})
    print(f"evaluating at {args.image_size} px, trained at {trained} px")
    return args


def check_image_size(args, ckpt, device, default):
    """Before any data is read: with --test_only the size ``ckpt`` was trained at (``evaluation_image_size``;
    ``default``: the --image_size parser default), then the memory that size costs (``check_memory``).
    Returns the arguments to use (``args``, or a copy with the trained size)."""
    if args.test_only and ckpt is not None:
        args = evaluation_image_size(args, ckpt, default)
    check_memory(args, device, train=not args.test_only)
    return args


# each backbone: (float32 values its forward pass keeps for the backward per input pixel and unit of --width,
# summed over its blocks' conv, BN and activation outputs at their downsampled sizes; its trunks)
ACTIVATIONS = {"resnet18": (51, 2), "resnet101": (406.5, 2), "wrn28_2": (24.75, 1)}


def activation_bytes(network, width, size, images, train=True, value_bytes=4):
    """A rough size of one step's activations: ``images`` inputs of size x size through ``network`` of
    --width (``value_bytes`` a value: 4 in float32, 2 under --amp's bfloat16). Training keeps every map for
    the backward pass (ACTIVATIONS); evaluation (no gradients) holds about three of the largest maps per
    trunk at a time. Between 1 and 1.5 times the tensors autograd saves (tests/test_input_checks.py), the
    rest standing for the backward pass's gradients."""
    per_pixel, trunks = ACTIVATIONS.get(network, ACTIVATIONS["resnet18"])
    return int(value_bytes * images * (per_pixel if train else 3 * trunks) * width * size * size)


def count_files(folder):
    """The files under ``folder`` (names only; hidden files and folders left out, links to folders not
    followed): at least the number of images a folder decodes."""
    count = 0
    for _, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        count += sum(not n.startswith(".") for n in names)
    return count


def memory_estimate(args, train=True):
    """What --image_size costs before anything is allocated, in bytes: {"data": a folder's images decoded at
    that size (files x size² x 3, uint8; the registered data sets keep their own size and resize each image
    as it is read), "batches": the loader's float32 batches in flight (two per worker, one without workers),
    "activations": ``activation_bytes`` of one step (bfloat16 under --amp)}. Training: --batch_size x 2
    views, shared by the processes of a torchrun launch; evaluation: batches of 100, one view."""
    size = args.image_size
    images = args.batch_size * 2 // datasets.processes.world_size() if train else 100
    files = count_files(args.data_dir) if args.dataset == "folder" and os.path.isdir(args.data_dir) else 0
    in_flight = 2 * args.workers if args.workers else 1
    return {"data": files * size * size * 3, "batches": in_flight * images * 3 * size * size * 4,
            "activations": activation_bytes(args.network, args.width, size, images, train,
                                            value_bytes=2 if getattr(args, "amp", False) else 4)}


def available_memory():
    """MemAvailable of /proc/meminfo, in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n):
    return f"{n / 2**30:.1f} GiB"


def check_memory(args, device, train=True):
    """Refuse, before any data or network is allocated, an --image_size whose ``memory_estimate`` exceeds the
    free memory: host memory (MemAvailable) for the data, the batches and, on the CPU, the activations; the
    device's free memory (``torch.cuda.mem_get_info``) for the activations on CUDA."""
    need = memory_estimate(args, train)
    on_cuda = device.type == "cuda"
    host = need["data"] + need["batches"] + (0 if on_cuda else need["activations"])
    places = [("host", host, available_memory())]
    if on_cuda:
        places.append((str(device), need["activations"], torch.cuda.mem_get_info(device)[0]))
    for place, estimate, free in places:
        if free is not None and estimate > free:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in need.items() if v)
            raise InputError(f"--image_size {args.image_size} needs about {_gib(estimate)} of {place} memory "
                             f"({parts}; {args.network}, width {args.width}) but {_gib(free)} is free; lower "
                             f"--image_size or --batch_size")


# ---- an image folder: what its file names decide, before its images are decoded into a cache ----

def folder_before_cache(args, labelled_for=None, per_class=None, batch=None, clustering=False, num_classes=None):
    """--dataset folder, before anything is written (the cache in --model_dir): the folder's files and class
    sub-folders (``datasets.folder.scan``, names only, after --subset) hold what the run needs: labels
    (``labelled_for``: what needs them), ``per_class`` files of each class (and ``batch`` of them in all),
    and where clusters are made of an unlabelled folder (``clustering``), 2 <= K <= its files (K: ``num_classes``,
    else --num_classes).
    Files that turn out not to be images are found when decoded: the decoded folder is checked again after."""
    if args.dataset != "folder" or not os.path.isdir(args.data_dir):
        return
    with contextlib.redirect_stderr(io.StringIO()):  # its warnings are printed once, when the folder is read
        files, targets, class_names = datasets.folder.scan(
            args.data_dir, skip=datasets.build.cache_dir_of(args.model_dir, args.data_dir))
    files, targets = files[:args.subset], targets[:args.subset]
    if labelled_for and class_names is None:
        raise InputError(f"{labelled_for} needs labelled images (sub-folders as classes); {args.data_dir} is a flat "
                         "folder")
    if per_class and class_names is not None:
        counts = torch.bincount(torch.as_tensor(targets), minlength=len(class_names)).tolist()
        short = [(name, n) for name, n in zip(class_names, counts) if n < per_class]
        if short:
            raise InputError(f"--labels_per_class {per_class}: the class {datasets.folder.printable(short[0][0])!r} "
                             f"of {args.data_dir} has only {short[0][1]} files; lower --labels_per_class")
        if batch and per_class * len(class_names) < batch:
            raise InputError(f"{per_class * len(class_names)} labelled images, fewer than --batch_size {batch}; "
                             "raise --labels_per_class or lower --batch_size")
    if clustering and class_names is None:
        count = args.num_classes if num_classes is None else num_classes
        datasets.folder.check_cluster_count(count, len(files), args.data_dir)
