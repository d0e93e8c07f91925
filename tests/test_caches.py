"""Nothing a run caches is trusted blindly, and folder scans never follow a loop.

An image folder's decoded cache and STL-10's cached normalization are checked on use (the hash of
the cached images, a checksum of the record, a finite positive std) and rebuilt with one warning
line when a check fails; links to folders already scanned and links that lead nowhere are left out
with one warning line; an unlabelled folder takes at most as many clusters as it has images, and
stage 1 needs no cluster count at all.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_files import write_stl10
from test_folder import labelled_folder, save_image

import datasets
import super_and
from conftest import run_main
from datasets import arrays, folder, stl10
from datasets.arrays import record_checksum
from lib.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


def stderr_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


def only_npy(cache):
    (npy,) = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith(".npy")]
    return npy


def corrupt_in_place(npy):
    """Flip bytes of the cached pixels: the same size and modification time, other images."""
    stamp = os.stat(npy)
    header = np.load(npy, mmap_mode="r").offset
    with open(npy, "r+b") as f:
        f.seek(header + 5)
        byte = f.read(1)
        f.seek(header + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(npy, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    folder._VERIFIED.clear()  # what a new run starts with: nothing hashed yet


def read_record(path):
    with open(path) as f:
        return json.load(f)


def rewrite_record(path, changes, sign):
    """Change entries of a cache record; ``sign``: write a matching checksum (None entries are removed)."""
    record = {k: v for k, v in dict(read_record(path), **changes).items() if v is not None}
    if sign:
        record["checksum"] = record_checksum(record)
    with open(path, "w") as f:
        json.dump(record, f)
    folder._VERIFIED.clear()


# ----------------------------------------------------------------------------- the image-folder cache

def test_corrupted_folder_cache_is_rebuilt_with_one_warning(tmp_path, capsys):
    root = str(tmp_path / "images")
    labelled_folder(root)
    cache, fresh_cache = str(tmp_path / "cache"), str(tmp_path / "fresh")
    datasets.build_dataset("folder", root, "train", cache_dir=cache, image_size=16)
    npy = only_npy(cache)
    corrupt_in_place(npy)
    capsys.readouterr()

    rebuilt = datasets.build_dataset("folder", root, "train", cache_dir=cache, image_size=16)
    warnings = [line for line in stderr_lines(capsys) if "image cache" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert os.path.join(cache, "folder-16px.json") in warnings[0] and "hash differs" in warnings[0]
    fresh = datasets.build_dataset("folder", root, "train", cache_dir=fresh_cache, image_size=16)
    assert np.array_equal(np.asarray(rebuilt.data), np.asarray(fresh.data))
    assert rebuilt.mean == fresh.mean and rebuilt.std == fresh.std and rebuilt.paths == fresh.paths
    assert Path(npy).read_bytes() == Path(only_npy(fresh_cache)).read_bytes()  # the rebuilt file, byte for byte
    assert read_record(os.path.join(cache, "folder-16px.json")) == read_record(
        os.path.join(fresh_cache, "folder-16px.json"))


def test_intact_cache_is_hashed_once_per_process_and_not_decoded_again(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "images")
    labelled_folder(root)
    cache = str(tmp_path / "cache")
    first = datasets.build_dataset("folder", root, "train", cache_dir=cache)
    folder._VERIFIED.clear()  # a new run
    hashed, decoded = [], []
    content_hash, decode = folder.content_hash, folder.decode
    monkeypatch.setattr(folder, "content_hash", lambda images: hashed.append(len(images)) or content_hash(images))
    monkeypatch.setattr(folder, "decode", lambda *a: decoded.append(a) or decode(*a))
    for _ in range(3):  # stage 2 reads its folder twice (evaluation and training images)
        again = datasets.build_dataset("folder", root, "train", cache_dir=cache)
        assert np.array_equal(np.asarray(again.data), np.asarray(first.data)) and again.std == first.std
    assert hashed == [7] and decoded == []
    assert all("image cache" not in line for line in stderr_lines(capsys))


@pytest.mark.parametrize("changes, checksum, reason", [
    ({"std": [0.0, 0.2, 0.2]}, True, "std that is not finite and positive"),
    ({"std": [float("nan"), 0.2, 0.2]}, True, "std that is not finite and positive"),
    ({"mean": [0.9, 0.9, 0.9]}, False, "checksum"),  # edited without its checksum
], ids=["zero-std", "nan-std", "edited"])
def test_folder_record_with_bad_statistics_is_rebuilt(tmp_path, capsys, changes, checksum, reason):
    root = str(tmp_path / "flat")
    for i in range(4):
        save_image(os.path.join(root, f"{i}.png"), "RGB", (12, 12), seed=i)
    record_path = os.path.join(root, ".cache", "folder-8px.json")
    first = datasets.build_dataset("folder", root, "train", image_size=8, num_classes=2)
    good = read_record(record_path)
    rewrite_record(record_path, changes, checksum)
    capsys.readouterr()
    again = datasets.build_dataset("folder", root, "train", image_size=8, num_classes=2)
    (line,) = stderr_lines(capsys)
    assert line.startswith("warning: ") and record_path in line and reason in line
    assert again.mean == first.mean and again.std == first.std
    assert np.array_equal(np.asarray(again.data), np.asarray(first.data))
    assert read_record(record_path) == good


def test_folder_of_one_colour_is_refused_not_cached_with_a_zero_std(tmp_path):
    root = str(tmp_path / "flat")
    for i in range(3):
        save_image(os.path.join(root, f"{i}.png"), "RGB", (8, 8), colour=(9, 9, 9))
    with pytest.raises(InputError) as err:
        datasets.build_dataset("folder", root, "train", image_size=8, num_classes=2)
    assert "cannot be normalized" in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(os.path.join(root, ".cache", "folder-8px.json"))


@pytest.mark.slow
def test_stage1_on_a_corrupted_cache_gives_the_numbers_of_an_intact_one(tmp_path, capsys):
    """Three runs on a folder: one that decodes it, one on a copy of its cache, one on a corrupted copy.
    The same losses, bit for bit."""
    root = tmp_path / "flat"
    for i in range(12):
        save_image(str(root / f"{i:02d}.png"), "RGB", (20, 16), seed=i)
    flags = ["--dataset", "folder", "--data_dir", root, "--width", "8", "--low_dim", "16", "--workers", "0",
             "--batch_size", "6", "--rounds", "2", "--epochs", "1", "--image_size", "16", "--num_classes", "3"]

    def run(model_dir):
        run_main(super_and, flags + ["--model_dir", model_dir])
        records = [json.loads(line) for line in (model_dir / "log_embed.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    decoded = run(tmp_path / "a")
    (cache,) = (tmp_path / "a" / "cache").iterdir()
    for name in ("intact", "corrupted"):
        shutil.copytree(cache, tmp_path / name / "cache" / cache.name)
    corrupt_in_place(only_npy(tmp_path / "corrupted" / "cache" / cache.name))
    capsys.readouterr()
    folder._VERIFIED.clear()
    intact = run(tmp_path / "intact")
    assert all("image cache" not in line for line in stderr_lines(capsys))
    corrupted = run(tmp_path / "corrupted")
    warnings = [line for line in stderr_lines(capsys) if "image cache" in line]
    assert len(warnings) == 1 and "hash differs" in warnings[0]
    assert len(decoded) == 2 and decoded == intact == corrupted
    assert np.isfinite(corrupted[-1]["loss"])


# ----------------------------------------------------------------------------- STL-10's normalization

@pytest.mark.parametrize("changes, checksum, reason", [
    ({"std": [0.0, 0.0, 0.0]}, True, "std that is not finite and positive"),
    ({"std": [float("inf"), 0.3, 0.3]}, True, "std that is not finite and positive"),
    ({"std": [-0.2, 0.3, 0.3]}, True, "std that is not finite and positive"),
    ({"mean": [0.1, 0.1, 0.1]}, False, "checksum"),
    ({"checksum": None}, False, "checksum"),  # written without one (an older version)
], ids=["zero-std", "inf-std", "negative-std", "edited", "no-checksum"])
def test_stl10_cached_normalization_is_checked(tmp_path, capsys, changes, checksum, reason):
    write_stl10(str(tmp_path))
    fresh = datasets.build_dataset("stl10", tmp_path, "test")
    cached = str(tmp_path / "stl10_binary" / "normalization.json")
    good = read_record(cached)
    assert good["checksum"] == record_checksum(good)
    rewrite_record(cached, changes, checksum)
    capsys.readouterr()
    again = datasets.build_dataset("stl10", tmp_path, "test")
    (line,) = stderr_lines(capsys)
    assert line.startswith("warning: STL-10") and cached in line and reason in line
    assert again.mean == fresh.mean and again.std == fresh.std
    assert read_record(cached) == good  # rewritten as computed
    assert stl10.normalization(str(tmp_path)) == (fresh.mean, fresh.std) and stderr_lines(capsys) == []


def test_stl10_cached_normalization_still_follows_the_file_sizes(tmp_path, capsys, monkeypatch):
    write_stl10(str(tmp_path))
    first = stl10.normalization(str(tmp_path))
    computed = []
    channel_stats = arrays.channel_stats  # where the cached normalizations compute it
    monkeypatch.setattr(arrays, "channel_stats", lambda images: computed.append(len(images)) or channel_stats(images))
    assert stl10.normalization(str(tmp_path)) == first and computed == []
    extra = np.random.default_rng(7).integers(0, 256, size=stl10.IMAGE_BYTES, dtype=np.uint8)
    with open(tmp_path / "stl10_binary" / "unlabeled_X.bin", "ab") as f:
        f.write(extra.tobytes())
    assert stl10.normalization(str(tmp_path)) != first and computed == [12]
    assert capsys.readouterr().err == ""  # other files: recomputed without a warning


# ----------------------------------------------------------------------------- links and loops

def test_links_to_folders_already_scanned_are_left_out_with_one_warning_each(tmp_path, capsys):
    root = tmp_path / "images"
    files = labelled_folder(str(root))
    os.symlink("..", root / "ant" / "up")  # a class folder with a link to its parent
    os.symlink(".", root / "bee" / "self")  # ... to itself
    os.symlink(os.path.join("..", "ant", "deeper"), root / "cow" / "again")  # ... to a folder scanned before
    os.symlink("ant", root / "dup")  # a class folder that is a link to another class folder
    os.symlink("loop.png", root / "cow" / "loop.png")  # a file linked to itself
    os.symlink("nowhere.png", root / "bee" / "gone.png")  # a link that leads nowhere
    capsys.readouterr()
    ds = datasets.build_dataset("folder", str(root), "train", image_size=8)
    assert ds.paths == files and ds.class_names == ["ant", "bee", "cow"]
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 2, 2]
    err = stderr_lines(capsys)
    loops = [line for line in err if "a folder already scanned" in line]
    assert sorted(loops) == sorted([
        f"warning: left out the folder {root / 'ant' / 'up'}: it leads to {root}, a folder already scanned "
        f"(a link loop or a second way in)",
        f"warning: left out the folder {root / 'bee' / 'self'}: it leads to {root / 'bee'}, a folder already "
        f"scanned (a link loop or a second way in)",
        f"warning: left out the folder {root / 'cow' / 'again'}: it leads to {root / 'ant' / 'deeper'}, a folder "
        f"already scanned (a link loop or a second way in)",
        f"warning: left out the folder {root / 'dup'}: it leads to {root / 'ant'}, a folder already scanned "
        f"(a link loop or a second way in)"])
    (broken,) = [line for line in err if "lead nowhere" in line]
    assert broken.startswith("warning: left out 2 link(s) in ") and "back to themselves" in broken
    assert len(err) == 4 + 1 + 2  # and the two lines of the text file that is not an image


def test_flat_folder_with_a_file_linked_to_itself(tmp_path, capsys):
    root = tmp_path / "flat"
    files = [save_image(str(root / f"{i}.png"), "RGB", (10, 10), seed=i) for i in range(3)]
    os.symlink("self.png", root / "self.png")
    os.symlink("b.png", root / "a.png")  # a.png -> b.png -> a.png
    os.symlink("a.png", root / "b.png")
    ds = datasets.build_dataset("folder", str(root), "train", image_size=8, num_classes=2)
    assert ds.paths == files and ds.num_classes == 2
    (line,) = stderr_lines(capsys)
    assert line == f"warning: left out 3 link(s) in {root} that lead nowhere or back to themselves (e.g. a.png)"


# ----------------------------------------------------------------------------- the number of clusters

@pytest.fixture(scope="module")
def flat64(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat64")
    for i in range(64):
        save_image(str(root / f"{i:02d}.png"), "RGB", (8, 8), seed=i)
    return root


def test_more_clusters_than_images_is_refused_in_one_line(flat64):
    # reading the folder with K = 100 is fine (predicting with 100 trained clusters takes any number of
    # images); making 100 clusters of 64 images is refused
    ds = datasets.build_dataset("folder", flat64, "train", image_size=8, num_classes=100)
    assert len(ds) == 64 and ds.num_classes == 100
    with pytest.raises(InputError) as err:
        folder.check_cluster_count(ds.num_classes, len(ds), str(flat64))
    msg = str(err.value)
    assert "\n" not in msg and "--num_classes 100" in msg and "64 images" in msg
    assert "at most the number of images" in msg
    folder.check_cluster_count(64, 64, str(flat64))  # as many clusters as images: allowed


def test_flat_folder_without_a_cluster_count_loads_for_stage1(flat64):
    ds = datasets.build_dataset("folder", flat64, "train", views=2, image_size=8)
    assert len(ds) == 64 and ds.num_classes is None and not ds.has_labels
    with pytest.raises(InputError) as err:  # where clusters are made, the count is required
        folder.check_cluster_count(ds.num_classes, len(ds), str(flat64))
    assert "pass --num_classes K" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_stage1_on_a_flat_folder_needs_no_cluster_count(flat64, tmp_path):
    run_main(super_and, ["--dataset", "folder", "--data_dir", flat64, "--width", "8", "--low_dim", "16",
                         "--workers", "0", "--batch_size", "16", "--rounds", "1", "--epochs", "1",
                         "--image_size", "8", "--model_dir", tmp_path])
    (record,) = [json.loads(line) for line in (tmp_path / "log_embed.jsonl").read_text().splitlines()]
    assert np.isfinite(record["loss"]) and record["knn_top1"] is None  # no labels, no clusters
