"""semi.py checks its --resume file as the stages do: the encoder's data set, image size, network and
embedding dimension against the flags; a continued run's --subset, labelled indexes and position; --test_only
only with a trained classifier. Each bad file is one ``error:`` line and exit status 2."""
import pytest
import torch

import semi
from conftest import NARROWEST, expect_error, run_main
from lib.checkpoint import load_checkpoint, save_checkpoint
from models import NETWORKS

TINY = NARROWEST + ["--subset", "64", "--batch_size", "10", "--labels_per_class", "3"]
pytestmark = pytest.mark.usefixtures("one_thread")


def encoder_file(path, stage=1, **saved):
    """A stage-1 (memory bank) or stage-2 (heads) file of a tiny encoder, with the saved arguments ``saved``
    over those of TINY (``args=None``: none, as in a released file)."""
    torch.manual_seed(0)
    net = NETWORKS[saved.get("network", "resnet18")](low_dim=saved.get("low_dim", 16), width=saved.get("width", 4))
    ckpt = {"net": net.state_dict()}
    if stage == 1:
        ckpt["npc"] = {"memory": torch.randn(64, 16), "params": torch.tensor([0.1, 0.5])}
    else:
        ckpt["fc"] = {f"heads.{i}.weight": torch.randn(16, 10) for i in range(5)}
    if saved.get("args", True) is not None:
        ckpt["args"] = {"dataset": "digits", "network": "resnet18", "width": 4, "low_dim": 16, "image_size": 32,
                        **saved}
    save_checkpoint(ckpt, path)
    return ckpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-epoch semi.py run from scratch: its folder."""
    out = tmp_path_factory.mktemp("semi")
    run_main(semi, TINY + ["--epochs", "2", "--from_scratch", "--model_dir", out])
    return out


def corrupted(trained, tmp_path, change):
    """A copy of the trained run's checkpoint, changed by ``change(ckpt)``, in a fresh folder."""
    ckpt = load_checkpoint(trained / "ckpt_semi.t7")
    change(ckpt)
    save_checkpoint(ckpt, tmp_path / "ckpt_semi.t7")
    return ["--resume", "ckpt_semi.t7", "--model_dir", tmp_path]


def test_encoder_of_other_images_needs_transfer(tmp_path, capsys):
    start = encoder_file(tmp_path / "embed.t7", dataset="cifar10")
    expect_error(capsys, semi, TINY + ["--resume", tmp_path / "embed.t7", "--model_dir", tmp_path / "a"],
                 "trained on cifar10, not --dataset digits", "--transfer")
    assert not (tmp_path / "a").exists()
    run_main(semi, TINY + ["--resume", tmp_path / "embed.t7", "--transfer", "--lr", "0", "--epochs", "1",
                           "--model_dir", tmp_path / "b"])
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("transfer:")]
    assert len(said) == 1 and "trained on cifar10" in said[0]
    ckpt = load_checkpoint(tmp_path / "b" / "ckpt_semi.t7")
    assert torch.equal(ckpt["net"]["conv1.weight"], start["net"]["conv1.weight"])  # lr 0: the file's encoder
    # cifar20's images are cifar100's: no transfer between them (the stages' rule)
    encoder_file(tmp_path / "c100.t7", stage=2, dataset="cifar100")
    assert semi.encoder_start(load_checkpoint(tmp_path / "c100.t7"), "f", semi.get_args_parser().parse_args(
        ["--dataset", "cifar20", "--image_size", "32"])) is None


def test_encoder_of_another_size_network_or_dimension(tmp_path, capsys):
    encoder_file(tmp_path / "size.t7", stage=2, image_size=64)
    expect_error(capsys, semi, TINY + ["--resume", tmp_path / "size.t7", "--model_dir", tmp_path / "o"],
                 "--image_size 64, not 16", "--transfer")
    encoder_file(tmp_path / "wrn.t7", network="wrn28_2")
    expect_error(capsys, semi, TINY + ["--resume", tmp_path / "wrn.t7", "--model_dir", tmp_path / "o"],
                 "pass --network wrn28_2")
    encoder_file(tmp_path / "dim.t7", low_dim=8, args=None)  # no saved arguments: the weights tell
    expect_error(capsys, semi, TINY + ["--resume", tmp_path / "dim.t7", "--model_dir", tmp_path / "o"],
                 "8-dimensional embedding", "pass --low_dim 8")
    assert not (tmp_path / "o").exists()


def test_test_only_needs_a_trained_classifier(trained, tmp_path, capsys):
    encoder_file(tmp_path / "ul.t7", stage=2)
    expect_error(capsys, semi, TINY + ["--test_only", "--resume", tmp_path / "ul.t7", "--model_dir", tmp_path],
                 "stage-2 checkpoint with no trained classifier", "ckpt_semi.t7")
    expect_error(capsys, semi, TINY + ["--test_only", "--from_scratch", "--model_dir", tmp_path],
                 "--resume ckpt_semi.t7")
    run_main(semi, TINY + ["--test_only", "--resume", "ckpt_semi.t7", "--model_dir", trained])
    saved = load_checkpoint(trained / "ckpt_semi.t7")["acc"]
    assert capsys.readouterr().out.splitlines()[-1] == f"test accuracy {saved:.2f}%"


def test_resume_with_another_subset_is_refused(trained, capsys):
    expect_error(capsys, semi, [a if a != "64" else "32" for a in TINY] +
                 ["--epochs", "3", "--resume", "ckpt_semi.t7", "--model_dir", trained],
                 "--subset 64, not 32", "pass --subset 64")


@pytest.mark.parametrize("value", ["1", -1, 1.0, True, None])
def test_corrupt_next_epoch(trained, tmp_path, capsys, value):
    flags = corrupted(trained, tmp_path, lambda ckpt: ckpt.update(next_epoch=value))
    expect_error(capsys, semi, TINY + ["--epochs", "3"] + flags,
                 "next_epoch" if value is not None else "lacks 'next_epoch'")


@pytest.mark.parametrize("change,fragment", [
    (lambda idx: idx.append(64), "labelled index 64, outside the 64 training images"),
    (lambda idx: idx.__setitem__(1, idx[0]), "twice"),
    (lambda idx: idx.pop(), "not 3 of each"),
    (lambda idx: idx.__setitem__(0, "0"), "'labelled_indexes'"),
])
def test_labelled_indexes_are_checked(trained, tmp_path, capsys, change, fragment):
    flags = corrupted(trained, tmp_path, lambda ckpt: change(ckpt["labelled_indexes"]))
    expect_error(capsys, semi, TINY + ["--epochs", "3"] + flags, fragment)


# ---- the paper's defaults per data set; the network recorded ----

@pytest.mark.parametrize("flags,expected", [
    (["--dataset", "cifar10"], (400, 0.005)), (["--dataset", "svhn"], (100, 0.001)),
    (["--dataset", "digits"], (25, 0.005)), (["--dataset", "svhn", "--lr", "0.01"], (100, 0.01)),
    (["--dataset", "cifar10", "--labels_per_class", "25"], (25, 0.005))])
def test_defaults_per_data_set(flags, expected):
    args = semi.resolve_defaults(semi.get_args_parser().parse_args(flags))
    assert (args.labels_per_class, args.lr) == expected
    assert (args.epochs, args.lr_decay_start, args.lr_decay_every, args.method) == (180, 80, 40, "supervised")


def test_defaults_come_in_a_copy():
    args = semi.get_args_parser().parse_args(["--dataset", "svhn"])
    before = dict(vars(args))
    assert semi.resolve_defaults(args).lr == 0.001 and vars(args) == before


@pytest.mark.parametrize("flags", [["--consistency_weight", "5"], ["--rampup_epochs", "3"],
                                   ["--unlabelled_batch_size", "8"], ["--ema_decay", "0.9"],
                                   ["--method", "pi_model", "--ema_decay_rampup", "0.9"]])
def test_a_flag_of_another_method_is_refused(flags, tmp_path, capsys):
    expect_error(capsys, semi, ["--dataset", "digits", "--from_scratch", "--model_dir", tmp_path / "o", *flags],
                 "not of --method")
    assert not (tmp_path / "o").exists()


def test_help_shows_methods_and_defaults():
    text = " ".join(semi.get_args_parser().format_help().split())
    assert "{supervised,pi_model,mean_teacher}" in text
    assert "cifar10 400 labels per class and lr 0.005; svhn 100 labels per class and lr 0.001" in text


def test_wideresnet_run_records_its_network(tmp_path, capsys):
    wrn = [a if a != "4" else "8" for a in TINY] + ["--network", "wrn28_2"]
    run_main(semi, wrn + ["--epochs", "1", "--from_scratch", "--model_dir", tmp_path])
    ckpt = load_checkpoint(tmp_path / "ckpt_semi.t7")
    assert ckpt["args"]["network"] == "wrn28_2" and "layer1.0.bn1.weight" in ckpt["net"]
    assert "conv1_sobel.weight" not in ckpt["net"]  # one RGB trunk
    expect_error(capsys, semi, TINY + ["--network", "resnet18", "--epochs", "2", "--resume", "ckpt_semi.t7",
                                       "--model_dir", tmp_path], "--network wrn28_2, not resnet18",
                 "pass --network wrn28_2")
