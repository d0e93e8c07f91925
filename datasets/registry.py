"""The data sets: one ``DatasetInfo`` entry each in ``DATASETS``, holding its reader and its facts.

Adding a data set:
1. Write its reader, ``read(data_dir, part) -> (uint8 images (N, H, W, 3), int64 labels (N,), -1 = none)``,
   in datasets/sources.py (or a module of its own, as datasets/stl10.py).
2. Add one ``DatasetInfo`` to ``DATASETS`` below: name, class count, mean and std (or a ``normalization``
   function computing them), class names, the raw ``splits`` its reader takes, which of them each stage uses,
   and ``augmentation="affine"`` where a horizontal flip would change an image's class.
3. If it shows another data set's images under other labels (cifar20: CIFAR-100's), set ``images_of``.
4. Add tests beside tests/test_sources.py's: the reader on tiny synthetic files, never a download.
5. Describe it, with its source, in docs/method.md ("Data sets"); the scripts' --dataset lists it by itself.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np

from lib.errors import InputError

from . import folder, sources, stl10
from .arrays import ConcatImages


@dataclass(frozen=True)
class Images:
    """What a reader gives for the parts asked for: images (N, H, W, 3) uint8 (in memory or mapped from
    disk) and int64 targets (-1 = no label); a folder also gives its files, class names, class count and
    the statistics of its images (None: the data set's own entry says)."""
    data: object
    targets: np.ndarray
    paths: Optional[list] = None
    class_names: Optional[tuple] = None
    num_classes: Optional[int] = None
    mean: Optional[tuple] = None
    std: Optional[tuple] = None


class PartReader:
    """A reader of whole raw splits, ``read(data_dir, part) -> (images, labels)``, as the reader of one or
    more parts joined in order: ``PartReader(read)(data_dir, parts, **options) -> Images``."""

    def __init__(self, read):
        self.read = read

    def __call__(self, data_dir, parts, **options):
        read = [self.read(data_dir, part) for part in parts]
        return Images(_concatenate([images for images, _ in read]), np.concatenate([labels for _, labels in read]))

    def __repr__(self):
        return f"PartReader({self.read!r})"


def _concatenate(arrays):
    if len(arrays) == 1:
        return arrays[0]
    if all(type(a) is np.ndarray for a in arrays):
        return np.concatenate(arrays)
    return ConcatImages(arrays)  # parts mapped from disk stay there


def read_folder(data_dir, parts, *, image_size=32, cache_dir=None, num_classes=None):
    """An image folder (datasets/folder.py): ``data_dir`` is the folder itself, "train" its only part."""
    images = folder.load(data_dir, int(image_size), cache_dir, num_classes)
    return Images(images.data, images.targets, images.paths, images.class_names, images.num_classes, images.mean,
                  images.std)


@dataclass(frozen=True)
class DatasetInfo:
    """One data set: how to read it and what a script needs to know about it.

    num_classes: None for ``folder`` (its sub-folders, or the caller's K for unlabelled images).
    mean, std: per-channel normalization on the [0, 1] scale; None when computed from the images
    (``normalization(data_dir, cache_dir) -> (mean, std)`` for STL-10; a folder's reader gives them).
    class_names: None for ``folder``. embed_split: the images stage 1 learns from; cluster_split:
    stage 2's images, which its clustering metrics are computed on; test_split: the held-out images of
    the kNN monitor, None when there are none. Splits are raw split names joined by "+".
    read: ``read(data_dir, parts, *, image_size, cache_dir, num_classes) -> Images``; splits: the raw
    split names it takes. images_of: the data set whose images these are, under other labels (an encoder
    trained on one is an encoder of the other); None when the images are its own. augmentation: the
    training augmentation's variant (datasets/transforms.py): "flip", or "affine" where a mirror image
    changes the class (SVHN's digits); every script's two-view transform follows it.
    """
    name: str
    num_classes: Optional[int]
    mean: Optional[tuple]
    std: Optional[tuple]
    class_names: Optional[tuple]
    embed_split: str = "train"
    cluster_split: str = "train"
    test_split: Optional[str] = "test"
    read: Optional[Callable] = None
    splits: tuple = ("train", "test")
    images_of: Optional[str] = None
    normalization: Optional[Callable] = None
    augmentation: str = "flip"
    sizes: Optional[dict] = None  # images per raw split at full size (experiments/paper.py's cost estimate)

    def parts(self, split):
        """The raw split names of ``split`` ("train+unlabeled" -> ["train", "unlabeled"]), checked."""
        parts = str(split).split("+")
        for part in parts:
            if part not in self.splits:
                if part == "test" and self.test_split is None:
                    raise InputError(f"{self.name} has no test split: all its images are training images")
                raise InputError(f"{self.name} has no split {part!r}; its splits are {', '.join(self.splits)} "
                                 f"(join them with '+')")
        if len(set(parts)) != len(parts):
            raise InputError(f"split {split!r} names a part twice")
        return parts


CIFAR_SIZES = {"train": 50_000, "test": 10_000}
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)
DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                           sources.CIFAR10_CLASSES, read=PartReader(sources.cifar10), sizes=CIFAR_SIZES),
    "cifar100": DatasetInfo("cifar100", 100, CIFAR100_MEAN, CIFAR100_STD, sources.CIFAR100_CLASSES,
                            read=PartReader(sources.cifar100), sizes=CIFAR_SIZES),
    # CIFAR-100's images under their 20 superclass labels
    "cifar20": DatasetInfo("cifar20", 20, CIFAR100_MEAN, CIFAR100_STD, sources.CIFAR20_CLASSES,
                           read=PartReader(partial(sources.cifar100, coarse=True)), images_of="cifar100",
                           sizes=CIFAR_SIZES),
    # the paper's protocol: stage 1 on the 105,000 train + unlabeled images, stage 2 on the 13,000 labelled;
    # the normalization is computed over the training images (train + unlabeled), whichever split is read
    "stl10": DatasetInfo("stl10", 10, None, None, sources.STL10_CLASSES, embed_split="train+unlabeled",
                         cluster_split="train+test", read=PartReader(stl10.read),
                         splits=("train", "test", "unlabeled"), normalization=stl10.normalization,
                         sizes={"train": 5_000, "test": 8_000, "unlabeled": 100_000}),
    # the official train_32x32.mat / test_32x32.mat ("extra" unused); normalization computed over the training
    # images on first use; an affine transform in the flip's place (a mirrored digit is not that digit)
    "svhn": DatasetInfo("svhn", 10, None, None, sources.SVHN_CLASSES, read=PartReader(sources.svhn),
                        normalization=sources.svhn_normalization, augmentation="affine",
                        sizes={"train": 73_257, "test": 26_032}),
    # computed over the padded 32x32 training images (tests/test_sources.py recomputes them)
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (0.2190,) * 3, (0.3318,) * 3, sources.FASHION_MNIST_CLASSES,
                                 read=PartReader(sources.fashion_mnist), sizes={"train": 60_000, "test": 10_000}),
    # computed over the 1,497 upsampled training images (tests/test_sources.py recomputes them)
    "digits": DatasetInfo("digits", 10, (0.3054,) * 3, (0.3221,) * 3, sources.DIGITS_CLASSES,
                          read=PartReader(sources.digits),
                          sizes={"train": sources.DIGITS_TRAIN, "test": sources.DIGITS - sources.DIGITS_TRAIN}),
    # a folder has one split: every image is a training image (no held-out test images)
    "folder": DatasetInfo("folder", None, None, None, None, test_split=None, read=read_folder, splits=("train",)),
}


def lookup(name):
    """``DATASETS[name]``, or one clear line naming the data sets there are."""
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def same_images(a, b):
    """True when data sets ``a`` and ``b`` show the same images (the same name, or cifar20 and cifar100):
    an encoder trained on one is an encoder of the other. A name not in DATASETS matches only itself."""
    def images(name):
        entry = DATASETS.get(name)
        return name if entry is None or entry.images_of is None else entry.images_of
    return a == b or images(a) == images(b)
