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
import argparse
import contextlib
import errno
import glob
import json
import math
import os
import signal
import socket
import stat
import sys
import time

import torch

from lib.checkpoint import load_checkpoint, save_checkpoint, saved_arguments
from lib.errors import Diverged, InputError

from . import distributed
from .files import LOCK, RUN_FILES  # noqa: F401 (RUN_FILES: the tests read it here)
from .system import rng_state, set_rng_state


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM inside a run: carries the line that says how to continue (``run_cli`` prints it and
    exits 130 after Ctrl-C, 143 after SIGTERM: ``terminated``)."""

    def __init__(self, message, terminated=False):
        super().__init__(message)
        self.terminated = terminated


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm, Kubernetes, ``kill``): raised where Ctrl-C would be, so it stops the run the same way."""


class Fault(Exception):
    """A fault outside the run's control (a full disk, an I/O error, a closed standard output) inside a run:
    carries the line that says what failed and how to continue (``run_cli`` prints it, exit 1)."""


# ---- signals: Ctrl-C and SIGTERM never cut a write ----

_signals = {"depth": 0, "pending": None}


def _interrupt(signum):
    raise Terminated("SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame):
    if _signals["depth"]:
        _signals["pending"] = signum  # raised when the write in progress is done
        return
    _interrupt(signum)


@contextlib.contextmanager
def uninterrupted(deliver=True):
    """Ctrl-C and SIGTERM that arrive inside the block take effect when it ends (with ``handle_signals`` in
    force): a checkpoint, a log line or the lock is written whole or not at all. With ``deliver`` False (the
    lock's release, on the way out of a run) a signal stays pending instead, for the next such block."""
    _signals["depth"] += 1
    try:
        yield
    finally:
        _signals["depth"] -= 1
    pending = _signals["pending"]
    if deliver and pending is not None and not _signals["depth"]:
        _signals["pending"] = None
        _interrupt(pending)


@contextlib.contextmanager
def handle_signals():
    """For the life of a script: SIGINT raises KeyboardInterrupt and SIGTERM ``Terminated`` (a
    KeyboardInterrupt), both held back while a run file is written; the previous handlers come back after."""
    try:
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave the signals alone
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _signals["pending"] = None


# ---- faults ----

def stream_broken(stream):
    """Whether ``stream`` (sys.stdout or sys.stderr) is closed or can no longer be written."""
    if stream is None or stream.closed or getattr(stream, "failed", None) is not None:
        return True
    try:
        stream.flush()
    except (OSError, ValueError):
        return True
    return False


def describe_fault(err):
    """What an OSError was about, in words: the file (or the standard output) and the reason."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.ENOSPC:
        reason = "no space left on the device; free some"
    elif err.errno in (errno.EFBIG, errno.EDQUOT):
        reason = f"{reason.lower()}; make room"
    if err.filename is not None:
        written = err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)  # only writes fail so
        return f"cannot write {err.filename}: {reason}" if written else f"{err.filename}: {reason}"
    if stream_broken(sys.stdout):
        return f"cannot write to the standard output: {reason}"
    return f"input/output error: {reason}"


# ---- files written whole ----

def is_device(path):
    """Whether ``path`` is a device, pipe or socket, or reached through /dev or /proc (``/dev/stdout``): a
    stream written where it is, never replaced by a renamed file."""
    if not os.path.exists(path):
        return False
    real = os.path.realpath(path)
    return (not os.path.isfile(real) and not os.path.isdir(real)) or \
        any(p == "/dev" or p.startswith(("/dev/", "/proc/")) for p in (os.path.abspath(path), real))


@contextlib.contextmanager
def atomic_file(path, mode="w", **kwargs):
    """``open(path, mode)`` for writing, made atomic: the text goes to a temporary file beside ``path``, is
    flushed to disk and renamed over ``path`` only once whole, so an error (a full disk) or a kill leaves the
    previous file as it was and no temporary. A device or pipe (``/dev/stdout``) is written directly. An
    OSError names ``path``."""
    special = is_device(path)
    target = path if special else os.path.realpath(path)  # through a link: the file it names is replaced
    tmp = path if special else f"{target}.tmp{os.getpid()}"
    try:
        with uninterrupted():
            with open(tmp, mode, **kwargs) as f:
                yield f
                f.flush()
                if not special:
                    os.fsync(f.fileno())
            if not special:
                os.replace(tmp, target)
    except OSError as err:
        if err.filename in (None, tmp):
            err.filename = path
        raise
    finally:
        if not special:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` whole or not at all (``atomic_file``)."""
    with atomic_file(path, "w", newline="") as f:
        f.write(text)


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


def _is_whole(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# what each training-state key of the scripts' checkpoints holds, checked by ``require_keys``
FIELDS = {
    "net": (dict, "a state dict"), "fc": (dict, "a state dict"), "classifier": (dict, "a state dict"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list), "an optimizer state"),
    "rng": (dict, "the random streams"), "args": (dict, "the arguments"), "npc": (dict, "a memory bank"),
    "npc.memory": (torch.is_tensor, "a tensor"),
    "epoch": (_is_whole, "a whole number"), "round": (_is_whole, "a whole number"),
    "next_epoch": (_is_whole, "a whole number"), "next.round": (_is_whole, "a whole number"),
    "next.epoch": (_is_whole, "a whole number"), "best_epoch": (_is_whole, "a whole number"),
    "best_loss": (_is_number, "a number"), "start": (str, "text"),
    "labelled_indexes": (lambda v: isinstance(v, list) and all(map(_is_whole, v)), "a list of whole numbers"),
}


def require_keys(ckpt, path, keys):
    """Each (dotted) key of ``keys`` is in ``ckpt`` and holds what it should (``FIELDS``), or one InputError
    lists the missing ones or names the first that holds something else."""
    missing = [key for key in keys if _lookup(ckpt, key) is None]
    if missing:
        raise InputError(f"{path} lacks {', '.join(repr(k) for k in missing)}: cut short or written by another "
                         "program; pass an intact checkpoint")
    for key in keys:
        check, what = FIELDS.get(key, (None, None))
        value = _lookup(ckpt, key)
        if check is not None and not (isinstance(value, check) if isinstance(check, type) else check(value)):
            raise InputError(f"{path}: {key!r} holds {type(value).__name__} instead of {what}: damaged or written "
                             "by another program; pass an intact checkpoint")


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
        if not torch.is_tensor(value):
            raise InputError(f"{path}: the network weight {key!r} is {type(value).__name__}, not a tensor; "
                             "pass an intact checkpoint")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f"{path} holds non-finite weights ({key}); it cannot be evaluated or continued")
    print(f"using checkpoint {path}")
    return path, ckpt


# ---- a resume goes on with the run it resumes ----

# the shared flags (engine/cli.py, common_parser) that say where and how a run runs now, never taken from the
# checkpoint it continues; a script's own are its parser's ``now``
HERE_AND_NOW = ("resume", "model_dir", "test_only", "device", "workers", "allow_change")
# flags a resumed run may change without --allow_change: they change how it runs, not the method (the speed
# options: bench/README.md); each script adds its run's length (``free``)
FREE_ON_RESUME = HERE_AND_NOW + ("data_dir", "amp", "channels_last", "compile", "gpu_augment", "sync_bn")
# the shared flags a run cannot change at all, --allow_change or not (its images, its network); a script's own
# (its labelled set, its heads, its variant) are its parser's ``fixed``
FIXED_ON_RESUME = ("dataset", "subset", "image_size", "num_classes", "network", "width", "low_dim")


def given_flags(args, parser):
    """The flags the command line gave (``engine.cli.Arguments.given``), and any whose value differs from
    ``parser``'s default (arguments built or changed in code)."""
    given = set(getattr(args, "given", ()) or ())
    return given | {k for k, v in vars(args).items() if parser.get_default(k) != v}


def resume_arguments(args, ckpt, path, parser, free=()):
    """A resumed run goes on as it was trained: every flag the command line left out takes the value saved in
    ``ckpt`` (but ``HERE_AND_NOW`` and the ``parser``'s ``now``); a flag given with another value than the
    saved one is refused with one line when it changes the method mid-run, unless it is one of those, of
    ``FREE_ON_RESUME``, of ``free`` (the run's length) or of --allow_change; one of ``FIXED_ON_RESUME`` or of
    the parser's ``fixed`` is refused always. Returns the arguments to run with, a plain ``argparse.Namespace``
    (``args`` is left alone)."""
    now, fixed = HERE_AND_NOW + getattr(parser, "now", ()), FIXED_ON_RESUME + getattr(parser, "fixed", ())
    saved = saved_arguments(ckpt)
    given = given_flags(args, parser)
    allowed = {flag.lstrip("-") for flag in getattr(args, "allow_change", None) or ()}
    unknown = sorted(allowed - set(vars(args)))
    if unknown:
        raise InputError(f"--allow_change {unknown[0]}: not a flag of this script; name flags without '--' (e.g. "
                         "--allow_change lr)")
    values = dict(vars(args))
    for key, value in saved.items():
        if key in values and key not in given and key not in now:
            values[key] = value
    for key in [k for k in values if k in saved and k in given]:  # in the parser's order
        if saved[key] == values[key] or key in FREE_ON_RESUME + now + tuple(free):
            continue
        was = f"{path} was trained with --{key} {_flag_text(saved[key])}, not {_flag_text(values[key])}"
        if key in fixed:
            same = (f"leave --{key} out" if saved[key] is None
                    else f"pass --{key} {_flag_text(saved[key])} (or leave it out)")
            raise InputError(f"{was}; {same} to go on, or start a new run in another --model_dir")
        if key not in allowed:
            raise InputError(f"{was}: that would change the method mid-run; leave --{key} out to go on as trained, "
                             f"add --allow_change {key} to change it on purpose, or start a new run in another "
                             "--model_dir")
    return argparse.Namespace(**values)


def _flag_text(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def changed_arguments(saved, args, now=()):
    """A note on the flags that differ from those the checkpoint was trained with (None if none): after
    ``resume_arguments``, those the command changed, but for ``HERE_AND_NOW``, --data_dir and ``now`` (the
    script parser's own)."""
    ignore = HERE_AND_NOW + ("data_dir",) + tuple(now)
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


PID_MAX = 2**22  # Linux's largest process id (/proc/sys/kernel/pid_max at most)


class RunLock:
    """``run.lock`` in the run folder: {pid, host, script, started, process_start}, created exclusively. ``name``
    and ``flag``: another lock file and the flag that names its folder (experiments/paper.py's <out>/paper.lock,
    --out)."""

    def __init__(self, model_dir, name=LOCK, flag="--model_dir"):
        self.path = os.path.join(model_dir, name)
        self.flag = flag
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "script": os.path.basename(sys.argv[0]),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "process_start": _process_start(os.getpid())}
        self.held = False

    def _damaged(self, what):
        return InputError(f"{self.path} {what}, not a lock written by these scripts; delete it when no run holds "
                          f"the folder {os.path.dirname(self.path) or '.'}")

    def _text(self):
        """The lock's text, None when there is no lock; a lock that is not a readable text file is damaged (a
        link to nothing too: it can be neither read nor replaced by creating the lock)."""
        try:
            with open(self.path, "rb") as f:
                return f.read().decode()
        except FileNotFoundError:
            if os.path.islink(self.path):
                raise self._damaged("is a link to nothing") from None
            return None
        except IsADirectoryError:
            raise self._damaged("is a folder") from None
        except OSError as err:
            raise self._damaged(f"cannot be read ({err.strerror})") from None
        except UnicodeDecodeError:
            raise self._damaged("holds bytes that are not text") from None

    def _owner(self, text):
        """The owner ``text`` names, every field checked; {} for a lock cut while it was written (empty or not
        JSON), which is taken over; an InputError for anything else that is not a lock."""
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:
            return {}
        if not isinstance(owner, dict):
            raise self._damaged(f"holds a JSON {type(owner).__name__} instead of an object")
        pid = owner.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= PID_MAX:
            raise self._damaged(f"holds the pid {pid!r} (a process id is a whole number from 1 to {PID_MAX})")
        for key, kind, what in (("host", str, "text"), ("script", str, "text"), ("started", str, "text"),
                                ("process_start", int, "a whole number")):
            if owner.get(key) is not None and (isinstance(owner[key], bool) or not isinstance(owner[key], kind)):
                raise self._damaged(f"holds the {key} {owner[key]!r} (not {what})")
        return owner

    def _alive(self, owner):
        """Whether the lock's process runs: always on another host (it cannot be checked from here); on this one,
        a process of its PID that started when it did (a PID reused by another process is not it)."""
        if owner.get("host") != socket.gethostname():
            return True
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        start, now = owner.get("process_start"), _process_start(owner["pid"])
        return None in (start, now) or start == now

    def acquire(self):
        """Take the lock, or one InputError naming its holder; the lock of a process that no longer runs is
        taken over. A signal that stops it leaves no lock."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            while not self._create():
                text = self._text()
                owner = self._owner(text) if text is not None else None
                if owner and self._alive(owner):
                    raise InputError(
                        f"{os.path.dirname(self.path)} is in use by {owner.get('script', 'a run')} (PID "
                        f"{owner['pid']} on {owner.get('host')}, since {owner.get('started')}); wait for it or "
                        f"choose another {self.flag} (if that run is gone, delete {self.path})")
                if text is not None and self._text() == text:  # still the dead run's lock: take it over
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
        except BaseException:
            self.release()
            raise
        return self

    def _create(self):
        """Create the lock with this process as its owner, written whole; False where a lock exists."""
        with uninterrupted():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.owner, f)
            except BaseException:  # a full disk: no lock, rather than one cut short
                with contextlib.suppress(OSError):
                    os.remove(self.path)
                raise
            self.held = True
        return True

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    def release(self):
        with uninterrupted(deliver=False):
            if self.held:
                with contextlib.suppress(InputError, FileNotFoundError):
                    if self._text() == json.dumps(self.owner):
                        os.remove(self.path)
            self.held = False


class JsonLog:
    """A run's log: one JSON object per epoch, appended and flushed as each epoch ends (by rank 0 alone when
    several processes run: ``writes`` is False on the others)."""

    def __init__(self, path, writes=True):
        self.path = path
        self.writes = writes

    def append(self, record):
        """Append one line, whole or not at all: a failed write (a full disk) is cut back off before the
        error goes on, and Ctrl-C or SIGTERM waits for the line."""
        if not self.writes:
            return
        data = (json.dumps(record) + "\n").encode()
        with uninterrupted():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                try:
                    written = 0
                    while written < len(data):
                        written += os.write(fd, data[written:])
                    os.fsync(fd)
                except OSError as err:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise OSError(err.errno, err.strerror, self.path) from None
            finally:
                os.close(fd)

    def _damaged(self, number, what):
        return InputError(f"{self.path}: line {number} {what}; the log is damaged: repair it or move it away")

    def _numbered(self):
        """(line number, record) for every record; a last line cut by a kill (the start of a JSON object,
        with no newline after it) is dropped: the checkpoint holds that epoch's record."""
        if not os.path.lexists(self.path):
            return []
        if os.path.isdir(self.path):
            raise InputError(f"{self.path} is a folder, not a log; move it away")
        if not os.path.isfile(self.path):
            raise InputError(f"{self.path} is not a regular file (a pipe, socket or device); move it away")
        with open(self.path, "rb") as f:
            *lines, rest = f.read().split(b"\n")
        records = []
        for number, line in enumerate([*lines, rest], start=1):
            if not line.strip():
                continue
            cut = number == len(lines) + 1  # no newline after it: a kill may have cut it
            try:
                record = json.loads(line.decode())
            except UnicodeDecodeError:
                raise self._damaged(number, "holds bytes that are not text") from None
            except json.JSONDecodeError:
                if cut and line.lstrip().startswith(b"{"):
                    continue
                raise self._damaged(number, "is not JSON") from None
            if not isinstance(record, dict):
                raise self._damaged(number, f"is a JSON {type(record).__name__}, not an object")
            records.append((number, record))
        return records

    def read(self):
        """The records, each checked to be a JSON object; an InputError names the file and the line."""
        return [record for _, record in self._numbered()]

    def rewind(self, keep, last_record=None):
        """On resume: keep the records for which ``keep(record)`` holds, then ``last_record`` (the
        checkpoint's own record, in case the run died between checkpoint and log)."""
        records = []
        for number, record in self._numbered():
            try:
                kept = keep(record)
            except (KeyError, TypeError, ValueError):
                raise self._damaged(number, "lacks the epoch it was written in (or holds it as another "
                                    "type)") from None
            if kept:
                records.append(record)
        if last_record is not None:
            records.append(last_record)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records))


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
        self.new_files = []  # a new run's other files: removed if it stops before its first checkpoint

    def save(self, state, name=None):
        if self.writes:
            with uninterrupted():
                save_checkpoint(state, os.path.join(self.model_dir, name or self.checkpoint_name))

    def how_to_continue(self):
        if os.path.exists(self.checkpoint_path):
            return (f"resume with the same command and --resume {self.checkpoint_name} (the last checkpoint, "
                    f"{self.checkpoint_path}, is intact)")
        return "stopped before the first checkpoint; run the same command again"

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is not None and self.writes and not os.path.exists(self.checkpoint_path):
            for path in self.new_files:  # stopped before its first checkpoint: what it wrote goes, so that the
                with contextlib.suppress(OSError):  # same command can start it again
                    os.remove(path)
        self.lock.release()
        if kind is None or isinstance(error, (Interrupted, Fault)):
            return False
        if issubclass(kind, KeyboardInterrupt):
            raise Interrupted(self.how_to_continue(), terminated=isinstance(error, Terminated)) from None
        if issubclass(kind, OSError):
            raise Fault(f"{describe_fault(error)}; {self.how_to_continue()}") from None
        return False


def open_run(model_dir, checkpoint_name, log_name, other_files=(), resumed=None, ckpt=None, position=None,
             optimizer=None, args=None, now=()):
    """Create or continue a run in ``model_dir``; returns the open ``Run`` (use it in a ``with``).

    Refuses to overwrite another run (``checkpoint_name``, ``log_name`` and ``other_files`` must be absent
    for a new run), takes the folder's lock and removes temporaries a killed run left. On resume
    (``resumed``: the path of ``ckpt``) it rewinds the log to the checkpoint (the records whose
    ``position(record)`` comes before ``position(ckpt)``, then the checkpoint's own record) and restores the
    optimizer's state and every random stream, and says which flags differ from the checkpoint's (all but
    ``HERE_AND_NOW``, --data_dir and ``now``, the script parser's own). With several processes rank 0 alone
    takes the folder (its error stops them all); every process restores the optimizer and the random streams.
    """
    names = [checkpoint_name, *other_files, log_name]
    run = Run(model_dir, checkpoint_name, log_name, writes=distributed.is_main())
    if resumed is None:  # absent now (refuse_overwrite): whatever of them exists later, this run wrote
        run.new_files = [os.path.join(model_dir, name) for name in names[1:]]
    if resumed is not None:  # checked and restored in memory before the folder is touched
        done = _restore(ckpt, resumed, optimizer, args, position)
    distributed.main_decides(lambda: _take_folder(run, names, resumed, ckpt, position))
    try:
        if resumed is not None:
            note = changed_arguments(ckpt["args"], args, now)
            print(f"resuming {resumed} after {done}" + (f"; {note}" if note else ""))
    except BaseException:
        run.lock.release()
        raise
    return run


def _is_position(value):
    return _is_whole(value) or (isinstance(value, tuple) and all(map(_is_whole, value)))


def _restore(ckpt, path, optimizer, args, position):
    """Check the training state of the checkpoint at ``path`` field by field, then load it: the optimizer
    (with this run's momentum and weight decay) and every random stream. Returns ``position(ckpt)``."""
    require_keys(ckpt, path, ["optimizer", "rng", "args"])
    try:
        done = position(ckpt)
    except (KeyError, TypeError, ValueError):
        done = None
    if not _is_position(done):
        raise InputError(f"{path} does not say which epoch it holds (or not as whole numbers): cut short or written "
                         "by another program; pass an intact checkpoint")
    if not isinstance(ckpt.get("log_record", {}), dict):
        raise InputError(f"{path}: its 'log_record' is not a record; pass an intact checkpoint")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: its optimizer state does not fit this network ({reason}); pass a checkpoint "
                         "of this network (check --network, --width and --low_dim)") from None
    for group in optimizer.param_groups:  # a changed --momentum or --weight_decay takes effect (lr: set every
        group.update(momentum=args.momentum, weight_decay=args.weight_decay)  # epoch)
    try:
        set_rng_state(ckpt["rng"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError):
        raise InputError(f"{path}: its random-number state is damaged; pass an intact checkpoint") from None
    return done


def _take_folder(run, names, resumed, ckpt, position):
    """The part of ``open_run`` that touches the folder: checks, lock, leftovers, the log's rewind."""
    refuse_overwrite(run.model_dir, names, resuming=resumed)  # before anything is created
    run.lock.acquire()
    try:
        model_dir = run.model_dir
        for pattern in ("*.t7.tmp*", "*.jsonl.tmp*", "*.json.tmp*"):  # checkpoints, the log's rewind, eval.json...
            for leftover in glob.glob(os.path.join(glob.escape(model_dir), pattern)):
                os.remove(leftover)  # a write cut by a kill; the lock says no one else writes here
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
