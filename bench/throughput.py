"""Throughput of both training stages against the bare backbone, and of everything around them.

    python bench/throughput.py --json bench/results-cpu.json      # CIFAR-10 sizes on this device
    python bench/throughput.py --quick --json /tmp/quick.json      # smoke test: < 1 min on 2 CPU cores
    python bench/throughput.py --device cuda --amp --channels_last --json bench/results-cuda.json
    python bench/throughput.py --steps 3 --warmup 1 --parts steps  # only the step times

One run measures, on one device: the bare network's SGD step and a full training step of each
stage on the same 2 x 128 images (the ratio is what the method costs on top of the network);
anchor-neighbourhood discovery at growing N, each N in a fresh process so its peak memory is its
own; both evaluation protocols; the data pipeline; and two processes (gloo on the CPU, NCCL on two GPUs):
what a step costs beyond the same per-process work without communication, and the anchors' broadcast.
It prints a table and, with --json, writes every number with the configuration. Targets are reported,
never asserted.
"""
import argparse
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root

import datasets
import main as stage2
import super_and as stage1
from engine.cli import ArgumentParser
from engine.distributed import speed_options
from engine.system import choose_device, keep_freed_memory
from lib.collectives import ONE_PROCESS
from lib.memory_bank import MemoryBank
from lib.neighbourhoods import AnchorNeighbourhoods
from lib.optim import sgd_optimizer
from lib.protocols import clustering_metrics, weighted_knn_predict
from lib.schedules import num_anchors, ue_weight
from models import NETWORKS, MultiHeadNormFC

PARTS = ("steps", "ans", "protocols", "loader", "ddp")
# bounds for the CPU at CIFAR-10's sizes: the method's own work (bank, anchors, losses) stays a few per cent
# of the network's step, and the once-a-round and once-an-epoch parts stay seconds: (metric, comparison, bound)
TARGETS = [("stage1_ratio", "<=", 1.05), ("stage2_ratio", "<=", 1.03), ("ans_discovery_s", "<=", 10.0),
           ("ans_peak_extra_gib", "<", 1.0), ("eval_s", "<=", 0.3), ("knn_s", "<=", 5.0)]
ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "CUDA_", "PYTORCH_", "TORCH")
EVAL_CLASSES, KNN_CLASSES = 100, 10  # CIFAR-100's clusters for the Hungarian match; CIFAR-10's kNN labels


def get_args_parser():
    p = ArgumentParser(description="Throughput of Super-AND's two stages, ANs discovery, protocols and data")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", default="", metavar="FILE", help="also write every number and the configuration here")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (batch 16, width 16, N = 5,000) for a smoke test; targets do not apply")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--steps", default=None, type=int,
                   help="timed steps per measurement (5 on CPU, 30 on CUDA; quick 2)")
    p.add_argument("--warmup", default=None, type=int, help="untimed steps first (2 on CPU, 5 on CUDA; quick 1)")
    p.add_argument("--batch_size", default=None, type=int, help="images per step, 2x views (128; quick 16)")
    p.add_argument("--width", default=None, type=int, help="channels of the first ResNet stage (64; quick 16)")
    p.add_argument("--num_samples", default=None, type=int,
                   help="N of the memory bank, the eval predictions and the kNN bank (50,000; quick 5,000)")
    p.add_argument("--ans_sizes", default=None, type=int, nargs="+",
                   help="N of each ANs discovery (N, 2N, 4N; quick N, 2N)")
    p.add_argument("--loader_batches", default=None, type=int, help="batches timed from the loader (200; quick 10)")
    p.add_argument("--workers", default=stage1.get_args_parser().get_default("workers"), type=int,
                   help="data-loading processes (the scripts' default)")
    p.add_argument("--threads", default=None, type=int,
                   help="torch CPU threads (torch's default; quick: 1, spared a busy machine's OpenMP contention)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table of one stage-1 step")
    p.add_argument("--seed", default=0, type=int, help="random seed of the synthetic inputs")
    speed = p.add_argument_group("speed options, as in the scripts")
    speed.add_argument("--amp", action="store_true", help="bfloat16 autocast for the network")
    speed.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    speed.add_argument("--compile", action="store_true", help="torch.compile the network")
    speed.add_argument("--gpu_augment", action="store_true", help="the loader augments whole batches on the device")
    return p


def main(args):
    device = choose_device(args.device)
    sizes = resolve_sizes(args, device)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        unknown = ",".join(sorted(parts - set(PARTS)))
        raise SystemExit(f"error: unknown --parts {unknown}; choose from {','.join(PARTS)}")
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)
    result = {"config": configuration(args, device, sizes)}
    stage = None
    if "steps" in parts or ("loader" in parts and device.type == "cuda"):
        progress("building both stages (round-1 anchors at N = {:,})".format(sizes["num_samples"]))
        stage = build_stages(args, device, sizes)
    if "steps" in parts:
        progress("training steps")
        result.update(bench_steps(stage, device, sizes))
        if args.profile:
            profile_stage1(stage, device)
    if "ans" in parts:
        result.update(bench_ans(stage1_args(args, sizes), device, sizes["ans_sizes"]))
    if "protocols" in parts:
        progress("evaluation protocols")
        result.update(bench_protocols(device, sizes))
    if "loader" in parts:
        progress("data pipeline")
        result.update(bench_loader(args, stage, device, sizes))
    if "ddp" in parts:
        result.update(bench_ddp(args, device, sizes))
    result["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    result["device_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result["config"]["loadavg_end"] = os.getloadavg()
    result["targets"] = check_targets(result, applies=device.type == "cpu" and sizes_are_full(sizes))
    print_table(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


def progress(what):
    print(f"[{time.strftime('%H:%M:%S')}] {what} ...", file=sys.stderr, flush=True)


def resolve_sizes(args, device):
    """The sizes of this run: the flags where given, else CIFAR-10's (or --quick's) and the device's repeats."""
    quick, cuda = args.quick, device.type == "cuda"

    def pick(value, full, small):
        return value if value is not None else (small if quick else full)

    n = pick(args.num_samples, 50_000, 5_000)
    return {
        "batch_size": pick(args.batch_size, 128, 16),
        "width": pick(args.width, 64, 16),
        "num_samples": n,
        "ans_sizes": args.ans_sizes or ([n, 2 * n] if quick else [n, 2 * n, 4 * n]),
        "knn_queries": n // 5,  # CIFAR-10: 10,000 test images against 50,000 training images
        "steps": pick(args.steps, 30 if cuda else 5, 2),
        "warmup": pick(args.warmup, 5 if cuda else 2, 1),
        "loader_batches": pick(args.loader_batches, 200, 10),
        "wait_steps": 5 if quick else 50,
    }


def sizes_are_full(sizes):
    """The bounds hold for CIFAR-10's sizes: 2 x 128 images, width 64, N = 50,000 .. 200,000."""
    return (sizes["batch_size"], sizes["width"], sizes["num_samples"], sizes["ans_sizes"][0],
            sizes["ans_sizes"][-1]) == (128, 64, 50_000, 50_000, 200_000)


def configuration(args, device, sizes):
    return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "flags": vars(args),
            "sizes": sizes, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "device_name": device_name(device), "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg(), "cpus": os.cpu_count(), "git": git_state(),
            # choose_device already did this on the CPU, as the scripts do; True where glibc took it
            "keeps_freed_memory": device.type == "cpu" and keep_freed_memory(),
            # what changes the numbers without changing the code: threads, allocator, preloads
            "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}}


def git_state():
    """The commit and the files changed on top of it: the numbers belong to this code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*argv):
        return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=30).stdout

    try:
        diff = git("diff", "HEAD")
        return {"commit": git("rev-parse", "HEAD").strip(),
                "modified": git("diff", "HEAD", "--name-only").split(),
                "diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None}
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# training steps


def stage1_args(args, sizes, dataset="cifar10"):
    """super_and.py's own namespace (its defaults) with this run's sizes and speed flags."""
    return stage1.get_args_parser().parse_args(script_argv(args, sizes, dataset))


def stage2_args(args, sizes):
    return stage2.get_args_parser().parse_args(script_argv(args, sizes, "cifar10"))


def script_argv(args, sizes, dataset):
    flags = [f"--{name}" for name in ("amp", "channels_last", "compile", "gpu_augment") if getattr(args, name)]
    return ["--dataset", dataset, "--width", str(sizes["width"]), "--batch_size", str(sizes["batch_size"]),
            "--workers", str(args.workers), "--device", args.device] + flags


class FixedFeatures(nn.Module):
    """A stand-in network whose output is one learnable (2B, d) unit-row tensor: a step through it
    costs the method's part of the step (memory bank, losses, updates) without the backbone."""

    def __init__(self, rows, dim):
        super().__init__()
        self.features = nn.Parameter(torch.randn(rows, dim))

    def forward(self, images):
        return F.normalize(self.features, dim=1)


def build_stages(args, device, sizes):
    """The network, optimizer, memory bank, round-1 anchors and heads, built as the scripts build them."""
    a1, a2 = stage1_args(args, sizes), stage2_args(args, sizes)
    n, batch = sizes["num_samples"], sizes["batch_size"]
    net = NETWORKS[a1.network](low_dim=a1.low_dim, width=a1.width).to(device)
    net, model = speed_options(net, a1.channels_last, a1.compile)
    optimizer = sgd_optimizer(net, a1.lr, a1.momentum, a1.weight_decay)
    npc = MemoryBank(n, a1.low_dim, a1.npc_t, a1.npc_m).to(device)
    ans = AnchorNeighbourhoods(n, a1.ANs_size).to(device)
    # round 1 of §3: a quarter of the samples are anchors, so AND's neighbourhood branch runs
    start = time.perf_counter()
    ans.discover(npc.memory, a1.npc_t, num_anchors(n, a1.ANs_select_rate, 1))
    synchronize(device)
    discovery_s = time.perf_counter() - start  # a cross-check of bench_ans's fresh-process number
    heads = MultiHeadNormFC(a2.low_dim, datasets.DATASETS[a2.dataset].num_classes, a2.num_heads, a2.tau_c,
                            a2.head_norm).to(device)
    fixed = FixedFeatures(2 * batch, a1.low_dim).to(device)
    fixed_optimizer = torch.optim.SGD(fixed.parameters(), lr=a1.lr, momentum=a1.momentum, nesterov=True)
    images = torch.randn(2 * batch, 3, 32, 32, device=device)  # (2B, 3, 32, 32), view 1 rows first
    if a1.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    indexes = torch.randperm(n, device=device)[:batch]
    return {"a1": a1, "a2": a2, "net": net, "model": model, "optimizer": optimizer, "npc": npc, "ans": ans,
            "heads": heads, "fixed": fixed, "fixed_optimizer": fixed_optimizer, "images": images,
            "indexes": indexes, "weight": ue_weight(80),  # 0.2: epochs 80+ of a round, all three losses on
            "discovery_s": discovery_s}


def bench_steps(s, device, sizes):
    """Median seconds of the backbone step, each stage's step, and each stage's step through
    ``FixedFeatures`` (the method alone), taken in turn so a change of the machine's load hits all alike."""
    a1, a2, model, images, indexes = s["a1"], s["a2"], s["model"], s["images"], s["indexes"]
    target = F.normalize(torch.randn(len(images), a1.low_dim, device=device), dim=1)
    totals = {"stage1": torch.zeros(4, device=device), "stage2": torch.zeros(3 + a2.num_heads, device=device)}

    def backbone():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a1.amp):
            features = model(images)
        loss = -(features.float() * target).sum() / len(images)  # any scalar: the network's work is the same
        s["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        s["optimizer"].step()

    def step1(net=model, optimizer=s["optimizer"]):
        # as engine.lifecycle.run_epoch: the step plus the on-device running sum that the epoch logs
        state = step_state(net, s["npc"], s["ans"], None, optimizer)
        losses = stage1.train_step(state, images, indexes, s["weight"], a1)
        totals["stage1"] += losses["loss"]

    def step2(net=model, optimizer=s["optimizer"]):
        totals["stage2"] += stage2.train_step(step_state(net, None, None, s["heads"], optimizer), images, a2)["loss"]

    fns = {"backbone": backbone, "stage1": step1, "stage2": step2,
           "stage1_method": lambda: step1(s["fixed"], s["fixed_optimizer"]),
           "stage2_method": lambda: step2(s["fixed"], s["fixed_optimizer"])}
    times = round_robin(fns, sizes["steps"], sizes["warmup"], device)
    med = {name: statistics.median(t) for name, t in times.items()}
    finite = all(math.isfinite(v) for t in totals.values() for v in t.tolist())
    return {"backbone_step_s": med["backbone"], "stage1_step_s": med["stage1"], "stage2_step_s": med["stage2"],
            "stage1_ratio": med["stage1"] / med["backbone"], "stage2_ratio": med["stage2"] / med["backbone"],
            "stage1_method_s": med["stage1_method"], "stage2_method_s": med["stage2_method"],
            # the same ratios from the backbone and the method's part alone: far less noisy on a busy
            # machine than two full steps, where a load swing of a few seconds hides the method
            "stage1_ratio_from_parts": 1 + med["stage1_method"] / med["backbone"],
            "stage2_ratio_from_parts": 1 + med["stage2_method"] / med["backbone"],
            "stage1_images_per_s": sizes["batch_size"] / med["stage1"],
            "anchors_in_batch": int(s["ans"].lookup(indexes)[1].sum()), "losses_finite": finite,
            "ans_discovery_in_process_s": s["discovery_s"],
            "step_times_s": times}


def round_robin(fns, steps, warmup, device):
    """Seconds of each call of each function: ``warmup`` untimed rounds, then ``steps`` timed rounds,
    each round starting one function later so that none always runs first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    names = list(fns)
    times = {name: [] for name in names}
    for step in range(steps):
        for name in names[step % len(names):] + names[:step % len(names)]:
            times[name].append(timed(fns[name], device))
    return times


def timed(fn, device):
    start = time.perf_counter()
    fn()
    synchronize(device)  # CUDA runs ahead of the host: count the work, not its launch
    return time.perf_counter() - start


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_state(model, bank, neighbourhoods, heads, optimizer):
    """What the scripts' ``train_step(state, ...)`` reads of their state record."""
    return SimpleNamespace(model=model, bank=bank, neighbourhoods=neighbourhoods, heads=heads, optimizer=optimizer)


def profile_stage1(s, device):
    """torch.profiler's table of one stage-1 step, by self time: which operators the step spends on."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        state = step_state(s["model"], s["npc"], s["ans"], None, s["optimizer"])
        stage1.train_step(state, s["images"], s["indexes"], s["weight"], s["a1"])
        synchronize(device)
    events = prof.key_averages()
    key = "self_cpu_time_total"
    if device.type == "cuda":  # torch < 2.4 names the device's time after CUDA
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    print(events.table(sort_by=key, row_limit=20))


# ---------------------------------------------------------------------------------------------
# anchor-neighbourhood discovery


def bench_ans(a1, device, ans_sizes):
    """Round-1 discovery at each N, each in a fresh process: its peak memory above the bank is its own."""
    runs = []
    for n in ans_sizes:
        progress(f"ANs discovery at N = {n:,}")
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs.append(pool.submit(ans_discovery, n, a1.low_dim, a1.npc_t, a1.ANs_select_rate, a1.ANs_size,
                                    str(device), torch.get_num_threads()).result())
    return {"ans_discovery_s": runs[0]["seconds"], "ans_peak_extra_gib": runs[-1]["peak_extra_gib"],
            "ans_discovery": runs}


def ans_discovery(n, dim, temperature, select_rate, ans_size, device_name, threads):
    """In a child process: the seconds and the peak memory (GiB) that one ``AnchorNeighbourhoods.discover``
    adds on top of its (N, d) bank. Host memory is the kernel's high-water mark of this process,
    reset just before the call; device memory is the allocator's peak."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    torch.manual_seed(n)
    memory = MemoryBank(n, dim, temperature).memory.to(device)  # only N and d decide the work
    memory /= memory.norm(dim=1, keepdim=True)  # unit rows, as the bank's updates leave them
    labels = torch.randint(10, (n,), device=device)
    ans = AnchorNeighbourhoods(n, ans_size).to(device)
    count = num_anchors(n, select_rate, 1)
    synchronize(device)
    host_before = reset_host_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        device_before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    ans.discover(memory, temperature, count, labels)
    synchronize(device)
    seconds = time.perf_counter() - start
    host_extra = None if host_before is None else (proc_status_kib("VmHWM") - host_before) / 2**20
    out = {"num_samples": n, "anchors": count, "seconds": seconds, "host_peak_extra_gib": host_extra}
    if device.type == "cuda":
        out["device_peak_extra_gib"] = (torch.cuda.max_memory_allocated(device) - device_before) / 2**30
    out["peak_extra_gib"] = out.get("device_peak_extra_gib", host_extra)  # where the blocks live
    return out


def reset_host_peak():
    """VmHWM := VmRSS (Linux >= 4.0), so the next high-water mark is the coming call's alone.
    Returns the resident KiB now, or None where /proc cannot do this."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return proc_status_kib("VmRSS")
    except (OSError, KeyError):
        return None


def proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


# ---------------------------------------------------------------------------------------------
# evaluation protocols


def bench_protocols(device, sizes):
    """Hungarian ACC + NMI + ARI of N predictions over 100 clusters, and the weighted kNN (k = 200)
    of N/5 unit queries against an N x d unit bank, as the scripts' evaluations call them."""
    n, q = sizes["num_samples"], sizes["knn_queries"]
    rng = np.random.default_rng(0)
    preds, targets = rng.integers(0, EVAL_CLASSES, n), rng.integers(0, EVAL_CLASSES, n)
    eval_times = [timed(lambda: clustering_metrics(preds, targets, EVAL_CLASSES), device) for _ in range(6)]
    bank = F.normalize(torch.randn(n, 128, device=device), dim=1)
    queries = F.normalize(torch.randn(q, 128, device=device), dim=1)
    labels = torch.randint(KNN_CLASSES, (n,), device=device)
    knn_times = [timed(lambda: weighted_knn_predict(queries, bank, labels, KNN_CLASSES), device)
                 for _ in range(3)]
    # the first call of each warms caches and thread pools
    return {"eval_s": statistics.median(eval_times[1:]), "knn_s": statistics.median(knn_times[1:]),
            "eval_predictions": n, "knn_queries": q}


# ---------------------------------------------------------------------------------------------
# data pipeline


def bench_loader(args, s, device, sizes):
    """Two-view training images per second from ``datasets.make_train_loader`` on the bundled digits
    (repeated to N images, so an epoch is as long as CIFAR-10's and workers start once); on CUDA also
    the share of real stage-1 steps spent waiting for their batch."""
    n = sizes["num_samples"]
    la = stage1_args(args, sizes, dataset="digits")  # digits: offline, and its mean/std for --gpu_augment
    digits = datasets.build_dataset("digits", la.data_dir, "train", views=2)
    repeats = -(-n // len(digits))
    dataset = datasets.ImageDataset(np.concatenate([digits.data] * repeats)[:n], digits.targets.repeat(repeats)[:n],
                                    digits.transform, views=2, num_classes=10, mean=digits.mean, std=digits.std)
    try:
        loader = datasets.make_train_loader(dataset, la, device)
    except ImportError as err:  # --gpu_augment without its module
        print(f"loader skipped: {err}", file=sys.stderr)
        return {"loader_images_per_s": None, "loader_first_batch_s": None, "data_wait_share": None,
                "loader_skipped": str(err)}
    batches = endless(loader)
    start = time.perf_counter()
    next(batches)
    synchronize(device)
    first = time.perf_counter() - start  # worker start-up (or the upload of the images to the device)
    start, images = time.perf_counter(), 0
    for _ in range(sizes["loader_batches"]):
        images += len(next(batches)["view1"])
    synchronize(device)
    out = {"loader_images_per_s": images / (time.perf_counter() - start), "loader_first_batch_s": first,
           "loader_workers": 0 if args.gpu_augment else args.workers, "data_wait_share": None}
    if device.type == "cuda":
        out["data_wait_share"] = data_wait_share(batches, s, device, sizes["wait_steps"])
    return out


def endless(loader):
    """Batches across epochs, as training draws them (a new epoch starts new workers, as in the scripts)."""
    while True:
        yield from loader


def data_wait_share(batches, s, device, steps):
    """Of the wall time of real stage-1 steps, the share between asking for a batch and having it on the
    device. Synchronizing each step makes that time one the device is idle (the scripts' own loop
    synchronizes every 10 steps, so it may hide a little more of the loading than this)."""
    a1 = s["a1"]
    waiting = total = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        images = torch.cat([batch["view1"], batch["view2"]]).to(device, non_blocking=True)
        if a1.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        indexes = batch["index"].to(device, non_blocking=True)
        synchronize(device)
        ready = time.perf_counter()
        state = step_state(s["model"], s["npc"], s["ans"], None, s["optimizer"])
        stage1.train_step(state, images, indexes, s["weight"], a1)
        synchronize(device)
        waiting += ready - start
        total += time.perf_counter() - start
    return waiting / total


# ---------------------------------------------------------------------------------------------
# two processes


def bench_ddp(args, device, sizes):
    """Two processes (gloo on the CPU, each with half the threads; NCCL on cuda:0 and cuda:1) running each
    stage's step on their halves of the global batch, against the same two processes doing the same work
    without any communication (no DDP, the gather replaced by a local copy of the same shape): the
    difference is what synchronization costs. Also the anchors found on rank 0 and broadcast."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        print("ddp skipped: two processes need two GPUs", file=sys.stderr)
        return {"ddp": None}
    if sizes["batch_size"] % 2:
        raise SystemExit("error: --batch_size must be even for the two-process measurement")
    progress("two processes: synchronization cost of a step, anchors' broadcast")
    context = multiprocessing.get_context("spawn")
    queue, port = context.Queue(), free_port()
    threads = max(1, torch.get_num_threads() // 2) if device.type == "cpu" else 1
    procs = [context.Process(target=ddp_worker, args=(rank, port, vars(args), sizes, device.type, threads, queue))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    out = queue.get(timeout=3600)
    for proc in procs:
        proc.join()
    a1 = stage1_args(args, sizes)
    out.update(bench_split_discovery(sizes["num_samples"], a1.low_dim, a1.npc_t, a1.ANs_select_rate, a1.ANs_size))
    return {"ddp": out, **{f"ddp_{k}": v for k, v in out.items() if not isinstance(v, (dict, list))}}


def bench_split_discovery(n, dim, temperature, select_rate, ans_size):
    """The round-1 discovery at N (``AnchorNeighbourhoods.discover``) in one process and split over two gloo
    processes, one thread each (two fresh processes: rank 0 alone first, the other waiting, then both): the
    seconds, the speed-up and how far the two agree with the one-process anchors and neighbours."""
    progress(f"ANs discovery at N = {n:,} in one and in two gloo processes")
    context = multiprocessing.get_context("spawn")
    queue, port = context.Queue(), free_port()
    procs = [context.Process(target=split_discovery_worker,
                             args=(rank, port, n, dim, temperature, select_rate, ans_size, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    one, two = queue.get(timeout=3600)
    for proc in procs:
        proc.join()
    return {"ans_split_one_process_s": one["seconds"], "ans_split_two_processes_s": two["seconds"],
            "ans_speedup": one["seconds"] / two["seconds"],
            **agreement(one, two)}


def agreement(one, two):
    """The share of one run's anchors that the other found too (the entropies differ by float rounding, so an
    anchor at the boundary may change places with a non-anchor) and, over those, the share of equal
    neighbourhoods."""
    first = dict(zip(one["anchors"], one["neighbours"]))
    second = dict(zip(two["anchors"], two["neighbours"]))
    shared = first.keys() & second.keys()
    return {"ans_split_shared_anchors": len(shared) / max(len(first), 1),
            "ans_split_same_neighbours": sum(first[a] == second[a] for a in shared) / max(len(shared), 1)}


def split_discovery_worker(rank, port, n, dim, temperature, select_rate, ans_size, queue):
    """One of two processes (gloo, one thread), each with the same unit-row bank of N rows: its round-1
    discovery on rank 0 alone, then split over both; rank 0 reports the two."""
    from engine import distributed
    os.environ.update(distributed.launch_environment(rank, 2, port))
    torch.set_num_threads(1)
    distributed.init("cpu")
    torch.manual_seed(n)
    memory = MemoryBank(n, dim, temperature).memory
    memory /= memory.norm(dim=1, keepdim=True)  # unit rows, as the bank's updates leave them
    count = num_anchors(n, select_rate, 1)
    runs = []
    for collectives in (ONE_PROCESS, distributed.ProcessGroup()):  # rank 0 alone, then the two split it
        ans = AnchorNeighbourhoods(n, ans_size)
        distributed.barrier()
        start = time.perf_counter()
        if collectives is not ONE_PROCESS or distributed.is_main():
            ans.discover(memory, temperature, count, collectives=collectives)
        runs.append({"seconds": time.perf_counter() - start, "anchors": ans.anchor_indexes.tolist(),
                     "neighbours": ans.neighbours.tolist()})
    if distributed.is_main():
        queue.put(runs)
    distributed.cleanup()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, port, flags, sizes, device_type, threads, queue):
    """One of the two processes: the environment torchrun would give, then the measurements (rank 0 reports)."""
    from engine import distributed
    os.environ.update(distributed.launch_environment(rank, 2, port))
    torch.set_num_threads(threads)
    device = distributed.init(device_type)
    args = argparse.Namespace(**flags)
    args.device = device_type
    a1, a2 = stage1_args(args, sizes), stage2_args(args, sizes)
    n, local = sizes["num_samples"], sizes["batch_size"] // 2
    torch.manual_seed(0)
    net = NETWORKS[a1.network](low_dim=a1.low_dim, width=a1.width).to(device)
    net, model = speed_options(net, a1.channels_last, a1.compile)  # DistributedDataParallel
    optimizer = sgd_optimizer(net, a1.lr, a1.momentum, a1.weight_decay)
    npc = MemoryBank(n, a1.low_dim, a1.npc_t, a1.npc_m).to(device)
    ans = AnchorNeighbourhoods(n, a1.ANs_size).to(device)
    count = num_anchors(n, a1.ANs_select_rate, 1)
    distributed.barrier()
    start = time.perf_counter()
    ans.discover(npc.memory, a1.npc_t, count, collectives=distributed.ProcessGroup())  # split over the two processes
    synchronize(device)
    discovery = time.perf_counter() - start
    heads = MultiHeadNormFC(a2.low_dim, datasets.DATASETS[a2.dataset].num_classes, a2.num_heads, a2.tau_c,
                            a2.head_norm).to(device)
    images = torch.randn(2 * local, 3, 32, 32, device=device)  # this process's (2b, 3, 32, 32)
    if a1.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    indexes = torch.randperm(n, device=device)[rank * local:(rank + 1) * local]
    def stage1_step(m):
        return stage1.train_step(step_state(m, npc, ans, heads, optimizer), images, indexes, ue_weight(80), a1)

    def stage2_step(m):
        return stage2.train_step(step_state(m, npc, ans, heads, optimizer), images, a2)

    real = {"stage1": lambda: stage1_step(model), "stage2": lambda: stage2_step(model)}
    alone = {name + "_local": without_communication(fn, net, distributed) for name, fn in
             (("stage1", stage1_step), ("stage2", stage2_step))}
    # the communication alone, far less noisy than a difference of two whole steps on a busy machine: one
    # all-reduce of as many float32 as the network has trainable parameters (DDP's gradient average, in
    # one piece rather than its buckets), and the features' gather forward and backward
    grads = torch.ones(sum(p.numel() for p in net.parameters() if p.requires_grad), device=device)
    features = torch.randn(2 * local, a1.low_dim, device=device, requires_grad=True)
    comm = {"gradient_allreduce": lambda: torch.distributed.all_reduce(grads),
            "gather_views": lambda: distributed.gather_views(features).sum().backward()}
    times = {name: [] for name in [*real, *alone, *comm]}
    fns = {**real, **alone, **comm}
    for step in range(sizes["warmup"] + sizes["steps"]):
        for name, fn in fns.items():
            distributed.barrier()  # both processes start the step together
            seconds = timed(fn, device)
            if step >= sizes["warmup"]:
                times[name].append(seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    out = {"processes": 2, "backend": "nccl" if device.type == "cuda" else "gloo", "threads_per_process": threads,
           "images_per_process": local, "ans_discovery_s": discovery}
    for stage in ("stage1", "stage2"):
        sync = med[stage] - med[stage + "_local"]
        out.update({f"{stage}_step_s": med[stage], f"{stage}_local_work_s": med[stage + "_local"],
                    f"{stage}_sync_s": sync, f"{stage}_sync_share": sync / med[stage]})
    out.update({f"{name}_s": med[name] for name in comm})
    out["gradient_mib"] = grads.numel() * 4 / 2**20
    out["step_times_s"] = times
    if distributed.is_main():
        queue.put(out)
    distributed.cleanup()


def without_communication(step, net, distributed):
    """``step(network)`` on the plain network with the gathers replaced by local stand-ins of the same
    shapes (this process's rows, then a detached copy for the other process's): the same per-process
    work as the real step, no collective."""
    def gather_views(features):
        half = features.shape[0] // 2
        other = features.detach()
        return torch.cat([features[:half], other[:half], features[half:], other[half:]])

    def run():
        real = distributed.gather_views, distributed.gather
        distributed.gather_views, distributed.gather = gather_views, lambda t: torch.cat([t, t.flip(0)])
        try:
            return step(net)
        finally:
            distributed.gather_views, distributed.gather = real
    return run


# ---------------------------------------------------------------------------------------------
# report


def check_targets(result, applies):
    """{metric: {target, met}}; met is None where the metric was not measured or the targets do not
    apply (they are for the CPU at the full sizes)."""
    out = {}
    for name, op, bound in TARGETS:
        value = result.get(name)
        met = None
        if applies and value is not None:
            met = value <= bound if op == "<=" else value < bound
        out[name] = {"target": f"{op} {bound:g}", "met": met}
    return out


def print_table(result):
    c, sz = result["config"], result["config"]["sizes"]
    flags = [f for f in ("amp", "channels_last", "compile", "gpu_augment") if c["flags"][f]]
    print(f"\ntorch {c['torch']}, {c['device']} ({c['device_name']}), {c['threads']} threads, {c['cpus']} CPUs, "
          f"load average {c['loadavg_start'][0]:.1f} -> {c['loadavg_end'][0]:.1f}, "
          f"flags: {' '.join(flags) or 'none'}{', QUICK (targets do not apply)' if c['flags']['quick'] else ''}")
    print(f"batch 2 x {sz['batch_size']}, width {sz['width']}, N = {sz['num_samples']:,}, "
          f"steps: median of {sz['steps']} after {sz['warmup']} warm-up")
    rows = []  # (label, value, unit, key of its target or None)
    for name, unit in [("backbone_step_s", "s"), ("stage1_step_s", "s"), ("stage2_step_s", "s"),
                       ("stage1_ratio", ""), ("stage2_ratio", ""), ("stage1_method_s", "s"),
                       ("stage2_method_s", "s"), ("stage1_ratio_from_parts", ""), ("stage2_ratio_from_parts", "")]:
        rows.append((name, name, unit, name))
    runs = result.get("ans_discovery", [])
    for i, run in enumerate(runs):
        n = f"N={run['num_samples']:,}"
        rows.append((f"ans_discovery_s {n}", run["seconds"], "s", "ans_discovery_s" if i == 0 else None))
        rows.append((f"ans_peak_extra_gib {n}", run["peak_extra_gib"], "GiB",
                     "ans_peak_extra_gib" if i == len(runs) - 1 else None))
    for name, unit in [("eval_s", "s"), ("knn_s", "s"), ("loader_images_per_s", "img/s"),
                       ("stage1_images_per_s", "img/s"), ("data_wait_share", ""), ("host_peak_gib", "GiB"),
                       ("device_peak_gib", "GiB")]:
        rows.append((name, name, unit, name))
    for stage in ("stage1", "stage2"):  # two processes: the step, the same work alone, the difference
        for part, unit in (("step_s", "s"), ("local_work_s", "s"), ("sync_s", "s"), ("sync_share", "")):
            name = f"ddp_{stage}_{part}"
            rows.append((name, name, unit, None))
    rows += [(name, name, "s", None) for name in ("ddp_gradient_allreduce_s", "ddp_gather_views_s",
                                                  "ddp_ans_discovery_s", "ddp_ans_split_one_process_s",
                                                  "ddp_ans_split_two_processes_s")]
    rows.append(("ddp_ans_speedup", "ddp_ans_speedup", "", None))
    print(f"{'metric':<34} {'value':>10} {'unit':<6} {'target':<8} met")
    for label, value, unit, key in rows:
        if isinstance(value, str):  # a top-level key; absent when its part was not run
            if value not in result:
                continue
            value = result[value]
        target = result["targets"].get(key)
        shown = "n/a" if value is None else f"{value:10.4g}"
        met = "" if target is None else {True: "yes", False: "NO", None: "-"}[target["met"]]
        print(f"{label:<34} {shown:>10} {unit:<6} {target['target'] if target else '':<8} {met}")
    if not result.get("losses_finite", True):
        print("warning: a training loss became non-finite during the benchmark")

if __name__ == "__main__":
    main(get_args_parser().parse_args())
