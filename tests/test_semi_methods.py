"""semi.py --method supervised | pi_model | mean_teacher (Table 4): each step's loss is lib/semi_supervised.py's
on the right outputs, unlabelled images' labels never reach it, each method resumes exactly (the teacher
included), and the augmentation follows the data set's registry entry."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms

import datasets
import semi
from conftest import NARROWEST, expect_error, run_main
from lib.checkpoint import load_checkpoint
from lib.semi_supervised import ema_update, semi_supervised_loss
from models import NETWORKS

# 20 labelled and 44 unlabelled images: two steps an epoch, the unlabelled loader restarted within one
TINY = NARROWEST + ["--subset", "64", "--batch_size", "10", "--labels_per_class", "2", "--unlabelled_batch_size", "24"]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- one step ----

def tiny_classifier(network="wrn28_2"):
    torch.manual_seed(0)
    return semi.Classifier(NETWORKS[network](low_dim=16, width=8), 16, 10)


def batches():
    g = torch.Generator().manual_seed(1)
    labelled = {"view1": torch.randn(4, 3, 32, 32, generator=g), "view2": torch.randn(4, 3, 32, 32, generator=g),
                "image": torch.randn(4, 3, 32, 32, generator=g), "target": torch.tensor([3, 1, 4, 1])}
    unlabelled = {"view1": torch.randn(6, 3, 32, 32, generator=g), "view2": torch.randn(6, 3, 32, 32, generator=g),
                  "target": torch.tensor([9] * 6)}
    return labelled, unlabelled


def on_cpu(model, teacher=None):
    """What ``semi.step_losses`` reads of a run's state."""
    return SimpleNamespace(model=model, teacher=teacher, device=torch.device("cpu"))


def method(name):
    return SimpleNamespace(method=name, amp=False)


def test_supervised_step_is_cross_entropy_on_the_labelled_images():
    net, (labelled, _) = tiny_classifier(), batches()
    losses = semi.step_losses(on_cpu(net), labelled, None, 5.0, method("supervised"))
    assert losses.keys() == {"loss"}
    assert torch.equal(losses["loss"], F.cross_entropy(net(labelled["image"]), labelled["target"]))


def test_pi_model_step_is_the_library_loss_on_two_passes_with_gradient_through_both():
    net, (labelled, unlabelled) = tiny_classifier(), batches()
    losses = semi.step_losses(on_cpu(net), labelled, unlabelled, 2.5, method("pi_model"))
    losses["loss"].backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    first = torch.cat([labelled["view1"], unlabelled["view1"]])  # labelled rows first, as the library expects
    second = torch.cat([labelled["view2"], unlabelled["view2"]])
    logits, target_logits = net(torch.cat([first, second])).chunk(2)  # (10, 10) each, one pass as the step
    expected = semi_supervised_loss(logits, labelled["target"], target_logits, 2.5)
    for name in ("loss", "class", "consistency"):
        assert torch.equal(losses[name], expected[name]), name
    assert expected["consistency"] > 0  # two augmentations: the passes differ
    expected["loss"].backward(retain_graph=True)
    assert all(torch.equal(a, p.grad) for a, p in zip(got, net.parameters()))
    # the second pass carries gradient: detaching it changes the classifier's gradient
    net.zero_grad()
    semi_supervised_loss(logits.detach().requires_grad_(), labelled["target"], target_logits, 2.5)["loss"].backward()
    assert not torch.equal(got[-2], net.classifier.weight.grad)


def test_mean_teacher_step_uses_the_teacher_on_view_2_without_gradient():
    student, (labelled, unlabelled) = tiny_classifier(), batches()
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.9)  # a teacher that differs from its student
    losses = semi.step_losses(on_cpu(student, teacher), labelled, unlabelled, 7.0, method("mean_teacher"))
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    logits = student(torch.cat([labelled["view1"], unlabelled["view1"]]))
    target_logits = teacher(torch.cat([labelled["view2"], unlabelled["view2"]]))
    expected = semi_supervised_loss(logits, labelled["target"], target_logits, 7.0)
    for name in ("loss", "class", "consistency"):
        assert torch.equal(losses[name], expected[name]), name


def test_unlabelled_labels_are_not_read():
    net, (labelled, unlabelled) = tiny_classifier("resnet18"), batches()
    for name in ("pi_model", "mean_teacher"):
        teacher = copy.deepcopy(net)
        a = semi.step_losses(on_cpu(net, teacher), labelled, unlabelled, 1.0, method(name))
        without = {k: v for k, v in unlabelled.items() if k != "target"}
        b = semi.step_losses(on_cpu(net, teacher), labelled, without, 1.0, method(name))
        assert torch.equal(a["loss"], b["loss"])


def test_default_weights_and_augmentation_per_data_set():
    assert semi.default_max_weight("pi_model", 4000, 50000) == pytest.approx(8.0)  # 100 M/N
    assert semi.default_max_weight("mean_teacher", 1000, 73257) == 100.0
    kinds = [type(t) for t in semi.weak_augmentation(32, (0.5,) * 3, (0.2,) * 3, "affine").transforms]
    assert transforms.RandomAffine in kinds and transforms.RandomHorizontalFlip not in kinds
    kinds = [type(t) for t in semi.weak_augmentation(32, (0.5,) * 3, (0.2,) * 3, "flip").transforms]
    assert transforms.RandomHorizontalFlip in kinds and transforms.RandomAffine not in kinds
    assert datasets.DATASETS["svhn"].augmentation == "affine"


# ---- whole runs ----

def same_run(a, b):
    ca, cb = load_checkpoint(a / "ckpt_semi.t7"), load_checkpoint(b / "ckpt_semi.t7")
    for key in ("net", "classifier", "teacher"):
        assert (key in ca) == (key in cb)
        if key in ca:
            assert ca[key].keys() == cb[key].keys()
            assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    records = [[json.loads(line) for line in (f / "log_semi.jsonl").read_text().splitlines()] for f in (a, b)]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in rs] for rs in records]
    assert strip[0] == strip[1]
    return ca


@pytest.fixture(scope="module", params=["pi_model", "mean_teacher"])
def whole(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    run_main(semi, TINY + ["--from_scratch", "--method", request.param, "--epochs", "2", "--model_dir", out])
    return request.param, out


@pytest.mark.slow  # two runs of two epochs
def test_resume_is_exact_teacher_included(whole, tmp_path):
    method, out = whole
    run_main(semi, TINY + ["--from_scratch", "--method", method, "--epochs", "1", "--model_dir", tmp_path])
    run_main(semi, TINY + ["--method", method, "--epochs", "2", "--resume", "ckpt_semi.t7", "--model_dir",
                           tmp_path])
    ckpt = same_run(out, tmp_path)
    records = [json.loads(line) for line in (out / "log_semi.jsonl").read_text().splitlines()]
    assert all(r["consistency"] > 0 and r["loss"] > r["class"] for r in records)  # the unsupervised term counts
    if method == "mean_teacher":
        assert not torch.equal(ckpt["teacher"]["classifier.weight"], ckpt["classifier"]["weight"])
        assert all("student_acc" in r for r in records) and ckpt["acc"] == records[-1]["test_acc"]
    else:
        assert "teacher" not in ckpt


def test_test_only_and_another_method(whole, capsys):
    method, out = whole
    last = json.loads((out / "log_semi.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    at_default_size = TINY[:-2]  # no --image_size: evaluated at the 16 px it was trained at
    run_main(semi, at_default_size + ["--test_only", "--resume", "ckpt_semi.t7", "--model_dir", out])
    said = capsys.readouterr().out.splitlines()[-1]
    if method == "mean_teacher":  # the teacher's accuracy reported, the student's beside it
        assert said == f"test accuracy {last['test_acc']:.2f}% (the teacher; the student {last['student_acc']:.2f}%)"
    else:
        assert said == f"test accuracy {last['test_acc']:.2f}%"
    other = "pi_model" if method == "mean_teacher" else "mean_teacher"
    expect_error(capsys, semi, TINY + ["--method", other, "--epochs", "3", "--resume", "ckpt_semi.t7",
                                       "--model_dir", out], f"--method {method}, not {other}")


def test_unlabelled_labels_shuffled_change_nothing(whole, tmp_path, monkeypatch):
    method, out = whole
    labelled = json.loads((out / "labelled_indexes.json").read_text())
    real = datasets.from_args

    def shuffled(args, split, *rest, **kwargs):
        data = real(args, split, *rest, **kwargs)
        if split == "train":
            rest_of = torch.tensor([i for i in range(len(data)) if i not in set(labelled)])
            targets = data.targets.clone()
            targets[rest_of] = targets[rest_of][torch.randperm(len(rest_of), generator=torch.Generator()
                                                               .manual_seed(0))]
            assert (targets != data.targets).sum() > 20
            data.targets = targets
        return data

    monkeypatch.setattr(datasets, "from_args", shuffled)
    monkeypatch.setattr(semi, "draw_labelled", lambda *a: list(labelled))
    run_main(semi, TINY + ["--from_scratch", "--method", method, "--epochs", "2", "--model_dir", tmp_path])
    same_run(out, tmp_path)


def test_mean_teacher_update_follows_the_library(tmp_path, monkeypatch):
    """After each step the teacher is ema_update(teacher, student, α), α = min(1 − 1/(t + 1), 0.99)."""
    seen = []
    real = semi.ema_update

    def spy(teacher, student, alpha):
        before = copy.deepcopy(teacher)
        real(teacher, student, alpha)
        expected = copy.deepcopy(before)
        ema_update(expected, student, alpha)
        seen.append((alpha, all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(),
                                                                    teacher.state_dict().values()))))

    monkeypatch.setattr(semi, "ema_update", spy)
    run_main(semi, TINY + ["--from_scratch", "--method", "mean_teacher", "--epochs", "1", "--model_dir", tmp_path])
    assert [a for a, _ in seen] == [0.0, 0.5] and all(ok for _, ok in seen)  # 20 labelled / 10: two steps

