"""bench/throughput.py --quick runs end to end and writes every number it measures (speed is never asserted)."""
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark as a process
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ["backbone_step_s", "stage1_step_s", "stage2_step_s", "stage1_ratio", "stage2_ratio",
            "stage1_method_s", "stage2_method_s", "ans_discovery_s", "eval_s", "knn_s",
            "loader_images_per_s", "host_peak_gib", "ddp_stage1_step_s", "ddp_stage1_local_work_s",
            "ddp_stage2_step_s", "ddp_stage2_local_work_s", "ddp_ans_discovery_s",
            "ddp_ans_split_one_process_s", "ddp_ans_split_two_processes_s", "ddp_ans_speedup"]
CONFIG = ["torch", "threads", "device_name", "date", "command", "flags"]


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_benchmark_writes_every_number(tmp_path):
    out = tmp_path / "bench.json"
    smaller = ["--num_samples", "1000", "--width", "8", "--batch_size", "8", "--loader_batches", "3", "--workers", "0"]
    run = subprocess.run([sys.executable, "bench/throughput.py", "--quick", "--device", "cpu", "--ans_sizes", "2000",
                          *smaller, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {k: result.get(k) for k in POSITIVE if not positive(result.get(k))} == {}
    runs = result["ans_discovery"]
    assert [r["num_samples"] for r in runs] == [2_000]  # as asked (--quick alone: N and 2N)
    for r in runs:
        assert positive(r["seconds"]) and math.isfinite(r["peak_extra_gib"]) and r["peak_extra_gib"] >= 0
    assert math.isfinite(result["ans_peak_extra_gib"]) and result["ans_peak_extra_gib"] >= 0
    assert result["anchors_in_batch"] > 0  # round-1 anchors: AND's neighbourhood branch ran
    assert result["losses_finite"] is True
    assert 0 < result["ddp_ans_split_shared_anchors"] <= 1 and 0 < result["ddp_ans_split_same_neighbours"] <= 1
    # CUDA-only numbers are present, and empty on the CPU
    assert result["data_wait_share"] is None and result["device_peak_gib"] is None
    assert all(k in result["config"] for k in CONFIG) and result["config"]["threads"] >= 1
    assert set(result["targets"]) == {"stage1_ratio", "stage2_ratio", "ans_discovery_s", "ans_peak_extra_gib",
                                      "eval_s", "knn_s"}
    assert all(t["met"] is None for t in result["targets"].values())  # --quick: the targets do not apply
    assert "stage1_ratio" in run.stdout and "ans_discovery_s" in run.stdout  # the console table
    # two gloo processes: the synchronization cost is a difference of two timings (noise may make it negative)
    assert result["ddp"]["backend"] == "gloo" and math.isfinite(result["ddp_stage1_sync_s"])
    assert "ddp_stage1_sync_s" in run.stdout
