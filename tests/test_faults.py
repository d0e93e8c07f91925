"""Faults a run meets, each one line and an exit status, nothing of the run lost: outputs pointed at the run's
own files, a full disk or a closed standard output, SIGTERM, damaged locks, logs and checkpoints."""
import contextlib
import errno
import os
import random
import resource
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import engine.lifecycle
import main as stage2
import semi
import super_and
from conftest import NARROW, ROOT, SMALL, expect_error, folder_bytes, run_main, same_state, start_script
from engine.cli import check_output_file
from engine.lifecycle import RUN_FILES, JsonLog, RunLock, atomic_file, open_run, write_text_atomic
from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.errors import InputError

SEMI = NARROW + ["--subset", "64", "--batch_size", "10", "--labels_per_class", "3"]


def one_error_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# ---- 1. outputs never land on the run's own files ----

@pytest.fixture
def run_folder(tmp_path):
    """A run folder holding a file under every name a run writes, and a cache file."""
    folder = tmp_path / "run"
    (folder / "cache").mkdir(parents=True)
    for name in RUN_FILES:
        (folder / name).write_bytes(f"the run's own {name}".encode())
    (folder / "cache" / "images.npy").write_bytes(b"cached images")
    return folder


@pytest.mark.parametrize("name", ["log_ul.jsonl", "eval.json", "run.lock", "ckpt_ul.t7", "clusters.png",
                                  "curves.png", "log_embed.jsonl", "labelled_indexes.json", "cache/images.npy",
                                  "cache/new.npy", "eval.json.tmp77"])
def test_export_onto_a_file_of_the_run_is_refused(name, run_folder, capsys):
    before = folder_bytes(run_folder)
    expect_error(capsys, stage2, SMALL + ["--test_only", "--resume", run_folder / "ckpt_ul.t7", "--model_dir",
                                          run_folder, "--export_predictions", run_folder / name],
                 "--export_predictions", "a file this run writes")
    assert folder_bytes(run_folder) == before


def test_export_onto_a_run_file_by_another_path_is_refused(run_folder, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(run_folder / "eval.json", tmp_path / "link.csv")
    os.link(run_folder / "log_ul.jsonl", tmp_path / "hard.csv")
    for path in (tmp_path / "elsewhere" / ".." / "run" / "curves.png", tmp_path / "link.csv", tmp_path / "hard.csv"):
        with pytest.raises(InputError, match="a file this run writes"):
            check_output_file(str(path), "--export_predictions", str(run_folder))
    check_output_file(str(tmp_path / "elsewhere" / "eval.json"), "--export_predictions", str(run_folder))


def test_export_into_a_missing_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    for target, fragment in ((tmp_path / "missing" / "p.csv", "does not exist"),
                             (f"{tmp_path / 'missing'}/", "is a folder"), (f"{tmp_path}/", "is a folder")):
        expect_error(capsys, stage2, SMALL + ["--test_only", "--resume", tmp_path / "x.t7", "--model_dir",
                                              tmp_path / "run", "--export_predictions", target], fragment)
    assert sorted(os.listdir(tmp_path)) == []


def test_atomic_writes_leave_the_old_file_when_they_fail(tmp_path):
    path = tmp_path / "preds.csv"
    path.write_text("old,rows\n")
    with pytest.raises(RuntimeError, match="cut"), atomic_file(str(path)) as f:
        f.write("half of the new")
        raise RuntimeError("cut")
    assert path.read_text() == "old,rows\n" and os.listdir(tmp_path) == ["preds.csv"]
    write_text_atomic(str(path), "new,rows\n")
    assert path.read_text() == "new,rows\n" and os.listdir(tmp_path) == ["preds.csv"]
    os.symlink(path, tmp_path / "link.csv")
    write_text_atomic(str(tmp_path / "link.csv"), "through the link\n")  # the named file changes, the link stays
    assert os.path.islink(tmp_path / "link.csv") and path.read_text() == "through the link\n"
    with pytest.raises(OSError) as info, atomic_file("/dev/full") as f:  # a device is written as it is
        f.write("x" * 10)
    assert info.value.errno == errno.ENOSPC and info.value.filename == "/dev/full"


# ---- 2. faults outside the run's control ----

def test_log_line_that_cannot_be_written_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    log = JsonLog(str(tmp_path / "log.jsonl"))
    log.append({"epoch": 0})
    before = (tmp_path / "log.jsonl").read_bytes()
    real_write, calls = os.write, []

    def disk_fills(fd, data):  # the first write takes half the line, the next finds the disk full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.lifecycle.os, "write", disk_fills)
    with pytest.raises(OSError) as info:
        log.append({"epoch": 1, "loss": 2.5})
    assert info.value.errno == errno.ENOSPC and info.value.filename == log.path and len(calls) == 2
    assert (tmp_path / "log.jsonl").read_bytes() == before


@contextlib.contextmanager
def file_size_limit(limit):
    """Writes past ``limit`` bytes fail with EFBIG (SIGXFSZ ignored) in this process until the block ends; the
    soft limit goes back to what it was (a process may raise its soft limit up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_checkpoint_that_cannot_be_written_is_an_os_error_naming_it(tmp_path):
    """torch.save turns a failed write into a RuntimeError that says nothing; the save says what it was."""
    path = tmp_path / "ckpt.t7"
    save_checkpoint({"w": torch.zeros(10)}, path)
    with file_size_limit(20000), pytest.raises(OSError) as failed:
        save_checkpoint({"w": torch.zeros(100000)}, path)
    assert (failed.type, failed.value.errno, str(failed.value.filename)) == (OSError, errno.EFBIG, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(10))
    assert os.listdir(tmp_path) == ["ckpt.t7"]


@pytest.mark.slow  # a Python process of its own
def test_closed_standard_output_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "super_and.py"), *SMALL, "--model_dir",
                             tmp_path / "run"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: os.close(1))
    assert result.returncode == 1
    assert "standard output is closed" in one_error_line(result.stderr)
    assert not (tmp_path / "run").exists()


# ---- 4. damaged run files ----

DAMAGED_LOCKS = {"pid as text": '{"pid": "abc", "host": "h"}', "huge pid": '{"pid": 100000000000000000000000}',
                 "negative pid": '{"pid": -1}', "list": "[1, 2]", "number": "12345", "host a number":
                 '{"pid": 1, "host": 5}', "bytes": b"\xff\xfe\x00lock"}


@pytest.mark.parametrize("case", [*DAMAGED_LOCKS, "folder", "link to nothing"])
def test_damaged_lock_is_one_line_naming_it(case, tmp_path):
    lock = tmp_path / "run.lock"
    if case == "folder":
        lock.mkdir()
    elif case == "link to nothing":  # os.O_EXCL sees the link, reading it finds no file
        lock.symlink_to(tmp_path / "gone")
    else:
        content = DAMAGED_LOCKS[case]
        lock.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as info:
        RunLock(str(tmp_path)).acquire()
    assert str(lock) in str(info.value) and "delete it when no run holds the folder" in str(info.value)
    assert lock.is_dir() if case == "folder" else lock.is_symlink() or lock.exists()  # left for the user to judge


@pytest.mark.parametrize("content,fragment", [
    (b"\x8f\x00\xff\x10random\nbytes\x9c\n", "line 1 holds bytes that are not text"),
    (b'{"epoch": 0}\n[1, 2]\n', "line 2 is a JSON list, not an object"),
    (b'{"epoch": 0}\n7\n{"epoch": 1}\n', "line 2 is a JSON int, not an object"),
    (b'{"epoch": 0}\n\x01\x02garbage', "line 2 is not JSON"),  # a last line a kill cannot have written
    (b'{"epoch": 0}\n{"loss": 1}\n', "line 2 lacks the epoch"),
    (b'{"epoch": 0}\n{"epoch": "one"}\n', "line 2 lacks the epoch"),
])
def test_damaged_log_names_the_file_and_the_line(content, fragment, tmp_path):
    (tmp_path / "log.jsonl").write_bytes(content)
    with pytest.raises(InputError) as info:
        JsonLog(str(tmp_path / "log.jsonl")).rewind(lambda r: r["epoch"] < 1, {"epoch": 1})
    assert str(info.value).startswith(f"{tmp_path / 'log.jsonl'}: ") and fragment in str(info.value)
    assert (tmp_path / "log.jsonl").read_bytes() == content


def test_log_that_is_a_folder_is_named(tmp_path):
    (tmp_path / "log.jsonl").mkdir()
    with pytest.raises(InputError, match="log.jsonl is a folder, not a log"):
        JsonLog(str(tmp_path / "log.jsonl")).read()


def test_optimizer_state_of_another_network_is_refused_before_the_folder_changes(tmp_path):
    big = torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)]},
                           {"params": [torch.zeros(3, requires_grad=True)]}], lr=0.1, momentum=0.9)
    from engine.system import rng_state
    saved = {"optimizer": big.state_dict(), "rng": rng_state(), "epoch": 1, "args": {}, "log_record": {"epoch": 1}}
    torch.save(saved, tmp_path / "ckpt.t7")
    (tmp_path / "log.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n')
    before = folder_bytes(tmp_path)
    small = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9)
    with pytest.raises(InputError, match="ckpt.t7: its optimizer state does not fit this network"):
        open_run(str(tmp_path), "ckpt.t7", "log.jsonl", resumed=str(tmp_path / "ckpt.t7"), ckpt=saved,
                 position=lambda r: r["epoch"], optimizer=small, args=None)
    assert folder_bytes(tmp_path) == before


# ---- 5. flags, pickles, several processes ----

def test_batch_size_of_one_is_refused(capsys):
    for module in (super_and, stage2, semi):
        with pytest.raises(SystemExit) as info:
            module.get_args_parser().parse_args(["--batch_size", "1"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert one_error_line(err).startswith("error: argument --batch_size: 1 is outside [2, inf]")


def test_refused_pickle_prints_no_warning_first(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(tmp_path / "evil.t7", "wb") as f:
        pickle.dump({"net": Payload()}, f, protocol=4)  # a plain pickle: torch warns about its protocol
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")  # every warning, also one this process has shown before
        expect_error(capsys, stage2, SMALL + ["--test_only", "--resume", tmp_path / "evil.t7", "--model_dir",
                                              tmp_path / "run"], "refused (loading it could run code)")
    assert [str(w.message) for w in warned] == []


@pytest.mark.parametrize("rank", [0, 1])
def test_bad_flag_under_torchrun_is_said_by_rank_zero_alone(rank, monkeypatch, capsys):
    for name, value in (("RANK", rank), ("WORLD_SIZE", 2), ("LOCAL_RANK", rank)):  # as torchrun starts each
        monkeypatch.setenv(name, str(value))
    with pytest.raises(SystemExit) as stop:
        run_main(super_and, ["--batch_size", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    if rank == 0:
        assert "--batch_size" in one_error_line(err)
    else:
        assert err == ""


# ---- whole runs ----

@pytest.mark.slow
@pytest.mark.parametrize("name", ["log_ul.jsonl", "eval.json", "clusters.png"])
def test_export_onto_a_real_run_leaves_it_whole(name, stage2_run, capsys):
    before = folder_bytes(stage2_run)
    expect_error(capsys, stage2, SMALL + ["--test_only", "--resume", "ckpt_ul.t7", "--model_dir", stage2_run,
                                          "--export_predictions", stage2_run / name], "a file this run writes")
    assert folder_bytes(stage2_run) == before


@pytest.mark.slow
def test_export_to_a_full_disk_is_one_line(stage2_run, capsys):
    before = folder_bytes(stage2_run)
    with pytest.raises(SystemExit) as stop:
        run_main(stage2, SMALL + ["--test_only", "--resume", "ckpt_ul.t7", "--model_dir", stage2_run,
                                  "--export_predictions", "/dev/full"])
    assert stop.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: cannot write /dev/full: no space left on the device") and "same command" in line
    after = folder_bytes(stage2_run)
    assert {k: after[k] for k in after if k.startswith(("ckpt", "log"))} == \
        {k: before[k] for k in before if k.startswith(("ckpt", "log"))}
    assert "run.lock" not in after


@pytest.mark.slow
def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_last_one(stage1_ckpt, tmp_path, capsys):
    """Stage 1 continued under a file-size limit below a checkpoint's size: the next save fails."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "ckpt_embed.t7").write_bytes(stage1_ckpt.read_bytes())
    (folder / "log_embed.jsonl").write_bytes((stage1_ckpt.parent / "log_embed.jsonl").read_bytes())
    before = folder_bytes(folder)
    with file_size_limit(os.path.getsize(stage1_ckpt) // 2), pytest.raises(SystemExit) as stop:
        run_main(super_and, SMALL + ["--rounds", "2", "--epochs", "1", "--resume", "ckpt_embed.t7", "--model_dir",
                                     folder])
    assert stop.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {folder / 'ckpt_embed.t7'}: file too large"), line
    assert line.endswith(f"resume with the same command and --resume ckpt_embed.t7 (the last checkpoint, "
                         f"{folder / 'ckpt_embed.t7'}, is intact)")
    assert folder_bytes(folder) == before  # no temporary, no lock, the checkpoint and the log as they were


@pytest.mark.slow
def test_full_standard_output_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "super_and.py"), *SMALL, "--rounds", "1",
                                 "--epochs", "2", "--model_dir", tmp_path], cwd=ROOT, stdout=full,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert line.startswith("error: cannot write to the standard output: no space left on the device")
    assert "--resume ckpt_embed.t7" in line
    assert load_checkpoint(tmp_path / "ckpt_embed.t7")["epoch"] == 0
    assert sorted(os.listdir(tmp_path)) == ["ckpt_embed.t7", "log_embed.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["pid as text", "list", "folder"])
def test_damaged_lock_stops_a_script_with_one_line(case, capsys, tmp_path):
    lock = tmp_path / "run.lock"
    if case == "folder":
        lock.mkdir()
    else:
        lock.write_text(DAMAGED_LOCKS[case])
    expect_error(capsys, super_and, SMALL + ["--rounds", "1", "--epochs", "1", "--model_dir", tmp_path],
                 str(lock), "delete it when no run holds the folder")
    assert os.listdir(tmp_path) == ["run.lock"]


@pytest.mark.slow
@pytest.mark.parametrize("content,fragment", [(b"\x8f\xff random", "line 1"), (b'{"round": 0, "epoch": 0}\n[0]\n',
                                                                                   "line 2"), (None, "is a folder")])
def test_damaged_log_stops_a_resume_with_one_line(content, fragment, stage1_ckpt, capsys, tmp_path):
    (tmp_path / "ckpt_embed.t7").write_bytes(stage1_ckpt.read_bytes())
    log = tmp_path / "log_embed.jsonl"
    log.mkdir() if content is None else log.write_bytes(content)
    before = folder_bytes(tmp_path)
    expect_error(capsys, super_and, SMALL + ["--rounds", "2", "--epochs", "1", "--resume", "ckpt_embed.t7",
                                             "--model_dir", tmp_path], str(log), fragment)
    assert folder_bytes(tmp_path) == before


@pytest.mark.slow
def test_checkpoint_with_other_parameter_groups_is_one_line(stage1_ckpt, capsys, tmp_path):
    ckpt = load_checkpoint(stage1_ckpt)
    groups = ckpt["optimizer"]["param_groups"]
    ckpt["optimizer"]["param_groups"] = [groups[0], {**groups[0], "params": [10**6]}]
    torch.save(ckpt, tmp_path / "ckpt_embed.t7")
    before = folder_bytes(tmp_path)
    expect_error(capsys, super_and, SMALL + ["--rounds", "2", "--epochs", "1", "--resume", "ckpt_embed.t7",
                                             "--model_dir", tmp_path], "optimizer state does not fit")
    assert folder_bytes(tmp_path) == before


# ---- 3. SIGTERM as Ctrl-C ----

def terminate_at_a_random_moment(script, args, folder, log_name, epochs, max_extra=0.5, stop=signal.SIGTERM):
    """Start ``script``, wait until it holds ``folder`` and has logged a random number of its ``epochs`` (at
    most ``epochs - 2``), a random fraction of ``max_extra`` seconds more (less than two epochs take), then
    send it ``stop`` (SIGTERM, or SIGINT: Ctrl-C). Returns (status, stderr, the moment drawn: its seed, the lines
    and the seconds, for the assertion messages)."""
    seed = int.from_bytes(os.urandom(4), "little")  # every run of the test draws another moment
    rng = random.Random(seed)
    lines, extra = rng.randrange(epochs - 1), rng.uniform(0, max_extra)
    proc = start_script(script, args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock, log, deadline = folder / "run.lock", folder / log_name, time.time() + 300

    def logged():
        return len(log.read_bytes().splitlines()) if log.exists() else 0

    while not (lock.exists() and logged() >= lines):  # the lock: the run has begun, its handlers are set
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    time.sleep(extra)
    proc.send_signal(stop)
    err = proc.communicate(timeout=120)[1]
    return proc.returncode, err, {"seed": seed, "lines": lines, "seconds": extra}


def check_terminated(status, err, moment, folder, word="terminated", code=143):
    lines = err.strip().splitlines()
    assert status == code, (moment, err)
    assert len(lines) == 1 and lines[0].startswith(f"{word}: "), (moment, err)
    assert "run.lock" not in os.listdir(folder), moment


@pytest.mark.slow
def test_ctrl_c_in_stage1_then_resume_ends_where_the_whole_run_ends(tmp_path):
    """Ctrl-C (SIGINT) at a random moment: one line, exit 130, the lock released; the resume it names ends where
    the whole run ends. (SIGTERM, the same handler: stage 2 and semi.py below.)"""
    command = SMALL + ["--rounds", "2", "--epochs", "2"]
    run_main(super_and, command + ["--model_dir", tmp_path / "whole"])
    folder = tmp_path / "stopped"
    status, err, moment = terminate_at_a_random_moment("super_and.py", command + ["--model_dir", folder], folder,
                                                       "log_embed.jsonl", 4, stop=signal.SIGINT)
    check_terminated(status, err, moment, folder, word="interrupted", code=130)
    assert "--resume ckpt_embed.t7" in err if (folder / "ckpt_embed.t7").exists() else "same command again" in err
    resume = ["--resume", "ckpt_embed.t7"] if (folder / "ckpt_embed.t7").exists() else []
    run_main(super_and, command + ["--model_dir", folder] + resume)
    same_state(load_checkpoint(tmp_path / "whole" / "ckpt_embed.t7"), load_checkpoint(folder / "ckpt_embed.t7"),
               where=f"ckpt_embed.t7 (Ctrl-C at {moment})")
    assert sorted(os.listdir(folder)) == ["ckpt_embed.t7", "log_embed.jsonl"]


@pytest.mark.slow
def test_sigterm_in_stage2_then_resume_ends_where_the_whole_run_ends(stage1_ckpt, tmp_path):
    command = SMALL + ["--epochs", "3"]
    run_main(stage2, command + ["--resume", stage1_ckpt, "--model_dir", tmp_path / "whole"])
    folder = tmp_path / "stopped"
    status, err, moment = terminate_at_a_random_moment(
        "main.py", command + ["--resume", stage1_ckpt, "--model_dir", folder], folder, "log_ul.jsonl", 3)
    check_terminated(status, err, moment, folder)
    resume = "ckpt_ul_last.t7" if (folder / "ckpt_ul_last.t7").exists() else stage1_ckpt
    run_main(stage2, command + ["--resume", resume, "--model_dir", folder])
    for name in ("ckpt_ul_last.t7", "ckpt_ul.t7"):
        same_state(load_checkpoint(tmp_path / "whole" / name), load_checkpoint(folder / name),
                   where=f"{name} (SIGTERM at {moment})")
    assert "run.lock" not in os.listdir(folder)


@pytest.mark.slow
def test_sigterm_in_semi_then_the_same_command_ends_where_the_whole_run_ends(stage1_ckpt, tmp_path):
    command = SEMI + ["--epochs", "12"]  # a few hundredths of a second an epoch: the moment within 0.02 s
    run_main(semi, command + ["--resume", stage1_ckpt, "--model_dir", tmp_path / "whole"])
    folder = tmp_path / "stopped"
    status, err, moment = terminate_at_a_random_moment(
        "semi.py", command + ["--resume", stage1_ckpt, "--model_dir", folder], folder, "log_semi.jsonl", 12,
        max_extra=0.02)
    check_terminated(status, err, moment, folder)
    resume = "ckpt_semi.t7" if (folder / "ckpt_semi.t7").exists() else stage1_ckpt
    run_main(semi, command + ["--resume", resume, "--model_dir", folder])
    same_state(load_checkpoint(tmp_path / "whole" / "ckpt_semi.t7"), load_checkpoint(folder / "ckpt_semi.t7"),
               where=f"ckpt_semi.t7 (SIGTERM at {moment})")
    assert "run.lock" not in os.listdir(folder)


def test_signal_during_a_write_waits_for_it(tmp_path):
    """Ctrl-C or SIGTERM inside a checkpoint save takes effect after it: the file is whole, no temporary."""
    from engine.lifecycle import Terminated, handle_signals, uninterrupted
    with handle_signals(), pytest.raises(Terminated), uninterrupted():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs here and holds the signal back
        save_checkpoint({"w": torch.ones(3)}, str(tmp_path / "ckpt.t7"))
    assert torch.equal(torch.load(tmp_path / "ckpt.t7", weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.t7"]


def test_run_stopped_before_its_first_checkpoint_leaves_nothing_that_blocks_the_same_command(tmp_path):
    """semi.py writes labelled_indexes.json before its first checkpoint: a stop there must not leave a file
    that makes 'run the same command again' refuse the folder."""
    from engine.lifecycle import Interrupted, Terminated
    with pytest.raises(Interrupted, match="run the same command again") as info, \
            open_run(str(tmp_path), "ckpt.t7", "log.jsonl", other_files=["indexes.json"]):
        (tmp_path / "indexes.json").write_text("[1, 2]")
        raise Terminated("SIGTERM")
    assert info.value.terminated and os.listdir(tmp_path) == []
    with open_run(str(tmp_path), "ckpt.t7", "log.jsonl", other_files=["indexes.json"]) as run:  # the same again
        (tmp_path / "indexes.json").write_text("[1, 2]")
        run.save({"net": {}})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.t7", "indexes.json"]
