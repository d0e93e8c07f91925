"""Readers that turn each data set into (uint8 images N x 32 x 32 x 3, int64 labels N).

CIFAR goes through torchvision (downloading when missing, as the released code did); Fashion-MNIST
reads IDX files (Debian's ``dataset-fashion-mnist`` package, else torchvision's download); digits is
scikit-learn's bundled 8x8 set, so the demo and the tests need no network at all.
"""
import gzip
import os
import pickle
import urllib.error

import numpy as np

from lib.runtime import InputError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _torchvision(cls, name, data_dir, train):
    """A torchvision data set from ``data_dir``, downloaded there if missing; one clear line offline."""
    try:
        return cls(data_dir, train=train, download=False)
    except RuntimeError:
        pass  # not there yet (or corrupt): download it as the released code did
    try:
        return cls(data_dir, train=train, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise InputError(f"{name} is not in {os.path.abspath(data_dir)} and could not be downloaded "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:80]}); connect to the internet once or "
                         f"copy the data set there, and pass --data_dir") from None


def cifar10(data_dir, train):
    from torchvision.datasets import CIFAR10
    ds = _torchvision(CIFAR10, "CIFAR-10", data_dir, train)
    return np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)


def cifar100(data_dir, train, coarse=False):
    from torchvision.datasets import CIFAR100
    ds = _torchvision(CIFAR100, "CIFAR-100", data_dir, train)
    if not coarse:
        return np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)
    # torchvision keeps only the fine labels; the 20 superclasses are in the raw pickle
    split = "train" if train else "test"
    with open(os.path.join(ds.root, ds.base_folder, split), "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    return np.asarray(ds.data), np.asarray(raw["coarse_labels"], dtype=np.int64)


def read_idx(path):
    """An IDX file (the MNIST format), gzipped or not, as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError) as err:  # a partial download or a corrupt archive
        raise InputError(f"{path} cannot be read ({type(err).__name__}); reinstall the data set") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path} is not an IDX file of unsigned bytes; reinstall the data set")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise InputError(f"{path} is truncated inside its header; reinstall the data set")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise InputError(f"{path} is truncated ({data.size} of {int(np.prod(shape))} values); reinstall the data set")
    return data.reshape(shape)


def _find_idx(directory, stem):
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def fashion_mnist(data_dir, train):
    """28x28 grey images zero-padded to 32x32 and repeated to 3 channels."""
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    for directory in (os.path.join(data_dir, "fashion-mnist"), DEBIAN_FASHION_MNIST,
                      os.path.join(data_dir, "FashionMNIST", "raw")):
        paths = [_find_idx(directory, s) for s in stems]
        if all(paths):
            images, labels = read_idx(paths[0]), read_idx(paths[1])
            break
    else:
        from torchvision.datasets import FashionMNIST
        ds = _torchvision(FashionMNIST, "Fashion-MNIST", data_dir, train)
        images, labels = ds.data.numpy(), ds.targets.numpy()
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(images[..., None], 3, axis=3), labels.astype(np.int64)


DIGITS_TRAIN = 1497  # scikit-learn's 1,797 digits: the first 1,497 train, the last 300 test


def digits(data_dir, train):
    """scikit-learn's bundled 8x8 digits (values 0-16), scaled to 0-255 and upsampled to 32x32 RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in images])
    images = np.repeat(images[..., None], 3, axis=3)
    labels = bunch.target.astype(np.int64)
    part = slice(None, DIGITS_TRAIN) if train else slice(DIGITS_TRAIN, None)
    return images[part], labels[part]
