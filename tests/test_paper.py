"""The paper's experiments (docs/method.md, "The paper's experiments"): heads without weight normalization
(Table 3) against a hand computation, the harness's tables as data, and (slow) the harness end to end on
digits: its numbers are the runs' own, a second call runs only what is new, a run cut short is resumed."""
import contextlib
import functools
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_main
from experiments import paper, verdicts
from models import MultiHeadNormFC, NormFC

# ---- heads without weight normalization ----


def test_head_without_normalization_is_the_plain_softmax():
    """head_norm 'none': softmax(v · W / τ_c) with the drawn W, computed by hand for d = 2, C = 3."""
    head = NormFC(2, 3, temperature=0.5, norm="none")
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]))
    v = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    logits = [(0.6 * 1.0 + 0.8 * 3.0) / 0.5, (0.6 * -2.0 + 0.8 * 0.0) / 0.5, (0.6 * 0.5 + 0.8 * -1.0) / 0.5]
    z = sum(math.exp(x) for x in logits)
    expected = [math.exp(x) / z for x in logits]  # logits 5.6, -2.4, -1.0
    got = head(v).squeeze(0).tolist()
    assert got == pytest.approx(expected, rel=1e-12)
    normalized = NormFC(2, 3, temperature=0.5, norm="released")
    with torch.no_grad():
        normalized.weight.copy_(head.weight)
    assert normalized(v).squeeze(0).tolist() != pytest.approx(expected, rel=1e-3)  # a different mode
    heads = MultiHeadNormFC(4, 3, num_heads=2, norm="none")
    assert all(h.norm == "none" and not h.weight.requires_grad for h in heads.heads)  # still frozen
    with pytest.raises(ValueError, match="none"):
        NormFC(2, 3, norm="columns")


# ---- the tables as data ----

@functools.cache
def parser_of(script):
    """``script``'s own parser, built once (parsing leaves it as it was)."""
    return importlib.import_module(script[:-3]).get_args_parser()


def parses(run, flags):
    """``run``'s flags (and the --model_dir and --resume the harness adds) parse with its script's own parser;
    a flag or choice the script does not offer exits 2."""
    argv = [*flags, "--model_dir", "out"] + (["--resume", "x.t7"] if run.encoder else [])
    if run.kind == "semi" and run.encoder:
        argv = [f for f in argv if f != "--from_scratch"]
    parser_of(run.script).parse_args(argv)
    return True


def test_every_row_parses_with_its_scripts_parser():
    """Every run of every table, at every scale, on the data sets of the paper's tables: its flags are the
    scripts' own (the harness checks nothing at run time)."""
    for dataset in ("cifar10", "svhn", "fashion-mnist", "digits"):
        for scale in paper.SCALES:
            for run, flags, _ in paper.plan(list(paper.TABLES), scale, dataset, [], set(), 2)[1].values():
                assert parses(run, flags), (dataset, scale, run.name)
    with pytest.raises(SystemExit):  # the check can fail
        parses(paper.RUNS["assign"], ["--head_norm", "rows"])


def test_a_python_without_the_projects_packages_is_one_clear_line():
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['paper.py', '--dry_run']; "
            f"runpy.run_path({os.path.join(ROOT, 'experiments', 'paper.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "make paper" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_tables_share_runs_and_declare_the_papers_numbers():
    runs = {cell.run.name: cell.run for t in paper.TABLES.values() for r in t.rows for cell in r.cells if cell}
    assert set(paper.RUNS) >= set(runs)
    two_stage = [c.run for t in paper.TABLES.values() for r in t.rows for c in r.cells
                 if c and c.paper == 81.0 and c.key == "acc"]
    assert {r.name for r in two_stage} == {"assign"}  # Table 2's Super-AND, Table 3, C at λ = 1 and τ_c = 0.1, D
    assert paper.TABLES["3"].rows[0].cells[0].run is not None
    by_id = {r.id: r for r in paper.TABLES["3"].rows}
    assert [by_id[k].cells[0].paper for k in ("lambda0", "no_norm", "tau1", "kmeans", "agglomerative", "joint",
                                              "two_stage")] == [58.2, 56.0, 19.5, 38.3, 49.9, 68.4, 81.0]
    flags = paper.run_flags(by_id["no_norm"].cells[0].run, "paper", "cifar10", [])
    assert flags[-2:] == ["--head_norm", "none"] and flags[flags.index("--epochs") + 1] == "300"
    lam1 = {r.id: r for r in paper.TABLES["C"].rows}["lambda1"]
    assert lam1.cells[0].run.name == "assign"  # λ at its default: the two-stage run itself
    assert paper.run_flags(paper.RUNS["embed"], "paper", "cifar10", [])[-4:] == ["--rounds", "5", "--epochs", "200"]
    long = {r.id: r for r in paper.TABLES["D"].rows}["random_long"].cells[0].run
    assert "--init" in long.flags and paper.run_flags(long, "paper", "cifar10", [])[-3] == "1300"


def test_the_joint_row_runs_joint_py_and_every_flag_it_passes_is_offered():
    """Table 3's joint row: joint.py from a random network, stage 1's rounds and learning rate at each scale;
    its flags (and the Table 2 variants') parse with the scripts' own parsers."""
    run = {r.id: r for r in paper.TABLES["3"].rows}["joint"].cells[0].run
    assert (run.script, run.kind, run.encoder) == ("joint.py", "joint", None)
    assert paper.run_flags(run, "paper", "cifar10", [])[-4:] == ["--rounds", "5", "--epochs", "200"]
    cpu = paper.run_flags(run, "cpu", "cifar10", [])
    assert cpu[cpu.index("--lr") + 1] == "0.0075" and cpu[-4:] == ["--rounds", "2", "--epochs", "3"]
    assert parses(run, paper.run_flags(run, "cpu", "cifar10", []))
    for variant in ("and", "lemniscate"):
        encoder = paper.RUNS[f"embed-{variant}"]
        assert parses(encoder, paper.run_flags(encoder, "cpu", "cifar10", []))


def test_stage2_rows_are_runnable_with_todays_flags():
    """What Table 2's random row, Table 3's heads without normalization and sequential rows, and
    supplementary D ask of main.py parses with its parser; so does every run of Tables 2, 3, C and D with
    every scale's flags (--schedule_scale...) and a second seed's."""
    rows = {(t, r.id): r for t, table in paper.TABLES.items() for r in table.rows}
    for key in (("2", "random"), ("3", "no_norm"), ("3", "kmeans"), ("3", "agglomerative"), ("D", "random_long")):
        run = rows[key].cells[-1].run
        assert parses(run, paper.run_flags(run, "tiny", "digits", [])), key
    for scale in paper.SCALES:
        for run, flags, _ in paper.plan(["2", "3", "C", "D"], scale, "fashion-mnist", [], set(), 2)[1].values():
            assert parses(run, flags), (scale, run.name)


# ---- the harness end to end ----

# rows of Tables 2, 3, C, D and 4, six runs a seed: stage 1, stage 2 and k-means on it (stage 2 shared by all of
# Tables 2, 3, C and D's rows), and Table 4's chain: stage 1 and stage 2 on a WideResNet, semi.py from that
# stage-2 model; one claim (Table 3: two-stage > k-means) has both its rows
ROWS = ["2:super_and", "3:two_stage", "3:kmeans", "C:lambda1", "C:tau0.1", "D:two_stage", "4:ours_supervised"]
NAMES = ("embed", "embed-wrn28_2", "assign", "sequential-kmeans", "assign-wrn28_2", "semi-ours-supervised")
# a second seed on the claim's two rows alone (three runs more), two runs side by side
SEEDED, SEEDED_NAMES = ["3:two_stage", "3:kmeans"], ("embed", "assign", "sequential-kmeans")
SEED1 = tuple(f"{n}-seed1" for n in SEEDED_NAMES)
SCRIPTS = {"super_and.py": "super_and", "main.py": "main", "semi.py": "semi", "joint.py": "joint"}


def harness_argv(out, seeds, rows, jobs):
    return ["--tables", "2", "3", "C", "D", "4", "--rows", *rows, "--scale", "tiny", "--dataset", "digits",
            "--out", str(out), "--seeds", str(seeds), "--jobs", str(jobs)]


def harness(out, seeds=1, rows=ROWS, jobs=1):
    """The harness as a user starts it: a process, each run a process of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "paper.py"),
                           *harness_argv(out, seeds, rows, jobs)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "tables.json") as f:
        return json.load(f)


def in_process(argv, path, quiet=False, env=None):
    """``paper.execute`` with the script's ``main`` run in this process (as the other tests run the scripts), its
    output appended to the run's output.log: the harness's plan, folders and tables at a process's import cost
    less."""
    module = importlib.import_module(SCRIPTS[os.path.basename(argv[1])])
    with open(os.path.join(path, paper.OUTPUT), "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            run_main(module, argv[2:])
        except SystemExit as stop:
            return stop.code
    return 0


def harness_here(out, monkeypatch, seeds=1, rows=ROWS):
    """The harness's own command line (``paper.cli``) in this process, its runs through ``in_process``."""
    monkeypatch.setattr(paper, "execute", in_process)
    with pytest.raises(SystemExit) as stop:
        paper.cli(harness_argv(out, seeds, rows, 1))
    assert stop.value.code == 0
    with open(out / "tables.json") as f:
        return json.load(f)


def mtimes(folder):
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(folder) for n in names}


def own_number(cell, run=None):
    """The number of a cell read straight from its run folder's eval.json (eval_semi.json) or log (``run``: the
    folder of another seed's run)."""
    source, key = cell["source"].split(" ")[0].split(":")
    run = run or cell["run"]
    if source == "eval":
        name = "eval_semi.json" if os.path.basename(run).startswith("semi") else "eval.json"
        with open(os.path.join(run, name)) as f:
            value = json.load(f)[key]
    else:
        name = "log_embed.jsonl" if os.path.basename(run).startswith("embed") else "log_ul.jsonl"
        with open(os.path.join(run, name)) as f:
            value = json.loads(f.read().splitlines()[-1])[key]
    return sum(value) / len(value) if "(mean)" in cell["source"] else value


def numbers(result):
    """Every cell's paper number, measured number and run folder (not its status: ran, skipped...)."""
    return [(t, r["id"], c["paper"], c["measured"], c["run"]) for t, table in result["tables"].items()
            for r in table["rows"] for c in r["cells"]]


@pytest.mark.slow
def test_harness_end_to_end_skips_and_resumes(tmp_path, monkeypatch):
    """One call runs the rows' six runs, each once (in this process), and every number is its run's own; then
    the user's command, as processes: --seeds 2 (two runs side by side) on the two rows of a claim runs only
    seed 1's three, on seed 1's encoder, resumes seed 0's run that was cut short from its last checkpoint, skips
    the others, and reports every seed's number, their mean and deviation, and the claim's verdict from the
    runs' own files."""
    result = harness_here(tmp_path, monkeypatch)
    assert {n: r["status"] for n, r in result["runs"].items()} == dict.fromkeys(NAMES, "ran")
    rows = {(t, r["id"]): r for t, table in result["tables"].items() for r in table["rows"]}
    measured = [c for r in rows.values() for c in r["cells"] if c["measured"] is not None]
    # two-stage (Tables 2, 3, D and C's two columns for each of its two rows: 7), kNN, k-means, Table 4's one
    assert len(measured) == 10
    for cell in measured:
        assert cell["measured"] == own_number(cell)
    assert rows[("2", "super_and")]["cells"][-1]["run"] == rows[("3", "two_stage")]["cells"][0]["run"] \
        == rows[("C", "lambda1")]["cells"][0]["run"] == rows[("C", "tau0.1")]["cells"][0]["run"] \
        == rows[("D", "two_stage")]["cells"][0]["run"]
    assert rows[("C", "lambda1")]["cells"][1]["source"] == "eval:head_acc (mean)"
    assert rows[("2", "super_and")]["cells"][0]["paper"] == 89.2
    assert rows[("4", "ours_supervised")]["cells"][0]["paper"] == 85.4
    with open(tmp_path / "runs" / "semi-ours-supervised" / "eval_semi.json") as f:
        semi = json.load(f)
    assert semi["labelled"] == 40 and semi["start"] == str(tmp_path / "runs" / "assign-wrn28_2" / "ckpt_ul.t7")
    assert os.path.exists(tmp_path / "tables.md")

    # seed 0's stage-2 run cut short (no eval.json, its log's last line gone)
    cut = tmp_path / "runs" / "assign"
    with open(cut / "eval.json") as f:
        acc = json.load(f)["acc"]
    os.remove(cut / "eval.json")
    lines = (cut / "log_ul.jsonl").read_text().splitlines(keepends=True)
    (cut / "log_ul.jsonl").write_text("".join(lines[:-1]))
    last = os.stat(cut / "ckpt_ul_last.t7").st_mtime_ns

    # the user's command with a second seed: seed 0's finished runs are skipped (no file in their folders
    # changes), the cut one resumed, seed 1's run, each chain on seed 1's encoder; every cell holds both seeds'
    # own numbers
    before = {p: t for p, t in mtimes(tmp_path / "runs").items() if not p.startswith(str(cut))}
    again = harness(tmp_path, seeds=2, rows=SEEDED, jobs=2)
    assert {p: t for p, t in mtimes(tmp_path / "runs").items() if "-seed1" not in p and not p.startswith(str(cut))} \
        == before
    assert {n: r["status"] for n, r in again["runs"].items()} == {
        **dict.fromkeys(SEEDED_NAMES, "skipped"), "assign": "resumed", **dict.fromkeys(SEED1, "ran")}
    assert os.stat(cut / "ckpt_ul_last.t7").st_mtime_ns == last  # its epochs were done: nothing retrained
    assert (cut / "log_ul.jsonl").read_text().splitlines(keepends=True) == lines  # the log repaired
    with open(cut / "eval.json") as f:
        assert json.load(f)["acc"] == acc
    assert again["runs"]["assign-seed1"]["encoder"] == "embed-seed1"
    assert paper._flag_value(again["runs"]["assign-seed1"]["flags"], "--seed") == "1"
    encoder = str(tmp_path / "runs" / "embed-seed1" / "ckpt_embed.t7")
    assert f"using checkpoint {encoder}" in (tmp_path / "runs" / "assign-seed1" / "output.log").read_text()
    assert (tmp_path / "runs" / "assign-seed1" / "mutual_information.png").exists()  # a run as a process draws
    two = {(t, r["id"]): r for t, table in again["tables"].items() for r in table["rows"]}
    for key, row in two.items():
        for cell, first in zip(row["cells"], rows[key]["cells"]):
            if first["measured"] is None:
                continue
            own = [own_number(cell, run) for run in cell["runs"]]
            assert cell["values"] == own and own[0] == first["measured"], key
            assert cell["mean"] == pytest.approx((own[0] + own[1]) / 2, abs=1e-12)
            assert cell["std"] == pytest.approx(abs(own[0] - own[1]) / math.sqrt(2), abs=1e-12) and cell["n"] == 2
    assert two[("3", "two_stage")]["cells"][0]["values"][0] == acc  # seed 0's, from the resumed run's report
    # the claim two-stage > k-means, by the stated rule: paired differences, mean against two standard errors
    better, worse = (two[("3", r)]["cells"][0]["values"] for r in ("two_stage", "kmeans"))
    d = [a - b for a, b in zip(better, worse)]
    mean, se = (d[0] + d[1]) / 2, abs(d[0] - d[1]) / 2  # the deviation of two numbers over sqrt(2)
    (claim,) = again["claims"]
    assert (claim["better"], claim["worse"], claim["n"]) == ("two_stage", "kmeans", 2)
    assert claim["difference"] == pytest.approx(mean, abs=1e-12) and claim["standard_error"] == pytest.approx(se)
    assert claim["verdict"] == ("holds" if mean > 2 * se else "reversed" if mean < -2 * se else "undecided")
    assert claim["verdict"] in (tmp_path / "tables.md").read_text()
    for picture in ("tables.png", "curves.png"):
        assert (tmp_path / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_rule_on_hand_made_numbers():
    """Paired by seed: the mean difference against two standard errors of it; fewer than two pairs decide
    nothing; a seed missing on either side is left out of the pairs."""
    # differences 3, 4, 5: mean 4, se 1/sqrt(3) = 0.577: holds
    assert verdicts.verdict([53, 54, 55], [50, 50, 50])[0] == "holds"
    v, mean, se, n = verdicts.verdict([50, 50, 50], [53, 54, 55])
    assert (v, mean, n) == ("reversed", -4, 3) and se == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    # differences 1, -1, 3: mean 1, se 2/sqrt(3) = 1.155: 1 < 2.31, undecided
    assert verdicts.verdict([51, 49, 53], [50, 50, 50])[0] == "undecided"
    # the same means unpaired would overlap (rows spread by 10 points); paired, the differences are 2.0-2.2
    assert verdicts.verdict([40, 50, 60], [38, 47.9, 57.8])[0] == "holds"
    # differences 2, 0, 0: mean 0.67, one standard error: undecided; a constant positive difference: holds
    assert verdicts.verdict([2, 0, 0], [0, 0, 0])[0] == "undecided"
    assert verdicts.verdict([51, 52, 53], [50, 51, 52])[0] == "holds"
    assert verdicts.verdict([51, 51], [51, 51])[0] == "undecided"
    # one seed, or one pair after the missing ones are left out
    assert verdicts.verdict([60], [40]) == ("undecided", 20, None, 1)
    assert verdicts.verdict([60, None, 70], [40, 45, None]) == ("undecided", 20, None, 1)
    assert verdicts.verdict([60, 61, None, 62], [40, 41, 45, 42])[3] == 3
    assert verdicts.summary([1.0, None, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert verdicts.summary([None]) == {"mean": None, "std": None, "n": 0}


def test_head_swing_from_hand_made_logs(tmp_path):
    """The selected head against the best and the mean of the heads over the last epochs of every finished
    seed, and its epoch-to-epoch movement within a seed (not across seeds), from the runs' logs."""
    run = paper.RUNS["assign"]
    logs = {0: [([50, 60, 40], 0), ([52, 58, 40], 1), ([54, 61, 40], 1)],
            1: [([70, 70, 40], 1), ([71, 65, 40], 0), ([60, 66, 40], 0)],
            2: [([90, 90, 90], 0)] * 3}  # a failed seed: not counted
    for seed, records in logs.items():
        os.makedirs(paper.folder(str(tmp_path), run, seed))
        with open(os.path.join(paper.folder(str(tmp_path), run, seed), "log_ul.jsonl"), "w") as f:
            f.write("".join(json.dumps({"epoch": e, "head_acc": acc, "selected_head": h}) + "\n"
                            for e, (acc, h) in enumerate([([0, 0, 0], 0)] * 5 + records)))  # earlier epochs
    runs = {paper.job_name(run, k): (run, [], k) for k in (0, 1, 2)}
    status = {"assign": "ran", "assign-seed1": "skipped", "assign-seed2": "failed (exit 1)"}
    swing = paper.head_swing(str(tmp_path), runs, status, last=3)["assign"]
    assert (swing["seeds"], swing["epochs"]) == (2, 6)
    assert swing["below_best_mean"] == pytest.approx((10 + 6) / 6) and swing["below_best_max"] == 10
    above = [50 - 50, 58 - 50, 61 - 155 / 3, 70 - 60, 71 - 176 / 3, 60 - 166 / 3]
    assert swing["above_mean_of_heads"] == pytest.approx(sum(above) / 6)
    assert swing["is_best"] == pytest.approx(4 / 6)
    moves = [58 - 50, 61 - 58, 71 - 70, 71 - 60]  # 61 -> 70 is across seeds: not a move
    assert swing["epoch_to_epoch_mean"] == pytest.approx(sum(moves) / 4) and swing["epoch_to_epoch_max"] == 11
    assert swing["switches"] == pytest.approx(2 / 4)
    assert "| assign | 2 x 3 | 2.7 / 10.0 |" in "\n".join(paper.swing_lines({"assign": swing}))


def test_curves_read_every_seeds_log(tmp_path):
    """curves.png's numbers: each run's log, per seed, all rounds in order; a run that never started has none."""
    embed, semi = paper.RUNS["embed"], paper.RUNS["semi-supervised"]
    for run, seed, key, values in ((embed, 0, "knn_top1", [10, 20, 30, 40]), (embed, 1, "knn_top1", [15, 25]),
                                   (semi, 0, "test_acc", [50, 60])):
        os.makedirs(paper.folder(str(tmp_path), run, seed))
        with open(os.path.join(paper.folder(str(tmp_path), run, seed), paper.LOGS[run.script]), "w") as f:
            f.write("".join(json.dumps({"round": i // 2, "epoch": i % 2, key: v}) + "\n" for i, v in enumerate(values)))
    runs = {paper.job_name(r, k): (r, [], k) for r in (embed, semi) for k in (0, 1)}
    found = paper.curves(str(tmp_path), runs, dict.fromkeys(runs, "ran"))
    assert found == {"embed": {"embed": {0: [10, 20, 30, 40], 1: [15, 25]}}, "semi": {"semi-supervised": {0: [50, 60]}}}


def test_claims_name_rows_of_their_tables():
    """Every claim compares two rows of its table in a column the table has; the chains are the paper's
    orders (Table 2 and Table 3's), every Table-3 ablation is below the full model, Table 4 pairs each method."""
    for claim in paper.CLAIMS:
        ids = {r.id for r in paper.TABLES[claim.table].rows}
        assert {claim.better, claim.worse} <= ids and claim.column < len(paper.TABLES[claim.table].columns), claim
        cells = {r.id: r.cells[claim.column] for r in paper.TABLES[claim.table].rows}
        b, w = (paper.paper_number(cells[x].paper, "cifar10") if cells[x] else None
                for x in (claim.better, claim.worse))
        assert b is None or w is None or b > w, claim  # as the paper states it, where it gives both numbers
    pairs = {(c.table, c.better, c.worse, c.column) for c in paper.CLAIMS}
    assert {("3", "two_stage", "joint", 0), ("3", "joint", "agglomerative", 0), ("3", "agglomerative", "kmeans", 0),
            ("3", "two_stage", "lambda0", 0), ("3", "two_stage", "no_norm", 0), ("3", "two_stage", "tau1", 0),
            ("2", "lemniscate", "random", 1), ("D", "two_stage", "random_long", 0),
            ("4", "ours_mean_teacher", "mean_teacher", 0)} <= pairs


def test_jobs_side_by_side_wait_for_their_encoder(monkeypatch):
    """--jobs 2: two runs at once, each run only after its encoder ended, a run whose encoder failed not
    started; the scripts get one thread each (2 cores / 2 jobs) where OMP_NUM_THREADS is not set."""
    import argparse
    import threading
    import time
    _, runs = paper.plan(["3"], "tiny", "digits", [], {"3:two_stage", "3:kmeans"}, seeds=2)
    events, lock, envs = [], threading.Lock(), set()

    def fake(run, flags, out, seed, quiet, env):
        name = paper.job_name(run, seed)
        with lock:
            events.append(("start", name))
        envs.add((quiet, env and env["OMP_NUM_THREADS"]))
        time.sleep(0.2)
        with lock:
            events.append(("end", name))
        return "failed (exit 1)" if name == "embed-seed1" else "ran"

    monkeypatch.setattr(paper, "run_one", fake)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(paper.os, "cpu_count", lambda: 2)
    args = argparse.Namespace(jobs=2, dry_run=False, out="out")
    status = paper.run_all(runs, args)
    assert status == {"embed": "ran", "assign": "ran", "sequential-kmeans": "ran", "embed-seed1": "failed (exit 1)",
                      "assign-seed1": "encoder embed-seed1: failed (exit 1)",
                      "sequential-kmeans-seed1": "encoder embed-seed1: failed (exit 1)"}
    at = {e: i for i, e in enumerate(events)}
    assert at[("end", "embed")] < at[("start", "assign")] and at[("end", "embed")] < at[("start", "sequential-kmeans")]
    # seed 0's two runs on its encoder go on side by side: each starts before the other ends
    assert at[("start", "assign")] < at[("end", "sequential-kmeans")]
    assert at[("start", "sequential-kmeans")] < at[("end", "assign")]
    assert envs == {(True, "1")}


def test_jobs_stop_at_an_interruption(monkeypatch):
    """--jobs 2: a run stopped by Ctrl-C or SIGTERM stops the harness; the runs not yet started never start and
    the one beside it ends first."""
    import argparse
    import time
    _, runs = paper.plan(["3"], "tiny", "digits", [], {"3:two_stage", "3:kmeans"}, seeds=2)
    started, ended = [], []

    def fake(run, flags, out, seed, quiet, env):
        name = paper.job_name(run, seed)
        started.append(name)
        if name == "assign":  # stopped while sequential-kmeans runs beside it
            time.sleep(0.1)
            raise KeyboardInterrupt  # as run_one does on a script's exit 130 or 143
        time.sleep(0.3)
        ended.append(name)
        return "ran"

    monkeypatch.setattr(paper, "run_one", fake)
    with pytest.raises(KeyboardInterrupt):
        paper.run_all(runs, argparse.Namespace(jobs=2, dry_run=False, out="out"))
    assert set(started) == {"embed", "assign", "sequential-kmeans"} and ended == ["embed", "sequential-kmeans"]


def test_a_folder_of_another_command_is_refused(tmp_path):
    run = paper.RUNS["assign-lambda_cp0"]
    flags = paper.run_flags(run, "tiny", "digits", ["--data_dir", "here"])
    paper.check_folder(run, flags, str(tmp_path / "f"))
    with open(tmp_path / "f" / "command.json") as f:
        assert json.load(f)["flags"] == paper.run_flags(run, "tiny", "digits", [])  # where the data are: not matched
    paper.check_folder(run, paper.run_flags(run, "tiny", "digits", ["--device", "cpu"]), str(tmp_path / "f"))
    with pytest.raises(paper.HarnessError, match="another command"):
        paper.check_folder(run, paper.run_flags(run, "cpu", "digits", []), str(tmp_path / "f"))


@pytest.mark.parametrize("status", [130, 143])
def test_a_run_stopped_by_ctrl_c_or_sigterm_stops_the_harness(tmp_path, monkeypatch, status):
    """A Ctrl-C or SIGTERM that reached the run but not the harness (a harness started in the background
    ignores SIGINT) still ends the harness, instead of its going on to the next run."""
    run = paper.RUNS["assign-lambda_cp0"]
    flags = paper.run_flags(run, "tiny", "digits", [])
    monkeypatch.setattr(paper, "execute", lambda argv, path, *_: status)
    with pytest.raises(KeyboardInterrupt):
        paper.run_one(run, flags, str(tmp_path))
    monkeypatch.setattr(paper, "execute", lambda argv, path, *_: 1)
    assert paper.run_one(run, flags, str(tmp_path)) == "failed (exit 1)"


# ---- Table 4: few labels ----

def test_table4_rows_their_papers_numbers_and_one_shared_stage2_encoder():
    """Six semi.py rows on a WideResNet-28-2: three from scratch, three from one stage-2 run (itself on one
    stage-1 run); the paper's number is the data set's column (CIFAR-10's for a data set the paper lacks);
    every flag the rows pass is in the scripts' own parsers."""
    table = paper.TABLES["4"]
    rows = {r.id: r.cells[0] for r in table.rows}
    assert list(rows) == ["supervised", "pi_model", "mean_teacher", "ours_supervised", "ours_pi_model",
                          "ours_mean_teacher"]
    assert [paper.paper_number(c.paper, "cifar10") for c in rows.values()] == [79.7, 83.8, 84.2, 85.4, 85.8, 88.0]
    assert [paper.paper_number(c.paper, "svhn") for c in rows.values()] == [87.7, 92.2, 93.5, 93.4, 93.6, 94.2]
    assert [paper.paper_number(c.paper, "digits") for c in rows.values()] == [79.7, 83.8, 84.2, 85.4, 85.8, 88.0]
    assert (paper.paper_dataset(table, "svhn"), paper.paper_dataset(table, "digits")) == ("svhn", "cifar10")
    assert all((c.source, c.key, c.run.kind, c.run.script) == ("eval", "test_acc", "semi", "semi.py")
               for c in rows.values())
    ours = [rows[k].run for k in ("ours_supervised", "ours_pi_model", "ours_mean_teacher")]
    assert {r.encoder for r in ours} == {"assign-wrn28_2"} and len({r.name for r in ours}) == 3
    assert [r.name for r in paper.chain(ours[0])] == ["embed-wrn28_2", "assign-wrn28_2", ours[0].name]
    assert all(r.encoder is None and "--from_scratch" in r.flags for r in (rows[k].run for k in
                                                                         ("supervised", "pi_model", "mean_teacher")))
    _, runs = paper.plan(["4"], "paper", "cifar10", [], set())
    assert list(runs)[0] == "embed-wrn28_2" and len(runs) == 8  # six semi.py runs and the one pair
    assert list(runs).index("assign-wrn28_2") < min(list(runs).index(r.name) for r in ours)
    for run, flags, _ in runs.values():
        assert paper._flag_value(flags, "--network") == "wrn28_2", run.name
    assert paper._flag_value(runs[ours[2].name][1], "--method") == "mean_teacher"
    assert paper._flag_value(runs[ours[2].name][1], "--epochs") == "180"
    argv = paper.command(ours[1], runs[ours[1].name][1], "out")
    assert argv[-2:] == ["--resume", os.path.join("out", "runs", "assign-wrn28_2", "ckpt_ul.t7")]
    assert paper.command(paper.RUNS["assign-wrn28_2"], [], "out")[-1] == os.path.join(
        "out", "runs", "embed-wrn28_2", "ckpt_embed.t7")
    # semi.py refuses the consistency flags with --method supervised: only the other methods get them
    assert "--rampup_epochs" not in paper.run_flags(rows["supervised"].run, "cpu", "fashion-mnist", [])
    assert "--rampup_epochs" in paper.run_flags(rows["pi_model"].run, "cpu", "fashion-mnist", [])
    for scale in paper.SCALES:
        for run, flags, _ in paper.plan(["4"], scale, "svhn", [], set(), seeds=2)[1].values():
            assert parses(run, flags), (scale, run.name)


def test_a_killed_semi_run_resumes_from_its_checkpoint_without_from_scratch(tmp_path, monkeypatch):
    """semi.py refuses --from_scratch beside --resume: a killed from-scratch run is resumed from its own
    ckpt_semi.t7 without it; a run with eval_semi.json is finished."""
    run = paper.TABLES["4"].rows[0].cells[0].run
    flags = paper.run_flags(run, "tiny", "digits", [])
    calls = []
    monkeypatch.setattr(paper, "execute", lambda argv, path, *_: calls.append(argv) or 0)
    assert paper.run_one(run, flags, str(tmp_path)) == "ran"
    assert "--from_scratch" in calls[0] and "--resume" not in calls[0]
    path = tmp_path / "runs" / run.name
    (path / "ckpt_semi.t7").write_bytes(b"")
    assert paper.run_one(run, flags, str(tmp_path)) == "resumed"
    assert "--from_scratch" not in calls[1] and calls[1][-2:] == ["--resume", "ckpt_semi.t7"]
    (path / "eval_semi.json").write_text(json.dumps({"test_acc": 12.5}))
    assert paper.run_one(run, flags, str(tmp_path)) == "skipped" and len(calls) == 2
    assert paper.read_number(paper.TABLES["4"].rows[0].cells[0], str(tmp_path)) == 12.5
