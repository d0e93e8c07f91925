"""The life of a run folder (``--model_dir``), the same for every script: plain functions, no trainer class.

    path, ckpt = read_checkpoint(args.resume, args.model_dir, required=[...])  # checked, or one error line
    with open_run(args.model_dir, CKPT, LOG, resumed=path, ckpt=ckpt, position=..., optimizer=optimizer,
                  args=args) as run:  # refuse to overwrite, lock, clean; on resume: log, optimizer, RNG
        for epoch in ...:
            set_lr(optimizer, step_lr(epoch, args.lr))
            losses = run_epoch(loader, step, device)                               # step returns named losses
            run.save({**released_keys, **training_state(optimizer, args, record, ...)})
            run.log.append(record)

Every write is atomic (a temporary file renamed into place) and ordered so that whatever instant a run is
killed at, the documented command continues it: ``--resume <checkpoint>`` once a checkpoint exists, the
same command again before that. One run per folder: ``run.lock`` names its owner (PID, host) and a lock
left by a killed run is taken over.
"""
import contextlib
import glob
import json
import math
import os
import socket
import stat
import sys
import time

import torch

from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.errors import Diverged, InputError

from . import distributed
from .system import rng_state, set_rng_state

LOCK = "run.lock"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a run: carries the line that says how to continue (``run_cli`` prints it, exit 130)."""


# ---- reading checkpoints ----

def find_checkpoint(name, model_dir):
    """``--resume NAME``: inside ``--model_dir`` first (the released usage), else the path as given."""
    for path in (os.path.join(model_dir, name), name):
        if os.path.lexists(path):
            return path
    raise InputError(f"checkpoint not found: {name} (looked in {model_dir} and as a path); "
                     "check --resume and --model_dir")


def _lookup(ckpt, dotted):
    value = ckpt
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def require_keys(ckpt, path, keys):
    """Each (dotted) key of ``keys`` is in ``ckpt``, or one InputError lists the missing ones."""
    missing = [key for key in keys if _lookup(ckpt, key) is None]
    if missing:
        raise InputError(f"{path} lacks {', '.join(repr(k) for k in missing)}: cut short or written by another "
                         "program; pass an intact checkpoint")


def read_checkpoint(name, model_dir, required=()):
    """Find, load and check a checkpoint: a regular file, safe to unpickle, holding every ``required``
    (dotted) key, with finite network weights. Prints which file it uses; an InputError names the problem."""
    path = find_checkpoint(name, model_dir)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise InputError(f"{path} is {kind}; pass a checkpoint file")
    ckpt = load_checkpoint(path)
    require_keys(ckpt, path, required)
    for key, value in ckpt["net"].items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f"{path} holds non-finite weights ({key}); it cannot be evaluated or continued")
    print(f"using checkpoint {path}")
    return path, ckpt


def changed_arguments(saved, args, ignore=("resume", "workers", "device", "data_dir", "model_dir")):
    """A note on the flags that differ from those the checkpoint was trained with (None if none)."""
    changed = [f"--{k} {v} -> {getattr(args, k)}" for k, v in saved.items()
               if k not in ignore and hasattr(args, k) and getattr(args, k) != v]
    return "changed arguments: " + ", ".join(changed) if changed else None


# ---- the run folder ----

def refuse_overwrite(model_dir, names, resuming=None):
    """A new run never replaces a folder's run: its files ``names`` (the resumable checkpoint first, then
    other checkpoints and logs) must be absent. A resumed run may only continue the folder's own
    checkpoint (or start one where there is none). Called before anything is written, and under the lock."""
    first = os.path.join(model_dir, names[0])
    if resuming is not None:
        if os.path.lexists(first) and not (os.path.exists(resuming) and os.path.samefile(first, resuming)):
            raise InputError(f"{first} exists and is not the file being resumed; continue it with --resume "
                             f"{names[0]}, or choose another --model_dir")
        return
    for name in names:
        path = os.path.join(model_dir, name)
        if os.path.lexists(path):
            what = (f"continue that run with --resume {names[0]}" if name == names[0]
                    else f"it belongs to a run whose {names[0]} is gone: move it away")
            raise InputError(f"{path} already exists; {what}, or choose another --model_dir")


def _process_start(pid):
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class RunLock:
    """``run.lock`` in the run folder: {pid, host, script, started}, created exclusively."""

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, LOCK)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "script": os.path.basename(sys.argv[0]),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "process_start": _process_start(os.getpid())}
        self.held = False

    def _holder(self):
        try:
            with open(self.path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _alive(self, owner):
        if owner.get("host") != socket.gethostname():
            return True  # cannot be checked from here
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        start = _process_start(owner["pid"])
        return owner.get("process_start") is None or start is None or start == owner["process_start"]

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                text = self._holder()
                try:
                    owner = json.loads(text) if text else {}
                except json.JSONDecodeError:
                    owner = {}  # a lock cut by a kill while it was written
                if owner and self._alive(owner):
                    raise InputError(
                        f"{os.path.dirname(self.path)} is in use by {owner.get('script', 'a run')} (PID "
                        f"{owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}); wait for it or "
                        f"choose another --model_dir (if that run is gone, delete {self.path})") from None
                if self._holder() == text:  # still the dead run's lock: take it over
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            self.held = True
            return self
        raise InputError(f"could not take {self.path}: other runs keep starting in this folder")

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    def release(self):
        if self.held and self._holder() == json.dumps(self.owner):
            os.remove(self.path)
        self.held = False


class JsonLog:
    """A run's log: one JSON object per epoch, appended and flushed as each epoch ends (by rank 0 alone when
    several processes run: ``writes`` is False on the others)."""

    def __init__(self, path, writes=True):
        self.path = path
        self.writes = writes

    def append(self, record):
        if not self.writes:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self):
        """The records; a last line cut by a kill is dropped (the checkpoint holds that epoch's record)."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            lines = [line for line in f.read().split("\n") if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise InputError(f"{self.path}: line {number} is not JSON; repair or move the log") from None
        return records

    def rewind(self, keep, last_record=None):
        """On resume: keep the records for which ``keep(record)`` holds, then ``last_record`` (the
        checkpoint's own record, in case the run died between checkpoint and log)."""
        records = [r for r in self.read() if keep(r)]
        if last_record is not None:
            records.append(last_record)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, self.path)


class Run:
    """An open run folder: its lock, its resumable checkpoint and its log. Use it as a context manager.
    With several processes only rank 0 writes (``writes``); the others' saves and log lines do nothing."""

    def __init__(self, model_dir, checkpoint_name, log_name, writes=True):
        self.model_dir = model_dir
        self.checkpoint_name = checkpoint_name
        self.checkpoint_path = os.path.join(model_dir, checkpoint_name)
        self.writes = writes
        self.log = JsonLog(os.path.join(model_dir, log_name), writes)
        self.lock = RunLock(model_dir)

    def save(self, state, name=None):
        if self.writes:
            save_checkpoint(state, os.path.join(self.model_dir, name or self.checkpoint_name))

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.lock.release()
        if kind is not None and issubclass(kind, KeyboardInterrupt) and not isinstance(error, Interrupted):
            if os.path.exists(self.checkpoint_path):
                raise Interrupted(f"resume with the same command and --resume {self.checkpoint_name} "
                                  f"(the last checkpoint, {self.checkpoint_path}, is intact)") from None
            raise Interrupted("stopped before the first checkpoint; run the same command again") from None
        return False


def open_run(model_dir, checkpoint_name, log_name, other_files=(), resumed=None, ckpt=None, position=None,
             optimizer=None, args=None):
    """Create or continue a run in ``model_dir``; returns the open ``Run`` (use it in a ``with``).

    Refuses to overwrite another run (``checkpoint_name``, ``log_name`` and ``other_files`` must be absent
    for a new run), takes the folder's lock and removes temporaries a killed run left. On resume
    (``resumed``: the path of ``ckpt``) it rewinds the log to the checkpoint (the records whose
    ``position(record)`` comes before ``position(ckpt)``, then the checkpoint's own record) and restores the
    optimizer's state and every random stream. With several processes rank 0 alone takes the folder (its
    error stops them all); every process restores the optimizer and the random streams.
    """
    names = [checkpoint_name, *other_files, log_name]
    run = Run(model_dir, checkpoint_name, log_name, writes=distributed.is_main())
    distributed.main_decides(lambda: _take_folder(run, names, resumed, ckpt, position))
    try:
        if resumed is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            for group in optimizer.param_groups:  # a changed --momentum or --weight_decay takes effect (lr:
                group.update(momentum=args.momentum, weight_decay=args.weight_decay)  # set every epoch)
            set_rng_state(ckpt["rng"])
            note = changed_arguments(ckpt["args"], args)
            print(f"resuming {resumed} after {position(ckpt)}" + (f"; {note}" if note else ""))
    except BaseException:
        run.lock.release()
        raise
    return run


def _take_folder(run, names, resumed, ckpt, position):
    """The part of ``open_run`` that touches the folder: checks, lock, leftovers, the log's rewind."""
    refuse_overwrite(run.model_dir, names, resuming=resumed)  # before anything is created
    run.lock.acquire()
    try:
        model_dir = run.model_dir
        for leftover in glob.glob(os.path.join(glob.escape(model_dir), "*.t7.tmp*")) + \
                glob.glob(os.path.join(glob.escape(model_dir), "*.jsonl.tmp")):
            os.remove(leftover)  # a save or rewind cut by a kill; the lock says no one else writes here
        refuse_overwrite(model_dir, names, resuming=resumed)  # a run that started meanwhile
        if resumed is not None:
            done = position(ckpt)
            run.log.rewind(lambda record: position(record) < done, ckpt.get("log_record"))
    except BaseException:
        run.lock.release()
        raise


# ---- training ----

def set_lr(optimizer, lr):
    """The epoch's learning rate, set at the start of the epoch (as released)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def training_state(optimizer, args, record, **position):
    """What a checkpoint adds to the released keys so the run continues exactly: the optimizer, the
    resolved arguments, every RNG stream, the epoch's log record, and ``position`` (where to continue)."""
    return {"optimizer": optimizer.state_dict(), "args": vars(args), "rng": rng_state(), "log_record": record,
            **position}


def run_epoch(loader, step, device, channels_last=False):
    """Call ``step(images, batch)`` for every batch of a two-view loader; average what it returns.

    ``images`` is the (2B, 3, H, W) concatenation of both views on ``device`` (view 1 rows first),
    ``batch`` the loader's dict (``view1``, ``view2``, ``target``, ``index``); ``step`` returns a dict of
    detached tensors (the named losses). They are summed on the device and read once per epoch (no host
    sync per step beyond the progress bar's); a non-finite mean raises ``Diverged``.
    """
    from tqdm import tqdm
    totals = {}
    bar = tqdm(loader, leave=False, disable=None if distributed.is_main() else True, desc="train")
    for i, batch in enumerate(bar, start=1):
        images = torch.cat([batch["view1"], batch["view2"]]).to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for name, value in step(images, batch).items():
            totals[name] = totals[name] + value if name in totals else value.clone()
        if i % 10 == 0 and bar.disable is False:
            bar.set_postfix(loss=f"{totals['loss'].item() / i:.4f}")
    count = max(len(loader), 1)
    return require_finite({name: (total / count).tolist() for name, total in totals.items()})


def require_finite(means):
    """``means`` (the epoch's mean losses: numbers or lists of them) unchanged, or ``Diverged`` when one is
    NaN or infinite: the run stops before saving the epoch, and the last good checkpoint stays."""
    flat = [x for v in means.values() for x in (v if isinstance(v, list) else [v])]
    if not all(map(math.isfinite, flat)):
        raise Diverged(f"the loss became non-finite ({means.get('loss')}); stopped before saving this epoch")
    return means
