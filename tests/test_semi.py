"""semi.py: few-label fine-tuning from a pretrained encoder (paper §4.4): the labelled draw, the schedule,
the start from each kind of file, exact resume and bad input."""
import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import semi
from conftest import NARROW, expect_error, run_main
from lib.checkpoint import load_checkpoint
from lib.schedules import semi_lr

SMALL = NARROW + ["--subset", "64", "--batch_size", "10", "--labels_per_class", "3"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread, no waiting on a second


# ---- unit level ----

@pytest.mark.parametrize("epoch,factor", [(0, 1), (79, 1), (80, 0.1), (119, 0.1), (120, 0.01), (159, 0.01),
                                          (160, 0.001), (179, 0.001)])
def test_schedule_decays_at_80_120_160(epoch, factor):
    assert semi_lr(epoch, 0.005) == pytest.approx(0.005 * factor, rel=1e-12)


def test_labelled_draw_is_balanced_exact_and_seeded():
    targets = np.repeat(np.arange(4), [10, 7, 5, 9])
    chosen = semi.draw_labelled(targets, 5, 4, seed=1)
    assert len(chosen) == 20 and len(set(chosen)) == 20
    assert np.bincount(targets[chosen], minlength=4).tolist() == [5, 5, 5, 5]
    assert chosen == semi.draw_labelled(targets, 5, 4, seed=1)
    assert chosen != semi.draw_labelled(targets, 5, 4, seed=2)
    with pytest.raises(Exception, match="class 2 has only 5"):
        semi.draw_labelled(targets, 6, 4, seed=1)


def test_test_accuracy_uses_batchnorm_running_statistics():
    """semi.py's test accuracy is computed in eval mode, whatever mode training left the network in: a hand-built
    classifier (BatchNorm on one feature, hand-set running statistics 0 / 1, logits (x, -x)) puts the images
    1..8 in class 0 with the running statistics (100%), only half of them with each batch's own (50%), and the
    test pass leaves the running statistics where they were."""
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(1))
    net = semi.Classifier(encoder, 1, 2)
    with torch.no_grad():
        net.classifier.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net.classifier.bias.zero_()
    images = torch.arange(1.0, 9.0).reshape(8, 1, 1, 1)
    loader = [{"image": images[:4], "target": torch.zeros(4, dtype=torch.long)},
              {"image": images[4:], "target": torch.zeros(4, dtype=torch.long)}]
    with torch.no_grad():  # the set-up's own check, on a copy (a forward in training mode moves the statistics)
        modes = [[copy.deepcopy(net).train(mode)(b["image"]).argmax(1) for b in loader] for mode in (False, True)]
    assert [torch.cat(p).eq(0).float().mean().item() for p in modes] == [1.0, 0.5], \
        "test set-up: eval and training mode do not score 100% and 50%"
    statistics = [b.clone() for b in encoder[1].buffers()]
    net.train()  # as a training epoch leaves it
    assert semi.test_accuracy(net, loader, torch.device("cpu")) == 100.0, \
        "semi.py's test accuracy is not computed with BatchNorm's running statistics (eval mode)"
    assert all(torch.equal(a, b) for a, b in zip(statistics, encoder[1].buffers())), \
        "semi.py's test pass moved BatchNorm's running statistics"


# ---- end to end ----

@pytest.fixture(scope="module")
def whole(stage1_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("semi")
    summary = run_main(semi, SMALL + ["--epochs", "2", "--resume", stage1_ckpt, "--model_dir", out])
    return out, summary


@pytest.mark.slow
def test_run_writes_indexes_log_checkpoint_and_eval(whole, stage1_ckpt):
    out, summary = whole
    import datasets
    labels = datasets.build_dataset("digits", "data", "train", subset=64).targets.numpy()
    chosen = json.loads((out / "labelled_indexes.json").read_text())
    assert np.bincount(labels[chosen], minlength=10).tolist() == [3] * 10
    records = [json.loads(line) for line in (out / "log_semi.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0 <= r["test_acc"] <= 100 for r in records)
    saved = json.loads((out / "eval_semi.json").read_text())
    assert saved["test_acc"] == records[-1]["test_acc"] == summary["test_acc"]
    assert saved["labelled"] == 30 and saved["labels_per_class"] == 3
    ckpt = load_checkpoint(out / "ckpt_semi.t7")
    assert ckpt["labelled_indexes"] == chosen and ckpt["next_epoch"] == 2
    start = load_checkpoint(stage1_ckpt)["net"]
    assert torch.equal(start["sobel.1.weight"], ckpt["net"]["sobel.1.weight"])  # frozen
    assert not torch.equal(start["conv1.weight"], ckpt["net"]["conv1.weight"])  # the whole network fine-tuned
    assert ckpt["classifier"]["weight"].shape == (10, 32)


@pytest.mark.slow
def test_resume_ends_where_the_whole_run_ends(whole, stage1_ckpt, tmp_path):
    out, _ = whole
    folder = tmp_path / "cut"
    run_main(semi, SMALL + ["--epochs", "1", "--resume", stage1_ckpt, "--model_dir", folder])
    run_main(semi, SMALL + ["--epochs", "2", "--resume", "ckpt_semi.t7", "--model_dir", folder])
    a, b = load_checkpoint(out / "ckpt_semi.t7"), load_checkpoint(folder / "ckpt_semi.t7")
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert torch.equal(a["classifier"]["weight"], b["classifier"]["weight"])
    assert (out / "log_semi.jsonl").read_text().count("\n") == (folder / "log_semi.jsonl").read_text().count("\n")


@pytest.mark.slow
def test_scratch_baseline_starts_elsewhere(stage1_ckpt, tmp_path):
    run_main(semi, SMALL + ["--epochs", "1", "--from_scratch", "--lr", "0", "--model_dir", tmp_path / "a"])
    run_main(semi, SMALL + ["--epochs", "1", "--resume", stage1_ckpt, "--lr", "0", "--model_dir", tmp_path / "b"])
    scratch, pretrained = load_checkpoint(tmp_path / "a" / "ckpt_semi.t7"), load_checkpoint(tmp_path / "b" /
                                                                                          "ckpt_semi.t7")
    assert torch.equal(pretrained["net"]["conv1.weight"], load_checkpoint(stage1_ckpt)["net"]["conv1.weight"])
    assert not torch.equal(scratch["net"]["conv1.weight"], pretrained["net"]["conv1.weight"])
    assert json.loads((tmp_path / "a" / "eval_semi.json").read_text())["start"] == "scratch"


@pytest.mark.slow  # needs a stage-1 run
def test_bad_input(stage1_ckpt, capsys, tmp_path):
    out = tmp_path / "o"
    expect_error(capsys, semi, SMALL + ["--model_dir", out], "--resume", "--from_scratch")
    expect_error(capsys, semi, SMALL + ["--from_scratch", "--resume", stage1_ckpt, "--model_dir", out],
                 "either")
    expect_error(capsys, semi, NARROW + ["--subset", "64", "--labels_per_class", "50", "--from_scratch",
                                         "--model_dir", out], "--labels_per_class 50", "only")
    expect_error(capsys, semi, NARROW + ["--subset", "64", "--labels_per_class", "1", "--from_scratch",
                                         "--model_dir", out], "fewer than --batch_size")
    assert not out.exists()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(stage1_ckpt, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = semi.F.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss  # 30 labelled images / batch 10: epoch 0 = 3 steps

    monkeypatch.setattr(semi, "F", SimpleNamespace(cross_entropy=poisoned))
    with pytest.raises(SystemExit) as exit_info:
        run_main(semi, SMALL + ["--epochs", "3", "--resume", stage1_ckpt, "--model_dir", tmp_path])
    assert exit_info.value.code == 3
    assert "non-finite" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "ckpt_semi.t7")
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["net"].values() if v.is_floating_point())
