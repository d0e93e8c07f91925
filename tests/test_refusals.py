"""The scripts' edges (docs/running.md, "What each refuses, and what is kept"): an output never lands on any run's
file (found by name or content, wherever it lies); class and file names that are not UTF-8 or hold a newline
reach the pictures and the CSV escaped; a damaged or odd SVHN file is one line; a refusal that the file names
alone can decide comes before any cache or normalization is written. Each: the ``error:`` line, the exit status,
the files byte for byte. Situations built by hand: no training."""
import csv
import json
import os
import urllib.error

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import datasets
import main as stage2
import semi
import super_and
from conftest import NARROW, expect_error, folder_bytes
from datasets import sources
from engine.cli import run_file_kind
from lib.checkpoint import save_checkpoint
from lib.errors import InputError
from main import plot_confusion, write_predictions

# ---- outputs never overwrite a run file, anywhere ----

def test_run_files_are_known_by_name_and_content(tmp_path):
    (tmp_path / "log.txt").write_text(json.dumps({"epoch": 0, "loss": 1.0}) + "\n" + json.dumps({"epoch": 1}))
    (tmp_path / "scores").write_text(json.dumps({"acc": 50.0, "selected_head": 1}, indent=1))
    (tmp_path / "lock").write_text(json.dumps({"pid": 12, "host": "h"}))
    (tmp_path / "notes.csv").write_text("index,cluster\n0,1\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert run_file_kind(str(tmp_path / "log.txt")) == "a run's log"
    assert run_file_kind(str(tmp_path / "scores")) == "a run's report"
    assert run_file_kind(str(tmp_path / "lock")) == "a run's lock"
    for name in ("log_semi.jsonl", "command.json", "paper.lock"):
        (tmp_path / name).write_text("")
        assert run_file_kind(str(tmp_path / name)) == f"a run's file ({name})"
    assert run_file_kind(str(tmp_path / "elsewhere" / "eval.json")) is None  # a new file destroys nothing
    for other in ("notes.csv", "list.json", "new.csv"):
        assert run_file_kind(str(tmp_path / other)) is None


def test_an_export_onto_another_runs_files_is_refused(tmp_path, capsys):
    """Another run's log (by name), a copy of it under another name (by content) and its eval.json, from a
    stage-2 evaluation in a third folder: one line, exit 2, every file as it was, nothing created."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "log_embed.jsonl").write_text('{"round": 0, "epoch": 0, "loss": 8.1}\n')
    (other / "eval.json").write_text('{"acc": 41.5, "selected_head": 2}')
    (tmp_path / "renamed.txt").write_text('{"round": 0, "epoch": 0, "loss": 8.1}\n')
    before = folder_bytes(tmp_path)
    for target, fragment in ((other / "log_embed.jsonl", "a run's file (log_embed.jsonl)"),
                             (tmp_path / "renamed.txt", "is a run's log"), (other / "eval.json", "a run's file")):
        expect_error(capsys, stage2, NARROW + ["--test_only", "--resume", other / "ckpt_ul.t7", "--model_dir",
                                               tmp_path / "new", "--export_predictions", target], fragment,
                     "would destroy it")
    assert folder_bytes(tmp_path) == before  # nothing changed, no run folder created


# ---- names any file system can hold ----

def save_images(folder, names, count=2, size=8):
    """``count`` small random images in each of the sub-folders ``names`` (bytes) of ``folder``."""
    rng = np.random.default_rng(0)
    for name in names:
        os.makedirs(os.path.join(os.fsencode(folder), name), exist_ok=True)
        for i in range(count):
            file = os.path.join(os.fsencode(folder), name, f"{i}.png".encode())
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.fsdecode(file))


def test_class_names_not_utf8_or_with_a_newline_reach_the_pictures_and_csv_escaped(tmp_path):
    """Two class folders, one named by a byte that is not UTF-8, one with a newline, and a file with a newline in
    its name: the class names come escaped, the predictions CSV keeps one line per image, a picture draws them."""
    photos = tmp_path / "photos"
    save_images(photos, [b"\xffbad", b"two\nlines"])
    os.rename(os.path.join(os.fsencode(photos), b"two\nlines", b"0.png"),
              os.path.join(os.fsencode(photos), b"two\nlines", b"odd\nname.png"))
    data = datasets.build_dataset("folder", str(photos), "train", image_size=8, cache_dir=str(tmp_path / "cache"))
    assert sorted(data.class_names) == ["\\xffbad", "two\\nlines"]
    preds, probs = torch.tensor([[0, 1, 1, 0]]), torch.full((1, 4), 0.5)
    write_predictions(tmp_path / "preds.csv", data, preds, probs, 0)
    lines = (tmp_path / "preds.csv").read_text().splitlines()
    assert len(lines) == 1 + 4  # the header, one line per image
    paths = [row["path"] for row in csv.DictReader(lines)]
    assert any("\\xffbad" in p for p in paths) and any("two\\nlines" in p and "odd\\nname.png" in p for p in paths)
    plot_confusion(np.eye(2, dtype=int), np.arange(2), tmp_path / "confusion.png", "t", data.class_names)
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    printable = datasets.folder.printable
    assert printable("chat é") == "chat é" and printable(os.fsdecode(b"a\xff\tb")) == "a\\xff\\tb"


# ---- SVHN's files ----

def svhn_file(path, x, y):
    scipy.io.savemat(path, {"X": x, "y": y})


def test_svhn_text_labels_and_no_images_are_one_line(tmp_path):
    for labels, fragment in ((np.array([["1"], ["2"]]), "labels of type .*not numbers"),
                             (np.array([[1.5], [2.0]]), "not whole numbers")):
        svhn_file(tmp_path / "train_32x32.mat", np.zeros((32, 32, 3, 2), np.uint8), labels)
        with pytest.raises(InputError, match=fragment):
            sources.svhn(str(tmp_path), "train")
    svhn_file(tmp_path / "train_32x32.mat", np.zeros((32, 32, 3, 0), np.uint8), np.zeros((0, 1), np.uint8))
    with pytest.raises(InputError, match="holds no images"):
        sources.svhn(str(tmp_path), "train")


@pytest.mark.usefixtures("no_network")
def test_a_missing_svhn_test_file_is_refused_before_the_normalization_is_written(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.svhn as tv_svhn

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(tv_svhn, "download_url", offline)
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 40), dtype=np.uint8)
    svhn_file(tmp_path / "train_32x32.mat", x, (np.arange(40) % 10 + 1).reshape(40, 1).astype(np.uint8))
    before = folder_bytes(tmp_path)
    for script in (super_and, semi):
        expect_error(capsys, script, ["--dataset", "svhn", "--data_dir", tmp_path, "--width", "4", "--workers", "0",
                                      "--batch_size", "8", "--model_dir", tmp_path / "run"]
                     + (["--from_scratch"] if script is semi else []), "SVHN is not in")
    assert folder_bytes(tmp_path) == before  # no svhn-normalization.json, no run folder


# ---- refused before a cache is written ----

def test_refusals_the_file_names_decide_come_before_the_cache(tmp_path, capsys):
    """A flat folder of 6 images and a labelled one of 2 classes x 3: what their names decide is refused before
    anything is decoded into --model_dir."""
    (tmp_path / "flat").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    save_images(tmp_path / "two", [b"cat", b"dog"], count=3)
    encoder = tmp_path / "folder_embed.t7"  # a stage-1 file of one's own images: its network is never read
    save_checkpoint({"net": {"linear.weight": torch.zeros(32, 4)}, "npc": {}, "args": {"dataset": "folder"}},
                    encoder)
    run = tmp_path / "run"
    own = ["--dataset", "folder", "--model_dir", run] + NARROW[2:]
    expect_error(capsys, stage2, own + ["--test_only", "--cluster", "kmeans", "--resume", encoder, "--data_dir",
                                        tmp_path / "flat"], "--cluster kmeans needs labelled images")
    expect_error(capsys, stage2, own + ["--resume", encoder, "--num_classes", "50", "--data_dir", tmp_path / "flat"],
                 "--num_classes 50 is more than the 6 images")
    expect_error(capsys, stage2, own + ["--resume", encoder, "--data_dir", tmp_path / "flat"], "pass --num_classes")
    few = own + ["--from_scratch", "--data_dir", tmp_path / "two"]
    expect_error(capsys, semi, few + ["--labels_per_class", "5"], "'cat'", "only 3 files")
    expect_error(capsys, semi, few + ["--labels_per_class", "2"], "4 labelled images, fewer than --batch_size 64")
    expect_error(capsys, semi, own + ["--from_scratch", "--data_dir", tmp_path / "flat"],
                 "few-label training needs labelled images")
    assert not run.exists()
