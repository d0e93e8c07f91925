"""STL-10 (Coates, Ng and Lee, 2011) from its official binary files, mapped from disk, not read.

``<data_dir>/stl10_binary/`` holds train_X.bin (5,000 images), train_y.bin, test_X.bin (8,000),
test_y.bin and unlabeled_X.bin (100,000). Each image is 3 x 96 x 96 uint8, every channel stored
column by column: the file reads as (N, 3, 96, 96) with the second 96 running down a column,
so axes (0, 3, 2, 1) give (N, 96, 96, 3) upright images (what torchvision's STL10 shows). Labels
are 1..10 on disk and 0..9 here; unlabelled images get the target -1. Missing files are
downloaded through torchvision (``STL10(download=True)``, a 2.6 GB archive).

The paper's protocol (docs/method.md, "Data sets"): stage 1 learns on train+unlabeled (105,000
images), stage 2 and its evaluation use the 13,000 labelled images (train+test).
"""
import os
import urllib.error

import numpy as np

from lib.errors import InputError

from .arrays import ConcatImages, MappedImages, cached_normalization
from .sources import no_new_folders_on_error

FOLDER = "stl10_binary"
IMAGE_SHAPE = (3, 96, 96)  # as stored: channel, column, row
IMAGE_BYTES = 3 * 96 * 96
FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
         "unlabeled": ("unlabeled_X.bin", None)}
TRAINING_PARTS = ("train", "unlabeled")  # the images the normalization is computed over
NORMALIZATION_FILE = "normalization.json"
URL = "https://ai.stanford.edu/~acoates/stl10/"


def _download(data_dir):
    """Fetch and unpack the archive into ``data_dir`` (torchvision), or one clear line offline."""
    from torchvision.datasets import STL10
    folder = os.path.abspath(os.path.join(data_dir, FOLDER))
    try:
        with no_new_folders_on_error(data_dir):
            STL10(data_dir, split="train", download=True)  # the archive holds every split; train is the smallest
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise InputError(
            f"STL-10 is not in {folder} and could not be downloaded ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:80]}); connect to the internet once, or put "
            f"{', '.join(f for pair in FILES.values() for f in pair if f)} from {URL} there, and pass --data_dir"
        ) from None


def _paths(data_dir, part):
    """The (images, labels or None) files of ``part``, downloading the data set when one is missing."""
    folder = os.path.join(data_dir, FOLDER)
    paths = [None if name is None else os.path.join(folder, name) for name in FILES[part]]
    if not all(os.path.isfile(p) for p in paths if p):
        _download(data_dir)
    return paths


def read(data_dir, part):
    """Images (``MappedImages``, N x 96 x 96 x 3 uint8) and int64 labels (-1 for "unlabeled") of ``part``."""
    images_path, labels_path = _paths(data_dir, part)
    size = os.path.getsize(images_path)
    if size == 0 or size % IMAGE_BYTES:
        raise InputError(f"{images_path} is not whole 3x96x96 images ({size} bytes); download STL-10 again")
    n = size // IMAGE_BYTES
    images = MappedImages(images_path, (n,) + IMAGE_SHAPE, axes=(0, 3, 2, 1))  # (n, 96, 96, 3): row, column
    if labels_path is None:
        return images, np.full(n, -1, dtype=np.int64)
    labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64)
    if len(labels) != n or labels.min() < 1 or labels.max() > 10:
        raise InputError(f"{labels_path} does not hold {n} labels in 1..10 for {images_path}; download STL-10 again")
    return images, labels - 1


def _signature(data_dir):
    """What the normalization depends on: the training files and their sizes."""
    return {name: os.path.getsize(os.path.join(data_dir, FOLDER, name))
            for part in TRAINING_PARTS for name in FILES[part] if name and name.endswith("_X.bin")}


def normalization(data_dir, cache_dir=None):
    """Per-channel mean and std (3-tuples, [0, 1] scale) of the 105,000 training images, train + unlabeled.

    Computed on first use, in chunks (``arrays.channel_stats``: exact byte histograms; about 20 s
    on one core plus reading the 2.8 GB), and cached as a small JSON: ``stl10_binary/normalization.json``
    beside the data when that folder is writable, else ``<cache_dir>/stl10-normalization.json``
    when a cache_dir is given, else nowhere (computed again on every use). A cached value is used
    only while the training files keep the sizes it records, and only when its checksum (SHA-256 of
    its content) matches and its stds are finite and positive: otherwise it is computed again, with
    one warning line.
    """
    for part in TRAINING_PARTS:
        _paths(data_dir, part)  # download before anything is measured
    signature = _signature(data_dir)
    places = [os.path.join(data_dir, FOLDER, NORMALIZATION_FILE)]
    if cache_dir is not None:
        places.append(os.path.join(cache_dir, "stl10-normalization.json"))
    return cached_normalization("STL-10", places, signature, TRAINING_PARTS,
                                lambda: ConcatImages([read(data_dir, part)[0] for part in TRAINING_PARTS]),
                                os.path.join(data_dir, FOLDER))
