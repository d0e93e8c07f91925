"""A split of a data set as an ``ImageDataset``: ``build_dataset`` from explicit values, ``from_args``
from a script's flags."""
import hashlib
import math
import os

import numpy as np

from engine.files import CACHE
from lib.errors import InputError

from . import processes
from .images import ImageDataset
from .registry import lookup
from .transforms import for_views


def build_dataset(name, data_dir, split, views=1, transform=None, subset=None, image_size=32, num_classes=None,
                  cache_dir=None, normalization=None):
    """The images and labels of ``split`` of data set ``name`` as an ``ImageDataset``.

    split: raw split names joined by "+", in that order ("train", "test", "train+unlabeled", ...).
    For ``folder``, ``data_dir`` is the image folder itself and its only split is "train".
    subset: keep the first N images. image_size: the side of the transformed images (and of a
    folder's cached images). num_classes: only an unlabelled folder needs it (K >= 2); for any
    other data set, a value that differs from its class count is an error. cache_dir: where a
    folder's decoded images (default: DIR/.cache) and STL-10's normalization (when its data
    folder is read-only) are cached. normalization: {"mean": 3 values, "std": 3 values} used instead
    of the data set's own statistics (the dataset's mean and std, and its default transform).
    ``transform`` defaults to the training augmentation when ``views == 2`` and to the evaluation
    transform otherwise.
    """
    entry = lookup(name)
    if subset is not None and subset < 1:
        raise InputError(f"--subset must be a positive number of images, not {subset}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise InputError(f"--image_size must be a positive number of pixels, not {image_size}")
    given = None if normalization is None else _normalization(normalization)
    parts = entry.parts(split)
    if entry.num_classes is not None and num_classes is not None and num_classes != entry.num_classes:
        raise InputError(f"--num_classes {num_classes} contradicts {name}, which has {entry.num_classes} "
                         f"classes; leave it out")
    images = entry.read(data_dir, parts, image_size=image_size, cache_dir=cache_dir, num_classes=num_classes)
    data, targets, paths = images.data, images.targets, images.paths
    class_names = images.class_names if images.class_names is not None else entry.class_names
    num_classes = images.num_classes if images.num_classes is not None else entry.num_classes
    if given is not None:
        mean, std = given
    elif images.mean is not None:
        mean, std = images.mean, images.std
    elif entry.mean is not None:
        mean, std = entry.mean, entry.std
    else:  # STL-10: computed over its training images, whichever split is asked for
        mean, std = entry.normalization(data_dir, cache_dir)
    if subset is not None:
        data, targets = data[:subset], targets[:subset]
        paths = None if paths is None else paths[:subset]
    if type(data) is np.ndarray:
        data = np.ascontiguousarray(data)
    if transform is None:
        transform = for_views(views, mean, std, image_size, entry.augmentation)
    return ImageDataset(data, targets, transform, views, num_classes=num_classes, class_names=class_names, mean=mean,
                        std=std, paths=paths, image_size=int(image_size))


def _normalization(given):
    """{"mean": 3 values, "std": 3 positive values} as two 3-tuples of floats, or one clear line."""
    try:
        mean, std = tuple(float(v) for v in given["mean"]), tuple(float(v) for v in given["std"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"a normalization is {{'mean': 3 values, 'std': 3 values}}, not {given!r}") from None
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise InputError(f"a normalization has 3 finite means and 3 positive stds, not {given!r}")
    return mean, std


def cache_dir_of(model_dir, data_dir):
    """Where a run folder caches what it derives from ``data_dir``: one folder per data folder, so that a
    run folder can hold several (its training images, new images to predict)."""
    tag = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:10]
    return os.path.join(model_dir, CACHE, f"{os.path.basename(os.path.abspath(data_dir))}-{tag}")


def require_files(args, splits):
    """The files of every split a script reads (``splits``, None left out), present before the first is read,
    so that a missing one is refused before anything derived from another is written (SVHN's normalization)."""
    if args.dataset == "svhn":
        from .sources import svhn_files
        entry = lookup(args.dataset)
        svhn_files(args.data_dir, [part for split in splits if split for part in entry.parts(split)])


def from_args(args, split, views=1, *, num_classes=None, normalization=None):
    """``build_dataset`` with a script's flags: --dataset, --data_dir, --subset, --image_size, --num_classes;
    a folder's decoded images are cached in <model_dir>/cache. ``args`` is only read.

    num_classes: used instead of ``args.num_classes`` (an unlabelled folder's cluster count, taken from a
    checkpoint's heads). normalization: {"mean", "std"} used instead of the data set's own statistics, in
    the data set's mean and std and in its transform (a checkpoint's normalization for new images).
    Under torchrun rank 0 reads first (a download or a cache is written once), then the other ranks.
    """
    cache_dir = cache_dir_of(args.model_dir, args.data_dir) if args.model_dir else None
    classes = args.num_classes if num_classes is None else num_classes
    return processes.main_first(lambda: build_dataset(
        args.dataset, args.data_dir, split, views=views, subset=args.subset, image_size=args.image_size,
        num_classes=classes, cache_dir=cache_dir, normalization=normalization))
