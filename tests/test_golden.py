"""A short two-stage run gives the numbers recorded before the scripts were rewritten (tests/fixtures/README.md).

Bit-equal where a recording was made on the same kind of machine (same PyTorch, CPU kernel family and CPU
vendor: Intel's and AMD's kernels round differently and a few steps of training amplify it); elsewhere the
losses are compared to the first recording loosely (1% or 1e-3), which still catches a wrong loss or flag.
"""
import hashlib
import json
import os

import pytest
import torch

import main as stage2
import super_and
from conftest import ROOT, run_main
from lib.checkpoint import load_checkpoint

FLAGS = ["--dataset", "digits", "--width", "8", "--low_dim", "32", "--workers", "0", "--subset", "64",
         "--batch_size", "16"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def digest(state):
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def this_machine():
    vendor = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_vendor": vendor}


@pytest.fixture(scope="module")
def golden():
    """The recording made on this kind of machine, else the first one (compared loosely)."""
    with open(os.path.join(ROOT, "tests", "fixtures", "golden_steps.json")) as f:
        recordings = json.load(f)["recordings"]
    machine = this_machine()
    return next((r for r in recordings if r["machine"] == machine), recordings[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("golden")
    run_main(super_and, FLAGS + ["--rounds", "2", "--epochs", "2", "--model_dir", out / "s1"])
    run_main(stage2, FLAGS + ["--epochs", "2", "--resume", out / "s1" / "ckpt_embed.t7", "--model_dir", out / "s2"])
    return out


def flat(rows):
    """A list of per-epoch lists as one list: pytest.approx compares flat sequences only."""
    return [x for row in rows for x in row]


def same_machine(golden):
    return golden["machine"] == this_machine()


def test_stage1_numbers_unchanged(runs, golden):
    want = golden["stage1"]
    log = read_log(runs / "s1" / "log_embed.jsonl")
    got = [[r["loss"], r["loss_and"], r["loss_aug"], r["loss_ue"]] for r in log]
    ckpt = load_checkpoint(runs / "s1" / "ckpt_embed.t7")
    if same_machine(golden):
        assert got == want["losses"]
        assert [r["knn_top1"] for r in log] == want["knn_top1"]
        assert digest(ckpt["net"]) == want["net_sha256"]
        assert digest({"m": ckpt["npc"]["memory"]}) == want["memory_sha256"]
        assert digest(dict(ckpt["ANs_discovery"])) == want["anchors_sha256"]
    else:
        assert flat(got) == pytest.approx(flat(want["losses"]), rel=1e-2, abs=1e-3)  # approx takes flat lists
        assert float(ckpt["npc"]["memory"].double().sum()) == pytest.approx(want["memory_sum"], rel=1e-2)


def test_stage2_numbers_unchanged(runs, golden):
    want = golden["stage2"]
    log = read_log(runs / "s2" / "log_ul.jsonl")
    got = [[r["loss"], r["loss_assign"], r["loss_cp"]] + r["head_losses"] for r in log]
    ckpt = load_checkpoint(runs / "s2" / "ckpt_ul_last.t7")
    if same_machine(golden):
        assert got == want["losses"]
        assert [r["head_acc"] for r in log] == want["head_acc"]
        assert digest(ckpt["net"]) == want["net_sha256"]
    else:
        assert flat(got) == pytest.approx(flat(want["losses"]), rel=1e-2, abs=1e-3)  # approx takes flat lists
        assert float(sum(v.double().sum() for v in ckpt["net"].values())) == pytest.approx(want["net_sum"], rel=1e-2)
