"""The scripts' command lines: flags checked where they are parsed, the flags all scripts share, exit codes.

Every flag's valid range is part of its type, so a bad value is one ``error:`` line and exit status 2
before any work starts, and ``--help`` states the range beside the default.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import signal
import sys
import tempfile

from lib.errors import Diverged, InputError

from . import distributed
from .files import CACHE, HARNESS_FILES, RUN_FILES
from .lifecycle import (
    Fault,
    Interrupted,
    Terminated,
    describe_fault,
    handle_signals,
    is_device,
    stream_broken,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and a one-line error (no usage dump) for bad flags. A script's own flags
    that a resume treats apart (engine.lifecycle.resume_arguments, beside the shared flags it names itself):
    ``now``, those that say where and how a run runs now, never taken from the checkpoint it continues;
    ``fixed``, those a run can never change. A parser built on ``parents`` has theirs too."""

    def __init__(self, *, now=(), fixed=(), **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)
        parents = kwargs.get("parents", ())
        self.now = tuple(now) + tuple(flag for parent in parents for flag in getattr(parent, "now", ()))
        self.fixed = tuple(fixed) + tuple(flag for parent in parents for flag in getattr(parent, "fixed", ()))

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n" if _rank_zero() else None)

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, into an ``Arguments`` that also knows which flags the command line gave (``given``):
        a resumed run takes the others from its checkpoint (engine.lifecycle.resume_arguments)."""
        parsed, rest = super().parse_known_args(args, Arguments() if namespace is None else namespace)
        if isinstance(parsed, Arguments):
            parsed.given = self._given(args)
        return parsed, rest

    def _given(self, args):
        """The destinations the command line ``args`` sets: parsed again into a namespace that already holds a
        marker for every destination (argparse fills in only the defaults a namespace lacks)."""
        dests = vars(super().parse_known_args(args, argparse.Namespace())[0])
        again, _ = super().parse_known_args(args, argparse.Namespace(**dict.fromkeys(dests, _UNSET)))
        return frozenset(key for key, value in vars(again).items() if value is not _UNSET)


_UNSET = object()  # a default the command line did not replace


class Arguments(argparse.Namespace):
    """The parsed flags, as ``argparse.Namespace``; ``given`` (the flags the command line named) is a slot, so
    that ``vars(args)`` (what a checkpoint saves) holds the flags alone."""
    __slots__ = ("given",)


def _rank_zero():
    """Whether this process speaks for the job: rank 0 under torchrun (also before the process group is
    joined, from torchrun's RANK), the only process otherwise."""
    if distributed.world_size() > 1:
        return distributed.is_main()
    return os.environ.get("RANK", "0").strip() in ("0", "")


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: ``kind`` (int or float), finite, within [low, high] (open ends where asked)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not finite")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(
                f"{text} is outside {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, low=1)
non_negative_int = _number(int, low=0)
positive_float = _number(float, low=0, low_open=True)
non_negative_float = _number(float, low=0)
half_open_unit = _number(float, low=0, high=1, high_open=True)  # [0, 1): momenta
unit_interval = _number(float, low=0, high=1)  # [0, 1]: shares of the data
unit_interval_open_low = _number(float, low=0, high=1, low_open=True)  # (0, 1]: a fraction of a schedule
seed = _number(int, low=0, high=2**63 - 1)


def int_between(low, high):
    """An argparse type: an integer in [low, high]."""
    return _number(int, low=low, high=high)


MAX_IMAGE_SIZE = 512  # pixels
image_size = _number(int, low=8, high=MAX_IMAGE_SIZE)  # an --image_size: [8, 512] pixels


def schedule_flag():
    """``--schedule_scale`` as a parent parser, for the scripts whose schedules are the released step schedule
    (stage 1, stage 2, the joint model): ``lib.schedules.scaled``."""
    p = ArgumentParser(add_help=False)
    p.add_argument("--schedule_scale", default=1.0, type=unit_interval_open_low,
                   help="the epochs at which the learning rate steps (x0.1 at 120, 160, ...) and the UE weight "
                        "grows (80, 160) times this, for short runs that pass through the whole schedule "
                        "(in (0, 1]; 1: as released; not the paper's recipe below 1)")
    return p


def common_parser(dataset_names, network_names, lr_help="base learning rate (>= 0)"):
    """The flags every script has, released names first; each script sets its own defaults
    (``parser.set_defaults(lr=...)``) and adds its method's flags; ``lr_help`` says where a per-data-set
    --lr comes from (semi.py)."""
    p = ArgumentParser(add_help=False)
    p.add_argument("--dataset", default="cifar10", choices=list(dataset_names),
                   help="data set; 'folder' reads your own images from --data_dir")
    p.add_argument("--network", default="resnet18", choices=list(network_names),
                   help="backbone: resnet18/resnet101 (two trunks, RGB and Sobel, as released) or wrn28_2 "
                        "(WideResNet-28-2 on RGB, the semi-supervised literature's)")
    p.add_argument("--low_dim", default=128, type=positive_int, help="d, embedding dimension (>= 1)")
    p.add_argument("--width", default=64, type=positive_int,
                   help="channels of the first stage (>= 1; 64 as released; wrn28_2 scales its widths by "
                        "width/64); smaller only for quick CPU runs")
    p.add_argument("--lr", default=0.03, type=non_negative_float, help=lr_help)
    p.add_argument("--momentum", default=0.9, type=half_open_unit, help="SGD momentum, Nesterov (in [0, 1))")
    p.add_argument("--weight_decay", "--wd", default=5e-4, type=non_negative_float, help="weight decay (>= 0)")
    p.add_argument("--epochs", default=200, type=positive_int, help="training epochs (>= 1)")
    p.add_argument("--batch_size", default=128, type=_number(int, low=2),
                   help="images per step for the whole job (>= 2: the losses compare images); under torchrun "
                        "each of P processes takes batch_size / P of them, so it must divide by P, and the "
                        "learning rate stays right")
    p.add_argument("--model_dir", default="checkpoint/", help="the run folder: checkpoints, logs, pictures")
    p.add_argument("--resume", "-r", default="", metavar="CKPT",
                   help="checkpoint to start from or continue: a name inside --model_dir, else a path")
    p.add_argument("--test_only", action="store_true", help="only evaluate --resume")
    p.add_argument("--seed", default=1567010775, type=seed, help="random seed (0 <= seed < 2^63)")
    p.add_argument("--allow_change", nargs="+", default=[], metavar="FLAG",
                   help="with --resume of a run to continue: let these flags (e.g. lr) take the new values given "
                        "here; any other flag that changes the method mid-run is refused, and flags left out keep "
                        "the checkpoint's values")
    data = p.add_argument_group("data")
    data.add_argument("--data_dir", default="./data", help="where data sets are read or downloaded; "
                      "with --dataset folder, the folder of images (sub-folders = classes)")
    data.add_argument("--subset", default=None, type=positive_int, help="use only the first N images of each split")
    data.add_argument("--image_size", default=32, type=image_size,
                      help=f"square input side in pixels (8 to {MAX_IMAGE_SIZE}); --test_only: the file's own size "
                           "unless given")
    data.add_argument("--num_classes", default=None, type=_number(int, low=2),
                      help="clusters to make of an unlabelled folder in stage 2 (>= 2); stage 1 ignores it")
    data.add_argument("--workers", default=4, type=non_negative_int, help="data-loading processes (>= 0)")
    data.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    speed = p.add_argument_group("speed (off by default; bench/README.md gives their measured effect)")
    speed.add_argument("--amp", action="store_true",
                       help="bfloat16 autocast for the network (losses and memory bank stay float32)")
    speed.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    speed.add_argument("--compile", action="store_true", help="torch.compile the network")
    speed.add_argument("--gpu_augment", action="store_true",
                       help="augment whole batches on the device from uint8 images held there "
                            "(same transforms and parameter distributions, another random stream; the two "
                            "stages and joint.py)")
    several = p.add_argument_group("several processes (torchrun; docs/distributed.md)")
    several.add_argument("--sync_bn", action="store_true",
                         help="GPUs: BatchNorm statistics over the whole global batch (SyncBatchNorm), as one "
                              "device computes them, instead of over each process's own rows (as the released "
                              "DataParallel had them per GPU)")
    return p


def check_output_dir(path, flag="--model_dir"):
    """``path`` is, or can become, a writable folder: checked by creating and removing a file in it (or in
    its nearest existing parent), which also catches read-only mounts and holds for root."""
    if not path:
        raise InputError(f"{flag} is empty; name a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is a file" if probe == os.path.abspath(path) else f"is under the file {probe}"
        raise InputError(f"{flag} {path} {what}; name a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".write-test-")
        os.close(fd)
        os.remove(name)
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot write in {probe} ({err.strerror}); choose another folder") from None


def check_output_file(path, flag, model_dir):
    """A file the run in ``model_dir`` will write besides its own: a file name (not a folder) in a folder that
    exists and is writable, and never a checkpoint nor any file the run itself writes there (``RUN_FILES``,
    their temporaries, ``cache/``), whatever path leads to it. A device or pipe (``/dev/stdout``) is taken as
    it is."""
    if not path:
        raise InputError(f"{flag} is empty; name a file")
    if path.endswith((os.sep, "/")) or os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder; name a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if _written_by_run(path, model_dir):
        raise InputError(f"{flag} {path} is a file this run writes in {model_dir}; writing there would destroy it: "
                         "choose another file")
    if path.endswith((".t7", ".pt", ".pth")) or (os.path.isfile(path) and is_checkpoint(path)):
        raise InputError(f"{flag} {path} names a checkpoint; writing there would destroy it: choose another file")
    kind = run_file_kind(path)
    if kind:
        raise InputError(f"{flag} {path} is {kind}; writing there would destroy it: choose another file")
    if is_device(path):
        if not os.access(path, os.W_OK):
            raise InputError(f"{flag} {path} cannot be written; choose another file")
        return
    check_output_dir(folder, flag)


def _written_by_run(path, model_dir):
    """Whether ``path`` resolves (links, '..', hard links) to a file the run in ``model_dir`` writes."""
    real, own = os.path.realpath(path), os.path.realpath(model_dir)
    if os.path.commonpath([real, os.path.join(own, CACHE)]) == os.path.join(own, CACHE):
        return True
    for name in RUN_FILES:
        mine = os.path.join(own, name)
        if real == mine or real.startswith(mine + ".tmp"):
            return True
        if os.path.exists(path) and os.path.exists(mine) and os.path.samefile(path, mine):
            return True
    return False


# what a run's JSON file holds (a log's record, a lock, a report, the harness's command): a key of each
RUN_FILE_KEYS = {"epoch": "a run's log", "pid": "a run's lock", "selected_head": "a run's report",
                 "test_acc": "a run's report", "acc": "a run's report", "script": "a run's record"}


def run_file_kind(path):
    """What run file the existing file ``path`` is, wherever it lies (None: none, or no such file): by name
    (``RUN_FILES`` of any run folder, the harness's files) or by content (a JSON object, or a log whose first
    line is one, with a key of ``RUN_FILE_KEYS``)."""
    if not os.path.isfile(path):  # a new file, whatever its name, destroys nothing
        return None
    name = os.path.basename(os.path.normpath(path))
    if name in RUN_FILES or name in HARNESS_FILES:
        return f"a run's file ({name})"
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return None
    for text in (head, head.split(b"\n", 1)[0]):  # a whole JSON file (eval.json), a log's first line
        with contextlib.suppress(UnicodeDecodeError, ValueError):
            record = json.loads(text.decode())
            if isinstance(record, dict):
                return next((what for key, what in RUN_FILE_KEYS.items() if key in record), None)
    return None


def is_checkpoint(path):
    """A PyTorch file: a zip archive (torch >= 1.6) or a pickle (the legacy format of the released files)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def run_cli(main, parser, argv=None):
    """Parse ``argv`` and run ``main(args)``, each way of stopping one line on standard error (where it is
    open) and an exit status: bad input 2, a diverged run 3, a fault outside the run's control (a full disk,
    an I/O error, a closed or full standard output) 1, Ctrl-C 130 and SIGTERM 143 (what to resume). The last
    checkpoint and the log stay intact in every case; under torchrun rank 0 alone says it."""
    if sys.stdout is None or sys.stderr is None:  # started with a stream closed (`>&-`): Python sets it to None
        which = "output" if sys.stdout is None else "error"
        _stop(1, f"error: the standard {which} is closed; start the script with it open (redirect it to a file "
                 "or /dev/null); nothing was written")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # one line per epoch, also when redirected to a file
    stdout = sys.stdout = WatchedStream(sys.stdout)
    try:
        with handle_signals():
            result = main(args)
        if argv is None:  # the command line's process: its work is done and saved, so a signal while the
            for stop in (signal.SIGINT, signal.SIGTERM):  # interpreter shuts down ends nothing (exit stays 0)
                with contextlib.suppress(ValueError):
                    signal.signal(stop, signal.SIG_IGN)
        return result
    except InputError as err:
        _stop(2, f"error: {err}")
    except Diverged as err:
        _stop(3, f"error: {err}")
    except Fault as err:
        _stop(1, f"error: {err}")
    except OSError as err:
        _stop(1, f"error: {describe_fault(err)}; the run's checkpoints and logs are intact: run the same "
                 "command again")
    except KeyboardInterrupt as err:
        terminated = getattr(err, "terminated", False) or isinstance(err, Terminated)
        message = str(err) if isinstance(err, Interrupted) else "nothing was saved"
        _stop(143 if terminated else 130, f"{'terminated' if terminated else 'interrupted'}: {message}")
    finally:
        distributed.cleanup()
        if sys.stdout is stdout:
            sys.stdout = stdout.stream
        if argv is None:  # the command line's process ends: its objects need no collection on the way out
            gc.freeze()  # (the collector's walk over what torch loaded is most of a second of the exit)


class WatchedStream:
    """The standard output, remembering the error a write to it raised (``failed``), so that a fault can be
    told apart from the others: an OSError of ``print`` names no file."""

    def __init__(self, stream):
        self.stream = stream
        self.failed = None

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as err:
            self.failed = err
            raise

    def flush(self):
        try:
            return self.stream.flush()
        except OSError as err:
            self.failed = err
            raise

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _stop(status, line):
    """Print ``line`` on standard error (rank 0, where the stream can be written) and exit with ``status``.
    A standard output that failed is pointed at /dev/null, so exiting does not fail on it again."""
    if stream_broken(sys.stdout):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's last flush goes there
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    if _rank_zero() and sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(line, file=sys.stderr, flush=True)
    raise SystemExit(status) from None
