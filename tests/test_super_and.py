"""Stage 1 end to end: a two-round run, released files, and bad input (a resume after a SIGKILL:
test_resume.py)."""
import json
import os

import pytest
import torch

import super_and
from conftest import NARROW, SMALL, run_main, write_released_embed
from conftest import expect_error as shared_expect_error
from lib.checkpoint import load_checkpoint
from lib.protocols import weighted_knn_predict

pytestmark = [pytest.mark.slow,  # every test here runs the script or needs a run of it
              pytest.mark.usefixtures("one_thread")]  # tiny tensors: one thread, no waiting on a second
RELEASED_KEYS = {"net", "npc", "ANs_discovery", "acc", "round", "epoch"}
ANS_BUFFERS = {"samples_num", "anchor_indexes", "instance_indexes", "position", "neighbours", "entropy",
               "consistency"}


def read_log(directory):
    with open(os.path.join(directory, "log_embed.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("s1")
    run_main(super_and, SMALL + ["--rounds", "2", "--epochs", "1", "--model_dir", out])
    return out


def test_two_round_run_writes_log_and_released_checkpoint(two_rounds, capsys):
    records = read_log(two_rounds)
    assert [(r["round"], r["epoch"]) for r in records] == [(0, 0), (1, 0)]
    for key in ("round", "epoch", "lr", "loss", "loss_and", "loss_aug", "loss_ue", "knn_top1", "knn_top5",
                "seconds"):
        assert all(key in r for r in records), key
    assert [r["anchors"] for r in records] == [0, 16]  # floor(64 * 0.25 * round)
    for r in records:
        assert r["loss"] == pytest.approx(r["loss_and"] + r["loss_aug"], rel=1e-5)  # UE weight 0 before epoch 80
        assert 0 <= r["knn_top1"] <= r["knn_top5"] <= 100
    ckpt = load_checkpoint(os.path.join(two_rounds, "ckpt_embed.t7"))
    assert set(ckpt) >= RELEASED_KEYS
    assert set(ckpt["ANs_discovery"]) == ANS_BUFFERS
    assert ckpt["ANs_discovery"]["anchor_indexes"].shape == (16,)
    assert ckpt["npc"]["memory"].shape == (64, 32)
    assert torch.allclose(ckpt["npc"]["params"], torch.tensor([0.1, 0.5]))
    assert (ckpt["round"], ckpt["epoch"]) == (1, 0)
    assert ckpt["acc"] == pytest.approx(records[-1]["knn_top1"] / 100)
    assert ckpt["next"] == {"round": 2, "epoch": 0}
    assert torch.allclose(ckpt["npc"]["memory"].norm(dim=1), torch.ones(64), atol=1e-5)  # every slot updated


def test_full_width_command(tmp_path, capsys):
    """A quick command with the real network (width 64, d = 128): 2 anchors after round 1."""
    run_main(super_and, ["--dataset", "digits", "--subset", "8", "--rounds", "2", "--epochs", "1", "--batch_size",
                         "4", "--workers", "0", "--model_dir", tmp_path])
    out = capsys.readouterr().out
    assert "round 1: 2 anchors" in out
    assert out.count("accuracy: ") == 2
    records = read_log(tmp_path)
    assert [r["anchors"] for r in records] == [0, 2]  # floor(8 * 0.25 * round)
    assert load_checkpoint(os.path.join(tmp_path, "ckpt_embed.t7"))["net"]["linear.weight"].shape == (128, 1024)


def test_released_checkpoint_test_only(tmp_path, capsys):
    """A legacy-format, 'module.'-prefixed ckpt_embed.t7 evaluates with its own weights and bank."""
    path = tmp_path / "ckpt_embed.t7"
    state = write_released_embed(path, num_samples=48)
    top1 = run_main(super_and, ["--dataset", "digits", "--subset", "48", "--workers", "0", "--test_only",
                                "--resume", path, "--model_dir", tmp_path / "out"])
    assert "accuracy: " in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # evaluation writes nothing
    # the same number by hand: features of the test images from the file's weights, kNN against its bank
    import datasets
    from models import resnet18
    net = resnet18()
    net.load_state_dict({k[len("module."):]: v for k, v in state["net"].items()})
    net.eval()
    test = datasets.build_dataset("digits", "data", "test", subset=48)
    train = datasets.build_dataset("digits", "data", "train", subset=48)
    with torch.no_grad():
        feats = net(torch.stack([test[i]["image"] for i in range(len(test))]))
    preds = weighted_knn_predict(feats, state["npc"]["memory"], train.targets, 10)
    assert top1 == pytest.approx((preds == test.targets).float().mean().item() * 100)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = super_and.aug_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss  # 4 steps = epoch 0

    monkeypatch.setattr(super_and, "aug_loss", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_main(super_and, SMALL + ["--rounds", "1", "--epochs", "3", "--model_dir", tmp_path])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0]
    ckpt = load_checkpoint(tmp_path / "ckpt_embed.t7")
    assert (ckpt["round"], ckpt["epoch"]) == (0, 0)
    assert len(read_log(tmp_path)) == 1
    assert torch.isfinite(ckpt["npc"]["memory"]).all()


# ---- bad input: one line on stderr, exit status 2, nothing written or overwritten ----

def expect_error(capsys, args, *fragments):
    shared_expect_error(capsys, super_and, args, *fragments)


@pytest.fixture(scope="module")
def good_ckpt(two_rounds):
    return two_rounds / "ckpt_embed.t7"


def test_unknown_dataset(capsys, tmp_path):
    expect_error(capsys, ["--dataset", "imagenet", "--model_dir", tmp_path / "x"], "imagenet")
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint(capsys, tmp_path):
    expect_error(capsys, SMALL + ["--resume", "nope.t7", "--model_dir", tmp_path], "not found", "nope.t7")


def test_truncated_checkpoint(capsys, tmp_path, good_ckpt):
    data = good_ckpt.read_bytes()
    (tmp_path / "cut.t7").write_bytes(data[: len(data) // 2])
    expect_error(capsys, SMALL + ["--resume", tmp_path / "cut.t7", "--model_dir", tmp_path / "o"],
                 "truncated, corrupt")
    assert not (tmp_path / "o").exists()


def test_foreign_checkpoint(capsys, tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pth")
    expect_error(capsys, SMALL + ["--resume", tmp_path / "other.pth", "--model_dir", tmp_path / "o"],
                 "not a checkpoint of this method")


class Payload:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/super_and_test_payload_ran",))


def test_pickle_with_code_is_refused_and_never_run(capsys, tmp_path):
    torch.save({"net": {}, "npc": Payload()}, tmp_path / "evil.t7")
    if os.path.exists("/tmp/super_and_test_payload_ran"):
        os.rmdir("/tmp/super_and_test_payload_ran")
    expect_error(capsys, SMALL + ["--resume", tmp_path / "evil.t7", "--model_dir", tmp_path / "o"], "evil.t7")
    assert not os.path.exists("/tmp/super_and_test_payload_ran")


def test_bank_size_mismatch(capsys, tmp_path, good_ckpt):
    expect_error(capsys, NARROW + ["--subset", "48", "--batch_size", "16", "--resume", good_ckpt,
                                   "--model_dir", tmp_path / "o"], "--subset 64, not 48")


def test_dimension_mismatch(capsys, tmp_path, good_ckpt):
    args = SMALL + ["--resume", good_ckpt, "--model_dir", tmp_path / "o"]
    args[args.index("--low_dim") + 1] = "16"
    expect_error(capsys, args, "--low_dim 32")


def test_stage2_file_refused(capsys, tmp_path):
    torch.save({"net": {}, "fc": {}, "acc_list": []}, tmp_path / "ckpt_ul.t7")
    expect_error(capsys, SMALL + ["--test_only", "--resume", tmp_path / "ckpt_ul.t7"], "stage-2", "main.py")


def test_test_only_needs_resume(capsys):
    expect_error(capsys, SMALL + ["--test_only"], "--resume")


def test_existing_run_is_not_overwritten(capsys, tmp_path, good_ckpt):
    target = tmp_path / "ckpt_embed.t7"
    target.write_bytes(good_ckpt.read_bytes())
    before = target.read_bytes()
    expect_error(capsys, SMALL + ["--model_dir", tmp_path], "already exists", "--resume")
    assert target.read_bytes() == before


def test_released_file_cannot_continue_training(capsys, tmp_path):
    write_released_embed(tmp_path / "ckpt_embed.t7", num_samples=64, low_dim=128)
    expect_error(capsys, ["--dataset", "digits", "--subset", "64", "--batch_size", "16", "--workers", "0",
                          "--resume", tmp_path / "ckpt_embed.t7", "--model_dir", tmp_path / "o"],
                 "no training state", "--test_only")
