"""A short semi.py run gives the numbers recorded in tests/fixtures/golden_semi.json, with the convention of
tests/test_golden.py for the two stages: bit-equal where a recording of this kind of machine exists (same
PyTorch, CPU kernel family and CPU vendor), elsewhere or with GOLDEN_TOLERANT=1 compared to the first recording
number by number within test_golden.TOLERANCE, which still catches a wrong loss, flag or split.

Record on this kind of machine (adds or replaces its recording; only when a change of the numbers is intended
or for a new kind of machine, and say so in the commit):

    .venv/bin/python tests/test_golden_semi.py --record
"""
import json
import os
import sys

import pytest
import torch
from test_golden import digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden_semi.json")
FLAGS = ["--dataset", "digits", "--width", "4", "--low_dim", "16", "--workers", "0", "--subset", "64",
         "--batch_size", "10", "--labels_per_class", "3", "--from_scratch", "--epochs", "2"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def numbers(model_dir):
    """What a finished run is pinned by: per-epoch loss and test accuracy, the eval file's accuracy, digests
    and sums of the network and classifier, the labelled draw."""
    from lib.checkpoint import load_checkpoint
    with open(os.path.join(model_dir, "log_semi.jsonl")) as f:
        log = [json.loads(line) for line in f]
    with open(os.path.join(model_dir, "eval_semi.json")) as f:
        summary = json.load(f)
    ckpt = load_checkpoint(os.path.join(model_dir, "ckpt_semi.t7"))
    return {"loss": [r["loss"] for r in log], "test_acc": [r["test_acc"] for r in log],
            "eval_test_acc": summary["test_acc"], "labelled_indexes": ckpt["labelled_indexes"],
            "net_sha256": digest(ckpt["net"]), "classifier_sha256": digest(ckpt["classifier"]),
            "net_sum": float(sum(v.double().sum() for v in ckpt["net"].values())),
            "classifier_sum": float(sum(v.double().sum() for v in ckpt["classifier"].values()))}


def run(model_dir):
    import semi
    from conftest import run_main
    run_main(semi, FLAGS + ["--model_dir", model_dir])
    return numbers(model_dir)


def test_semi_numbers_unchanged(tmp_path):
    from test_golden import assert_close, recording_for_this_machine
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert golden["flags"] == FLAGS  # new flags: record again
    recording, exact = recording_for_this_machine(golden["recordings"])
    got = run(tmp_path)
    want = recording["semi"]
    assert got["labelled_indexes"] == want["labelled_indexes"]  # drawn by numpy from the seed: everywhere
    if exact:
        assert got == want
    else:
        for key in ("loss", "net_sum", "classifier_sum"):
            assert_close(got[key], want[key], key)


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    torch.set_num_threads(1)  # as the tests run
    from test_golden import this_machine
    with tempfile.TemporaryDirectory() as out:
        recording = {"machine": this_machine(), "semi": run(out)}
    recordings = []
    if os.path.exists(GOLDEN):
        with open(GOLDEN) as f:
            old = json.load(f)
        if old.get("flags") == FLAGS:  # other machines' recordings of the same run stay
            recordings = [r for r in old.get("recordings", []) if r["machine"] != recording["machine"]]
    with open(GOLDEN, "w") as f:
        json.dump({"flags": FLAGS, "recordings": recordings + [recording]}, f, indent=1)
        f.write("\n")
    print(f"wrote {GOLDEN}")
