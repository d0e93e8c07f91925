"""Data sets (docs/method.md, "Data sets"; "Data and augmentation"): digits, Fashion-MNIST (IDX files),
CIFAR-10/100/20 through torchvision and STL-10's binary files (synthetic files on disk, never a download),
image folders and their cache, normalization constants, transforms, ImageDataset and loaders.

No test touches the network: an autouse fixture makes every socket connection fail, and the offline
tests replace torchvision's download functions by ones that raise ``URLError``.
"""
import dataclasses
import gzip
import json
import os
import pickle
import socket
import struct
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100

import datasets
from datasets import arrays, sources, stl10
from datasets.arrays import ConcatImages, MappedImages
from lib.errors import InputError

DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"
HAVE_DEBIAN_FMNIST = all(
    os.path.exists(os.path.join(DEBIAN_FMNIST, f"{p}-{k}-idx{d}-ubyte.gz"))
    for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))
needs_debian_fmnist = pytest.mark.skipif(
    not HAVE_DEBIAN_FMNIST, reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_FMNIST})")

# the released normalization constants
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)


# --------------------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails loudly (and would surface as an offline error); local
    (AF_UNIX) sockets stay, since DataLoader workers pass tensors through them."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    def local_only(original):
        def connect(sock, *args, **kwargs):
            if sock.family == socket.AF_UNIX:
                return original(sock, *args, **kwargs)
            refuse()
        return connect
    monkeypatch.setattr(socket.socket, "connect", local_only(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", local_only(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "create_connection", refuse)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sk_digits():
    return load_digits()


@pytest.fixture(scope="module")
def digits_train():
    return sources.digits(".", "train")


@pytest.fixture(scope="module")
def digits_test():
    return sources.digits(".", "test")


@pytest.fixture(scope="module")
def fmnist_train():
    if not HAVE_DEBIAN_FMNIST:
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_FMNIST})")
    return sources.fashion_mnist("/nonexistent-data-dir", "train")


@pytest.fixture
def cifar_integrity(monkeypatch):
    """torchvision checks MD5 sums of the real CIFAR files; synthetic files only need to exist."""
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))

    def present(self):
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                   for f, _ in self.train_list + self.test_list)
    monkeypatch.setattr(CIFAR10, "_check_integrity", present)  # CIFAR100 inherits it
    # if anything still tried to download, fail instead of touching the network
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", _offline)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("offline")


# --------------------------------------------------------------------------------------- helpers

def write_idx(path, array):
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz)."""
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape) + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(raw)
    return raw


def write_fmnist(directory, n_train=5, n_test=3, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros: the padding shows
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        ext = ".gz" if gz else ""
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
        out[prefix == "train"] = (images, labels)
    return out


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root, per_batch=2, n_test=3, seed=1):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    train_rows, train_labels = [], []
    for b in range(1, 6):
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _pickle(os.path.join(folder, f"data_batch_{b}"),
                {"batch_label": f"training batch {b} of 5", "data": rows, "labels": labels})
        train_rows.append(rows)
        train_labels += labels
    test_rows = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, size=n_test)]
    _pickle(os.path.join(folder, "test_batch"),
            {"batch_label": "testing batch 1 of 1", "data": test_rows, "labels": test_labels})
    _pickle(os.path.join(folder, "batches.meta"),
            {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch})
    return {True: (np.concatenate(train_rows), np.array(train_labels)),
            False: (test_rows, np.array(test_labels))}


def write_cifar100(root, n_train=7, n_test=4, seed=2):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [int(v) for v in rng.integers(0, 20, size=n)]
        _pickle(os.path.join(folder, split),
                {"filenames": [f"{i}.png" for i in range(n)], "batch_label": split, "data": rows,
                 "fine_labels": fine, "coarse_labels": coarse})
        out[split == "train"] = (rows, np.array(fine), np.array(coarse))
    _pickle(os.path.join(folder, "meta"), {"fine_label_names": [f"f{i}" for i in range(100)],
                                           "coarse_label_names": [f"c{i}" for i in range(20)]})
    return out


def hwc(rows):
    """CIFAR file rows (N, 3072: R plane, G plane, B plane) as HWC images."""
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def channel_stats(images, chunk=10000):
    """Per-channel mean and (population) std on the [0, 1] scale, from exact byte histograms."""
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / 255.0
    for c in range(images.shape[-1]):
        hist = np.zeros(256, dtype=np.int64)
        for i in range(0, len(images), chunk):
            hist += np.bincount(images[i:i + chunk, ..., c].ravel(), minlength=256)
        n = hist.sum()
        mean = (hist * values).sum() / n
        means.append(mean)
        stds.append(np.sqrt((hist * (values - mean) ** 2).sum() / n))
    return np.array(means), np.array(stds)


# --------------------------------------------------------------------------------------- digits

def test_digits_splits_shapes_and_labels(digits_train, digits_test, sk_digits):
    (xtr, ytr), (xte, yte) = digits_train, digits_test
    assert xtr.shape == (1497, 32, 32, 3) and xte.shape == (300, 32, 32, 3)
    assert xtr.dtype == np.uint8 and xte.dtype == np.uint8
    assert ytr.shape == (1497,) and yte.shape == (300,)
    assert ytr.dtype == np.int64 and yte.dtype == np.int64
    for x in (xtr, xte):
        assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
    assert set(np.unique(ytr)) == set(range(10)) and set(np.unique(yte)) == set(range(10))
    # train = the first 1,497 of scikit-learn's digits, test = the last 300
    assert np.array_equal(ytr, sk_digits.target[:1497])
    assert np.array_equal(yte, sk_digits.target[1497:])
    # 0..16 scaled to 0..255: full range used, background black
    assert xtr.max() == 255 and xtr.min() == 0


@pytest.mark.parametrize("train", [True, False])
def test_digits_upsampling_keeps_the_digit(digits_train, digits_test, sk_digits, train):
    x, _ = digits_train if train else digits_test
    originals = sk_digits.images[:1497] if train else sk_digits.images[1497:]
    nearest = np.kron(originals, np.ones((1, 4, 4)))  # (N, 32, 32) nearest-neighbour upsampling
    up = x[..., 0].astype(np.float64)
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(up, nearest)]
    assert min(corr) > 0.8
    assert np.mean(corr) > 0.9
    # and each image matches its own digit far better than a shifted one (right order)
    wrong = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(up, np.roll(nearest, 1, axis=0))]
    assert np.mean(corr) > np.mean(wrong) + 0.3
    # intensity scale: the mean of each upsampled image is close to the 0-255 scaled original's
    scaled = originals.reshape(len(originals), -1).mean(1) * 255 / 16
    assert np.allclose(up.reshape(len(up), -1).mean(1), scaled, atol=12)


# --------------------------------------------------------------------------------------- normalization

def test_digits_normalization_constants(digits_train):
    mean, std = channel_stats(digits_train[0])
    assert np.allclose(datasets.DATASETS["digits"].mean, mean, atol=1e-3)
    assert np.allclose(datasets.DATASETS["digits"].std, std, atol=1e-3)
    assert len(datasets.DATASETS["digits"].mean) == 3 and len(datasets.DATASETS["digits"].std) == 3


@pytest.mark.slow  # reads all 60,000 training images
def test_fashion_mnist_normalization_constants(fmnist_train):
    mean, std = channel_stats(fmnist_train[0])
    assert np.allclose(datasets.DATASETS["fashion-mnist"].mean, mean, atol=1e-3)
    assert np.allclose(datasets.DATASETS["fashion-mnist"].std, std, atol=1e-3)
    assert len(datasets.DATASETS["fashion-mnist"].mean) == 3 and len(datasets.DATASETS["fashion-mnist"].std) == 3


def test_cifar_constants_and_class_counts_match_reference():
    assert tuple(datasets.DATASETS["cifar10"].mean) == CIFAR10_MEAN
    assert tuple(datasets.DATASETS["cifar10"].std) == CIFAR10_STD
    for name in ("cifar100", "cifar20"):
        assert tuple(datasets.DATASETS[name].mean) == CIFAR100_MEAN
        assert tuple(datasets.DATASETS[name].std) == CIFAR100_STD
    expected = {"cifar10": 10, "cifar100": 100, "cifar20": 20, "stl10": 10, "fashion-mnist": 10, "digits": 10}
    assert {name: datasets.DATASETS[name].num_classes for name in expected} == expected


# --------------------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.slow  # reads all 60,000 training images
@needs_debian_fmnist
def test_fashion_mnist_debian_train(fmnist_train):
    x, y = fmnist_train
    assert x.shape == (60000, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 6000))
    assert y.min() == 0 and y.max() == 9
    # the 2-pixel border is all zero; the 28x28 centre is the IDX file, unchanged
    for c in range(3):
        assert not x[:, :2, :, c].any() and not x[:, 30:, :, c].any()
        assert not x[:, :, :2, c].any() and not x[:, :, 30:, c].any()
    raw = sources.read_idx(os.path.join(DEBIAN_FMNIST, "train-images-idx3-ubyte.gz"))
    assert raw.shape == (60000, 28, 28)
    assert np.array_equal(x[:, 2:30, 2:30, 0], raw)
    assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
    assert y[0] == 9  # the first Fashion-MNIST training image is an ankle boot


@needs_debian_fmnist
def test_fashion_mnist_debian_test(tmp_path):
    x, y = sources.fashion_mnist(str(tmp_path), "test")
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 1000))
    assert not x[:, :2].any() and not x[:, 30:].any() and not x[:, :, :2].any() and not x[:, :, 30:].any()
    assert np.array_equal(x[..., 0], x[..., 2])
    labels = sources.read_idx(os.path.join(DEBIAN_FMNIST, "t10k-labels-idx1-ubyte.gz"))
    assert np.array_equal(y, labels)


@pytest.mark.parametrize("name", ["tiny-idx3-ubyte", "tiny-idx3-ubyte.gz"])
def test_read_idx_hand_written(tmp_path, name):
    # hand-written bytes: magic 0x00000803 (ubyte, 3 dims), dims 2 x 3 x 2 big-endian, then 12 values
    header = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 2])
    payload = bytes(range(10, 22))
    path = str(tmp_path / name)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + payload)
    got = sources.read_idx(path)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 2)
    assert np.array_equal(got, np.arange(10, 22, dtype=np.uint8).reshape(2, 3, 2))


def test_read_idx_one_dimensional_labels(tmp_path):
    path = str(tmp_path / "labels-idx1-ubyte")
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 4, 3, 1, 4, 1]))
    assert np.array_equal(sources.read_idx(path), np.array([3, 1, 4, 1], dtype=np.uint8))


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_data_raises_input_error(tmp_path, gz):
    path = str(tmp_path / ("cut-idx3-ubyte" + (".gz" if gz else "")))
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 2]) + bytes(range(7))  # 7 of 12 values
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(raw)
    with pytest.raises(InputError) as err:
        sources.read_idx(path)
    assert path in str(err.value) and "\n" not in str(err.value)


def test_read_idx_truncated_header_raises_input_error(tmp_path):
    # the magic says 3 dimensions, but the file ends inside the dimension list
    path = str(tmp_path / "header-idx3-ubyte")
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0, 0, 2]))
    with pytest.raises(InputError) as err:
        sources.read_idx(path)
    assert path in str(err.value)


def test_read_idx_truncated_gzip_stream_raises_input_error(tmp_path):
    # a partly downloaded .gz: the compressed stream itself stops early
    full = str(tmp_path / "full-idx3-ubyte.gz")
    write_idx(full, np.arange(4 * 28 * 28).reshape(4, 28, 28) % 251)
    with open(full, "rb") as f:
        blob = f.read()
    path = str(tmp_path / "partial-idx3-ubyte.gz")
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(InputError) as err:
        sources.read_idx(path)
    assert path in str(err.value)


@pytest.mark.parametrize("content", [b"hello, this is not an IDX file\n", b"",
                                     bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0" * 4])
def test_read_idx_not_idx_raises_input_error(tmp_path, content):
    # text, an empty file, and an IDX file of float32 (type 0x0D) instead of unsigned bytes
    path = str(tmp_path / "not-idx3-ubyte")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(InputError) as err:
        sources.read_idx(path)
    assert path in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_read_from_data_dir(monkeypatch, tmp_path, gz):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-such-debian-dir"))
    written = write_fmnist(str(tmp_path / "fashion-mnist"), gz=gz)
    for train in (True, False):
        images, labels = written[train]
        x, y = sources.fashion_mnist(str(tmp_path), "train" if train else "test")
        assert x.shape == (len(images), 32, 32, 3) and x.dtype == np.uint8
        assert y.dtype == np.int64 and np.array_equal(y, labels)
        for c in range(3):
            assert np.array_equal(x[:, 2:30, 2:30, c], images)
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert not x[:, border].any()
    ds = datasets.build_dataset("fashion-mnist", tmp_path, split="train")
    assert len(ds) == len(written[True][0])
    assert np.array_equal(ds.data[:, 2:30, 2:30, 1], written[True][0])


def test_fashion_mnist_data_dir_takes_precedence_over_debian(tmp_path):
    # whatever is installed system-wide, a fashion-mnist/ folder in data_dir is what is read
    written = write_fmnist(str(tmp_path / "fashion-mnist"), n_train=4, n_test=2)
    x, y = sources.fashion_mnist(str(tmp_path), "train")
    assert len(x) == 4 and np.array_equal(y, written[True][1])


def test_fashion_mnist_torchvision_raw_folder(monkeypatch, tmp_path):
    # the layout torchvision's own download leaves: data_dir/FashionMNIST/raw/, uncompressed
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-such-debian-dir"))
    written = write_fmnist(str(tmp_path / "FashionMNIST" / "raw"), gz=False)
    x, y = sources.fashion_mnist(str(tmp_path), "test")
    assert np.array_equal(x[:, 2:30, 2:30, 0], written[False][0]) and np.array_equal(y, written[False][1])


def test_fashion_mnist_offline_is_one_clear_line(monkeypatch, tmp_path):
    import torchvision.datasets.mnist as tv_mnist
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-such-debian-dir"))
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    data_dir = tmp_path / "data"
    with pytest.raises(InputError) as err:
        datasets.build_dataset("fashion-mnist", str(data_dir), split="train")
    msg = str(err.value)
    assert calls, "torchvision's download should have been tried"
    assert "\n" not in msg
    assert "Fashion-MNIST" in msg
    assert os.path.abspath(str(data_dir)) in msg
    assert "--data_dir" in msg and ("internet" in msg or "copy" in msg)


# --------------------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("train", [True, False])
def test_cifar10_from_torchvision_files(cifar_integrity, tmp_path, train):
    written = write_cifar10(str(tmp_path))
    rows, labels = written[train]
    ds = datasets.build_dataset("cifar10", tmp_path, split="train" if train else "test")
    assert isinstance(ds, datasets.ImageDataset)
    assert len(ds) == len(rows) == (10 if train else 3)
    assert ds.data.shape == (len(rows), 32, 32, 3) and ds.data.dtype == np.uint8
    for i in range(len(rows)):
        assert np.array_equal(ds.data[i], rows[i].reshape(3, 32, 32).transpose(1, 2, 0))
    assert np.array_equal(ds.data, hwc(rows))
    assert ds.targets.dtype == torch.long and ds.targets.tolist() == labels.tolist()
    # the evaluation item is the HWC image through ToTensor + Normalize with CIFAR-10's constants
    item = ds[1]
    expected = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)(torch.from_numpy(rows[1].reshape(3, 32, 32)) / 255)
    assert torch.allclose(item["image"], expected, atol=1e-5)
    assert item["target"] == labels[1] and item["index"] == 1
    assert ds.class_names == list(sources.CIFAR10_CLASSES) and ds.num_classes == 10 and ds.has_labels
    assert ds.mean == CIFAR10_MEAN and ds.std == CIFAR10_STD and ds.paths is None


@pytest.mark.parametrize("train", [True, False])
def test_cifar100_fine_and_cifar20_coarse_labels(cifar_integrity, tmp_path, train):
    written = write_cifar100(str(tmp_path))
    rows, fine, coarse = written[train]
    fine_ds = datasets.build_dataset("cifar100", tmp_path, split="train" if train else "test")
    coarse_ds = datasets.build_dataset("cifar20", str(tmp_path), split="train" if train else "test")
    for ds in (fine_ds, coarse_ds):
        assert len(ds) == len(rows)
        assert np.array_equal(ds.data, hwc(rows))
        assert np.array_equal(ds.data[0], rows[0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert fine_ds.targets.tolist() == fine.tolist()
    assert coarse_ds.targets.tolist() == coarse.tolist()
    assert fine_ds.targets.tolist() != coarse_ds.targets.tolist()
    item = coarse_ds[2]
    expected = transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)(torch.from_numpy(rows[2].reshape(3, 32, 32)) / 255)
    assert torch.allclose(item["image"], expected, atol=1e-5) and item["target"] == coarse[2] and item["index"] == 2
    assert fine_ds.num_classes == 100 and coarse_ds.num_classes == 20
    assert fine_ds.class_names[:3] == ["apple", "aquarium_fish", "baby"]
    assert coarse_ds.class_names[:3] == ["aquatic_mammals", "fish", "flowers"]


@pytest.mark.parametrize("name, label, cls", [("cifar10", "CIFAR-10", CIFAR10),
                                              ("cifar100", "CIFAR-100", CIFAR100),
                                              ("cifar20", "CIFAR-100", CIFAR100)])
def test_cifar_offline_is_one_clear_line(monkeypatch, tmp_path, name, label, cls):
    import torchvision.datasets.cifar as tv_cifar
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    data_dir = tmp_path / "nothing-here"
    with pytest.raises(InputError) as err:
        datasets.build_dataset(name, str(data_dir), split="train")
    msg = str(err.value)
    assert calls and calls[0][0] == cls.url, "torchvision's download (as released) should have been tried"
    assert "\n" not in msg
    assert label in msg
    if name == "cifar10":
        assert "CIFAR-100" not in msg
    assert os.path.abspath(str(data_dir)) in msg
    assert "--data_dir" in msg and ("internet" in msg or "copy" in msg)


def test_cifar_offline_via_download_method(monkeypatch, tmp_path):
    # same outcome when the whole download method fails (e.g. DNS failure raised from download())
    def offline(self):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(InputError) as err:
        datasets.build_dataset("cifar10", str(tmp_path), split="test")
    assert "CIFAR-10" in str(err.value) and str(tmp_path) in str(err.value)


# --------------------------------------------------------------------------------------- ImageDataset

def test_two_view_items(digits_train):
    torch.manual_seed(0)
    ds = datasets.build_dataset("digits", ".", "train", views=2, subset=20)
    assert ds.views == 2
    for index in (0, 7, 19):
        item = ds[index]
        assert set(item) == {"view1", "view2", "target", "index"}
        v1, v2 = item["view1"], item["view2"]
        for v in (v1, v2):
            assert isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.shape == (3, 32, 32)
        assert not torch.equal(v1, v2)
        assert item["index"] == index and item["target"] == int(digits_train[1][index])
        assert isinstance(item["target"], int)


def test_two_view_item_is_the_training_transform_twice_view1_first():
    """Same images, same transforms in the same order: a seed gives the same numbers as before."""
    ds = datasets.build_dataset("digits", ".", "train", views=2, subset=10)
    info = datasets.DATASETS["digits"]
    torch.manual_seed(5)
    item = ds[3]
    torch.manual_seed(5)
    transform, image = datasets.train_transform(info.mean, info.std), Image.fromarray(ds.data[3])
    assert torch.equal(item["view1"], transform(image)) and torch.equal(item["view2"], transform(image))


def test_eval_items_deterministic_and_normalized(digits_test):
    ds = datasets.build_dataset("digits", ".", "test")
    assert ds.views == 1 and len(ds) == 300
    mean, std = datasets.DATASETS["digits"].mean, datasets.DATASETS["digits"].std
    manual = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    for index in (0, 123, 299):
        a, b = ds[index], ds[index]
        assert set(a) == {"image", "target", "index"}
        assert torch.equal(a["image"], b["image"])
        assert a["image"].dtype == torch.float32 and a["image"].shape == (3, 32, 32)
        assert torch.allclose(a["image"], manual(Image.fromarray(digits_test[0][index])), atol=1e-6)
        by_hand = (torch.from_numpy(digits_test[0][index]).permute(2, 0, 1).float() / 255
                   - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        assert torch.allclose(a["image"], by_hand, atol=1e-5)
        assert a["target"] == int(digits_test[1][index]) and a["index"] == index


def test_dataset_attributes(digits_train):
    ds = datasets.build_dataset("digits", ".", "train")
    assert ds.num_classes == 10 and ds.class_names == [str(d) for d in range(10)] and ds.has_labels
    assert ds.mean == datasets.DATASETS["digits"].mean and ds.std == datasets.DATASETS["digits"].std
    assert ds.paths is None and ds.image_size == 32 and ds.targets.dtype == torch.long
    ds.targets[4] = -1
    assert not ds.has_labels  # one image without a label is enough


@pytest.mark.parametrize("train", [True, False])
def test_subset_keeps_first_images(digits_train, digits_test, train):
    x, y = digits_train if train else digits_test
    ds = datasets.build_dataset("digits", ".", "train" if train else "test", subset=37)
    assert len(ds) == 37
    assert np.array_equal(ds.data, x[:37])
    assert ds.targets.tolist() == y[:37].tolist()
    assert ds.data.flags["C_CONTIGUOUS"]
    # a subset larger than the split keeps the whole split
    assert len(datasets.build_dataset("digits", ".", "train" if train else "test", subset=10_000)) == len(x)


@pytest.mark.parametrize("subset", [0, -3])
def test_bad_subset_raises_input_error(subset):
    with pytest.raises(InputError) as err:
        datasets.build_dataset("digits", ".", "train", subset=subset)
    assert "subset" in str(err.value)


def test_unknown_data_set_raises_input_error():
    with pytest.raises(InputError) as err:
        datasets.build_dataset("imagenet", ".", "train")
    assert "imagenet" in str(err.value) and "cifar10" in str(err.value)


def test_explicit_transform_is_used():
    ds = datasets.build_dataset("digits", ".", "train", views=2, transform=transforms.ToTensor(), subset=3)
    item = ds[0]
    assert torch.equal(item["view1"], item["view2"]) and item["view1"].min() >= 0 and item["view1"].max() <= 1


def test_train_loader_shuffles_and_drops_last():
    torch.manual_seed(3)
    ds = datasets.build_dataset("digits", ".", "train", views=2, subset=50)
    loader = datasets.make_loader(ds, batch_size=16, train=True, workers=0, device=torch.device("cpu"))
    batches = list(loader)
    assert len(loader) == 3 and len(batches) == 3
    indices = torch.cat([b["index"] for b in batches])
    assert len(indices) == 48 and len(set(indices.tolist())) == 48
    assert set(indices.tolist()) <= set(range(50))
    assert indices.tolist() != sorted(indices.tolist())
    for batch in batches:
        assert set(batch) == {"view1", "view2", "target", "index"}
        assert batch["view1"].shape == batch["view2"].shape == (16, 3, 32, 32)
        assert torch.equal(batch["target"], ds.targets[batch["index"]])


def test_eval_loader_keeps_order():
    ds = datasets.build_dataset("digits", ".", "test", subset=50)
    loader = datasets.make_loader(ds, batch_size=16, train=False, workers=0, device=torch.device("cpu"))
    batches = list(loader)
    assert all(set(b) == {"image", "target", "index"} for b in batches)
    assert [len(b["index"]) for b in batches] == [16, 16, 16, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(50))
    assert torch.equal(torch.cat([b["target"] for b in batches]), ds.targets)
    assert not loader.pin_memory
    cuda_loader = datasets.make_loader(ds, batch_size=16, train=False, workers=0, device=torch.device("cuda"))
    assert cuda_loader.pin_memory


def test_gpu_augment_train_loader_yields_the_same_keys_and_size():
    ds = datasets.build_dataset("digits", ".", "train", views=2, subset=40, image_size=24)
    args = SimpleNamespace(gpu_augment=True, batch_size=8, workers=0)
    batch = next(iter(datasets.make_train_loader(ds, args, torch.device("cpu"))))
    assert set(batch) == {"view1", "view2", "target", "index"}
    assert batch["view1"].shape == batch["view2"].shape == (8, 3, 24, 24)
    assert torch.equal(batch["target"], ds.targets[batch["index"]])
    plain = datasets.make_train_loader(ds, SimpleNamespace(gpu_augment=False, batch_size=8, workers=0),
                                       torch.device("cpu"))
    assert isinstance(plain, torch.utils.data.DataLoader) and set(next(iter(plain))) == set(batch)


# --------------------------------------------------------------------------------------- transforms

WITH_CONSTANTS = [name for name, info in datasets.DATASETS.items() if info.mean is not None]


@pytest.mark.parametrize("name", WITH_CONSTANTS)
def test_train_transform_matches_reference(name):
    info = datasets.DATASETS[name]
    steps = datasets.train_transform(info.mean, info.std).transforms
    assert [type(t) for t in steps] == [transforms.RandomResizedCrop, transforms.ColorJitter,
                                        transforms.RandomGrayscale, transforms.RandomHorizontalFlip,
                                        transforms.ToTensor, transforms.Normalize]
    crop, jitter, grey, flip, _, norm = steps
    assert tuple(crop.size) == (32, 32)
    assert tuple(crop.scale) == (0.2, 1.0)
    assert np.allclose(crop.ratio, (3 / 4, 4 / 3))  # torchvision's default, as released
    assert np.allclose(jitter.brightness, (0.6, 1.4))
    assert np.allclose(jitter.contrast, (0.6, 1.4))
    assert np.allclose(jitter.saturation, (0.6, 1.4))
    assert np.allclose(jitter.hue, (-0.4, 0.4))
    assert grey.p == 0.2
    assert flip.p == 0.5
    assert tuple(norm.mean) == tuple(info.mean)
    assert tuple(norm.std) == tuple(info.std)
    if name == "cifar10":
        assert tuple(norm.mean) == CIFAR10_MEAN and tuple(norm.std) == CIFAR10_STD


@pytest.mark.parametrize("name", WITH_CONSTANTS)
def test_eval_transform_matches_reference(name):
    info = datasets.DATASETS[name]
    steps = datasets.eval_transform(info.mean, info.std).transforms
    assert [type(t) for t in steps] == [transforms.Resize, transforms.CenterCrop,
                                        transforms.ToTensor, transforms.Normalize]
    resize, crop, _, norm = steps
    assert resize.size in (32, [32], (32,))
    assert tuple(crop.size) == (32, 32)
    assert tuple(norm.mean) == tuple(info.mean)
    assert tuple(norm.std) == tuple(info.std)


def test_default_transforms_follow_views():
    two = datasets.build_dataset("digits", ".", "train", views=2, subset=2)
    one = datasets.build_dataset("digits", ".", "train", views=1, subset=2)
    assert type(two.transform.transforms[0]) is transforms.RandomResizedCrop
    assert type(one.transform.transforms[0]) is transforms.Resize
    assert tuple(two.transform.transforms[0].size) == (32, 32) and tuple(one.transform.transforms[1].size) == (32, 32)


def test_image_size_sets_both_transforms():
    crop = datasets.train_transform((0.5,) * 3, (0.2,) * 3, image_size=64).transforms[0]
    assert tuple(crop.size) == (64, 64) and tuple(crop.scale) == (0.2, 1.0)
    resize, centre = datasets.eval_transform((0.5,) * 3, (0.2,) * 3, image_size=64).transforms[:2]
    assert resize.size in (64, [64], (64,)) and tuple(centre.size) == (64, 64)
    two = datasets.build_dataset("digits", ".", "train", views=2, subset=3, image_size=48)
    one = datasets.build_dataset("digits", ".", "test", subset=3, image_size=48)
    assert two[0]["view1"].shape == two[0]["view2"].shape == (3, 48, 48) and two.image_size == 48
    assert one[0]["image"].shape == (3, 48, 48)
    # the images themselves are unchanged: 32x32 upsampled by the transforms
    assert one.data.shape == (3, 32, 32, 3)


@pytest.mark.parametrize("size", [0, -32, 2.5, "32", True])
def test_bad_image_size_raises_input_error(size):
    with pytest.raises(InputError) as err:
        datasets.build_dataset("digits", ".", "train", image_size=size)
    assert "image_size" in str(err.value)


# --------------------------------------------------------------------------------------- descriptions and splits

def test_dataset_descriptions():
    assert set(datasets.DATASETS) == {"cifar10", "cifar100", "cifar20", "stl10", "fashion-mnist", "digits", "folder"}
    for name, info in datasets.DATASETS.items():
        assert info.name == name
        if name != "folder":
            assert len(info.class_names) == info.num_classes and len(set(info.class_names)) == info.num_classes
    with pytest.raises(dataclasses.FrozenInstanceError):
        datasets.DATASETS["cifar10"].num_classes = 3
    assert datasets.DATASETS["cifar10"].class_names[:2] == ("airplane", "automobile")
    assert datasets.DATASETS["cifar20"].class_names[9] == "large_man-made_outdoor_things"
    assert datasets.DATASETS["stl10"].class_names == ("airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                      "monkey", "ship", "truck")
    assert datasets.DATASETS["fashion-mnist"].class_names[9] == "Ankle boot"
    splits = {name: (i.embed_split, i.cluster_split, i.test_split) for name, i in datasets.DATASETS.items()}
    assert splits["stl10"] == ("train+unlabeled", "train+test", "test")
    assert splits["folder"] == ("train", "train", None)
    assert all(splits[n] == ("train", "train", "test") for n in ("cifar10", "cifar100", "cifar20", "digits"))
    folder_info = datasets.DATASETS["folder"]
    assert folder_info.num_classes is None and folder_info.mean is None and folder_info.class_names is None
    assert datasets.DATASETS["stl10"].mean is None  # computed from its training images


def test_joined_splits_concatenate_in_order(digits_train, digits_test):
    ds = datasets.build_dataset("digits", ".", "train+test")
    assert len(ds) == 1797 and isinstance(ds.data, np.ndarray)
    assert np.array_equal(ds.data, np.concatenate([digits_train[0], digits_test[0]]))
    assert ds.targets.tolist() == digits_train[1].tolist() + digits_test[1].tolist()
    reverse = datasets.build_dataset("digits", ".", "test+train", subset=301)
    assert np.array_equal(reverse.data[:300], digits_test[0]) and np.array_equal(reverse.data[300], digits_train[0][0])


@pytest.mark.parametrize("split, fragment", [("unlabeled", "no split 'unlabeled'"), ("train+train", "twice"),
                                             ("val", "train, test"), ("", "no split ''")])
def test_bad_split_raises_input_error(split, fragment):
    with pytest.raises(InputError) as err:
        datasets.build_dataset("digits", ".", split)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_num_classes_must_not_contradict_a_labelled_data_set():
    assert datasets.build_dataset("digits", ".", "test", num_classes=10, subset=2).num_classes == 10
    with pytest.raises(InputError) as err:
        datasets.build_dataset("digits", ".", "test", num_classes=20)
    assert "--num_classes 20" in str(err.value) and "10" in str(err.value)


# --------------------------------------------------------------------------------------- arrays on disk

@pytest.fixture
def mapped(tmp_path):
    """Three arrays of 4, 0 and 5 images: one in memory, two mapped .npy files; and their concatenation."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 256, size=(n, 3, 2, 3), dtype=np.uint8) for n in (4, 0, 5))
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "c.npy", c)
    parts = [a, MappedImages.from_npy(str(tmp_path / "b.npy")), MappedImages.from_npy(str(tmp_path / "c.npy"))]
    return np.concatenate([a, b, c]), ConcatImages(parts)


def test_concatenated_images_index_like_numpy(mapped):
    full, cat = mapped
    assert cat.shape == full.shape == (9, 3, 2, 3) and len(cat) == 9 and cat.dtype == np.uint8 and cat.ndim == 4
    assert np.array_equal(np.asarray(cat), full)
    for i in (0, 3, 4, 8, -1, -9):
        assert np.array_equal(cat[i], full[i])
    for sl in (slice(None), slice(2, 7), slice(4, 9), slice(0, 4), slice(5, 6), slice(-3, None), slice(6, 2)):
        assert np.array_equal(np.asarray(cat[sl]), full[sl]), sl
    for index in ([8, 0, 4, 4], np.array([[1, 5], [7, 2]]), [-1], []):
        assert np.array_equal(cat[index], full[index])
    mask = np.arange(9) % 2 == 0
    assert np.array_equal(cat[mask], full[mask]) and np.array_equal(cat[::3], full[::3])
    assert np.array_equal(cat[2, 1], full[2, 1]) and np.array_equal(cat[3:6, :, 1], full[3:6, :, 1])
    for bad in (9, -10, [0, 9]):
        with pytest.raises(IndexError):
            cat[bad]


def test_mapped_images_stay_on_disk_and_pickle_small(mapped, tmp_path):
    full, cat = mapped
    part = cat[5:8]  # inside the mapped file c.npy
    assert isinstance(part, MappedImages) and np.array_equal(np.asarray(part), full[5:8])
    assert isinstance(part[1:], MappedImages) and np.array_equal(np.asarray(part[1:]), full[6:8])
    big = np.zeros((2000, 32, 32, 3), dtype=np.uint8)
    big[1234] = 7
    np.save(tmp_path / "big.npy", big)
    images = MappedImages.from_npy(str(tmp_path / "big.npy"), count=1500)
    assert images.shape == (1500, 32, 32, 3) and images[1234].max() == 7
    blob = pickle.dumps(images)
    assert len(blob) < 1000  # the file's name, not its 4.6 MB of pixels
    again = pickle.loads(blob)
    assert again.shape == images.shape and np.array_equal(again[1230:1240], big[1230:1240])


def test_channel_stats_are_exact_for_any_chunk(mapped):
    full, cat = mapped
    expected_mean = (full / 255.0).mean(axis=(0, 1, 2))
    expected_std = (full / 255.0).std(axis=(0, 1, 2))
    for chunk in (1, 2, 4, 100):
        mean, std = arrays.channel_stats(cat, chunk=chunk)
        assert np.allclose(mean, expected_mean, atol=1e-12) and np.allclose(std, expected_std, atol=1e-12)
        assert all(isinstance(v, float) for v in mean + std)


# --------------------------------------------------------------------------------------- STL-10

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


def test_stl10_pixel_orientation_by_hand(tmp_path):
    # one hand-written image: byte offset = channel * 96 * 96 + column * 96 + row
    raw = np.zeros(3 * 96 * 96, dtype=np.uint8)
    raw[0 * 9216 + 5 * 96 + 1] = 200  # row 1, column 5, red
    raw[2 * 9216 + 0 * 96 + 10] = 77  # row 10, column 0, blue
    raw[1 * 9216 + 95 * 96 + 94] = 9  # row 94, column 95, green
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    raw.tofile(folder / "test_X.bin")
    np.array([3], dtype=np.uint8).tofile(folder / "test_y.bin")
    images, labels = stl10.read(str(tmp_path), "test")
    image = np.asarray(images[0])
    assert image.shape == (96, 96, 3) and labels.tolist() == [2]
    assert image[1, 5, 0] == 200 and image[10, 0, 2] == 77 and image[94, 95, 1] == 9
    assert int(image.astype(int).sum()) == 200 + 77 + 9


def test_stl10_images_as_torchvision_reads_them(monkeypatch, tmp_path):
    from torchvision.datasets import STL10
    written = write_stl10(str(tmp_path))
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)  # synthetic files, no MD5 sums
    for part in ("train", "test", "unlabeled"):
        images, labels = stl10.read(str(tmp_path), part)
        assert isinstance(images, MappedImages) and images.shape == (len(written[part][0]), 96, 96, 3)
        assert np.array_equal(np.asarray(images), written[part][0])
        theirs = STL10(str(tmp_path), split=part)
        for i in range(len(theirs)):
            image, target = theirs[i]
            assert np.array_equal(np.asarray(image), images[i]) and target == labels[i]
    assert stl10.read(str(tmp_path), "unlabeled")[1].tolist() == [-1] * 5
    assert stl10.read(str(tmp_path), "train")[1].tolist() == written["train"][1].tolist()  # 1..10 -> 0..9


def test_stl10_protocol_splits(tmp_path):
    written = write_stl10(str(tmp_path))
    info = datasets.DATASETS["stl10"]
    embed = datasets.build_dataset("stl10", tmp_path, info.embed_split, views=2)
    cluster = datasets.build_dataset("stl10", tmp_path, info.cluster_split)
    test = datasets.build_dataset("stl10", tmp_path, info.test_split)
    assert (len(embed), len(cluster), len(test)) == (6 + 5, 6 + 4, 4)  # 105,000 / 13,000 / 8,000 at full size
    train_x, train_y = written["train"]
    assert np.array_equal(np.asarray(embed.data), np.concatenate([train_x, written["unlabeled"][0]]))
    assert embed.targets.tolist() == train_y.tolist() + [-1] * 5 and not embed.has_labels
    assert np.array_equal(np.asarray(cluster.data), np.concatenate([train_x, written["test"][0]]))
    assert cluster.targets.tolist() == train_y.tolist() + written["test"][1].tolist() and cluster.has_labels
    assert embed.num_classes == cluster.num_classes == 10 and test.class_names[7] == "monkey"
    # the images stay on disk: the data set pickles as file names, not 96x96 pixels
    assert isinstance(embed.data, ConcatImages) and len(pickle.dumps(embed)) < 20_000
    assert embed[7]["view1"].shape == (3, 32, 32)  # RandomResizedCrop(32) of a 96x96 image
    assert test.transform.transforms[0].size in (32, [32], (32,))
    subset = datasets.build_dataset("stl10", tmp_path, "train+unlabeled", subset=8)
    assert np.array_equal(np.asarray(subset.data)[6:], written["unlabeled"][0][:2])


def test_stl10_normalization_from_training_images_cached_beside_the_data(monkeypatch, tmp_path):
    written = write_stl10(str(tmp_path))
    training = np.concatenate([written["train"][0], written["unlabeled"][0]])  # not test
    ds = datasets.build_dataset("stl10", tmp_path, "test")
    assert np.allclose(ds.mean, (training / 255).mean(axis=(0, 1, 2)), atol=1e-12)
    assert np.allclose(ds.std, (training / 255).std(axis=(0, 1, 2)), atol=1e-12)
    # the evaluation transform normalizes with them, after resizing 96x96 to 32x32
    expected = datasets.eval_transform(ds.mean, ds.std)(Image.fromarray(written["test"][0][1]))
    assert torch.equal(ds[1]["image"], expected) and expected.shape == (3, 32, 32)
    cached = tmp_path / "stl10_binary" / "normalization.json"
    with open(cached) as f:
        record = json.load(f)
    assert tuple(record["mean"]) == ds.mean and record["images"] == 11

    def fail(*args, **kwargs):
        raise AssertionError("computed again")
    monkeypatch.setattr(stl10, "channel_stats", fail)
    again = datasets.build_dataset("stl10", tmp_path, "train")
    assert again.mean == ds.mean and again.std == ds.std  # bit for bit, from the JSON


def test_stl10_normalization_when_the_data_folder_is_read_only(monkeypatch, tmp_path, capsys):
    write_stl10(str(tmp_path / "data"))
    data_folder = str(tmp_path / "data" / "stl10_binary")
    write_json = stl10.write_json_atomic

    def read_only(path, record):
        if path.startswith(data_folder):
            raise PermissionError(13, "Permission denied", path)
        write_json(path, record)
    monkeypatch.setattr(stl10, "write_json_atomic", read_only)
    cache = tmp_path / "cache"
    mean, std = stl10.normalization(str(tmp_path / "data"), str(cache))
    assert os.listdir(cache) == ["stl10-normalization.json"]
    assert not os.path.exists(os.path.join(data_folder, "normalization.json"))
    assert stl10.normalization(str(tmp_path / "data"), str(cache)) == (mean, std)
    # nowhere to write: computed again, with one warning line
    assert stl10.normalization(str(tmp_path / "data")) == (mean, std)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "every run" in err[0]


def test_stl10_offline_is_one_clear_line(monkeypatch, tmp_path):
    import torchvision.datasets.stl10 as tv_stl10
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(tv_stl10, "download_and_extract_archive", offline)
    data_dir = tmp_path / "nothing-here"
    with pytest.raises(InputError) as err:
        datasets.build_dataset("stl10", str(data_dir), "train+unlabeled")
    msg = str(err.value)
    assert calls, "torchvision's download should have been tried"
    assert "\n" not in msg and "STL-10" in msg
    assert os.path.join(os.path.abspath(str(data_dir)), "stl10_binary") in msg
    assert "unlabeled_X.bin" in msg and "--data_dir" in msg and "internet" in msg


def test_stl10_truncated_files_raise_input_error(tmp_path):
    write_stl10(str(tmp_path))
    path = tmp_path / "stl10_binary" / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(InputError) as err:
        stl10.read(str(tmp_path), "test")
    assert str(path) in str(err.value)
    labels = tmp_path / "stl10_binary" / "train_y.bin"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(InputError) as err:
        stl10.read(str(tmp_path), "train")
    assert str(labels) in str(err.value)


# --------------------------------------------------------------------------------------- image folders

def save_image(path, mode, size, colour=None, seed=0, fmt=None):
    """An image file of ``mode`` and ``size`` (width, height): one colour, or random pixels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if colour is not None:
        image = Image.new(mode, size, colour)
    else:
        rng = np.random.default_rng(seed)
        rgb = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
        image = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
    image.save(path, format=fmt)
    return path


def labelled_folder(root):
    """Three classes; mixed sizes, modes and formats, a nested folder, a text file and a hidden file.

    Returns the image files in data set order (by class, then by sorted path).
    """
    files = [
        save_image(os.path.join(root, "ant", "b.png"), "RGB", (40, 30), seed=1),
        save_image(os.path.join(root, "ant", "c.jpg"), "RGB", (50, 64), seed=2),
        save_image(os.path.join(root, "ant", "deeper", "a.png"), "L", (20, 50), seed=3),
        save_image(os.path.join(root, "bee", "a.gif"), "P", (64, 16), seed=4),
        save_image(os.path.join(root, "bee", "z.png"), "RGBA", (33, 33), seed=5),
        save_image(os.path.join(root, "cow", "one.bmp"), "RGB", (32, 32), seed=6),
        save_image(os.path.join(root, "cow", "two.png"), "RGBA", (8, 12), colour=(10, 200, 30, 0)),
    ]
    with open(os.path.join(root, "bee", "notes.txt"), "w") as f:  # not an image: skipped, with a warning
        f.write("not an image\n")
    with open(os.path.join(root, "cow", ".DS_Store"), "wb") as f:  # hidden: left out silently
        f.write(b"\0\1")
    return files


def expected_pixels(path, size):
    """The documented rule: RGB, shorter side to ``size`` (torchvision's Resize), central square."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return np.asarray(transforms.CenterCrop(size)(transforms.Resize(size)(rgb)))


@pytest.fixture
def count_decodes(monkeypatch):
    from datasets import folder
    calls = []
    decode = folder.decode

    def counted(path, image_size):
        calls.append(path)
        return decode(path, image_size)
    monkeypatch.setattr(folder, "decode", counted)
    return calls


def test_labelled_folder(tmp_path, capsys, count_decodes):
    root = str(tmp_path / "images")
    files = labelled_folder(root)
    ds = datasets.build_dataset("folder", root, "train", image_size=16)
    assert ds.paths == files and len(ds) == 7
    assert ds.class_names == ["ant", "bee", "cow"] and ds.num_classes == 3 and ds.has_labels
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert isinstance(ds.data, MappedImages) and ds.data.shape == (7, 16, 16, 3)
    for i, path in enumerate(files):
        assert np.array_equal(ds.data[i], expected_pixels(path, 16)), path
    assert np.all(ds.data[6] == (10, 200, 30))  # a transparent RGBA image keeps its stored colour
    grey = ds.data[2]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
    # mean and std of the cached images
    pixels = np.asarray(ds.data) / 255.0
    assert np.allclose(ds.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-12)
    assert np.allclose(ds.std, pixels.std(axis=(0, 1, 2)), atol=1e-12)
    item = ds[3]
    assert item["image"].shape == (3, 16, 16) and item["target"] == 1
    assert torch.equal(item["image"], datasets.eval_transform(ds.mean, ds.std, 16)(Image.fromarray(ds.data[3])))
    # one warning line for the text file, naming it, and one line counting the skipped files
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("warning: ") for line in err)
    assert os.path.join(root, "bee", "notes.txt") in err[0] and "1 of 8 files" in err[1]
    assert len(count_decodes) == 8
    # the cache lives in DIR/.cache (hidden, so not a class): one .npy and the JSON describing it
    with open(os.path.join(root, ".cache", "folder-16px.json")) as f:
        record = json.load(f)
    assert sorted(os.listdir(os.path.join(root, ".cache"))) == sorted([record["npy"], "folder-16px.json"])
    assert record["images"] == 7 and record["files"] == 8 and record["skipped"] == ["bee/notes.txt"]
    assert record["class_names"] == ["ant", "bee", "cow"] and record["image_size"] == 16
    assert tuple(record["mean"]) == ds.mean and tuple(record["std"]) == ds.std


def test_folder_cache_reused_then_rebuilt(tmp_path, capsys, count_decodes):
    root = str(tmp_path / "images")
    files = labelled_folder(root)
    cache = str(tmp_path / "cache")
    first = datasets.build_dataset("folder", root, "train", cache_dir=cache)
    (npy,) = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith(".npy")]
    stamp = os.stat(npy).st_mtime_ns
    assert len(count_decodes) == 8 and not os.path.exists(os.path.join(root, ".cache"))
    capsys.readouterr()

    again = datasets.build_dataset("folder", root, "train", views=2, cache_dir=cache)
    assert len(count_decodes) == 8 and os.stat(npy).st_mtime_ns == stamp  # mapped, not decoded again
    assert np.array_equal(np.asarray(again.data), np.asarray(first.data)) and again.paths == first.paths
    assert again.mean == first.mean and again.std == first.std and again.targets.tolist() == first.targets.tolist()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 8 files" in err[0]  # the skipped text file is still reported, once

    added = save_image(os.path.join(root, "bee", "b.png"), "RGB", (30, 30), seed=9)
    grown = datasets.build_dataset("folder", root, "train", cache_dir=cache)
    assert len(count_decodes) == 8 + 9 and len(grown) == 8
    assert grown.paths == files[:4] + [added] + files[4:] and grown.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert np.array_equal(grown.data[4], expected_pixels(added, 32))
    assert not os.path.exists(npy)  # the stale cache is removed

    save_image(files[0], "RGB", (40, 30), seed=10)  # same name, new pixels
    os.utime(files[0], ns=(1, 1))  # a different modification time whatever the clock's resolution
    changed = datasets.build_dataset("folder", root, "train", cache_dir=cache)
    assert np.array_equal(changed.data[0], expected_pixels(files[0], 32))
    # another image size is another cache, beside the first
    datasets.build_dataset("folder", root, "train", cache_dir=cache, image_size=8)
    assert sorted(f for f in os.listdir(cache) if f.endswith(".json")) == ["folder-32px.json", "folder-8px.json"]
    assert len(datasets.build_dataset("folder", root, "train", cache_dir=cache).data) == 8
    assert len(count_decodes) == 8 + 9 + 9 + 9  # the 32px cache was still valid


def test_flat_folder_is_unlabelled(tmp_path, capsys):
    root = str(tmp_path / "flat")
    files = [save_image(os.path.join(root, name), mode, size, seed=i)
             for i, (name, mode, size) in enumerate([("a.png", "RGB", (20, 30)), ("b.png", "L", (31, 17)),
                                                      ("c.png", "P", (16, 16)), ("d.png", "RGBA", (50, 40))])]
    ds = datasets.build_dataset("folder", root, "train", num_classes=3, views=2, image_size=24)
    assert ds.paths == files and ds.targets.tolist() == [-1] * 4 and not ds.has_labels
    assert ds.num_classes == 3 and ds.class_names is None
    assert ds[2]["view1"].shape == (3, 24, 24) and ds[2]["target"] == -1
    for i, path in enumerate(files):
        assert np.array_equal(ds.data[i], expected_pixels(path, 24))
    assert capsys.readouterr().err == ""
    subset = datasets.build_dataset("folder", root, "train", num_classes=3, subset=2, image_size=24)
    assert subset.paths == files[:2] and len(subset) == 2 and subset.mean == ds.mean
    assert len(pickle.dumps(subset)) < 10_000  # the cache's file name, not its pixels


@pytest.mark.parametrize("num_classes, fragment", [(None, "pass --num_classes K"), (1, "at least 2"),
                                                   (0, "at least 2")])
def test_flat_folder_needs_two_or_more_classes(tmp_path, num_classes, fragment):
    save_image(str(tmp_path / "a.png"), "RGB", (8, 8), seed=0)
    save_image(str(tmp_path / "b.png"), "RGB", (8, 8), seed=1)
    with pytest.raises(InputError) as err:
        datasets.build_dataset("folder", tmp_path, "train", num_classes=num_classes)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / ".cache")  # refused before decoding anything


def test_labelled_folder_num_classes_must_match(tmp_path):
    labelled_folder(str(tmp_path))
    assert datasets.build_dataset("folder", tmp_path, "train", num_classes=3).num_classes == 3
    with pytest.raises(InputError) as err:
        datasets.build_dataset("folder", tmp_path, "train", num_classes=5)
    assert "--num_classes 5" in str(err.value) and "3 class sub-folders" in str(err.value)


def test_folder_errors_are_one_line(tmp_path):
    def error(path, **kwargs):
        with pytest.raises(InputError) as err:
            datasets.build_dataset("folder", str(path), "train", num_classes=2, **kwargs)
        assert "\n" not in str(err.value)
        return str(err.value)
    assert "does not exist" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "is empty" in error(tmp_path / "empty")
    save_image(str(tmp_path / "single" / "only" / "a.png"), "RGB", (8, 8))
    assert "single class sub-folder (only)" in error(tmp_path / "single")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("text")
    assert "no readable images" in error(tmp_path / "junk")
    save_image(str(tmp_path / "hollow" / "a" / "x.png"), "RGB", (8, 8))
    (tmp_path / "hollow" / "b").mkdir()
    assert "hollow/b has no files" in error(tmp_path / "hollow")
    save_image(str(tmp_path / "unreadable" / "a" / "x.png"), "RGB", (8, 8))
    (tmp_path / "unreadable" / "b").mkdir()
    (tmp_path / "unreadable" / "b" / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert "unreadable/b has no readable images" in error(tmp_path / "unreadable")
    save_image(str(tmp_path / "fine" / "a.png"), "RGB", (8, 8))
    (tmp_path / "cache-file").write_text("a file where the cache folder should be")
    assert "cannot write the image cache" in error(tmp_path / "fine", cache_dir=tmp_path / "cache-file")


def test_folder_exif_orientation_and_16_bit(tmp_path):
    from PIL import ImageOps
    rotated = save_image(str(tmp_path / "a.png"), "RGB", (20, 10), seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.open(rotated).save(rotated, exif=exif)
    deep = np.arange(0, 65536, 257 * 3, dtype=np.uint16)[:64].reshape(8, 8)  # 16-bit grey
    Image.fromarray(deep).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode.startswith("I;16")
    ds = datasets.build_dataset("folder", tmp_path, "train", num_classes=2, image_size=8)
    with Image.open(rotated) as image:
        upright = ImageOps.exif_transpose(image)
        assert upright.size == (10, 20)
        expected = np.asarray(transforms.CenterCrop(8)(transforms.Resize(8)(upright.convert("RGB"))))
    assert np.array_equal(ds.data[0], expected)
    assert np.array_equal(ds.data[1][..., 0], deep // 257) and np.array_equal(ds.data[1][..., 2], deep // 257)


def test_folder_loader_with_worker_processes(tmp_path):
    files = labelled_folder(str(tmp_path))
    ds = datasets.build_dataset("folder", tmp_path, "train")
    loader = datasets.make_loader(ds, batch_size=4, train=False, workers=1, device=torch.device("cpu"))
    batches = list(loader)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(files)))
    assert torch.equal(torch.cat([b["target"] for b in batches]), ds.targets)
    assert torch.equal(batches[1]["image"][0], ds[4]["image"])


def test_folder_has_no_test_split(tmp_path):
    labelled_folder(str(tmp_path))
    assert datasets.DATASETS["folder"].test_split is None
    with pytest.raises(InputError) as err:
        datasets.build_dataset("folder", tmp_path, "test")
    assert "no test split" in str(err.value)


def test_loose_files_beside_class_folders_are_left_out_with_a_warning(tmp_path, capsys):
    files = labelled_folder(str(tmp_path))
    save_image(str(tmp_path / "stray.png"), "RGB", (8, 8))
    ds = datasets.build_dataset("folder", tmp_path, "train")
    assert ds.paths == files
    err = capsys.readouterr().err
    assert "left out 1 file(s) directly in" in err and "stray.png" in err


def test_failed_download_leaves_no_folder(monkeypatch, tmp_path):
    """Offline, a missing data set is one error and the folders made for the download are gone again."""
    import urllib.error

    from torchvision.datasets import CIFAR10

    def offline(self, *args, **kwargs):
        os.makedirs(os.path.join(self.root, "cifar-10-batches-py", "partial"), exist_ok=True)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(InputError, match="could not be downloaded"):
        datasets.build_dataset("cifar10", str(tmp_path / "data" / "deeper"), "train")
    assert os.listdir(tmp_path) == []
