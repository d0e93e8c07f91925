"""A resume goes on with the run it resumes (docs/running.md, "A crash, a kill, Ctrl-C"): the flags left out take
the checkpoint's values, so ``--resume CKPT`` alone (and the run's length) ends bit for bit where the uninterrupted
run ends, for all four scripts; a flag given with another value that changes the method mid-run is one ``error:``
line, exit 2, nothing written, unless --allow_change names it; the "changed arguments" line lists only what the
command changed. Runs of one-step epochs on 32 digits and a network of width 4; stage 1's in the fast suite, the
other three scripts' slow."""

import pytest
import torch

import joint
import main as stage2
import semi
import super_and
from conftest import NARROWEST, expect_error, folder_bytes, run_main, same_state
from engine.cli import ArgumentParser
from engine.lifecycle import resume_arguments
from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.errors import InputError
from models import NETWORKS

pytestmark = pytest.mark.usefixtures("no_pictures")
# non-default method flags everywhere, so that a resume that put the defaults back would show
BASE = NARROWEST + ["--subset", "32", "--seed", "7", "--lr", "0.02"]
HERE = ["--workers", "0"]  # how the resumed run runs: not a flag of the method


def whole_and_cut(module, flags, length, tmp_path, capsys):
    """``module`` run whole (``length``: its length flag and the whole and cut values) and cut, then the cut
    run resumed with its length alone; returns the resumed run's console output."""
    flag, whole, cut = length
    run_main(module, flags + [flag, whole, "--model_dir", tmp_path / "whole"])
    run_main(module, flags + [flag, cut, "--model_dir", tmp_path / "cut"])
    capsys.readouterr()
    ckpt = {semi: "ckpt_semi.t7", super_and: "ckpt_embed.t7", stage2: "ckpt_ul_last.t7", joint: "ckpt_joint.t7"}
    run_main(module, HERE + [flag, whole, "--resume", ckpt[module], "--model_dir", tmp_path / "cut"])
    out = capsys.readouterr().out
    assert f"changed arguments: {flag} {cut} -> {whole}\n" in out, out  # only what the command changed
    return out


def test_flags_left_out_take_the_checkpoints_and_a_method_flag_is_refused():
    parser = ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--rampup_epochs", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--allow_change", nargs="+", default=[])
    ckpt = {"args": {"lr": 0.5, "rampup_epochs": 1, "epochs": 3, "workers": 0, "subset": 64}}
    parsed = parser.parse_args(["--epochs", "5"])
    assert parsed.given == {"epochs"} and "given" not in vars(parsed)  # a checkpoint saves the flags alone
    args = resume_arguments(parsed, ckpt, "f", parser, free=("epochs",))
    assert (args.lr, args.rampup_epochs, args.epochs, args.workers, args.subset) == (0.5, 1, 5, 4, 64)
    assert resume_arguments(parser.parse_args(["--lr", "0.5"]), ckpt, "f", parser).lr == 0.5  # the same value
    with pytest.raises(InputError, match=r"--rampup_epochs 1, not 80: that would change the method mid-run.*"
                                         r"--allow_change rampup_epochs"):
        resume_arguments(parser.parse_args(["--rampup_epochs", "80"]), ckpt, "f", parser)  # given, even at default
    args = resume_arguments(parser.parse_args(["--lr", "0.05", "--allow_change", "lr"]), ckpt, "f", parser)
    assert (args.lr, args.rampup_epochs) == (0.05, 1)
    with pytest.raises(InputError, match=r"--subset 64, not 32; pass --subset 64"):  # never, --allow_change or not
        resume_arguments(parser.parse_args(["--subset", "32", "--allow_change", "subset"]), ckpt, "f", parser)
    with pytest.raises(InputError, match="--allow_change nope: not a flag"):
        resume_arguments(parser.parse_args(["--allow_change", "nope"]), ckpt, "f", parser)


@pytest.mark.slow
def test_semi_resume_without_its_flags_ends_where_the_whole_run_ends(tmp_path, capsys):
    flags = BASE + ["--batch_size", "10", "--labels_per_class", "2", "--method", "mean_teacher", "--rampup_epochs",
                    "1", "--ema_decay", "0.9", "--lr_decay_start", "1", "--from_scratch"]
    whole_and_cut(semi, flags, ("--epochs", "2", "1"), tmp_path, capsys)
    a, b = load_checkpoint(tmp_path / "whole" / "ckpt_semi.t7"), load_checkpoint(tmp_path / "cut" / "ckpt_semi.t7")
    same_state(a, b, ignore=("args", "log_record", "start"))
    assert (b["args"]["labels_per_class"], b["args"]["rampup_epochs"], b["args"]["ema_decay"]) == (2, 1, 0.9)
    before = folder_bytes(tmp_path / "cut")  # a method flag at another value: refused, nothing written
    for changed in (["--rampup_epochs", "80"], ["--ema_decay", "0.99"], ["--lr", "0.005"]):
        expect_error(capsys, semi, HERE + changed + ["--epochs", "3", "--resume", "ckpt_semi.t7", "--model_dir",
                                                     tmp_path / "cut"], f"{changed[0]} ", "--allow_change")
    expect_error(capsys, semi, HERE + ["--labels_per_class", "25", "--epochs", "3", "--resume", "ckpt_semi.t7",
                                       "--model_dir", tmp_path / "cut"], "--labels_per_class 2, not 25")
    assert folder_bytes(tmp_path / "cut") == before


def test_stage1_resume_without_its_flags_ends_where_the_whole_run_ends(tmp_path, capsys):
    flags = BASE + ["--batch_size", "16", "--epochs", "1", "--npc_t", "0.2", "--ANs_select_rate", "0.5"]
    whole_and_cut(super_and, flags, ("--rounds", "2", "1"), tmp_path, capsys)
    same_state(load_checkpoint(tmp_path / "whole" / "ckpt_embed.t7"),
               load_checkpoint(tmp_path / "cut" / "ckpt_embed.t7"), ignore=("args", "log_record"))
    before = folder_bytes(tmp_path / "cut")
    expect_error(capsys, super_and, HERE + ["--npc_t", "0.1", "--rounds", "3", "--resume", "ckpt_embed.t7",
                                            "--model_dir", tmp_path / "cut"], "--npc_t 0.2, not 0.1")
    expect_error(capsys, super_and, HERE + ["--epochs", "2", "--rounds", "3", "--resume", "ckpt_embed.t7",
                                            "--model_dir", tmp_path / "cut"], "--epochs 1, not 2")
    assert folder_bytes(tmp_path / "cut") == before
    run_main(super_and, HERE + ["--resume", "ckpt_embed.t7", "--model_dir", tmp_path / "cut"])  # done: says so
    assert "nothing to train" in capsys.readouterr().out
    assert folder_bytes(tmp_path / "cut") == before


@pytest.mark.slow
def test_stage2_resume_without_its_flags_ends_where_the_whole_run_ends(tmp_path, capsys):
    torch.manual_seed(0)  # a random encoder of the network BASE builds, as a stage-1 file
    encoder = tmp_path / "ckpt_embed.t7"
    save_checkpoint({"net": NETWORKS["resnet18"](low_dim=16, width=4).state_dict(), "npc": {},
                     "args": {"dataset": "digits"}}, encoder)
    flags = BASE + ["--batch_size", "16", "--tau_c", "0.2", "--lambda_cp", "0.5", "--head_norm", "paper",
                    "--resume", encoder]
    whole_and_cut(stage2, flags, ("--epochs", "2", "1"), tmp_path, capsys)
    same_state(load_checkpoint(tmp_path / "whole" / "ckpt_ul_last.t7"),
               load_checkpoint(tmp_path / "cut" / "ckpt_ul_last.t7"), ignore=("args", "log_record"))
    before = folder_bytes(tmp_path / "cut")
    expect_error(capsys, stage2, HERE + ["--head_norm", "released", "--epochs", "3", "--resume", "ckpt_ul_last.t7",
                                         "--model_dir", tmp_path / "cut"], "--head_norm paper, not released")
    assert folder_bytes(tmp_path / "cut") == before


@pytest.mark.slow
def test_joint_resume_without_its_flags_ends_where_the_whole_run_ends(tmp_path, capsys):
    flags = BASE + ["--batch_size", "16", "--epochs", "1", "--lambda_cp", "0.5"]
    whole_and_cut(joint, flags, ("--rounds", "2", "1"), tmp_path, capsys)
    a, b = load_checkpoint(tmp_path / "whole" / "ckpt_joint.t7"), load_checkpoint(tmp_path / "cut" / "ckpt_joint.t7")
    same_state(a, b, ignore=("args", "log_record"))
    before = folder_bytes(tmp_path / "cut")
    expect_error(capsys, joint, HERE + ["--epochs", "5", "--rounds", "3", "--resume", "ckpt_joint.t7", "--model_dir",
                                        tmp_path / "cut"], "--epochs 1, not 5", "ckpt_joint.t7")
    for script in (super_and, semi):  # named as what it is, not as a stage-2 file
        expect_error(capsys, script, BASE + ["--test_only", "--resume", tmp_path / "cut" / "ckpt_joint.t7",
                                             "--model_dir", tmp_path / "elsewhere"], "a joint-model checkpoint")
    assert folder_bytes(tmp_path / "cut") == before
    run_main(joint, HERE + ["--resume", "ckpt_joint.t7", "--model_dir", tmp_path / "cut"])  # done: says so
    assert "nothing to train" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "cut" / "ckpt_joint.t7")["next"] == b["next"]
