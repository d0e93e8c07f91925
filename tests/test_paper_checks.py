"""experiments/paper.py checks like a script (docs/running.md, "What each refuses, and what is kept"): every flag
before any work, one harness per --out, damaged run files and numbers one line naming the file, a script's own
error line passed on once with its exit status, SIGTERM as Ctrl-C; and its resume of a run (the run's own
flags again, with --resume) is going on for every script. In this process, with the scripts replaced where a
run would start: no training."""
import importlib
import os
import signal
import sys
import threading

import pytest

from engine.lifecycle import FREE_ON_RESUME, HERE_AND_NOW, Terminated, handle_signals, resume_arguments
from experiments import paper

TINY = ["--tables", "2", "3", "--scale", "tiny", "--dataset", "digits"]


@pytest.fixture
def harness(capsys):
    """Run the harness's command line in this process: (exit status, its stderr lines)."""
    def run(argv):
        with pytest.raises(SystemExit) as stop:
            paper.cli([str(a) for a in argv])
        return stop.value.code, capsys.readouterr().err.strip().splitlines()
    return run


def tree(folder):
    return sorted(os.path.relpath(os.path.join(r, n), folder) for r, _, names in os.walk(folder) for n in names)


@pytest.mark.parametrize("flags,fragment", [
    (["--dataset", "digitz"], "--dataset: invalid choice: 'digitz'"),
    (["--dataset", ""], "--dataset: invalid choice: ''"),
    (["--step_seconds", "-1"], "--step_seconds"),
    (["--step_seconds", "nan"], "nan is not finite"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--rows", "3:nothing"], "no such row"),
])
def test_a_bad_flag_is_one_line_before_any_work(flags, fragment, harness, tmp_path):
    out = tmp_path / "out"
    status, err = harness(TINY + ["--out", out] + flags)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not out.exists()


def test_out_must_be_a_writable_folder_and_no_run_folder(harness, tmp_path):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt_embed.t7").write_bytes(b"a run's checkpoint")
    for out, fragment in (("", "--out is empty"), (tmp_path / "file", "is a file"),
                          (tmp_path / "file" / "under", "is under the file"), (tmp_path / "run", "a run folder")):
        status, err = harness(TINY + ["--out", out])
        assert status == 2 and len(err) == 1 and fragment in err[0], err
    assert (tmp_path / "file").read_text() == "mine" and tree(tmp_path / "run") == ["ckpt_embed.t7"]


def test_damaged_run_files_are_one_line_naming_the_file(tmp_path):
    run = paper.RUNS["assign"]
    flags = paper.run_flags(run, "tiny", "digits", [])
    path = tmp_path / "runs" / "assign"
    paper.check_folder(run, flags, str(path))
    for content, fragment in (('{"script": "main.py", "fl', "command.json is damaged (JSONDecodeError)"),
                              ("[1]", "command.json is damaged (a JSON list")):
        (path / "command.json").write_text(content)
        with pytest.raises(paper.HarnessError, match="delete it") as err:
            paper.check_folder(run, flags, str(path))
        assert fragment in str(err.value)
    cell = paper.TABLES["3"].rows[-1].cells[0]
    for content, fragment in (('{"acc": 4', "eval.json is damaged"), ('{"acc": "lots"}', "'acc' holds \"lots\""),
                              ('{"acc": NaN}', "'acc' holds NaN"), ('[1, 2]', "not a finite number"),
                              ('{"acc": true}', "'acc' holds true"), (b'{"acc": "\xff"}', "UnicodeDecodeError")):
        (path / "eval.json").write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(paper.HarnessError, match="eval.json") as err:
            paper.read_number(cell, str(tmp_path))
        assert fragment in str(err.value) and "\n" not in str(err.value)
    (path / "eval.json").write_text('{"acc": 47.5}')
    assert paper.read_number(cell, str(tmp_path)) == 47.5
    mean = paper.TABLES["C"].rows[0].cells[1]  # the mean of a list
    (tmp_path / "runs" / mean.run.name).mkdir()
    (tmp_path / "runs" / mean.run.name / "eval.json").write_text('{"head_acc": [1, "x"]}')
    with pytest.raises(paper.HarnessError, match="'head_acc' holds"):
        paper.read_number(mean, str(tmp_path))
    (path / "log_ul.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    with pytest.raises(paper.HarnessError, match="log_ul.jsonl: line 2 is not a JSON object"):
        paper.read_log(str(path / "log_ul.jsonl"))
    (path / "log_ul.jsonl").write_text('{"epoch": 0}\n{"epo')  # cut by a kill: dropped
    assert paper.read_log(str(path / "log_ul.jsonl")) == [{"epoch": 0}]


@pytest.mark.parametrize("status", [1, 2])
def test_a_scripts_error_line_is_the_harnesss_with_its_status(tmp_path, monkeypatch, status):
    run = paper.RUNS["assign-lambda_cp0"]
    flags = paper.run_flags(run, "tiny", "digits", [])

    def failing(argv, path, *_):
        with open(os.path.join(path, paper.OUTPUT), "a") as f:
            f.write("using checkpoint x\nerror: SVHN is not in /data; put the files there\n")
        return status
    monkeypatch.setattr(paper, "execute", failing)
    with pytest.raises(paper.HarnessError) as err:
        paper.run_one(run, flags, str(tmp_path))
    assert err.value.status == status and str(err.value).startswith("SVHN is not in /data; put the files there")
    monkeypatch.setattr(paper, "execute", lambda argv, path, *_: 3)  # a diverged run: the row says so, the rest go on
    assert paper.run_one(run, flags, str(tmp_path)) == "failed (exit 3)"


def test_one_harness_per_out_and_sigterm_stops_it_as_ctrl_c(harness, tmp_path, monkeypatch):
    """While one harness runs on --out (it holds <out>/paper.lock), a second on the same --out stops with one line
    and leaves it alone; SIGTERM then stops the first as Ctrl-C does: one line, exit 143, the lock released."""
    out, seen = tmp_path / "paper", []

    def first(args):  # the first harness's runs
        seen.append(harness(TINY + ["--out", out]))
        seen.append(sorted(os.listdir(out)))
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the harness")
    monkeypatch.setattr(paper, "run_tables", first)
    status, err = harness(TINY + ["--out", out])
    (second, lines), listing = seen
    assert second == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {out} is in use by ") and f"(PID {os.getpid()} " in lines[0]
    assert "choose another --out" in lines[0] and listing == [paper.LOCK]
    assert status == 143 and len(err) == 1 and err[0].startswith("terminated: run the same command again"), err
    assert not (out / paper.LOCK).exists()


def test_sigterm_is_passed_on_to_the_running_script(tmp_path):
    """One job: the script runs in the harness's thread; SIGTERM to the harness reaches it, and the harness waits
    for it to end before it stops."""
    script = "import signal, sys, time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    with handle_signals(), pytest.raises(Terminated):
        timer.start()
        paper.execute([sys.executable, "-c", script], str(tmp_path), quiet=True)
    timer.join()
    assert not paper.LIVE and (tmp_path / paper.OUTPUT).read_text() == "ready\n"


# ---- the harness's resume of a run is going on ----

FREE = {"super_and.py": ("rounds",), "main.py": ("epochs",), "joint.py": ("rounds",), "semi.py": ("epochs",)}
OWN = {"embed": paper.ENCODER, "assign": paper.LAST, "joint": paper.JOINT_LAST, "semi": paper.SEMI_LAST}


def saved_arguments(script, argv):
    """The arguments a run of ``script`` started by ``argv`` saves in its checkpoints (semi.py: its defaults
    resolved)."""
    module = importlib.import_module(script[:-3])
    args = module.get_args_parser().parse_args(argv)
    return vars(module.resolve_defaults(args) if script == "semi.py" else args), module.get_args_parser()


@pytest.mark.parametrize("scale", ["fair", "tiny"])
def test_the_harness_resumes_every_run_with_its_own_flags(scale, tmp_path):
    """Every training run of every table, started and then resumed as the harness does (its flags again, with
    --resume of its own checkpoint): the resume is accepted and goes on with every flag as saved."""
    _, runs = paper.plan(list(paper.TABLES), scale, "fashion-mnist", [], set(), 2)
    for run, flags, seed in runs.values():
        if run.kind not in OWN:
            continue
        first = paper.command(run, flags, str(tmp_path), seed=seed)[2:]
        saved, parser = saved_arguments(run.script, first)
        again = paper.command(run, flags, str(tmp_path), resume=OWN[run.kind], seed=seed)[2:]
        args = resume_arguments(parser.parse_args(again), {"args": saved}, "ckpt", parser, free=FREE[run.script])
        now = HERE_AND_NOW + parser.now
        assert {k: v for k, v in vars(args).items() if k not in now} == \
            {k: v for k, v in saved.items() if k not in now}, run.name
        assert set(FREE_ON_RESUME) >= {"data_dir", "device"}  # what --data_dir and --device may change
