"""SVHN (datasets/sources.py: svhn, svhn_normalization; docs/method.md, "Data sets" and "Semi-supervised
methods (Table 4)"): the reader on tiny ``.mat`` files in the official layout, the cached normalization,
the offline message, and its training augmentation (an affine transform, never a horizontal flip).

No test touches the network (``no_network``); torchvision's download function is replaced where a test
needs one.
"""
import json
import os
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision import transforms

import datasets
from datasets import gpu_augment, sources
from datasets.arrays import channel_stats, record_checksum
from datasets.transforms import AFFINE_DEGREES, AFFINE_TRANSLATE
from lib.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


def official_layout(n, seed):
    """n random images (N, 32, 32, 3) uint8 and labels 0..9, and the official arrays: X (32, 32, 3, N),
    y (N, 1) uint8 with the digit 0 stored as 10."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    x = np.empty((32, 32, 3, n), dtype=np.uint8)
    for i in range(n):  # written element by element, not by the transpose the reader uses
        for row in range(32):
            for col in range(32):
                for ch in range(3):
                    x[row, col, ch, i] = images[i, row, col, ch]
    y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(n, 1)
    return images, labels, x, y


@pytest.fixture
def svhn_dir(tmp_path):
    """A data folder with train_32x32.mat (12 images) and test_32x32.mat (5 images)."""
    truth = {}
    for part, n, seed in (("train", 12, 0), ("test", 5, 1)):
        images, labels, x, y = official_layout(n, seed)
        scipy.io.savemat(tmp_path / f"{part}_32x32.mat", {"X": x, "y": y})
        truth[part] = images, labels
    return tmp_path, truth


def test_reader_gives_hwc_images_and_labels_10_as_0(svhn_dir):
    data_dir, truth = svhn_dir
    for part in ("train", "test"):
        images, labels = sources.svhn(str(data_dir), part)
        expected_images, expected_labels = truth[part]
        assert images.dtype == np.uint8 and images.shape == (len(expected_labels), 32, 32, 3)
        assert images.flags["C_CONTIGUOUS"]
        assert np.array_equal(images, expected_images)  # every pixel, in (image, row, column, channel) order
        assert labels.dtype == np.int64 and labels.tolist() == expected_labels.tolist()
    raw = scipy.io.loadmat(data_dir / "train_32x32.mat")
    assert (raw["y"].ravel() == 10).sum() == 2 and sources.svhn(str(data_dir), "train")[1].tolist().count(0) == 2
    # one pixel by hand: X[row, column, channel, image]
    assert sources.svhn(str(data_dir), "train")[0][7, 3, 30, 2] == raw["X"][3, 30, 2, 7]


def test_registry_entry_reads_splits_and_normalizes_with_cached_statistics(svhn_dir, capsys):
    data_dir, truth = svhn_dir
    info = datasets.DATASETS["svhn"]
    assert info.num_classes == 10 and info.splits == ("train", "test") and info.augmentation == "affine"
    assert info.class_names == tuple("0123456789")
    ds = datasets.build_dataset("svhn", str(data_dir), "train+test")
    assert len(ds) == 17 and ds.num_classes == 10
    assert np.array_equal(np.asarray(ds.data), np.concatenate([truth["train"][0], truth["test"][0]]))
    assert ds.targets.tolist() == truth["train"][1].tolist() + truth["test"][1].tolist()
    mean, std = channel_stats(truth["train"][0])  # over the training images only
    assert ds.mean == mean and ds.std == std
    assert "computing the mean and std of the 12 training images" in capsys.readouterr().out
    cached = json.loads((data_dir / "svhn-normalization.json").read_text())
    assert cached["mean"] == list(mean) and cached["files"] == {"train_32x32.mat": os.path.getsize(
        data_dir / "train_32x32.mat")}
    datasets.build_dataset("svhn", str(data_dir), "test")
    assert "computing" not in capsys.readouterr().out  # the second use reads the cache


@pytest.mark.parametrize("damage, problem", [
    (lambda r: r.update(std=[0.0, 0.0, 0.0]), "does not match its checksum"),  # edited without its checksum
    (lambda r: r.update(std=[0.0, 0.0, 0.0], checksum=record_checksum({**r, "std": [0.0, 0.0, 0.0]})),
     "holds a std that is not finite and positive"),  # a zero std, checksum and all
])
def test_a_damaged_cached_normalization_is_computed_again(svhn_dir, capsys, damage, problem):
    data_dir, truth = svhn_dir
    datasets.build_dataset("svhn", str(data_dir), "train")
    place = data_dir / "svhn-normalization.json"
    good = place.read_bytes()
    record = json.loads(good)
    damage(record)
    place.write_text(json.dumps(record))
    capsys.readouterr()
    ds = datasets.build_dataset("svhn", str(data_dir), "train")
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and problem in out.err and str(place) in out.err
    assert (ds.mean, ds.std) == channel_stats(truth["train"][0]) and place.read_bytes() == good


def test_offline_is_one_clear_line_naming_the_files_and_folder(monkeypatch, tmp_path):
    import torchvision.datasets.svhn as tv_svhn
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(tv_svhn, "download_url", offline)
    data_dir = tmp_path / "nothing-here"
    with pytest.raises(InputError) as err:
        datasets.build_dataset("svhn", str(data_dir), "test")
    msg = str(err.value)
    assert calls == [tv_svhn.SVHN.split_list["test"][0]], "torchvision's download should have been tried"
    assert "\n" not in msg and msg.startswith("SVHN is not in " + os.path.abspath(str(data_dir)))
    assert "train_32x32.mat" in msg and "test_32x32.mat" in msg and "--data_dir" in msg
    assert not data_dir.exists()  # a failed download leaves no folder behind


def test_missing_file_is_fetched_through_torchvision(monkeypatch, tmp_path):
    import torchvision.datasets.svhn as tv_svhn
    images, labels, x, y = official_layout(3, 2)

    def fake_download(url, root, filename, md5=None):  # as torchvision's: creates the folder, writes the file
        os.makedirs(root, exist_ok=True)
        scipy.io.savemat(os.path.join(root, filename), {"X": x, "y": y})
    monkeypatch.setattr(tv_svhn, "download_url", fake_download)
    monkeypatch.setattr(tv_svhn.SVHN, "_check_integrity", lambda self: True)  # no MD5 of the real file
    got_images, got_labels = sources.svhn(str(tmp_path / "new"), "test")
    assert np.array_equal(got_images, images) and got_labels.tolist() == labels.tolist()


def test_unreadable_file_is_one_clear_line(tmp_path):
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(InputError, match="cannot be read as SVHN's .mat file"):
        sources.svhn(str(tmp_path), "test")
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                   "y": np.array([[3], [11]], np.uint8)})
    with pytest.raises(InputError, match="labels outside 1..10"):
        sources.svhn(str(tmp_path), "test")


def test_two_view_transform_is_affine_without_flip(svhn_dir):
    data_dir, _ = svhn_dir
    args = SimpleNamespace(dataset="svhn", data_dir=str(data_dir), subset=None, image_size=32, num_classes=None,
                           model_dir=None)
    ds = datasets.from_args(args, "train", views=2)
    steps = ds.transform.transforms
    assert [type(t) for t in steps] == [transforms.RandomResizedCrop, transforms.ColorJitter,
                                        transforms.RandomGrayscale, transforms.RandomAffine,
                                        transforms.ToTensor, transforms.Normalize]
    affine = steps[3]
    assert list(affine.degrees) == [-AFFINE_DEGREES, AFFINE_DEGREES] and AFFINE_DEGREES == 10.0
    assert tuple(affine.translate) == (AFFINE_TRANSLATE, AFFINE_TRANSLATE) == (2 / 32, 2 / 32)
    assert affine.scale is None and affine.shear is None
    # the other data sets keep the released flip
    digits = datasets.build_dataset("digits", ".", "train", views=2, subset=2)
    assert any(type(t) is transforms.RandomHorizontalFlip for t in digits.transform.transforms)
    assert not any(type(t) is transforms.RandomAffine for t in digits.transform.transforms)


def test_an_asymmetric_image_is_never_mirrored():
    """A horizontal ramp, bright on the left and dark on the right, through the geometric steps of the
    training augmentation (random crop, then the affine or the flip): the affine (≤ 10°, ≤ 2 px) keeps the
    centre's left part brighter than its right part in every draw; the flip variant mirrors about half.
    The centre (rows and columns 6..25) is clear of the black fill the rotation brings in at the borders,
    and every crop (at least 12 columns wide) keeps a strict ramp."""
    ramp = np.round(np.linspace(255, 0, 32)).astype(np.uint8)  # (32,) decreasing with the column
    pil = Image.fromarray(np.broadcast_to(ramp[None, :, None], (32, 32, 3)).copy())
    mean, std = (0.5,) * 3, (0.5,) * 3
    geometric = {}
    for name in ("affine", "flip"):
        steps = datasets.train_transform(mean, std, augmentation=name).transforms
        geometric[name] = transforms.Compose([steps[0], steps[3], transforms.ToTensor()])  # crop, affine|flip
    torch.manual_seed(0)
    mirrored = {"affine": 0, "flip": 0}
    for _ in range(300):
        for name, transform in geometric.items():
            centre = transform(pil)[:, 6:26, 6:26]  # (3, 20, 20)
            mirrored[name] += bool(centre[:, :, :8].mean() < centre[:, :, 12:].mean())
    assert mirrored["affine"] == 0
    assert 100 < mirrored["flip"] < 200


def test_unknown_augmentation_is_refused():
    with pytest.raises(InputError, match="unknown augmentation 'rotate'"):
        datasets.train_transform((0.5,) * 3, (0.5,) * 3, augmentation="rotate")


def test_gpu_augment_refuses_svhn_in_one_line(svhn_dir):
    data_dir, _ = svhn_dir
    ds = datasets.build_dataset("svhn", str(data_dir), "train", views=2)
    args = SimpleNamespace(dataset="svhn", gpu_augment=True, batch_size=4, workers=0)
    with pytest.raises(InputError) as err:
        datasets.make_train_loader(ds, args, torch.device("cpu"))
    assert "\n" not in str(err.value) and "--gpu_augment" in str(err.value) and "svhn" in str(err.value)
    gpu_augment.check_supported("cifar10")  # the flip data sets pass
    gpu_augment.check_supported(None)
