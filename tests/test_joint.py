"""The joint model of Table 3 (``joint.py``; docs/method.md, "The joint model (Table 3)"): its step is one SGD
step on the sum of both stages' losses as lib/ computes them, and a run killed after its first epoch resumes to
the uninterrupted run's checkpoint bit for bit."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from test_variants import B, batch
from test_variants import fresh_state as stage1_state

import joint
import main as stage2
from conftest import NARROWEST, ROOT, expect_error, run_main, write_released_embed
from lib.checkpoint import load_checkpoint
from lib.losses import and_loss, aug_loss, iic_loss, ue_loss
from models import MultiHeadNormFC

pytestmark = pytest.mark.usefixtures("one_thread")
C = 3
ARGS = SimpleNamespace(amp=False, batch_t=0.1, batch_m=1.0, lambda_cp=0.5)
TINY = NARROWEST + ["--subset", "64", "--batch_size", "16", "--rounds", "2", "--epochs", "1"]


def fresh_state():
    """The variants' tiny state (network, a bank with 12 anchors, optimizer) with three frozen heads drawn next."""
    state = stage1_state()
    state.heads = MultiHeadNormFC(8, C, num_heads=3, temperature=0.1)
    return state


def test_joint_step_is_a_step_on_the_sum_of_both_stages_losses():
    """The step's loss and parts equal lib/'s losses on the same features (stage 1: AND + AUG + w·UE on the
    memory logits; stage 2: the heads' mean Eq. 9 + λ · Eq. 11 on the embeddings), and its network is the
    network after one SGD step on that sum, bit for bit."""
    weight = 0.4
    state = fresh_state()
    images, indexes = batch()
    parts = joint.train_step(state, images, indexes, weight, ARGS)

    hand = fresh_state()
    features = hand.net(images)  # (2B, 8)
    logits = hand.bank(features)
    neighbours, is_anchor = hand.neighbourhoods.lookup(indexes)
    assert 0 < int(is_anchor.sum()) < B  # the AND loss has anchors and instances here
    l_and, l_aug, l_ue = (and_loss(logits, indexes, neighbours, is_anchor), aug_loss(logits, 0.1, 1.0),
                          ue_loss(logits, indexes))
    head_losses = torch.stack([iic_loss(p[:B], p[B:]) for p in hand.heads(features)])
    l_cp = aug_loss(features, 0.1, 1.0)
    loss = l_and + l_aug + weight * l_ue + head_losses.mean() + 0.5 * l_cp
    for name, value in {"loss": loss, "loss_and": l_and, "loss_aug": l_aug, "loss_ue": l_ue,
                        "loss_assign": head_losses.mean(), "loss_cp": l_cp, "head_losses": head_losses}.items():
        assert torch.equal(parts[name], value.detach()), name
    hand.optimizer.zero_grad()
    loss.backward()
    hand.optimizer.step()
    for (name, got), want in zip(state.net.state_dict().items(), hand.net.state_dict().values()):
        assert torch.equal(got, want), name
    assert all(torch.equal(a, b) for a, b in zip(state.heads.state_dict().values(), hand.heads.state_dict().values()))
    # the stage-2 losses do move the network: a stage-1 step alone ends elsewhere
    alone = fresh_state()
    features = alone.net(images)
    logits = alone.bank(features)
    stage1_loss = and_loss(logits, indexes, neighbours, is_anchor) + aug_loss(logits, 0.1, 1.0) \
        + weight * ue_loss(logits, indexes)
    stage1_loss.backward()
    alone.optimizer.step()
    assert not torch.equal(alone.net.linear.weight, state.net.linear.weight)


def test_parser_is_the_union_of_both_stages_flags():
    """Stage 1's flags, main.py's heads and λ flags (with main.py's choices), stage 1's learning rate."""
    args = joint.get_args_parser().parse_args([])
    assert (args.lr, args.epochs, args.rounds, args.num_heads, args.tau_c, args.lambda_cp) == (0.03, 200, 5, 5, 0.1,
                                                                                                1.0)
    assert (args.ANs_select_rate, args.npc_t, args.batch_t, args.head_norm) == (0.25, 0.1, 0.1, "released")
    choices = {a.dest: a.choices for a in stage2.get_args_parser()._actions}
    assert {a.dest: a.choices for a in joint.get_args_parser()._actions}["head_norm"] == choices["head_norm"]
    assert not hasattr(args, "variant")


def test_a_stage1_file_is_refused(tmp_path, capsys):
    write_released_embed(tmp_path / "ckpt_embed.t7", num_samples=64, low_dim=16)
    expect_error(capsys, joint, TINY + ["--resume", tmp_path / "ckpt_embed.t7", "--model_dir", tmp_path / "o"],
                 "not a checkpoint of joint.py")
    expect_error(capsys, joint, TINY + ["--test_only"], "--resume")


def read_log(directory):
    with open(os.path.join(directory, "log_joint.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_short_run_killed_after_its_first_epoch_resumes_exactly(tmp_path, monkeypatch, capsys):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "joint.py"), *TINY, "--model_dir", str(killed)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (os.path.exists(killed / "log_joint.jsonl") and (killed / "log_joint.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(killed / "ckpt_joint.t7")["next"] != {"round": 2, "epoch": 0}  # really cut short
    assert not (killed / "eval.json").exists()

    for picture in ("plot_clusters", "plot_confusion"):  # seconds each; tested in tests/test_outputs.py
        monkeypatch.setattr(stage2, picture, lambda *args, **kwargs: None, raising=False)
    summary = run_main(joint, TINY + ["--model_dir", whole])
    run_main(joint, TINY + ["--model_dir", killed, "--resume", "ckpt_joint.t7"])
    a, b = load_checkpoint(whole / "ckpt_joint.t7"), load_checkpoint(killed / "ckpt_joint.t7")
    for key in ("net", "npc", "ANs_discovery", "fc"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert len(a["ANs_discovery"]["anchor_indexes"]) == 16  # floor(64 · 0.25) anchors in round 1
    log = read_log(whole)
    assert [(r["round"], r["epoch"]) for r in log] == [(0, 0), (1, 0)]
    assert [r["loss"] for r in read_log(killed)] == [r["loss"] for r in log]
    for r in log:  # the log's loss is the sum of its parts (UE's weight is 0 before epoch 80)
        assert r["loss"] == pytest.approx(r["loss_and"] + r["loss_aug"] + r["loss_assign"] + r["loss_cp"], rel=1e-5)
        assert r["selected_head"] == min(range(5), key=r["head_losses"].__getitem__)

    # scored as stage 2 scores its heads: eval.json has the last epoch's selected head; main.py reads the file
    with open(whole / "eval.json") as f:
        scores = json.load(f)
    assert scores["selected_head"] == log[-1]["selected_head"] == a["selected_head"]
    assert scores["acc"] == log[-1]["acc"] == summary["acc"] == log[-1]["head_acc"][scores["selected_head"]]
    with open(killed / "eval.json") as f:
        assert json.load(f)["acc"] == scores["acc"]
    again = run_main(stage2, TINY[:-4] + ["--test_only", "--resume", whole / "ckpt_joint.t7",
                                          "--model_dir", tmp_path / "main"])
    assert again["acc"] == scores["acc"]
    expect_error(capsys, stage2, TINY[:-4] + ["--resume", whole / "ckpt_joint.t7", "--model_dir", tmp_path / "m2"],
                 "is a joint-model file: continue it with 'joint.py --resume")
