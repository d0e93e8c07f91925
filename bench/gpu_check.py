"""Everything this project checks and measures on a CUDA machine, in one run, into one folder (make gpu-check).

    python bench/gpu_check.py --out runs/gpu-check                  # one modern GPU: under 10 minutes
    python bench/gpu_check.py --device cpu --quick --out /tmp/gc      # the same steps, tiny, on a CPU

In order, each step a subprocess with its own time limit and log file (a failed step is recorded and the
next one runs):

1. ``pytest -m cuda``: the tests that need a device (tests/test_cuda.py): each stage's step against the
   CPU's, the speed options, the device augmentation, the three scripts, two GPUs against one process.
2. ``bench/throughput.py`` in float32 (every part), with ``--amp`` and with ``--amp --gpu_augment`` (steps
   and data pipeline): JSON and console table each, the data-wait share among them.
3. With two GPUs or more: the scripts under ``torchrun --nproc_per_node 2`` on a small data set.
4. Fashion-MNIST (60,000 training images, full network, ``--amp --channels_last --gpu_augment``): stage 1
   for 2 rounds x 2 epochs, stage 2 for 3 epochs, then the evaluation beside k-means on raw pixels.
5. ``summary.json`` and ``summary.md``: every step's status and time, the throughput table of the three
   configurations, kNN and ACC/NMI/ARI per epoch, k-means.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THROUGHPUT_KEYS = ("backbone_step_s", "stage1_step_s", "stage2_step_s", "stage1_ratio_from_parts",
                   "stage2_ratio_from_parts", "stage1_images_per_s", "loader_images_per_s", "data_wait_share",
                   "ans_discovery_s", "knn_s", "eval_s", "device_peak_gib", "ddp_stage1_sync_share")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="the folder everything is written to")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try the steps on a machine without a GPU")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a smoke test of this script)")
    p.add_argument("--data_dir", default="./data", help="where Fashion-MNIST is (or is downloaded to)")
    p.add_argument("--workers", default=8, type=int, help="data-loading processes of the scripts")
    return p


def run_step(name, argv, out, limit, env=None):
    """Run ``argv`` from the repository root with a time limit; its output goes to <out>/<name>.log."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(argv)}", flush=True)
    start = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        try:
            code = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit,
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.time() - start
    print(f"    {'ok' if code == 0 else f'FAILED ({code})'} in {seconds:.0f} s", flush=True)
    return {"command": " ".join(argv), "returncode": code, "seconds": round(seconds, 1), "log": f"{name}.log"}


def device_info(device):
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if info["gpus"]:
        info["names"] = [torch.cuda.get_device_name(i) for i in range(info["gpus"])]
    return info


def steps(args, gpus):
    """(name, argv, time limit in s, environment) of every step, sized for one modern GPU (or --quick)."""
    py, out, quick = sys.executable, args.out, args.quick
    tiny = ["--width", "8", "--low_dim", "32"] if quick else []
    plan = [("pytest_cuda", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                             "--junitxml", os.path.join(out, "pytest_cuda.xml")], 300, None)]
    bench = [py, "bench/throughput.py", "--device", args.device] + (["--quick"] if quick else [])
    for name, flags in (("fp32", []), ("amp", ["--amp", "--parts", "steps,loader"]),
                        ("amp_gpu_augment", ["--amp", "--gpu_augment", "--parts", "steps,loader"])):
        if name == "fp32" and args.device != "cuda":
            flags = ["--parts", "steps,loader,ddp"]  # the CPU's ANs and protocols are in README already
        plan.append((f"throughput_{name}", bench + flags + ["--json", os.path.join(out, f"throughput_{name}.json")],
                     240, None))
    if gpus >= 2 or args.device == "cpu":  # a CPU tries the same launch with gloo
        small = ["--dataset", "digits", "--subset", "256", "--batch_size", "32", "--workers", "0",
                 "--device", args.device, *tiny]
        run = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        ddp = os.path.join(out, "torchrun")
        plan += [("torchrun_stage1", run + ["super_and.py", *small, "--rounds", "2", "--epochs", "1",
                                            "--model_dir", f"{ddp}/stage1"], 180, None),
                 ("torchrun_stage2", run + ["main.py", *small, "--epochs", "1", "--resume",
                                            f"{ddp}/stage1/ckpt_embed.t7", "--model_dir", f"{ddp}/stage2"], 180, None)]
    fashion = ["--dataset", "fashion-mnist", "--data_dir", args.data_dir, "--workers", str(args.workers),
               "--device", args.device, *tiny]
    if args.device == "cuda":
        fashion += ["--amp", "--channels_last", "--gpu_augment"]
    if quick:
        fashion += ["--subset", "600", "--batch_size", "32"]
    rounds, epochs1, epochs2 = ("2", "1", "1") if quick else ("2", "2", "3")
    f = os.path.join(out, "fashion")
    plan += [("fashion_stage1", [py, "super_and.py", *fashion, "--rounds", rounds, "--epochs", epochs1,
                                 "--model_dir", f"{f}/stage1"], 300, None),
             ("fashion_stage2", [py, "main.py", *fashion, "--epochs", epochs2, "--resume",
                                 f"{f}/stage1/ckpt_embed.t7", "--model_dir", f"{f}/stage2"], 240, None),
             ("fashion_eval", [py, "main.py", *fashion, "--test_only", "--kmeans_baseline", "--resume",
                               f"{f}/stage2/ckpt_ul.t7", "--model_dir", f"{f}/stage2"], 240, None)]
    return plan


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def read_log(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def summarize(out, info, results):
    """summary.json (everything) and summary.md (the tables a person reads)."""
    throughput = {}
    for path in sorted(glob.glob(os.path.join(out, "throughput_*.json"))):
        data = read_json(path) or {}
        name = os.path.basename(path)[len("throughput_"):-len(".json")]
        throughput[name] = {k: data.get(k) for k in THROUGHPUT_KEYS}
    stage1 = read_log(os.path.join(out, "fashion", "stage1", "log_embed.jsonl"))
    stage2 = read_log(os.path.join(out, "fashion", "stage2", "log_ul.jsonl"))
    evaluation = read_json(os.path.join(out, "fashion", "stage2", "eval.json")) or {}
    def pct(values):
        return [None if v is None else round(v, 2) for v in values]

    summary = {"device": info, "steps": results, "throughput": throughput,
               "fashion": {"knn_top1_per_epoch": pct(r.get("knn_top1") for r in stage1),
                           "stage1_seconds_per_epoch": [round(r["seconds"], 1) for r in stage1],
                           "acc_per_epoch": pct(r.get("acc") for r in stage2),
                           "stage2_seconds_per_epoch": [round(r["seconds"], 1) for r in stage2],
                           "final": {k: evaluation.get(k) for k in ("acc", "nmi", "ari", "selected_head", "images")},
                           "kmeans_raw_pixels": evaluation.get("kmeans")}}
    for part in ("final", "kmeans_raw_pixels"):
        values = summary["fashion"][part] or {}
        summary["fashion"][part] = {k: round(v, 2) if isinstance(v, float) else v for k, v in values.items()}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# GPU check: {info.get('names', [info['device']])}, torch {info['torch']}", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {'ok' if r['returncode'] == 0 else r['returncode']} | {r['seconds']} |"
              for name, r in results.items()]
    names = sorted(throughput, key=lambda n: (n != "fp32", n))  # fp32, amp, amp_gpu_augment
    lines += ["", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in THROUGHPUT_KEYS:
        cells = [throughput[n].get(key) for n in names]
        lines.append(f"| {key} | " + " | ".join("" if c is None else f"{c:.4g}" for c in cells) + " |")
    fm = summary["fashion"]
    lines += ["", "Fashion-MNIST:", f"- stage 1 kNN top-1 per epoch: {fm['knn_top1_per_epoch']} "
              f"(seconds per epoch {fm['stage1_seconds_per_epoch']})",
              f"- stage 2 selected-head ACC per epoch: {fm['acc_per_epoch']} "
              f"(seconds per epoch {fm['stage2_seconds_per_epoch']})",
              f"- final: {fm['final']}", f"- k-means on raw pixels: {fm['kmeans_raw_pixels']}"]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(args):
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    info = device_info(args.device)
    if args.device == "cuda" and not info["gpus"]:
        raise SystemExit("error: PyTorch sees no CUDA device here; pass --device cpu to try the steps on the CPU")
    with open(os.path.join(args.out, "device.json"), "w") as f:
        json.dump(info, f, indent=1)
    if info["gpus"]:
        with open(os.path.join(args.out, "nvidia-smi.txt"), "w") as f:
            try:
                subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT, check=False, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as err:
                f.write(f"nvidia-smi: {err}\n")
    start, results = time.time(), {}
    for name, argv, limit, env in steps(args, info["gpus"]):
        results[name] = run_step(name, argv, args.out, limit, env)
    results["total"] = {"returncode": 0, "seconds": round(time.time() - start, 1)}
    summarize(args.out, info, results)
    failed = [n for n, r in results.items() if r["returncode"] != 0]
    print(f"\nwrote {args.out}/summary.md and summary.json" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
