"""A folder of image files as a data set (datasets/folder.py): labelled and flat folders, decoding, the
cache, and one-line errors.
"""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import datasets
from datasets.arrays import MappedImages
from lib.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


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


@pytest.mark.parametrize("num_classes, fragment", [(1, "at least 2"), (0, "at least 2")])
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
    assert Image.open(tmp_path / "b.png").mode in ("I;16", "I")  # I (32-bit) before Pillow 10.3
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
