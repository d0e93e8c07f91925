"""Data: each data set's description, its images and labels as an ``ImageDataset``, transforms and loaders.

``DATASETS[name]`` describes a data set (``DatasetInfo``): its classes, normalization and which
splits each stage uses (docs/method.md, "Data sets"). ``build_dataset`` reads a split: uint8 images
(N, H, W, 3), in memory or mapped from disk, and int64 targets (-1 = no label). Items and batches
are dicts: ``views=2`` gives {"view1", "view2", "target", "index"} (two independent draws of the
training augmentation, docs/method.md, "Data and augmentation"), ``views=1`` gives
{"image", "target", "index"} through the evaluation transform.
"""
import hashlib
import os
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from engine import distributed
from lib.errors import InputError

from . import folder, sources, stl10
from .arrays import ConcatImages
from .sharding import ShardSampler


@dataclass(frozen=True)
class DatasetInfo:
    """What a script needs to know about a data set before reading it.

    num_classes: None for ``folder`` (its sub-folders, or the caller's K for unlabelled images).
    mean, std: per-channel normalization on the [0, 1] scale; None when computed from the images
    (STL-10's training images, a folder's images). class_names: None for ``folder``.
    embed_split: the images stage 1 learns from; cluster_split: stage 2's images, which its
    clustering metrics are computed on; test_split: the held-out images of the kNN monitor, None
    when there are none. Splits are raw split names joined by "+".
    """
    name: str
    num_classes: Optional[int]
    mean: Optional[tuple]
    std: Optional[tuple]
    class_names: Optional[tuple]
    embed_split: str = "train"
    cluster_split: str = "train"
    test_split: Optional[str] = "test"


CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)
DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                           sources.CIFAR10_CLASSES),
    "cifar100": DatasetInfo("cifar100", 100, CIFAR100_MEAN, CIFAR100_STD, sources.CIFAR100_CLASSES),
    "cifar20": DatasetInfo("cifar20", 20, CIFAR100_MEAN, CIFAR100_STD, sources.CIFAR20_CLASSES),
    # the paper's protocol: stage 1 on the 105,000 train + unlabeled images, stage 2 on the 13,000 labelled
    "stl10": DatasetInfo("stl10", 10, None, None, sources.STL10_CLASSES,
                         embed_split="train+unlabeled", cluster_split="train+test"),
    # computed over the padded 32x32 training images (tests/test_datasets.py recomputes them)
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (0.2190,) * 3, (0.3318,) * 3, sources.FASHION_MNIST_CLASSES),
    # computed over the 1,497 upsampled training images (tests/test_datasets.py recomputes them)
    "digits": DatasetInfo("digits", 10, (0.3054,) * 3, (0.3221,) * 3, sources.DIGITS_CLASSES),
    # a folder has one split: every image is a training image (no held-out test images)
    "folder": DatasetInfo("folder", None, None, None, None, test_split=None),
}

# name -> raw split name -> reader(data_dir, part) giving (uint8 images, int64 labels)
_READERS = {
    "cifar10": dict.fromkeys(("train", "test"), sources.cifar10),
    "cifar100": dict.fromkeys(("train", "test"), sources.cifar100),
    "cifar20": dict.fromkeys(("train", "test"), partial(sources.cifar100, coarse=True)),
    "stl10": dict.fromkeys(("train", "test", "unlabeled"), stl10.read),
    "fashion-mnist": dict.fromkeys(("train", "test"), sources.fashion_mnist),
    "digits": dict.fromkeys(("train", "test"), sources.digits),
}


def train_transform(mean, std, image_size=32):
    """The training augmentation, drawn independently for each view (docs/method.md, "Data and augmentation")."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(mean, std, image_size=32):
    """The evaluation transform: shorter side to image_size, central square, ToTensor, Normalize."""
    return transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
        transforms.Normalize(mean, std)])


class ImageDataset(Dataset):
    """uint8 images (N, H, W, 3) and their targets; ``views=2`` gives two independent augmentations of each.

    data: a numpy array, or an array-like mapped from disk (``datasets.arrays``: indexing reads
    only the images asked for; ``np.asarray(data)`` reads all). targets: (N,) long, -1 = no label.
    mean, std: the normalization the transforms use. paths: each image's file (``folder`` only).
    image_size: the side of the images the transforms give.
    """

    def __init__(self, data, targets, transform, views=1, *, num_classes=None, class_names=None, mean=None,
                 std=None, paths=None, image_size=32):
        self.data = data
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.transform = transform
        self.views = views
        self.num_classes = num_classes
        self.class_names = None if class_names is None else list(class_names)
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.paths = paths
        self.image_size = image_size

    @property
    def has_labels(self):
        """True when every image has a label (no target is -1)."""
        return bool((self.targets >= 0).all())

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image = Image.fromarray(np.ascontiguousarray(self.data[index]))  # (H, W, 3) uint8
        target = int(self.targets[index])
        if self.views == 2:
            return {"view1": self.transform(image), "view2": self.transform(image), "target": target, "index": index}
        return {"image": self.transform(image), "target": target, "index": index}


def _concatenate(arrays):
    if len(arrays) == 1:
        return arrays[0]
    if all(type(a) is np.ndarray for a in arrays):
        return np.concatenate(arrays)
    return ConcatImages(arrays)  # parts mapped from disk stay there


def _parts(name, split):
    """The raw split names of ``split`` ("train+unlabeled" -> ["train", "unlabeled"]), checked."""
    parts = str(split).split("+")
    known = ("train",) if name == "folder" else tuple(_READERS[name])
    for part in parts:
        if part not in known:
            if name == "folder" and part == "test":
                raise InputError("an image folder has no test split: all its images are training images")
            raise InputError(f"{name} has no split {part!r}; its splits are {', '.join(known)} (join them with '+')")
    if len(set(parts)) != len(parts):
        raise InputError(f"split {split!r} names a part twice")
    return parts


def build_dataset(name, data_dir, split, views=1, transform=None, subset=None, image_size=32, num_classes=None,
                  cache_dir=None):
    """The images and labels of ``split`` of data set ``name`` as an ``ImageDataset``.

    split: raw split names joined by "+", in that order ("train", "test", "train+unlabeled", ...).
    For ``folder``, ``data_dir`` is the image folder itself and its only split is "train".
    subset: keep the first N images. image_size: the side of the transformed images (and of a
    folder's cached images). num_classes: only an unlabelled folder needs it (K >= 2); for any
    other data set, a value that differs from its class count is an error. cache_dir: where a
    folder's decoded images (default: DIR/.cache) and STL-10's normalization (when its data
    folder is read-only) are cached. ``transform`` defaults to the training augmentation when
    ``views == 2`` and to the evaluation transform otherwise.
    """
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if subset is not None and subset < 1:
        raise InputError(f"--subset must be a positive number of images, not {subset}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise InputError(f"--image_size must be a positive number of pixels, not {image_size}")
    info = DATASETS[name]
    parts = _parts(name, split)
    paths = None
    if name == "folder":
        images = folder.load(data_dir, int(image_size), cache_dir, num_classes)
        data, targets, paths = images.data, images.targets, images.paths
        class_names, num_classes, mean, std = images.class_names, images.num_classes, images.mean, images.std
    else:
        if num_classes is not None and num_classes != info.num_classes:
            raise InputError(f"--num_classes {num_classes} contradicts {name}, which has {info.num_classes} "
                             f"classes; leave it out")
        read = [_READERS[name][part](data_dir, part) for part in parts]
        data = _concatenate([images for images, _ in read])
        targets = np.concatenate([labels for _, labels in read])
        class_names, num_classes = info.class_names, info.num_classes
        if info.mean is not None:
            mean, std = info.mean, info.std
        else:  # STL-10: computed over its training images, whichever split is asked for
            mean, std = stl10.normalization(data_dir, cache_dir)
    if subset is not None:
        data, targets = data[:subset], targets[:subset]
        paths = None if paths is None else paths[:subset]
    if type(data) is np.ndarray:
        data = np.ascontiguousarray(data)
    if transform is None:
        transform = train_transform(mean, std, image_size) if views == 2 else eval_transform(mean, std, image_size)
    return ImageDataset(data, targets, transform, views, num_classes=num_classes, class_names=class_names, mean=mean,
                        std=std, paths=paths, image_size=int(image_size))


def make_loader(dataset, batch_size, train, workers, device, seed=0):
    """Training loaders shuffle and drop the last partial batch (released); evaluation keeps order.

    Batches are the items' dicts with each entry stacked: {"view1", "view2", "target", "index"} or
    {"image", "target", "index"}, tensors on the host (pinned for CUDA). Under torchrun with P processes a
    training loader's ``batch_size`` is the global batch: this process takes batch_size / P images of
    each step from one shuffle shared by all, drawn from ``seed`` and the epoch (datasets/sharding.py).
    """
    sampler = _shard_sampler(len(dataset), batch_size, seed) if train else None
    if sampler is not None:
        batch_size = distributed.split_batch(batch_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, drop_last=train,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)


def make_train_loader(dataset, args, device):
    """The two-view training loader: torchvision transforms in ``args.workers`` processes, or with
    ``args.gpu_augment`` the same augmentations on whole batches on ``device`` (datasets/gpu_augment.py),
    yielding the same dict keys with the tensors already on ``device``. ``args.batch_size`` is the global
    batch (split over the processes of a torchrun launch)."""
    seed = getattr(args, "seed", 0)
    if not getattr(args, "gpu_augment", False):
        return make_loader(dataset, args.batch_size, True, args.workers, device, seed=seed)
    from .gpu_augment import GpuTwoViewLoader
    return GpuTwoViewLoader(dataset.data, dataset.targets, distributed.split_batch(args.batch_size), dataset.mean,
                            dataset.std, device, size=dataset.image_size,
                            sampler=_shard_sampler(len(dataset), args.batch_size, seed))


def _shard_sampler(num_samples, batch_size, seed):
    """This process's share of every step (datasets/sharding.py) under torchrun; None for one process."""
    if distributed.world_size() == 1:
        return None
    return ShardSampler(num_samples, batch_size, distributed.rank(), distributed.world_size(), seed)


def from_args(args, split, views=1):
    """``build_dataset`` with a script's flags: --dataset, --data_dir, --subset, --image_size, --num_classes;
    a folder's decoded images are cached in <model_dir>/cache."""
    cache_dir = None
    if args.model_dir:  # one cache per image folder, so a run folder can hold several (training, new images)
        tag = hashlib.sha1(os.path.abspath(args.data_dir).encode()).hexdigest()[:10]
        cache_dir = os.path.join(args.model_dir, "cache", f"{os.path.basename(os.path.abspath(args.data_dir))}-{tag}")
    # several processes: rank 0 downloads or caches first, the others then read what it wrote
    return distributed.main_first(lambda: build_dataset(
        args.dataset, args.data_dir, split, views=views, subset=args.subset, image_size=args.image_size,
        num_classes=args.num_classes, cache_dir=cache_dir))
