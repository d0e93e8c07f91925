"""Resume, in one place (docs/running.md, "A crash, a kill, Ctrl-C"): where a run is cut, and what flags the
resumed command takes.

**Where a run is cut.** Resume at every kind of position, each against the uninterrupted run, bit for bit: the
final checkpoint (weights, memory bank, anchors, heads, classifier, optimizer state, every random stream) and
the log's values (all but wall-clock seconds).

Where a kill comes matters only through the files it leaves, so a run is cut in one of three ways:
- ``killed_run``: the script in a child process that SIGKILLs itself right after its N-th checkpoint of
  a given name has been renamed into place (every checkpoint write ends in an atomic rename), i.e. before
  that epoch's log line, the hardest instant (the log is one record short);
- fewer epochs, where the flags make that the same files: stage 2's and semi.py's learning rate depends on
  the epoch index alone (not on --epochs) and their checkpoint's next epoch is epoch + 1 whatever --epochs
  is, so ``--epochs 1`` then ``--epochs 2`` is a cut after epoch 0; stage 1's ``--rounds 1`` leaves the
  file a 2-round run writes at its round boundary (--rounds enters only a range check and the loop bound);
- a copy of the checkpoint and log lines an uninterrupted run had written after an earlier epoch (kept by
  test_wiring's ``snapshot_saves``), resumed in another folder: in this process, on one step an epoch, the
  fast test (make test-fast) of a resumed stage-1 run; the others are slow.

**The flags of a resume.** A resume goes on with the run it resumes: the flags left out take the checkpoint's
values, so ``--resume CKPT`` alone (and the run's length) ends bit for bit where the uninterrupted run ends, for
all four scripts; a flag given with another value that changes the method mid-run is one ``error:``
line, exit 2, nothing written, unless --allow_change names it; the "changed arguments" line lists only what the
command changed. Runs of one-step epochs on 32 digits and a network of width 4; stage 1's in the fast suite, the
other three scripts' slow.

Resume is also checked where its cause is tested: signals then resume (test_faults.py), a kill at every write of
stage 2 and a finished run resumed (test_run_folder.py), two processes resumed with one or two
(test_distributed.py), each method's own state (the teacher: test_semi_methods.py; the variants:
test_variants.py; the random start: test_stage2_experiments.py; the joint model: test_joint.py), the harness
(test_paper.py).
"""
import filecmp
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from test_wiring import TINY, equal, losses_of, read_log, snapshot_saves, write_stage1

import joint
import main as stage2
import semi
import super_and
from conftest import NARROWEST, ROOT, expect_error, folder_bytes, run_main, same_state
from engine.cli import ArgumentParser
from engine.lifecycle import resume_arguments
from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.errors import InputError
from models import NETWORKS

pytestmark = pytest.mark.usefixtures("one_thread", "no_pictures")  # slow but for three one-step tests

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
name, count = sys.argv[1], int(sys.argv[2])
real, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == name and count == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
    if os.path.basename(str(dst)) == name:
        seen[0] += 1
        if seen[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
import importlib
from engine.cli import run_cli
module = importlib.import_module(sys.argv[3])
run_cli(module.main, module.get_args_parser(), sys.argv[4:])
"""


def killed_run(script, args, name, count):
    """Run ``script`` (a module name) with ``args`` in a child process SIGKILLed right after its ``count``-th
    write of the checkpoint ``name`` (``count`` 0: right before the first is renamed into place)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLER.format(root=ROOT), name, str(count), script,
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])
    return done


def same_run(a, b, log, keys):
    """The two run folders' final checkpoints agree on ``keys`` bit for bit, and their logs on every value."""
    for key in keys:
        if key == "log_record":
            assert losses_of([a[key]]) == losses_of([b[key]])
        else:
            equal(a[key], b[key], key)
    assert losses_of(read_log(log[0])) == losses_of(read_log(log[1]))


# -------------------------------------------------------------------------------- stage 1

STAGE1 = TINY + ["--subset", "32", "--batch_size", "16", "--epochs", "2"]
STAGE1_KEYS = ("net", "npc", "ANs_discovery", "optimizer", "rng", "round", "epoch", "next", "acc", "log_record")


def test_stage1_resumed_mid_round_trains_only_the_epochs_left(tmp_path):
    """A fast cut: a one-round, two-epoch run on 16 digits (one step an epoch), its first checkpoint (epoch 0)
    and log line copied to a new folder and resumed there: only epoch 1 is trained, never the saved epoch 0
    again, and the run ends where the whole run ends."""
    flags = TINY + ["--subset", "16", "--batch_size", "16", "--rounds", "1", "--epochs", "2"]
    with pytest.MonkeyPatch.context() as mp:
        snapshot_saves(mp, "ckpt_embed.t7", tmp_path / "saves")
        run_main(super_and, flags + ["--model_dir", tmp_path / "whole"])
    cut = tmp_path / "cut"
    os.makedirs(cut)
    (cut / "ckpt_embed.t7").write_bytes((tmp_path / "saves" / "0.t7").read_bytes())
    first_line = (tmp_path / "whole" / "log_embed.jsonl").read_text().splitlines(keepends=True)[0]
    (cut / "log_embed.jsonl").write_text(first_line)
    saved = load_checkpoint(cut / "ckpt_embed.t7")
    assert (saved["round"], saved["epoch"]) == (0, 0) and json.loads(first_line)["epoch"] == 0, \
        "test set-up: the cut is not the checkpoint and log line of epoch 0"
    assert saved["next"] == {"round": 0, "epoch": 1}, f"epoch 0's checkpoint says the next is {saved['next']}"
    trained, real = [], super_and.train_and_save

    def spied(run, state, epoch, args):
        trained.append((state.round, epoch))
        return real(run, state, epoch, args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(super_and, "train_and_save", spied)
        run_main(super_and, flags + ["--model_dir", cut, "--resume", "ckpt_embed.t7"])
    assert trained == [(0, 1)], f"the resumed run trained (round, epoch) {trained}, not only the (0, 1) left"
    assert [(r["round"], r["epoch"]) for r in read_log(cut / "log_embed.jsonl")] == [(0, 0), (0, 1)]
    same_run(load_checkpoint(tmp_path / "whole" / "ckpt_embed.t7"), load_checkpoint(cut / "ckpt_embed.t7"),
             (tmp_path / "whole" / "log_embed.jsonl", cut / "log_embed.jsonl"), STAGE1_KEYS)


@pytest.fixture(scope="module")
def stage1_whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("s1whole")
    run_main(super_and, STAGE1 + ["--rounds", "2", "--model_dir", out])
    return out


@pytest.mark.slow
def test_stage1_killed_in_the_middle_of_a_round(stage1_whole, tmp_path):
    """Killed after round 1's first epoch (anchors discovered, one epoch of the round left), before its log
    line: the resumed run keeps the file's anchors and ends where the whole run ends."""
    killed_run("super_and", STAGE1 + ["--rounds", "2", "--model_dir", tmp_path], "ckpt_embed.t7", 3)
    cut = load_checkpoint(tmp_path / "ckpt_embed.t7")
    assert (cut["round"], cut["epoch"]) == (1, 0) and cut["next"] == {"round": 1, "epoch": 1}
    assert len(read_log(tmp_path / "log_embed.jsonl")) == 2  # the killed epoch's line is missing
    assert (tmp_path / "run.lock").exists()  # left by the killed process
    run_main(super_and, STAGE1 + ["--rounds", "2", "--model_dir", tmp_path, "--resume", "ckpt_embed.t7"])
    same_run(load_checkpoint(stage1_whole / "ckpt_embed.t7"), load_checkpoint(tmp_path / "ckpt_embed.t7"),
             (stage1_whole / "log_embed.jsonl", tmp_path / "log_embed.jsonl"), STAGE1_KEYS)


@pytest.mark.slow
def test_stage1_resumed_at_a_round_boundary(stage1_whole, tmp_path):
    run_main(super_and, STAGE1 + ["--rounds", "1", "--model_dir", tmp_path])
    cut = load_checkpoint(tmp_path / "ckpt_embed.t7")
    assert cut["next"] == {"round": 1, "epoch": 0}
    run_main(super_and, STAGE1 + ["--rounds", "2", "--model_dir", tmp_path, "--resume", "ckpt_embed.t7"])
    same_run(load_checkpoint(stage1_whole / "ckpt_embed.t7"), load_checkpoint(tmp_path / "ckpt_embed.t7"),
             (stage1_whole / "log_embed.jsonl", tmp_path / "log_embed.jsonl"), STAGE1_KEYS)


# -------------------------------------------------------------------------------- stage 2

STAGE2 = TINY + ["--subset", "32", "--batch_size", "16"]
STAGE2_KEYS = ("net", "fc", "optimizer", "rng", "epoch", "next_epoch", "best_loss", "best_epoch", "head_losses",
               "selected_head", "acc_list", "log_record")
BEST_KEYS = ("net", "fc", "epoch", "head_losses", "selected_head", "acc_list")


@pytest.fixture(scope="module")
def stage2_start(tmp_path_factory):
    out = tmp_path_factory.mktemp("s2start")
    write_stage1(out / "start.t7", 32)
    return out / "start.t7"


@pytest.fixture(scope="module")
def stage2_whole(stage2_start, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2whole")
    run_main(stage2, STAGE2 + ["--epochs", "2", "--resume", stage2_start, "--model_dir", out])
    return out


def stage2_same(whole, cut):
    same_run(load_checkpoint(whole / "ckpt_ul_last.t7"), load_checkpoint(cut / "ckpt_ul_last.t7"),
             (whole / "log_ul.jsonl", cut / "log_ul.jsonl"), STAGE2_KEYS)
    best_whole, best_cut = load_checkpoint(whole / "ckpt_ul.t7"), load_checkpoint(cut / "ckpt_ul.t7")
    for key in BEST_KEYS:
        equal(best_whole[key], best_cut[key], key)
    assert json.loads((whole / "eval.json").read_text()) == json.loads((cut / "eval.json").read_text())


@pytest.mark.slow
def test_stage2_resumed_mid_run(stage2_start, stage2_whole, tmp_path):
    run_main(stage2, STAGE2 + ["--epochs", "1", "--resume", stage2_start, "--model_dir", tmp_path])
    run_main(stage2, STAGE2 + ["--epochs", "2", "--resume", "ckpt_ul_last.t7", "--model_dir", tmp_path])
    stage2_same(stage2_whole, tmp_path)


@pytest.mark.slow
def test_stage2_resumed_after_its_last_epoch_trains_nothing_and_keeps_its_files(stage2_whole, tmp_path, capsys):
    folder = tmp_path / "run"
    files = ("ckpt_ul.t7", "ckpt_ul_last.t7", "log_ul.jsonl", "eval.json")
    os.makedirs(folder)
    for name in files:
        (folder / name).write_bytes((stage2_whole / name).read_bytes())
    capsys.readouterr()
    run_main(stage2, STAGE2 + ["--epochs", "2", "--resume", "ckpt_ul_last.t7", "--model_dir", folder])
    assert "epoch " not in capsys.readouterr().out.replace("--epochs", "")  # no epoch line: nothing trained
    for name in files[:2]:  # the same contents (the best file may be written again, from the last one)
        equal(load_checkpoint(folder / name), load_checkpoint(stage2_whole / name), name)
    for name in files[2:]:
        assert filecmp.cmp(folder / name, stage2_whole / name, shallow=False), name


# -------------------------------------------------------------------------------- semi.py

SEMI = TINY + ["--subset", "40", "--batch_size", "10", "--labels_per_class", "3", "--from_scratch"]
SEMI_KEYS = ("net", "classifier", "optimizer", "rng", "epoch", "next_epoch", "acc", "labelled_indexes",
             "log_record")


@pytest.fixture(scope="module")
def semi_whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("semiwhole")
    run_main(semi, SEMI + ["--epochs", "2", "--model_dir", out])
    return out


@pytest.mark.slow
def test_semi_resumed_mid_run(semi_whole, tmp_path):
    run_main(semi, SEMI + ["--epochs", "1", "--model_dir", tmp_path])
    run_main(semi, [a for a in SEMI if a != "--from_scratch"]
             + ["--epochs", "2", "--model_dir", tmp_path, "--resume", "ckpt_semi.t7"])
    same_run(load_checkpoint(semi_whole / "ckpt_semi.t7"), load_checkpoint(tmp_path / "ckpt_semi.t7"),
             (semi_whole / "log_semi.jsonl", tmp_path / "log_semi.jsonl"), SEMI_KEYS)
    assert json.loads((semi_whole / "eval_semi.json").read_text()) == \
        json.loads((tmp_path / "eval_semi.json").read_text())


@pytest.mark.slow
def test_semi_killed_before_its_first_checkpoint_the_same_command_again_ends_as_the_whole_run(semi_whole, tmp_path):
    """A kill before the first checkpoint leaves the (dead) lock and a temporary, and no labelled_indexes.json
    that the same command would take for another run's."""
    command = SEMI + ["--epochs", "2", "--model_dir", tmp_path]
    killed_run("semi", command, "ckpt_semi.t7", 0)
    assert [n for n in sorted(os.listdir(tmp_path)) if ".tmp" not in n] == ["run.lock"]
    run_main(semi, command)
    same_run(load_checkpoint(semi_whole / "ckpt_semi.t7"), load_checkpoint(tmp_path / "ckpt_semi.t7"),
             (semi_whole / "log_semi.jsonl", tmp_path / "log_semi.jsonl"), SEMI_KEYS)
    assert filecmp.cmp(tmp_path / "labelled_indexes.json", semi_whole / "labelled_indexes.json", shallow=False)


@pytest.mark.slow
def test_semi_killed_between_its_last_save_and_the_indexes_export_writes_them_on_resume(semi_whole, tmp_path):
    for name in ("ckpt_semi.t7", "log_semi.jsonl"):
        (tmp_path / name).write_bytes((semi_whole / name).read_bytes())
    run_main(semi, [a for a in SEMI if a != "--from_scratch"]
             + ["--epochs", "2", "--model_dir", tmp_path, "--resume", "ckpt_semi.t7"])
    assert filecmp.cmp(tmp_path / "labelled_indexes.json", semi_whole / "labelled_indexes.json", shallow=False)


@pytest.mark.slow
def test_semi_resumed_after_its_last_epoch_trains_nothing_and_keeps_its_files(semi_whole, tmp_path, capsys):
    files = ("ckpt_semi.t7", "log_semi.jsonl", "labelled_indexes.json", "eval_semi.json")
    for name in files:
        (tmp_path / name).write_bytes((semi_whole / name).read_bytes())
    capsys.readouterr()
    run_main(semi, [a for a in SEMI if a != "--from_scratch"]
             + ["--epochs", "2", "--model_dir", tmp_path, "--resume", "ckpt_semi.t7"])
    assert "epoch " not in capsys.readouterr().out
    for name in files[:3]:
        assert filecmp.cmp(tmp_path / name, semi_whole / name, shallow=False), name
    assert json.loads((tmp_path / "eval_semi.json").read_text()) == \
        json.loads((semi_whole / "eval_semi.json").read_text())


# ------------------------------------------------------------------------------------ the flags of a resume
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
