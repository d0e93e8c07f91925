"""Helpers shared by the data-set tests: the released normalization constants and tiny synthetic
STL-10 files in the official layout.
"""
import os

import numpy as np

# the released normalization constants
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)


def write_stl10(root, n_train=6, n_test=4, n_unlabeled=5, seed=3):
    """The official layout with tiny files: returns {part: (upright HWC images, labels 0..9 or None)}."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder)
    out = {}
    for part, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        images = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)  # (N, row, column, channel)
        # on disk: channel, then column, then row (each channel stored column by column)
        images.transpose(0, 3, 2, 1).tofile(os.path.join(folder, f"{part}_X.bin"))
        labels = None
        if part != "unlabeled":
            labels = rng.permutation(np.arange(n) % 10)
            (labels + 1).astype(np.uint8).tofile(os.path.join(folder, f"{part}_y.bin"))  # 1..10 on disk
        out[part] = (images, labels)
    return out
