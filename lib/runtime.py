"""What both scripts share around the method: clear errors, device choice, seeding, RNG states, the JSON log."""
import argparse
import ctypes
import json
import math
import os
import random
import sys

import numpy as np
import torch


class InputError(Exception):
    """Bad input from the user (missing data, wrong checkpoint, contradicting flags): one line, exit 2."""


class Diverged(Exception):
    """The loss became non-finite: the run stops (exit 3) and the last good checkpoint stays."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and a one-line error (no usage dump) for bad flags."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_run_arguments(p):
    """The flags both scripts add to the released ones: data, processes, device, and speed options."""
    p.add_argument("--data_dir", default="./data", help="where data sets are read or downloaded")
    p.add_argument("--subset", default=None, type=int, help="use only the first N images of each split")
    p.add_argument("--workers", default=4, type=int, help="data-loading processes")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    speed = p.add_argument_group("speed (off by default; see README for their measured effect)")
    speed.add_argument("--amp", action="store_true",
                       help="bfloat16 autocast for the network (losses and memory bank stay float32)")
    speed.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    speed.add_argument("--compile", action="store_true", help="torch.compile the network")
    speed.add_argument("--gpu_augment", action="store_true",
                       help="augment whole batches on the device from uint8 images held there "
                            "(same transforms and parameter distributions, another random stream)")


def speed_options(net, channels_last=False, compile=False):
    """Apply --channels_last and --compile to ``net``; returns (net, model): train with ``model``,
    save ``net`` (a compiled module's state dict would carry an ``_orig_mod.`` prefix)."""
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, (torch.compile(net) if compile else net)


def sgd_optimizer(net, lr, momentum, weight_decay):
    """SGD with Nesterov momentum and weight decay on every trainable parameter of ``net``
    (REFERENCE §3, §4): the frozen Sobel layers and heads have requires_grad False and stay out."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


def run_epoch(loader, step, num_values, device, channels_last=False):
    """Call ``step(images, batch)`` for every batch of a two-view loader and average what it returns.

    ``images`` is the (2B, 3, H, W) concatenation of both views on ``device`` (view 1 rows first),
    ``batch`` the loader's (view1, view2, targets, indexes); ``step`` returns ``num_values`` detached
    numbers as one tensor. They are summed on the device and read once per epoch (no host sync per
    step beyond the progress bar's); a non-finite mean raises ``Diverged``.
    """
    from tqdm import tqdm
    totals = torch.zeros(num_values, device=device)
    bar = tqdm(loader, leave=False, disable=None, desc="train")
    for i, batch in enumerate(bar, start=1):
        images = torch.cat([batch[0], batch[1]]).to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        totals += step(images, batch)
        if i % 10 == 0 and bar.disable is False:
            bar.set_postfix(loss=f"{totals[0].item() / i:.4f}")
    means = (totals / max(len(loader), 1)).tolist()
    if not all(map(math.isfinite, means)):
        raise Diverged(f"the loss became non-finite ({means[0]}); stopped before saving this epoch")
    return means


def run_cli(main, parser, argv=None):
    """Parse ``argv``, run ``main(args)``; bad input prints one line and exits 2, a diverged run exits 3."""
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # one line per epoch, also when redirected to a file
    try:
        return main(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3)


def choose_device(name="auto"):
    """The script's one device; on the CPU also keep freed memory (see ``keep_freed_memory``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for but PyTorch sees no CUDA device; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        keep_freed_memory()
    return device


def keep_freed_memory():
    """CPU speed, no change to the math: stop glibc from handing the network's large activation
    buffers back to the kernel after every step (the next step would fault in zeroed pages again;
    about 2.5 million page faults and 5 s of system time per 12 s step of the full network on 2
    cores here). Same effect as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every random stream a run draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class JsonLog:
    """``log.jsonl``: one JSON object per epoch, appended and flushed as each epoch ends."""

    def __init__(self, path):
        self.path = path

    def append(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def rewind(self, keep, last_record=None):
        """On resume: keep the records for which ``keep(record)`` holds, then ``last_record``
        (the checkpoint's own record, in case the run died between checkpoint and log)."""
        records = [r for r in self.read() if keep(r)]
        if last_record is not None:
            records.append(last_record)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, self.path)
