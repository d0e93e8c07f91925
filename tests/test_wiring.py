"""How the scripts are wired, checked through their stable surfaces only: ``get_args_parser()`` + ``main(args)``,
the files a run writes (checkpoints read with ``weights_only=True``, ``log_*.jsonl``, ``eval*.json``, CSV), and
the functions of lib/ and models/. Every accuracy a script prints or saves is recomputed here from the saved
checkpoint in eval mode with lib.protocols; what a run trains on is observed through the data loaders it builds.

The helpers at the top are shared with tests/test_resume.py and tests/test_golden_semi.py.
"""
import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import datasets
import main as stage2
import semi
import super_and
from conftest import ROOT, run_main
from lib.checkpoint import load_checkpoint, load_network
from lib.protocols import clustering_metrics, compute_features, knn_accuracy
from models import MultiHeadNormFC, resnet18
from models.resnet import SobelResNet

LOW_DIM, WIDTH = 16, 4
TINY = ["--dataset", "digits", "--width", str(WIDTH), "--low_dim", str(LOW_DIM), "--workers", "0"]
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread", "no_pictures")


# -------------------------------------------------------------------------------- helpers

def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses_of(records):
    """A log without its wall-clock times: what must repeat bit for bit."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def network(state, low_dim=LOW_DIM, width=WIDTH):
    """A narrow ResNet-18 holding ``state``, in eval mode."""
    net = resnet18(low_dim=low_dim, width=width)
    load_network(net, state, "checkpoint")
    return net.eval()


def features_of(net, dataset, batch_size=100):
    """The embeddings of ``dataset`` (evaluation transform, loader order), network in eval mode."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return compute_features(net, loader, CPU)


def heads_of(fc, num_classes, low_dim=LOW_DIM):
    heads = MultiHeadNormFC(low_dim, num_classes, num_heads=len(fc))
    heads.load_state_dict(fc)
    return heads


def head_predictions(net_state, fc, dataset):
    """(H, N) argmax clusters of every head of a stage-2 file on ``dataset``."""
    with torch.no_grad():
        feats = features_of(network(net_state), dataset)
        return torch.stack(heads_of(fc, dataset.num_classes)(feats)).argmax(2)


def head_scores(net_state, fc, dataset):
    """Every head's ACC / NMI / ARI in % as the log and eval.json name them."""
    targets = dataset.targets.numpy()
    metrics = [clustering_metrics(p.numpy(), targets, dataset.num_classes)
               for p in head_predictions(net_state, fc, dataset)]
    return {f"head_{m}": [100 * x[m] for x in metrics] for m in ("acc", "nmi", "ari")}


def other_heads(fc, seed=12345):
    """Heads of the same shapes drawn from another stream than any run's seed."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in fc.items()}


def write_stage1(path, num_samples, seed=0, low_dim=LOW_DIM, width=WIDTH, statistics_of=None):
    """A minimal stage-1 file for stage 2 and semi.py to start from: a freshly drawn narrow network (BatchNorm
    running statistics at their initial 0 / 1, or those of the data set ``statistics_of``) and a memory bank."""
    torch.manual_seed(seed)
    net = resnet18(low_dim=low_dim, width=width)
    if statistics_of is not None:
        data_statistics(net, statistics_of)
    memory = F.normalize(torch.randn(num_samples, low_dim), dim=1)
    torch.save({"net": net.state_dict(), "npc": {"memory": memory, "params": torch.tensor([0.1, 0.5])},
                "stage": 1}, path)
    return net.state_dict()


def write_stage2(path, num_classes, dataset, seed=0, num_heads=5):
    """A minimal stage-2 file (network and heads only, like a released ckpt_ul.t7) for ``--test_only``: a
    fresh network whose BatchNorm statistics are those of ``dataset`` (so that its images spread over the
    clusters), random heads."""
    torch.manual_seed(seed)
    net = data_statistics(resnet18(low_dim=LOW_DIM, width=WIDTH), dataset)
    heads = MultiHeadNormFC(LOW_DIM, num_classes, num_heads)
    torch.save({"net": net.state_dict(), "fc": heads.state_dict(), "stage": 2}, path)


def equal(a, b, where="state"):
    """Recursive exact equality of checkpoint contents (tensors bit for bit, NaN == NaN); asserts."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for key in a:
            equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            equal(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b or (a != a and b != b), (where, a, b)


class LoaderSpy:
    """Records every ``torch.utils.data.DataLoader`` built while installed: its data set's size and
    targets, batch size, whether it drops the last partial batch, and its number of batches."""

    def __init__(self, monkeypatch):
        self.loaders = []
        real = torch.utils.data.DataLoader
        spy = self

        class Recorded(real):
            def __init__(self, dataset, *args, **kwargs):
                super().__init__(dataset, *args, **kwargs)
                base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
                targets = base.targets[torch.as_tensor(dataset.indices)] if base is not dataset else base.targets
                spy.loaders.append({"size": len(dataset), "targets": torch.as_tensor(targets).clone(),
                                    "batch_size": self.batch_size, "drop_last": self.drop_last,
                                    "batches": len(self), "two_views": getattr(base, "views", 1) == 2})

        monkeypatch.setattr(torch.utils.data, "DataLoader", Recorded)

    def training(self):
        """Training loaders: two-view or shuffled with the partial batch dropped."""
        return [x for x in self.loaders if x["drop_last"]]

    def evaluation(self):
        return [x for x in self.loaders if not x["drop_last"]]


def snapshot_saves(monkeypatch, name, folder):
    """Copy ``name`` into ``folder`` (as <n>.t7, n = 0, 1, ...) each time a checkpoint of that name is
    renamed into place (every checkpoint write ends in an atomic rename)."""
    os.makedirs(folder, exist_ok=True)
    real = os.replace
    count = [0]

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if os.path.basename(str(dst)) == name:
            shutil.copyfile(dst, os.path.join(folder, f"{count[0]}.t7"))
            count[0] += 1

    monkeypatch.setattr(os, "replace", replace)
    return count


def method_knn_constants():
    """K and σ of the weighted kNN, as docs/method.md states them in its "Weighted kNN" section."""
    with open(os.path.join(ROOT, "docs", "method.md")) as f:
        text = f.read()
    section = text.split("### Weighted kNN", 1)[1].split("\n##", 1)[0]
    k = int(re.search(r"K = ([\d,]+)", section).group(1).replace(",", ""))
    sigma = float(re.search(r"σ = ([\d.]+)", section).group(1).rstrip("."))
    return k, sigma


# -------------------------------------------------------------------------------- 1. kNN at K = 200

def test_method_states_the_released_knn_constants():
    assert method_knn_constants() == (200, 0.1)


def data_statistics(net, dataset):
    """``net`` with BatchNorm running statistics averaged over ``dataset`` (evaluation transform), in eval
    mode: a fresh narrow network whose embeddings spread (with its initial 0 / 1 they nearly coincide)."""
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches
            module.reset_running_stats()
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=len(dataset)):
            net.train()(batch["image"])
    return net.eval()


@pytest.fixture(scope="module")
def stage1_bank_of_256(tmp_path_factory):
    """Stage 1 on 256 digits (a memory bank larger than K), continued for one epoch from a file whose network
    has its BatchNorm statistics from the data and whose bank holds its embeddings, at --lr 0: a kNN well
    above chance, so that K and σ change the numbers. The first epoch itself scores at chance."""
    out = tmp_path_factory.mktemp("knn")
    flags = TINY + ["--subset", "256", "--batch_size", "128", "--epochs", "1", "--model_dir", out]
    run_main(super_and, flags + ["--rounds", "1"])
    first = load_checkpoint(out / "ckpt_embed.t7")
    train = datasets.build_dataset("digits", "data", "train", subset=256)
    net = data_statistics(network(first["net"]), train)
    crafted = {**first, "net": net.state_dict(), "npc": {**first["npc"], "memory": features_of(net, train)}}
    torch.save(crafted, out / "ckpt_embed.t7")
    run_main(super_and, flags + ["--rounds", "2", "--lr", "0", "--allow_change", "lr", "--resume", "ckpt_embed.t7"])
    return out, first


@pytest.mark.slow
def test_stage1_knn_recomputed_from_the_checkpoint_at_the_documented_k_and_sigma(stage1_bank_of_256, capsys):
    out, first = stage1_bank_of_256
    ckpt = load_checkpoint(out / "ckpt_embed.t7")
    bank = ckpt["npc"]["memory"]
    assert bank.shape == (256, LOW_DIM) and (ckpt["round"], ckpt["epoch"]) == (1, 0)  # more rows than K
    train = datasets.build_dataset("digits", "data", "train", subset=256)
    test = datasets.build_dataset("digits", "data", "test", subset=256)
    k, sigma = method_knn_constants()

    def knn(ckpt, k, sigma):
        feats = features_of(network(ckpt["net"]), test)
        return knn_accuracy(feats, ckpt["npc"]["memory"], train.targets, test.targets, 10, k=k, sigma=sigma)

    want = knn(ckpt, k, sigma)
    assert want[0] > 15, f"test set-up: the crafted bank scores {want[0]}%, not well above chance (10%)"
    assert knn(ckpt, 50, sigma)[0] != want[0] and knn(ckpt, k, 0.02) != want, \
        "test set-up: on these data another K or σ scores the same, they cannot tell the constants apart"
    log = read_log(out / "log_embed.jsonl")
    assert [(r["round"], r["epoch"]) for r in log] == [(0, 0), (1, 0)]
    assert (log[-1]["knn_top1"], log[-1]["knn_top5"]) == want
    assert ckpt["acc"] == pytest.approx(want[0] / 100, abs=1e-12)
    assert (log[0]["knn_top1"], log[0]["knn_top5"]) == knn(first, k, sigma)  # the first epoch's, at chance
    capsys.readouterr()
    got = run_main(super_and, TINY + ["--subset", "256", "--test_only", "--resume", out / "ckpt_embed.t7",
                                      "--model_dir", out])
    assert got == want[0]
    assert f"accuracy: {want[0]:.2f}" in capsys.readouterr().out


# ------------------------------------------------------------------------ 1. Hungarian, more clusters than classes

def write_cifar100_few_coarse(root, n_train=60, n_test=10, coarse_classes=3, seed=5):
    """CIFAR-100 files in torchvision's layout whose coarse labels use only ``coarse_classes`` of the 20."""
    import pickle
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        coarse = [int(v) for v in rng.integers(0, coarse_classes, size=n)]
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump({"filenames": [f"{i}.png" for i in range(n)], "batch_label": split, "data": rows,
                         "fine_labels": fine, "coarse_labels": coarse}, f)
        written[split] = np.array(coarse), np.array(fine)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f)
    return written


@pytest.fixture
def cifar_files(monkeypatch):
    """torchvision checks MD5 sums of the real CIFAR files; the synthetic ones only need to exist."""
    import torchvision.datasets.cifar as tv_cifar
    from torchvision.datasets import CIFAR10
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive",
                        lambda *a, **k: pytest.fail("a test tried to download"))


def scipy_hungarian(preds, targets, num_clusters):
    """ACC from scipy's linear_sum_assignment on the (clusters x present classes) confusion matrix."""
    classes = np.unique(targets)
    confusion = np.zeros((num_clusters, len(classes)), dtype=np.int64)
    for p, t in zip(preds, targets):
        confusion[p, np.searchsorted(classes, t)] += 1
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return confusion[rows, cols].sum() / len(targets)


@pytest.mark.parametrize("case", ["digits", "cifar20"])
def test_hungarian_scores_with_more_clusters_than_classes(case, tmp_path, cifar_files):
    """Neither --dataset folder nor digits accepts a --num_classes above its class count (an error, tested
    elsewhere); here the labels use fewer classes than the heads have clusters: 8 of digits' 10 (the first 8
    images), 3 of CIFAR-100-20's 20 coarse classes."""
    if case == "digits":
        flags, num_clusters, present = TINY + ["--subset", "8"], 10, 8
    else:
        write_cifar100_few_coarse(str(tmp_path / "data"))
        flags, num_clusters, present = (["--dataset", "cifar20", "--data_dir", tmp_path / "data", "--width",
                                         str(WIDTH), "--low_dim", str(LOW_DIM), "--workers", "0"], 20, 3)
    dataset = datasets.build_dataset(case, str(tmp_path / "data") if case == "cifar20" else "data", "train",
                                     subset=8 if case == "digits" else None)
    write_stage2(tmp_path / "heads.t7", num_clusters, dataset)
    summary = run_main(stage2, flags + ["--test_only", "--resume", tmp_path / "heads.t7", "--model_dir", tmp_path])
    ckpt = load_checkpoint(tmp_path / "heads.t7")
    targets = dataset.targets.numpy()
    assert len(np.unique(targets)) == present < num_clusters
    preds = head_predictions(ckpt["net"], ckpt["fc"], dataset).numpy()
    assert max(len(np.unique(p)) for p in preds) > 1  # not a trivial one-cluster answer
    saved = json.loads((tmp_path / "eval.json").read_text())
    for h, p in enumerate(preds):
        assert saved["head_acc"][h] == pytest.approx(100 * scipy_hungarian(p, targets, num_clusters), abs=1e-9)
        assert saved["head_nmi"][h] == pytest.approx(100 * normalized_mutual_info_score(targets, p), abs=1e-9)
        assert saved["head_ari"][h] == pytest.approx(100 * adjusted_rand_score(targets, p), abs=1e-9)
    assert summary["head_acc"] == saved["head_acc"]


# -------------------------------------------------------------------------------- stage 2: one run

STAGE2 = TINY + ["--subset", "64", "--batch_size", "16", "--lr", "0.002"]


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory):
    """Three epochs of stage 2 from a fresh narrow network, a copy of ckpt_ul_last.t7 kept after each epoch."""
    out = tmp_path_factory.mktemp("stage2")
    start = write_stage1(out / "start.t7", 64)
    with pytest.MonkeyPatch.context() as mp:
        snapshot_saves(mp, "ckpt_ul_last.t7", out / "epochs")
        summary = run_main(stage2, STAGE2 + ["--epochs", "3", "--resume", out / "start.t7", "--model_dir", out / "run"])
    snapshots = [load_checkpoint(out / "epochs" / f"{e}.t7") for e in range(3)]
    return out / "run", snapshots, start, summary


@pytest.fixture(scope="module")
def digits64():
    return datasets.build_dataset("digits", "data", "train", subset=64)


@pytest.mark.slow
def test_stage2_log_and_eval_json_are_the_checkpoints_scores(stage2_run, digits64):
    run, snapshots, _, summary = stage2_run
    records = read_log(run / "log_ul.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for record, ckpt in zip(records, snapshots):
        want = head_scores(ckpt["net"], ckpt["fc"], digits64)
        for key in want:
            assert record[key] == want[key], (record["epoch"], key)
        assert ckpt["acc_list"] == want["head_acc"]
    saved = json.loads((run / "eval.json").read_text())
    last = head_scores(snapshots[-1]["net"], snapshots[-1]["fc"], digits64)
    for key in last:
        assert saved[key] == last[key] == summary[key]
    h = saved["selected_head"]
    assert (saved["acc"], saved["nmi"], saved["ari"]) == (last["head_acc"][h], last["head_nmi"][h],
                                                          last["head_ari"][h])
    assert saved["images"] == 64


# hand-set epoch losses: the best epoch (lowest mean loss) is neither the first nor the last, the loss rises
# after it, and each epoch's lowest head loss is another head than its highest and than the other epochs'
HAND_LOSSES = [3.0, 2.0, 2.5]
HAND_HEAD_LOSSES = [[0.5, 0.1, 0.9, 0.3, 0.7], [0.2, 0.6, 0.4, 0.05, 0.8], [0.15, 0.5, 0.45, 0.35, 0.25]]


@pytest.fixture(scope="module")
def stage2_hand_set(tmp_path_factory):
    """Three epochs of stage 2 (one step each, real training) whose epoch losses are hand-set: ``main.run_epoch``
    trains as it does, then returns HAND_LOSSES / HAND_HEAD_LOSSES for the epoch instead of the means it measured,
    so that which epoch is best and which head is selected hold on any machine. Kept: a copy of ckpt_ul_last.t7
    after each epoch, of ckpt_ul.t7 at each write, and for each pass of the network, whether it computed
    gradients (a training step) or not (the evaluation) and the modes of the network and its BatchNorm layers."""
    out = tmp_path_factory.mktemp("stage2_hand_set")
    start = write_stage1(out / "start.t7", 16)
    real_epoch, real_forward = stage2.run_epoch, SobelResNet.forward
    measured, passes = [], []

    def hand_set_epoch(*args, **kwargs):
        means = real_epoch(*args, **kwargs)
        measured.append(means)
        epoch = len(measured) - 1
        heads = HAND_HEAD_LOSSES[epoch]
        assign = float(np.mean(heads))
        return {**means, "loss": HAND_LOSSES[epoch], "loss_assign": assign, "loss_cp": HAND_LOSSES[epoch] - assign,
                "head_losses": heads}

    def spied_forward(net, images):
        passes.append((torch.is_grad_enabled(), {m.training for m in net.modules()
                                                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}))
        return real_forward(net, images)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage2, "run_epoch", hand_set_epoch)
        mp.setattr(SobelResNet, "forward", spied_forward)
        snapshot_saves(mp, "ckpt_ul_last.t7", out / "epochs")
        snapshot_saves(mp, "ckpt_ul.t7", out / "best")
        summary = run_main(stage2, TINY + ["--subset", "16", "--batch_size", "16", "--epochs", "3", "--resume",
                                           out / "start.t7", "--model_dir", out / "run"])
    run = out / "run"
    snapshots = [load_checkpoint(out / "epochs" / f"{e}.t7") for e in range(3)]
    best_writes = [load_checkpoint(out / "best" / f) for f in sorted(os.listdir(out / "best"))]
    log = read_log(run / "log_ul.jsonl")
    assert [r["loss"] for r in log] == HAND_LOSSES and [r["head_losses"] for r in log] == HAND_HEAD_LOSSES, \
        "test set-up: the hand-set losses did not reach the log"
    assert len(measured) == 3 and all(np.isfinite(m["loss"]) for m in measured), "test set-up: no real epochs"
    return {"run": run, "snapshots": snapshots, "best_writes": best_writes, "log": log, "summary": summary,
            "passes": passes, "start": start}


def test_best_epoch_is_the_lowest_mean_training_loss_and_holds_its_weights(stage2_hand_set):
    """ckpt_ul.t7 is the epoch of lowest mean training loss (released semantics), written at that epoch only:
    hand-set losses 3.0, 2.0, 2.5 make it epoch 1, neither the first nor the last."""
    snapshots = stage2_hand_set["snapshots"]
    assert not torch.equal(snapshots[1]["net"]["conv1.weight"], snapshots[2]["net"]["conv1.weight"]), \
        "test set-up: epochs 1 and 2 hold the same weights, the best file could not tell them apart"
    best = load_checkpoint(stage2_hand_set["run"] / "ckpt_ul.t7")
    assert best["epoch"] == 1, f"ckpt_ul.t7 holds epoch {best['epoch']}, not the lowest-loss epoch 1"
    equal(best["net"], snapshots[1]["net"], "net")
    equal(best["fc"], snapshots[1]["fc"], "fc")
    assert best["head_losses"] == HAND_HEAD_LOSSES[1] and best["selected_head"] == 3
    assert [w["epoch"] for w in stage2_hand_set["best_writes"]] == [0, 1], \
        "ckpt_ul.t7 must be written at each new lowest loss only (epochs 0 and 1), not at epoch 2"
    assert (snapshots[-1]["best_loss"], snapshots[-1]["best_epoch"]) == (2.0, 1)


def test_selected_head_is_the_lowest_training_loss(stage2_hand_set):
    """Each epoch's selected head is its lowest training loss (hand-set: heads 1, 3, 0; the highest are 2, 4, 1),
    in the log, both checkpoints, eval.json and the returned summary, and it is the head whose scores are
    reported."""
    log, snapshots = stage2_hand_set["log"], stage2_hand_set["snapshots"]
    assert [int(np.argmin(h)) for h in HAND_HEAD_LOSSES] == [1, 3, 0]
    assert [r["selected_head"] for r in log] == [1, 3, 0], "the selected head is not each epoch's lowest head loss"
    assert [c["selected_head"] for c in snapshots] == [1, 3, 0]
    assert load_checkpoint(stage2_hand_set["run"] / "ckpt_ul.t7")["selected_head"] == 3
    for record in log:
        assert (record["acc"], record["nmi"], record["ari"]) == tuple(
            record[f"head_{m}"][record["selected_head"]] for m in ("acc", "nmi", "ari"))
    saved = json.loads((stage2_hand_set["run"] / "eval.json").read_text())
    assert saved["selected_head"] == stage2_hand_set["summary"]["selected_head"] == 0
    assert saved["acc"] == saved["head_acc"][0] == log[-1]["head_acc"][0]


def test_stage2_trains_in_training_mode_and_scores_in_eval_mode(stage2_hand_set):
    """Every training step runs the network with all its BatchNorm layers in training mode, and BatchNorm's
    running statistics move once a step; every evaluation pass (no gradients) runs them in eval mode."""
    passes, start = stage2_hand_set["passes"], stage2_hand_set["start"]
    training, scoring = [m for g, m in passes if g], [m for g, m in passes if not g]
    assert len(training) == 3 and len(scoring) == 3, "test set-up: not 3 steps and 3 evaluation batches"
    assert all(m == {True} for m in training), "the encoder (or a BatchNorm layer of it) trained in eval mode"
    assert all(m == {False} for m in scoring), "stage 2 scored its clusters with BatchNorm in training mode"
    final = stage2_hand_set["snapshots"][-1]["net"]
    assert int(final["bn1.num_batches_tracked"]) == 3, "BatchNorm did not update its statistics at every step"
    assert torch.equal(start["bn1.running_mean"], torch.zeros_like(start["bn1.running_mean"]))  # fresh: 0 / 1
    for key in ("bn1.running_mean", "bn1.running_var", "bn1_sobel.running_mean", "layer4.1.bn2.running_var"):
        assert not torch.equal(final[key], start[key]), f"BatchNorm's {key} did not move in training"


# -------------------------------------------------------------------------------- 5. heads from the file

@pytest.mark.slow
def test_test_only_scores_the_files_heads_not_the_seeds(stage2_run, digits64, tmp_path):
    run, _, _, _ = stage2_run
    ckpt = load_checkpoint(run / "ckpt_ul.t7")
    ckpt["fc"] = other_heads(ckpt["fc"])
    torch.save(ckpt, tmp_path / "other.t7")
    run_main(stage2, STAGE2 + ["--test_only", "--resume", tmp_path / "other.t7", "--model_dir", tmp_path,
                               "--export_predictions", tmp_path / "p.csv"])
    want = head_scores(ckpt["net"], ckpt["fc"], digits64)
    preds = head_predictions(ckpt["net"], ckpt["fc"], digits64)
    trained = head_predictions(ckpt["net"], load_checkpoint(run / "ckpt_ul.t7")["fc"], digits64)
    assert not torch.equal(preds, trained), "test set-up: the drawn heads cluster the images as the file's own do"
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["head_acc"] == want["head_acc"] and saved["head_nmi"] == want["head_nmi"]
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 64
    for h in range(5):
        assert [int(r[f"head{h}"]) for r in rows] == preds[h].tolist()
    assert [int(r["cluster"]) for r in rows] == preds[ckpt["selected_head"]].tolist()


@pytest.mark.slow
def test_resume_keeps_the_files_heads_not_the_seeds(stage2_run, digits64, tmp_path):
    run, _, _, _ = stage2_run
    ckpt = load_checkpoint(run / "ckpt_ul_last.t7")
    heads = other_heads(ckpt["fc"])
    ckpt["fc"] = heads
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "ckpt_ul_last.t7")
    run_main(stage2, STAGE2 + ["--epochs", "4", "--resume", "ckpt_ul_last.t7", "--model_dir", tmp_path / "run"])
    final = load_checkpoint(tmp_path / "run" / "ckpt_ul_last.t7")
    assert final["epoch"] == 3
    equal(final["fc"], heads, "fc")  # frozen: the file's heads, kept
    record = read_log(tmp_path / "run" / "log_ul.jsonl")[-1]
    assert record["epoch"] == 3
    assert record["head_acc"] == head_scores(final["net"], heads, digits64)["head_acc"]


# -------------------------------------------------------------------------------- 3. what is trained

def stl10_files(root, n_train=10, n_test=6, n_unlabeled=14):
    from data_files import write_stl10
    return write_stl10(str(root), n_train=n_train, n_test=n_test, n_unlabeled=n_unlabeled)


STL = ["--dataset", "stl10", "--width", str(WIDTH), "--low_dim", str(LOW_DIM), "--workers", "0", "--batch_size", "8"]


def test_stl10_stage1_trains_on_train_and_unlabeled_and_scores_on_test(tmp_path, monkeypatch):
    written = stl10_files(tmp_path / "data")
    spy = LoaderSpy(monkeypatch)
    run_main(super_and, STL + ["--data_dir", tmp_path / "data", "--model_dir", tmp_path / "run", "--rounds", "1",
                               "--epochs", "1"])
    (train,) = spy.training()
    assert train["size"] == 10 + 14 and train["batches"] == 24 // 8 and train["two_views"]
    assert train["targets"].tolist() == written["train"][1].tolist() + [-1] * 14
    (test,) = spy.evaluation()
    assert test["targets"].tolist() == written["test"][1].tolist()
    assert load_checkpoint(tmp_path / "run" / "ckpt_embed.t7")["npc"]["memory"].shape == (24, LOW_DIM)


def test_stl10_stage2_trains_and_scores_on_the_labelled_train_and_test(tmp_path, monkeypatch):
    written = stl10_files(tmp_path / "data")
    write_stage1(tmp_path / "start.t7", 24)
    spy = LoaderSpy(monkeypatch)
    summary = run_main(stage2, STL + ["--data_dir", tmp_path / "data", "--model_dir", tmp_path / "run", "--epochs",
                                      "1", "--resume", tmp_path / "start.t7"])
    labelled = written["train"][1].tolist() + written["test"][1].tolist()
    (train,) = spy.training()
    assert train["size"] == 16 and train["batches"] == 16 // 8 and train["two_views"]
    assert train["targets"].tolist() == labelled  # not the unlabeled images, not the test images alone
    (scored,) = spy.evaluation()
    assert scored["targets"].tolist() == labelled
    assert summary["images"] == 16


def test_cifar20_trains_and_scores_on_the_coarse_labels(tmp_path, monkeypatch, cifar_files):
    written = write_cifar100_few_coarse(str(tmp_path / "data"), n_train=32, n_test=8, coarse_classes=20)
    coarse = written["train"][0].tolist()
    assert coarse != written["train"][1].tolist()
    write_stage1(tmp_path / "start.t7", 32)
    flags = ["--dataset", "cifar20", "--data_dir", tmp_path / "data", "--width", str(WIDTH), "--low_dim",
             str(LOW_DIM), "--workers", "0", "--batch_size", "16"]
    spy = LoaderSpy(monkeypatch)
    run_main(super_and, flags + ["--model_dir", tmp_path / "s1", "--rounds", "1", "--epochs", "1"])
    (train,) = spy.training()
    assert train["targets"].tolist() == coarse  # the kNN monitor's voters and the anchors' consistency
    (test,) = spy.evaluation()
    assert test["targets"].tolist() == written["test"][0].tolist()
    spy.loaders.clear()
    run_main(stage2, flags + ["--model_dir", tmp_path / "s2", "--epochs", "1", "--resume", tmp_path / "start.t7"])
    (train,) = spy.training()
    (scored,) = spy.evaluation()
    assert train["targets"].tolist() == scored["targets"].tolist() == coarse
    ckpt = load_checkpoint(tmp_path / "s2" / "ckpt_ul_last.t7")
    assert all(w.shape == (LOW_DIM, 20) for w in ckpt["fc"].values())
    scores = head_scores(ckpt["net"], ckpt["fc"], datasets.build_dataset("cifar20", str(tmp_path / "data"), "train"))
    assert read_log(tmp_path / "s2" / "log_ul.jsonl")[-1]["head_acc"] == scores["head_acc"]


def write_labelled_folder(root, per_class=(5, 4, 3), size=12, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c, n in enumerate(per_class):
        os.makedirs(os.path.join(root, f"class{c}"))
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, f"class{c}", f"{i}.png"))


def test_folder_trains_and_scores_on_all_its_images(tmp_path, monkeypatch):
    write_labelled_folder(str(tmp_path / "images"))
    flags = ["--dataset", "folder", "--data_dir", tmp_path / "images", "--width", str(WIDTH), "--low_dim",
             str(LOW_DIM), "--workers", "0", "--batch_size", "4"]
    spy = LoaderSpy(monkeypatch)
    run_main(super_and, flags + ["--model_dir", tmp_path / "run", "--rounds", "1", "--epochs", "1"])
    (train,) = spy.training()
    assert train["size"] == 12 and train["batches"] == 3
    assert spy.evaluation() == []  # no held-out images: no kNN monitor
    assert read_log(tmp_path / "run" / "log_embed.jsonl")[-1]["knn_top1"] is None
    spy.loaders.clear()
    summary = run_main(stage2, flags + ["--model_dir", tmp_path / "run", "--epochs", "1", "--resume",
                                        "ckpt_embed.t7"])
    (train,) = spy.training()
    (scored,) = spy.evaluation()
    assert train["size"] == scored["size"] == summary["images"] == 12
    assert scored["targets"].tolist() == [0] * 5 + [1] * 4 + [2] * 3


def test_semi_trains_on_the_drawn_labels_and_tests_on_the_test_split_in_eval_mode(tmp_path, monkeypatch):
    spy = LoaderSpy(monkeypatch)
    passes, forward = [], semi.Classifier.forward  # each pass: (with gradients?, the BatchNorm layers' modes)

    def spied(net, x):
        passes.append((torch.is_grad_enabled(), {m.training for m in net.modules()
                                                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}))
        return forward(net, x)
    monkeypatch.setattr(semi.Classifier, "forward", spied)
    summary = run_main(semi, TINY + ["--subset", "64", "--batch_size", "10", "--labels_per_class", "2",
                                     "--epochs", "1", "--from_scratch", "--model_dir", tmp_path])
    (train,) = spy.training()
    chosen = json.loads((tmp_path / "labelled_indexes.json").read_text())
    labels = datasets.build_dataset("digits", "data", "train", subset=64).targets
    assert train["size"] == 20 and train["batches"] == 2
    assert train["targets"].tolist() == labels[chosen].tolist()
    (test,) = spy.evaluation()
    assert test["targets"].tolist() == datasets.build_dataset("digits", "data", "test", subset=64).targets.tolist()
    assert summary["labelled"] == 20
    training, testing = [m for g, m in passes if g], [m for g, m in passes if not g]
    assert len(training) == 2 and len(testing) == 1, "test set-up: not 2 training steps and 1 test batch"
    assert all(m == {True} for m in training), "semi.py trained with BatchNorm in eval mode"
    assert all(m == {False} for m in testing), "semi.py's test accuracy was computed with BatchNorm in training mode"


# -------------------------------------------------------------------------------- 4. semi.py's accuracy

def semi_accuracy(ckpt, dataset, low_dim=LOW_DIM, width=WIDTH, train_mode=False):
    """Test accuracy (%) of a semi.py file: its network and linear classifier, in eval mode."""
    net = network(ckpt["net"], low_dim, width).train(train_mode)
    classifier = torch.nn.Linear(low_dim, dataset.num_classes)
    classifier.load_state_dict(ckpt["classifier"])
    with torch.no_grad():
        preds = classifier(features_of(net, dataset)).argmax(1)
    return 100.0 * (preds == dataset.targets).sum().item() / len(dataset)


@pytest.mark.slow
def test_semi_test_accuracy_is_the_checkpoints(tmp_path):
    """A short run's classifier scores at chance; so the run is continued for one epoch at --lr 0 from a file
    whose classifier is the nearest class mean of the labelled images' embeddings (well above chance)."""
    train = datasets.build_dataset("digits", "data", "train", subset=64)
    start = tmp_path / "start.t7"
    write_stage1(start, 64, statistics_of=train)
    flags = TINY + ["--subset", "64", "--batch_size", "10", "--labels_per_class", "3", "--model_dir", tmp_path]
    run_main(semi, flags + ["--epochs", "1", "--resume", start])
    first = load_checkpoint(tmp_path / "ckpt_semi.t7")
    labelled = first["labelled_indexes"]
    feats = features_of(network(first["net"]), torch.utils.data.Subset(train, labelled))
    targets = train.targets[labelled]
    centre = feats.mean(0)
    weight = 100 * torch.stack([feats[targets == c].mean(0) - centre for c in range(10)])
    first["classifier"] = {"weight": weight, "bias": -weight @ centre}
    torch.save(first, tmp_path / "ckpt_semi.t7")
    summary = run_main(semi, flags + ["--epochs", "2", "--lr", "0", "--allow_change", "lr", "--resume",
                                      "ckpt_semi.t7"])
    ckpt = load_checkpoint(tmp_path / "ckpt_semi.t7")
    test = datasets.build_dataset("digits", "data", "test", subset=64)
    want = semi_accuracy(ckpt, test)
    assert want > 15, f"test set-up: the nearest-class-mean classifier scores {want}%, not above chance (10%)"
    assert read_log(tmp_path / "log_semi.jsonl")[-1]["test_acc"] == want == ckpt["acc"] == summary["test_acc"]
    assert json.loads((tmp_path / "eval_semi.json").read_text())["test_acc"] == want
    train_split = datasets.build_dataset("digits", "data", "train", subset=64)
    assert semi_accuracy(ckpt, train_split) != want, \
        "test set-up: the training images score as the test images, the check cannot tell the splits apart"
