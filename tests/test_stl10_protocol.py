"""STL-10 through both scripts on tiny files in the official layout: stage 1 learns from train + unlabeled,
stage 2 trains and is scored on the labelled train + test images (the paper's protocol)."""
import json

import pytest
import torch
from data_files import write_stl10

import main as stage2
import super_and
from conftest import run_main
from lib.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
NET = ["--dataset", "stl10", "--width", "8", "--low_dim", "32", "--workers", "0", "--batch_size", "8"]


def test_paper_protocol_sizes(tmp_path, capsys):
    write_stl10(str(tmp_path / "data"), n_train=10, n_test=6, n_unlabeled=14)
    flags = NET + ["--data_dir", tmp_path / "data", "--model_dir", tmp_path / "run"]
    run_main(super_and, flags + ["--rounds", "2", "--epochs", "1"])
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt_embed.t7")
    assert ckpt["npc"]["memory"].shape == (24, 32)  # train + unlabeled: 10 + 14 bank slots
    assert ckpt["ANs_discovery"]["anchor_indexes"].shape == (6,)  # floor(24 x 0.25)
    record = json.loads((tmp_path / "run" / "log_embed.jsonl").read_text().splitlines()[-1])
    assert record["knn_top1"] is not None  # the labelled test split, voted on by the labelled bank rows only
    assert len(ckpt["normalization"]["mean"]) == 3
    summary = run_main(stage2, flags + ["--epochs", "1", "--resume", "ckpt_embed.t7"])
    assert summary["images"] == 16  # train + test: the 10 + 6 labelled images
    assert len(summary["head_acc"]) == 5
    heads = load_checkpoint(tmp_path / "run" / "ckpt_ul.t7")["fc"]
    assert all(w.shape == torch.Size([32, 10]) for w in heads.values())
    out = capsys.readouterr().out
    assert "round 1: 6 anchors" in out


def test_full_resolution_input(tmp_path):
    """--image_size 96: the same network (its final pool is global) on the full 96x96 images."""
    write_stl10(str(tmp_path / "data"), n_train=8, n_test=2, n_unlabeled=8)
    run_main(super_and, NET + ["--data_dir", tmp_path / "data", "--model_dir", tmp_path / "run", "--image_size", "96",
                               "--rounds", "1", "--epochs", "1"])
    assert load_checkpoint(tmp_path / "run" / "ckpt_embed.t7")["net"]["linear.weight"].shape == (32, 128)
