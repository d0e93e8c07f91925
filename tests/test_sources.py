"""The readers (datasets/sources.py; docs/method.md, "Data sets"): digits, Fashion-MNIST (IDX files),
CIFAR-10/100/20 through torchvision (synthetic files on disk, never a download), and the normalization
constants of the registry against the images the readers give.

No test touches the network (the ``no_network`` fixture makes every socket connection fail), and the
offline tests replace torchvision's download functions by ones that raise ``URLError``.
"""
import gzip
import os
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch
from data_files import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from sklearn.datasets import load_digits
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100

import datasets
from datasets import sources
from lib.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


HAVE_DEBIAN_FMNIST = all(
    os.path.exists(os.path.join(DEBIAN_FMNIST, f"{p}-{k}-idx{d}-ubyte.gz"))
    for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))


needs_debian_fmnist = pytest.mark.skipif(
    not HAVE_DEBIAN_FMNIST, reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_FMNIST})")


@pytest.fixture(scope="module")
def sk_digits():
    return load_digits()


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


@pytest.mark.parametrize("split, leaves_partial", [("test", False), ("train", True)])
def test_failed_download_is_one_error_and_leaves_no_folder(monkeypatch, tmp_path, split, leaves_partial):
    """Offline, a missing data set is one error naming it and its folder, even when the whole download
    method fails (e.g. DNS failure raised from download()), and the folders made for the download are gone
    again, with whatever the download left in them."""
    def offline(self, *args, **kwargs):
        if leaves_partial:
            os.makedirs(os.path.join(self.root, "cifar-10-batches-py", "partial"), exist_ok=True)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    data_dir = tmp_path / "data" / "deeper"
    with pytest.raises(InputError, match="could not be downloaded") as err:
        datasets.build_dataset("cifar10", str(data_dir), split)
    assert "CIFAR-10" in str(err.value) and str(data_dir) in str(err.value)
    assert os.listdir(tmp_path) == []
