"""A run folder as users meet it: the README's commands in one folder, kills at every write, locks, Ctrl-C,
and each kind of bad input: one ``error:`` line, exit status 2, nothing created or lost."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import engine.lifecycle
import main as stage2
import super_and
from conftest import ROOT, SMALL, expect_error, run_main, skip_pictures
from lib.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.pictures
def test_readme_commands_in_one_folder_with_the_defaults(tmp_path, monkeypatch, capsys):
    """Stage 1, stage 2, stage-2 resume, both --test_only, and stage 1 continued: all in ./checkpoint/, the
    README's commands with their default folder (the first as a process, the rest in this one)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "super_and.py"), *SMALL, "--rounds", "1",
                             "--epochs", "1"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    monkeypatch.chdir(tmp_path)

    def run(module, *extra):
        run_main(module, SMALL + list(extra))
        return capsys.readouterr().out

    folder = tmp_path / "checkpoint"
    stage1_log = (folder / "log_embed.jsonl").read_text()
    assert "using checkpoint checkpoint/ckpt_embed.t7" in run(stage2, "--epochs", "1", "--resume", "ckpt_embed.t7")
    assert "resuming checkpoint/ckpt_ul_last.t7" in run(stage2, "--epochs", "2", "--resume", "ckpt_ul_last.t7")
    assert "accuracy: [" in run(stage2, "--test_only", "--resume", "ckpt_ul.t7")
    assert "accuracy: " in run(super_and, "--test_only", "--resume", "ckpt_embed.t7")
    assert (folder / "log_embed.jsonl").read_text() == stage1_log  # stage 2 never touched stage 1's log
    assert [r["epoch"] for r in read_log(folder / "log_ul.jsonl")] == [0, 1]
    assert set(files(folder)) >= {"ckpt_embed.t7", "log_embed.jsonl", "ckpt_ul.t7", "ckpt_ul_last.t7",
                                  "log_ul.jsonl", "eval.json", "curves.png", "confusion_matrix.png", "clusters.png"}
    assert "run.lock" not in files(folder)
    run(super_and, "--rounds", "2", "--epochs", "1", "--resume", "ckpt_embed.t7")  # stage 1 continues
    assert [(r["round"], r["epoch"]) for r in read_log(folder / "log_embed.jsonl")] == [(0, 0), (1, 0)]


# ---- a kill at every write ----

class Killed(BaseException):
    """Stands for SIGKILL: nothing of the process runs after it, its lock stays behind."""


def kill_at(monkeypatch, target):
    """Make the ``target``-th write (checkpoint or log line) of the next run die before it happens."""
    count = {"n": 0}
    real_save, real_append = engine.lifecycle.save_checkpoint, engine.lifecycle.JsonLog.append

    def counted(real):
        def write(*args, **kwargs):
            count["n"] += 1
            if count["n"] == target:
                raise Killed
            return real(*args, **kwargs)
        return write

    monkeypatch.setattr(engine.lifecycle, "save_checkpoint", counted(real_save))
    monkeypatch.setattr(engine.lifecycle.JsonLog, "append", counted(real_append))
    monkeypatch.setattr(engine.lifecycle.RunLock, "release", lambda self: None)  # a killed run keeps its lock
    return count


def mark_lock_dead(folder):
    """The lock a killed process leaves: its PID no longer runs."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (folder / "run.lock").write_text(json.dumps({"pid": proc.pid, "host": os.uname().nodename}))


@pytest.fixture(scope="module")
def stage2_whole(stage1_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2")
    with pytest.MonkeyPatch.context() as patch:  # its checkpoints, log and report are compared, not its pictures
        skip_pictures(patch)
        run_main(stage2, SMALL + ["--epochs", "2", "--resume", stage1_ckpt, "--model_dir", out])
    return out


# stage 2, two epochs: writes are last(0), best(0), log(0), last(1), [best(1)], log(1)
@pytest.mark.parametrize("target", [1, 2, 3, 4, 5])
def test_stage2_killed_at_any_write_resumes_to_the_same_end(target, stage1_ckpt, stage2_whole, tmp_path,
                                                            monkeypatch):
    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        kill_at(patch, target)
        with pytest.raises(Killed):
            run_main(stage2, SMALL + ["--epochs", "2", "--resume", stage1_ckpt, "--model_dir", folder])
    mark_lock_dead(folder)
    (folder / "ckpt_ul_last.t7.tmp99999").write_bytes(b"a save cut short")
    (folder / "eval.json.tmp99999").write_text('{"acc": ')  # a report cut short
    if (folder / "ckpt_ul_last.t7").exists():  # the documented command: continue from the last epoch
        run_main(stage2, SMALL + ["--epochs", "2", "--resume", "ckpt_ul_last.t7", "--model_dir", folder])
    else:  # killed before the first checkpoint: the same command again
        run_main(stage2, SMALL + ["--epochs", "2", "--resume", stage1_ckpt, "--model_dir", folder])
    for name in ("ckpt_ul_last.t7", "ckpt_ul.t7"):
        a, b = load_checkpoint(stage2_whole / name), load_checkpoint(folder / name)
        assert a["epoch"] == b["epoch"], name
        assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"]), name
    assert [r["loss"] for r in read_log(folder / "log_ul.jsonl")] == \
        [r["loss"] for r in read_log(stage2_whole / "log_ul.jsonl")]
    assert not [f for f in files(folder) if ".tmp" in f or f == "run.lock"]


def test_stage1_log_cut_mid_line_is_repaired(stage1_ckpt, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "ckpt_embed.t7").write_bytes(stage1_ckpt.read_bytes())
    record = json.dumps(load_checkpoint(stage1_ckpt)["log_record"])
    (folder / "log_embed.jsonl").write_text(record + "\n" + record[:25])  # the next line was cut by a kill
    run_main(super_and, SMALL + ["--rounds", "2", "--epochs", "1", "--resume", "ckpt_embed.t7", "--model_dir",
                                 folder])
    assert [(r["round"], r["epoch"]) for r in read_log(folder / "log_embed.jsonl")] == [(0, 0), (1, 0)]


# ---- one run per folder (Ctrl-C: test_faults.py) ----

def test_a_second_run_in_a_busy_folder_is_refused(stage1_ckpt, tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = tmp_path / "run"
        folder.mkdir()
        lock = {"pid": sleeper.pid, "host": os.uname().nodename, "script": "super_and.py",
                "process_start": engine.lifecycle._process_start(sleeper.pid)}
        (folder / "run.lock").write_text(json.dumps(lock))
        expect_error(capsys, super_and, SMALL + ["--epochs", "1", "--rounds", "1", "--model_dir", folder],
                     f"PID {sleeper.pid}", "super_and.py")
        assert files(folder) == ["run.lock"]
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- bad input, checked before anything is written ----

def test_flags_whose_range_depends_on_the_data(capsys, tmp_path):
    out = tmp_path / "o"
    expect_error(capsys, super_and, SMALL + ["--ANs_select_rate", "0.5", "--rounds", "4", "--model_dir", out],
                 "--ANs_select_rate 0.5", "rounds")
    expect_error(capsys, super_and, SMALL + ["--ANs_size", "100", "--model_dir", out], "--ANs_size 100", "64")
    expect_error(capsys, super_and, SMALL + ["--batch_size", "65", "--model_dir", out], "--batch_size 65")
    assert not out.exists()


def test_model_dir_that_cannot_hold_a_run(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for model_dir, fragment in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "under the file"),
                                ("", "empty")):
        expect_error(capsys, super_and, SMALL + ["--model_dir", model_dir], fragment)
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_model_dir_fails_before_the_first_epoch(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    command = [sys.executable, os.path.join(ROOT, "super_and.py"), *SMALL, "--model_dir", folder / "x"]
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it, for the permissions to count
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a read-only folder cannot be made here")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *map(str, command)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    os.chmod(folder, 0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --model_dir") and "cannot write" in result.stderr
    assert files(folder) == []


def test_export_predictions_never_overwrites_a_checkpoint(stage2_whole, capsys, tmp_path):
    before = (stage2_whole / "ckpt_ul_last.t7").read_bytes()
    expect_error(capsys, stage2, SMALL + ["--test_only", "--resume", stage2_whole / "ckpt_ul.t7", "--model_dir",
                                          tmp_path / "e", "--export_predictions", stage2_whole / "ckpt_ul_last.t7"],
                 "checkpoint")
    assert (stage2_whole / "ckpt_ul_last.t7").read_bytes() == before
    expect_error(capsys, stage2, SMALL + ["--test_only", "--resume", stage2_whole / "ckpt_ul.t7", "--model_dir",
                                          tmp_path / "e", "--export_predictions", tmp_path / "no" / "p.csv"],
                 "does not exist")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("key", ["npc.memory", "rng", "next.epoch", "optimizer"])
def test_checkpoint_missing_a_key(key, stage1_ckpt, capsys, tmp_path):
    ckpt = load_checkpoint(stage1_ckpt)
    parent, _, leaf = key.rpartition(".")
    del (ckpt[parent] if parent else ckpt)[leaf]
    torch.save(ckpt, tmp_path / "cut.t7")
    expect_error(capsys, super_and, SMALL + ["--resume", tmp_path / "cut.t7", "--model_dir", tmp_path / "o"],
                 repr(key))
    assert not (tmp_path / "o").exists()


def test_checkpoint_with_nan_weights(stage1_ckpt, capsys, tmp_path):
    ckpt = load_checkpoint(stage1_ckpt)
    ckpt["net"]["linear.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.t7")
    expect_error(capsys, super_and, SMALL + ["--test_only", "--resume", tmp_path / "nan.t7"], "non-finite",
                 "linear.weight")


def test_resume_from_a_pipe_does_not_hang(capsys, tmp_path):
    os.mkfifo(tmp_path / "ckpt_embed.t7")
    expect_error(capsys, super_and, SMALL + ["--test_only", "--resume", "ckpt_embed.t7", "--model_dir", tmp_path],
                 "not a regular file")


def test_unsafe_pickle_is_refused_plainly(capsys, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"net": {}, "npc": Payload()}, tmp_path / "evil.t7")
    expect_error(capsys, super_and, SMALL + ["--test_only", "--resume", tmp_path / "evil.t7"],
                 "contains objects other than tensors and plain data; refused")


def test_device_that_is_not_for_training(capsys, tmp_path):
    expect_error(capsys, super_and, SMALL + ["--device", "meta", "--model_dir", tmp_path / "o"], "meta")
    expect_error(capsys, super_and, SMALL + ["--device", "cuda:7", "--model_dir", tmp_path / "o"], "cuda:7")
    assert not (tmp_path / "o").exists()


def test_finished_run_resumed_again_trains_nothing_and_reports_its_checkpoint(stage2_whole, capsys, tmp_path):
    folder = tmp_path / "run"  # a copy: killed after its last checkpoint, before eval.json
    shutil.copytree(stage2_whole, folder)
    summary = json.loads((folder / "eval.json").read_text())
    (folder / "eval.json").unlink()
    last = (folder / "ckpt_ul_last.t7").read_bytes()
    assert run_main(stage2, SMALL + ["--epochs", "2", "--resume", "ckpt_ul_last.t7", "--model_dir", folder]) \
        == summary
    assert "nothing to train" in capsys.readouterr().out
    assert json.loads((folder / "eval.json").read_text()) == summary
    assert (folder / "ckpt_ul_last.t7").read_bytes() == last
