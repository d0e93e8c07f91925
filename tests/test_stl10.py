"""STL-10 (datasets/stl10.py) from synthetic files in the official binary layout: orientation, the paper's
splits, the normalization over its training images and its cache, offline and truncated files.
"""
import json
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from data_files import write_stl10
from PIL import Image

import datasets
from datasets import arrays, stl10
from datasets.arrays import ConcatImages, MappedImages
from lib.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


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
    monkeypatch.setattr(arrays, "channel_stats", fail)
    again = datasets.build_dataset("stl10", tmp_path, "train")
    assert again.mean == ds.mean and again.std == ds.std  # bit for bit, from the JSON


def test_stl10_normalization_when_the_data_folder_is_read_only(monkeypatch, tmp_path, capsys):
    write_stl10(str(tmp_path / "data"))
    data_folder = str(tmp_path / "data" / "stl10_binary")
    write_json = arrays.write_json_atomic

    def read_only(path, record):
        if path.startswith(data_folder):
            raise PermissionError(13, "Permission denied", path)
        write_json(path, record)
    monkeypatch.setattr(arrays, "write_json_atomic", read_only)
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
