"""The process's device, its random streams, and one CPU memory setting."""
import ctypes
import random

import numpy as np
import torch

from lib.errors import InputError


def choose_device(name="auto"):
    """The script's one device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` of a GPU that
    exists, ``mps`` where PyTorch has it. Anything else is an InputError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {name} was asked for but PyTorch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {name}: PyTorch has no MPS device here; use --device cpu")
    elif device.type != "cpu":
        raise InputError(f"--device {name}: training runs on cpu, cuda or mps, not {device.type}")
    return device


def keep_freed_memory():
    """A CPU speed setting that leaves the math alone: stop glibc from handing the network's large
    activation buffers back to the kernel after every step, so the next step does not fault in zeroed
    pages again. The price is a higher resident peak. Same as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<large>; a no-op off glibc. Returns whether the setting took."""
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
