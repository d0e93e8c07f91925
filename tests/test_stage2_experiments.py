"""Stage 2's experiment switches (docs/method.md, "The paper's experiments"): a random encoder (--init random)
starts and resumes exactly; heads without normalization (--head_norm none) are used as drawn; the sequential
rows (--cluster) score as scikit-learn does on the same embedding; Fig. 4's entropies and per-class accuracy
in the log are those of the training step and of the checkpoint."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import datasets
import main as stage2
import super_and
from conftest import expect_error, run_main, skip_pictures
from engine import distributed
from engine.system import seed_everything
from lib.checkpoint import load_checkpoint
from lib.diagnostics import EpochEntropies, assignment_entropies
from models import NETWORKS, MultiHeadNormFC

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors; the runs of over 2 s are marked slow
TINY = ["--dataset", "digits", "--width", "4", "--low_dim", "16", "--workers", "0"]
SEED = 1567010775  # the scripts' default --seed


def read_log(directory):
    with open(directory / "log_ul.jsonl") as f:
        return [json.loads(line) for line in f]


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def digits(count):
    """The first ``count`` digits as stage 2 evaluates them (evaluation transform), and their labels."""
    data = datasets.build_dataset("digits", "data", "train", subset=count)
    return torch.stack([data[i]["image"] for i in range(count)]), data.targets.numpy()


def network(ckpt):
    net = NETWORKS["resnet18"](low_dim=16, width=4)
    net.load_state_dict(ckpt["net"])
    return net.eval()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("s1")
    run_main(super_and, TINY + ["--subset", "32", "--batch_size", "16", "--rounds", "1", "--epochs", "1",
                                "--model_dir", out])
    return out / "ckpt_embed.t7"


@pytest.fixture(autouse=True)
def few_pictures(monkeypatch):
    """The pictures of write_report (confusion matrix, clusters) take most of a tiny run: not drawn here."""
    monkeypatch.setattr(stage2, "plot_clusters", lambda *args, **kwargs: None)
    monkeypatch.setattr(stage2, "plot_confusion", lambda *args, **kwargs: None)


@pytest.fixture
def no_curves(monkeypatch):
    """Nor, where a test does not look at them, the log's: no picture at all."""
    skip_pictures(monkeypatch)


@pytest.fixture
def spy(monkeypatch):
    """What each training step gave Fig. 4's accumulation (the heads' outputs) and the heads (the features)."""
    seen = {"outputs": [], "features": []}
    update, gather = EpochEntropies.update, distributed.gather_views

    def spy_update(self, outputs):
        seen["outputs"].append([p.detach().clone() for p in outputs])
        return update(self, outputs)

    def spy_gather(features):
        gathered = gather(features)
        seen["features"].append(gathered.detach().clone())
        return gathered
    monkeypatch.setattr(EpochEntropies, "update", spy_update)
    monkeypatch.setattr(distributed, "gather_views", spy_gather)
    return seen


# ---- --init random ----

@pytest.mark.slow
def test_random_init_starts_from_the_seeded_network_and_resumes_exactly(tmp_path, no_curves):
    flags = TINY + ["--subset", "32", "--batch_size", "16", "--init", "random"]
    run_main(stage2, flags + ["--epochs", "2", "--model_dir", tmp_path / "whole"])
    run_main(stage2, flags + ["--epochs", "1", "--model_dir", tmp_path / "cut"])
    # continued with the same flags, as the experiments harness does
    run_main(stage2, flags + ["--epochs", "2", "--resume", "ckpt_ul_last.t7", "--model_dir", tmp_path / "cut"])
    whole, cut = (load_checkpoint(tmp_path / d / "ckpt_ul_last.t7") for d in ("whole", "cut"))
    assert whole["init"] == cut["init"] == "random" and whole["args"]["init"] == "random"
    assert cut["epoch"] == 1
    for part in ("net", "fc"):
        assert whole[part].keys() == cut[part].keys()
        for key in whole[part]:
            assert torch.equal(whole[part][key], cut[part][key]), key
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / "whole")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / "cut")]
    # with --lr 0 the convolutions stay as drawn: the network drawn under the seed, not a file's
    run_main(stage2, flags + ["--epochs", "1", "--lr", "0", "--model_dir", tmp_path / "lr0"])
    seed_everything(SEED)
    drawn = NETWORKS["resnet18"](low_dim=16, width=4).state_dict()
    trained = load_checkpoint(tmp_path / "lr0" / "ckpt_ul_last.t7")["net"]
    for key in ("conv1.weight", "layer4.1.conv2.weight", "linear.weight"):
        assert torch.equal(trained[key], drawn[key]), key
    # continued without repeating --init: the file says where the run came from, and so do its arguments
    run_main(stage2, TINY + ["--subset", "32", "--batch_size", "16", "--epochs", "2", "--lr", "0", "--resume",
                             "ckpt_ul_last.t7", "--model_dir", tmp_path / "lr0"])
    continued = load_checkpoint(tmp_path / "lr0" / "ckpt_ul_last.t7")
    assert continued["epoch"] == 1 and continued["init"] == "random" and continued["args"]["init"] == "random"


def test_contradicting_flags_are_one_line(stage1, tmp_path, capsys, no_curves):
    out = tmp_path / "o"
    expect_error(capsys, stage2, TINY + ["--init", "random", "--resume", stage1, "--model_dir", out],
                 "--init random", "stage-1")
    expect_error(capsys, stage2, TINY + ["--model_dir", out], "--resume", "--init random")
    expect_error(capsys, stage2, TINY + ["--cluster", "kmeans", "--resume", stage1, "--model_dir", out],
                 "--test_only")
    expect_error(capsys, stage2, TINY + ["--cluster", "kmeans", "--test_only", "--model_dir", out], "--resume")
    expect_error(capsys, stage2, TINY + ["--cluster", "kmeans", "--test_only", "--kmeans_baseline", "--resume", stage1,
                                         "--model_dir", out], "--kmeans_baseline")
    expect_error(capsys, stage2, TINY + ["--cluster", "kmeans", "--test_only", "--init", "random", "--resume",
                                         stage1, "--model_dir", out], "--init random")
    assert not out.exists()
    run_main(stage2, TINY + ["--subset", "16", "--batch_size", "16", "--epochs", "1", "--init", "random",
                             "--head_norm", "none", "--model_dir", tmp_path / "r"])
    ckpt = tmp_path / "r" / "ckpt_ul.t7"
    expect_error(capsys, stage2, TINY + ["--subset", "16", "--cluster", "kmeans", "--test_only", "--resume", ckpt,
                                         "--model_dir", out], "stage-2", "ckpt_embed.t7")
    expect_error(capsys, stage2, TINY + ["--subset", "16", "--test_only", "--resume", ckpt, "--model_dir", out],
                 "--head_norm none")  # its heads are evaluated as they were trained
    for name in ("mutual_information.png", "per_class_accuracy.png"):  # the new pictures are the run's files
        expect_error(capsys, stage2, TINY + ["--subset", "16", "--head_norm", "none", "--test_only", "--resume", ckpt,
                                             "--model_dir", tmp_path / "r", "--export_predictions",
                                             tmp_path / "r" / name], "a file this run writes")
    from_encoder = load_checkpoint(ckpt)
    from_encoder["init"] = "encoder"
    torch.save(from_encoder, tmp_path / "enc.t7")
    expect_error(capsys, stage2, TINY + ["--subset", "16", "--head_norm", "none", "--test_only", "--init", "random",
                                         "--resume", tmp_path / "enc.t7", "--model_dir", out],
                 "started from an encoder")
    assert not out.exists()


# ---- --head_norm none ----

def test_head_norm_none_step_uses_the_drawn_weights(tmp_path, spy, no_curves):
    run_main(stage2, TINY + ["--subset", "16", "--batch_size", "16", "--epochs", "1", "--init", "random",
                             "--head_norm", "none", "--model_dir", tmp_path])
    ckpt = load_checkpoint(tmp_path / "ckpt_ul_last.t7")
    assert ckpt["head_norm"] == ckpt["args"]["head_norm"] == "none"
    assert load_checkpoint(tmp_path / "ckpt_ul.t7")["head_norm"] == "none"
    (features,), (outputs,) = spy["features"], spy["outputs"]  # one step: 16 images, two views
    assert features.shape == (32, 16)
    weight = ckpt["fc"]["heads.0.weight"].double()  # frozen: the step's W
    by_hand = torch.softmax(features.double() @ weight / 0.1, dim=1)
    assert torch.allclose(outputs[0].double(), by_hand, rtol=1e-4, atol=1e-6)
    normalized = torch.softmax(features.double() @ F.normalize(weight, dim=1) / 0.1, dim=1)
    assert not torch.allclose(outputs[0].double(), normalized, rtol=1e-2, atol=1e-3)  # not the released heads


# ---- Fig. 4's diagnostics ----

@pytest.mark.pictures
@pytest.mark.slow
def test_one_step_epochs_log_the_steps_entropies_and_the_checkpoints_per_class_accuracy(tmp_path, spy):
    run_main(stage2, TINY + ["--subset", "32", "--batch_size", "32", "--epochs", "2", "--init", "random",
                             "--model_dir", tmp_path])
    records = read_log(tmp_path)
    assert len(spy["outputs"]) == len(records) == 2  # one step per epoch
    for record, outputs in zip(records, spy["outputs"]):
        assert len(record["h_y"]) == len(record["h_y_given_yhat"]) == 5
        for h, p in enumerate(outputs):
            h_y, h_cond = assignment_entropies(p[:32], p[32:])
            assert record["h_y"][h] == float(h_y) and record["h_y_given_yhat"][h] == float(h_cond)
            # I(y, ŷ) of the epoch's one step is minus that step's Eq. 9 loss of the head
            assert record["h_y"][h] - record["h_y_given_yhat"][h] == pytest.approx(-record["head_losses"][h],
                                                                                   abs=2e-6)
            assert record["mutual_information"][h] == pytest.approx(float(h_y - h_cond), abs=1e-12)
        assert record["mean_head_acc"] == pytest.approx(np.mean(record["head_acc"]), rel=1e-12)
    # the last epoch's per-class accuracy from its checkpoint: its network and heads, Hungarian by hand
    ckpt = load_checkpoint(tmp_path / "ckpt_ul_last.t7")
    images, labels = digits(32)
    heads = MultiHeadNormFC(16, 10)
    heads.load_state_dict(ckpt["fc"])
    with torch.no_grad():
        preds = heads(network(ckpt)(images))[ckpt["selected_head"]].argmax(1).numpy()
    counts = np.zeros((10, 10))
    np.add.at(counts, (preds, labels), 1)
    clusters, classes = linear_sum_assignment(-counts)
    expected = [None] * 10
    for cluster, label in zip(clusters, classes):
        expected[label] = 100 * counts[cluster, label] / (labels == label).sum()
    assert records[-1]["class_acc"] == pytest.approx(expected, rel=1e-12)
    assert np.mean(expected) != pytest.approx(0)
    assert is_png(tmp_path / "mutual_information.png") and is_png(tmp_path / "per_class_accuracy.png")


# ---- --cluster: the sequential rows ----

@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_sequential_scores_are_scikit_learns_on_the_stage1_embedding(stage1, tmp_path, method):
    summary = run_main(stage2, TINY + ["--subset", "32", "--test_only", "--cluster", method, "--resume", stage1,
                                       "--model_dir", tmp_path])
    with open(tmp_path / "eval.json") as f:
        saved = json.load(f)
    assert saved == summary and saved["method"] == method and saved["images"] == 32
    images, labels = digits(32)
    with torch.no_grad():
        embedding = network(load_checkpoint(stage1))(images).double().numpy()
    if method == "kmeans":
        preds = KMeans(10, n_init=10, random_state=SEED % 2**32).fit_predict(embedding)
    else:
        preds = AgglomerativeClustering(n_clusters=10, linkage="ward").fit_predict(embedding)
    counts = np.zeros((10, 10))
    np.add.at(counts, (preds, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    assert saved["acc"] == pytest.approx(100 * counts[rows, cols].sum() / 32, rel=1e-12)
    assert saved["nmi"] == pytest.approx(100 * normalized_mutual_info_score(labels, preds), rel=1e-9)
    assert saved["ari"] == pytest.approx(100 * adjusted_rand_score(labels, preds), rel=1e-9, abs=1e-9)
    assert saved["cluster_sizes"] == np.bincount(preds, minlength=10).tolist()
    assert not (tmp_path / "ckpt_ul.t7").exists()  # nothing trained
