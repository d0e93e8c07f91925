"""Stage 2 end to end: training, head selection, evaluation files, released files, exact resume, bad input."""
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
import main as stage2
from conftest import NARROW, SMALL, run_main, write_released_embed, write_released_ul
from conftest import expect_error as shared_expect_error
from lib.checkpoint import load_checkpoint
from lib.protocols import cluster_accuracy

pytestmark = [pytest.mark.slow,  # every test here runs the script or needs a run of it
              pytest.mark.usefixtures("one_thread")]  # tiny tensors: one thread, no waiting on a second
LOG_KEYS = ("epoch", "lr", "loss", "loss_assign", "loss_cp", "head_losses", "head_acc", "head_nmi", "head_ari",
            "selected_head", "acc", "nmi", "ari", "seconds")


def read_log(directory):
    with open(os.path.join(directory, "log_ul.jsonl")) as f:
        return [json.loads(line) for line in f]


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def three_epoch_run(stage1_ckpt, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("s2")
    run_main(stage2, SMALL + ["--epochs", "3", "--resume", stage1_ckpt, "--model_dir", out])
    return out


def test_run_writes_log_checkpoints_and_pictures(stage1_ckpt, three_epoch_run):
    records = read_log(three_epoch_run)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records:
        assert all(k in r for k in LOG_KEYS)
        assert len(r["head_losses"]) == len(r["head_acc"]) == 5
        assert r["selected_head"] == int(np.argmin(r["head_losses"]))  # the paper: lowest training loss
        h = r["selected_head"]
        assert (r["acc"], r["nmi"], r["ari"]) == (r["head_acc"][h], r["head_nmi"][h], r["head_ari"][h])
        assert r["loss_assign"] == pytest.approx(np.mean(r["head_losses"]), rel=1e-5, abs=1e-6)
        assert r["loss"] == pytest.approx(r["loss_assign"] + r["loss_cp"], rel=1e-5)
        assert all(0 <= a <= 100 for a in r["head_acc"])
    for name in ("curves.png", "confusion_matrix.png"):
        assert is_png(three_epoch_run / name)
    best, last = load_checkpoint(three_epoch_run / "ckpt_ul.t7"), load_checkpoint(three_epoch_run / "ckpt_ul_last.t7")
    assert best["epoch"] == int(np.argmin([r["loss"] for r in records]))  # released: lowest mean loss
    assert last["epoch"] == 2 and last["next_epoch"] == 3
    assert {"net", "fc", "acc_list"} <= set(best)
    assert sorted(best["fc"]) == [f"heads.{i}.weight" for i in range(5)]
    assert best["acc_list"] == records[best["epoch"]]["head_acc"]
    # heads are frozen; the network trains
    for key in best["fc"]:
        assert torch.equal(best["fc"][key], last["fc"][key])
    start = load_checkpoint(stage1_ckpt)["net"]
    assert not torch.equal(start["conv1.weight"], last["net"]["conv1.weight"])
    assert torch.equal(start["sobel.1.weight"], last["net"]["sobel.1.weight"])


@pytest.mark.pictures
def test_test_only_writes_eval_confusion_and_predictions(three_epoch_run, tmp_path, capsys):
    csv_path = tmp_path / "pred.csv"
    out = tmp_path / "eval"
    summary = run_main(stage2, SMALL + ["--test_only", "--resume", three_epoch_run / "ckpt_ul.t7", "--model_dir", out,
                                        "--export_predictions", csv_path])
    printed = capsys.readouterr().out
    assert "accuracy: [" in printed
    with open(out / "eval.json") as f:
        saved = json.load(f)
    best = load_checkpoint(three_epoch_run / "ckpt_ul.t7")
    assert saved["selected_head"] == best["selected_head"]
    for key in ("head_acc", "head_nmi", "head_ari", "acc", "nmi", "ari"):
        assert key in saved
    assert saved["head_acc"] == pytest.approx(best["acc_list"])  # the same network, the same numbers
    assert is_png(out / "confusion_matrix.png")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 64
    assert list(rows[0]) == ["index", "path", "label", "cluster", "probability"] + [f"head{i}" for i in range(5)]
    assert [int(r["index"]) for r in rows] == list(range(64))
    labels = [int(r["label"]) for r in rows]
    for h in range(5):
        acc = cluster_accuracy([int(r[f"head{h}"]) for r in rows], labels, 10)
        assert 100 * acc == pytest.approx(saved["head_acc"][h])
    assert summary["acc"] == saved["head_acc"][saved["selected_head"]]


def test_new_folder_takes_the_files_clusters_and_normalization_and_leaves_args_alone(three_epoch_run, tmp_path,
                                                                                     monkeypatch):
    """--test_only on a flat folder of new images: as many clusters as the file's heads, normalized as the
    network's training images were (the file's normalization, also in the transform); the parsed
    arguments come back unchanged."""
    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    args = stage2.get_args_parser().parse_args([str(a) for a in NARROW + [
        "--test_only", "--dataset", "folder", "--data_dir", folder, "--resume", three_epoch_run / "ckpt_ul.t7",
        "--model_dir", tmp_path / "eval"]])
    before = dict(vars(args))
    evaluated, make_loader = [], datasets.make_loader
    monkeypatch.setattr(datasets, "make_loader", lambda dataset, *rest, **kw: (
        evaluated.append(dataset), make_loader(dataset, *rest, **kw))[1])
    summary = stage2.main(args)
    assert vars(args) == before and args.num_classes is None
    (dataset,) = evaluated
    saved = load_checkpoint(three_epoch_run / "ckpt_ul.t7")["normalization"]
    assert dataset.num_classes == 10 and len(summary["cluster_sizes"]) == 10
    assert (list(dataset.mean), list(dataset.std)) == (saved["mean"], saved["std"])
    normalize = dataset.transform.transforms[-1]
    assert (list(normalize.mean), list(normalize.std)) == (saved["mean"], saved["std"])
    assert saved["mean"] != list(datasets.build_dataset("folder", folder, "train", num_classes=10,
                                                        cache_dir=tmp_path / "c").mean)  # not the folder's own


def test_released_ckpt_ul_evaluates_with_its_own_weights(tmp_path, capsys):
    state = write_released_ul(tmp_path / "ckpt_ul.t7")
    csv_path = tmp_path / "pred.csv"
    run_main(stage2, ["--dataset", "digits", "--subset", "32", "--workers", "0", "--test_only", "--resume",
                      tmp_path / "ckpt_ul.t7", "--model_dir", tmp_path, "--export_predictions", csv_path])
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["selected_head"] is None  # released files hold no head losses
    # by hand: the file's network, its heads with W normalized per row (released), argmax
    import datasets
    from models import resnet18
    net = resnet18()
    net.load_state_dict({k[len("module."):]: v for k, v in state["net"].items()})
    net.eval()
    data = datasets.build_dataset("digits", "data", "train", subset=32)
    with torch.no_grad():
        feats = net(torch.stack([data[i]["image"] for i in range(32)]))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    for h in range(5):
        expected = (feats @ F.normalize(state["fc"][f"heads.{h}.weight"], dim=1)).argmax(1)
        assert [int(r[f"head{h}"]) for r in rows] == expected.tolist()


def test_released_ckpt_embed_starts_stage2(tmp_path):
    state = write_released_embed(tmp_path / "ckpt_embed.t7", num_samples=1497)
    out = tmp_path / "s2"
    run_main(stage2, ["--dataset", "digits", "--subset", "8", "--batch_size", "8", "--workers", "0", "--epochs", "1",
                      "--lr", "0", "--resume", tmp_path / "ckpt_embed.t7", "--model_dir", out])
    trained = load_checkpoint(out / "ckpt_ul.t7")["net"]
    # with lr 0 the weights are the file's: it really started from the released encoder
    for key in ("conv1.weight", "layer4_sobel.1.conv2.weight", "linear.weight"):
        assert torch.equal(trained[key], state["net"]["module." + key])


# ---- bad input: one line on stderr, exit status 2, nothing written or overwritten ----

def expect_error(capsys, args, *fragments):
    shared_expect_error(capsys, stage2, args, *fragments)


def edited(src, dst, change):
    ckpt = load_checkpoint(src)
    change(ckpt)
    torch.save(ckpt, dst)
    return dst


def test_heads_for_another_class_count(three_epoch_run, tmp_path, capsys):
    def twenty(c):
        c["fc"] = {k: torch.randn(32, 20) for k in c["fc"]}
    path = edited(three_epoch_run / "ckpt_ul.t7", tmp_path / "c20.t7", twenty)
    expect_error(capsys, SMALL + ["--test_only", "--resume", path, "--model_dir", tmp_path / "o"], "20 clusters")
    assert not (tmp_path / "o").exists()


def test_another_dimension(three_epoch_run, tmp_path, capsys):
    args = SMALL + ["--test_only", "--resume", three_epoch_run / "ckpt_ul.t7", "--model_dir", tmp_path / "o"]
    args[args.index("--low_dim") + 1] = "64"
    expect_error(capsys, args, "--low_dim")


def test_another_dataset(stage1_ckpt, tmp_path, capsys):
    def other(c):
        c["args"]["dataset"] = "fashion-mnist"
    path = edited(stage1_ckpt, tmp_path / "fm.t7", other)
    expect_error(capsys, SMALL + ["--resume", path, "--model_dir", tmp_path / "o"], "fashion-mnist")
    assert not (tmp_path / "o").exists()


def test_stage1_file_for_test_only(stage1_ckpt, capsys, tmp_path):
    expect_error(capsys, SMALL + ["--test_only", "--resume", stage1_ckpt, "--model_dir", tmp_path], "stage-1")
    assert not (tmp_path / "eval.json").exists()


def test_released_stage2_file_cannot_continue(tmp_path, capsys):
    write_released_ul(tmp_path / "ckpt_ul.t7")
    expect_error(capsys, ["--dataset", "digits", "--subset", "16", "--batch_size", "8", "--workers", "0",
                          "--resume", tmp_path / "ckpt_ul.t7", "--model_dir", tmp_path / "o"],
                 "no training state", "--test_only")


def test_missing_file_and_missing_resume(capsys, tmp_path):
    expect_error(capsys, SMALL + ["--resume", "missing.t7", "--model_dir", tmp_path], "not found")
    expect_error(capsys, SMALL + ["--model_dir", tmp_path], "--resume")


def test_existing_stage2_run_is_not_overwritten(stage1_ckpt, three_epoch_run, tmp_path, capsys):
    target = tmp_path / "ckpt_ul.t7"
    target.write_bytes((three_epoch_run / "ckpt_ul.t7").read_bytes())
    before = target.read_bytes()
    expect_error(capsys, SMALL + ["--resume", stage1_ckpt, "--model_dir", tmp_path], "already exists")
    assert target.read_bytes() == before
