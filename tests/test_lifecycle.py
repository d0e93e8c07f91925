"""The run folder's life (engine/lifecycle.py) and the command-line checks (engine/cli.py), unit by unit."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import main as stage2
import super_and
from engine.cli import check_output_dir, check_output_file
from engine.lifecycle import JsonLog, RunLock, open_run, read_checkpoint, refuse_overwrite, run_epoch
from lib.errors import InputError


def dead_pid():
    """The PID of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- the lock ----

def test_lock_names_its_owner_and_refuses_a_second_run(tmp_path):
    with RunLock(str(tmp_path)):
        owner = json.loads((tmp_path / "run.lock").read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(InputError, match=f"PID {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / "run.lock").exists()  # released


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    with RunLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        assert lock.held


def test_lock_with_a_reused_pid_is_taken_over(tmp_path):
    """A live PID whose process started at another time is not the run that wrote the lock."""
    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                   "process_start": 1}))
    with RunLock(str(tmp_path)):
        assert json.loads((tmp_path / "run.lock").read_text())["process_start"] != 1


def test_lock_cut_while_written_is_taken_over(tmp_path):
    (tmp_path / "run.lock").write_text('{"pid": 12')
    with RunLock(str(tmp_path)) as lock:
        assert lock.held
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()  # this process holds it now
    assert not (tmp_path / "run.lock").exists()


def test_lock_of_another_host_is_respected(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "script": "main.py"}))
    with pytest.raises(InputError, match="main.py .PID 1 on elsewhere"):
        RunLock(str(tmp_path)).acquire()


# ---- the log ----

def test_log_cut_mid_line_is_repaired_on_rewind(tmp_path):
    log = JsonLog(str(tmp_path / "log.jsonl"))
    log.append({"epoch": 0})
    log.append({"epoch": 1})
    with open(log.path, "a") as f:
        f.write('{"epoch": 2, "lo')  # a kill in the middle of a line
    assert log.read() == [{"epoch": 0}, {"epoch": 1}]
    log.rewind(lambda r: r["epoch"] < 2, {"epoch": 2})
    assert log.read() == [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 3


def test_log_with_a_bad_line_inside_is_an_error(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    with pytest.raises(InputError, match="line 2"):
        JsonLog(str(tmp_path / "log.jsonl")).read()


# ---- create or resume ----

def test_new_run_refuses_a_folder_with_a_run(tmp_path):
    (tmp_path / "ckpt.t7").write_bytes(b"x")
    with pytest.raises(InputError, match="--resume ckpt.t7"):
        refuse_overwrite(str(tmp_path), ["ckpt.t7", "log.jsonl"])
    (tmp_path / "ckpt.t7").unlink()
    (tmp_path / "log.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="move it away"):
        refuse_overwrite(str(tmp_path), ["ckpt.t7", "log.jsonl"])


def test_open_run_removes_temporaries_and_restores_state(tmp_path):
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    from engine.system import rng_state
    saved = {"optimizer": optimizer.state_dict(), "rng": rng_state(), "epoch": 1, "args": {},
             "log_record": {"epoch": 1}}
    torch.save(saved, tmp_path / "ckpt.t7")
    (tmp_path / "ckpt.t7.tmp4242").write_bytes(b"half a checkpoint")
    (tmp_path / "log.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n')
    expected = torch.rand(3)
    fresh = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    with open_run(str(tmp_path), "ckpt.t7", "log.jsonl", resumed=str(tmp_path / "ckpt.t7"), ckpt=saved,
                  position=lambda r: r["epoch"], optimizer=fresh,
                  args=SimpleNamespace(momentum=0.9, weight_decay=0.01)) as run:
        assert fresh.param_groups[0]["weight_decay"] == 0.01  # a changed flag takes effect on resume
        assert not (tmp_path / "ckpt.t7.tmp4242").exists()
        assert run.log.read() == [{"epoch": 0}, {"epoch": 1}]  # epoch 2 came after the checkpoint
        assert torch.equal(torch.rand(3), expected)  # the RNG continues where the checkpoint left it
        momentum = fresh.state_dict()["state"][0]["momentum_buffer"]
        assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])
        assert (tmp_path / "run.lock").exists()
    assert not (tmp_path / "run.lock").exists()


def test_ctrl_c_inside_a_run_says_how_to_resume(tmp_path):
    from engine.lifecycle import Interrupted
    with pytest.raises(Interrupted, match="run the same command again"), \
            open_run(str(tmp_path), "ckpt.t7", "log.jsonl"):
        raise KeyboardInterrupt
    with pytest.raises(Interrupted, match="--resume ckpt.t7"), open_run(str(tmp_path), "ckpt.t7", "log.jsonl") as run:
        run.save({"net": {}})
        raise KeyboardInterrupt
    assert not (tmp_path / "run.lock").exists()


def test_run_epoch_averages_named_losses_and_stops_on_nan():
    batches = [{"view1": torch.zeros(2, 3, 4, 4), "view2": torch.ones(2, 3, 4, 4), "index": torch.arange(2)}] * 4
    seen = []

    def step(images, batch):
        seen.append(images[:, 0, 0, 0].tolist())
        k = len(seen)
        return {"loss": torch.tensor(float(k)), "parts": torch.tensor([k, 2.0 * k])}

    means = run_epoch(batches, step, torch.device("cpu"))
    assert means == {"loss": 2.5, "parts": [2.5, 5.0]}
    assert seen[0] == [0, 0, 1, 1]  # view 1 rows first
    from lib.errors import Diverged
    with pytest.raises(Diverged, match="non-finite"):
        run_epoch(batches, lambda images, batch: {"loss": torch.tensor(float("nan"))}, torch.device("cpu"))


# ---- checkpoints read ----

def test_checkpoint_is_looked_up_in_model_dir_first(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    torch.save({"net": {"w": torch.zeros(1)}, "a": 1}, tmp_path / "run" / "ckpt.t7")
    torch.save({"net": {"w": torch.ones(1)}, "a": 2}, tmp_path / "ckpt.t7")
    monkeypatch.chdir(tmp_path)
    path, ckpt = read_checkpoint("ckpt.t7", "run")
    assert ckpt["a"] == 1 and path == os.path.join("run", "ckpt.t7")
    assert "using checkpoint run/ckpt.t7" in capsys.readouterr().out
    path, ckpt = read_checkpoint("ckpt.t7", "elsewhere")
    assert ckpt["a"] == 2


def test_checkpoint_missing_keys_nan_weights_and_fifo(tmp_path):
    torch.save({"net": {"w": torch.zeros(1)}, "next": {}}, tmp_path / "a.t7")
    with pytest.raises(InputError, match="lacks 'npc.memory', 'next.round'"):
        read_checkpoint(str(tmp_path / "a.t7"), str(tmp_path), required=["npc.memory", "next.round"])
    torch.save({"net": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "b.t7")
    with pytest.raises(InputError, match="non-finite weights .w."):
        read_checkpoint(str(tmp_path / "b.t7"), str(tmp_path))
    os.mkfifo(tmp_path / "pipe.t7")
    with pytest.raises(InputError, match="not a regular file"):  # would hang in torch.load
        read_checkpoint(str(tmp_path / "pipe.t7"), str(tmp_path))


# ---- flags ----

BAD_FLAGS = [
    (super_and, ["--batch_size", "0"]), (super_and, ["--batch_size", "-4"]), (super_and, ["--lr", "-1"]),
    (super_and, ["--lr", "nan"]), (super_and, ["--weight_decay", "-1"]), (super_and, ["--workers", "-1"]),
    (super_and, ["--seed", "100000000000000000000000"]), (super_and, ["--seed", "1e23"]),
    (super_and, ["--low_dim", "0"]), (super_and, ["--width", "0"]), (super_and, ["--npc_m", "2"]),
    (super_and, ["--momentum", "2"]), (super_and, ["--momentum", "1"]), (super_and, ["--ANs_select_rate", "1.5"]),
    (super_and, ["--ANs_select_rate", "-0.1"]), (super_and, ["--ANs_size", "0"]), (super_and, ["--epochs", "0"]),
    (super_and, ["--rounds", "0"]), (super_and, ["--npc_t", "0"]), (super_and, ["--batch_t", "-1"]),
    (super_and, ["--image_size", "4"]), (super_and, ["--subset", "0"]),
    (stage2, ["--num_heads", "0"]), (stage2, ["--tau_c", "-1"]), (stage2, ["--lambda_cp", "-1"]),
    (stage2, ["--batch_m", "inf"]), (stage2, ["--num_classes", "1"]),
]


@pytest.mark.parametrize("module,flags", BAD_FLAGS, ids=[" ".join(f) for _, f in BAD_FLAGS])
def test_bad_flag_values_are_one_line(module, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.get_args_parser().parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flags[0] in err[0], err


def test_help_states_ranges():
    text = super_and.get_args_parser().format_help()
    for fragment in ("(in [0, 1))", "(> 0)", "(>= 1)", "1 <= k < N"):
        assert fragment in text, fragment


def test_output_dir_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_output_dir(str(tmp_path / "file"))
    with pytest.raises(InputError, match="is under the file"):
        check_output_dir(str(tmp_path / "file" / "run"))
    with pytest.raises(InputError, match="empty"):
        check_output_dir("")
    check_output_dir(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()  # checked, not created


def test_output_file_is_never_a_checkpoint(tmp_path):
    torch.save({"net": {}}, tmp_path / "model.bin")
    run = str(tmp_path / "run")
    with pytest.raises(InputError, match="checkpoint"):
        check_output_file(str(tmp_path / "model.bin"), "--export_predictions", run)
    with pytest.raises(InputError, match="checkpoint"):
        check_output_file(str(tmp_path / "ckpt_ul_last.t7"), "--export_predictions", run)
    with pytest.raises(InputError, match="does not exist"):
        check_output_file(str(tmp_path / "missing" / "p.csv"), "--export_predictions", run)
    check_output_file(str(tmp_path / "p.csv"), "--export_predictions", run)
