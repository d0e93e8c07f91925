"""What the runs hand to the optimizer and write to their files, recomputed from the files themselves.

- Past the first decay (epoch 120), through the scripts' own loop: the learning rate and UE weight at every
  step, the loss parts in the log, the optimizer state in the checkpoint (Nesterov, momentum, weight decay).
- The kNN accuracies of stage 1's log from the checkpoint's bank; NMI, ARI, the selected head's clusters and
  probabilities of stage 2 from its predictions file and checkpoint; the confusion matrix's orientation; the
  k-means baseline by seed.
- CIFAR-100 -> CIFAR-100-20 (the same images, 20 superclass labels), ResNet-101 and the paper's head
  normalization, end to end once each.

The end-to-end tests are tiny runs in this process (width 8, 16 to 64 images); they are marked slow.
"""
import csv
import inspect
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import datasets
import main as stage2
import super_and
from conftest import NARROW_32, SMALL_32, run_main
from lib.checkpoint import load_checkpoint, load_network
from lib.protocols import cluster_accuracy, hungarian_match
from main import confusion_as_drawn, kmeans_baseline, plot_confusion
from models import resnet18, resnet101

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread, no waiting on a second
slow = pytest.mark.slow
# not the defaults, so that a value the scripts ignore or hard-code shows
OPTIM = ["--momentum", "0.85", "--weight_decay", "0.001"]
STAGE1 = SMALL_32 + OPTIM + ["--rounds", "1"]
STAGE2 = SMALL_32 + OPTIM + ["--lambda_cp", "0.5"]

# CIFAR-100's fine label -> its superclass ("coarse label"), as the data set's own files give it
CIFAR100_TO_20 = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def edited(src, dst, change):
    ckpt = load_checkpoint(src)
    change(ckpt)
    torch.save(ckpt, dst)


def spy_steps(monkeypatch, module):
    """Record, at every training step of ``module``, each parameter group's optimizer settings and (stage 1)
    the UE weight the step was given."""
    seen = []
    real = module.train_step
    signature = inspect.signature(real)

    def step(*args, **kwargs):
        given = signature.bind(*args, **kwargs).arguments
        optimizer = given["state"].optimizer
        groups = [(g["lr"], g["nesterov"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups]
        seen.append((groups, given.get("weight")))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "train_step", step)
    return seen


def images_of(dataset):
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def plain_network(ckpt, network=resnet18):
    net = network(low_dim=32, width=8)
    load_network(net, ckpt["net"], "checkpoint")
    return net.eval()


def head_probabilities(feats, weight, norm_dim):
    """softmax(v · Ŵ / τ_c), Ŵ = W normalized along ``norm_dim`` (1: rows, released; 0: class columns, Eq. 13)."""
    return F.softmax(feats.double() @ F.normalize(weight.double(), dim=norm_dim) / 0.1, dim=1)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("s1")
    run_main(super_and, STAGE1 + ["--epochs", "1", "--model_dir", out])
    return out


@pytest.fixture(scope="module")
def stage2_with_predictions(stage1_run, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("s2")
    run_main(stage2, STAGE2 + ["--epochs", "1", "--resume", stage1_run / "ckpt_embed.t7", "--model_dir", out,
                               "--export_predictions", out / "predictions.csv"])
    return out


# ---- past the first decay: what reaches the optimizer ----

@slow
def test_stage1_past_epoch_120(stage1_run, tmp_path, monkeypatch):
    """Continued at epoch 119 of round 0: lr 0.03, then 0.003 from epoch 120; UE weight 0.2 (epochs 80-159)."""
    def at_119(ckpt):
        ckpt["epoch"], ckpt["next"], ckpt["log_record"]["epoch"] = 118, {"round": 0, "epoch": 119}, 118
    edited(stage1_run / "ckpt_embed.t7", tmp_path / "ckpt_embed.t7", at_119)
    steps = spy_steps(monkeypatch, super_and)
    run_main(super_and, STAGE1 + ["--epochs", "122", "--allow_change", "epochs", "--resume", "ckpt_embed.t7",
                                  "--model_dir", tmp_path])  # a longer round, on purpose
    records = [r for r in read_log(tmp_path / "log_embed.jsonl") if r["epoch"] >= 119]
    assert [(r["round"], r["epoch"], r["lr"], r["ue_weight"]) for r in records] == [
        (0, 119, 0.03, 0.2), (0, 120, 0.003, 0.2), (0, 121, 0.003, 0.2)]
    # every step of each epoch: the epoch's lr in every group, Nesterov, the flags' momentum and decay
    assert steps == [([(0.03, True, 0.85, 0.001)], 0.2)] * 4 + [([(0.003, True, 0.85, 0.001)], 0.2)] * 8
    for r in records:
        assert r["loss"] == pytest.approx(r["loss_and"] + r["loss_aug"] + 0.2 * r["loss_ue"], rel=1e-5)
    ckpt = load_checkpoint(tmp_path / "ckpt_embed.t7")
    assert (ckpt["round"], ckpt["epoch"], ckpt["next"]) == (0, 121, {"round": 1, "epoch": 0})
    assert ckpt["log_record"] == records[-1]
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["lr"], g["nesterov"], g["momentum"], g["weight_decay"]) for g in groups] == [
        (records[-1]["lr"], True, 0.85, 0.001)]
    assert len(ckpt["optimizer"]["state"]) == len(groups[0]["params"])  # a momentum buffer per parameter


@slow
def test_stage2_past_epoch_120(stage2_with_predictions, tmp_path, monkeypatch):
    """Continued at epoch 119: lr 0.01, then 0.001 from epoch 120; loss = mean over heads + λ · CP."""
    def at_119(ckpt):
        ckpt["epoch"], ckpt["next_epoch"], ckpt["log_record"]["epoch"] = 118, 119, 118
    edited(stage2_with_predictions / "ckpt_ul_last.t7", tmp_path / "ckpt_ul_last.t7", at_119)
    steps = spy_steps(monkeypatch, stage2)
    run_main(stage2, STAGE2 + ["--epochs", "121", "--resume", "ckpt_ul_last.t7", "--model_dir", tmp_path])
    records = [r for r in read_log(tmp_path / "log_ul.jsonl") if r["epoch"] >= 119]
    assert [(r["epoch"], r["lr"]) for r in records] == [(119, 0.01), (120, 0.001)]
    assert steps == [([(0.01, True, 0.85, 0.001)], None)] * 4 + [([(0.001, True, 0.85, 0.001)], None)] * 4
    for r in records:
        assert r["loss_assign"] == pytest.approx(np.mean(r["head_losses"]), rel=1e-5)
        assert r["loss"] == pytest.approx(r["loss_assign"] + 0.5 * r["loss_cp"], rel=1e-5)
    ckpt = load_checkpoint(tmp_path / "ckpt_ul_last.t7")
    assert (ckpt["epoch"], ckpt["next_epoch"]) == (120, 121)
    assert ckpt["log_record"] == records[-1]
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["lr"], g["nesterov"], g["momentum"], g["weight_decay"]) for g in groups] == [
        (records[-1]["lr"], True, 0.85, 0.001)]
    assert len(ckpt["optimizer"]["state"]) == len(groups[0]["params"])


# ---- stage 1: the kNN monitor ----

def knn_by_hand(feats, bank, bank_labels, targets, num_classes, k=200, sigma=0.1):
    """Top-1 and top-5 (%) of the weighted kNN, a loop over queries in float64."""
    hits1 = hits5 = 0
    bank = bank.double()
    for query, target in zip(feats.double(), targets.tolist()):
        sims = (bank @ query).tolist()
        nearest = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[int(bank_labels[j])] += math.exp(sims[j] / sigma)
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        hits1 += ranked[0] == target
        hits5 += target in ranked[:5]
    return 100 * hits1 / len(targets), 100 * hits5 / len(targets)


@slow
def test_stage1_knn_top1_and_top5_from_the_checkpoint(stage1_run):
    (record,) = read_log(stage1_run / "log_embed.jsonl")
    ckpt = load_checkpoint(stage1_run / "ckpt_embed.t7")
    test = datasets.build_dataset("digits", "data", "test", subset=64)
    train = datasets.build_dataset("digits", "data", "train", subset=64)
    with torch.no_grad():
        feats = plain_network(ckpt)(images_of(test))
    top1, top5 = knn_by_hand(feats, ckpt["npc"]["memory"], train.targets, test.targets, 10)
    assert record["knn_top1"] == pytest.approx(top1, abs=1e-4)
    assert record["knn_top5"] == pytest.approx(top5, abs=1e-4)
    assert ckpt["acc"] == pytest.approx(top1 / 100, abs=1e-6)


# ---- stage 2: metrics, predictions file, confusion matrix, k-means ----

@slow
def test_stage2_predictions_file_from_the_checkpoint(stage2_with_predictions):
    (record,) = read_log(stage2_with_predictions / "log_ul.jsonl")
    summary = json.loads((stage2_with_predictions / "eval.json").read_text())
    rows = read_csv(stage2_with_predictions / "predictions.csv")
    assert list(rows[0]) == ["index", "path", "label", "cluster", "probability"] + [f"head{h}" for h in range(5)]
    train = datasets.build_dataset("digits", "data", "train", subset=64)
    assert [int(r["index"]) for r in rows] == list(range(64))
    assert [int(r["label"]) for r in rows] == train.targets.tolist()
    assert all(r["path"] == "" for r in rows)  # digits have no files
    selected = int(np.argmin(record["head_losses"]))
    assert record["selected_head"] == summary["selected_head"] == selected
    for key in ("acc", "nmi", "ari"):
        assert record[key] == summary[key] == record[f"head_{key}"][selected]
    # the selected head's cluster and probability: argmax and max of its softmax, recomputed from the file
    ckpt = load_checkpoint(stage2_with_predictions / "ckpt_ul_last.t7")
    with torch.no_grad():
        feats = plain_network(ckpt)(images_of(train))
    probs = head_probabilities(feats, ckpt["fc"][f"heads.{selected}.weight"], norm_dim=1)  # released: rows
    assert [int(r["cluster"]) for r in rows] == [int(r[f"head{selected}"]) for r in rows]
    assert [int(r["cluster"]) for r in rows] == probs.argmax(1).tolist()
    assert [float(r["probability"]) for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=2e-6)
    assert summary["cluster_sizes"] == np.bincount(probs.argmax(1).numpy(), minlength=10).tolist()


def spread_heads(feats, targets, num_heads=5):
    """Heads whose clusters differ from image to image on a barely trained network, whose embeddings all lie
    near one direction: class column c of head h is the h-th image of class c with that direction taken out."""
    common = F.normalize(feats.mean(0), dim=0)
    off = feats - (feats @ common)[:, None] * common  # (N, d)
    members = [torch.nonzero(targets == c).flatten() for c in range(10)]
    return {f"heads.{h}.weight": torch.stack([off[m[h % len(m)]] for m in members], dim=1)  # (d, C)
            for h in range(num_heads)}


@slow
def test_stage2_acc_nmi_ari_equal_scikit_learns_on_the_predictions(stage2_with_predictions, tmp_path):
    """One more epoch with heads that give real clusterings (``spread_heads``, the paper's normalization),
    then every head's numbers in log_ul.jsonl and eval.json against those of its clusters in the CSV."""
    train = datasets.build_dataset("digits", "data", "train", subset=64)
    ckpt = load_checkpoint(stage2_with_predictions / "ckpt_ul_last.t7")
    with torch.no_grad():
        feats = plain_network(ckpt)(images_of(train))

    def spread(c):
        c["fc"] = spread_heads(feats, train.targets)
    edited(stage2_with_predictions / "ckpt_ul_last.t7", tmp_path / "ckpt_ul_last.t7", spread)
    run_main(stage2, STAGE2 + ["--epochs", "2", "--head_norm", "paper", "--allow_change", "head_norm", "--resume",
                               "ckpt_ul_last.t7", "--model_dir", tmp_path, "--export_predictions",
                               tmp_path / "predictions.csv"])
    record = read_log(tmp_path / "log_ul.jsonl")[-1]
    summary = json.loads((tmp_path / "eval.json").read_text())
    rows = read_csv(tmp_path / "predictions.csv")
    labels = np.array([int(r["label"]) for r in rows])
    for h in range(5):
        clusters = np.array([int(r[f"head{h}"]) for r in rows])
        assert len(set(clusters)) >= 3, f"head {h}: too few clusters for the check to mean anything"
        nmi, ari = 100 * normalized_mutual_info_score(labels, clusters), 100 * adjusted_rand_score(labels, clusters)
        acc = 100 * cluster_accuracy(clusters, labels, 10)
        for source in (record, summary):
            assert source["head_nmi"][h] == pytest.approx(nmi, abs=1e-9)
            assert source["head_ari"][h] == pytest.approx(ari, abs=1e-9)
            assert source["head_acc"][h] == pytest.approx(acc, abs=1e-9)
    selected = record["selected_head"]
    assert summary["selected_head"] == selected == int(np.argmin(record["head_losses"]))
    for key in ("acc", "nmi", "ari"):  # the run's numbers are the selected head's (here the heads differ)
        assert record[key] == summary[key] == record[f"head_{key}"][selected]
    assert [int(r["cluster"]) for r in rows] == [int(r[f"head{selected}"]) for r in rows]


def test_confusion_matrix_as_drawn_rows_are_classes(monkeypatch, tmp_path):
    """Row i = true class i, column j = the cluster matched to class j: a permuted perfect clustering is
    diagonal, and an image of class 0 put in class 1's cluster shows at row 0, column 1."""
    perm = np.array([3, 0, 4, 1, 2])  # class c -> cluster perm[c]
    targets = np.repeat(np.arange(5), [4, 5, 6, 7, 8])
    mapping, confusion = hungarian_match(perm[targets], targets, 5)
    assert mapping[perm].tolist() == list(range(5))  # cluster perm[c] is matched to class c
    matrix, order = confusion_as_drawn(confusion, mapping)
    assert order.tolist() == perm.tolist()
    assert np.array_equal(matrix, np.diag([4, 5, 6, 7, 8]))
    preds = perm[targets]
    preds[0] = perm[1]  # one image of class 0 lands in the cluster of class 1
    mapping, confusion = hungarian_match(preds, targets, 5)
    matrix, order = confusion_as_drawn(confusion, mapping)
    expected = np.diag([3, 5, 6, 7, 8])
    expected[0, 1] = 1
    assert np.array_equal(matrix, expected)
    # and that is the matrix the picture shows, with class names down the side and clusters along the top
    import matplotlib.axes
    import matplotlib.figure
    drawn = {}
    real_imshow = matplotlib.axes.Axes.imshow

    def imshow(ax, data, *args, **kwargs):
        drawn["matrix"] = np.array(data)
        return real_imshow(ax, data, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", imshow)
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        (ax,) = fig.axes
        drawn["rows"] = [t.get_text() for t in ax.get_yticklabels()]
        drawn["columns"] = [t.get_text() for t in ax.get_xticklabels()]
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    plot_confusion(confusion, mapping, tmp_path / "c.png", "t", ["a", "b", "c", "d", "e"])
    assert np.array_equal(drawn["matrix"], expected)
    assert drawn["rows"] == ["a", "b", "c", "d", "e"]
    assert drawn["columns"] == [str(c) for c in perm]


@slow
def test_kmeans_baseline_is_reproducible_by_seed(stage2_with_predictions, tmp_path):
    run_main(stage2, SMALL_32 + ["--test_only", "--kmeans_baseline", "--resume", stage2_with_predictions / "ckpt_ul.t7",
                              "--model_dir", tmp_path])
    saved = json.loads((tmp_path / "eval.json").read_text())["kmeans"]
    assert set(saved) == {"acc", "nmi", "ari"}
    train = datasets.build_dataset("digits", "data", "train", subset=64)
    seed = stage2.get_args_parser().get_default("seed")
    assert kmeans_baseline(train, 10, seed) == saved  # same seed, same numbers
    assert kmeans_baseline(train, 10, seed) == saved
    assert 0 < saved["acc"] <= 100 and saved["nmi"] <= 100  # percent


# ---- CIFAR-100 -> CIFAR-100-20 ----

def test_superclass_constant_is_cifar100s():
    names, coarse = datasets.sources.CIFAR100_CLASSES, datasets.sources.CIFAR20_CLASSES
    assert len(CIFAR100_TO_20) == 100
    assert np.bincount(CIFAR100_TO_20, minlength=20).tolist() == [5] * 20  # five classes per superclass
    known = {"apple": "fruit_and_vegetables", "bicycle": "vehicles_1", "tractor": "vehicles_2",
             "dolphin": "aquatic_mammals", "trout": "fish", "rose": "flowers", "cup": "food_containers",
             "lamp": "household_electrical_devices", "couch": "household_furniture", "bee": "insects",
             "lion": "large_carnivores", "bridge": "large_man-made_outdoor_things",
             "cloud": "large_natural_outdoor_scenes", "elephant": "large_omnivores_and_herbivores",
             "fox": "medium_mammals", "crab": "non-insect_invertebrates", "baby": "people", "snake": "reptiles",
             "hamster": "small_mammals", "oak_tree": "trees"}
    assert sorted(known.values()) == sorted(coarse)  # one class of each superclass
    for fine, superclass in known.items():
        assert coarse[CIFAR100_TO_20[names.index(fine)]] == superclass, fine


def write_cifar100(root, n_train, n_test):
    """Tiny CIFAR-100 files in torchvision's layout: random pixels, fine labels, their real superclasses."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    fine = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine[split] = rng.integers(0, 100, size=n)
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump({"filenames": [f"{i}.png" for i in range(n)], "batch_label": split,
                         "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                         "fine_labels": fine[split].tolist(),
                         "coarse_labels": [CIFAR100_TO_20[c] for c in fine[split]]}, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": list(datasets.sources.CIFAR100_CLASSES),
                     "coarse_label_names": list(datasets.sources.CIFAR20_CLASSES)}, f)
    return fine


@pytest.fixture
def cifar_files_only(monkeypatch):
    """torchvision checks the real files' MD5 sums; these need only exist. Never download."""
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: all(
        os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in self.train_list + self.test_list))

    def offline(*args, **kwargs):
        raise AssertionError("tried to download")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)


@slow
def test_cifar100_encoder_starts_cifar20_stage2(tmp_path, cifar_files_only):
    fine = write_cifar100(tmp_path / "data", n_train=32, n_test=16)
    common = ["--data_dir", tmp_path / "data", "--width", "8", "--low_dim", "32", "--workers", "0",
              "--batch_size", "16", "--epochs", "1"]
    run_main(super_and, common + ["--dataset", "cifar100", "--rounds", "1", "--model_dir", tmp_path / "s1"])
    s1 = load_checkpoint(tmp_path / "s1" / "ckpt_embed.t7")
    assert s1["npc"]["memory"].shape == (32, 32) and s1["args"]["dataset"] == "cifar100"
    assert 0 <= read_log(tmp_path / "s1" / "log_embed.jsonl")[0]["knn_top5"] <= 100
    csv_path = tmp_path / "pred.csv"
    run_main(stage2, common + ["--dataset", "cifar20", "--lr", "0", "--resume", tmp_path / "s1" / "ckpt_embed.t7",
                               "--model_dir", tmp_path / "s2", "--export_predictions", csv_path])
    s2 = load_checkpoint(tmp_path / "s2" / "ckpt_ul_last.t7")
    assert torch.equal(s2["net"]["conv1.weight"], s1["net"]["conv1.weight"])  # lr 0: the CIFAR-100 encoder
    assert all(w.shape == (32, 20) for w in s2["fc"].values())  # 20 clusters
    rows = read_csv(csv_path)
    labels = [int(r["label"]) for r in rows]
    assert labels == [CIFAR100_TO_20[c] for c in fine["train"]]  # the superclasses, not the fine labels
    summary = json.loads((tmp_path / "s2" / "eval.json").read_text())
    assert summary["dataset"] == "cifar20" and len(summary["cluster_sizes"]) == 20
    for h in range(5):
        clusters = [int(r[f"head{h}"]) for r in rows]
        assert all(0 <= c < 20 for c in clusters)
        assert summary["head_acc"][h] == pytest.approx(100 * cluster_accuracy(clusters, labels, 20), abs=1e-9)


# ---- the other network and the paper's heads ----

@slow
def test_resnet101_and_paper_head_norm(tmp_path):
    flags = NARROW_32 + ["--network", "resnet101", "--subset", "16", "--batch_size", "16", "--epochs", "1"]
    run_main(super_and, flags + ["--rounds", "1", "--model_dir", tmp_path / "s1"])
    csv_path = tmp_path / "pred.csv"
    run_main(stage2, flags + ["--head_norm", "paper", "--resume", tmp_path / "s1" / "ckpt_embed.t7",
                              "--model_dir", tmp_path / "s2", "--export_predictions", csv_path])
    for path in (tmp_path / "s1" / "ckpt_embed.t7", tmp_path / "s2" / "ckpt_ul.t7"):
        net = plain_network(load_checkpoint(path), resnet101)  # Bottleneck blocks: 2 x 4 x (8 x 8) features
        assert net.linear.weight.shape == (32, 2 * 4 * 64)
    ckpt = load_checkpoint(tmp_path / "s2" / "ckpt_ul_last.t7")
    assert ckpt["args"]["head_norm"] == "paper"
    train = datasets.build_dataset("digits", "data", "train", subset=16)
    with torch.no_grad():
        feats = plain_network(ckpt, resnet101)(images_of(train))
    rows = read_csv(csv_path)
    weight = ckpt["fc"][f"heads.{ckpt['selected_head']}.weight"]
    paper = head_probabilities(feats, weight, norm_dim=0).max(1).values.tolist()  # Eq. 13: class columns
    released = head_probabilities(feats, weight, norm_dim=1).max(1).values.tolist()
    probability = [float(r["probability"]) for r in rows]
    assert probability == pytest.approx(paper, abs=2e-6)
    assert probability != pytest.approx(released, abs=1e-3)
