"""The scripts' command lines: flags checked where they are parsed, the flags all scripts share, exit codes.

Every flag's valid range is part of its type, so a bad value is one ``error:`` line and exit status 2
before any work starts, and ``--help`` states the range beside the default.
"""
import argparse
import math
import os
import sys
import tempfile

from lib.errors import Diverged, InputError

from . import distributed


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and a one-line error (no usage dump) for bad flags."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
fraction = _number(float, low=0, high=1, high_open=True)  # momenta: [0, 1)
share = _number(float, low=0, high=1)  # shares of the data: [0, 1]
seed = _number(int, low=0, high=2**63 - 1)


def common_parser(dataset_names, network_names):
    """The flags every script has, released names first; each script sets its own defaults
    (``parser.set_defaults(lr=...)``) and adds its method's flags."""
    p = ArgumentParser(add_help=False)
    p.add_argument("--dataset", default="cifar10", choices=list(dataset_names),
                   help="data set; 'folder' reads your own images from --data_dir")
    p.add_argument("--network", default="resnet18", choices=list(network_names), help="two-trunk backbone")
    p.add_argument("--low_dim", default=128, type=positive_int, help="d, embedding dimension (>= 1)")
    p.add_argument("--width", default=64, type=positive_int,
                   help="channels of the first ResNet stage (>= 1; 64 as released, smaller only for quick CPU runs)")
    p.add_argument("--lr", default=0.03, type=non_negative_float, help="base learning rate (>= 0)")
    p.add_argument("--momentum", default=0.9, type=fraction, help="SGD momentum, Nesterov (in [0, 1))")
    p.add_argument("--weight_decay", "--wd", default=5e-4, type=non_negative_float, help="weight decay (>= 0)")
    p.add_argument("--epochs", default=200, type=positive_int, help="training epochs (>= 1)")
    p.add_argument("--batch_size", default=128, type=positive_int,
                   help="images per step for the whole job (>= 1); under torchrun each of P processes takes "
                        "batch_size / P of them, so it must divide by P, and the learning rate stays right")
    p.add_argument("--model_dir", default="checkpoint/", help="the run folder: checkpoints, logs, pictures")
    p.add_argument("--resume", "-r", default="", metavar="CKPT",
                   help="checkpoint to start from or continue: a name inside --model_dir, else a path")
    p.add_argument("--test_only", action="store_true", help="only evaluate --resume")
    p.add_argument("--seed", default=1567010775, type=seed, help="random seed (0 <= seed < 2^63)")
    data = p.add_argument_group("data")
    data.add_argument("--data_dir", default="./data", help="where data sets are read or downloaded; "
                      "with --dataset folder, the folder of images (sub-folders = classes)")
    data.add_argument("--subset", default=None, type=positive_int, help="use only the first N images of each split")
    data.add_argument("--image_size", default=32, type=_number(int, low=8),
                      help="side of the square network input, in pixels (>= 8)")
    data.add_argument("--num_classes", default=None, type=_number(int, low=2),
                      help="clusters for an unlabelled --dataset folder (>= 2); the labels decide elsewhere")
    data.add_argument("--workers", default=4, type=non_negative_int, help="data-loading processes (>= 0)")
    data.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    speed = p.add_argument_group("speed (off by default; README gives their measured effect)")
    speed.add_argument("--amp", action="store_true",
                       help="bfloat16 autocast for the network (losses and memory bank stay float32)")
    speed.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    speed.add_argument("--compile", action="store_true", help="torch.compile the network")
    speed.add_argument("--gpu_augment", action="store_true",
                       help="augment whole batches on the device from uint8 images held there "
                            "(same transforms and parameter distributions, another random stream)")
    several = p.add_argument_group("several processes (torchrun; README, 'Several GPUs and machines')")
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


def check_output_file(path, flag):
    """A file the run will write: its folder exists and is writable, and it is not a checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder; name a file")
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if path.endswith((".t7", ".pt", ".pth")) or (os.path.isfile(path) and is_checkpoint(path)):
        raise InputError(f"{flag} {path} names a checkpoint; writing there would destroy it: choose another file")
    check_output_dir(folder, flag)


def is_checkpoint(path):
    """A PyTorch file: a zip archive (torch >= 1.6) or a pickle (the legacy format of the released files)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def run_cli(main, parser, argv=None):
    """Parse ``argv`` and run ``main(args)``. Bad input prints one line and exits 2, a diverged run exits 3,
    Ctrl-C one line (what to resume) and 130; the last checkpoint stays intact in every case."""
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # one line per epoch, also when redirected to a file
    say = distributed.is_main  # several processes meet the same error: rank 0 says it once
    try:
        return main(args)
    except InputError as err:
        if say():
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Diverged as err:
        if say():
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except KeyboardInterrupt as err:
        if say():
            print(f"interrupted: {err or 'nothing was saved'}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        distributed.cleanup()
