"""The scripts' edges (docs/running.md, "What each refuses, and what is kept"): an output never lands on any run's
file (found by name or content, wherever it lies); class and file names that are not UTF-8 or hold a newline
reach the pictures and the CSV escaped; a damaged or odd SVHN file is one line; a refusal that the file names
alone can decide comes before any cache or normalization is written. Each: the ``error:`` line, the exit status,
the files byte for byte. Situations built by hand: no training."""
import json
import os

import main as stage2
from conftest import NARROW, expect_error
from engine.cli import run_file_kind


def folder_bytes(folder):
    """Every file under ``folder`` and its bytes ({} for a folder that does not exist)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# ---- outputs never overwrite a run file, anywhere ----

def test_run_files_are_known_by_name_and_content(tmp_path):
    (tmp_path / "log.txt").write_text(json.dumps({"epoch": 0, "loss": 1.0}) + "\n" + json.dumps({"epoch": 1}))
    (tmp_path / "scores").write_text(json.dumps({"acc": 50.0, "selected_head": 1}, indent=1))
    (tmp_path / "lock").write_text(json.dumps({"pid": 12, "host": "h"}))
    (tmp_path / "notes.csv").write_text("index,cluster\n0,1\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert run_file_kind(str(tmp_path / "log.txt")) == "a run's log"
    assert run_file_kind(str(tmp_path / "scores")) == "a run's report"
    assert run_file_kind(str(tmp_path / "lock")) == "a run's lock"
    for name in ("log_semi.jsonl", "command.json", "paper.lock"):
        (tmp_path / name).write_text("")
        assert run_file_kind(str(tmp_path / name)) == f"a run's file ({name})"
    assert run_file_kind(str(tmp_path / "elsewhere" / "eval.json")) is None  # a new file destroys nothing
    for other in ("notes.csv", "list.json", "new.csv"):
        assert run_file_kind(str(tmp_path / other)) is None


def test_an_export_onto_another_runs_files_is_refused(tmp_path, capsys):
    """Another run's log (by name), a copy of it under another name (by content) and its eval.json, from a
    stage-2 evaluation in a third folder: one line, exit 2, every file as it was, nothing created."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "log_embed.jsonl").write_text('{"round": 0, "epoch": 0, "loss": 8.1}\n')
    (other / "eval.json").write_text('{"acc": 41.5, "selected_head": 2}')
    (tmp_path / "renamed.txt").write_text('{"round": 0, "epoch": 0, "loss": 8.1}\n')
    before = folder_bytes(tmp_path)
    for target, fragment in ((other / "log_embed.jsonl", "a run's file (log_embed.jsonl)"),
                             (tmp_path / "renamed.txt", "is a run's log"), (other / "eval.json", "a run's file")):
        expect_error(capsys, stage2, NARROW + ["--test_only", "--resume", other / "ckpt_ul.t7", "--model_dir",
                                               tmp_path / "new", "--export_predictions", target], fragment,
                     "would destroy it")
    assert folder_bytes(tmp_path) == before  # nothing changed, no run folder created
