"""Readers that turn each split of a 32x32 data set into (uint8 images N x 32 x 32 x 3, int64 labels N),
and the class names its labels stand for (docs/method.md, "Data sets").

Every reader is ``reader(data_dir, part)`` with ``part`` "train" or "test". CIFAR goes through
torchvision (downloading when missing, as the released code did); SVHN reads its official ``.mat``
files (downloaded through torchvision when missing); Fashion-MNIST reads IDX files
(Debian's ``dataset-fashion-mnist`` package, else torchvision's download); digits is scikit-learn's
bundled 8x8 set, so the demo and the tests need no network at all. STL-10 (datasets/stl10.py) and
image folders (datasets/folder.py) have their own modules.
"""
import contextlib
import gzip
import os
import pickle
import urllib.error

import numpy as np

from lib.errors import InputError

from .arrays import cached_normalization

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# class names in label order, as each data set's own metadata lists them
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm")
CIFAR20_CLASSES = (  # CIFAR-100's 20 superclasses ("coarse labels")
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
DIGITS_CLASSES = tuple(str(d) for d in range(10))
SVHN_CLASSES = tuple(str(d) for d in range(10))  # label d is the digit d (the files store 0 as 10)


@contextlib.contextmanager
def no_new_folders_on_error(path):
    """On an exception, remove the folders on the way to ``path`` that did not exist before and are
    still empty (what a failed download leaves), so that bad input creates nothing."""
    new, probe = [], os.path.abspath(path)
    while not os.path.exists(probe):
        new.append(probe)
        probe = os.path.dirname(probe)
    try:
        yield
    except BaseException:
        if new:  # new[-1]: the outermost folder that was created; empty ones inside it go first
            for root, _, _ in os.walk(new[-1], topdown=False):
                if not os.listdir(root):
                    os.rmdir(root)
        raise


def _torchvision(cls, name, data_dir, train):
    """A torchvision data set from ``data_dir``, downloaded there if missing; one clear line offline."""
    try:
        return cls(data_dir, train=train, download=False)
    except RuntimeError:
        pass  # not there yet (or corrupt): download it as the released code did
    try:
        with no_new_folders_on_error(data_dir):
            return cls(data_dir, train=train, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise InputError(f"{name} is not in {os.path.abspath(data_dir)} and could not be downloaded "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:80]}); connect to the internet once or "
                         f"copy the data set there, and pass --data_dir") from None


def cifar10(data_dir, part):
    from torchvision.datasets import CIFAR10
    ds = _torchvision(CIFAR10, "CIFAR-10", data_dir, part == "train")
    return np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)


def cifar100(data_dir, part, coarse=False):
    """CIFAR-100 with its 100 fine labels, or (``coarse``) the 20 superclass labels of the same images."""
    from torchvision.datasets import CIFAR100
    ds = _torchvision(CIFAR100, "CIFAR-100", data_dir, part == "train")
    if not coarse:
        return np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)
    # torchvision keeps only the fine labels; the 20 superclasses are in the raw pickle
    with open(os.path.join(ds.root, ds.base_folder, part), "rb") as f:
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


def fashion_mnist(data_dir, part):
    """28x28 grey images zero-padded to 32x32 and repeated to 3 channels."""
    prefix = "train" if part == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    for directory in (os.path.join(data_dir, "fashion-mnist"), DEBIAN_FASHION_MNIST,
                      os.path.join(data_dir, "FashionMNIST", "raw")):
        paths = [_find_idx(directory, s) for s in stems]
        if all(paths):
            images, labels = read_idx(paths[0]), read_idx(paths[1])
            break
    else:
        from torchvision.datasets import FashionMNIST
        ds = _torchvision(FashionMNIST, "Fashion-MNIST", data_dir, part == "train")
        images, labels = ds.data.numpy(), ds.targets.numpy()
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(images[..., None], 3, axis=3), labels.astype(np.int64)


DIGITS, DIGITS_TRAIN = 1797, 1497  # scikit-learn's 1,797 digits: the first 1,497 train, the last 300 test


def digits(data_dir, part):
    """scikit-learn's bundled 8x8 digits (values 0-16), scaled to 0-255 and upsampled to 32x32 RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in images])
    images = np.repeat(images[..., None], 3, axis=3)
    labels = bunch.target.astype(np.int64)
    rows = slice(None, DIGITS_TRAIN) if part == "train" else slice(DIGITS_TRAIN, None)
    return images[rows], labels[rows]


SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}  # the "extra" split is not used
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_NORMALIZATION_FILE = "svhn-normalization.json"


def _svhn_path(data_dir, part):
    """``<data_dir>/<part>_32x32.mat`` (torchvision's layout), downloaded through torchvision when missing."""
    path = os.path.join(data_dir, SVHN_FILES[part])
    if os.path.isfile(path):
        return path
    from torchvision.datasets import SVHN
    try:
        with no_new_folders_on_error(data_dir):
            SVHN(data_dir, split=part, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise InputError(
            f"SVHN is not in {os.path.abspath(data_dir)} and could not be downloaded ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:80]}); connect to the internet once, or put "
            f"{', '.join(SVHN_FILES.values())} from {SVHN_URL} there, and pass --data_dir") from None
    return path


def svhn_files(data_dir, parts):
    """Every file of ``parts`` there (downloaded when missing), or one InputError, before any of them is read:
    the training images' normalization is cached in ``data_dir`` on first read."""
    for part in parts:
        _svhn_path(data_dir, part)


def svhn(data_dir, part):
    """SVHN's cropped digits (Netzer et al., 2011), 73,257 train and 26,032 test 32x32 RGB images.

    The official ``<part>_32x32.mat`` holds X: (32, 32, 3, N) uint8 (row, column, channel, image) and
    y: (N, 1) with the digits 1..9 as themselves and the digit 0 stored as 10; here (N, 32, 32, 3) and
    labels 0..9 (10 -> 0).
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError
    path = _svhn_path(data_dir, part)
    try:
        raw = loadmat(path, variable_names=("X", "y"))
    except (MatReadError, OSError, ValueError, TypeError, KeyError, IndexError) as err:  # truncated, not a .mat file
        raise InputError(f"{path} cannot be read as SVHN's .mat file ({type(err).__name__}); "
                         f"delete it to download it again") from None
    images, labels = raw.get("X"), raw.get("y")
    if (images is None or labels is None or images.dtype != np.uint8 or images.ndim != 4
            or images.shape[:3] != (32, 32, 3) or labels.size != images.shape[3]):
        raise InputError(f"{path} does not hold SVHN's X (32x32x3xN uint8) and y (N labels); "
                         f"delete it to download it again")
    if labels.dtype.kind not in "iuf":  # text or objects: not the digits 1..10
        raise InputError(f"{path} holds labels of type {labels.dtype}, not numbers; delete it to download it again")
    if images.shape[3] == 0:
        raise InputError(f"{path} holds no images; delete it to download it again")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{path} has labels that are not whole numbers; delete it to download it again")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise InputError(f"{path} has labels outside 1..10; delete it to download it again")
    images = np.ascontiguousarray(images.transpose(3, 0, 1, 2))  # (N, 32, 32, 3)
    return images, labels % 10


def svhn_normalization(data_dir, cache_dir=None):
    """Per-channel mean and std (3-tuples, [0, 1] scale) of SVHN's 73,257 training images.

    Computed on first use (``arrays.channel_stats``, exact) and cached as a small JSON, as STL-10's
    (datasets/stl10.py): ``<data_dir>/svhn-normalization.json`` when that folder is writable, else
    ``<cache_dir>/svhn-normalization.json``, else nowhere; a cached value is used only while
    train_32x32.mat keeps the size it records and its checksum and stds are sound.
    """
    path = _svhn_path(data_dir, "train")
    signature = {SVHN_FILES["train"]: os.path.getsize(path)}
    places = [os.path.join(data_dir, SVHN_NORMALIZATION_FILE)]
    if cache_dir is not None:
        places.append(os.path.join(cache_dir, SVHN_NORMALIZATION_FILE))
    return cached_normalization("SVHN", places, signature, ["train"], lambda: svhn(data_dir, "train")[0], path)
