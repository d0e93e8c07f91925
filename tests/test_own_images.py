"""A folder of one's own images through both stages, semi.py and prediction on new images: labelled
(sub-folders are classes) and unlabelled (a flat folder), mixed sizes and modes, an odd file among them."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main as stage2
import semi
import super_and
from conftest import expect_error, run_main
from lib.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
NET = ["--width", "8", "--low_dim", "32", "--workers", "0"]
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}
MODES = ["RGB", "L", "RGBA", "P"]


def picture(colour, size, mode, seed):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.convert(mode) if mode != "P" else image.quantize(16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for c, (name, colour) in enumerate(COLOURS.items()):
        os.makedirs(root / "labelled" / name)
        for i in range(12):
            size = (24 + 4 * (i % 3), 32 + 8 * (i % 2))
            picture(colour, size, MODES[i % 4], 100 * c + i).save(root / "labelled" / name / f"{i:02d}.png")
    (root / "labelled" / "dog" / "notes.txt").write_text("not an image")
    os.makedirs(root / "new")
    for i, colour in enumerate(list(COLOURS.values()) * 2):
        picture(colour, (40, 30), "RGB", 1000 + i).save(root / "new" / f"photo{i}.jpg")
    return root


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    flags = ["--dataset", "folder", "--data_dir", folders / "labelled", *NET, "--batch_size", "12"]
    run_main(super_and, flags + ["--rounds", "2", "--epochs", "1", "--model_dir", run])
    run_main(stage2, flags + ["--epochs", "1", "--resume", "ckpt_embed.t7", "--model_dir", run])
    return run


def test_both_stages_on_a_labelled_folder(trained):
    records = [json.loads(line) for line in (trained / "log_embed.jsonl").read_text().splitlines()]
    assert [r["anchors"] for r in records] == [0, 9]  # 36 readable images (notes.txt skipped), rate 0.25
    assert all(r["knn_top1"] is None for r in records)  # a folder has no held-out images: no kNN monitor
    summary = json.loads((trained / "eval.json").read_text())
    assert summary["images"] == 36 and 0 <= summary["acc"] <= 100
    assert sum(summary["cluster_sizes"]) == 36
    for name in ("clusters.png", "confusion_matrix.png", "curves.png"):
        assert (trained / name).stat().st_size > 1000
    ckpt = load_checkpoint(trained / "ckpt_ul.t7")
    assert len(ckpt["normalization"]["mean"]) == 3


def test_odd_file_is_skipped_with_one_warning(folders, tmp_path, capsys):
    capsys.readouterr()
    from datasets import build_dataset
    data = build_dataset("folder", folders / "labelled", "train", cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert "notes.txt" in err and len(data) == 36
    assert data.class_names == ["cat", "dog", "fox"]
    assert data.data[0].shape == (32, 32, 3)


def test_prediction_on_new_unlabelled_images(trained, folders, tmp_path, capsys):
    preds = tmp_path / "preds.csv"
    run_main(stage2, ["--test_only", "--resume", "ckpt_ul.t7", "--dataset", "folder", "--data_dir", folders / "new",
                      *NET, "--export_predictions", preds, "--model_dir", trained])
    with open(preds) as f:
        rows = list(csv.DictReader(f))
    names = sorted(os.listdir(folders / "new"))
    assert [os.path.basename(r["path"]) for r in rows] == names
    assert all(r["label"] == "-1" for r in rows)
    assert all(0 <= int(r["cluster"]) < 3 and 1 / 3 <= float(r["probability"]) <= 1 for r in rows)
    summary = json.loads((trained / "eval.json").read_text())
    assert "acc" not in summary and summary["images"] == 6  # no labels: nothing label-based
    assert "no labels" in capsys.readouterr().out


def test_semi_on_a_labelled_folder(trained, folders, tmp_path):
    summary = run_main(semi, ["--dataset", "folder", "--data_dir", folders / "labelled", *NET, "--batch_size", "6",
                              "--labels_per_class", "2", "--epochs", "1", "--resume", trained / "ckpt_ul.t7",
                              "--model_dir", tmp_path])
    assert summary["labelled"] == 6 and 0 <= summary["test_acc"] <= 100


@pytest.mark.pictures
def test_both_stages_on_an_unlabelled_folder(folders, tmp_path):
    flags = ["--dataset", "folder", "--data_dir", folders / "new", *NET, "--batch_size", "6", "--num_classes", "3"]
    run_main(super_and, flags + ["--rounds", "1", "--epochs", "1", "--model_dir", tmp_path])
    summary = run_main(stage2, flags + ["--epochs", "1", "--resume", "ckpt_embed.t7", "--model_dir", tmp_path])
    assert summary["selected_head"] is not None and "acc" not in summary
    record = json.loads((tmp_path / "log_ul.jsonl").read_text())
    assert "head_acc" not in record and len(record["head_losses"]) == 5
    assert (tmp_path / "clusters.png").exists() and not (tmp_path / "confusion_matrix.png").exists()
    heads = load_checkpoint(tmp_path / "ckpt_ul.t7")["fc"]
    assert all(w.shape == torch.Size([32, 3]) for w in heads.values())


def test_folder_errors(folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o"
    base = [*NET, "--dataset", "folder", "--model_dir", out, "--batch_size", "6"]
    expect_error(capsys, super_and, base + ["--data_dir", tmp_path / "missing"], "does not exist")
    expect_error(capsys, super_and, base + ["--data_dir", tmp_path / "empty"], "is empty")
    expect_error(capsys, super_and, base + ["--data_dir", folders / "labelled", "--num_classes", "5"], "contradicts")
    expect_error(capsys, semi, base + ["--data_dir", folders / "new", "--num_classes", "3", "--from_scratch"],
                 "labelled")
